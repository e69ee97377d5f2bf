"""Disentanglement measured against known factors: the metrics compared by Locatello et al. (2019).

Each metric compares a representation of examples, ``codes`` [N, D] (the
posterior means, as in Locatello et al.), with the discrete factors of
variation that generated them, ``factors`` [N, K] (integers ``0..n_k - 1``:
shape, scale, rotation, x and y position for ``shapes``).  The β-VAE and
FactorVAE scores need examples that share a factor's value; they draw them
from the examples given (grouped by each factor's value) rather than from a
generator, so any data set with factor labels serves, as long as every value
has a few examples.

============  =========================================  ===================
metric        what it asks                               reference
============  =========================================  ===================
β-VAE score   is the fixed factor linearly readable      Higgins et al. 2017
              from |r(x1) − r(x2)| of pairs sharing it
FactorVAE     which single dimension varies least when   Kim & Mnih 2018
              one factor is fixed (majority vote)
MIG           gap between the two dimensions most        Chen et al. 2018
              informative of each factor, / H(factor)
DCI           how many factors each dimension predicts   Eastwood &
              (disentanglement), how many dimensions     Williams 2018
              each factor needs (completeness), how
              well they predict it (informativeness)
SAP           gap between the two dimensions whose       Kumar et al. 2018
              single-dimension classifier predicts the
              factor best
============  =========================================  ===================

All are in [0, 1], higher is better, and invariant to permuting the code
dimensions and to rescaling them by positive constants: the trees of DCI and
MIG's equal-width bins are so by construction, the FactorVAE score divides
by each dimension's spread, and the β-VAE score and SAP here standardise
each dimension before their regularised linear classifiers (which
disentanglement_lib does not: there a rescaled copy scores differently).  The
one exception: a dimension whose spread over the data is below
``COLLAPSED_STD`` counts as collapsed in the FactorVAE score whatever its
scale.  The numbers of points and the classifiers follow
disentanglement_lib's defaults where this says nothing else.

What a score of a bad representation looks like differs: pure noise scores
about 1/K on the β-VAE and FactorVAE scores (chance) and about 0 on the
others; a random mixture of the true factors scores low on MIG, SAP and DCI
disentanglement, but stays high on the β-VAE score (a linear classifier
finds the direction the fixed factor shrinks, up to a perfect score for ten
dimensions mixing five factors) and well above chance on the FactorVAE
score — Kim & Mnih's and Locatello et al.'s reason to report several.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Kim & Mnih leave out dimensions that do not vary over the data (a collapsed
# latent would otherwise win every vote with its variance of zero).
COLLAPSED_STD = 0.05
MIG_BINS = 20  # disentanglement_lib's histogram discretisation of each code dimension


class FactorIndex:
    """The examples grouped by each factor's value, to draw examples that share one.

    For factor k, ``order[k]`` [N] lists the examples sorted by their value,
    and the examples with the value of slot s are
    ``order[k][start[k][s] : start[k][s] + count[k][s]]``; ``slot[k]`` [N]
    is each example's slot.
    """

    def __init__(self, factors: np.ndarray):
        self.order, self.start, self.count, self.slot = [], [], [], []
        for k in range(factors.shape[1]):
            values, slot, count = np.unique(factors[:, k], return_inverse=True, return_counts=True)
            self.order.append(np.argsort(slot, kind="stable"))
            self.start.append(np.concatenate([[0], np.cumsum(count)[:-1]]))
            self.count.append(count)
            self.slot.append(slot)

    def partners(self, k: int, examples: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """For each example [n], another drawn uniformly among those with its value of factor k [n]."""
        slot = self.slot[k][examples]
        offset = np.floor(rng.random(len(examples)) * self.count[k][slot]).astype(np.int64)
        return self.order[k][self.start[k][slot] + offset]

    def same_value(self, k: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """n examples [n] sharing one value of factor k, the value drawn by its frequency."""
        anchor = rng.integers(len(self.slot[k]), size=1)
        return self.partners(k, np.repeat(anchor, n), rng)


def _check(codes: np.ndarray, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    codes = np.asarray(codes, dtype=np.float64)
    factors = np.asarray(factors)
    if codes.ndim != 2 or factors.ndim != 2 or codes.shape[0] != factors.shape[0]:
        raise ValueError(f"codes [N, D] and factors [N, K] expected, got {codes.shape} and {factors.shape}")
    if not np.issubdtype(factors.dtype, np.integer):
        raise ValueError("factors must be discrete (integer values)")
    return codes, factors


def _standardised(codes: np.ndarray) -> np.ndarray:
    """Each dimension [N, D] shifted and scaled to mean 0, std 1 (a constant dimension to 0)."""
    std = codes.std(axis=0)
    return (codes - codes.mean(axis=0)) / np.where(std > 0, std, 1.0)


def _split(n: int, n_train: int, n_test: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint random train and test indices (fewer where there are fewer examples: train gets 2/3)."""
    order = rng.permutation(n)
    if n_train + n_test > n:
        n_train = (2 * n) // 3
        n_test = n - n_train
    return order[:n_train], order[n_train:n_train + n_test]


def beta_vae_score(codes: np.ndarray, factors: np.ndarray, rng: np.random.Generator,
                   n_train: int = 10_000, n_eval: int = 5_000, batch_size: int = 64) -> float:
    """Higgins et al.'s score: accuracy on held-out points of a linear classifier naming the fixed factor.

    A point is the mean over ``batch_size`` pairs of |codes[i] − codes[j]|
    [D], i and j sharing the value of one factor k drawn uniformly (each pair
    its own value); its label is k.  Chance is 1/K.  Known to be lenient: a
    rotation of the factors can still score high, since the fixed factor
    shrinks the differences along a direction a linear classifier finds.
    """
    from sklearn.linear_model import LogisticRegression  # deferred: scikit-learn takes a second to import

    codes, factors = _check(codes, factors)
    codes = _standardised(codes)
    index = FactorIndex(factors)

    def points(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(factors.shape[1], size=n)
        features = np.empty((n, codes.shape[1]))
        for p, k in enumerate(labels):
            first = rng.integers(codes.shape[0], size=batch_size)
            features[p] = np.abs(codes[first] - codes[index.partners(k, first, rng)]).mean(axis=0)
        return features, labels

    x_train, y_train = points(n_train)
    x_eval, y_eval = points(n_eval)
    classifier = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    return float(classifier.score(x_eval, y_eval))


def factor_vae_score(codes: np.ndarray, factors: np.ndarray, rng: np.random.Generator,
                     n_train: int = 10_000, n_eval: int = 5_000, batch_size: int = 64,
                     n_variance: int = 10_000) -> float:
    """Kim & Mnih's score: accuracy of a majority vote from "least varying dimension" to the fixed factor.

    Each vote fixes one value of a factor k (drawn uniformly), takes
    ``batch_size`` examples with it, divides their codes by each
    dimension's standard deviation over the data and votes (argmin of the
    variance, k).  Each dimension is assigned the factor it got most votes
    for; the score is the share of held-out votes that assignment gets right.
    Dimensions that do not vary over the data (std < COLLAPSED_STD) do not
    vote; with none left the score is 0.
    """
    codes, factors = _check(codes, factors)
    index = FactorIndex(factors)
    sample = rng.choice(codes.shape[0], size=min(n_variance, codes.shape[0]), replace=False)
    scale = codes[sample].std(axis=0)
    active = np.flatnonzero(scale >= COLLAPSED_STD)
    if active.size == 0:
        return 0.0
    n_factors = factors.shape[1]

    def votes(n: int) -> np.ndarray:
        counts = np.zeros((codes.shape[1], n_factors), dtype=np.int64)  # [D, K]
        for k in rng.integers(n_factors, size=n):
            batch = codes[index.same_value(k, batch_size, rng)][:, active] / scale[active]
            counts[active[np.argmin(batch.var(axis=0))], k] += 1
        return counts

    train, held_out = votes(n_train), votes(n_eval)
    assignment = train.argmax(axis=1)  # [D]
    return float(held_out[np.arange(codes.shape[1]), assignment].sum() / n_eval)


def _discretised(codes: np.ndarray, bins: int = MIG_BINS) -> np.ndarray:
    """Each code dimension cut into ``bins`` equal-width bins [N, D] (integers)."""
    out = np.empty(codes.shape, dtype=np.int64)
    for d in range(codes.shape[1]):
        edges = np.histogram(codes[:, d], bins)[1]
        out[:, d] = np.digitize(codes[:, d], edges[:-1])
    return out


def mutual_information_matrix(codes: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """I(code dimension d; factor k) in nats [D, K], the codes discretised into MIG_BINS bins."""
    from sklearn.metrics import mutual_info_score

    binned = _discretised(codes)
    return np.array([[mutual_info_score(factors[:, k], binned[:, d]) for k in range(factors.shape[1])]
                     for d in range(codes.shape[1])])


def mig(codes: np.ndarray, factors: np.ndarray, rng: np.random.Generator, n_points: int = 10_000) -> float:
    """Chen et al.'s mutual information gap, averaged over factors.

    For each factor: (I(top dimension; factor) − I(second; factor)) / H(factor).
    """
    from sklearn.metrics import mutual_info_score

    codes, factors = _check(codes, factors)
    if codes.shape[1] < 2:
        raise ValueError("the mutual information gap needs at least two code dimensions")
    points = rng.choice(codes.shape[0], size=min(n_points, codes.shape[0]), replace=False)
    codes, factors = codes[points], factors[points]
    information = np.sort(mutual_information_matrix(codes, factors), axis=0)[::-1]  # [D, K], largest first
    entropy = np.array([mutual_info_score(factors[:, k], factors[:, k]) for k in range(factors.shape[1])])
    return float(np.mean((information[0] - information[1]) / entropy))


@dataclass(frozen=True)
class DCI:
    """Eastwood & Williams' three numbers, and the importance matrix R [D, K] they come from."""

    disentanglement: float
    completeness: float
    informativeness: float  # the predictors' mean test accuracy
    importance: np.ndarray


def _one_minus_entropy(weights: np.ndarray, base: int) -> np.ndarray:
    """1 − H(p) in the given base for each column of weights (normalised to p) [columns]."""
    from scipy.stats import entropy

    return 1.0 - entropy(weights + 1e-11, base=base)


def _forest(seed: int):
    from sklearn.ensemble import RandomForestClassifier

    # every dimension considered at every split: with a random subset of them (the default), a tree must
    # split on an uninformative dimension when the informative one is not drawn, and its importance
    # spreads over dimensions the factor does not need
    return RandomForestClassifier(n_estimators=50, min_samples_leaf=5, max_features=None, random_state=seed)


def _boosted_trees(seed: int):
    from sklearn.ensemble import GradientBoostingClassifier

    return GradientBoostingClassifier(random_state=seed)


# DCI's predictor of each factor, by name: one whose feature importances say which dimensions it used
DCI_PREDICTORS = {"forest": _forest, "boosted-trees": _boosted_trees}


def dci(codes: np.ndarray, factors: np.ndarray, rng: np.random.Generator,
        n_train: int = 10_000, n_test: int = 5_000, predictor: str = "forest") -> DCI:
    """Disentanglement, completeness and informativeness from one tree ensemble per factor.

    R[d, k] is the importance of dimension d in the trees predicting factor k.
    Disentanglement: 1 − H_K(R[d, :]) per dimension, weighted by each
    dimension's share of all importance; completeness: 1 − H_D(R[:, k]) per
    factor, weighted by each factor's share.  ``predictor``: ``forest``, a
    random forest (Eastwood & Williams' own choice; 50 trees, leaves of 5
    examples or more, every dimension a candidate at every split), or ``boosted-trees``, scikit-learn's
    GradientBoostingClassifier as Locatello et al. used — closer to their
    numbers, but one tree per class and stage makes it slow: minutes per
    factor with dSprites' 40 rotations on two cores.
    """
    codes, factors = _check(codes, factors)
    train, test = _split(codes.shape[0], n_train, n_test, rng)
    n_dims, n_factors = codes.shape[1], factors.shape[1]
    importance = np.zeros((n_dims, n_factors))
    accuracy = []
    for k in range(n_factors):
        trees = DCI_PREDICTORS[predictor](int(rng.integers(2**31)))
        trees.fit(codes[train], factors[train, k])
        importance[:, k] = np.abs(trees.feature_importances_)
        accuracy.append(trees.score(codes[test], factors[test, k]))
    total = importance.sum()
    if total == 0:
        return DCI(0.0, 0.0, float(np.mean(accuracy)), importance)
    disentanglement = float(np.sum(_one_minus_entropy(importance.T, n_factors) * importance.sum(axis=1) / total))
    completeness = float(np.sum(_one_minus_entropy(importance, n_dims) * importance.sum(axis=0) / total))
    return DCI(disentanglement, completeness, float(np.mean(accuracy)), importance)


def sap(codes: np.ndarray, factors: np.ndarray, rng: np.random.Generator,
        n_train: int = 10_000, n_test: int = 5_000) -> float:
    """Kumar et al.'s separated attribute predictability, averaged over factors.

    S[d, k] is the test accuracy of a linear classifier (a linear SVM,
    C = 0.01, balanced classes, as in disentanglement_lib, on the standardised
    dimension) predicting factor k from dimension d alone; for each factor,
    the gap between its best and second-best dimension.
    """
    from sklearn.svm import LinearSVC

    codes, factors = _check(codes, factors)
    codes = _standardised(codes)
    if codes.shape[1] < 2:
        raise ValueError("the separated attribute predictability needs at least two code dimensions")
    train, test = _split(codes.shape[0], n_train, n_test, rng)
    score = np.zeros((codes.shape[1], factors.shape[1]))
    for d in range(codes.shape[1]):
        for k in range(factors.shape[1]):
            classifier = LinearSVC(C=0.01, class_weight="balanced")
            classifier.fit(codes[train, d:d + 1], factors[train, k])
            score[d, k] = classifier.score(codes[test, d:d + 1], factors[test, k])
    ranked = np.sort(score, axis=0)[::-1]
    return float(np.mean(ranked[0] - ranked[1]))


def disentanglement_metrics(codes: np.ndarray, factors: np.ndarray, seed: int = 0, n_points: int = 10_000,
                            n_test: int = 5_000, dci_predictor: str = "forest") -> dict[str, float]:
    """Every score above for one representation, as eval.json keys, from one seed."""
    rng = np.random.default_rng(seed)
    scores = dci(codes, factors, rng, n_train=n_points, n_test=n_test, predictor=dci_predictor)
    return {
        "beta_vae_score": beta_vae_score(codes, factors, rng, n_train=n_points, n_eval=n_test),
        "factor_vae_score": factor_vae_score(codes, factors, rng, n_train=n_points, n_eval=n_test),
        "mig": mig(codes, factors, rng, n_points=n_points),
        "dci_disentanglement": scores.disentanglement,
        "dci_completeness": scores.completeness,
        "dci_informativeness": scores.informativeness,
        "sap": sap(codes, factors, rng, n_train=n_points, n_test=n_test),
    }
