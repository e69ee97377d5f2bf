"""What the codes say: statistics of the posterior over a data set (means, spreads, KL per latent
dimension, the layers of a hierarchy), active units and posterior collapse, and how useful the posterior
means are to a classifier of the labels (``aevb eval``'s diagnostics, the figures' and the explorer's codes).
"""

from __future__ import annotations

import numpy as np
import torch

from aevb.model.base import Model
from aevb.model.objectives import elbo_terms, kl_per_dimension

# Burda et al. (2016): a latent dimension is active when the variance over the
# data of its posterior mean exceeds this.
ACTIVE_UNIT_THRESHOLD = 0.01
def label_rows(labels: torch.Tensor | None, start: int, stop: int, device: torch.device) -> torch.Tensor | None:
    """The labels [stop − start] of a batch of examples on ``device`` (a conditional model's), or None."""
    return None if labels is None else labels[start:stop].to(device)


@torch.no_grad()
def posterior_statistics(model: Model, x: torch.Tensor, batch_size: int = 1000,
                         labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Posterior means [N, D], standard deviations [N, D] and per-dimension KL [N, D] over x (q(z|x, y) given the
    labels [N] of a conditional model).

    The KL per dimension exists only where the prior factorises over
    dimensions (the standard normal); for the mixture priors it is None.
    """
    device = model.device
    means, stds, kls = [], [], []
    per_dimension = (model.posterior.has_density and model.posterior.factorises and model.prior_module.factorises
                     and model.stochastic_layers == 1)  # hierarchical: z_1's prior is p(z_1|z_2)
    prior = model.prior() if per_dimension else None
    for start in range(0, x.shape[0], batch_size):
        posterior = model.encode(x[start:start + batch_size].to(device),
                                 label_rows(labels, start, start + batch_size, device))
        means.append(posterior.mean.float())
        stds.append(posterior.stddev.float())
        if per_dimension:
            # KL of a diagonal Gaussian to N(0, I) factorises over dimensions
            kls.append(kl_per_dimension(posterior, prior).float())
    return {
        "mean": torch.cat(means),
        "std": torch.cat(stds),
        "kl": torch.cat(kls) if kls else None,
    }


def active_units(posterior_means: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> torch.Tensor | None:
    """Boolean [D]: Var_x(E_q[z_d | x]) > threshold (Burda et al. 2016); None for fewer than two examples,
    whose variance is undefined."""
    if posterior_means.shape[0] < 2:
        return None
    return posterior_means.var(dim=0, unbiased=True) > threshold


@torch.no_grad()
def layer_statistics(model: Model, x: torch.Tensor, batch_size: int = 1000,
                     labels: torch.Tensor | None = None) -> dict[str, list | None]:
    """KL and active units of each stochastic layer z_1 … z_L over x (a model with L > 1 layers).

    ``kl_per_layer``: the mean over x of each layer's KL term (one sample of
    the layers above, as in the ELBO); ``active_units_per_layer``: the number
    of dimensions of each layer whose posterior mean (along the posterior-mean
    path, :meth:`~aevb.model.base.Model.layer_posteriors`) varies with x
    (:func:`active_units`); None for one example, which has no variance over x.
    """
    layers = model.stochastic_layers
    kls = torch.zeros(layers, dtype=torch.float64)
    means: list[list[torch.Tensor]] = [[] for _ in range(layers)]
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(model.device)
        yb = label_rows(labels, start, start + batch_size, model.device)
        terms = elbo_terms(model, xb, label=yb)
        kl_layers = terms.kl_layers if terms.kl_layers is not None else (terms.kl,)  # each [B]
        kls += torch.stack([k.sum() for k in kl_layers]).double().cpu()
        for layer, q in enumerate(model.layer_posteriors(xb, yb)):
            means[layer].append(q.mean.float().cpu())  # [B, D]
    active = [active_units(torch.cat(m)) for m in means]
    return {"kl_per_layer": (kls / x.shape[0]).tolist(),
            "active_units_per_layer": None if active[0] is None else [int(a.sum()) for a in active]}


def collapsed(active: int, latent_dim: int) -> bool:
    """Whether so few latent dimensions carry information about x that the posterior has collapsed.

    None active, or at most one dimension in ten: the decoder then ignores
    (nearly all of) z and the model is close to a density model of x alone.
    A small latent space fully or half used (1 of 1, 1 of 2) is not collapse.
    """
    return active == 0 or active <= latent_dim // 10


def collapse_warning(active: int, latent_dim: int) -> str | None:
    """A one-line warning when :func:`collapsed`, else None."""
    if active == 0:
        return (f"posterior collapse: none of the {latent_dim} latent dimensions is active (the posterior "
                f"mean does not vary with x; variance ≤ {ACTIVE_UNIT_THRESHOLD}). The decoder ignores z; "
                f"try --beta-warmup, a smaller --beta, or a less flexible decoder")
    if collapsed(active, latent_dim):
        return (f"posterior collapse: only {active} of {latent_dim} latent dimensions are active "
                f"(variance of the posterior mean > {ACTIVE_UNIT_THRESHOLD})")
    return None


# ---------------------------------------------------------------------------
# how useful is the representation?


def classifier_accuracy(train_codes: torch.Tensor, train_labels: torch.Tensor, test_codes: torch.Tensor,
                        test_labels: torch.Tensor, *, neighbours: int = 5, seed: int = 0) -> dict[str, float]:
    """Test accuracy of simple classifiers trained on codes [N, D] with labels [N].

    Returns ``logistic`` (multinomial logistic regression on standardised
    codes), ``knn`` (k-nearest neighbours, Euclidean, k = ``neighbours``) and
    ``chance`` (the frequency in the test set of the most common training
    label: what a classifier that ignores the codes gets).
    """
    # scikit-learn takes about half a second to import, and only these metrics use it
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr = train_codes.detach().double().cpu().numpy()
    xte = test_codes.detach().double().cpu().numpy()
    ytr = train_labels.detach().reshape(-1).cpu().numpy()
    yte = test_labels.detach().reshape(-1).cpu().numpy()
    values, counts = np.unique(ytr, return_counts=True)
    chance = float((yte == values[counts.argmax()]).mean())
    if len(values) < 2:  # one class: nothing to learn
        return {"logistic": chance, "knn": chance, "chance": chance}
    logistic = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    logistic.fit(xtr, ytr)
    knn = KNeighborsClassifier(n_neighbors=min(neighbours, len(xtr))).fit(xtr, ytr)
    return {
        "logistic": float((logistic.predict(xte) == yte).mean()),
        "knn": float((knn.predict(xte) == yte).mean()),
        "chance": chance,
    }


@torch.no_grad()
def representation_accuracy(model: Model, train_x: torch.Tensor, train_labels: torch.Tensor,
                            test_x: torch.Tensor, test_labels: torch.Tensor) -> dict[str, float]:
    """:func:`classifier_accuracy` on the posterior means E_q[z|x] of train and test data (a conditional model's
    E_q[z|x, y], which is given the label: what of the class its code still carries)."""
    model.eval()
    given = model.conditional
    train_codes = posterior_statistics(model, train_x, labels=train_labels if given else None)["mean"]  # [N_train, D]
    test_codes = posterior_statistics(model, test_x, labels=test_labels if given else None)["mean"]  # [N_test, D]
    return classifier_accuracy(train_codes, train_labels, test_codes, test_labels)


# ---------------------------------------------------------------------------
# the metrics
