"""The probability model: likelihoods, posteriors, priors, networks and their layers, objectives, models.

Owns the maths: a model is a prior p(z), an encoder returning q(z|x) and a
decoder returning p(x|z), all ``torch.distributions``; every loss and metric
is a log-probability computed from them (:mod:`aevb.model.objectives`).

May import: torch, numpy, safetensors, and aevb's base modules (``errors``,
``io``, ``registry``, ``options``, ``config``).  Never the data, training, analysis,
acceleration or CLI layers (checked by import-linter, ``pyproject.toml``).
"""
