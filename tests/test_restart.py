"""Faults and restarts: ``--resume auto`` continues a run killed mid-epoch, under torchrun and alone (issue 32, 4).

The runs are killed for real, from outside, with SIGKILL: the test finds the
worker by its environment (``/proc/PID/environ``: a marker of the test, its
``RANK`` and torchrun's ``TORCHELASTIC_RESTART_COUNT``) once a checkpoint of
``--checkpoint-every`` is written and training has gone two steps past it.
The network is the MLP behind a layer that sleeps where the test's
environment says (the killed runs only: the same maths), so that the kill
lands mid-epoch.  The run restarted (by ``torchrun --max-restarts 1``, or by
running the same command again) ends with the weights of an uninterrupted
run, bit for bit (``torch.equal``: the resume from a checkpoint is
bit-exact), and with its metric records.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aevb.run.checkpoints import checkpoint_step
from aevb.run.folder import CHECKPOINT
from conftest import aevb_cli
from test_distributed import _environment, _free_port, _torchrun, two_processes, weights

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="this PyTorch has no torch.distributed"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker to kill in /proc (Linux)"),
]

PAUSE = "AEVB_TEST_STEP_PAUSE"  # seconds the network sleeps at each call, in the runs to be killed
MARKER = "AEVB_TEST_RESTART"  # in the environment of the test's workers, and of no other process
NETS = f'''
import os, time
from torch import nn
from aevb.model.networks import build_mlp


class Pause(nn.Module):
    """Sleeps ${PAUSE} seconds: a run slow enough to be killed mid-epoch, with the same maths."""

    def forward(self, x):
        time.sleep(float(os.environ.get("{PAUSE}", "0")))
        return x


def build(data_shape, latent_dim, encoder_outputs, decoder_channels, hidden=None):
    encoder, decoder = build_mlp(data_shape, latent_dim, encoder_outputs, decoder_channels, hidden)
    return nn.Sequential(Pause(), *encoder), decoder
'''
# 1,617 training digits in batches of 64: 26 steps an epoch; a checkpoint every 8 steps; a record every step
ARGUMENTS = ("--data", "digits", "--arch", "slow_nets:build", "--latent-dim", "3", "--hidden", "32", "--device", "cpu",
             "--batch-size", "64", "--precision", "fp32", "--val-split", "0", "--epochs", "2", "--checkpoint-every",
             "8", "--log-every", "1", "-q")
TOTAL_STEPS = 52


@pytest.fixture
def slow_nets(tmp_path, monkeypatch):
    """The module ``slow_nets`` (the network above), importable here and in the workers; its folder."""
    folder = tmp_path / "nets"
    folder.mkdir()
    (folder / "slow_nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))  # workers
    yield folder
    sys.modules.pop("slow_nets", None)


def _launch(command: list[str], marker: str) -> subprocess.Popen:
    env = _environment()
    env.update({PAUSE: "0.03", MARKER: marker})
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _workers(marker: str, **variables: str) -> list[int]:
    """The process ids whose environment holds the test's ``marker`` and each of ``variables`` (RANK="1")."""
    wanted = {f"{MARKER}={marker}".encode(), *(f"{k}={v}".encode() for k, v in variables.items())}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environment = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:  # ended meanwhile, or not ours
            continue
        if wanted <= environment:
            found.append(int(entry.name))
    return found


def _steps_logged(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):  # a line being written
            pass
    return steps


def _kill_past_a_checkpoint(run: Path, process: subprocess.Popen, marker: str, **variables: str) -> tuple[int, int]:
    """SIGKILL the process of ``variables`` once a mid-epoch checkpoint is written and 2 more steps are logged;
    the checkpoint's step and the last step logged before the kill."""
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        checkpointed = checkpoint_step(run / CHECKPOINT) if (run / CHECKPOINT).is_file() else 0
        logged = max(_steps_logged(run), default=0)
        if checkpointed and checkpointed % 26 and logged >= checkpointed + 2:
            (pid,) = _workers(marker, **variables)
            os.kill(pid, signal.SIGKILL)
            return checkpointed, logged
        time.sleep(0.01)
    process.kill()
    raise AssertionError(f"the run ended before it was killed:\n{process.communicate()[0][-3000:]}")


def _records(run: Path) -> list[dict]:
    """The metric records, less the speed (which a restart changes)."""
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(restarted: Path, whole: Path) -> None:
    a, b = weights(restarted), weights(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert _records(restarted) == _records(whole)


def test_torchrun_restarts_a_killed_worker_and_the_run_ends_as_an_unbroken_one(tmp_path, slow_nets):
    run, marker = tmp_path / "run", str(tmp_path)
    launch = ["--nproc_per_node", "2", "--max-restarts", "1", "--monitor-interval", "0.1",
              "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    torchrun = _launch([sys.executable, "-m", "torch.distributed.run", *launch, "-m", "aevb.cli", "train", *ARGUMENTS,
                        "--out", str(run), "--resume", "auto"], marker)
    checkpointed, killed_at = _kill_past_a_checkpoint(run, torchrun, marker, RANK="1",
                                                      TORCHELASTIC_RESTART_COUNT="0")
    output = torchrun.communicate(timeout=300)[0]
    assert torchrun.returncode == 0, output[-3000:]
    resumed = re.search(rf"note: --resume auto: continuing {re.escape(str(run))} from its checkpoint at step (\d+) "
                        rf"of {TOTAL_STEPS}", output)
    assert resumed, output[-3000:]
    assert checkpointed <= int(resumed[1]) < TOTAL_STEPS and killed_at < TOTAL_STEPS  # later: a slow kill
    two_processes(*ARGUMENTS, "--out", str(tmp_path / "whole"))
    assert_same_run(run, tmp_path / "whole")


def test_the_same_command_run_again_continues_a_killed_run_and_then_has_nothing_left(tmp_path, slow_nets, capsys,
                                                                                     one_thread):
    # one torch thread here, as in the killed process (OMP_NUM_THREADS=1): a matrix product's sums are ordered by
    # the number of threads, and bit-for-bit equality asks for the same order
    run, marker = tmp_path / "run", str(tmp_path)
    command = [*ARGUMENTS, "--out", str(run), "--resume", "auto"]
    alone = _launch([sys.executable, "-m", "aevb.cli", "train", *command], marker)
    _kill_past_a_checkpoint(run, alone, marker)
    alone.communicate(timeout=60)
    assert alone.returncode == -signal.SIGKILL and not (run / "model").exists()
    assert aevb_cli("train", *command) == 0  # the lock of the killed process is no obstacle
    assert aevb_cli("train", *ARGUMENTS, "--out", str(tmp_path / "whole")) == 0
    assert_same_run(run, tmp_path / "whole")
    trained = (run / "model" / "weights.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert aevb_cli("train", *command) == 0
    assert f"note: --resume auto: {run} has trained all its 52 steps and is exported; nothing left to do" in \
        capsys.readouterr().err
    assert (run / "model" / "weights.safetensors").stat().st_mtime_ns == trained


QUICK = ("--data", "digits", "--latent-dim", "2", "--hidden", "16", "--device", "cpu", "--batch-size", "256",
         "--precision", "fp32", "--steps", "4", "-q")


def test_resume_auto_continues_only_the_command_that_started_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert aevb_cli("train", *QUICK, "--out", run, "--resume", "auto") == 0
    before = sorted(p.name for p in run.iterdir())
    capsys.readouterr()
    assert aevb_cli("train", *QUICK, "--lr", "0.01", "--out", run, "--resume", "auto") == 2
    error = capsys.readouterr().err
    assert f"{run} holds a run started with other options (--lr 0.003 → 0.01)" in error and error.count("\n") == 1
    assert sorted(p.name for p in run.iterdir()) == before
    # --steps may change: the same command asking for more trains further
    assert aevb_cli("train", *QUICK[:-2], "8", "-q", "--out", run, "--resume", "auto") == 0
    assert json.loads((run / "model" / "config.json").read_text())["step"] == 8


def test_resume_auto_needs_out_and_refuses_force(tmp_path, capsys):
    assert aevb_cli("train", *QUICK, "--resume", "auto") == 2
    assert "no --out was given; pass --out RUN" in capsys.readouterr().err
    assert aevb_cli("train", *QUICK, "--out", tmp_path / "run", "--resume", "auto", "--force") == 2
    assert "drop one of them" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resume_auto_starts_anew_where_the_run_stopped_before_its_first_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert aevb_cli("train", *QUICK, "--out", run) == 0
    whole = weights(run)
    (run / CHECKPOINT).unlink()  # a run killed before its first checkpoint has none (nor a model)
    assert aevb_cli("train", *QUICK, "--out", run, "--resume", "auto") == 2  # a model but no checkpoint: kept
    assert "holds a trained model but no checkpoint" in capsys.readouterr().err
    for path in sorted((run / "model").iterdir()):
        path.unlink()
    (run / "model").rmdir()
    assert aevb_cli("train", *QUICK, "--out", run, "--resume", "auto") == 0
    assert all(torch.equal(whole[k], v) for k, v in weights(run).items())
    assert [r["step"] for r in _records(run)] == [4]  # the new run's record alone: the stub's went with it
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    assert aevb_cli("train", *QUICK, "--out", tmp_path / "foreign", "--resume", "auto") == 2
    assert "holds files but no run of aevb's" in capsys.readouterr().err


def test_a_worker_that_stops_before_joining_ends_the_others_with_a_message_not_a_hang(tmp_path):
    """Node 2 refuses its options before it joins; node 1's worker, which hosts the rendezvous, says so after
    --join-timeout instead of waiting 10 minutes."""
    port, run = _free_port(), tmp_path / "run"
    launch = ("--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
              f"127.0.0.1:{port}", "--rdzv_id", "aevb-join")
    arguments = (*QUICK, "--join-timeout", "5", "--out", str(run))
    nodes = [_torchrun(*arguments, launch=launch)]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the first node hosts the rendezvous once it listens
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    nodes.append(_torchrun(*arguments, "--epochs", "0", launch=launch))
    try:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert all(node.returncode != 0 for node in nodes)
    assert "error: --epochs must be ≥ 1, got 0" in outputs[1], outputs[1][-2000:]
    assert re.search(r"error: worker \d of 2 could not join the others at .* within 5 s \(--join-timeout", outputs[0]), \
        outputs[0][-2000:]
    assert not run.exists()
