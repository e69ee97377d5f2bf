"""The training loop reads nothing back from the device between its records: no host synchronisation per step.

On a GPU, every read of a device value waits for all the kernels queued
before it: ``.item()``, ``float(t)``, ``bool(t)`` (an ``if`` on a tensor),
formatting or printing a tensor, ``.cpu()``, ``.tolist()``, ``.numpy()``, and
the ops whose output shape depends on the values (``nonzero``, a boolean
mask, ``masked_select``).  One per step keeps the GPU idle while Python
prepares the next step.  The loop promises one read every ``--log-every``
steps (:class:`aevb.training.metrics.StepTerms`).

There is no GPU here, and on the CPU nothing waits; but every such read goes
through torch's dispatcher the same way on either device (a number through
``aten._local_scalar_dense``), where a ``TorchDispatchMode`` sees it, and the
Python-level transfers (``.cpu()``, ``.tolist()``, ``.numpy()``) through
``__torch_function__``.  :class:`HostReads` counts them inside
``Trainer.step`` and ``Trainer.after_step`` of real runs, and follows what a
transfer returned: arithmetic on that host copy (the record's mean, the
finite check) reads nothing from the device and is not counted.

One read is the CPU's alone by design: the fused loss's backward takes its
incoming gradient as a Python number on the CPU (``fused._number``; an op
with a number allocates no tensor for it) and leaves it a tensor elsewhere;
``test_the_fused_loss_reads_its_gradient_as_a_number_only_on_the_cpu``
checks the other branch on the ``meta`` device, and the count skips it.
So does torch's AdamW (or Adam without ``fused``), which reads its step
counters as numbers: it keeps them on the CPU whatever the parameters'
device, so that read waits for nothing.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import aevb
from aevb.acceleration import fused
from aevb.config import make_config
from aevb.data.streaming import StreamedImages
from aevb.training import loop
from aevb.training.data import TrainingData

ATEN = torch.ops.aten
# ops that wait for the device: a value read as a number, an output shaped by the values
VALUE_READS = {ATEN._local_scalar_dense.default, ATEN.nonzero.default, ATEN.masked_select.default,
               ATEN._unique2.default, ATEN.unique_consecutive.default}
TRANSFERS = {"cpu", "tolist", "numpy"}
# (file, function) that read a value that lives on the CPU on every device (module docstring): the fused loss's
# incoming gradient, on the CPU only; the step counters of torch's non-fused optimisers, kept on the CPU
CPU_ONLY_READS = {("/aevb/acceleration/fused.py", "_number"), ("/torch/optim/optimizer.py", "_get_value")}


class HostReads(TorchFunctionMode):
    """Counts the reads of device values made inside it; ``where`` says where each was made (aevb's frames)."""

    def __init__(self):
        super().__init__()
        self.where: list[str] = []
        self.host: dict[int, torch.Tensor] = {}  # tensors already on the host: a transfer's result, and results of them
        self.dispatch = _DispatchReads(self)

    def __enter__(self):
        super().__enter__()
        self.dispatch.__enter__()
        return self

    def __exit__(self, *exc):
        self.dispatch.__exit__(*exc)
        return super().__exit__(*exc)

    def on_host(self, t) -> bool:
        return isinstance(t, torch.Tensor) and self.host.get(id(t)) is t

    def mark(self, outputs) -> None:
        for t in tree_flatten(outputs)[0]:
            if isinstance(t, torch.Tensor):
                self.host[id(t)] = t

    def read(self, what: str) -> None:
        frames = traceback.extract_stack()
        if any(f.filename.endswith(file) and f.name == name for f in frames for file, name in CPU_ONLY_READS):
            return
        mine = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames if "/aevb/" in f.filename]
        self.where.append(f"{what} at {' < '.join(reversed(mine[-3:]))}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        tensors = [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, torch.Tensor)]
        from_device = any(not self.on_host(t) for t in tensors)
        if name in TRANSFERS and from_device:
            self.read(name)
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **(kwargs or {}))
        if name in TRANSFERS or (tensors and not from_device):
            self.mark(result)
        return result


class _DispatchReads(TorchDispatchMode):
    def __init__(self, reads: HostReads):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, torch.Tensor)]
        on_host = bool(tensors) and all(self.reads.on_host(t) for t in tensors)
        masked = func is ATEN.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1])
        if (func in VALUE_READS or masked) and not on_host:
            self.reads.read(str(func))
        result = func(*args, **(kwargs or {}))
        if on_host:
            self.reads.mark(result)
        return result


def _count_reads(monkeypatch) -> list[tuple[str, int, list[str]]]:
    """Wrap Trainer.step and Trainer.after_step to count their reads: (method, step, reads) per call."""
    calls: list[tuple[str, int, list[str]]] = []

    def counted(method):
        def run(self, *args, **kwargs):
            reads = HostReads()
            with reads:
                method(self, *args, **kwargs)
            calls.append((method.__name__, self.position.step, reads.where))

        return run

    monkeypatch.setattr(loop.Trainer, "step", counted(loop.Trainer.step))
    monkeypatch.setattr(loop.Trainer, "after_step", counted(loop.Trainer.after_step))
    return calls


def test_the_counter_sees_every_kind_of_read():
    x = torch.rand(4, 3)
    reads = HostReads()
    with reads:
        y = x * 2
        y.sum().item(), float(y.sum()), bool((y > 0).all()), f"{y.mean():.3f}", y.tolist(), y.numpy(), y[y > 1]
        (y > 1).nonzero()
        host = y.cpu()  # the transfer, then arithmetic on its copy: one read
        bool(torch.isfinite(host).all()), host.mean(0).tolist()
    kinds = [w.split(" at ")[0] for w in reads.where]
    assert kinds == ["aten._local_scalar_dense.default"] * 4 + ["tolist", "numpy", "aten.index.Tensor",
                                                                "aten.nonzero.default", "cpu"]


def test_the_fused_loss_reads_its_gradient_as_a_number_only_on_the_cpu():
    assert fused._number(torch.tensor(2.0)) == 2.0
    on_a_device = torch.tensor(2.0, device="meta")
    assert fused._number(on_a_device) is on_a_device


CASES = {  # the fused MLP VAE with the options that act at each step, and the reference path of other models
    "vae-fused-dynamic-clip-cosine-warmup": dict(binarize="dynamic", grad_clip=1.0, lr_schedule="cosine",
                                                 beta_warmup=5),
    "vae-conv-gaussian-learned-dequantize": dict(arch="conv", likelihood="gaussian-learned", dequantize=True),
    "vae-laplace-vamp-one-cycle": dict(likelihood="laplace-learned", prior="vamp", lr_schedule="one-cycle"),
    "iwae-mog": dict(model="iwae", prior="mog"),
    "hvae": dict(model="hvae"),
    "dae": dict(model="dae", likelihood="gaussian"),
    "cae-sgd": dict(model="cae", likelihood="gaussian", optimizer="sgd"),
    "vae-adamw-step-schedule": dict(optimizer="adamw", lr_schedule="step"),
    # the batch-penalised models of issue 34, and the VQ-VAE's codebook averages and restarts
    "beta-tcvae-mss": dict(model="beta-tcvae", tc_estimator="mss"),
    "factorvae": dict(model="factorvae", discriminator_hidden=[16]),
    "wae-rbf": dict(model="wae", kernel="rbf"),
    "vq-vae-restarts": dict(model="vq-vae", dead_code_threshold=0.5),
    "rae-gradient": dict(model="rae", rae_decoder="gradient"),
    "iwae-piwae": dict(model="iwae", iwae_variant="piwae", iwae_m=2),
}


@pytest.mark.filterwarnings("ignore")  # the options' own advice (a density on 17-level digits, --optimizer sgd)
@pytest.mark.parametrize("case", CASES)
def test_training_reads_from_the_device_only_to_record(case, tmp_path, monkeypatch):
    calls = _count_reads(monkeypatch)
    options = dict(CASES[case])
    if options.get("arch") != "conv":
        options["hidden"] = [32]
    # digits: 1,455 training examples, 6 steps of 256 an epoch; 9 steps cross an epoch's end; a record every 2
    config = make_config(data="digits", latent_dim=2, device="cpu", batch_size=256, steps=9, log_every=2,
                         precision="fp32", out=str(tmp_path / "run"), **options)
    aevb.training.train(config, progress=False)
    steps = [(step, reads) for method, step, reads in calls if method == "step"]
    assert [step for step, _ in steps] == list(range(1, 10))
    assert all(not reads for _, reads in steps), steps
    after = {step: reads for method, step, reads in calls if method == "after_step"}
    recording = {2, 4, 6, 8}  # the record every 2 steps; the run's end (step 9) records outside after_step
    assert {step for step, reads in after.items() if reads} == recording, after
    for step in recording:  # the steps' terms read back in one transfer
        assert [r.split(" at ")[0] for r in after[step]] == ["cpu"], after[step]


def test_an_epochs_order_indexes_the_examples_where_they_are_read():
    """Resident examples are indexed on their device (meta here, standing for a GPU); streamed ones on the host,
    where their pixels are read: an order on the GPU would be copied back at every batch."""
    order = torch.randperm(10)  # as the loop draws it, on the CPU
    resident = TrainingData(None, torch.zeros(10, 1, 2, 2, device="meta"), torch.device("meta"), "none", None,
                            "test", None, None)
    streamed = TrainingData(None, StreamedImages(np.zeros((10, 1, 2, 2), np.uint8), 255.0, device="meta"),
                            torch.device("meta"), "none", None, "test", None, None)
    assert resident.index_device == torch.device("meta") and streamed.index_device == torch.device("cpu")
    assert [share.device.type for _, share in resident.batches(order, 0, 4)] == ["meta"] * 3
    batches = list(streamed.batches(order, 1, 4))  # from the second batch on, as a resumed run starts
    assert [share.device.type for _, share in batches] == ["cpu"] * 2
    assert [size for size, _ in batches] == [4, 2]
    assert torch.equal(torch.cat([share for _, share in batches]), order[4:])
