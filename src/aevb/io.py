"""Files written atomically and durably: a crash or a power cut mid-write leaves the old file or the new one.

Everything is written to a temporary file in the destination's folder,
flushed to the disk, moved into place with ``os.replace`` (atomic on POSIX
and Windows), and the folder is flushed too, so that the move itself
survives a power cut.  The temporary file's name is short whatever the
destination's (:data:`TEMP_PREFIX`, the process id, a random part), so a
valid file name never fails as too long, and a killed process's leftovers
are recognisable (:func:`is_temporary`) for the next run to remove.
Weights go to safetensors and settings to JSON; nothing is ever pickled.

A process that owns a run folder checks every write into it
(:func:`checked_writes`; :mod:`aevb.run.owner` installs the check): so no
writer, wherever it lives, writes through a link out of the folder or
writes a file the run folder's list of its own files does not name.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from aevb.errors import UserError

TEMP_PREFIX = ".aevb-tmp-"
TEMP_SUFFIX = ".tmp"
# what this version names its temporary files, what earlier versions did (".NAME.XXXXXXXX.tmp", mkstemp's), and
# what safetensors names its own while it writes (".tmpXXXXXX", the tempfile crate's)
_TEMPORARY = re.compile(rf"^{re.escape(TEMP_PREFIX)}(?P<pid>\d+)-[0-9a-f]+{re.escape(TEMP_SUFFIX)}$")
_EARLIER_TEMPORARY = re.compile(r"^\.(?P<name>.+\.(png|json|jsonl|safetensors|html))\.[a-z0-9_]{8}\.tmp$")
_SAFETENSORS_TEMPORARY = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")

# the checks of the run folders this thread's process owns: each gets every path before it is written
_write_checks: contextvars.ContextVar[tuple[Callable[[Path], None], ...]] = contextvars.ContextVar(
    "aevb_write_checks", default=())


@contextmanager
def checked_writes(check: Callable[[Path], None]) -> Iterator[None]:
    """While inside, every path written through this module goes to ``check(path)`` first (which may raise)."""
    token = _write_checks.set((*_write_checks.get(), check))
    try:
        yield
    finally:
        _write_checks.reset(token)


def check_write(path: str | os.PathLike) -> None:
    """Call the write checks on ``path``: for writers that open a file themselves (an appended log)."""
    for check in _write_checks.get():
        check(Path(path))


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then move the result to ``path``, durably.

    A path that cannot be written (read-only, a file where a folder should be,
    a full disk) is a :class:`~aevb.errors.UserError` naming ``path``, and
    leaves whatever was there before.  The new file gets the permissions of
    any new file (0666 less the umask), which is never changed: that is
    process-wide, and another thread may be creating files.
    """
    path = Path(path)
    try:
        check_write(path)
        replace_atomically(path, write)
    except OSError as exc:
        raise unwritable(path, exc) from None


def replace_atomically(path: Path, write: Callable[[str], None]) -> None:
    """:func:`atomic_write` without the checks and with the OSError as it is (for the run folder's own list)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}"
        # created by us with the usual mode (the umask applied by the system): a writer that replaces the
        # file (safetensors writes its own temporary file, 0600) gets that mode back
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        mode = os.stat(tmp).st_mode & 0o777
        write(str(tmp))
        if os.stat(tmp).st_mode & 0o777 != mode:
            os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        sync_folder(path.parent)
    finally:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)


def sync_folder(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a file moved or removed in it) to the disk; a no-op where folders cannot be opened
    (Windows, whose os.replace is durable by itself)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot flush a folder: what they have is all there is
        pass
    finally:
        os.close(fd)


def is_temporary(name: str, pid_alive: Callable[[int], bool]) -> bool:
    """Whether ``name`` is a temporary file a writer left behind: one of aevb's of a process that is no longer
    alive (``pid_alive``), or one of earlier versions' or of safetensors'."""
    match = _TEMPORARY.match(name)
    if match is not None:
        return not pid_alive(int(match["pid"]))
    return bool(_EARLIER_TEMPORARY.match(name) or _SAFETENSORS_TEMPORARY.match(name))


def unwritable(path: str | os.PathLike, exc: OSError) -> UserError:
    """The error for a path that could not be written."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return UserError(f"cannot write {path} ({reason}); choose a writable location, or free space there")


# deeper than any file aevb writes or reads (config files, model configs, checkpoint metadata nest a few levels):
# deeper input is refused as it is read, before code that walks it recursively meets it
MAX_NESTING = 32


def loads_json(text: str | bytes) -> Any:
    """``json.loads``; input nested more than :data:`MAX_NESTING` levels is a ``json.JSONDecodeError`` like any
    other bad JSON."""
    try:
        value = json.loads(text)
    except RecursionError:
        value = None
        depth = None
    else:
        depth = nesting(value)
    if depth is None or depth > MAX_NESTING:
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        raise json.JSONDecodeError(f"nested more than {MAX_NESTING} levels deep", text, 0) from None
    return value


def nesting(value: Any) -> int:
    """How many lists and tables ``value`` nests (0 for a number or a string), counted without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth + 1)
            if deepest > MAX_NESTING:
                return deepest
            stack.extend((child, depth + 1) for child in children)
    return deepest


def write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    # safetensors.torch imports torch: the text and JSON writers above serve callers that have not
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:  # its I/O errors (a full disk) are no OSError: made one, for atomic_write
            raise OSError(str(e).removeprefix("Error while serializing: ")) from None

    atomic_write(path, write)
