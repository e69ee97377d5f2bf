"""Owning a run folder: one writer at a time, and every write inside it checked and listed.

    with own_run("runs/mnist", "aevb eval") as run:   # RunInUseError while another process owns it
        write_json("runs/mnist/eval.json", metrics)     # checked (no link out of the folder) and listed

Every command that writes into a run folder owns it while it writes:
``aevb train`` (new or resumed) for its whole life, ``explore`` and
``report`` too, ``eval`` while it writes ``eval.json``, ``sample``,
``reconstruct`` and ``interpolate`` while they write a picture into it.
Owning is an exclusive lock on ``RUN/.aevb-lock`` (``flock`` on POSIX,
``msvcrt.locking`` on Windows), which the system releases when the process
ends however it ends, so a killed owner leaves no stale lock; the file
names the holder's process id for the message another writer gets.
Commands that only read (an ``eval`` computing, ``sample -o`` elsewhere) take
no lock and run side by side with anything.

While a process owns a run folder, every path written through
:mod:`aevb.io` inside it is checked (never through a link that leads out
of the folder) and put on the run's list of its files
(:mod:`aevb.run.manifest`) before it is written; taking ownership first
finishes what a killed owner left (an interrupted ``--force``, temporary
files).  A process owns a folder once however many of its functions ask
(``report`` evaluates and explores), from the thread that took it.
This module does not import torch.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

from aevb.errors import UserError
from aevb.io import checked_writes, is_temporary, loads_json, unwritable
from aevb.run import manifest as files
from aevb.run.manifest import MANIFEST, PREVIOUS, Manifest

LOCK_FILE = ".aevb-lock"
BRIEF_WAIT = 30.0  # seconds another writer waits for an owner that writes a file or two (two evals ending together)
# seconds another writer waits for a holder with no record: one that has just locked and not yet written it,
# or one that has just emptied it and not yet unlocked; either way it says who it is, or goes, within a moment
UNNAMED_WAIT = 2.0
OWN_FILES = (MANIFEST, LOCK_FILE)  # aevb's bookkeeping: never on the list

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

_WINDOWS_LOCK_OFFSET = 1 << 20  # the byte msvcrt locks: past the holder's record, which others read


class RunInUseError(UserError):
    """Another process (or another thread of this one) owns the run folder."""


class RecoveredRunWarning(UserWarning):
    """Taking a run folder finished what a killed ``--force`` had left halfway."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on POSIX; elsewhere assumed alive, so nothing of it is removed)."""
    if sys.platform == "win32" or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@dataclass
class OwnedRun:
    """A run folder this process owns: its path, its list of files, and the check of every write into it."""

    path: Path
    manifest: Manifest
    absolute: Path = field(init=False)
    real: Path = field(init=False)

    def __post_init__(self) -> None:
        self.absolute = Path(os.path.abspath(self.path))
        self.real = Path(os.path.realpath(self.path))

    def relative(self, path: Path) -> PurePosixPath | None:
        """``path`` relative to the run folder, where it is in it (as written, or once links are resolved); else None."""
        absolute = Path(os.path.abspath(path))
        try:
            return PurePosixPath(absolute.relative_to(self.absolute).as_posix())
        except ValueError:
            pass
        try:
            return PurePosixPath((Path(os.path.realpath(absolute.parent)) / absolute.name).relative_to(self.real).as_posix())
        except ValueError:
            return None

    def check_write(self, path: Path) -> None:
        """Refuse a write through a link that leads out of the folder; list a file of the run before it is written."""
        relative = self.relative(path)
        if relative is None or not relative.parts:
            return
        self._refuse_links_out(relative)
        if relative.as_posix() not in OWN_FILES:
            self.manifest.add(relative.as_posix())

    def check_paths(self, relatives: tuple[str, ...]) -> None:
        """Refuse, before anything is written, a folder whose paths a run writes (``images/x.png``) lead out of it."""
        for relative in relatives:
            self._refuse_links_out(PurePosixPath(relative))

    def check_folder(self, folder: Path) -> None:
        """Refuse a folder of the run that another library is to write into where it is a link out of the folder."""
        relative = self.relative(folder)
        if relative is not None:
            self._refuse_links_out(relative)

    def _refuse_links_out(self, relative: PurePosixPath) -> None:
        """A UserError where the folder ``relative`` goes into, or the path itself, is a link leading out of the run."""
        path = self.real / relative
        if self._inside(path.parent) and (not os.path.islink(path) or self._inside(path)):
            return
        # the first part of the path that leads out: the link to name (a link within the folder may come before it)
        link = next(step for step in (self.real.joinpath(*relative.parts[:n]) for n in range(1, len(relative.parts) + 1))
                    if not self._inside(step))
        raise UserError(f"{self.path / link.relative_to(self.real)} is a link to {os.path.realpath(link)}, out of the "
                        f"run folder; aevb writes nothing through it: replace the link by a folder or file of the "
                        f"run's own, or use another run folder")

    def _inside(self, path: Path) -> bool:
        real = Path(os.path.realpath(path))
        return real == self.real or self.real in real.parents

    def files_in(self, folder: Path) -> set[str]:
        """The regular files under ``folder`` now (paths relative to it): what :meth:`record_new_files` compares with."""
        return set(files.files_under(folder)) if folder.is_dir() and not folder.is_symlink() else set()

    def record_new_files(self, folder: Path, before: set[str]) -> None:
        """List the files that appeared under ``folder`` since :meth:`files_in` gave ``before``: those a library wrote
        itself (TensorBoard's event files, Weights & Biases' folder)."""
        for name in sorted(self.files_in(folder) - before):
            relative = self.relative(folder / name)
            if relative is not None and files.own_file(self.real, relative.as_posix()) is not None:
                self.manifest.add(relative.as_posix())

    def begin_new_run(self) -> None:
        """Make way for a new run (``--force``): the previous run's files go aside until :meth:`checkpointed`."""
        self.manifest = files.set_aside(self.path)

    def checkpointed(self) -> None:
        """The run has a checkpoint: the run it replaced, kept aside until now, goes."""
        files.discard_previous(self.path)

    def restore_previous(self) -> None:
        """The new run stopped before its first checkpoint: remove what it wrote and put the previous run back."""
        if os.path.isdir(self.path / PREVIOUS):
            files.restore_previous(self.path, self.manifest)
            self.manifest = files.read_or_new(self.path)

    def recover(self) -> None:
        """Finish what a killed owner left: an interrupted ``--force`` (with a note), its temporary files."""
        done = files.recover(self.path)
        if done is not None:
            self.manifest = files.read_or_new(self.path)
            warnings.warn(done, RecoveredRunWarning, stacklevel=4)
        # temporary files lie beside the files they were to become: in the folders of the listed files
        for folder in {PurePosixPath(name).parent for name in self.manifest.files} | {PurePosixPath()}:
            if not files.real_folder(self.path, folder):
                continue
            for name in os.listdir(self.path / folder):
                relative = (folder / name).as_posix()
                if is_temporary(name, pid_alive) and files.own_file(self.path, relative) is not None:
                    os.unlink(self.path / relative)


@dataclass
class _Ownership:
    run: OwnedRun
    fd: int
    thread: int
    pid: int
    depth: int = 1


_owned: dict[str, _Ownership] = {}  # real path of the folder → this process's ownership of it
_owned_guard = threading.Lock()


@contextmanager
def own_run(path: str | os.PathLike, command: str, *, brief: bool = False) -> Iterator[OwnedRun]:
    """Own the run folder ``path`` (which must exist) while inside; ``command`` names the owner to others.

    ``brief``: owned only to write a file or two (eval.json, a picture), so
    that another writer waits for it rather than being refused.  Another
    process gets a :class:`RunInUseError` naming the owner's process id (at
    once, or after waiting for a brief owner); the same thread of this
    process owns it again.
    """
    path = Path(path)
    key = os.path.realpath(path)
    with _owned_guard:
        held = _owned.get(key)
        if held is not None and held.pid == os.getpid():
            if held.thread != threading.get_ident():
                raise RunInUseError(f"run folder {path} is in use by another thread of this process "
                                    f"({os.getpid()}); one writer at a time")
            held.depth += 1
        else:
            held = None
    if held is not None:
        try:
            yield held.run
        finally:
            held.depth -= 1
        return
    fd = _lock(path, command, brief)
    try:
        run = OwnedRun(path, files.read_or_new(path))
        ownership = _Ownership(run, fd, threading.get_ident(), os.getpid())
        with _owned_guard:
            _owned[key] = ownership
        try:
            run.recover()
            with checked_writes(run.check_write):
                yield run
        finally:
            with _owned_guard:
                _owned.pop(key, None)
    finally:
        _unlock(fd)


def owner_of(path: str | os.PathLike) -> Path | None:
    """The run folder that ``path`` (a file about to be written) is in, where it is in one: a folder with a list of
    its files, a lock file, or a checkpoint (a run of an earlier aevb)."""
    written = Path(os.path.abspath(Path(path).parent))
    real = Path(os.path.realpath(written))
    for candidate in (written, *written.parents, real, *real.parents):  # as named first, for the messages
        if any(os.path.isfile(candidate / name) for name in (MANIFEST, LOCK_FILE, files.CHECKPOINT_FILE)):
            relative = os.path.relpath(candidate)
            return Path(relative) if not relative.startswith("..") else candidate
    return None


@contextmanager
def owning_if_in_run(path: str | os.PathLike, command: str) -> Iterator[None]:
    """Own the run folder that ``path`` is in while inside, briefly (a picture written into a run); nothing
    otherwise."""
    run_dir = owner_of(path)
    if run_dir is None:
        yield
        return
    with own_run(run_dir, command, brief=True):
        yield


def _lock(folder: Path, command: str, brief: bool) -> int:
    """Open and lock ``folder/.aevb-lock``, record the holder in it; its descriptor.

    A holder that owns the folder only for a moment (``brief``: a file being
    written) is waited for, up to :data:`BRIEF_WAIT` seconds; any other is
    named at once.  A holder whose record is empty is between locking and
    writing it, or between emptying it and unlocking: it is given
    :data:`UNNAMED_WAIT` seconds to say which.
    """
    lock_path = folder / LOCK_FILE
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(lock_path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{lock_path} is a link; aevb locks only a file of the run folder's own: delete the "
                            f"link") from None
        if e.errno == errno.ENOENT:
            raise UserError(f"run folder not found: {folder}") from None
        raise unwritable(lock_path, e) from None
    started, unnamed_since = time.monotonic(), None
    while True:
        try:
            _try_lock(fd)
            break
        except OSError:
            holder, now = _holder(fd), time.monotonic()
            unnamed_since = None if holder else (unnamed_since or now)  # since when its record has been empty
            if ((holder.get("brief") is True and now - started < BRIEF_WAIT)
                    or (not holder and now - unnamed_since < UNNAMED_WAIT)):
                time.sleep(0.05)
                continue
            os.close(fd)
            raise RunInUseError(f"run folder {folder} is in use by {_describe(holder)}; one writer at a time: wait "
                                f"for it to finish (or stop it), then run this again") from None
    record = json.dumps({"pid": os.getpid(), "command": command, "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                         "brief": brief})
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, record.encode() + b"\n")
    return fd


def _unlock(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)  # the holder's record goes with the lock
    except OSError:
        pass
    if fcntl is None:
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    os.close(fd)  # (flock's lock goes with the descriptor)


def _try_lock(fd: int) -> None:
    """Lock at once or raise an OSError (BlockingIOError where another holds it)."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)


def _holder(fd: int) -> dict:
    """The holder's record in the lock file; empty where it has written none yet (or it is not aevb's)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        record = loads_json(os.read(fd, 4096) or b"{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(holder: dict) -> str:
    """``process 1234 (aevb train, since …)``, from the holder's record."""
    pid, command, since = holder.get("pid"), holder.get("command"), holder.get("since")
    if not isinstance(pid, int) or not isinstance(command, str) or not isinstance(since, str):
        return "another process (it has not said which yet)"
    return f"process {pid} ({command[:80]}, since {since[:40]})"
