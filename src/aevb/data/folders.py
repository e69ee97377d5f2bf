"""Image folders: every image under a folder, decoded, turned upright, resized and cropped to S x S.

:func:`load_folder` reads a folder (recursively; two or more subfolders are
the classes) into a :class:`~aevb.data.sources.SourceData` of images
``[N, C, S, S]``.  Large folders are decoded on a few threads (Pillow
releases the GIL); 16-bit and float greyscale images become 8-bit.  A folder
streamed for being too large for memory as float32 is decoded once into a
cache file of its 8-bit pixels (``CACHE_DIR/folders``,
:func:`_decoded_folder`), which later runs memory-map without decoding.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

from aevb.data import sources
from aevb.data.files import is_data_file, read_npy
from aevb.data.sources import SourceData
from aevb.data.streaming import StreamedImages, pixels_to_float, should_stream
from aevb.errors import UserError
from aevb.io import atomic_write, write_json


def load_folder(root: Path, image_size: int, stream: str = "auto") -> SourceData:
    """Every readable image under root, sorted by path, as [N, C, S, S] in [0, 1] with S = image_size.

    Images are turned upright as their EXIF orientation says (as every viewer
    shows them), converted to RGB (to greyscale if all are greyscale), resized so
    the short side is S, and centre-cropped to S x S.  Unreadable files are
    named in a warning and skipped.  With two or more subfolders holding
    images, the top-level subfolder is the class (like torchvision's
    ImageFolder), and the split shuffles first.  In memory, the images are decoded and converted to float32.
    Streamed (``stream``: yes, or auto for a folder too large for memory as
    float32), they are decoded once into a cache file of 8-bit pixels
    (:func:`_decoded_folder`) that later runs memory-map without decoding.
    """
    Image.init()
    extensions = {e.lower() for e in Image.registered_extensions()}
    files = sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in extensions and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )  # fmt: skip
    bad: list[Path] = []
    modes: dict[Path, str] = {}
    for p in files:  # headers only: the common mode must be known before decoding
        try:
            with Image.open(p) as im:
                modes[p] = im.mode
        except Exception:
            bad.append(p)
    mode = "L" if modes and all(m in GREY_MODES for m in modes.values()) else "RGB"
    readable = list(modes)
    shape = (image_size, image_size) if mode == "L" else (image_size, image_size, 3)  # of one image, uint8

    streamed = should_stream(stream, len(readable) * math.prod(shape))
    if streamed:
        stacked, kept, failed = _decoded_folder(root, readable, mode, image_size, shape)
    else:
        pixels: list[np.ndarray] = []  # each [S, S] or [S, S, 3] uint8
        kept, failed = [], []
        for p, decoded in zip(readable, _decode_all(readable, mode, image_size, f"decoding {root.name or root}")):
            if decoded is None:
                failed.append(p)
            else:
                pixels.append(decoded)
                kept.append(p)
        stacked = np.stack(pixels) if pixels else None  # [N, S, S] or [N, S, S, 3] uint8
    bad += failed
    if bad:
        names = ", ".join(str(p.relative_to(root)) for p in sorted(bad)[:20])
        more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
        warnings.warn(f"skipped {len(bad)} unreadable image file(s) in {root}: {names}{more}", stacklevel=3)
    if not kept:
        data_files = sorted(p.name for p in root.iterdir() if p.is_file() and is_data_file(p))
        hint = (f"; it holds data files ({', '.join(data_files[:3])}{', …' if len(data_files) > 3 else ''}): pass one "
                f"with --data FILE (and its labels with --labels FILE)") if data_files else ""
        raise UserError(f"no readable images in folder {root}; pass a folder of image files (PNG, JPEG, …){hint}")

    folders = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in kept]
    classes = sorted({f for f in folders if f is not None})
    y, rows = None, None
    if len(classes) >= 2:
        loose = [p.name for p, f in zip(kept, folders) if f is None]
        if loose:
            names = ", ".join(loose[:20]) + (f" and {len(loose) - 20} more" if len(loose) > 20 else "")
            warnings.warn(f"skipped {len(loose)} image(s) outside the class subfolders of {root}: {names}", stacklevel=3)
            rows = np.array([i for i, f in enumerate(folders) if f is not None])
        y = torch.tensor([classes.index(f) for f in folders if f is not None], dtype=torch.int64)  # [N]
    else:
        classes = None

    view = stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)  # [N, C, S, S]
    if streamed:
        x = StreamedImages(view, 255.0, rows=rows)
    else:
        x = pixels_to_float(view if rows is None else view[rows], 255.0)
    return SourceData(x, y, "image", levels=256, classes=classes, grouped_by_class=y is not None)


def _decode_all(files: list[Path], mode: str, image_size: int, description: str) -> Iterator[np.ndarray | None]:
    """Each file's pixels (:func:`_decode`) in order, None for a file that cannot be decoded.

    Large folders are decoded on a few threads: Pillow releases the GIL while
    it decodes and resizes, so two cores decode a folder of JPEGs about 1.7×
    as fast as one.  At most 16 images a thread are in flight, so a folder of
    any size streams through in constant memory.  A progress bar shows on a
    terminal from 2,000 images.
    """
    def decode(path: Path) -> np.ndarray | None:
        try:
            return _decode(path, mode, image_size)
        except Exception:
            return None

    results: Iterable[np.ndarray | None]
    workers = min(8, _usable_cores())
    if workers == 1 or len(files) < 256:
        results = map(decode, files)
    else:
        results = _ordered_map(decode, files, workers, in_flight=16 * workers)
    if len(files) < 2000:
        yield from results
        return
    from tqdm.auto import tqdm  # deferred: tqdm.auto probes for Jupyter, and only large folders show a bar

    yield from tqdm(results, total=len(files), desc=description, unit="image", leave=False, disable=None)


def _usable_cores() -> int:
    """Cores this process may run on (a container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _ordered_map(fn, items: list, workers: int, in_flight: int) -> Iterator:
    """fn(item) for each item, in order, computed on ``workers`` threads with at most ``in_flight`` pending."""
    with ThreadPoolExecutor(workers, thread_name_prefix="aevb-decode") as pool:
        pending: deque = deque()
        remaining = iter(items)
        for item in itertools.islice(remaining, in_flight):
            pending.append(pool.submit(fn, item))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(remaining, 1):
                pending.append(pool.submit(fn, item))
            yield result


# Pillow modes of one-channel images: bilevel, 8-bit (with alpha), 16- and 32-bit integer, float
GREY_MODES = ("1", "L", "LA", "I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _decode(path: Path, mode: str, image_size: int) -> np.ndarray:
    """One image file as uint8 pixels [S, S] (mode L) or [S, S, 3] (RGB)."""
    with Image.open(path) as im:
        upright = ImageOps.exif_transpose(im)  # a camera's portrait JPEG is stored sideways
        return np.asarray(_resize_crop(_eight_bit(upright).convert(mode), image_size))


def _eight_bit(im):
    """A 16-bit, 32-bit or float grey image as 8-bit grey (Pillow's convert would clip it at 255, all white).

    16-bit (I;16*, or I holding values above 255): value / 257; float (F):
    [0, 1] if it stays there, else clipped to [0, 255].  Other modes as they are.
    """
    if not (im.mode.startswith("I") or im.mode == "F"):
        return im
    values = np.asarray(im).astype(np.float64)
    if im.mode.startswith("I;16") or (im.mode == "I" and values.max(initial=0) > 255):
        values = values / 257
    elif im.mode == "F" and values.max(initial=0) <= 1 and values.min(initial=0) >= 0:
        values = values * 255
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


DECODER = 2


def _decoded_folder(root: Path, files: list[Path], mode: str, image_size: int,
                    shape: tuple[int, ...]) -> tuple[np.ndarray, list[Path], list[Path]]:
    """(pixels [N, *shape] uint8 memory-mapped, files decoded, files that failed) of an image folder.

    Decoded one image at a time into ``CACHE_DIR/folders/NAME-SIZEpx-KEY.npy``,
    never all in memory, and written atomically; KEY hashes the folder's path,
    the mode, the size and every file's name, size and modification time, so a
    changed folder is decoded again and an unchanged one is not.  A sidecar
    ``.json`` lists which files the rows are.
    """
    stats = [p.stat() for p in files]  # one stat call a file: a folder can hold 200k of them
    listing = [(str(p.relative_to(root)), st.st_size, st.st_mtime_ns) for p, st in zip(files, stats)]
    # DECODER: how files become pixels (2: EXIF orientation applied); a change decodes cached folders again
    key = hashlib.sha256(json.dumps([str(root.resolve()), mode, image_size, DECODER, listing]).encode()).hexdigest()[:20]
    cache = sources.CACHE_DIR.expanduser() / "folders" / f"{root.resolve().name or 'root'}-{image_size}px-{key}.npy"
    index = cache.with_suffix(".json")
    if cache.is_file() and index.is_file():
        try:
            kept = json.loads(index.read_text())["kept"]
            pixels = read_npy(cache, mmap=True)
            if pixels.shape == (len(kept), *shape) and pixels.dtype == np.uint8:
                return pixels, *_kept_and_failed(files, kept)
        except (UserError, ValueError, KeyError, IndexError, TypeError):
            pass  # a damaged cache: decode again
    kept: list[int] = []

    def write(tmp: str) -> None:
        pixels = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), *shape))
        for i, decoded in enumerate(_decode_all(files, mode, image_size,
                                                f"decoding {root.name or root} into {cache.parent}")):
            if decoded is not None:
                pixels[len(kept)] = decoded
                kept.append(i)
        pixels.flush()
        if len(kept) < len(files):  # drop the unused rows at the end, a block at a time: constant memory
            trimmed = f"{tmp}.rows"
            try:
                rows = np.lib.format.open_memmap(trimmed, mode="w+", dtype=np.uint8, shape=(len(kept), *shape))
                for start in range(0, len(kept), 4096):
                    stop = min(start + 4096, len(kept))
                    rows[start:stop] = pixels[start:stop]
                rows.flush()
                del rows, pixels
                os.replace(trimmed, tmp)
            finally:
                if os.path.exists(trimmed):
                    os.unlink(trimmed)
        else:
            del pixels

    try:
        atomic_write(cache, write)
        write_json(index, {"folder": str(root.resolve()), "image_size": image_size, "mode": mode, "kept": kept})
    except UserError as exc:  # atomic_write's, for an unwritable cache
        raise UserError(f"{exc}: the decoded images of {root} go there; or load the folder into memory "
                        f"with --stream no") from None
    return read_npy(cache, mmap=True), *_kept_and_failed(files, kept)


def _kept_and_failed(files: list[Path], kept: list[int]) -> tuple[list[Path], list[Path]]:
    decoded = set(kept)
    return [files[i] for i in kept], [p for i, p in enumerate(files) if i not in decoded]


def _resize_crop(im, size: int):
    """PIL image resized (bicubic) so its short side is `size`, then centre-cropped to size x size."""
    w, h = im.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return im.crop((left, top, left + size, top + size))

