"""What a run wrote: ``RUN/.aevb-run.jsonl``, the list that makes a folder recognisably an aevb run.

Every file written into a run folder by the process that owns it
(:mod:`aevb.run.owner`) is added to the list before it is written, so the
list names everything the run may have written and nothing else: a photo
or notes the user keeps in the folder are never on it.  ``--force``
replaces a folder only if it has the list, and moves away only the files
on it (:func:`set_aside`), into ``RUN/.aevb-previous``, until the new run
has its first checkpoint (:func:`discard_previous`); a new run that fails
before that puts them back (:func:`restore_previous`).

Nothing here follows a link: a file is moved or removed only where no
part of its path is a symbolic link (:func:`own_file`), so nothing outside
the folder is ever touched, whatever links the folder holds.  Each step
leaves the folder in a state the next owner can finish
(:func:`recover`), so a process killed midway loses neither run.
This module does not import torch.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from aevb.errors import UserError
from aevb.io import loads_json, replace_atomically, sync_folder

MANIFEST = ".aevb-run.jsonl"
PREVIOUS = ".aevb-previous"  # the run that --force replaces, kept until the new run's first checkpoint
SETTING_ASIDE = ".aevb-setting-aside"  # in PREVIOUS while its files are moved there: a folder of aevb's, not the user's
FORMAT = "aevb-run-files"
CHECKPOINT_FILE = "checkpoints/last.safetensors"  # the first one written ends the keeping of the previous run


@dataclass
class Manifest:
    """The files a run wrote, as paths relative to its folder (``images/samples.png``), in the order written.

    On disk, JSON lines: ``{"format": "aevb-run-files"}``, then one path a
    line.  A file is added by appending its line (flushed to the disk), so a
    run of ten thousand pictures pays for each once; a line a kill cut short
    is the last, and names a file that was never written.
    """

    folder: Path
    files: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST

    @classmethod
    def read(cls, folder: Path) -> Manifest | None:
        """The list of ``folder``, None where it has none; a UserError naming the file and the field if corrupt."""
        path = folder / MANIFEST
        if not os.path.lexists(path):
            return None
        if os.path.islink(path):
            raise _corrupt(path, "it is a link")
        try:
            text = path.read_bytes().decode("utf-8")
            lines = text.split("\n")
            header = loads_json(lines[0])
        except (OSError, ValueError) as e:
            raise _corrupt(path, f"unreadable: {e}") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise _corrupt(path, "its format is not " + repr(FORMAT))
        files = []
        for number, line in enumerate(lines[1:], start=2):
            if not line and number == len(lines):  # the newline that ends the last line
                continue
            try:
                name = loads_json(line)
            except ValueError:
                if number == len(lines):  # cut short by a kill while it was appended: never written
                    continue
                raise _corrupt(path, f"line {number} is no JSON") from None
            if not isinstance(name, str) or not _is_relative(name):
                raise _corrupt(path, f"line {number} is no path inside the run folder")
            files.append(name)
        return cls(folder, list(dict.fromkeys(files)))

    def add(self, relative: str) -> None:
        """Put ``relative`` on the list (appended, flushed to the disk) unless it is there; an OSError where it
        cannot be written."""
        if relative in self.files:
            return
        if not _ends_a_line(self.path):  # none yet, or a line a kill cut short at its end: written whole
            self.files.append(relative)
            self.save()
            return
        with open(self.path, "ab") as f:
            f.write(json.dumps(relative).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self.files.append(relative)

    def save(self) -> None:
        """Write the whole list, atomically; an OSError where it cannot be written."""
        text = "".join(json.dumps(line) + "\n" for line in [{"format": FORMAT}, *self.files])

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)

        replace_atomically(self.path, write)


def _ends_a_line(path: Path) -> bool:
    """Whether the file at ``path`` exists and ends with a newline."""
    try:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
    except OSError:  # missing, or empty
        return False


def _corrupt(path: Path, what: str) -> UserError:
    return UserError(f"{path} is corrupt ({what}); it lists the files aevb wrote in {path.parent}: restore it, or "
                     f"delete it and the run's files yourself (aevb then treats the folder as not a run of its own)")


def _is_relative(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts and "\\" not in name


def read_or_new(folder: Path) -> Manifest:
    manifest = Manifest.read(folder)
    return manifest if manifest is not None else Manifest(folder)


# ---------------------------------------------------------------------------
# paths without links


def own_file(folder: Path, relative: str) -> Path | None:
    """``folder/relative`` if it is a regular file reached without any symbolic link, else None.

    The one test before aevb moves or removes a file of a run: a link
    anywhere on the path (a folder replaced by a link to the user's
    pictures, a file replaced by a link) means the file is not the run's.
    """
    path = folder
    for part in PurePosixPath(relative).parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return None
        if stat.S_ISLNK(mode):
            return None
    return path if stat.S_ISREG(mode) else None


def real_folder(folder: Path, relative_folder: PurePosixPath) -> bool:
    """Whether ``folder/relative_folder`` is a folder reached without a symbolic link."""
    path = folder
    for part in relative_folder.parts:
        path = path / part
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return False
        except OSError:
            return False
    return True


def _remove_empty_folders(folder: Path, relative: str) -> None:
    """Remove the folders of ``relative`` (inside ``folder``, not ``folder`` itself) that are now empty."""
    parent = PurePosixPath(relative).parent
    while parent.parts:
        if not real_folder(folder, parent):
            return
        try:
            (folder / parent).rmdir()
        except OSError:  # not empty: the user's files, or the run's others
            return
        parent = parent.parent


def files_under(folder: Path) -> list[str]:
    """The regular files under ``folder`` (relative, posix), reached without following links."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in files:
            path = Path(root) / name
            if stat.S_ISREG(os.lstat(path).st_mode):
                found.append(path.relative_to(folder).as_posix())
    return sorted(found)


def _make_real_folders(folder: Path, relative_folder: PurePosixPath) -> bool:
    """Make ``folder/relative_folder`` one level at a time; False where a level is a link or no folder."""
    path = folder
    for part in relative_folder.parts:
        path = path / part
        try:
            path.mkdir()
        except FileExistsError:
            pass
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
    return True


def _move(source_folder: Path, relative: str, target_folder: Path) -> bool:
    """Move a run's file between the folder and its PREVIOUS, keeping its relative path; never over a file, never
    along a link."""
    source = own_file(source_folder, relative)
    target = target_folder / relative
    if source is None or os.path.lexists(target):
        return False
    if not _make_real_folders(target_folder, PurePosixPath(relative).parent):
        return False
    os.replace(source, target)
    return True


# ---------------------------------------------------------------------------
# --force: the previous run kept aside until the new one has its first checkpoint


def set_aside(folder: Path) -> Manifest:
    """Move the files the folder's list names into ``folder/.aevb-previous`` (with the list); a new, empty list.

    Files not on the list (the user's) stay where they are; a listed file
    reached through a link is no longer the run's and stays too.
    """
    manifest = Manifest.read(folder)
    if manifest is None:
        raise UserError(f"{folder} is not a run folder aevb wrote (it has no {MANIFEST}); --force replaces only those")
    previous = folder / PREVIOUS
    if os.path.lexists(previous):  # not aevb's (recover() has settled any of its own)
        raise UserError(f"{previous} is in the way: aevb keeps the run that --force replaces there until the new one "
                        f"has a checkpoint; move it elsewhere, then run this again")
    previous.mkdir()
    (previous / SETTING_ASIDE).touch()  # so that a kill from here on is recognised, and undone, by recover()
    for relative in manifest.files:
        if _move(folder, relative, previous):
            _remove_empty_folders(folder, relative)
    os.replace(manifest.path, previous / MANIFEST)  # from here on the folder holds a run that began
    os.unlink(previous / SETTING_ASIDE)
    sync_folder(folder)
    fresh = Manifest(folder)
    fresh.save()
    return fresh


def discard_previous(folder: Path) -> None:
    """Delete the run that :func:`set_aside` kept: only the files it moved there, then their folders."""
    previous = folder / PREVIOUS
    if not real_folder(folder, PurePosixPath(PREVIOUS)):
        return
    for relative in files_under(previous):
        if relative != MANIFEST:
            os.unlink(previous / relative)
            _remove_empty_folders(previous, relative)
    # the list last: a kill before this leaves a PREVIOUS that recover() discards again
    if own_file(previous, MANIFEST) is not None:
        os.unlink(previous / MANIFEST)
    _remove_tree_if_empty(previous)
    sync_folder(folder)


def restore_previous(folder: Path, new: Manifest | None) -> None:
    """Undo :func:`set_aside`: remove the files the new run wrote (``new``'s list), put the previous run's back."""
    previous = folder / PREVIOUS
    if not real_folder(folder, PurePosixPath(PREVIOUS)):
        return
    if new is not None:
        for relative in new.files:
            path = own_file(folder, relative)
            if path is not None:
                os.unlink(path)
                _remove_empty_folders(folder, relative)
        # nothing in the folder is the new run's any more: a kill from here on cannot remove a restored file
        new.files = []
        new.save()
    for relative in files_under(previous):
        if relative != MANIFEST:
            _move(previous, relative, folder)
    if own_file(previous, MANIFEST) is not None:
        os.replace(previous / MANIFEST, folder / MANIFEST)
    _remove_tree_if_empty(previous)
    sync_folder(folder)


def _remove_tree_if_empty(folder: Path) -> None:
    """Remove ``folder`` and its subfolders where they hold nothing (bottom up, links not followed)."""
    for root, dirs, files in os.walk(folder, topdown=False, followlinks=False):
        try:
            os.rmdir(root)
        except OSError:
            pass


def recover(folder: Path) -> str | None:
    """Finish what a killed ``--force`` left: the new run's first checkpoint decides which run stays.

    Returns what was done (for a note), or None where nothing was left.
    """
    previous = folder / PREVIOUS
    if not real_folder(folder, PurePosixPath(PREVIOUS)):
        return None
    if own_file(previous, MANIFEST) is None and own_file(previous, SETTING_ASIDE) is None:
        return None  # a folder of the user's that happens to have the name: not aevb's to touch
    if own_file(previous, MANIFEST) is None:  # killed while setting aside: the previous run is the folder's
        for relative in files_under(previous):
            if relative != SETTING_ASIDE:
                _move(previous, relative, folder)
        os.unlink(previous / SETTING_ASIDE)  # the last: a kill before it is finished by the next owner
        _remove_tree_if_empty(previous)
        return f"put back the files of the run in {folder} that an interrupted --force was setting aside"
    if own_file(folder, CHECKPOINT_FILE) is not None:
        discard_previous(folder)
        return f"removed the earlier run of {folder} that --force replaced (the new run has its first checkpoint)"
    restore_previous(folder, Manifest.read(folder))
    return (f"restored the earlier run of {folder}: the run that --force started there stopped before its "
            f"first checkpoint")
