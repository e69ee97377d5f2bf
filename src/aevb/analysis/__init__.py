"""Analysis: evaluation metrics, figures and the report of a trained model.

Owns what is measured and drawn once a model exists: the test ELBO and
importance-sampled log-likelihood, posterior diagnostics, the quality of a
model's samples in an offline feature space (``quality``, ``features``),
every figure (a registry the report iterates) and the self-contained
``report.html``.

May import: the model and data layers, the run folder (:mod:`aevb.run`),
acceleration (the importance sampler's precision) and aevb's base modules.
Needs a model, not a trainer: never the training loop or the CLI.
"""
