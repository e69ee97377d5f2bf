"""One run across processes (``torchrun … aevb train``): the same training on 1 worker as on 2.

Each case trains a small model in this process, and again under ``torchrun``
with 2 gloo workers of one thread: in one group (``--nproc_per_node 2``) or
as 2 "nodes" of one worker each (two torchrun invocations rendezvousing on
127.0.0.1 with ``--rdzv_backend c10d``).  The data: the bundled digits (1,617
training images, so the last batch of an epoch splits unevenly between 2
workers) and the MNIST split (the MLP and the conv VAE).  In fp32 the final
weights agree to float rounding (measured, the largest |Δ| of a weight: 1e-7
on digits after 3 epochs, 4.8e-7 for the MLP and 2.2e-6 for the conv VAE
after an MNIST epoch; asserted: 1e-5) and the test ELBO to 1e-4 nats
(measured: at most 1.4e-9).  A resume with the same number of workers is
bit-exact; with another it goes on to the same weights to rounding.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import aevb
from aevb.analysis.evaluation import Shard, evaluate
from aevb.data import streaming
from aevb.data.datasets import load_data
from aevb.data.memory import DatasetRows, memory_dataset
from aevb.data.streaming import StreamedImages
from aevb.errors import UserError
from aevb.model import noise
from aevb.run.checkpoints import read_checkpoint
from aevb.run.folder import CHECKPOINT
from aevb.training.data import TrainingData
from aevb.training.distributed import Workers, check_shares
from conftest import MNIST_IMAGES, MNIST_LABELS, aevb_cli, requires_mnist

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this PyTorch has no torch.distributed")

WEIGHT_TOLERANCE = 1e-5  # max |Δ| of any weight; measured ≤ 2.2e-6 (module docstring)
ELBO_TOLERANCE = 1e-4  # nats
# fp32: a bf16 multiply's rounding depends on its number of rows (oneDNN's blocking), and Adam's first steps,
# which divide a gradient by its size, make a rounding in a near-zero gradient a step of ±lr (measured: the
# conv VAE in bf16 differed by lr after one step, by 0.08 after two epochs)
# --val-split 0: the runs' test ELBO is compared, recorded each epoch only without a validation split (issue 30)
SMALL = ("--data", "digits", "--latent-dim", "3", "--hidden", "32", "--device", "cpu", "--batch-size", "64",
         "--precision", "fp32", "--val-split", "0", "-q")
CASES = {
    "mlp-vae-dynamic-binarisation": ("--model", "vae", "--arch", "mlp", "--binarize", "dynamic"),
    "dae-masking": ("--model", "dae", "--arch", "mlp", "--corruption", "masking"),
    "iwae-dequantised": ("--model", "iwae", "--arch", "mlp", "--likelihood", "gaussian-learned", "--dequantize"),
    # the labels of a conditional model are each worker's rows of the global batch's, as its examples are
    "conditional-vae": ("--model", "vae", "--arch", "mlp", "--conditional"),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment() -> dict:
    source = str(Path(aevb.__file__).resolve().parents[1])  # this checkout's aevb, in the workers too
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}


def _launch(launch: tuple[str, ...], *target: str) -> subprocess.Popen:
    """torchrun with options ``launch`` starting ``target`` (a script and its arguments, or -m and a module's)."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launch, *target],
                            env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _torchrun(*arguments: str, launch: tuple[str, ...], command: str = "train") -> subprocess.Popen:
    return _launch(launch, "-m", "aevb.cli", command, *arguments)


def _one_group() -> tuple[str, ...]:
    """torchrun's options for 2 workers in one group on this machine."""
    return "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port())


def _finish(*workers: subprocess.Popen) -> None:
    try:
        outputs = [w.communicate(timeout=300)[0] for w in workers]
    except subprocess.TimeoutExpired:
        for w in workers:  # a hung group must not outlive the test
            w.kill()
        raise
    assert all(w.returncode == 0 for w in workers), "\n".join(outputs)[-3000:]


def two_processes(*arguments: str, command: str = "train") -> None:
    _finish(_torchrun(*arguments, command=command, launch=_one_group()))


def two_processes_of_script(script: Path, *arguments: str) -> None:
    """A user's ``script`` under torchrun with 2 workers in one group."""
    _finish(_launch(_one_group(), str(script), *arguments))


def _nodes(*arguments: str, second: tuple[str, ...] = ()) -> list[subprocess.Popen]:
    """Two one-worker nodes; ``second``: options only the second is given."""
    endpoint = f"127.0.0.1:{_free_port()}"
    return [_torchrun(*arguments, *(second if rank else ()),
                      launch=("--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
                              "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "aevb-test"))
            for rank in (0, 1)]


def two_nodes(*arguments: str) -> None:
    _finish(*_nodes(*arguments))


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "weights.safetensors")


def final_test_elbo(run: Path) -> float:
    """The last test ELBO; a model without one (the DAE): its test reconstruction term."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "test_reconstruction" in r][-1]
    return last.get("test_elbo", last["test_reconstruction"])


def assert_same_training(one: Path, two: Path) -> None:
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()
    largest = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert largest <= WEIGHT_TOLERANCE, f"weights differ by up to {largest:.3g}"
    assert abs(final_test_elbo(one) - final_test_elbo(two)) <= ELBO_TOLERANCE


@pytest.mark.parametrize("case", CASES)
def test_two_processes_train_as_one(tmp_path, case):
    arguments = (*SMALL, *CASES[case], "--epochs", "3")
    assert aevb_cli("train", *arguments, "--out", str(tmp_path / "one")) == 0
    two_processes(*arguments, "--out", str(tmp_path / "two"))
    assert_same_training(tmp_path / "one", tmp_path / "two")
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((tmp_path / "one" / "metrics.jsonl").read_text().splitlines())  # written once, by rank 0
    assert read_checkpoint(tmp_path / "two" / CHECKPOINT)[1]["world_size"] == 2


def test_two_nodes_train_as_one(tmp_path):
    arguments = (*SMALL, "--model", "vae", "--arch", "conv", "--epochs", "2")
    assert aevb_cli("train", *arguments, "--out", str(tmp_path / "one")) == 0
    two_nodes(*arguments, "--out", str(tmp_path / "two"))
    assert_same_training(tmp_path / "one", tmp_path / "two")


@requires_mnist
@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_two_processes_train_as_one_on_the_mnist_split(tmp_path, arch):
    """The MNIST test file split 8,000 / 2,000, one epoch of batch 256 (the last batch: 64, 32 a worker)."""
    arguments = ("--data", str(MNIST_IMAGES), "--labels", str(MNIST_LABELS), "--test-split", "2000", "--model", "vae",
                 "--arch", arch, "--latent-dim", "8", "--hidden", "64", "--batch-size", "256", "--epochs", "1",
                 "--device", "cpu", "--precision", "fp32", "--val-split", "0", "-q")
    assert aevb_cli("train", *arguments, "--out", str(tmp_path / "one")) == 0
    two_processes(*arguments, "--out", str(tmp_path / "two"))
    assert_same_training(tmp_path / "one", tmp_path / "two")


def test_nodes_started_with_other_options_stop_with_one_message_on_each(tmp_path):
    nodes = _nodes(*SMALL, "--model", "vae", "--epochs", "1", "--out", str(tmp_path / "run"), second=("--lr", "0.01"))
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode != 0 for node in nodes)
    assert all("workers were started with different options (--lr)" in output for output in outputs), outputs[0][-2000:]
    assert not (tmp_path / "run").exists()


def test_resume_with_as_many_workers_is_bit_exact_and_with_fewer_goes_on(tmp_path):
    arguments = (*SMALL, "--model", "vae", "--arch", "mlp", "--binarize", "dynamic")
    two_processes(*arguments, "--epochs", "2", "--out", str(tmp_path / "whole"))
    two_processes(*arguments, "--steps", "30", "--out", str(tmp_path / "cut"))  # stopped mid-epoch
    state, meta = read_checkpoint(tmp_path / "cut" / CHECKPOINT)
    assert meta["world_size"] == 2 and {"rng.torch", "rng.torch.rank1"} <= set(state)
    shutil.copytree(tmp_path / "cut", tmp_path / "cut-again")
    two_processes("--resume", str(tmp_path / "cut"), "--epochs", "2")
    whole, resumed = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert aevb_cli("train", "--resume", str(tmp_path / "cut-again"), "--epochs", "2", "-q") == 0  # on one worker
    assert_same_training(tmp_path / "whole", tmp_path / "cut-again")


def _numbers(value, path: str = "") -> dict:
    """Every leaf of a JSON value by its path: {".nll": 26.4, ".per_class[0].nll": 28.2, …}."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _numbers(item, f"{path}.{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _numbers(item, f"{path}[{i}]").items()}
    return {path: value}


def test_two_processes_evaluate_as_one(tmp_path):
    """``torchrun … aevb eval``: the 180 test digits in global batches of 75 (the last: 30), each worker its rows
    of each, gathered by rank 0; every number of eval.json as one process's (measured in fp32: identical bits;
    asserted: 1e-6 relative).  fp32: bf16 multiplies round a row by how many rows its matrix has."""
    assert aevb_cli("train", *SMALL, "--model", "vae", "--binarize", "dynamic", "--epochs", "1",
                    "--out", str(tmp_path / "one")) == 0
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    evaluation = ("--iw-samples", "40", "--batch-size", "75", "--precision", "fp32", "--device", "cpu", "--seed", "3")
    assert aevb_cli("eval", str(tmp_path / "one"), *evaluation) == 0
    two_processes(str(tmp_path / "two"), *evaluation, command="eval")
    one, two = (_numbers(json.loads((tmp_path / run / "eval.json").read_text())) for run in ("one", "two"))
    assert one.keys() == two.keys() and one[".examples"] == 180 and one[".nll"] is not None
    for key, value in one.items():
        if isinstance(value, float):
            assert abs(value - two[key]) <= 1e-6 * max(1.0, abs(value)), (key, value, two[key])
        else:
            assert value == two[key], key


def test_a_shard_of_each_batch_gets_the_noise_it_gets_in_the_whole(one_thread):
    """Evaluation by shards, simulated in one process: the per-example numbers each of 3 ranks computes are the
    rows of one process's to float rounding (an encoder of 2 rows rounds otherwise than of 7), for batches of 7
    (uneven shares; the last batch of 2 leaves a rank nothing)."""
    model = aevb.VAE(data_shape=(1, 4, 4), latent_dim=2, arch="mlp", likelihood="bernoulli")
    x = torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    def columns(shard: Shard) -> dict[str, list[torch.Tensor]]:
        """What ``shard`` gives to be gathered: per column, [its rows of each batch]."""
        given = []
        gather = lambda value: given.append(value) or [value]  # noqa: E731
        torch.manual_seed(5)
        evaluate(model, x, iw_samples=20, batch_size=7, precision="fp32", shard=Shard(shard.rank, shard.count, gather))
        return given[-1]

    whole = columns(Shard())
    ranks = [columns(Shard(rank, 3)) for rank in range(3)]
    assert [len(r["log_px"][2]) for r in ranks] == [0, 1, 1]  # the last batch, of 2
    for name, batches in whole.items():
        for batch, values in enumerate(batches):
            assert torch.allclose(torch.cat([r[name][batch] for r in ranks]), values, rtol=1e-5, atol=1e-6), name


def test_a_batch_every_worker_can_share():
    check_shares(Workers(0, 2), examples=1617, batch_size=64)  # the last batch: 17 examples, 8 and 9
    with pytest.raises(UserError, match="cannot be shared by 4 workers"):
        check_shares(Workers(0, 4), examples=1602, batch_size=64)  # the last batch: 2 examples
    with pytest.raises(UserError, match="--batch-size"):
        check_shares(Workers(0, 4), examples=100, batch_size=2)


def test_the_rows_of_the_workers_tile_the_batch_and_their_shares_give_the_global_mean():
    workers = [Workers(rank, 3) for rank in range(3)]
    rows = [w.rows(17) for w in workers]
    assert rows[0][0] == 0 and rows[-1][1] == 17 and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    values = torch.arange(17.0)
    means = [values[start:stop].mean() * w.share(17) for w, (start, stop) in zip(workers, rows)]
    assert torch.allclose(torch.stack(means).mean(), values.mean())


def test_an_examples_noise_is_the_same_in_any_share_of_the_batch():
    def drawn(start, stop):
        with noise.batch_rows(torch.Generator().manual_seed(7), start, stop, 10):
            return noise.randn((4, stop - start, 3), -2), noise.rand((stop - start, 2, 2), 0)

    whole = drawn(0, 10)
    for start, stop in ((0, 5), (5, 10), (3, 4)):
        part = drawn(start, stop)
        assert torch.equal(part[0], whole[0][:, start:stop]) and torch.equal(part[1], whole[1][start:stop])


def test_a_loss_that_couples_the_batch_is_refused_over_processes(tmp_path):
    """β-TCVAE's penalty is on each batch as a whole: split over workers it would be another loss."""
    port = _free_port()
    group = _torchrun(*SMALL, "--model", "dip-vae", "--epochs", "1", "--out", str(tmp_path / "run"),
                      launch=("--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port)))
    output = group.communicate(timeout=300)[0]
    assert group.returncode != 0
    assert output.count("the dip-vae loss is a penalty on each batch as a whole") == 2, output[-2000:]
    assert "aevb/training" not in output  # no traceback of the workers (torchrun prints its own)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------
# what each worker reads (aevb.training.data)


class Counted(torch.utils.data.Dataset):
    """n examples [1, 2, 2] whose every read is recorded."""

    def __init__(self, n: int):
        self.x = torch.rand(n, 1, 2, 2, generator=torch.Generator().manual_seed(n))
        self.read: list[int] = []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.read.append(int(i))
        return self.x[i]


def _loaded(train, rank: int, workers: int = 2) -> TrainingData:
    dataset = memory_dataset(train)
    return TrainingData(dataset, dataset.train, torch.device("cpu"), "none", None, "test", None, None,
                        Workers(rank, workers))


def test_each_worker_reads_its_rows_of_a_users_dataset_and_no_other():
    """A user's Dataset of 50 examples, global batches of 16 (the last: 2): each worker's __getitem__ is called for
    its rows of each batch of the epoch's order alone, and those are the examples it trains on."""
    order = torch.randperm(50, generator=torch.Generator().manual_seed(3))
    reads, examples = [], []
    for rank in range(2):
        counted = Counted(50)
        data = _loaded(DataLoader(counted, num_workers=0), rank)
        counted.read.clear()  # the first example, read once to know the shape
        shares = list(data.batches(order, 0, 16))
        assert [size for size, _ in shares] == [16, 16, 16, 2]
        mine = torch.cat([order[begin:begin + size][slice(*Workers(rank, 2).rows(size))]
                          for begin, (size, _) in zip(range(0, 50, 16), shares)])
        assert counted.read == mine.tolist()
        assert torch.equal(torch.cat([data.rows(share) for _, share in shares]), counted.x[mine])
        reads.append(set(counted.read))
        examples.append(len(counted.read))
    assert not reads[0] & reads[1] and reads[0] | reads[1] == set(range(50)) and examples == [25, 25]


def test_a_worker_reads_only_its_rows_of_a_memory_mapped_file(tmp_path, monkeypatch):
    """A streamed .npy: a worker checks its half of the file at load (a bad value in the other half is the other
    worker's to find), and reads only its rows of each batch."""
    pixels = np.random.default_rng(0).integers(0, 256, (40, 1, 3, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", pixels)
    floats = pixels.astype(np.float32) / 255
    floats[30] = 2.0  # out of range, in the second half
    np.save(tmp_path / "bad.npy", floats)
    load_data(str(tmp_path / "bad.npy"), stream="yes", part=(0, 2))
    with pytest.raises(UserError, match=r"must lie in \[0, 1\]"):
        load_data(str(tmp_path / "bad.npy"), stream="yes", part=(1, 2))

    dataset = load_data(str(tmp_path / "x.npy"), stream="yes", test_split=4, part=(1, 2))
    read = []
    original = StreamedImages.__getitem__
    monkeypatch.setattr(StreamedImages, "__getitem__", lambda self, index: read.append(index) or original(self, index))
    data = TrainingData(dataset, dataset.train, torch.device("cpu"), "none", None, "test", None, None, Workers(1, 2))
    order = torch.randperm(36, generator=torch.Generator().manual_seed(1))
    x = torch.cat([data.rows(share) for _, share in data.batches(order, 0, 10)])  # batches 10, 10, 10, 6
    mine = torch.cat([order[begin:begin + 10][slice(*Workers(1, 2).rows(min(10, 36 - begin)))]
                      for begin in range(0, 36, 10)])
    assert torch.equal(torch.cat([torch.as_tensor(np.asarray(i)) for i in read]), mine)
    assert torch.equal(x, torch.from_numpy(pixels[:36][mine.numpy()].astype(np.float32) / 255))


def test_the_workers_mean_example_is_one_processs_to_the_bit(monkeypatch):
    """Each of 3 workers sums its chunks of rows; the sum of their chunk sums gives one process's mean bit for bit."""
    monkeypatch.setattr(streaming, "_CHUNK_ROWS", 7)
    counted = Counted(40)  # 6 chunks of 7 rows (the last: 5)
    rows = DatasetRows(counted, workers=0)
    parts, reads = {}, []
    for rank in range(3):
        counted.read.clear()
        streaming.mean_example(rows, (rank, 3), lambda sums: parts.setdefault(rank, sums))
        reads.append(set(counted.read))
    assert [sorted(r) for r in reads] == [[*range(0, 7), *range(21, 28)], [*range(7, 14), *range(28, 35)],
                                          [*range(14, 21), *range(35, 40)]]
    combined = streaming.mean_example(rows, (0, 3), lambda sums: parts[0] + parts[1] + parts[2])
    assert torch.equal(combined, streaming.mean_example(rows))


DATASET_SCRIPT = """
import sys
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, Dataset
import aevb
from aevb.config import make_config


class Digits(Dataset):
    def __init__(self):
        self.x = torch.from_numpy(load_digits().images).float().div(16).unsqueeze(1)[:600]
        self.read = []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.read.append(int(i))
        return self.x[i]


train = Digits()
config = make_config(latent_dim=3, hidden=[32], epochs=2, batch_size=64, device="cpu", precision="fp32",
                     val_split=0, out=sys.argv[1], seed=4)
aevb.train(config, train=DataLoader(train, num_workers=0), test=train.x[:50], progress=False)
rank = int(__import__("os").environ.get("RANK", "0"))
with open(f"{sys.argv[1]}-reads-{rank}.txt", "w") as f:
    f.write(" ".join(map(str, train.read)))
"""


def test_two_processes_train_as_one_on_a_users_dataset_each_reading_its_share(tmp_path):
    """aevb.train(config, train=DataLoader(dataset)) in one process and under torchrun with 2: the same weights,
    and each worker's Dataset was read for half the examples of every epoch (its rows of each batch), its chunks of
    the mean example and the first example (its shape)."""
    script = tmp_path / "train_dataset.py"
    script.write_text(DATASET_SCRIPT)
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], env=_environment(), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert one.returncode == 0, one.stdout[-3000:]
    two_processes_of_script(script, str(tmp_path / "two"))
    assert_same_training(tmp_path / "one", tmp_path / "two")
    reads = [[int(i) for i in (tmp_path / f"two-reads-{rank}.txt").read_text().split()] for rank in (0, 1)]
    alone = [int(i) for i in (tmp_path / "one-reads-0.txt").read_text().split()]
    # one process: 600 an epoch, 600 for the mean and the first example twice for its shape (when given, and when
    # moved to the device); a worker: its rows of each batch (each batch of 64 split 32 / 32, the last of 24 split
    # 12 / 12), its chunks of the mean (the only one of 600 rows: rank 0's) and the first example twice
    assert len(alone) == 2 * 600 + 600 + 2
    assert [len(r) for r in reads] == [2 * 300 + 600 + 2, 2 * 300 + 2]


THREADS_SCRIPT = """
import os, sys
import torch
import aevb
from aevb.config import make_config

threads = lambda: len(os.listdir("/proc/self/task"))  # the process's threads, C++'s too
before = threads()
config = make_config(data="digits", latent_dim=3, hidden=[32], steps=4, batch_size=64, device="cpu",
                     precision="fp32", val_split=0, out=sys.argv[1])
aevb.train(config, progress=False)
with open(f"{sys.argv[1]}-threads-{os.environ['RANK']}.txt", "w") as f:
    f.write(f"{before} {threads()}")
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts a process's threads in Linux's /proc")
def test_a_workers_group_and_its_threads_are_gone_when_train_returns(tmp_path):
    """train() under torchrun ends the process group it made, and gloo's worker threads with it: a thread that
    outlived it could free a collective's tensors while the interpreter shuts down, and abort the worker at exit
    (about one run in 50 did, while importing torch._dynamo after the group kept it alive)."""
    script = tmp_path / "train_threads.py"
    script.write_text(THREADS_SCRIPT)
    two_processes_of_script(script, str(tmp_path / "run"))
    for rank in (0, 1):
        before, after = map(int, (tmp_path / f"run-threads-{rank}.txt").read_text().split())
        assert after == before, f"worker {rank}: {before} threads before train(), {after} after"


FOLDER_SCRIPT = """
import os
import sys
from pathlib import Path
import aevb
from aevb.config import make_config
from aevb.data import folders, sources

sources.CACHE_DIR = Path(sys.argv[3])
decoded = []
decode = folders._decode
folders._decode = lambda path, *rest: decoded.append(path) or decode(path, *rest)
config = make_config(data=sys.argv[2], stream="yes", latent_dim=3, hidden=[32], epochs=2, batch_size=16,
                     device="cpu", precision="fp32", val_split=0, test_split=8, out=sys.argv[1])
aevb.train(config, progress=False)
Path(f"{sys.argv[1]}-decoded-{os.environ.get('RANK', '0')}.txt").write_text(str(len(decoded)))
"""


def test_a_streamed_folder_is_decoded_by_one_worker_and_trains_as_in_one_process(tmp_path):
    """An image folder of 48 PNGs in 2 classes, --stream yes: under torchrun its decoded cache is written by worker
    0 alone (worker 1 waits, then maps it) and the run's weights are one process's to rounding."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (48, 8, 8), dtype=np.uint8)
    for i, image in enumerate(pixels):
        (tmp_path / "images" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").save(tmp_path / "images" / f"class{i % 2}" / f"{i:02d}.png")
    script = tmp_path / "train_folder.py"
    script.write_text(FOLDER_SCRIPT)
    arguments = lambda run: [str(script), str(tmp_path / run), str(tmp_path / "images"), str(tmp_path / f"cache-{run}")]  # noqa: E731
    one = subprocess.run([sys.executable, *arguments("one")], env=_environment(), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert one.returncode == 0, one.stdout[-3000:]
    two_processes_of_script(*arguments("two"))
    assert_same_training(tmp_path / "one", tmp_path / "two")
    decoded = [int((tmp_path / f"{run}-decoded-{rank}.txt").read_text()) for run, rank in (("one", 0), ("two", 0),
                                                                                           ("two", 1))]
    assert decoded == [48, 48, 0]
