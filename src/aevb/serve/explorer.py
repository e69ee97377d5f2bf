"""The explorer's model side: a run's test codes in a plane, and everything the page asks to see decoded.

    explorer = Explorer.from_run(open_run("runs/mnist"))
    explorer.state()                        # what the page draws first: planes, points, labels, sliders
    explorer.decode(z)                      # z [D] → {"z": [D], "output": {"png": data URI} or {"row": [D_x]}}
    explorer.plane_point("pca", u, v)       # the latent point [D] of a point of the plane
    explorer.interpolate(a, b, steps=9)     # linear and spherical paths between two latent points
    explorer.draw("prior", n=16, seed=0)    # prior draws (and a run's fitted samplers), decoded

Every answer is plain JSON values; the web application (:mod:`aevb.serve.app`)
checks the requests before they get here.  Images go out as PNG data URIs at
their own resolution (the page enlarges them with crisp pixels), a table's
rows in the units of its file.  The model is used under one lock: a browser
may send several requests at once, and one decode at a time is as fast on a
CPU and keeps torch's threads from competing.
"""

from __future__ import annotations

import base64
import io
import threading
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from aevb.analysis.posteriors import ACTIVE_UNIT_THRESHOLD, posterior_statistics
from aevb.analysis.figures import latent_directions, lerp, slerp
from aevb.analysis.grids import image_grid
from aevb.errors import UserError
from aevb.model.base import Model
from aevb.run.open import Run
from aevb.sampling.fitted import fitted_samplers, saved_sampler

# a sampler: (n, generator) → z [n, D], latent points that the explorer decodes
Draw = Callable[[int, torch.Generator], torch.Tensor]

MAX_POINTS = 5000  # test examples drawn in the plane: more make the page slow without showing more
SLIDER_HALF_WIDTH = 3.0  # a slider spans at least ±3, the prior's ±3σ, and every test code of its dimension


@dataclass(frozen=True)
class Plane:
    """A plane of the latent space: the point (u, v) is z = origin + u·axes[0] + v·axes[1]."""

    name: str  # coords or pca
    label: str  # what the page's menu says
    axis_titles: tuple[str, str]
    origin: torch.Tensor  # [D]
    axes: torch.Tensor  # [2, D]
    inverse: str  # how a point of the plane maps back to a latent point, said on the page

    def to_latent(self, u: float, v: float) -> torch.Tensor:
        """The latent point [D] of the plane's point (u, v)."""
        return self.origin + u * self.axes[0] + v * self.axes[1]

    def project(self, codes: torch.Tensor) -> torch.Tensor:
        """Coordinates [N, 2] of codes [N, D] in the plane (an orthonormal projection)."""
        return (codes - self.origin) @ self.axes.T


def planes(model: Model, means: torch.Tensor) -> dict[str, Plane]:
    """The planes the page offers for posterior means [N, D]: the first two coordinates, and the first two
    principal components where there are two dimensions and two examples to have them."""
    latent = means.shape[1]
    # z's own prior: a model with several stochastic layers decodes z_1, whose prior p(z_1 | z_2) has no one mean
    own_prior = model.has_kl and model.stochastic_layers == 1
    origin = model.prior().mean.detach().float().cpu().reshape(latent) if own_prior else torch.zeros(latent)
    held = "the prior's mean" if own_prior else "0"
    axes = torch.eye(max(latent, 2))[:2, :latent]  # [2, D]; a 1-D latent space: v does nothing
    coords_origin = origin.clone()
    coords_origin[:2] = 0
    found = {"coords": Plane("coords", "first two coordinates (z1, z2)", ("z1", "z2") if latent > 1 else ("z1", "—"),
                             coords_origin, axes,
                             f"A point (z1, z2) decodes with every other dimension at {held}")}
    if latent >= 2 and len(means) >= 2:
        center, pcs = latent_directions(means, "pca")
        found["pca"] = Plane("pca", "principal components of the test codes", ("PC1 score", "PC2 score"),
                             center.cpu(), pcs.cpu(),
                             "A point (PC1, PC2) decodes at the inverse projection: the mean of the test codes "
                             "+ PC1·(first direction) + PC2·(second direction), every other component at the mean")
    return found


def prior_draw(model: Model) -> Draw:
    """z ~ p(z) (ancestrally for several stochastic layers: z_1), [n, D]."""
    return lambda n, generator: model.sample_layers(n, generator)[0]


def run_samplers(run: Run, model: Model) -> dict[str, Draw]:
    """The draws the page offers: the prior (a model with one), then the samplers fitted to the run's codes
    and saved in its folder for these weights (never fitted here: the explorer only reads the run).

    Each sampler of :mod:`aevb.sampling` with a saved fit of these weights adds
    its ``sample(n, generator)`` (z [n, D]).
    """
    found: dict[str, Draw] = {"prior": prior_draw(model)} if model.has_kl else {}
    for name in fitted_samplers():
        sampler, _, _ = saved_sampler(run.path, name, model)
        if sampler is not None:
            found[name] = sampler.sample
    return found


class Explorer:
    """A model and its test split, with the answers of the explorer's page.

    ``x`` [N, *data_shape] the test split as the model sees it, ``labels`` [N]
    or None; ``original_units`` maps a table's rows [N, D] to the units of its
    file (``columns`` their names); ``samplers`` {name: draw} the draws the
    page offers.
    """

    def __init__(self, model: Model, x: torch.Tensor, labels: torch.Tensor | None = None, *,
                 classes: list[str] | None = None, columns: list[str] | None = None,
                 original_units: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 samplers: dict[str, Draw] | None = None, title: str = "", about: str = ""):
        self.model = model.eval()
        self.tabular = len(model.data_shape) == 1
        self.x = x[:MAX_POINTS].cpu()
        self.total = len(x)
        self.labels = None if labels is None else labels[:MAX_POINTS].cpu()
        self.classes = classes
        self.columns = columns or ([f"x{i + 1}" for i in range(model.data_shape[0])] if self.tabular else None)
        self.original_units = original_units or (lambda rows: rows)
        self.samplers = samplers if samplers is not None else ({"prior": prior_draw(model)} if model.has_kl else {})
        self.title, self.about = title, about
        self._lock = threading.Lock()
        with self._lock, torch.no_grad():
            stats = posterior_statistics(model, self.x.to(model.device))
        self.codes = stats["mean"].cpu()  # [N, D]
        self.planes = planes(model, self.codes)
        self.dims = self._dimensions(stats)

    @classmethod
    def from_run(cls, run: Run) -> "Explorer":
        """The explorer of a run: its model and test split, its data set's class and column names."""
        x, y = run.held_out("test")
        if x is None or not len(x):
            raise UserError(f"{run.path} has no test split to explore; train it with --test-split above 0")
        model, dataset = run.model, run.dataset
        tabular = dataset.kind == "tabular"
        return cls(model, x, y, classes=dataset.classes, columns=dataset.column_names() if tabular else None,
                   original_units=dataset.original_units if tabular else None,
                   samplers=run_samplers(run, model), title=run.path.name,
                   about=f"{run.config.model} on {run.config.data}, model: {run.provenance}")

    @property
    def latent_dim(self) -> int:
        return self.model.latent_dim

    def _dimensions(self, stats: dict[str, torch.Tensor | None]) -> list[dict]:
        """The sliders: every latent dimension, active ones first, each group by mean KL (or, without a
        per-dimension KL, by the variance of the posterior means) from the largest."""
        means = stats["mean"].cpu()
        variance = means.var(0) if len(means) > 1 else torch.zeros(means.shape[1])
        by_kl = stats["kl"] is not None
        score = stats["kl"].mean(0).cpu() if by_kl else variance
        active = variance > ACTIVE_UNIT_THRESHOLD
        order = sorted(range(means.shape[1]), key=lambda d: (not bool(active[d]), -float(score[d]), d))
        low = torch.minimum(means.min(0).values, torch.tensor(-SLIDER_HALF_WIDTH))
        high = torch.maximum(means.max(0).values, torch.tensor(SLIDER_HALF_WIDTH))
        return [{"dim": d, "name": f"z{d + 1}", "score": float(score[d]), "score_name": "KL" if by_kl else "var",
                 "active": bool(active[d]), "low": float(low[d]), "high": float(high[d])} for d in order]

    # -- what the page shows --------------------------------------------------

    def state(self) -> dict:
        """Everything the page draws first."""
        return {
            "title": self.title, "about": self.about, "latent_dim": self.latent_dim,
            "kind": "table" if self.tabular else "image", "data_shape": list(self.model.data_shape),
            "columns": self.columns, "examples": len(self.x), "total_examples": self.total,
            "labels": None if self.labels is None else self.labels.tolist(), "classes": self.classes,
            "planes": {name: {"label": plane.label, "axis_titles": list(plane.axis_titles),
                              "origin": plane.origin.tolist(), "axes": plane.axes.tolist(), "inverse": plane.inverse,
                              "points": plane.project(self.codes).tolist()}
                       for name, plane in self.planes.items()},
            "dims": self.dims, "samplers": list(self.samplers),
        }

    def example(self, index: int) -> dict:
        """Test example ``index`` (< len(x)): itself, its code E_q[z|x] [D] and its reconstruction."""
        x = self.x[index:index + 1]
        code = self.codes[index]
        return {"index": index, "label": None if self.labels is None else int(self.labels[index]),
                "z": code.tolist(), "input": self._outputs(x)[0], "reconstruction": self.decode(code)["output"]}

    def thumbnail(self, index: int) -> bytes:
        """Test example ``index`` as PNG bytes (an image's own; a table's row is not one)."""
        return _png_bytes(self.x[index])

    def decode(self, z: torch.Tensor) -> dict:
        """The mean of p(x|z) at z [D]."""
        return {"z": z.tolist(), "output": self._decode(z[None])[0]}

    def interpolate(self, a: torch.Tensor, b: torch.Tensor, steps: int) -> dict:
        """Decoded linear and spherical paths of ``steps`` points from a [D] to b [D], ends included."""
        t = torch.linspace(0, 1, steps)
        paths = {"linear": lerp(a, b, t), "slerp": slerp(a, b, t)}  # each [S, D]
        return {"t": t.tolist(), **{kind: self._decode(z) for kind, z in paths.items()},
                **{f"z_{kind}": z.tolist() for kind, z in paths.items()}}

    def draw(self, sampler: str, n: int, seed: int) -> dict:
        """n points of ``sampler`` (seeded), decoded."""
        generator = torch.Generator(device=self.model.device).manual_seed(seed)
        with self._lock, torch.no_grad():
            z = self.samplers[sampler](n, generator).float().cpu()  # [n, D]
        return {"sampler": sampler, "seed": seed, "z": z.tolist(), "outputs": self._decode(z)}

    def plane_point(self, plane: str, u: float, v: float) -> torch.Tensor:
        return self.planes[plane].to_latent(u, v)

    def _decode(self, z: torch.Tensor) -> list[dict]:
        """Means of p(x|z) for z [B, D], each as the page shows it."""
        with self._lock, torch.no_grad():
            means = self.model.decode(z.to(self.model.device, torch.float32)).mean.float().cpu()  # [B, *data_shape]
        return self._outputs(means)

    def _outputs(self, x: torch.Tensor) -> list[dict]:
        """Examples x [B, *data_shape] as the page shows them: PNG data URIs, or rows in the file's units."""
        if self.tabular:
            return [{"row": row} for row in self.original_units(x).tolist()]
        return [{"png": "data:image/png;base64," + base64.b64encode(_png_bytes(image)).decode("ascii")}
                for image in x]


def _png_bytes(image: torch.Tensor) -> bytes:
    """One image [C, H, W] in [0, 1] (clipped) as PNG bytes, at its own resolution."""
    buffer = io.BytesIO()
    Image.fromarray(image_grid(image[None], nrow=1, padding=0)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
