"""Sampling: where the codes z that a decoder turns into samples come from.

Owns the samplers of the latent space (a registry, :data:`aevb.registry.SAMPLERS`):
the model's own prior, and densities fitted after training to the codes of
the training split (a Gaussian mixture, a normalising flow), which let every
model sample, the plain autoencoder included, and let a VAE sample where its
decoder was trained (the aggregate posterior) rather than where the prior
puts mass.  A fitted sampler is kept in the run folder
(``RUN/samplers/NAME.safetensors`` and ``NAME.json``, :mod:`aevb.sampling.fitted`),
tied to the weights it was fitted to, and :func:`aevb.sampling.fitted.draw`
is the one way the command line, the figures and the metrics draw samples.

May import: the run folder (:mod:`aevb.run`), the model and data layers and
aevb's base modules.  Never analysis, training, acceleration or the CLI.
"""
