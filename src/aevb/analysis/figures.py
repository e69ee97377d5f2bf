"""Figures of the latent space, drawn with matplotlib: prior samples, interpolations, the latent grid and
scatter plot, traversals, denoising, the layers of a hierarchical VAE.  Each uses matplotlib's Agg canvas,
imported inside it, and returns the numbers it drew; so do the plots of numbers in :mod:`aevb.analysis.plots`
(training curves, the choice of likelihood).  The image grids written with PIL are in
:mod:`aevb.analysis.grids`.  Which figures a run gets, and in what order the report shows them, is the
registry of :mod:`aevb.analysis.gallery`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from aevb.analysis.grids import _png_path, eval_mode, image_grid
from aevb.analysis.posteriors import posterior_statistics
from aevb.io import atomic_write

# ---------------------------------------------------------------------------
# Figures of the latent space.  Each takes a model, tensors and a path, writes
# one PNG with matplotlib (Agg, imported here only) and returns the numbers
# it drew, so that tests can check what a picture means.  Embeddings,
# interpolations and traversals use the posterior mean E_q[z|x], never a
# sample.  Shapes: x [N, *data_shape]; z [..., D].

DIRECTIONS = ("coords", "pca")


def new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot, no global state)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write a matplotlib Figure as a PNG (atomically), cropped to what was drawn."""
    path = _png_path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.08))
    return path


def _is_image(model) -> bool:
    return len(model.data_shape) == 3


def _require_image_model(model, what: str) -> None:
    if not _is_image(model):
        raise ValueError(f"{what} draws images, but this model's data are rows of {model.data_shape[0]} numbers")


def _show_tiles(ax, tiles: torch.Tensor, padding: int = 2) -> tuple[int, int]:
    """Draw tiles [R, C, ch, h, w] as one image on ax; return (tile height, width) with padding."""
    rows, cols = tiles.shape[:2]
    grid = image_grid(tiles.reshape(rows * cols, *tiles.shape[2:]), nrow=cols, padding=padding)
    ax.imshow(grid, interpolation="nearest")
    return tiles.shape[-2] + padding, tiles.shape[-1] + padding


def _tile_figure(tiles: torch.Tensor, path: str | Path, *, title: str | None = None,
                 row_labels: list[str] | None = None, col_labels: list[str] | None = None,
                 xlabel: str | None = None, tile_inches: float = 0.55) -> Path:
    """Save tiles [R, C, ch, h, w] as a grid with row and column labels."""
    rows, cols = tiles.shape[:2]
    fig = new_figure(cols * tile_inches + (1.4 if row_labels else 0.2), rows * tile_inches + 0.9)
    ax = fig.add_subplot()
    th, tw = _show_tiles(ax, tiles)
    ax.set_xticks([2 + j * tw + (tw - 2) / 2 - 0.5 for j in range(cols)], col_labels or [""] * cols, fontsize=8)
    ax.set_yticks([2 + i * th + (th - 2) / 2 - 0.5 for i in range(rows)], row_labels or [""] * rows, fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=9)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


# -- prior samples -------------------------------------------------------------


def prior_samples(model, path: str | Path, n: int = 64, temperatures: tuple[float, ...] = (1.0, 0.5),
                  seed: int = 0) -> dict:
    """Means of p(x|z) for z = T·ε, ε ~ N(0, I), side by side for each temperature T.

    The same ε (seeded) is used for every T, so the panels show the same
    draws pulled towards the origin.  With a mixture prior (``--prior mog``
    or ``vamp``) the same components and ε are drawn for every T and T
    scales each component's noise.  A conditional model decodes each draw with
    a label drawn uniformly (seeded), the same for every T.  Returns ``z``
    [T, n, D] and ``images`` [T, n, *data_shape].
    """
    _require_image_model(model, "prior_samples")
    device = model.device
    standard = model.config.get("prior", "standard") == "standard"
    with eval_mode(model):
        # z_1 [n, D] (drawn ancestrally for a hierarchical VAE), the same draws for each T
        z = torch.stack([model.sample_layers(n, torch.Generator(device=device).manual_seed(seed), t)[0]
                         for t in temperatures])  # [T, n, D]
        labels = model.uniform_labels(n, torch.Generator(device=device).manual_seed(seed)) if model.conditional \
            else None  # [n]
        images = model.decode(z, labels).mean  # [T, n, *data_shape]
    side = max(1, math.ceil(math.sqrt(n)))
    fig = new_figure(4.2 * len(temperatures), 4.6)
    for k, t in enumerate(temperatures):
        ax = fig.add_subplot(1, len(temperatures), k + 1)
        ax.imshow(image_grid(images[k], nrow=side), interpolation="nearest")
        ax.set_title(f"temperature {t:g}: z ~ N(0, {t:g}² I)" if standard else
                     f"temperature {t:g}: z ~ {model.config['prior']} prior", fontsize=10)
        ax.axis("off")
    save_figure(fig, path)
    return {"temperatures": list(temperatures), "z": z.cpu(), "images": images.cpu()}


# -- interpolation -------------------------------------------------------------


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Linear interpolation: a, b [..., D], t [S] → [..., S, D]; exactly a at t = 0 and b at t = 1."""
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device).reshape(-1, 1)  # [S, 1]
    a, b = a.unsqueeze(-2), b.unsqueeze(-2)  # [..., 1, D]
    out = a + t * (b - a)
    return torch.where(t == 1, b, out)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985; White 2016 for latent spaces), [..., S, D].

    slerp(a, b; t) = sin((1 − t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b with Ω the
    angle between a and b.  Between vectors of equal norm it keeps the norm,
    so it stays in the shell where a Gaussian prior puts its mass; for nearly
    parallel a and b (sin Ω ≈ 0) it falls back to :func:`lerp`.  Exactly a at
    t = 0 and b at t = 1.
    """

    t = torch.as_tensor(t, dtype=a.dtype, device=a.device).reshape(-1, 1)  # [S, 1]
    cos = (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).clamp(-1, 1)  # [...]
    omega = torch.acos(cos)[..., None, None]  # [..., 1, 1]
    sin = torch.sin(omega)
    parallel = sin.abs() < 1e-6
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, 1 - t, torch.sin((1 - t) * omega) / safe)  # [..., S, 1]
    wb = torch.where(parallel, t, torch.sin(t * omega) / safe)
    a, b = a.unsqueeze(-2), b.unsqueeze(-2)
    out = wa * a + wb * b
    out = torch.where(t == 0, a, out)
    return torch.where(t == 1, b, out)


def interpolation(model, a: torch.Tensor, b: torch.Tensor, path: str | Path, steps: int = 10) -> dict:
    """Decode linear and spherical paths between the posterior means of a [P, ...] and b [P, ...].

    Each pair is two rows (linear, slerp) of ``steps`` decoder means from
    t = 0 to 1, with the inputs in the first and last columns; the t = 0 and
    t = 1 columns are exactly the reconstructions of a and b.  Returns ``t``
    [S], ``z_linear``/``z_slerp`` [P, S, D] and ``linear``/``slerp``
    [P, S, *data_shape].
    """
    _require_image_model(model, "interpolation")
    device = model.device
    a, b = a.to(device), b.to(device)
    t = torch.linspace(0, 1, steps, device=device)  # [S]
    with eval_mode(model):
        za, zb = model.encode(a).mean, model.encode(b).mean  # [P, D]
        paths = {"linear": lerp(za, zb, t), "slerp": slerp(za, zb, t)}  # [P, S, D]
        decoded = {k: model.decode(z).mean for k, z in paths.items()}  # [P, S, *data_shape]
    rows, labels = [], []
    for p in range(a.shape[0]):
        for kind in ("linear", "slerp"):
            rows.append(torch.cat([a[p:p + 1].float(), decoded[kind][p].float(), b[p:p + 1].float()]))
            labels.append(f"pair {p + 1} {kind}")
    tiles = torch.stack(rows)  # [2P, S + 2, ch, h, w]
    cols = ["input"] + [f"{v:.2g}" for v in t.tolist()] + ["input"]
    _tile_figure(tiles, path, row_labels=labels, col_labels=cols, xlabel="t (0: first input, 1: second input)",
                 title="interpolation between posterior means: linear and spherical (slerp)")
    return {"t": t.cpu(), "z_linear": paths["linear"].cpu(), "z_slerp": paths["slerp"].cpu(),
            "linear": decoded["linear"].cpu(), "slerp": decoded["slerp"].cpu()}


# -- two latent directions: grid and scatter -----------------------------------


def latent_directions(means: torch.Tensor, directions: str = "coords") -> tuple[torch.Tensor, torch.Tensor]:
    """The plane shown by :func:`latent_grid` and :func:`latent_scatter`: (origin [D], axes [2, D]).

    A code z is drawn at (z − origin) · axes^T, and the grid point (u, v) is
    z = origin + u·axes[0] + v·axes[1].

    * ``coords``: axes are the unit vectors of z1 and z2; the origin is 0 in
      those two coordinates (so u, v are z1, z2 themselves) and the mean of
      the posterior means in all other coordinates.
    * ``pca``: axes are the first two principal directions of the posterior
      means [N, D] (SVD of the centred means; sign chosen so the largest
      component is positive); the origin is their mean, so u, v are the
      principal-component scores.

    Holding the other coordinates at the mean of the posterior means (rather
    than at 0) keeps the grid in the region the encoder actually uses, which
    matters when the aggregate posterior is not centred.
    """
    if directions not in DIRECTIONS:
        raise ValueError(f"directions must be one of {DIRECTIONS}, got {directions!r}")
    means = means.float()
    if means.shape[-1] < 2:
        raise ValueError("a plane of two latent directions needs a latent space of at least 2 dimensions")
    center = means.mean(0)  # [D]
    if directions == "coords":
        axes = torch.eye(means.shape[-1], device=means.device)[:2]  # [2, D]
        origin = center.clone()
        origin[:2] = 0
        return origin, axes
    _, _, vh = torch.linalg.svd(means - center, full_matrices=False)  # vh [min(N, D), D]
    axes = vh[:2].clone()
    if axes.shape[0] < 2:
        raise ValueError("PCA directions need at least 2 posterior means")
    signs = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))  # [2, 1]
    return center, axes * torch.where(signs == 0, torch.ones_like(signs), signs)


def project(means: torch.Tensor, origin: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    """Coordinates [N, 2] of codes [N, D] in the plane (origin, axes)."""
    return (means.float() - origin) @ axes.T


def grid_extent(points: torch.Tensor, directions: str, grid_range: float | None = None) -> tuple[float, float]:
    """Half-widths (Ru, Rv) of the latent grid.

    ``grid_range`` given: that, in both directions.  Otherwise ±2 for
    ``coords`` (two standard deviations of the prior) and ±2 standard
    deviations of the projected posterior means for ``pca``.
    """
    if grid_range is not None:
        if not grid_range > 0:
            raise ValueError(f"grid_range must be positive, got {grid_range}")
        return float(grid_range), float(grid_range)
    if directions == "coords":
        return 2.0, 2.0
    std = points.float().std(0, unbiased=True) if points.shape[0] > 1 else torch.ones(2)
    return tuple(float(2 * s) if s > 1e-3 else 2.0 for s in std.tolist())


def _axis_names(directions: str) -> tuple[str, str]:
    return ("z1", "z2") if directions == "coords" else ("PC1 score", "PC2 score")


def latent_grid(model, x: torch.Tensor, path: str | Path, n: int = 15, grid_range: float | None = None,
                directions: str = "coords") -> dict:
    """Decoder means over an n × n grid in two latent directions (the tutorial's latent grid).

    The directions and origin come from the posterior means of x (see
    :func:`latent_directions`); u runs left to right and v bottom to top over
    ±(Ru, Rv) (see :func:`grid_extent`).  Returns ``z`` [n, n, D] (row i, column
    j: z = origin + u[j]·axes[0] + v[i]·axes[1], v descending), ``images``
    [n, n, *data_shape] = decode(z).mean, ``u``, ``v`` [n], ``origin``, ``axes``.
    """
    _require_image_model(model, "latent_grid")
    with eval_mode(model):
        means = posterior_statistics(model, x)["mean"]  # [N, D]
        origin, axes = latent_directions(means, directions)
        ru, rv = grid_extent(project(means, origin, axes), directions, grid_range)
        u = torch.linspace(-ru, ru, n, device=means.device)  # [n]
        v = torch.linspace(rv, -rv, n, device=means.device)  # [n], top row first
        z = origin + u[None, :, None] * axes[0] + v[:, None, None] * axes[1]  # [n, n, D]
        images = model.decode(z).mean  # [n, n, *data_shape]
    du, dv = (2 * ru / (n - 1) if n > 1 else ru), (2 * rv / (n - 1) if n > 1 else rv)
    fig = new_figure(7, 7)
    ax = fig.add_subplot()
    # a 1-pixel white gap between tiles: without it, strokes that reach a tile's edge (8×8 digits) run
    # into the next tile's; the extent puts each tile's centre at its grid point
    pad, (h, w) = 1, images.shape[-2:]
    grid = image_grid(images.reshape(n * n, *images.shape[2:]), nrow=n, padding=pad)
    step_w, step_h = w + pad, h + pad  # pixels from one tile's centre to the next
    left = -ru - (pad + w / 2) * du / step_w
    right = -ru + (grid.shape[1] - pad - w / 2) * du / step_w
    top = rv + (pad + h / 2) * dv / step_h
    bottom = rv - (grid.shape[0] - pad - h / 2) * dv / step_h
    ax.imshow(grid, interpolation="nearest", aspect="auto", extent=(left, right, bottom, top))
    name_u, name_v = _axis_names(directions)
    ax.set_xlabel(name_u)
    ax.set_ylabel(name_v)
    rest = "other coordinates at the mean of the posterior means" if directions == "coords" else \
        "centred on the mean of the posterior means"
    ax.set_title(f"decoder means over {name_u} × {name_v} ({rest})", fontsize=9)
    save_figure(fig, path)
    return {"z": z.cpu(), "images": images.cpu(), "u": u.cpu(), "v": v.cpu(), "origin": origin.cpu(),
            "axes": axes.cpu(), "extent": (ru, rv)}


def _spread_indices(points: torch.Tensor, k: int, min_distance: float, seed: int = 0) -> list[int]:
    """Up to k indices of points [N, 2], in seeded random order, at least min_distance apart."""
    order = torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(seed)).tolist()
    chosen: list[int] = []
    for i in order:
        if len(chosen) == k:
            break
        if all(float((points[i] - points[j]).norm()) >= min_distance for j in chosen):
            chosen.append(i)
    return chosen


def latent_scatter(model, x: torch.Tensor, path: str | Path, labels: torch.Tensor | None = None,
                   directions: str = "coords", classes: list[str] | None = None, n_images: int = 20,
                   grid_range: float | None = None, seed: int = 0) -> dict:
    """The posterior means of x in two latent directions, coloured by label where given.

    For image data, a second panel beside the first draws ``n_images`` of the
    inputs (seeded, spread apart) at their positions, which would hide the
    points under them in one panel; the dashed rectangle is the region that
    :func:`latent_grid` decodes with the same arguments.  Returns ``points``
    [N, 2], ``origin``, ``axes``, ``image_indices`` and the number of ``panels``.
    """
    import matplotlib
    from matplotlib.colors import Normalize
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage
    from matplotlib.patches import Rectangle

    with eval_mode(model):
        means = posterior_statistics(model, x)["mean"]  # [N, D]
    origin, axes = latent_directions(means, directions)
    points = project(means, origin, axes).cpu()  # [N, 2]
    ru, rv = grid_extent(points, directions, grid_range)
    with_images = _is_image(model) and n_images > 0 and points.shape[0] > 0
    # images hide the points under them: the points alone on the left, the images at theirs beside them
    fig = new_figure(13.5, 6.2) if with_images else new_figure(7.5, 6.5)
    panels = fig.subplots(1, 2, sharex=True, sharey=True) if with_images else [fig.add_subplot()]
    size = max(2.0, min(12.0, 4000 / max(points.shape[0], 1)))
    colors = None
    if labels is not None:
        labels = labels.reshape(-1).cpu()
        values = torch.unique(labels).tolist()
        if len(values) <= 20:
            cmap = matplotlib.colormaps["tab10" if len(values) <= 10 else "tab20"]
            colors = {value: cmap(k) for k, value in enumerate(values)}
        else:  # more classes than a qualitative map has colours: spread them over a continuous one
            cmap = matplotlib.colormaps["turbo"]
            colors = {value: cmap(k / (len(values) - 1)) for k, value in enumerate(values)}
    for ax, alpha in zip(panels, (0.7, 0.25)):
        if colors is not None:
            for value in colors:
                mask = labels == value
                name = classes[value] if classes is not None and 0 <= value < len(classes) else str(value)
                ax.scatter(points[mask, 0], points[mask, 1], s=size, color=colors[value], alpha=alpha,
                           linewidths=0, label=name)
        else:
            ax.scatter(points[:, 0], points[:, 1], s=size, color="#3b6fb6", alpha=alpha * 6 / 7, linewidths=0)
    if colors is not None:
        panels[-1].legend(title="label", fontsize=8, title_fontsize=8, markerscale=12 / size ** 0.5,
                          loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
        for handle in panels[-1].get_legend().legend_handles:
            handle.set_alpha(0.9)
    image_indices: list[int] = []
    if with_images:
        span = float((points.max(0).values - points.min(0).values).norm())
        image_indices = _spread_indices(points, n_images, 0.09 * span, seed)
        zoom = 26 / x.shape[-2]
        for i in image_indices:
            image = x[i].detach().float().cpu().clamp(0, 1)
            array = image[0].numpy() if image.shape[0] == 1 else image[:3].permute(1, 2, 0).numpy()
            box = OffsetImage(array, zoom=zoom, cmap="gray", norm=Normalize(0, 1), interpolation="nearest")
            edge = colors[int(labels[i])] if colors is not None else "#555555"
            panels[1].add_artist(AnnotationBbox(box, (float(points[i, 0]), float(points[i, 1])), frameon=True,
                                                pad=0.1, bboxprops={"edgecolor": edge, "linewidth": 1.5}))
    name_u, name_v = _axis_names(directions)
    for ax in panels:
        if _is_image(model):  # the latent grid is drawn for images only
            ax.add_patch(Rectangle((-ru, -rv), 2 * ru, 2 * rv, fill=False, linestyle="--", linewidth=0.8,
                                   edgecolor="#444444"))
        ax.set_xlabel(name_u)
    panels[0].set_ylabel(name_v)
    grid_note = "; dashed: the latent grid's range" if _is_image(model) else ""
    panels[0].set_title(f"posterior means of {points.shape[0]} test examples ({name_u}, {name_v}){grid_note}",
                        fontsize=9)
    if with_images:
        panels[1].set_title(f"{len(image_indices)} of the test images at their posterior means", fontsize=9)
    save_figure(fig, path)
    return {"points": points, "origin": origin.cpu(), "axes": axes.cpu(), "image_indices": image_indices,
            "panels": len(panels)}


# -- denoising -------------------------------------------------------------------


def denoising(model, x: torch.Tensor, path: str | Path, seed: int = 0) -> dict:
    """A denoising autoencoder at work: corrupted inputs x̃ (top row), the clean targets x
    (middle) and the reconstructions from x̃ (bottom), for x [N, C, H, W].

    The corruption is the model's own (``model.corrupt``), seeded.  Returns
    ``noisy``, ``clean`` and ``reconstructions``, each [N, *data_shape].
    """
    _require_image_model(model, "denoising")
    generator = torch.Generator(device=x.device).manual_seed(seed)
    with eval_mode(model):
        noisy = model.corrupt(x, generator=generator)
        recon = model.reconstruct(noisy)
    tiles = torch.stack([noisy.clamp(0, 1), x, recon.to(x.dtype)]).float()  # [3, N, C, H, W]
    _tile_figure(tiles.cpu(), path, row_labels=[model.input_corruption() or "corrupted", "clean", "reconstruction"],
                 title="denoising: corrupted input, clean target, reconstruction of the corrupted input")
    return {"noisy": noisy.cpu(), "clean": x.cpu(), "reconstructions": recon.cpu()}


# -- what each layer of a hierarchical VAE encodes ------------------------------


def layer_variation(model, path: str | Path, rows: int = 3, cols: int = 8, seed: int = 0) -> dict:
    """For each stochastic layer ℓ of a hierarchical VAE (top first), vary z_ℓ and hold the rest.

    Each row draws the layers above ℓ once from the prior and holds them; the
    columns draw z_ℓ ~ p(z_ℓ | z_ℓ+1) afresh, and the layers below ℓ are set
    to their conditional means, so a row changes only what layer ℓ encodes
    (global content for the top layer, detail for the lower ones).
    Returns ``images`` {layer: [rows, cols, *data_shape]} and the ``codes``
    {layer: list of [rows·cols, D] per layer} that were decoded.
    """
    _require_image_model(model, "layer variation")
    layers = model.stochastic_layers
    device = model.device
    generator = torch.Generator(device=device).manual_seed(seed)
    images, codes, tiles, labels = {}, {}, [], []
    with eval_mode(model), torch.no_grad():
        for layer in range(layers, 0, -1):
            base = model.sample_layers(rows, generator)  # [z_1 … z_L], each [rows, D]
            held = {upper: base[upper - 1].repeat_interleave(cols, 0) for upper in range(layer + 1, layers + 1)}
            varied = model.sample_layers(rows * cols, generator, fixed=held)
            held.update({upper: varied[upper - 1] for upper in range(layer, layers + 1)})
            zs = model.sample_layers(rows * cols, generator, temperature=0.0, fixed=held)  # lower layers at means
            decoded = model.decode(zs[0]).mean.float().cpu().reshape(rows, cols, *model.data_shape)
            images[layer], codes[layer] = decoded, [z.cpu() for z in zs]
            tiles.append(decoded)
            labels += [f"vary z{layer}" if r == 0 else "" for r in range(rows)]
    _tile_figure(torch.cat(tiles), path, row_labels=labels,
                 title="each row holds the layers above, columns resample one layer; layers below at their means")
    return {"images": images, "codes": codes}


# -- one dimension at a time ---------------------------------------------------


def latent_traversal(model, x: torch.Tensor, path: str | Path, top: int = 10,
                     values: torch.Tensor | None = None, base: torch.Tensor | None = None) -> dict:
    """Change one latent dimension at a time (β-VAE style), dimensions ordered by KL.

    The ``top`` dimensions with the largest mean KL(q(z_d|x) ‖ p(z_d)) over x
    (for a model without KL, the largest variance of the posterior mean) are
    rows; in each, z_d is set to each of ``values`` (default −3 … 3, the
    prior's ±3σ) while the other coordinates stay at ``base`` (default: the
    posterior mean of x[0]).  Returns ``dims``, ``score`` (KL or variance per
    shown dimension), ``values`` [V], ``base`` [D], ``z`` [R, V, D] and
    ``images`` [R, V, *data_shape].
    """
    _require_image_model(model, "latent_traversal")
    device = model.device
    values = torch.linspace(-3, 3, 9) if values is None else torch.as_tensor(values, dtype=torch.float32)
    values = values.to(device)
    with eval_mode(model):
        stats = posterior_statistics(model, x)
        has_kl = stats["kl"] is not None
        score = stats["kl"].mean(0) if has_kl else stats["mean"].var(0)  # [D]
        dims = torch.argsort(score, descending=True)[:top].tolist()
        if base is None:
            base = model.encode(x[:1].to(device)).mean[0]  # [D]
        base = base.to(device).float()
        z = base.repeat(len(dims), len(values), 1)  # [R, V, D]
        for r, d in enumerate(dims):
            z[r, :, d] = values
        images = model.decode(z).mean  # [R, V, *data_shape]
    label = "KL" if has_kl else "var"
    rows = [f"z{d + 1}  {label} {score[d]:.2f}" for d in dims]
    _tile_figure(images.float(), path, row_labels=rows, col_labels=[f"{v:g}" for v in values.tolist()],
                 xlabel="value of the dimension (others at the base code)",
                 title=f"latent traversals, {len(dims)} dimensions with the largest {label}")
    return {"dims": dims, "score": [float(score[d]) for d in dims], "values": values.cpu(), "base": base.cpu(),
            "z": z.cpu(), "images": images.cpu()}
