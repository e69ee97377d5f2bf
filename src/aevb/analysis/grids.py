"""Image grids: tiles of images [N, C, H, W] written as one PNG with PIL from a uint8 array (no matplotlib, no
torchvision import), so that training can save pictures cheaply: reconstructions, samples, a conditional model's
class grid.  The figures drawn with matplotlib are in :mod:`aevb.analysis.figures`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aevb.errors import UserError
from aevb.io import atomic_write
from aevb.model.base import Model


@contextmanager
def eval_mode(model: Model):
    """The model in eval mode without gradients for the block, then as it was."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """Tile images [N, C, H, W] in [0, 1] into one uint8 array [rows·H', cols·W', 3]."""
    images = images.detach().float().cpu().clamp(0, 1)
    if images.dim() != 4:
        raise ValueError(f"image_grid needs [N, C, H, W], got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    if c == 1:
        images = images.expand(n, 3, h, w)
    elif c != 3:
        images = images[:, :3]
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = torch.full((3, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    return (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def _upscale(array: np.ndarray, factor: int) -> np.ndarray:
    return array.repeat(factor, axis=0).repeat(factor, axis=1)


def save_png(array: np.ndarray, path: str | Path, min_size: int = 0) -> Path:
    """Write a uint8 array [H, W, 3] as PNG (atomically), upscaled by an integer factor to ``min_size``."""

    image = Image.fromarray(array)
    if min_size and max(image.size) < min_size:
        factor = math.ceil(min_size / max(image.size))
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    path = _png_path(path)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path


def _png_path(path: str | Path) -> Path:
    """``path``, which must name a PNG file: the figures are PNG whatever the suffix says."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"{path}: figures are written as PNG; give a file name ending in .png")
    return path


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save images [N, C, H, W] in [0, 1] as one PNG grid."""
    # upscale small images (8×8 digits) so each tile is at least 64 pixels
    factor = max(1, math.ceil(64 / images.shape[-2]))
    return save_png(_upscale(image_grid(images, nrow), factor), path)


def reconstruction_grid(model, x: torch.Tensor, path: str | Path, label: torch.Tensor | None = None) -> Path:
    """Originals (top row) above their reconstructions (bottom row): x [N, C, H, W]; ``label`` [N]: their classes,
    which a conditional model reconstructs them with."""
    was_training = model.training
    model.eval()
    recon = model.reconstruct(x, label)
    model.train(was_training)
    return save_grid(torch.cat([x, recon.to(x.dtype)]), path, nrow=x.shape[0])


def sample_grid(model, path: str | Path, n: int = 64, seed: int = 0, temperature: float = 1.0,
                label: int | None = None) -> Path:
    """Means of p(x|z) for n draws of z from the prior, with a seeded generator; a conditional model's of
    p(x|z, y = ``label``), or with labels drawn uniformly where it is None (:meth:`Model.sample`)."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    samples = model.sample(n, generator=generator, temperature=temperature, label=label)
    model.train(was_training)
    return save_grid(samples, path)


@torch.no_grad()
def class_grid(model, path: str | Path, columns: int = 10, seed: int = 0, temperature: float = 1.0) -> torch.Tensor:
    """A conditional model's class-conditional samples: row k holds means of p(x|z_j, y = k), and column j shares
    one z_j ~ p(z) across the rows, so a row shows a class and a column one code (its style, for digits).

    Writes the grid [K·columns images] to ``path`` and returns the images [K, columns, *data_shape].
    """
    generator = torch.Generator(device=model.device).manual_seed(seed)
    with eval_mode(model):
        z = model.sample_layers(columns, generator, temperature)[0]  # [columns, D]
        classes = model.n_classes
        codes = z.unsqueeze(0).expand(classes, *z.shape).reshape(classes * columns, -1)  # [K·columns, D]
        labels = torch.arange(classes, device=z.device).repeat_interleave(columns)  # [K·columns]: row k is class k
        images = model.decode(codes, labels).mean  # [K·columns, *data_shape]
    save_grid(images, path, nrow=columns)
    return images.reshape(classes, columns, *model.data_shape)
