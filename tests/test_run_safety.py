"""A run folder nobody can lose (issue 29): links, --force, one writer at a time, which step, files on disk, resume.

Each class of the issue is a rule tested where it must hold everywhere:

1. aevb never deletes or writes through a link that leads out of a run folder, and never deletes a file it did
   not write;
2. ``--force`` replaces only a run folder aevb wrote (its list of files), keeps the earlier run until the new one
   has a checkpoint, and puts it back when the new one stops (or is killed) before;
3. one writer a run folder (train, resume, eval's write, explore, report, a picture into it), a second told the
   first's process id, a killed writer's lock no obstacle; readers run beside anything;
4. every command that reads a run says which training step its numbers are of, and warns when the checkpoint is
   newer than the export;
9. writes are durable, their temporary names short, the umask untouched, a killed writer's temporary files
   removed by the next owner;
10. a resume says when its new length changes the β of trained steps, and keeps the precision the run resolved.

The links, locks, kills and faults are made here; a second process, where one is needed, is a child Python
with one thread.  Values read back from files (5–8) are in test_read_back.py.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import aevb
from aevb.errors import UserError
from aevb.io import atomic_write, write_json, write_text
from aevb.run.checkpoints import read_meta
from aevb.run.folder import CHECKPOINT
from aevb.run.manifest import MANIFEST, PREVIOUS, Manifest, set_aside
from aevb.run.owner import LOCK_FILE, RunInUseError, own_run
from conftest import aevb_cli

# --val-split 0: the step counts below are of the whole training part, as before validation became the default
SMALL = ("--latent-dim", "4", "--hidden", "32", "--device", "cpu", "-q", "--val-split", "0")
STEPS_PER_EPOCH = 13  # ceil(1617 / 128) digits


# ---------------------------------------------------------------------------
# helpers


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links not followed) and its bytes; a link as where it points."""
    found = {}
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in [*files, *[d for d in dirs if os.path.islink(Path(root) / d)]]:
            path = Path(root) / name
            key = path.relative_to(folder).as_posix()
            found[key] = f"-> {os.readlink(path)}".encode() if path.is_symlink() else path.read_bytes()
    return found


def without_lock(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k != LOCK_FILE}


def one_error_line(capsys, *names: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    # (eval's progress bar shares stderr, ended by a carriage return)
    lines = [line.strip() for line in err.replace("\r", "\n").splitlines()]
    lines = [line for line in lines if line and not line.startswith(("note:", "evaluating", "warning:"))]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for name in names:
        assert name in lines[0], f"{name!r} not in {lines[0]!r}"
    return lines[0]


CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(aevb.__file__).parents[1])}

HOLD = """
import sys, time
from pathlib import Path
from aevb.run.owner import own_run
with own_run(sys.argv[1], "a test's writer"):
    Path(sys.argv[2]).touch()
    time.sleep(300)
"""

# aevb train in a child that stops (sleeps, to be killed) after its second step or after its first checkpoint
PAUSED_TRAIN = """
import sys, time
from pathlib import Path
from aevb.training import loop
from aevb.cli import main
ready, when = Path(sys.argv[1]), sys.argv[2]
if when == "step":
    real_step = loop.Trainer.step
    def step(self, *batch):
        real_step(self, *batch)
        if self.position.step == 2:
            ready.touch()
            time.sleep(300)
    loop.Trainer.step = step
else:
    real_save = loop.Trainer.save_checkpoint
    def save_checkpoint(self):
        real_save(self)
        ready.touch()
        time.sleep(300)
    loop.Trainer.save_checkpoint = save_checkpoint
main(sys.argv[3:])
"""


def start_child(code: str, *args, ready: Path, timeout: float = 120) -> subprocess.Popen:
    """A child Python running ``code`` with ``args``; returns once it has made the file ``ready``."""
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=CHILD_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the child did not get ready: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A VAE trained for two epochs on digits, with eval.json (copy it before changing it)."""
    out = tmp_path_factory.mktemp("safety") / "vae"
    assert aevb_cli("train", "--out", out, *SMALL, "--epochs", 2) == 0
    assert aevb_cli("eval", out, "-k", 2) == 0
    return out


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run", symlinks=True))


@pytest.fixture
def pictures(tmp_path) -> Path:
    """The user's folder of pictures, with a subfolder, outside any run."""
    folder = tmp_path / "holiday"
    (folder / "beach").mkdir(parents=True)
    (folder / "samples.png").write_bytes(b"my picture named like a run's")
    (folder / "beach" / "sea.png").write_bytes(b"sea")
    (folder / "checkpoint.safetensors").write_bytes(b"not aevb's")
    return folder


# ---------------------------------------------------------------------------
# 1. never through a link out of the run folder, never a file aevb did not write


@pytest.mark.parametrize("linked", ["images", "model", "checkpoints", "config.json", "images/samples.png"])
def test_force_never_deletes_or_writes_through_a_link_out_of_the_run(run_copy, pictures, capsys, linked):
    target = pictures / "samples.png" if "." in linked else pictures
    path = run_copy / linked
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.symlink_to(target)
    before, theirs = snapshot(run_copy), snapshot(pictures)
    assert aevb_cli("train", "--out", run_copy, *SMALL, "--steps", 1, "--force") == 2
    one_error_line(capsys, linked.split("/")[0], "is a link", "out of the run folder")
    assert snapshot(pictures) == theirs  # the user's pictures, subfolder included
    assert without_lock(snapshot(run_copy)) == without_lock(before)  # and the run: nothing was begun


@pytest.mark.parametrize("command", [("eval", "-k", 2), ("sample",), ("reconstruct",), ("interpolate",),
                                     ("explore",), ("report", "-k", 2), ("train", "--resume", "{run}", "--epochs", 3)])
def test_no_command_writes_through_a_link_out_of_the_run(run_copy, pictures, capsys, command):
    for name in ("images", "eval.json", "report.html"):
        path = run_copy / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    (run_copy / "images").symlink_to(pictures)
    (run_copy / "eval.json").symlink_to(pictures / "samples.png")
    (run_copy / "report.html").symlink_to(pictures / "samples.png")
    theirs = snapshot(pictures)
    args = [a.format(run=run_copy) if isinstance(a, str) else a for a in command]
    status = aevb_cli(*args) if args[0] == "train" else aevb_cli(args[0], run_copy, *args[1:])
    assert status == 2
    one_error_line(capsys, "is a link", "out of the run folder")
    assert snapshot(pictures) == theirs


def test_a_link_within_the_run_folder_is_written_through(run_copy, capsys):
    shutil.move(run_copy / "images", run_copy / "pictures")
    (run_copy / "images").symlink_to("pictures")  # relative: into the run's own folder
    assert aevb_cli("sample", run_copy, "-n", 4) == 0
    assert (run_copy / "pictures" / "samples-T1.png").is_file()
    assert "images/samples-T1.png" in Manifest.read(run_copy).files


def test_setting_aside_and_putting_back_never_follow_a_link(tmp_path, pictures):
    """The list's moves and removals, whatever its entries and the folder's links say."""
    folder = tmp_path / "run"
    (folder / "images").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "images" / "a.png").write_bytes(b"run's")
    (folder / "elsewhere").symlink_to(pictures)
    (folder / "linked.png").symlink_to(pictures / "samples.png")
    Manifest(folder, ["config.json", "images/a.png", "elsewhere/samples.png", "elsewhere/beach/sea.png",
                      "linked.png", "missing.png"]).save()
    theirs = snapshot(pictures)
    set_aside(folder)
    assert sorted(p.relative_to(folder / PREVIOUS).as_posix() for p in (folder / PREVIOUS).rglob("*")
                  if p.is_file()) == [MANIFEST, "config.json", "images/a.png"]
    assert snapshot(pictures) == theirs and (folder / "linked.png").is_symlink()
    from aevb.run.manifest import discard_previous

    discard_previous(folder)
    assert not (folder / PREVIOUS).exists() and snapshot(pictures) == theirs


# ---------------------------------------------------------------------------
# 2. --force replaces only a run of aevb's, and keeps it until the new run has a checkpoint


def test_force_refuses_a_folder_that_is_no_run_of_aevb(tmp_path, capsys):
    folder = tmp_path / "mine"
    (folder / "images").mkdir(parents=True)
    (folder / "model").mkdir()
    (folder / "config.json").write_text('{"my": "settings"}')
    (folder / "images" / "holiday.png").write_bytes(b"holiday")
    (folder / "model" / "notes.json").write_text('{"notes": 1}')
    before = snapshot(folder)
    assert aevb_cli("train", "--out", folder, *SMALL, "--steps", 1, "--force") == 2
    one_error_line(capsys, "--force replaces only a run folder that aevb wrote", str(folder), MANIFEST)
    assert snapshot(folder) == before  # not even a lock file


def test_force_removes_only_the_files_the_run_wrote(run_copy):
    mine = {"notes.txt": b"mine", "images/photo.jpg": b"photo", "checkpoints/best.safetensors": b"kept by hand",
            "model/README": b"about", "eval-old.json": b"{}", "images/reconstructions-999.png": b"mine too"}
    for name, data in mine.items():
        (run_copy / name).write_bytes(data)
    old = set(Manifest.read(run_copy).files)
    assert aevb_cli("train", "--out", run_copy, *SMALL, "--epochs", 1, "--seed", 5, "--force") == 0
    assert all((run_copy / name).read_bytes() == data for name, data in mine.items())
    new = set(Manifest.read(run_copy).files)
    gone = old - new  # the earlier run's files the new one did not write again
    assert gone and not any((run_copy / name).exists() for name in gone)
    assert not (run_copy / PREVIOUS).exists()
    assert read_meta(run_copy / CHECKPOINT)["config"]["seed"] == 5


def _failing_step(monkeypatch, error):
    from aevb.training import loop

    real = loop.Trainer.step

    def step(self, *batch):
        real(self, *batch)
        if self.position.step == 2:
            raise error

    monkeypatch.setattr(loop.Trainer, "step", step)


@pytest.mark.parametrize("error", [aevb.errors.NonFiniteLossError("non-finite loss at step 2"), KeyboardInterrupt()],
                         ids=["nan-loss", "second-ctrl-c"])
def test_a_force_run_that_stops_before_its_first_checkpoint_keeps_the_earlier_run(run_copy, monkeypatch, capsys,
                                                                                  error):
    (run_copy / "notes.txt").write_text("mine")
    before = snapshot(run_copy)
    _failing_step(monkeypatch, error)
    assert aevb_cli("train", "--out", run_copy, *SMALL, "--epochs", 1, "--seed", 5, "--force") in (2, 130)
    assert "the earlier run in" in capsys.readouterr().err
    assert without_lock(snapshot(run_copy)) == without_lock(before)  # the earlier run, byte for byte


def test_a_force_run_killed_before_its_first_checkpoint_is_undone_by_the_next_command(run_copy, tmp_path, capsys):
    before = snapshot(run_copy)
    ready = tmp_path / "ready"
    proc = start_child(PAUSED_TRAIN, ready, "step", "train", "--out", run_copy, *SMALL, "--seed", 5, "--force",
                       ready=ready)
    assert (run_copy / PREVIOUS).is_dir()  # the earlier run aside, the new one begun
    assert aevb_cli("eval", run_copy, "-k", 2) == 2  # a reader meanwhile is told why there is no model
    one_error_line(capsys, "is being replaced by a run started with --force")
    kill(proc)
    assert aevb_cli("eval", run_copy, "-k", 2) == 0  # the next command that opens it puts the earlier run back
    assert "restored the earlier run" in capsys.readouterr().err
    after = snapshot(run_copy)
    assert {k: v for k, v in after.items() if k not in (LOCK_FILE, "eval.json")} == \
           {k: v for k, v in before.items() if k not in (LOCK_FILE, "eval.json")}
    assert json.loads(after["eval.json"])["step"] == 2 * STEPS_PER_EPOCH  # of the earlier run's model


def test_a_force_run_killed_after_its_first_checkpoint_is_the_run(run_copy, tmp_path, capsys):
    ready = tmp_path / "ready"
    proc = start_child(PAUSED_TRAIN, ready, "checkpoint", "train", "--out", run_copy, *SMALL, "--seed", 5,
                       "--epochs", 3, "--force", ready=ready)
    kill(proc)
    assert aevb_cli("train", "--resume", run_copy, "-q") == 0
    assert not (run_copy / PREVIOUS).exists()
    meta = read_meta(run_copy / CHECKPOINT)
    assert meta["config"]["seed"] == 5 and meta["step"] == 3 * STEPS_PER_EPOCH


# ---------------------------------------------------------------------------
# 3. one writer at a time


@pytest.mark.parametrize("command", [
    ("train", "--out", "{run}", "--epochs", 1, "--force"),
    ("train", "--resume", "{run}", "--epochs", 3),
    ("eval", "{run}", "-k", 2),
    ("explore", "{run}"),
    ("report", "{run}", "-k", 2),
    ("sample", "{run}"),
    ("reconstruct", "{run}"),
    ("interpolate", "{run}"),
    ("sample", "{run}", "-o", "{run}/images/mine.png"),
], ids=lambda c: " ".join(map(str, c))[:40])
def test_a_second_writer_is_told_the_first_ones_process_id(run_copy, tmp_path, capsys, command):
    ready = tmp_path / "ready"
    holder = start_child(HOLD, run_copy, ready, ready=ready)
    try:
        before = without_lock(snapshot(run_copy))
        args = [a.format(run=run_copy) if isinstance(a, str) else a for a in command]
        if args[0] == "train" and "--out" in args:
            args[1:1] = SMALL
        assert aevb_cli(*args) == 2
        one_error_line(capsys, f"run folder {run_copy} is in use by process {holder.pid}", "a test's writer")
        assert without_lock(snapshot(run_copy)) == before
    finally:
        kill(holder)


def test_readers_run_beside_a_writer(run_copy, tmp_path, capsys):
    ready = tmp_path / "ready"
    holder = start_child(HOLD, run_copy, ready, ready=ready)
    try:
        assert aevb_cli("sample", run_copy, "-o", tmp_path / "s.png") == 0  # a picture elsewhere
        assert aevb_cli("eval", run_copy, "-k", 2) == 2  # computes and shows its numbers; eval.json waits
        captured = capsys.readouterr()
        assert "negative ELBO" in captured.out and f"in use by process {holder.pid}" in captured.err
        assert aevb.load(run_copy / "model").latent_dim == 4
    finally:
        kill(holder)


def test_a_killed_writer_leaves_no_lock(run_copy, tmp_path):
    ready = tmp_path / "ready"
    kill(start_child(HOLD, run_copy, ready, ready=ready))
    assert '"pid"' in (run_copy / LOCK_FILE).read_text()  # its record stays, the lock went with the process
    assert aevb_cli("eval", run_copy, "-k", 2) == 0
    assert (run_copy / LOCK_FILE).read_text() == ""  # released, and said so


def test_two_trainings_into_one_folder_leave_one_runs_files(tmp_path):
    """Started together: one trains, the other is refused (in use, or the folder is no longer empty)."""
    out = tmp_path / "both"
    procs = [subprocess.Popen([sys.executable, "-m", "aevb.cli", "train", "--out", str(out), *SMALL, "--epochs", "1",
                               "--seed", str(seed)], env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for seed in (1, 2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    assert sorted(status for status, _ in results) == [0, 2], results
    refused = next(err for status, err in results if status == 2)
    assert "in use by process" in refused or "already exists" in refused
    seed = json.loads((out / "config.json").read_text())["seed"]
    assert read_meta(out / CHECKPOINT)["config"]["seed"] == seed
    checkpoint, exported = load_file(out / CHECKPOINT), load_file(out / "model" / "weights.safetensors")
    assert all((checkpoint[f"model.{k}"] == v).all() for k, v in exported.items())  # one run's weights


def test_another_thread_of_the_process_is_a_second_writer(run_copy):
    errors = []
    with own_run(run_copy, "this thread"):
        with own_run(run_copy, "this thread again"):  # the same thread owns it once
            pass
        thread = threading.Thread(target=lambda: errors.append(_try_own(run_copy)))
        thread.start()
        thread.join()
    assert isinstance(errors[0], RunInUseError) and "another thread" in str(errors[0])


def _try_own(path):
    try:
        with own_run(path, "another thread"):
            return None
    except RunInUseError as e:
        return e


# ---------------------------------------------------------------------------
# 4. which training step the numbers are of


def test_every_command_on_a_run_says_which_step_its_numbers_are_of(run_copy, capsys):
    step = 2 * STEPS_PER_EPOCH
    said = f"{run_copy / 'model'}, exported at step {step}"
    for command in (("sample",), ("reconstruct",), ("interpolate",), ("explore",), ("report", "-k", 2)):
        capsys.readouterr()
        assert aevb_cli(command[0], run_copy, *command[1:]) == 0
        assert f"model: {said}" in capsys.readouterr().out, command
    assert aevb_cli("eval", run_copy, "-k", 2) == 0
    assert re.search(rf"training step of the weights +{step} exported model", capsys.readouterr().out)
    assert {k: json.loads((run_copy / "eval.json").read_text())[k] for k in ("weights", "step")} == \
           {"weights": "model", "step": step}
    assert f"Model: {said}." in (run_copy / "report.html").read_text()
    assert json.loads((run_copy / "model" / "config.json").read_text())["step"] == step


def _resumed_then_killed_before_its_export(run_copy, monkeypatch):
    from aevb.training import loop

    def killed(self):
        raise KeyboardInterrupt  # after the last checkpoint, before the export

    monkeypatch.setattr(loop.Trainer, "export", killed)
    assert aevb_cli("train", "--resume", run_copy, "--epochs", 3) == 130
    monkeypatch.undo()


def test_a_checkpoint_newer_than_the_export_is_said(run_copy, monkeypatch, capsys):
    _resumed_then_killed_before_its_export(run_copy, monkeypatch)
    capsys.readouterr()
    assert aevb_cli("eval", run_copy, "-k", 2) == 0
    captured = capsys.readouterr()
    assert f"last checkpoint (step {3 * STEPS_PER_EPOCH}) is newer than its exported model (step " \
           f"{2 * STEPS_PER_EPOCH})" in captured.err and "aevb train --resume" in captured.err
    assert json.loads((run_copy / "eval.json").read_text())["step"] == 2 * STEPS_PER_EPOCH
    # an export by an earlier aevb, without its step: the files' times tell
    config = json.loads((run_copy / "model" / "config.json").read_text())
    del config["step"]
    (run_copy / "model" / "config.json").write_text(json.dumps(config))
    os.utime(run_copy / "model" / "weights.safetensors", (1, 1))
    assert aevb_cli("sample", run_copy) == 0
    captured = capsys.readouterr()
    assert "is newer than its exported model (step unknown)" in captured.err
    assert "exported by an earlier aevb, which did not record its step" in captured.out


def test_an_unfinished_run_says_its_checkpoint_step(run_copy, capsys):
    shutil.rmtree(run_copy / "model")
    assert aevb_cli("reconstruct", run_copy) == 0
    assert f"checkpoints/last.safetensors, step {2 * STEPS_PER_EPOCH} (the run has not finished training)" in \
           capsys.readouterr().out


# ---------------------------------------------------------------------------
# 9. files on disk


def test_a_long_valid_name_is_written(tmp_path):
    name = "r" * (os.pathconf(tmp_path, "PC_NAME_MAX") - len(".json")) + ".json"
    write_json(tmp_path / name, {"ok": True})
    assert json.loads((tmp_path / name).read_text()) == {"ok": True}
    assert os.listdir(tmp_path) == [name]


def test_writes_leave_the_umask_alone_and_give_the_usual_permissions(tmp_path, monkeypatch):
    import torch

    from aevb.io import write_safetensors

    previous = os.umask(0o027)
    try:
        def no_umask(*args):
            raise AssertionError("the umask is process-wide: aevb must not change it")

        monkeypatch.setattr(os, "umask", no_umask)
        write_safetensors(tmp_path / "w.safetensors", {"a": torch.zeros(2)})  # safetensors writes 0600 itself
        write_text(tmp_path / "t.txt", "x")
        for name in ("w.safetensors", "t.txt"):
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~0o027
    finally:
        monkeypatch.undo()
        os.umask(previous)


def test_a_write_flushes_the_file_and_then_its_folder(tmp_path, monkeypatch):
    flushed = []
    real_fsync = os.fsync

    def fsync(fd):
        flushed.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append(len(flushed)), real_replace(a, b)))
    write_text(tmp_path / "a.txt", "durable")
    assert flushed == ["file", "folder"] and replaced == [1]  # the file before the move, the folder after


def test_a_killed_writers_temporary_files_are_removed_by_the_next_owner(run_copy):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    left = [f".aevb-tmp-{dead}-0a1b2c3d.tmp", "checkpoints/.aevb-tmp-{dead}-99.tmp".format(dead=dead),
            "checkpoints/.tmpAbC123", ".config.json.k2j4h5g6.tmp", "images/.samples.png.abcdefgh.tmp"]
    kept = ["notes.tmp", f".aevb-tmp-{os.getpid()}-0badcafe.tmp", "mine/.tmpAbC123"]  # the user's; a live writer's
    (run_copy / "mine").mkdir()
    for name in left + kept:
        (run_copy / name).write_bytes(b"half a file")
    assert aevb_cli("train", "--resume", run_copy, "--epochs", 3, "-q") == 0
    assert [name for name in left if (run_copy / name).exists()] == []
    assert all((run_copy / name).exists() for name in kept)


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    write_json(path, {"kept": True})

    def disk_full(tmp):
        Path(tmp).write_text('{"kept": fa')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="cannot write .*config.json .*No space left"):
        atomic_write(path, disk_full)
    assert json.loads(path.read_text()) == {"kept": True} and os.listdir(tmp_path) == ["config.json"]


# ---------------------------------------------------------------------------
# 10. resuming


def test_resuming_a_cyclical_schedule_to_another_length_says_so(tmp_path, capsys):
    run = tmp_path / "cyclical"
    assert aevb_cli("train", "--out", run, *SMALL, "--epochs", 2, "--beta-schedule", "cyclical") == 0
    shutil.rmtree(run / "model")  # as if stopped after its last checkpoint
    capsys.readouterr()
    assert aevb_cli("train", "--resume", run, "--epochs", 2) == 0  # the same length: the same schedule
    assert "spreads over the whole run" not in capsys.readouterr().err
    assert aevb_cli("train", "--resume", run, "--epochs", 4) == 0
    err = capsys.readouterr().err
    assert "--beta-schedule cyclical spreads over the whole run: with 52 steps instead of 26" in err
    linear = tmp_path / "linear"
    assert aevb_cli("train", "--out", linear, *SMALL, "--epochs", 1, "--beta-warmup", 5) == 0
    capsys.readouterr()
    assert aevb_cli("train", "--resume", linear, "--epochs", 2) == 0  # a warm-up does not depend on the length
    assert "spreads over the whole run" not in capsys.readouterr().err


def test_a_resumed_run_keeps_the_precision_it_resolved(tmp_path, monkeypatch, capsys):
    from aevb.acceleration import bf16

    run = tmp_path / "run"
    assert aevb_cli("train", "--out", run, *SMALL, "--steps", 3) == 0
    recorded = read_meta(run / CHECKPOINT)["precision"]
    assert recorded["device"] == "cpu" and recorded["multiplies"] in ("fp32", "bf16")
    shutil.rmtree(run / "model")

    def measured(device):
        raise AssertionError("--precision auto measured again on resume")

    monkeypatch.setattr(bf16, "bf16_is_faster", measured)
    assert aevb_cli("train", "--resume", run, "--steps", 6) == 0
    assert read_meta(run / CHECKPOINT)["precision"] == recorded
    # a run that trained with bf16 on a device that now lacks it goes on in fp32, and says so
    from aevb.run.checkpoints import read_checkpoint
    from aevb.io import write_safetensors

    state, meta = read_checkpoint(run / CHECKPOINT)
    meta["precision"] = {"device": "cpu", "multiplies": "bf16"}
    write_safetensors(run / CHECKPOINT, state, {"format": "aevb-checkpoint", "meta": json.dumps(meta)})
    shutil.rmtree(run / "model")
    monkeypatch.setattr(bf16, "bf16_is_native", lambda device: False)
    capsys.readouterr()
    assert aevb_cli("train", "--resume", run, "--steps", 8) == 0
    assert "trained with bf16 multiplies" in capsys.readouterr().err
    assert read_meta(run / CHECKPOINT)["precision"] == {"device": "cpu", "multiplies": "fp32"}


def test_a_writer_that_owns_the_folder_for_a_moment_is_waited_for(run_copy, tmp_path, capsys):
    """Two evals ending together: the second waits for the first's eval.json instead of failing."""
    hold_briefly = HOLD.replace('"a test\'s writer"', '"aevb eval", brief=True').replace("time.sleep(300)",
                                                                                        "time.sleep(4)")
    ready = tmp_path / "ready"
    holder = start_child(hold_briefly, run_copy, ready, ready=ready)
    started = time.monotonic()
    assert aevb_cli("eval", run_copy, "-k", 2) == 0  # its numbers take about a second; then it waited
    assert 3 < time.monotonic() - started < 30 and holder.wait(timeout=60) == 0


# the lock held by hand, to widen the moments in which its record is empty: argv 3 "brief" writes a brief
# holder's record ("none": none, as between locking and writing it); argv 4 seconds later the record is emptied
# (as _unlock does first), and argv 5 seconds after that the lock goes
HOLD_BY_HAND = """
import fcntl, json, os, sys, time
from pathlib import Path
fd = os.open(os.path.join(sys.argv[1], ".aevb-lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
if sys.argv[3] == "brief":
    os.write(fd, json.dumps({"pid": os.getpid(), "command": "aevb eval", "since": "now", "brief": True}).encode())
Path(sys.argv[2]).touch()
time.sleep(float(sys.argv[4]))
os.ftruncate(fd, 0)
time.sleep(float(sys.argv[5]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="the child locks with fcntl")
def test_a_brief_holder_emptying_its_record_is_still_waited_for(run_copy, tmp_path):
    """A writer that has waited longer than UNNAMED_WAIT for a brief holder still gives it a moment to go once its
    record is empty: the race that failed CI once, when an eval waiting for another read the record between the
    holder's emptying it and unlocking."""
    ready = tmp_path / "ready"
    holder = start_child(HOLD_BY_HAND, run_copy, ready, "brief", 3, 0.5, ready=ready)
    started = time.monotonic()
    assert aevb_cli("train", "--resume", run_copy, "--epochs", 3) == 0
    assert time.monotonic() - started > 3 and holder.wait(timeout=60) == 0


@pytest.mark.skipif(sys.platform == "win32", reason="the child locks with fcntl")
def test_a_holder_that_has_not_written_its_record_is_given_a_moment(run_copy, tmp_path, capsys):
    """The window in which a holder's record is empty is not taken for a holder that will not say who it is."""
    ready = tmp_path / "ready"
    holder = start_child(HOLD_BY_HAND, run_copy, ready, "none", 0.5, 0, ready=ready)
    assert aevb_cli("train", "--resume", run_copy, "--epochs", 3) == 0  # the lock went within the moment
    assert holder.wait(timeout=60) == 0
    ready.unlink()
    capsys.readouterr()
    holder = start_child(HOLD_BY_HAND, run_copy, ready, "none", 300, 0, ready=ready)
    try:
        started = time.monotonic()
        assert aevb_cli("train", "--resume", run_copy, "--epochs", 4) == 2
        assert time.monotonic() - started >= 2.0
        one_error_line(capsys, f"run folder {run_copy} is in use by another process (it has not said which yet)")
    finally:
        kill(holder)


def test_a_force_killed_while_setting_the_earlier_run_aside_is_undone(run_copy, monkeypatch, capsys):
    from aevb.run import manifest

    before = snapshot(run_copy)
    real_move, moved = manifest._move, []

    def killed_midway(source, relative, target):
        if len(moved) == 3:
            raise KeyboardInterrupt  # as a kill: nothing after this runs
        moved.append(relative)
        return real_move(source, relative, target)

    monkeypatch.setattr(manifest, "_move", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        set_aside(run_copy)
    monkeypatch.undo()
    assert (run_copy / PREVIOUS / ".aevb-setting-aside").is_file()
    assert aevb_cli("sample", run_copy, "-o", run_copy.parent / "s.png") == 0  # the next command settles it
    assert "put back the files" in capsys.readouterr().err
    assert without_lock(snapshot(run_copy)) == without_lock(before)


def test_a_folder_of_the_users_named_like_the_kept_run_is_left_alone(run_copy, capsys):
    (run_copy / PREVIOUS).mkdir()
    (run_copy / PREVIOUS / "mine.txt").write_text("mine")
    assert aevb_cli("eval", run_copy, "-k", 2) == 0
    assert (run_copy / PREVIOUS / "mine.txt").read_text() == "mine"
    assert aevb_cli("train", "--out", run_copy, *SMALL, "--steps", 1, "--force") == 2
    one_error_line(capsys, f"{run_copy / PREVIOUS} is in the way")
    assert (run_copy / PREVIOUS / "mine.txt").read_text() == "mine"


def test_the_list_of_a_runs_files_survives_a_line_cut_short(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    listed = Manifest(folder)
    listed.add("config.json")
    listed.add("images/a.png")
    with open(listed.path, "a") as f:
        f.write('"images/b')  # killed while appending: the file was never written
    assert Manifest.read(folder).files == ["config.json", "images/a.png"]
    again = Manifest.read(folder)
    again.add("images/c.png")
    assert Manifest.read(folder).files == ["config.json", "images/a.png", "images/c.png"]


KILLED_WRITING = """
import sys, time
from pathlib import Path
import safetensors.torch
from aevb.cli import main
ready = Path(sys.argv[1])
real = safetensors.torch.save_file
def save_file(tensors, filename, metadata=None):
    if metadata and metadata.get("format") == "aevb-checkpoint" and metadata["meta"].find('"step": 39') >= 0:
        with open(filename, "wb") as f:
            f.write(b"half a checkpoint")
        ready.touch()
        time.sleep(300)
    real(tensors, filename, metadata=metadata)
safetensors.torch.save_file = save_file
main(sys.argv[2:])
"""


def test_a_writer_killed_mid_checkpoint_leaves_the_last_one_and_its_litter_goes(run_copy, tmp_path):
    shutil.rmtree(run_copy / "model")
    before = (run_copy / CHECKPOINT).read_bytes()
    ready = tmp_path / "ready"
    kill(start_child(KILLED_WRITING, ready, "train", "--resume", run_copy, "--epochs", 3, "-q", ready=ready))
    assert (run_copy / CHECKPOINT).read_bytes() == before  # the last whole checkpoint (step 26)
    litter = [p.name for p in (run_copy / "checkpoints").iterdir() if p.name != "last.safetensors"]
    assert litter and all(name.startswith(".aevb-tmp-") for name in litter)
    assert aevb_cli("train", "--resume", run_copy, "--epochs", 3, "-q") == 0
    assert os.listdir(run_copy / "checkpoints") == ["last.safetensors"]
    assert read_meta(run_copy / CHECKPOINT)["step"] == 3 * STEPS_PER_EPOCH
