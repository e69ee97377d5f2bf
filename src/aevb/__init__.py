"""aevb: autoencoders and variational autoencoders as probability models.

Every model is a prior p(z), an encoder returning the approximate posterior
q(z|x) and a decoder returning the likelihood p(x|z); every loss and metric is
a log-probability in nats computed from those distributions.

The public names are imported lazily so that ``aevb --help`` does not pay for
importing torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "AE": "aevb.model.autoencoders",
    "VAE": "aevb.model.vae",
    "IWAE": "aevb.model.vae",
    "DenoisingAE": "aevb.model.autoencoders",
    "SparseAE": "aevb.model.autoencoders",
    "ContractiveAE": "aevb.model.autoencoders",
    "HVAE": "aevb.model.hierarchical",
    "Model": "aevb.model.base",
    "LossOutput": "aevb.model.base",
    "build_model": "aevb.model.base",
    "load": "aevb.model.saved",
    "elbo": "aevb.model.objectives",
    "iwae_bound": "aevb.model.objectives",
    "log_likelihood": "aevb.model.objectives",
    "load_data": "aevb.data.datasets",
    "Dataset": "aevb.data.datasets",
    "train": "aevb.training.loop",
    "evaluate": "aevb.analysis.evaluation",
    "evaluate_run": "aevb.analysis.evaluation",
    "UserError": "aevb.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'aevb' has no attribute {name!r}")


def __dir__():
    return __all__
