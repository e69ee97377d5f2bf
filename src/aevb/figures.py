"""Pictures of what a model does.  Every function takes tensors and writes PNGs.

Image grids are written with PIL from uint8 arrays (no matplotlib, no
torchvision import), so that training can save pictures cheaply.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .io import atomic_write


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
    from PIL import Image

    image = Image.fromarray(array)
    if min_size and max(image.size) < min_size:
        factor = math.ceil(min_size / max(image.size))
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    path = Path(path)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save images [N, C, H, W] in [0, 1] as one PNG grid."""
    # upscale small images (8×8 digits) so each tile is at least 64 pixels
    factor = max(1, math.ceil(64 / images.shape[-2]))
    return save_png(_upscale(image_grid(images, nrow), factor), path)


def reconstruction_grid(model, x: torch.Tensor, path: str | Path) -> Path:
    """Originals (top row) above their reconstructions (bottom row): x [N, C, H, W]."""
    was_training = model.training
    model.eval()
    recon = model.reconstruct(x)
    model.train(was_training)
    return save_grid(torch.cat([x, recon.to(x.dtype)]), path, nrow=x.shape[0])


def sample_grid(model, path: str | Path, n: int = 64, seed: int = 0, temperature: float = 1.0) -> Path:
    """Means of p(x|z) for n draws of z from the prior, with a seeded generator."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    samples = model.sample(n, generator=generator, temperature=temperature)
    model.train(was_training)
    return save_grid(samples, path)
