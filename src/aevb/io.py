"""Files written atomically: a crash mid-write never leaves a broken file.

Everything is written to a temporary file in the destination's folder and
moved into place with ``os.replace``, which is atomic on POSIX and Windows.
Weights go to safetensors and settings to JSON; nothing is ever pickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from aevb.errors import UserError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then move the result to ``path``.

    A path that cannot be written (read-only, a file where a folder should be,
    a full disk) is a :class:`~aevb.errors.UserError` naming ``path``, and
    leaves whatever was there before.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        # mkstemp makes 0600 (and safetensors writes a new file, 0600 too): the usual permissions, after writing
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise unwritable(path, exc) from None
        raise


def unwritable(path: str | os.PathLike, exc: OSError) -> UserError:
    """The error for a path that could not be written."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return UserError(f"cannot write {path} ({reason}); choose a writable location, or free space there")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
