"""The figures of a run as a registry: what ``aevb explore`` draws and ``aevb report`` shows.

Each figure is one entry of :data:`aevb.registry.FIGURES`, registered under
its file name in ``RUN/images/``: a :class:`Figure` with the title and
caption the report prints, what it needs of the model and the run folder
(:class:`Need`: images, a plane of two latent dimensions, a prior to sample,
``metrics.jsonl``, a density of real values, a capability a model declares)
and a function ``draw(context, path)`` that writes the PNG from one
:class:`FigureContext` (the model, the held-out test split and its labels,
the run folder, the options of ``aevb explore``, the seed).
:func:`plan_figures`, :func:`aevb.analysis.report.explore_run` and the
report iterate the registry in its order; nothing else names a figure.  A
new figure is one entry, here or in any module imported before the figures
are drawn::

    @FIGURES.register("mean-image.png")
    @figure("Mean image", "The average held-out image.", needs=(IMAGES,))
    def _mean_image(context: FigureContext, path: Path) -> None:
        save_grid(context.x.mean(0, keepdim=True), path)

The drawing itself lives in :mod:`aevb.analysis.grids` (grids of the
model's images), :mod:`aevb.analysis.figures` (its latent space) and
:mod:`aevb.analysis.plots` (plots of numbers); the draw functions here only
choose their arguments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from aevb.analysis import figures, grids, plots
from aevb.data.transforms import holdout_indices
from aevb.model.base import Model
from aevb.registry import FIGURES
from aevb.sampling import fitted

# ---------------------------------------------------------------------------
# what a figure needs


@dataclass(frozen=True)
class Need:
    """Something a figure needs of the model or the run folder.

    ``missing(model, run_dir)`` says why this run lacks it, or returns None
    when it has it.  A ``silent`` need is a capability of one kind of model
    (a corrupted input, several stochastic layers): the other models leave
    the figure out without a word, as a figure that was never theirs.
    """

    missing: Callable[[Model, Path], str | None]
    silent: bool = False


IMAGES = Need(lambda model, run_dir: None if len(model.data_shape) == 3 else
              f"the data are rows of {model.data_shape[0]} numbers, not images")
PLANE = Need(lambda model, run_dir: None if model.latent_dim >= 2 else
             "the latent space has one dimension; a plane needs two")
PRIOR = Need(lambda model, run_dir: None if model.has_kl else
             f"an autoencoder ({model.name}) has no prior to sample: its codes are not fitted to N(0, I)")
METRICS = Need(lambda model, run_dir: None if (run_dir / "metrics.jsonl").is_file() else
               "the run has no metrics.jsonl")
# a density over all real values (Gaussian, Laplace): not a mass function, nor a density on [0, 1]
REAL_VALUES = Need(lambda model, run_dir: None if not (model.likelihood.discrete or model.likelihood.unit_interval)
                   else f"drawn for densities of real values such as the Gaussian and Laplace likelihoods, "
                        f"not {model.config['likelihood']}")
CORRUPTED_INPUT = Need(lambda model, run_dir: None if model.input_corruption() is not None else
                       "the model trains on uncorrupted inputs", silent=True)
LAYERS = Need(lambda model, run_dir: None if model.stochastic_layers > 1 else
              "the model has one stochastic layer", silent=True)
CONDITIONAL = Need(lambda model, run_dir: None if model.conditional else
                   "the model is not conditional on a class label", silent=True)
# a figure that encodes or decodes without a label: a conditional model's networks need one
UNCONDITIONAL = Need(lambda model, run_dir: None if not model.conditional else
                     "drawn for unconditional models: this one encodes and decodes with a class label, which the "
                     "figure does not choose")


def fitted_sampler_figure(name: str) -> dict:
    """The :func:`figure` arguments of the samples of fitted sampler ``name``: it needs images, a fit in the run
    folder (none: left out without a word, as it is for every run that never fitted one) and one of these weights
    (else the reason, and how to refit); it is redrawn when the fit's record changes."""
    needs = (IMAGES,
             Need(lambda model, run_dir: None if fitted.sampler_paths(run_dir, name)[1].is_file() else
                  f"no {name} sampler is fitted", silent=True),
             Need(lambda model, run_dir: fitted.saved_sampler(run_dir, name, model)[2] or None))
    return {"needs": needs, "pixelated": True, "inputs": (f"samplers/{name}.json",)}


# ---------------------------------------------------------------------------
# what a figure gets


@dataclass(frozen=True)
class ExploreOptions:
    """The options of ``aevb explore`` that shape the figures (see :func:`aevb.analysis.report.explore_run`)."""

    grid_range: float | None = None  # half-width of the latent grid; None: from the directions
    directions: str = "coords"  # coords or pca (resolved: never auto)
    grid_size: int = 15  # points per side of the latent grid
    pairs: int = 4  # interpolated pairs
    steps: int = 10  # points along each interpolation
    top_dims: int = 10  # dimensions traversed


@dataclass(frozen=True)
class FigureContext:
    """What every draw function gets: the model and the run's held-out data, the same for all figures."""

    model: Model  # in eval mode
    x: torch.Tensor  # [N, *data_shape] the test split, on the model's device
    labels: torch.Tensor | None  # [N]
    classes: list[str] | None  # names of the labels, where the data set has them
    run_dir: Path
    options: ExploreOptions
    seed: int  # for every random draw of a figure (each seeds its own generator)

    def examples(self, n: int) -> torch.Tensor:
        """Up to n test examples [≤ n, *data_shape]: one of each class in turn where there are labels,
        else the first n (:func:`aevb.data.transforms.holdout_indices`)."""
        return self.x[holdout_indices(self.labels, n, num_examples=len(self.x)).to(self.x.device)]

    def example_labels(self, n: int) -> torch.Tensor | None:
        """The labels [≤ n] of :meth:`examples` for a conditional model, which encodes and decodes with them;
        None for another."""
        if not self.model.conditional:
            return None
        return self.labels[holdout_indices(self.labels, n, num_examples=len(self.x))].to(self.x.device)


class NotDrawn(Exception):
    """Raised by a draw function that finds, with the data at hand, that its figure cannot be drawn.

    Its message is the reason, shown as a planned figure's would be.
    """


@dataclass(frozen=True)
class Figure:
    """One figure: its report title and caption, what it needs, and how it is drawn."""

    title: str
    caption: str
    draw: Callable[[FigureContext, Path], None]  # writes the PNG at the path
    needs: tuple[Need, ...] = ()  # in order: the first one missing gives the reason
    pixelated: bool = False  # a grid of small images, shown by the report with crisp pixels
    inputs: tuple[str, ...] = ()  # files of the run folder besides the weights it shows: redrawn when one is newer

    def first_missing(self, model: Model, run_dir: Path) -> tuple[Need, str] | None:
        """The first of its needs this run lacks, with the reason; None when it has them all."""
        for need in self.needs:
            reason = need.missing(model, run_dir)
            if reason is not None:
                return need, reason
        return None


def figure(title: str, caption: str, *, needs: tuple[Need, ...] = (), pixelated: bool = False,
           inputs: tuple[str, ...] = ()) -> Callable[[Callable[[FigureContext, Path], None]], Figure]:
    """Decorator making a draw function a :class:`Figure` (register it with ``@FIGURES.register(file)``)."""
    def decorator(draw: Callable[[FigureContext, Path], None]) -> Figure:
        return Figure(title, caption, draw, tuple(needs), pixelated, tuple(inputs))

    return decorator


@dataclass
class Plan:
    """Which figures fit a run, and why the others are left out."""

    figures: list[str]
    skipped: dict[str, str]


def plan_figures(model: Model, run_dir: str | Path) -> Plan:
    """The figures :func:`~aevb.analysis.report.explore_run` writes for this model and run folder, in order."""
    run_dir = Path(run_dir)
    planned, skipped = [], {}
    for name, entry in FIGURES.items():
        missing = entry.first_missing(model, run_dir)
        if missing is None:
            planned.append(name)
        elif not missing[0].silent:
            skipped[name] = missing[1]
    return Plan(planned, skipped)


# ---------------------------------------------------------------------------
# the figures, in the order the report shows them

# residuals of the likelihood figure: the test split's first examples (every residual is one event,
# evaluated at 241 scales, so a whole CIFAR test set would take minutes)
LIKELIHOOD_EXAMPLES = 1000
# the held-out images of the reconstruction, traversal and denoising figures: one per class
SHOWN_EXAMPLES = 10


@FIGURES.register("training-curves.png")
@figure("Training curves",
        "Training loss, reconstruction term and KL averaged over logged steps (lines), and the held-out "
        "ELBO terms at epoch ends (dots), in nats per example, by epoch (by step for a run shorter than one "
        "epoch); below right the mean posterior μ and σ.",
        needs=(METRICS,))
def _training_curves(context: FigureContext, path: Path) -> None:
    plots.training_curves(context.run_dir / "metrics.jsonl", path)


@FIGURES.register("reconstructions.png")
@figure("Reconstructions",
        "Held-out images (top row, one per class where there are labels) above the means of p(x|z) "
        "at their posterior means (bottom row).",
        needs=(IMAGES,), pixelated=True)
def _reconstructions(context: FigureContext, path: Path) -> None:
    grids.reconstruction_grid(context.model, context.examples(SHOWN_EXAMPLES), path,
                                label=context.example_labels(SHOWN_EXAMPLES))


@FIGURES.register("prior-samples.png")
@figure("Samples from the prior",
        "Means of p(x|z) for z drawn from the prior at temperature 1 and at 0.5 (the same draws scaled "
        "towards the origin): lower temperature trades variety for typicality.  A conditional model's with "
        "labels drawn uniformly, the same at both temperatures.",
        needs=(IMAGES, PRIOR))
def _prior_samples(context: FigureContext, path: Path) -> None:
    figures.prior_samples(context.model, path, n=64, seed=context.seed)


@FIGURES.register("class-samples.png")
@figure("Samples of each class",
        "Conditional model: row k holds means of p(x|z, y = k), and each column shares one draw z ~ p(z) "
        "across the classes, so a row shows a class and a column what the code holds besides the class.",
        needs=(CONDITIONAL, IMAGES), pixelated=True)
def _class_samples(context: FigureContext, path: Path) -> None:
    grids.class_grid(context.model, path, columns=10, seed=context.seed)


def _fitted_samples(context: FigureContext, path: Path, name: str) -> None:
    sampler = fitted.saved_sampler(context.run_dir, name, context.model)[0]
    generator = torch.Generator(device=context.model.device).manual_seed(context.seed)
    grids.save_grid(fitted.decode_samples(context.model, sampler, 64, generator), path)


@FIGURES.register("samples-gmm.png")
@figure("Samples from a Gaussian mixture fitted to the codes",
        "Means of p(x|z) for z drawn from the Gaussian mixture fitted after training to the posterior means of "
        "the training split (aevb fit-sampler --sampler gmm; RUN/samplers/gmm.json says how many components "
        "BIC chose): samples from where the decoder was trained.",
        **fitted_sampler_figure("gmm"))
def _gmm_samples(context: FigureContext, path: Path) -> None:
    _fitted_samples(context, path, "gmm")


@FIGURES.register("samples-flow.png")
@figure("Samples from a normalising flow fitted to the codes",
        "Means of p(x|z) for z drawn from the neural spline flow fitted after training to the posterior means "
        "of the training split (aevb fit-sampler --sampler flow).",
        **fitted_sampler_figure("flow"))
def _flow_samples(context: FigureContext, path: Path) -> None:
    _fitted_samples(context, path, "flow")


@FIGURES.register("samples-autoregressive.png")
@figure("Samples from an autoregressive prior fitted to the codes",
        "Means of p(x|z) for codes drawn index by index from the transformer fitted after training to the codes of "
        "the training split (aevb fit-sampler --sampler autoregressive; a VQ-VAE's way to sample).",
        **fitted_sampler_figure("autoregressive"))
def _autoregressive_samples(context: FigureContext, path: Path) -> None:
    _fitted_samples(context, path, "autoregressive")


@FIGURES.register("interpolations.png")
@figure("Interpolations",
        "Decoder means along linear and spherical (slerp) paths between the posterior means of pairs of "
        "held-out images (shown at the ends); t = 0 and t = 1 are exactly their reconstructions.",
        needs=(UNCONDITIONAL, IMAGES))
def _interpolations(context: FigureContext, path: Path) -> None:
    ends = context.examples(2 * context.options.pairs)
    if len(ends) < 2:
        raise NotDrawn("needs at least two test images")
    ends = ends[: len(ends) // 2 * 2]
    figures.interpolation(context.model, ends[0::2], ends[1::2], path, steps=context.options.steps)


def _plane_options(context: FigureContext) -> ExploreOptions:
    """The options of a figure in a latent plane, whose principal components need two test examples."""
    if context.options.directions == "pca" and len(context.x) < 2:
        raise NotDrawn("the principal components of the posterior means need two test examples or more; "
                       "pass --directions coords")
    return context.options


@FIGURES.register("latent-scatter.png")
@figure("Posterior means of the test set",
        "Each test example at its posterior mean in the two latent directions of the grid, coloured by "
        "label where there are labels; for images, a few test images drawn at their positions beside it.",
        needs=(UNCONDITIONAL, PLANE))
def _latent_scatter(context: FigureContext, path: Path) -> None:
    options = _plane_options(context)
    figures.latent_scatter(context.model, context.x, path, labels=context.labels, directions=options.directions,
                           classes=context.classes, grid_range=options.grid_range, seed=context.seed)


@FIGURES.register("latent-grid.png")
@figure("Latent grid",
        "Decoder means over a grid in two latent directions (the first two coordinates, or the first two "
        "principal components of the posterior means), the other coordinates held at the mean of the "
        "posterior means.",
        needs=(UNCONDITIONAL, IMAGES, PLANE))
def _latent_grid(context: FigureContext, path: Path) -> None:
    options = _plane_options(context)
    figures.latent_grid(context.model, context.x, path, n=options.grid_size, grid_range=options.grid_range,
                        directions=options.directions)


@FIGURES.register("latent-traversal.png")
@figure("Latent traversals",
        "One latent dimension changed at a time from −3 to 3, the others at the posterior mean of one test "
        "image; rows are the dimensions with the largest KL (the ones the model uses).",
        needs=(UNCONDITIONAL, IMAGES))
def _latent_traversal(context: FigureContext, path: Path) -> None:
    with torch.no_grad():
        base = context.model.encode(context.examples(SHOWN_EXAMPLES)[:1]).mean[0]  # [D]: the first shown image's code
    figures.latent_traversal(context.model, context.x, path, top=context.options.top_dims, base=base)


@FIGURES.register("denoising.png")
@figure("Denoising",
        "Held-out images corrupted as in training (top row), the clean images the loss compares with "
        "(middle row) and the reconstructions of the corrupted inputs (bottom row).",
        needs=(CORRUPTED_INPUT, IMAGES))
def _denoising(context: FigureContext, path: Path) -> None:
    figures.denoising(context.model, context.examples(SHOWN_EXAMPLES), path, seed=context.seed)


@FIGURES.register("layer-variation.png")
@figure("What each layer encodes",
        "Hierarchical VAE: for each stochastic layer (top first), each row holds the layers above it at one "
        "prior draw and the columns resample that layer; the layers below sit at their conditional means.",
        needs=(LAYERS, UNCONDITIONAL, IMAGES))
def _layer_variation(context: FigureContext, path: Path) -> None:
    figures.layer_variation(context.model, path, seed=context.seed)


@FIGURES.register("likelihood-choice.png")
@figure("Choice of likelihood",
        "Left: negative log-likelihood per dimension of this model's residuals against the scale, computed "
        "with the library's Gaussian and Laplace likelihoods (minimum at σ = √MSE and b = mean |r|). "
        "Right: the gradient each loss sends to one prediction, by autograd through log_prob.",
        needs=(REAL_VALUES, UNCONDITIONAL))
def _likelihood_choice(context: FigureContext, path: Path) -> None:
    plots.likelihood_choice(context.model, context.x[:LIKELIHOOD_EXAMPLES], path)  # the test split's residuals


# ---------------------------------------------------------------------------
# the other pictures of a run folder: what training and the commands write into RUN/images/ besides the figures


@dataclass(frozen=True)
class Picture:
    """A kind of picture that is no figure of the registry, known by its file name (``pattern``, a regex).

    ``caption(match)`` is what the report says of it; ``series`` groups the
    pictures of one kind (the reconstructions during training, ordered by
    ``order(match)``); ``shown_by``: a figure that shows the same (the report
    then leaves the picture out).
    """

    pattern: str
    caption: Callable[[re.Match], str]
    series: str = ""
    order: Callable[[re.Match], float] = lambda match: 0.0
    shown_by: str | None = None

    def match(self, name: str) -> re.Match | None:
        return re.fullmatch(self.pattern, name)


# the names training/loop.py and the commands of aevb.cli give their pictures
TRAINING_SERIES = "Reconstructions during training"
PICTURES = (
    Picture(r"reconstructions-epoch(\d+)\.png", lambda m: f"After epoch {int(m[1])}", TRAINING_SERIES,
            lambda m: float(m[1])),
    Picture(r"reconstructions-(\d+)\.png", lambda m: f"After step {int(m[1])}", TRAINING_SERIES, lambda m: float(m[1])),
    Picture(r"samples\.png", lambda m: "Samples from the prior at the end of training.",
            shown_by="prior-samples.png"),
    Picture(r"samples-T(.+)\.png", lambda m: f"Samples from the prior at temperature {m[1]} (aevb sample)."),
)


def describe_picture(name: str) -> tuple[Picture, re.Match] | None:
    """The kind of a picture of ``RUN/images/`` that is no figure, with the match of its name; None if unknown."""
    for picture in PICTURES:
        match = picture.match(name)
        if match is not None:
            return picture, match
    return None
