"""Plots of numbers rather than of images: the training curves and the choice of likelihood.

Like the figures of :mod:`aevb.analysis.figures`, each function writes one
PNG with matplotlib (Agg, imported inside the function) and returns the
numbers it drew, so that tests can check what a picture means.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from aevb.analysis.figures import new_figure, save_figure
from aevb.analysis.grids import eval_mode
from aevb.model.base import Model
from aevb.model.likelihoods import GaussianLikelihood, LaplaceLikelihood, OptimalGaussianLikelihood
from aevb.run.folder import metrics_record

# the fixed-scale heads whose NLL curves the likelihood figure draws, by the family names of
# Likelihood.scale_summary, with the symbol of their scale
SCALE_CURVES = {"gaussian": (GaussianLikelihood, "σ"), "laplace": (LaplaceLikelihood, "b")}


# -- training curves -------------------------------------------------------------


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl``: blank, truncated, foreign or edited lines are skipped
    (:func:`aevb.run.folder.metrics_record`)."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    return [record for line in lines if (record := metrics_record(line)) is not None]


def training_curves(metrics: str | Path | list[dict], path: str | Path) -> dict:
    """Loss, reconstruction term, KL and posterior statistics against epochs (steps for a run under one epoch).

    ``metrics``: a ``metrics.jsonl`` path or its records.  Training records
    (averages over the logged steps) are lines; the held-out ELBO terms
    logged at epoch ends (``val_*`` or ``test_*``) are dots.  All in nats per
    example; the training loss includes β and is the IWAE bound for IWAE.
    The horizontal axis counts epochs (``x_label``), where the validation
    dots fall at whole numbers, once the run has trained a whole epoch; a
    shorter run's, optimiser steps.  Returns the plotted series (``x`` and
    ``eval_x`` on that axis).
    """
    from matplotlib.ticker import MaxNLocator

    records = read_metrics(metrics) if isinstance(metrics, (str, Path)) else list(metrics)
    train = [r for r in records if all(k in r for k in ("loss", "reconstruction", "kl"))]
    split = next((s for s in ("val", "test") if any(f"{s}_reconstruction" in r for r in records)), None)
    held = [r for r in records if split and f"{split}_reconstruction" in r]
    series = {
        "step": [r["step"] for r in train],
        "loss": [r["loss"] for r in train],
        "reconstruction": [r["reconstruction"] for r in train],
        "kl": [r["kl"] for r in train],
        "neg_elbo": [r["reconstruction"] + r["kl"] for r in train],
        "mu": [r.get("mu") for r in train],
        "sigma": [r.get("sigma") for r in train],
        "beta": [r.get("beta") for r in train],
        "eval_split": split,
        "eval_step": [r["step"] for r in held],
        "eval_neg_elbo": [-r[f"{split}_elbo"] if f"{split}_elbo" in r else None for r in held],
        "eval_reconstruction": [r.get(f"{split}_reconstruction") for r in held],
        "eval_kl": [r.get(f"{split}_kl") for r in held],
    }
    epochs = [r.get("epoch") for r in train + held]
    by_epoch = bool(train) and all(isinstance(e, (int, float)) for e in epochs) and max(epochs) >= 1
    axis = "epoch" if by_epoch else "step"
    series.update({"x_label": axis, "x": [r[axis] for r in train], "eval_x": [r[axis] for r in held]})
    fig = new_figure(10, 6.8)
    panels = fig.subplots(2, 2, sharex=True)
    # markers where there are few points, so a one-epoch run still shows something
    train_style = {"linewidth": 1.2, **({"marker": ".", "markersize": 5} if len(train) < 30 else {})}
    eval_style = {"marker": "o", "markersize": 3.5, "linewidth": 1}

    def draw(ax, title, curves):
        for label, xs, ys, style in curves:
            pairs = [(a, b) for a, b in zip(xs, ys) if b is not None]
            if pairs:
                ax.plot(*zip(*pairs), label=label, **style)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)

    steps, eval_steps = series["x"], series["eval_x"]
    draw(panels[0, 0], "training loss and negative ELBO (nats)", [
        ("training loss (minimised)", steps, series["loss"], train_style),
        ("training −ELBO = reconstruction + KL", steps, series["neg_elbo"], {**train_style, "linestyle": "--"}),
        (f"{split} −ELBO", eval_steps, series["eval_neg_elbo"], eval_style),
    ])
    draw(panels[0, 1], "reconstruction −E_q[log p(x|z)] (nats)", [
        ("training", steps, series["reconstruction"], train_style),
        (f"{split}", eval_steps, series["eval_reconstruction"], eval_style),
    ])
    draw(panels[1, 0], "KL(q(z|x) ‖ p(z)) (nats)", [
        ("training", steps, series["kl"], train_style),
        (f"{split}", eval_steps, series["eval_kl"], eval_style),
    ])
    betas = [b for b in series["beta"] if b is not None]
    draw(panels[1, 1], "posterior statistics (training batches)", [
        ("mean of μ", steps, series["mu"], train_style),
        ("mean of σ", steps, series["sigma"], train_style),
        *([("β", steps, series["beta"], {**train_style, "linestyle": ":"})] if len(set(betas)) > 1 else []),
    ])
    for ax in panels[1]:
        ax.set_xlabel("epoch" if by_epoch else "optimiser step")
        if by_epoch:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # 1, 2, 3 epochs: not 1.25
    save_figure(fig, path)
    return series


# -- why this likelihood? ----------------------------------------------------------


def likelihood_choice(model: Model, x: torch.Tensor, path: str | Path, n_points: int = 241) -> dict:
    """What the Gaussian and Laplace likelihoods do with the model's own residuals.

    Left: negative log-likelihood per dimension of the residuals r = x̂ − x of
    the model's reconstructions of x, against the scale, computed with the
    library's :class:`~aevb.model.likelihoods.GaussianLikelihood` and
    :class:`~aevb.model.likelihoods.LaplaceLikelihood`: the Gaussian curve has its
    minimum at σ = √MSE (the σ that ``gaussian-optimal`` uses, whose value is
    marked), the Laplace one at b = mean |r|.  The model's own scale is marked
    where it has one (its likelihood's ``scale_summary``, returned as ``model_scale``).

    Right: the gradient of each loss with respect to one predicted value
    against its residual, by autograd through ``log_prob``, the other
    residuals of the example held fixed: MSE (Gaussian, σ = 1) is linear, L1
    (Laplace, b = 1) is its sign, log-MSE (σ-VAE) is the MSE gradient divided
    by the example's MSE.  Returns the curves.
    """
    device = model.device
    x = x.to(device)
    with eval_mode(model):
        recon = model.reconstruct(x).double()  # [N, *data_shape]
    target = x.double().flatten()  # [n]: all residuals as one event
    loc = recon.flatten()
    residual = loc - target
    n = target.numel()
    mse = float(residual.pow(2).mean())
    mae = float(residual.abs().mean())
    sigma_star = max(math.sqrt(mse), 1e-6)
    b_star = max(mae, 1e-6)

    def curve(make, center):
        scales = torch.logspace(math.log10(center / 10), math.log10(center * 10), n_points - 1, dtype=torch.float64)
        scales = torch.sort(torch.cat([scales, torch.tensor([center], dtype=torch.float64)])).values
        nll = torch.stack([-make(float(s))(loc, 1).log_prob(target) / n for s in scales])
        return scales, nll

    sigma, gaussian_nll = curve(GaussianLikelihood, sigma_star)
    scale, laplace_nll = curve(LaplaceLikelihood, b_star)
    optimal = OptimalGaussianLikelihood().to(device).eval()
    optimal_nll = float(-optimal(loc.float(), 1).log_prob(target.float()) / n)
    model_scale = model.likelihood.scale_summary()  # (family, σ or b) or None

    # gradient of −log p(x|x̂) with respect to one prediction, the rest of an example fixed;
    # every gradient is odd in the residual, so positive residuals on log axes show it all
    example = residual[: math.prod(model.data_shape)].detach().cpu()  # residuals of the first example [m]
    e = torch.logspace(-3, 0, 121, dtype=torch.float64)  # [E]
    grads = {}
    for name, head in (("mse", GaussianLikelihood(1.0)), ("log_mse", OptimalGaussianLikelihood().eval()),
                       ("l1", LaplaceLikelihood(1.0))):
        pred = example.repeat(len(e), 1)  # [E, m] predictions with targets at 0: the residuals
        pred[:, 0] = e
        pred.requires_grad_(True)
        (-head(pred, 1).log_prob(torch.zeros_like(pred))).sum().backward()
        grads[name] = pred.grad[:, 0].detach()
    background_mse = float(example[1:].pow(2).mean()) if example.numel() > 1 else 0.0

    fig = new_figure(11, 4.2)
    left, right = fig.subplots(1, 2)
    left.plot(sigma, gaussian_nll, label="Gaussian, NLL against σ")
    left.plot(scale, laplace_nll, label="Laplace, NLL against b")
    left.axvline(sigma_star, color="C0", linestyle="--", linewidth=0.8)
    left.axvline(b_star, color="C1", linestyle="--", linewidth=0.8)
    left.plot([sigma_star], [optimal_nll], "o", color="C0", label=f"gaussian-optimal: σ = √MSE = {sigma_star:.3g}")
    left.plot([b_star], [float(laplace_nll.min())], "o", color="C1", label=f"b = mean |r| = {b_star:.3g}")
    lowest = float(min(gaussian_nll.min(), laplace_nll.min()))
    if model_scale is not None and model_scale[0] in SCALE_CURVES:
        family, value = model_scale
        head, symbol = SCALE_CURVES[family]
        left.plot([value], [float(-head(value)(loc, 1).log_prob(target) / n)], "s", color="k",
                  label=f"this model's {symbol} = {value:.3g}")
    left.set_xscale("log")
    left.set_ylim(lowest - 0.3, lowest + 3)
    left.set_xlabel("scale (σ or b)")
    left.set_ylabel("−log p(x | x̂) per dimension (nats)")
    left.set_title(f"NLL of the model's residuals (MSE {mse:.3g}) against the scale", fontsize=10)
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.plot(e, grads["mse"], label="MSE (gaussian, σ = 1): r")
    right.plot(e, grads["log_mse"], label=f"log-MSE (gaussian-optimal): ≈ r / MSE (MSE of the rest {background_mse:.3g})")
    right.plot(e, grads["l1"], label="L1 (laplace, b = 1): sign(r) = 1")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("residual r = x̂ − x of one value (gradients are odd in r)")
    right.set_ylabel("∂(−log p) / ∂x̂")
    right.set_title("gradient with respect to one prediction", fontsize=10)
    right.legend(fontsize=8)
    right.grid(alpha=0.3, which="both")
    save_figure(fig, path)
    return {"mse": mse, "mae": mae, "sigma": sigma, "gaussian_nll": gaussian_nll, "sigma_star": sigma_star,
            "optimal_nll": optimal_nll, "scale": scale, "laplace_nll": laplace_nll, "b_star": b_star,
            "model_scale": model_scale, "residual": e, "grad_mse": grads["mse"], "grad_log_mse": grads["log_mse"],
            "grad_l1": grads["l1"]}
