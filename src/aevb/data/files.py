"""Reading data files: IDX (as published for MNIST), .npy, .npz and .csv/.tsv/.txt, and labels files.

:func:`load_file` reads one file (gzipped or not) into a
:class:`~aevb.data.sources.SourceData`: arrays of 8-bit, boolean or [0, 1]
pixels in an image layout become images ``[N, C, H, W]`` (:func:`_image_view`
decides, from the dtype and shape alone), other arrays ``[N, D]`` a table.
A ``.npy`` file of images too large for memory as float32 is memory-mapped
and streamed (:mod:`aevb.data.streaming`).  :func:`read_idx` is the IDX
reader the tests and benchmarks use for the MNIST files.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from aevb.data.sources import SourceData
from aevb.data.streaming import StreamedImages, pixels_to_float, should_stream
from aevb.errors import UserError

SUPPORTED_FORMATS = (
    "IDX files as published for MNIST (gzipped or not), .npy, .npz, .csv, or a folder of images"
)

# IDX type codes (third byte of the magic number) → big-endian numpy dtype.
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_TEXT_SUFFIXES = (".csv", ".tsv", ".txt")


def load_file(path: Path, labels: str | None, stream: str = "auto", part: tuple[int, int] = (0, 1)) -> SourceData:
    """SourceData of a data file (IDX, .npy, .npz, .csv); ``labels``: the path of a labels file, if any.

    ``part`` (i, n): the values of a memory-mapped ``.npy`` file are checked (range, finite) in its i-th of n
    parts of rows only, the other parts by other processes (torchrun's workers: each reads its share once);
    other formats cannot be read by rows and are read and checked whole.
    """
    mappable = _format_suffix(path) == ".npy" and path.suffix.lower() != ".gz"
    if stream == "yes" and not mappable:
        raise UserError(f"--stream yes reads a .npy file or an image folder batch by batch, not {path}; "
                        f"save the images with numpy.save, or drop --stream")
    # a memory map reads nothing yet: whether to stream is decided from the shape
    x, y = (read_npy(path, mmap=True), None) if mappable and stream != "no" else _read_data_file(path)
    where = str(path)
    if labels is not None:
        y, where = _read_labels(Path(labels).expanduser()), str(labels)
    view, levels, scale = _image_view(x, str(path), part if isinstance(x, np.memmap) else (0, 1))
    if view is None:
        if stream == "yes":
            raise UserError(f"--stream yes is for images; {path} holds rows of a table [N, D]: drop --stream")
        # a copy: a table is small, and a read-only memory map would make torch warn of its writes
        xt, kind = torch.from_numpy(np.array(x, dtype=np.float32)), "tabular"  # [N, D]
    else:
        xt, kind = _images(view, scale, stream), "image"
    yt = None if y is None else labels_tensor(y, len(xt), where)
    columns = _header(path) if kind == "tabular" and _format_suffix(path) in _TEXT_SUFFIXES else None
    if columns is not None and len(columns) != xt.shape[1]:
        columns = None  # a header that does not name every column names none
    return SourceData(xt, yt, kind, levels, classes=_class_names(yt), columns=columns)


def _images(view: np.ndarray, scale: float | None, stream: str) -> torch.Tensor | StreamedImages:
    """Images from pixels viewed as [N, C, H, W]: streamed, or converted to float32 now."""
    if should_stream(stream, view.size):
        return StreamedImages(view, scale)
    return pixels_to_float(view, scale)


def _read_data_file(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(data [N, ...], labels [N] or None) from an IDX, .npy, .npz or .csv file."""
    suffix = _format_suffix(path)
    if suffix == ".npy":
        return read_npy(path), None
    if suffix == ".npz":
        return _read_npz(path)
    if suffix in _TEXT_SUFFIXES:
        return _read_text(path), None
    if _looks_like_idx(path):
        return read_idx(path), None
    raise UserError(f"unsupported data file {path}; supported: {SUPPORTED_FORMATS}")


def _read_labels(path: Path) -> np.ndarray:
    """Integer labels [N] from an IDX, .npy or .csv/.txt file (one integer per example)."""
    if not path.is_file():
        raise UserError(f"labels file not found: {path}; pass an existing IDX, .npy or .csv file")
    suffix = _format_suffix(path)
    if suffix == ".npy":
        y = read_npy(path)
    elif suffix in _TEXT_SUFFIXES:
        y = _read_text(path)
    elif _looks_like_idx(path):
        y = read_idx(path)
    else:
        raise UserError(f"unsupported labels file {path}; supported: IDX, .npy, .csv or .txt of integers")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise UserError(f"labels file {path} has shape {list(y.shape)}; expected one integer per example")
    return y


def labels_tensor(y: np.ndarray, n: int, where: str) -> torch.Tensor:
    """Validated int64 labels [N]."""
    y = np.asarray(y).reshape(-1)
    if len(y) != n:
        raise UserError(
            f"{where} has {len(y)} labels but the data have {n} examples; pass the labels that belong to the data"
        )
    if y.dtype.kind not in "iub" and not (y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all()):
        raise UserError(f"labels in {where} are not integers; pass class indices 0, 1, 2, …")
    return torch.from_numpy(y.astype(np.int64))


def _class_names(y: torch.Tensor | None) -> list[str] | None:
    """Names "0" … "K-1" when the labels are exactly 0..K-1, else None."""
    if y is None or len(y) == 0:
        return None
    values = torch.unique(y)
    if values[0] != 0 or values[-1] != len(values) - 1:
        return None
    return [str(v) for v in range(len(values))]


def is_data_file(path: Path) -> bool:
    """Whether a file is one :func:`load_file` reads, by its suffix or (IDX) its first bytes."""
    return _format_suffix(path) in (".npy", ".npz", *_TEXT_SUFFIXES) or _looks_like_idx(path)


def _format_suffix(path: Path) -> str:
    """Lower-case suffix naming the format, looking through a final .gz ("x.csv.gz" → ".csv")."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped if it is gzip-compressed (recognised by its magic bytes)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"file not found: {path}; pass an existing file") from None
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror}); check the path and its permissions") from None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise UserError(f"{path} is a corrupt or truncated gzip file ({exc}); fetch it again") from None
    return data


def _is_idx_header(head: bytes) -> bool:
    return len(head) >= 4 and head[0] == 0 and head[1] == 0 and head[2] in _IDX_DTYPES and head[3] >= 1


def _looks_like_idx(path: Path) -> bool:
    """Whether the file starts with an IDX magic number (after gunzipping)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                head = f.read(4)
    except (OSError, EOFError, zlib.error):
        return False
    return _is_idx_header(head)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, the format MNIST is published in, gzipped or not.

    Layout: a magic number (two zero bytes, a type code, the number of
    dimensions), each dimension as a big-endian uint32, then the values in C
    order.  0x00000803 is uint8 images [N, H, W]; 0x00000801 uint8 labels [N].
    Returns the array with native byte order, e.g. uint8 [10000, 28, 28] for
    ``t10k-images-idx3-ubyte.gz``.  A wrong magic number, or a byte count that
    does not match the header, raises UserError.
    """
    path = Path(path)
    data = _read_bytes(path)
    if not _is_idx_header(data[:4]):
        raise UserError(
            f"{path} is not an IDX file (magic number 0x{data[:4].hex()}); expected 0x00000803 "
            f"for images or 0x00000801 for labels, as published for MNIST"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(
            f"{path} is truncated: {len(data)} bytes cannot hold its {ndim}-dimensional header; fetch it again"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        raise UserError(
            f"{path} is truncated or corrupt: its header promises {'x'.join(map(str, dims))} values "
            f"({expected} bytes in all) but it holds {len(data)} bytes; fetch it again"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_npy(path: Path, mmap: bool = False) -> np.ndarray:
    """An array from a .npy file (gzipped or not; with mmap, a read-only memory map); no pickles."""
    try:
        source = io.BytesIO(_read_bytes(path)) if path.suffix.lower() == ".gz" else path
        array = np.load(source, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"cannot read {path} as a .npy array ({one_line(exc)}); save it with numpy.save") from None
    if not isinstance(array, np.ndarray):
        raise UserError(f"{path} is not a .npy array; save it with numpy.save")
    return array


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(data, labels) from a .npz: data under "x" or "images" (else the first array), labels under "y" or "labels"."""
    try:
        source = io.BytesIO(_read_bytes(path)) if path.suffix.lower() == ".gz" else path
        with np.load(source, allow_pickle=False) as npz:
            keys = list(npz.keys())
            if not keys:
                raise UserError(f"{path} holds no arrays; save the data with numpy.savez(path, x=data)")
            x_key = next((k for k in ("x", "images") if k in keys), keys[0])
            y_key = next((k for k in ("y", "labels") if k in keys), None)
            return npz[x_key], (None if y_key is None else npz[y_key])
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read {path} as a .npz archive ({one_line(exc)}); save it with numpy.savez") from None


def _first_line(path: Path) -> tuple[str, str | None, bool]:
    """(first line, its delimiter, whether it is a header) of a .csv/.tsv/.txt file: a non-numeric first row is one."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            first = f.readline()
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"cannot read {path} ({exc}); check the file") from None
    delimiter = "," if "," in first else ("\t" if "\t" in first else None)
    try:
        [float(v) for v in first.split(delimiter) if v.strip()]
        return first, delimiter, False
    except ValueError:
        return first, delimiter, True


def _header(path: Path) -> list[str] | None:
    """The column names of a text file's header row, or None where it has none."""
    first, delimiter, is_header = _first_line(path)
    if not is_header:
        return None
    names = first.split() if delimiter is None else next(csv.reader([first], delimiter=delimiter))  # "a, b" quoted
    return [name.strip() for name in names]


def _read_text(path: Path) -> np.ndarray:
    """Numeric rows [N, D] (float64) from a .csv/.tsv/.txt file; a non-numeric first row is a header."""
    _, delimiter, has_header = _first_line(path)
    header = int(has_header)
    try:
        array = np.loadtxt(path, delimiter=delimiter, skiprows=header, ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise UserError(
            f"cannot read {path} as numeric rows ({one_line(exc)}); every row needs the same number of numbers"
        ) from None
    if array.size == 0:
        raise UserError(f"{path} holds no numeric rows; pass a file with one example per row")
    return array


def _image_view(a: np.ndarray, where: str,
                part: tuple[int, int] = (0, 1)) -> tuple[np.ndarray | None, int | None, float | None]:
    """(pixels viewed as [N, C, H, W], levels, scale) of an array of examples; (None, None, None) for a table.

    uint8 (or integers 0..255 with ≥ 3 dims) are images / 255 (``scale``),
    256 levels; bool → images, 2 levels; floats with ≥ 3 dims must already lie
    in [0, 1].  Image layouts: [N, H, W] → [N, 1, H, W]; [N, H, W, C] with C in
    (1, 3, 4) → [N, C, H, W]; [N, C, H, W] kept.  2-D arrays [N, D] are
    tabular, except uint8 rows whose length is a square number (flattened
    images, e.g. 784 → [N, 1, 28, 28]).  Only views are taken, so a memory
    map is read (in chunks) just for the range checks, and only its rows of
    ``part`` (i, n): the i-th of n parts, which another process checks otherwise.
    """
    if a.dtype.kind not in "biuf":
        raise UserError(f"{where} holds {a.dtype} values; the data must be numbers")
    if a.ndim < 2 or a.ndim > 4 or len(a) == 0:
        raise UserError(
            f"{where} holds an array of shape {list(a.shape)}; expected examples along the first "
            f"axis: [N, D] rows, or images [N, H, W], [N, H, W, C] or [N, C, H, W] (labels go in --labels)"
        )
    lo, hi, finite = _range(a, part)
    if not finite:
        raise UserError(f"{where} contains NaN or infinite values; remove or fill them")
    if a.ndim == 2:
        # 8-bit rows of s² values are grey images; of 3·s² (s ≥ 4), colour ones in CIFAR-10's python
        # layout, each channel's plane after the other (3·s² is never a square, so the two cannot clash)
        side, colour_side = math.isqrt(a.shape[1]), math.isqrt(a.shape[1] // 3)
        if a.dtype == np.uint8 and side * side == a.shape[1]:
            a = a.reshape(len(a), side, side)
        elif a.dtype == np.uint8 and a.shape[1] % 3 == 0 and colour_side**2 * 3 == a.shape[1] and colour_side >= 4:
            a = a.reshape(len(a), 3, colour_side, colour_side)
        else:
            return None, None, None
    if a.ndim == 3:
        a = a[:, None]  # [N, 1, H, W]
    elif a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3, 4):
        a = a.transpose(0, 3, 1, 2)  # [N, H, W, C] → [N, C, H, W]
    elif a.shape[1] not in (1, 3, 4):
        raise UserError(
            f"{where} has shape {list(a.shape)}; 4-D images need 1, 3 or 4 channels, "
            f"first [N, C, H, W] or last [N, H, W, C]"
        )
    if a.dtype.kind == "b":
        return a, 2, None
    if a.dtype.kind in "iu":
        if lo is not None and (lo < 0 or hi > 255):
            raise UserError(
                f"{where}: integer pixel values must lie in 0..255, found {lo}..{hi}; rescale them to floats in [0, 1]"
            )
        return a, 256, 255.0
    if lo is not None and (lo < 0 or hi > 1):
        raise UserError(
            f"{where}: float pixel values must lie in [0, 1], found {lo:g}..{hi:g}; "
            f"rescale them (8-bit values: divide by 255)"
        )
    return a, None, None


def _range(a: np.ndarray, part: tuple[int, int] = (0, 1), rows: int = 4096) -> tuple:
    """(min, max, all finite) of an array's ``part`` (i, n: its i-th of n parts of rows; None, None, True where
    that holds none), a block of rows at a time (a memory map is never read whole)."""
    lo, hi = None, None
    first, last = part[0] * len(a) // part[1], (part[0] + 1) * len(a) // part[1]
    for start in range(first, last, rows):
        block = np.asarray(a[start:min(start + rows, last)])
        if block.dtype.kind == "f" and not np.isfinite(block).all():
            return None, None, False
        lo = block.min() if lo is None else min(lo, block.min())
        hi = block.max() if hi is None else max(hi, block.max())
    return lo, hi, True


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (for UserError messages)."""
    return " ".join(str(exc).split()) or type(exc).__name__
