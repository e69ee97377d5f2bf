"""``shapes``: binary 64x64 sprites with known factors of variation, drawn by aevb on demand.

The factors and their values are those of dSprites (Matthey et al. 2017),
the data set on which Locatello et al. (2019) compared disentanglement:

==========  ======  ===========================================
factor      values  meaning
==========  ======  ===========================================
shape       3       square, ellipse, heart
scale       6       0.5 … 1, evenly spaced
rotation    40      0 … 2π, evenly spaced (both ends, as dSprites)
x           32      0 … 1, evenly spaced, left to right
y           32      0 … 1, evenly spaced, top to bottom
==========  ======  ===========================================

The sprites are drawn here (a pixel is on when its centre lies inside the
rotated, scaled and moved shape), not read from dSprites' file, so nothing is
downloaded; the pictures resemble dSprites', not equal them, so figures from
dSprites are for orientation only.  ``render`` draws any factor values, so
the whole product of 737,280 combinations is available; the registered data
set is a seeded sample of ``SHAPES_EXAMPLES`` of them (all of dSprites would
be 12 GB as float32), with the factors as labels (``SourceData.factors``)
and the shape as the class.  Drawing them takes seconds, so they are kept,
as packed bits in safetensors (6 MB), in ``--data-dir`` (default
``~/.cache/aevb/shapes``) under a name that changes with anything that
changes the pictures.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from aevb.data.sources import SourceData
from aevb.io import write_safetensors
from aevb.registry import DATASETS

SIZE = 64  # pixels per side
FACTOR_NAMES = ("shape", "scale", "rotation", "x", "y")
FACTOR_SIZES = (3, 6, 40, 32, 32)
SHAPE_NAMES = ("square", "ellipse", "heart")
SHAPES_EXAMPLES = 100_000
SHAPES_SEED = 0  # the sample is one fixed set, the same on every machine
# A shape of scale 1 reaches HALF_EXTENT of the image's side from its centre along its axes; centres
# range over [MARGIN, 1 - MARGIN], so that a square at scale 1 turned by 45° stays inside.
HALF_EXTENT = 0.14
MARGIN = 0.22
DRAWING = 1  # how render draws: a change here or above draws the cached sets again


def factor_values(factors: torch.Tensor) -> dict[str, torch.Tensor]:
    """The value of each factor [N] (float64) from their indices factors [N, 5]."""
    f = factors.to(torch.float64)
    return {
        "shape": factors[:, 0],
        "scale": 0.5 + 0.5 * f[:, 1] / (FACTOR_SIZES[1] - 1),
        "rotation": 2 * math.pi * f[:, 2] / (FACTOR_SIZES[2] - 1),
        "x": f[:, 3] / (FACTOR_SIZES[3] - 1),
        "y": f[:, 4] / (FACTOR_SIZES[4] - 1),
    }


def _square(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u.abs() <= 1) & (v.abs() <= 1)


def _ellipse(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u.square() + (2 * v).square() <= 1  # half as high as wide


def _heart(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # the heart curve (x² + y² − 1)³ = x² y³ spans x ∈ ±1.14, y ∈ [−1, 1.25]: shrunk to about ±1, point up
    x, y = 1.15 * u, 0.125 - 1.15 * v
    return (x.square() + y.square() - 1) ** 3 <= x.square() * y**3


_INSIDE = (_square, _ellipse, _heart)  # by the shape factor's value: whether points (u, v) in the shape's frame are in it


def render(factors: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The sprites of the given factor indices [N, 5] as binary images [N, 1, 64, 64] float32."""
    centres = (torch.arange(SIZE, dtype=torch.float32) + 0.5) / SIZE  # pixel centres in (0, 1)
    py, px = torch.meshgrid(centres, centres, indexing="ij")
    px, py = px.reshape(1, -1), py.reshape(1, -1)  # [1, P]
    images = torch.empty(factors.shape[0], SIZE * SIZE, dtype=torch.float32)
    for start in range(0, factors.shape[0], chunk):
        value = {name: t.to(torch.float32) for name, t in factor_values(factors[start:start + chunk]).items()}
        cx = (MARGIN + (1 - 2 * MARGIN) * value["x"]).unsqueeze(1)  # [n, 1]
        cy = (MARGIN + (1 - 2 * MARGIN) * value["y"]).unsqueeze(1)
        extent = (HALF_EXTENT * value["scale"]).unsqueeze(1)
        cos, sin = value["rotation"].cos().unsqueeze(1), value["rotation"].sin().unsqueeze(1)
        dx, dy = px - cx, py - cy  # [n, P]
        # into the shape's frame: turn back by the rotation, then divide by the extent
        u = (cos * dx + sin * dy) / extent
        v = (cos * dy - sin * dx) / extent
        block = images[start:start + chunk]
        for shape, inside in enumerate(_INSIDE):
            rows = value["shape"] == shape
            block[rows] = inside(u[rows], v[rows]).to(torch.float32)
    return images.reshape(-1, 1, SIZE, SIZE)


def sample_factors(n: int, generator: torch.Generator) -> torch.Tensor:
    """n factor combinations [n, 5] (int64), each factor's value uniform and independent."""
    return torch.stack([torch.randint(size, (n,), generator=generator) for size in FACTOR_SIZES], dim=1)


def _drawn(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The data set's images [N, 1, 64, 64] and factors [N, 5], from root's cache or drawn and cached there."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    key = json.dumps([DRAWING, SIZE, FACTOR_SIZES, HALF_EXTENT, MARGIN, SHAPES_EXAMPLES, SHAPES_SEED])
    cache = root / f"shapes-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    shape = (SHAPES_EXAMPLES, 1, SIZE, SIZE)
    if cache.is_file():
        try:
            stored = load_file(cache)
            pixels = np.unpackbits(stored["bits"].numpy())[:math.prod(shape)].reshape(shape)
            if stored["factors"].shape == (SHAPES_EXAMPLES, len(FACTOR_SIZES)):
                return torch.from_numpy(pixels.astype(np.float32)), stored["factors"]
        except (SafetensorError, KeyError, ValueError, OSError):
            pass  # a damaged cache: draw again
    factors = sample_factors(SHAPES_EXAMPLES, torch.Generator().manual_seed(SHAPES_SEED))
    images = render(factors)
    bits = torch.from_numpy(np.packbits(images.numpy().astype(np.uint8).reshape(-1)))
    root.mkdir(parents=True, exist_ok=True)
    write_safetensors(cache, {"bits": bits, "factors": factors})
    return images, factors


@DATASETS.register("shapes")
def _shapes(data_dir: Path, download: bool) -> SourceData:
    """dSprites' factors drawn on demand: 100,000 binary sprites 64x64 with shape, scale, rotation, x, y."""
    images, factors = _drawn(data_dir)
    return SourceData(
        x=images,
        y=factors[:, 0].clone(),
        kind="image",
        levels=2,
        classes=list(SHAPE_NAMES),
        factors=factors,
        factor_names=list(FACTOR_NAMES),
    )
