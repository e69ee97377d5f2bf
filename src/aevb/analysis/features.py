"""The feature space in which sample quality is measured, available offline.

Fréchet distance, KID and precision / recall (:mod:`aevb.analysis.quality`)
compare two sets of examples through a network's features.  The usual one,
Inception-v3 trained on ImageNet, has to be downloaded and knows nothing of
8×8 digits or of rows of a table; here the default is a small classifier that
aevb trains on the run's own labelled training split:

    features = classifier_features(train_x, train_y, test_x, test_y)   # trained once, then cached
    features.accuracy          # its test accuracy: the features are only as good as it is
    features(x)                # [N, F] float64: the layer before its logits, for x [N, *data_shape]

or a user's network (``--features my_pkg.mod:build``: ``build(data_shape)``
returns a module from x [B, *data_shape] to [B, F]), :func:`user_features`.

The classifier is a small conv net for images [C, H, W] and an MLP for rows
[D], trained for a fixed number of Adam steps from a seed (the same weights
for the same data and options), and cached under ``CACHE_DIR/classifiers/KEY``
(``~/.cache/aevb``: :data:`aevb.data.sources.CACHE_DIR`) where KEY hashes the
examples, their labels and the options: a second evaluation of any run on the
same data reuses it, and nothing is written anywhere else.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from aevb.data import sources
from aevb.errors import UserError
from aevb.io import loads_json, write_json, write_safetensors
from aevb.registry import import_object

FEATURES_VERSION = 1  # bump when the network or its training changes: older cache entries are then not reused


@dataclass(frozen=True)
class ClassifierOptions:
    """How the feature classifier is built and trained (all part of its cache key)."""

    width: int = 32  # channels of the first convolution (rows: half the first hidden layer)
    features: int = 64  # F, the size of the feature layer
    steps: int = 800  # Adam steps of ``batch_size`` examples
    batch_size: int = 64
    learning_rate: float = 1e-3
    seed: int = 0


class Classifier(nn.Module):
    """x [B, *data_shape] → logits [B, classes]; :meth:`features` is the layer before them, [B, F].

    Images [C, H, W]: three 3×3 convolutions (the last two of stride 2), an
    average pool to 2×2, a linear layer to F.  Rows [D]: two linear layers.
    (Pooled to 4×4 it reached 0.966 on the MNIST split against 0.957, but put
    a digits VAE's prior samples further than uniform noise by KID.)
    """

    def __init__(self, data_shape: tuple[int, ...], classes: int, options: ClassifierOptions):
        super().__init__()
        w, f = options.width, options.features
        if len(data_shape) == 3:
            self.body = nn.Sequential(
                nn.Conv2d(data_shape[0], w, 3, padding=1), nn.ReLU(),
                nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(2), nn.Flatten(),  # [B, 2w·4] whatever the image size
                nn.Linear(8 * w, f), nn.ReLU(),
            )
        else:
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(data_shape), 4 * w), nn.ReLU(),
                                      nn.Linear(4 * w, f), nn.ReLU())
        self.head = nn.Linear(f, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # [B, F]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))  # [B, classes]


@dataclass
class FeatureNetwork:
    """A network from x [B, *data_shape] to features [B, F], what it is, and how good a classifier it is."""

    network: nn.Module
    description: str
    accuracy: float | None = None  # the classifier's test accuracy; None for a user's network
    device: torch.device | str = "cpu"  # where the network runs

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Features [N, F] (float64, on the CPU) of x [N, *data_shape]."""
        self.network.eval()
        parts = [self.network(x[start:start + batch_size].to(self.device)).double().cpu()
                 for start in range(0, x.shape[0], batch_size)]
        return torch.cat(parts)

    def summary(self) -> dict:
        """What eval.json says of the features."""
        return {"features": self.description, "classifier_accuracy": self.accuracy}


class _FeatureLayer(nn.Module):
    """A classifier seen as its feature layer (what :class:`FeatureNetwork` calls)."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)


def fingerprint(*tensors: torch.Tensor) -> str:
    """A SHA-256 of the tensors' shapes and values: the same examples and labels, the same fingerprint."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{tuple(t.shape)} {t.dtype};".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def cache_folder() -> Path:
    """Where trained feature classifiers are kept: ``CACHE_DIR/classifiers`` (read when called, so tests move it)."""
    return sources.CACHE_DIR.expanduser() / "classifiers"


def train_classifier(train_x: torch.Tensor, train_y: torch.Tensor, classes: int,
                     options: ClassifierOptions = ClassifierOptions(), device: torch.device | str = "cpu") -> Classifier:
    """A :class:`Classifier` trained on x [N, *data_shape] with labels [N] in 0 … classes − 1.

    Deterministic for a seed on one device: the initial weights and the order
    of the examples come from ``options.seed`` alone.
    """
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(options.seed)
        classifier = Classifier(tuple(train_x.shape[1:]), classes, options).to(device)
    generator = torch.Generator().manual_seed(options.seed)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=options.learning_rate)
    classifier.train()
    n = train_x.shape[0]
    order = torch.randperm(n, generator=generator)
    position = 0
    for _ in range(options.steps):
        if position + options.batch_size > n:  # a new epoch: a new order
            order, position = torch.randperm(n, generator=generator), 0
        rows = order[position:position + options.batch_size]
        position += options.batch_size
        loss = nn.functional.cross_entropy(classifier(train_x[rows].to(device)), train_y[rows].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    classifier.eval()
    return classifier


@torch.no_grad()
def accuracy(classifier: Classifier, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """The fraction of x [N, ...] whose most probable class is its label y [N]."""
    device = next(classifier.parameters()).device
    correct = sum(int((classifier(x[s:s + batch_size].to(device)).argmax(1).cpu() == y[s:s + batch_size]).sum())
                  for s in range(0, x.shape[0], batch_size))
    return correct / x.shape[0]


def classifier_features(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                        options: ClassifierOptions = ClassifierOptions(), device: torch.device | str = "cpu",
                        echo=None) -> FeatureNetwork:
    """The feature layer of a classifier trained on (train_x [N, ...], train_y [N]), its accuracy on the test split.

    Trained once for these examples, labels and options, then read from
    :func:`cache_folder` (weights in safetensors, what they are in JSON).
    """
    train_y, test_y = train_y.reshape(-1).long(), test_y.reshape(-1).long()
    if train_y.min() < 0:
        raise UserError("the feature classifier needs labels 0, 1, 2 …; the training split has negative labels")
    classes = int(max(train_y.max(), test_y.max())) + 1
    key_text = json.dumps({"version": FEATURES_VERSION, "options": asdict(options),
                           "data": fingerprint(train_x, train_y, test_x, test_y)}, sort_keys=True)
    folder = cache_folder() / hashlib.sha256(key_text.encode()).hexdigest()[:24]
    data_shape = tuple(train_x.shape[1:])
    classifier = _cached(folder, data_shape, classes, options)
    if classifier is None:
        if echo is not None:
            echo(f"training the feature classifier on {train_x.shape[0]} labelled training examples "
                 f"({options.steps} steps; cached in {folder})")
        classifier = train_classifier(train_x, train_y, classes, options, device)
        test_accuracy = accuracy(classifier, test_x, test_y)
        _keep(folder, classifier, {"version": FEATURES_VERSION, "options": asdict(options),
                                   "data_shape": list(data_shape), "classes": classes, "test_accuracy": test_accuracy})
    else:
        classifier.to(device)
        test_accuracy = loads_json((folder / "classifier.json").read_bytes())["test_accuracy"]
    kind = "conv net" if len(data_shape) == 3 else "MLP"
    return FeatureNetwork(_FeatureLayer(classifier), f"classifier ({kind} trained on the training split, "
                                                     f"{options.features} features)", float(test_accuracy),
                          device)


def _keep(folder: Path, classifier: Classifier, description: dict) -> None:
    """Write the classifier into its cache folder; a cache that cannot be written costs a retraining next time,
    not this evaluation (a warning says so)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(folder / "weights.safetensors", classifier.state_dict())
        write_json(folder / "classifier.json", description)  # written last: an entry with it is whole
    except (OSError, UserError) as e:
        warnings.warn(f"the feature classifier could not be cached ({e}); it will be trained again next time",
                      stacklevel=3)


def _cached(folder: Path, data_shape: tuple[int, ...], classes: int, options: ClassifierOptions) -> Classifier | None:
    """The classifier kept in ``folder``, or None where it is absent, incomplete or unreadable (it is retrained)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        described = loads_json((folder / "classifier.json").read_bytes())
        state = load_file(folder / "weights.safetensors")
        with torch.random.fork_rng(devices=[]):  # its initial weights, replaced at once, draw no caller's numbers
            classifier = Classifier(data_shape, classes, options)
        if described.get("classes") != classes or not isinstance(described.get("test_accuracy"), float):
            return None
        classifier.load_state_dict(state)
    except (OSError, ValueError, RuntimeError, SafetensorError):  # absent, bad JSON, sizes that do not match
        return None
    return classifier.eval()


def user_features(path: str, data_shape: tuple[int, ...], device: torch.device | str = "cpu") -> FeatureNetwork:
    """A user's feature network: ``path`` (``package.module:build``) names ``build(data_shape)`` returning a module
    from x [B, *data_shape] to features [B, F]; checked on a batch of two."""
    build = import_object(path, "feature network")
    if not callable(build):
        raise UserError(f"the feature network {path!r} is a {type(build).__name__}; name a function build(data_shape) "
                        f"that returns a torch.nn.Module")
    network = build(tuple(data_shape))
    if not isinstance(network, nn.Module):
        raise UserError(f"the feature network {path!r} returned {type(network).__name__}; build(data_shape) must "
                        f"return a torch.nn.Module from x [B, {', '.join(map(str, data_shape))}] to features [B, F]")
    network = network.to(device).eval()
    with torch.no_grad():
        try:
            out = network(torch.zeros(2, *data_shape, device=device))
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            raise UserError(f"the feature network {path!r} fails on a batch [2, {', '.join(map(str, data_shape))}] "
                            f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"the feature network {path!r} returns {got} for a batch of 2; it must return features [B, F]")
    return FeatureNetwork(network, f"{path} ({out.shape[1]} features)", device=device)
