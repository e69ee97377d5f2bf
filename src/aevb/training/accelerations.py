"""Where training takes its accelerations, and nowhere else: the multiplies' dtype of a step (``--precision``),
the optimiser (the fused Adam of :mod:`aevb.acceleration.optim` on the default path) and the loss each step
minimises (the fused VAE loss where :func:`aevb.acceleration.fused.plan` recognises the model, ``torch.compile``
with ``--compile``, else ``model.loss``).  Each gives ``model.loss``'s numbers to rounding.
"""

from __future__ import annotations

import logging
import warnings

import torch

from aevb.acceleration import fused, optim
from aevb.acceleration.bf16 import resolve_precision
from aevb.config import RunConfig
from aevb.errors import UserError, first_line
from aevb.model.base import LossOutput, Model


def step_precision(config: RunConfig, device: torch.device, trained: dict | None) -> torch.dtype | None:
    """The multiplies' dtype of the training step: bf16 where it pays (``--precision auto``), None for fp32.

    A resumed run takes what ``auto`` resolved to when it was trained on that
    kind of device (recorded in its checkpoint), rather than measuring again
    and perhaps changing the arithmetic halfway; where the device now lacks
    bf16 it says so and goes on in fp32.
    """
    recorded = (trained or {}).get("precision")
    if config.precision != "auto" or recorded is None or recorded["device"] != device.type:
        return resolve_precision(config.precision, device)
    try:
        return resolve_precision(recorded["multiplies"], device)
    except UserError:
        warnings.warn(f"the run trained with {recorded['multiplies']} multiplies (--precision auto), which this "
                      f"{device.type} device lacks: it goes on with fp32 multiplies", PrecisionChangedWarning,
                      stacklevel=3)
        return None


class PrecisionChangedWarning(UserWarning):
    """A resumed run goes on with other multiplies than it was trained with."""


def make_optimizer(model: Model, config: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimiser of --optimizer: for adam, the fused Adam of aevb.acceleration.optim (the fast path)."""
    betas, decay = tuple(config.adam_betas), config.weight_decay
    if config.optimizer == "adam":
        # fused Adam is one kernel per step instead of several per parameter
        try:
            return optim.Adam(model.parameters(), lr=config.lr, betas=betas, weight_decay=decay)
        except (RuntimeError, TypeError):
            return torch.optim.Adam(model.parameters(), foreach=True, lr=config.lr, betas=betas, weight_decay=decay)
    warnings.warn(f"--optimizer {config.optimizer}: torch's {OPTIMIZER_CLASSES[config.optimizer].__name__} "
                  f"(foreach), not the fused Adam of the default (--optimizer adam), which steps faster", stacklevel=2)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, betas=betas, weight_decay=decay, foreach=True)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=decay, foreach=True)


OPTIMIZER_CLASSES = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}  # the choices off the fused path


def make_loss(model: Model, config: RunConfig, device: torch.device):
    """``loss_of(x, beta, label=None)``: what each step minimises, the one place where training picks an
    accelerated loss.  ``label``: the batch's labels [B] for a conditional model, else None.

    ``model.loss(x, beta=beta, label=label)`` is the reference.  For a model that
    :func:`aevb.acceleration.fused.plan` recognises (the MLP VAE with a
    Bernoulli likelihood), the fused loss: the same loss and gradients to
    rounding (``tests/test_fused.py``) in one autograd node.  With
    ``--compile``, ``model.loss`` through ``torch.compile`` instead, which
    fuses it itself.
    """
    if config.compile:
        return CompiledLoss(model, config.batch_size, device)
    plan = fused.plan(model)
    if plan is not None:
        return lambda x, beta, label=None: fused.vae_loss(model, x, beta, plan)  # the plan's models take no label
    return model.loss  # loss(x, beta, label): every model's


class CompiledLoss:
    """``model.loss`` through ``torch.compile``, called as ``loss_of(x, beta, label)``.

    The compiled function takes β as a tensor (a float would be compiled
    into the graph, and a β schedule would recompile it every step) and
    full batches only: the last, smaller batch of an epoch runs eagerly, which
    costs less than compiling a second graph for its shape.  So does the
    first step, which fills the model's caches (the prior's distribution);
    traced, it would leave guards on them that the second step fails.  A
    failure to compile is the user's to fix (a missing C++ compiler): one message.
    """

    def __init__(self, model: Model, batch_size: int, device: torch.device):
        if device.type == "cpu":  # inductor's C++ build warns that this CPU machine has no CUDA
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        self.model, self.batch_size = model, batch_size
        self.compiled = torch.compile(model.loss)
        self.warm = False

    def __call__(self, x: torch.Tensor, beta: float, label: torch.Tensor | None = None) -> LossOutput:
        if not self.warm or x.shape[0] != self.batch_size:  # the first step fills the caches
            self.warm = True
            return self.model.loss(x, beta=beta, label=label)
        try:
            # a CPU scalar, which a CUDA graph reads as a number: one on the GPU would be a copy to it each step
            return self.compiled(x, beta=torch.tensor(beta, dtype=torch.float32), label=label)
        except torch._dynamo.exc.TorchDynamoException as e:
            cause = getattr(e, "inner_exception", None) or e  # the backend's own error
            raise UserError(f"--compile: torch.compile failed ({type(cause).__name__}: {first_line(cause)}); "
                            f"train without --compile") from None
