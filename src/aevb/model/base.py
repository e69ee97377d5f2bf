"""Autoencoders as probability models: prior p(z), encoder → q(z|x), decoder → p(x|z).

A model is composed of four registered parts — a network body (``arch``), a
likelihood family, a posterior family and the standard normal prior — and
differs from the others only in its training objective (:meth:`Model.loss`):

* ``AE``   point-mass posterior, loss = −log p(x|z = f(x)) (no KL, no likelihood);
* ``VAE``  Gaussian posterior, loss = −E_q[log p(x|z)] + β·KL, with L samples
  (β = 1 is Kingma & Welling 2014, β > 1 the β-VAE of Higgins et al. 2017);
* ``IWAE`` Gaussian posterior, loss = −log (1/k) Σ w_i (Burda et al. 2016);
* ``DenoisingAE``, ``SparseAE``, ``ContractiveAE``: the AE with a corrupted
  input or a penalty on the code (:meth:`AE.corrupt`, :meth:`AE.penalties`);
* ``HVAE`` (in :mod:`aevb.hierarchical`): L stochastic layers, top-down inference.

Models with a KL take a registered prior (``prior="standard"|"mog"|"vamp"``,
:mod:`aevb.priors`).  Each model declares its own options once, in ``options``
(:class:`aevb.options.Option`: name, default, help, rule): its constructor takes
them as arguments of the same names and checks them with
:meth:`Model.check_options`, and ``aevb train`` takes them as flags.

The data path itself lives in :mod:`aevb.objectives`.  Saved models are a
folder with ``config.json`` (the constructor's arguments) and
``weights.safetensors``; :func:`load` rebuilds the model from the registry.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from torch import nn
from torch.distributions import Distribution, Independent


from aevb.model import conditioning, objectives
from aevb.config import LAYER_SIZES, RUN_OPTIONS
from aevb.errors import UserError
from aevb.io import write_json, write_safetensors
from aevb.model.layers import cast
from aevb.model.networks import built_networks, check_network
from aevb.model.precision import at_least_float32
from aevb.model.priors import build_prior
from aevb.options import Option, as_argument
from aevb.registry import LIKELIHOODS, MODELS, POSTERIORS, is_import_path

FORMAT = "aevb-model"
FORMAT_VERSION = 1


@dataclass
class LossOutput:
    """What :meth:`Model.loss` returns, whatever the model (scalars, nats per example).

    ``loss`` is what training minimises (with gradient); the other fields are
    detached diagnostics: the reconstruction term −E_q[log p(x|z)], the KL
    term KL(q ‖ p) (0 for the AE), and the mean over batch and latent
    dimensions of the posterior mean μ and standard deviation σ.

    ``extras`` holds a model's own detached scalar diagnostics, logged after
    the fixed fields under their names: the KL with free bits as trained
    (``kl_free_bits``), a penalty before its weight (``sparsity``,
    ``contractive``), the KL of each layer of a hierarchical VAE.  A model
    returns the same keys at every step.
    """

    loss: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def as_tensor(self) -> torch.Tensor:
        """[5 + extras] float32: loss, reconstruction, kl, mu, sigma, *extras (one copy, no host sync)."""
        values = (self.loss.detach(), self.reconstruction, self.kl, self.mu, self.sigma, *self.extras.values())
        return torch.stack([cast(v, torch.float32) for v in values])  # no dispatched no-op casts

    def names(self) -> tuple[str, ...]:
        """The names of :meth:`as_tensor`'s entries."""
        return (*self.FIELDS, *self.extras)

    FIELDS: ClassVar[tuple[str, ...]] = ("loss", "reconstruction", "kl", "mu", "sigma")


class Model(nn.Module):
    """The parts every model shares.  Subclasses define ``loss`` and their extra arguments.

    Args:
        data_shape: shape of one example, e.g. (1, 28, 28) or (D,) for tabular rows.
        latent_dim: dimension D of z.
        arch: network body, a name in ``aevb.registry.NETWORKS`` (linear, mlp, conv) or the import path of a
            function like theirs (``"my_package.nets:build"``, see :mod:`aevb.model.networks`), which
            ``config.json`` records so that :func:`load` and every command rebuild it by importing it.
        likelihood: family of p(x|z), a name in ``LIKELIHOODS``.
        hidden: hidden layer sizes of the network (its default when None).
        likelihood_args: extra arguments of the likelihood (``{"scale": 0.1}``).
        posterior_args: extra arguments of the posterior (``{"scale_param": "log-scale"}``).
        encoder, decoder: networks of your own instead of ``arch``'s: the encoder maps x [B, *data_shape]
            to the posterior's parameters [B, k·latent_dim], the decoder z [B, latent_dim] to the
            likelihood's [B, k·C, *data_shape[1:]] (k: :attr:`encoder_outputs`, :attr:`decoder_shape`).
            Their output shapes are checked here, on a batch of two.  Such a model saves its weights, and
            ``aevb.load(path, encoder=…, decoder=…)`` loads them into the same networks; an import path
            as ``arch`` needs neither.
        n_classes: K, for a conditional model (a model that declares :attr:`takes_labels`): the class label
            y ∈ {0 … K−1} enters the encoder, q(z|x, y), and the decoder, p(x|z, y), by composition
            (:mod:`aevb.model.conditioning`): the networks are built for x with K more channels (features) and z
            with K more dimensions (your own ``encoder=`` and ``decoder=`` then take those shapes), and every
            method that runs one takes ``label=`` [B].  None: unconditional.
    """

    posterior_family: ClassVar[str] = "gaussian"
    name: ClassVar[str]
    has_kl: ClassVar[bool] = True  # a KL term that β, its schedules and free bits weigh
    # the loss couples the examples of a batch (a penalty on the batch's aggregate posterior): a batch split
    # over processes would give another loss, so such a model trains on one
    batch_coupled: ClassVar[bool] = False
    # the loss needs the number of training examples (β-TCVAE's estimator): the trainer passes dataset_size=
    needs_dataset_size: ClassVar[bool] = False
    takes_labels: ClassVar[bool] = False  # can be conditional: n_classes= (the label enters encoder and decoder)
    # where ``aevb sample`` draws codes from unless told (a name in SAMPLERS): the prior the model was trained
    # with, or a density fitted to its codes after training where that prior gives no useful samples
    default_sampler: ClassVar[str] = "prior"
    # the model's own options: constructor arguments of the same names, and flags of aevb train; declared
    # as literal Option(...) calls (or constants of them) so that --help reads them without importing torch
    options: ClassVar[tuple[Option, ...]] = ()

    @classmethod
    def run_kwargs(cls, config) -> dict[str, Any]:
        """Constructor arguments taken from a :class:`aevb.config.RunConfig`: the values of :attr:`options`."""
        return {option.name: getattr(config, option.name) for option in cls.options}

    @classmethod
    def check_options(cls, values: dict[str, Any], spelled: Callable[[str], str] = as_argument) -> dict[str, Any]:
        """``values`` of some of this model's options, each checked by its Option (whole numbers made int,
        numbers float), then with one another; a UserError names an option as ``spelled`` says
        (:func:`~aevb.options.as_argument`: ``noise_level``; :func:`~aevb.options.as_flag`: ``--noise-level``).

        A model whose options constrain one another extends this, so that its
        constructor and ``aevb train`` refuse the same values with one rule.
        """
        declared = {option.name: option for option in cls.options}
        return {name: declared[name].check(value, spelled(name)) for name, value in values.items()}

    def __init_subclass__(cls, **kwargs: Any):
        """Give a subclass's ``__init__(self, *args, its_own=…, **kwargs)`` the signature it really takes (for
        ``help``, ``inspect.signature`` and editors): its base's parameters, then its own."""
        super().__init_subclass__(**kwargs)
        if "__init__" in vars(cls):
            cls.__init__.__signature__ = _constructor_signature(cls)

    def __init__(self, data_shape: Sequence[int], latent_dim: int = 20, arch: str = "mlp",
                 likelihood: str = "bernoulli", hidden: Sequence[int] | None = None,
                 likelihood_args: dict[str, Any] | None = None, posterior_args: dict[str, Any] | None = None, *,
                 encoder: nn.Module | None = None, decoder: nn.Module | None = None, n_classes: int | None = None):
        """Build the model from the arguments its class's docstring lists (checked here: a UserError names a bad one)."""
        super().__init__()
        if n_classes is not None:
            if not self.takes_labels:
                raise UserError(f"model {self.name!r} cannot be conditional (n_classes, --conditional); the models "
                                f"that can: {', '.join(n for n, c in MODELS.items() if c.takes_labels)}")
            n_classes = conditioning.check_classes(n_classes)
        self.n_classes = n_classes
        latent_dim, hidden = RUN_OPTIONS["latent_dim"].check(latent_dim), _sizes(hidden)
        likelihood_args, posterior_args = plain(likelihood_args or {}), plain(posterior_args or {})
        self.data_shape = tuple(_size(n, "data_shape") for n in data_shape)
        self.latent_dim = latent_dim
        try:
            self.likelihood = LIKELIHOODS.get(likelihood)(**likelihood_args)
        except (TypeError, ValueError) as e:
            raise UserError(f"bad likelihood_args for {likelihood!r}: {e}") from None
        try:
            posterior_class = POSTERIORS.get(self.posterior_family)
            sized = {"latent_dim": latent_dim} if posterior_class.sized else {}
            self.posterior = posterior_class(**sized, **posterior_args)
        except (TypeError, ValueError) as e:
            raise UserError(f"bad posterior_args for the {self.posterior_family!r} posterior: {e}") from None
        if (encoder is None) != (decoder is None):
            raise UserError("pass both encoder= and decoder= (networks of your own), or neither and arch=")
        if encoder is not None:
            if arch not in ("mlp", None) or hidden is not None:  # "mlp": the default; None: as saved with such networks
                raise UserError(f"encoder= and decoder= replace arch= and hidden=; drop arch={arch!r}"
                                f"{f' and hidden={hidden}' if hidden is not None else ''}")
            arch, names = None, ("your encoder", "your decoder")
        else:
            if arch is None:
                raise UserError("arch=None stands for networks of your own: pass encoder= and decoder=")
            encoder, decoder = built_networks(arch, self.encoder_input_shape, self.decoder_input_dim,
                                               self.encoder_outputs, self.decoder_shape[0], hidden)
            names = (f"the encoder of {arch}", f"the decoder of {arch}") if is_import_path(arch) else None
        if names is not None:  # a registered network is tested for every data shape; another is checked here
            check_network(encoder, names[0], self.encoder_input_shape, (self.encoder_outputs,),
                          f"{self.posterior.params_per_latent} parameter(s) of the {self.posterior_family} posterior "
                          f"for each of the {self.latent_dim} latent dimensions")
            check_network(decoder, names[1], (self.decoder_input_dim,), self.decoder_shape,
                          f"{self.likelihood.params_per_channel} parameter(s) of the {likelihood} likelihood for each "
                          f"value of an example of shape {list(self.data_shape)}")
            if next(decoder.parameters(), None) is None:
                raise UserError(f"{names[1]} has no parameters: the model learns its likelihood through them")
        self.encoder, self.decoder = encoder, decoder
        self.config: dict[str, Any] = {
            "data_shape": list(self.data_shape),
            "latent_dim": self.latent_dim,
            "arch": arch,  # None: networks given as modules, which load() takes again
            "likelihood": likelihood,
            "hidden": hidden,
            "likelihood_args": {**self.likelihood.extra_config(), **likelihood_args},
            "posterior_args": self.posterior.extra_config(),
        }
        if self.n_classes is not None:  # only then, so configs of unconditional models stay as they were
            self.config["n_classes"] = self.n_classes
        self.prior_module = build_prior("standard", self.latent_dim, self.data_shape)

    @property
    def encoder_outputs(self) -> int:
        """How many values the encoder returns per example: the posterior's parameters, k·latent_dim."""
        return self.posterior.params_per_latent * self.latent_dim

    @property
    def conditional(self) -> bool:
        """Whether the model takes a class label (``n_classes`` set): q(z|x, y) and p(x|z, y)."""
        return self.n_classes is not None

    @property
    def encoder_input_shape(self) -> tuple[int, ...]:
        """The shape of one example as the encoder network takes it: data_shape, with K label channels (features)
        more for a conditional model."""
        if self.n_classes is None:
            return self.data_shape
        return conditioning.encoder_input_shape(self.data_shape, self.n_classes)

    @property
    def decoder_input_dim(self) -> int:
        """The size of the code as the decoder network takes it: latent_dim, + K for a conditional model."""
        return self.latent_dim + (self.n_classes or 0)

    @property
    def decoder_shape(self) -> tuple[int, ...]:
        """The shape of the decoder's output per example: the likelihood's parameters [k·C, *data_shape[1:]]."""
        return (self.likelihood.params_per_channel * self.data_shape[0], *self.data_shape[1:])

    def _set_prior(self, prior: str, prior_args: dict[str, Any] | None) -> None:
        """Use the registered prior ``prior`` and store it in the config (models with a KL)."""
        prior_args = plain(prior_args or {})
        self.prior_module = build_prior(prior, self.latent_dim, self.data_shape, prior_args)
        if self.conditional and self.prior_module.encodes:
            raise UserError(f"the {prior!r} prior runs the encoder on inputs of its own, which have no label, so it "
                            f"cannot be the prior p(z) of a conditional model; use --prior standard or mog")
        self.config.update(prior=prior, prior_args={**self.prior_module.extra_config(), **prior_args})

    # -- the three distributions -------------------------------------------

    def _first_weight(self) -> torch.Tensor:
        """The decoder's first parameter, looked up where it lives, so that every way of replacing it counts.

        Read three times a step (encode, decode, the prior); next(parameters())
        walks every module (about 10 µs), this one getattr per level.
        """
        location = self.__dict__.get("_first_weight_at")
        if location is None:
            name = next(name for name, _ in self.decoder.named_parameters())
            location = self.__dict__["_first_weight_at"] = name.rpartition(".")  # ("0", ".", "weight")
        owner, _, attr = location
        return getattr(self.decoder.get_submodule(owner), attr)

    @property
    def _dtype(self) -> torch.dtype:
        return self._first_weight().dtype

    @property
    def device(self) -> torch.device:
        """The device of the model's weights (where its inputs go)."""
        return self._first_weight().device

    def _run(self, network: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """``network(inputs)`` in the weights' dtype, returned in at least float32 and contiguous.

        The one boundary between the networks and the distributions: under
        :func:`aevb.precision.matmul_dtype` the layers pass bf16 (and, for
        convolutions on the CPU, channels-last) activations between themselves.
        """
        return at_least_float32(network(inputs.to(self._dtype))).contiguous()

    def _check_input(self, x: torch.Tensor) -> None:
        if not x.is_floating_point():
            raise UserError(f"input of dtype {x.dtype}: the model takes floating-point values (pixels scaled to "
                            f"[0, 1]); convert with x.float() / 255 for 8-bit images")
        if tuple(x.shape[1:]) != self.data_shape:
            raise UserError(
                f"input of shape {tuple(x.shape)} does not fit this model, which expects "
                f"[batch, {', '.join(map(str, self.data_shape))}]; resize the data to the model's "
                f"data shape or train a model for this data"
            )

    def prior(self) -> Distribution:
        """p(z), event shape [D], on the model's device (N(0, I) in float32 unless ``prior`` says otherwise)."""
        return self.prior_module(self)

    def _one_hot(self, label: Any, batch: int) -> torch.Tensor | None:
        """The one-hot label [batch, K] of a conditional model (None for another); a UserError where the label is
        missing, given to an unconditional model, or does not fit."""
        if self.n_classes is None:
            if label is not None:
                raise UserError(f"this {self.name} is not conditional: it takes no label; drop label= (or train with "
                                f"--conditional)")
            return None
        if label is None:
            raise UserError(f"this {self.name} is conditional on a class label: pass label= (class indices [B] in "
                            f"[0, {self.n_classes}), or one int)")
        label = conditioning.checked_label(label, self.n_classes, batch, self.device)
        return conditioning.one_hot(label, self.n_classes, self._dtype)

    def encode(self, x: torch.Tensor, label: Any = None) -> Distribution:
        """q(z|x) for x [B, *data_shape] (q(z|x, y) with ``label`` [B] for a conditional model): batch shape [B],
        event shape [D], at least float32."""
        return self.posterior(self._run(self.encoder, self._encoder_inputs(x, label)))  # from [B, k·D]

    def _encoder_inputs(self, x: torch.Tensor, label: Any) -> torch.Tensor:
        """x [B, *data_shape], checked, as the encoder network takes it: with the one-hot label appended
        ([B, C + K, ...] or [B, D + K]) for a conditional model."""
        self._check_input(x)
        y = self._one_hot(label, x.shape[0])  # [B, K] or None
        return x if y is None else conditioning.with_label(x.to(self._dtype), y)

    def decode(self, z: torch.Tensor, label: Any = None) -> Distribution:
        """p(x|z) for z [*S, B, D] (p(x|z, y) with ``label`` [B] for a conditional model): batch shape [*S, B],
        event shape data_shape, at least float32."""
        if z.ndim < 2 or z.shape[-1] != self.latent_dim:
            raise UserError(f"z of shape {tuple(z.shape)} does not fit this model, which decodes "
                            f"[*samples, batch, {self.latent_dim}]")
        batch_shape = z.shape[:-1]
        y = self._one_hot(label, z.shape[-2])  # [B, K] or None
        inputs = z if y is None else conditioning.with_label_code(z, y)  # [*S, B, D (+K)]
        params = self._run(self.decoder, inputs.reshape(-1, self.decoder_input_dim))  # [N, k·C, ...]
        return self.likelihood(params.reshape(*batch_shape, *params.shape[1:]), len(self.data_shape))

    @torch.no_grad()
    def init_output_bias(self, mean: torch.Tensor) -> bool:
        """Start p(x|z) at the data's average: set the decoder's last bias from the mean example [*data_shape].

        A fresh decoder outputs values near 0 whatever z is (grey images for a
        Bernoulli); the first epoch then goes on learning the average image.
        Setting the last bias to the likelihood's parameters for the mean of x
        (per value for an MLP, per channel for a convolution) starts from it.
        Returns False, changing nothing, where the likelihood has no inverse of
        its mean or the decoder's last layer has no bias of a matching size.
        """
        params = self.likelihood.params_for_mean(mean)  # [k·C, *spatial] or None
        biased = [m for m in self.decoder.modules() if isinstance(getattr(m, "bias", None), torch.Tensor)]
        if params is None or not biased:
            return False
        bias = biased[-1].bias
        if bias.numel() == params.numel():
            bias.copy_(params.reshape(bias.shape))
        elif bias.numel() == params.shape[0]:
            bias.copy_(params.reshape(params.shape[0], -1).mean(1))
        else:
            return False
        return True

    # -- objectives -----------------------------------------------------------

    def forward(self, x: torch.Tensor) -> LossOutput:
        """:meth:`loss` of a batch x [B, *data_shape]: ``model(x)`` is the ordinary PyTorch call (forward hooks,
        DistributedDataParallel, Lightning).  It takes the batch only: a loop that changes β as it goes (a
        warm-up schedule) passes it to :meth:`loss`, so no trainer's state enters the model.  A conditional
        model's batch has labels too: call ``loss(x, label=y)``."""
        return self.loss(x)

    def loss(self, x: torch.Tensor, beta: float | None = None, label: Any = None) -> LossOutput:
        """The training objective for a batch x [B, *data_shape]; ``label`` [B]: its classes (conditional models).

        ``beta`` overrides the KL weight for this call (warm-up schedules);
        models without a KL term ignore it.
        """
        raise NotImplementedError

    def elbo_terms(self, x: torch.Tensor, n_samples: int = 1, label: Any = None) -> objectives.ElboTerms:
        """The ELBO's reconstruction and KL terms, each [B] in nats (:func:`aevb.model.objectives.sgvb_terms`).

        A model with more than one stochastic layer overrides this (and
        :meth:`log_weights`) with its own sum over the layers.
        """
        return objectives.sgvb_terms(self, x, n_samples, label)

    def log_weights(self, x: torch.Tensor, n_samples: int, posterior: Distribution | None = None,
                    label: Any = None) -> torch.Tensor:
        """Importance log-weights log p(x, z) − log q(z|x), [n_samples, B]; ``posterior``: q(z|x) if already computed."""
        return objectives.single_layer_log_weights(self, x, n_samples, posterior, label)

    def elbo(self, x: torch.Tensor, n_samples: int = 1, label: Any = None) -> torch.Tensor:
        """ELBO per example [B] in nats, β = 1, analytic KL; averaged over ``n_samples``.  A conditional model's,
        given ``label`` [B], bounds log p(x|y)."""
        return objectives.elbo(self, x, n_samples, label)

    def log_likelihood(self, x: torch.Tensor, n_samples: int = 5000, chunk_size: int | None = None,
                       label: Any = None) -> torch.Tensor:
        """Importance-sampled log p(x) per example [B] in nats (Burda et al. 2016); log p(x|y) for a conditional
        model given ``label`` [B]."""
        return objectives.log_likelihood(self, x, n_samples, chunk_size, label)

    # -- using a trained model ----------------------------------------------

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0,
               label: Any = None) -> torch.Tensor:
        """[n, *data_shape]: means of p(x|z) for z ~ p(z) (for N(0, I): z ~ N(0, temperature² I);
        for mixtures the temperature scales each component's noise; with several stochastic
        layers z_1 is drawn ancestrally, see :meth:`sample_layers`).

        A conditional model decodes p(x|z, y) for ``label`` (one int for all, or [n]); without one, each
        sample's label is drawn uniformly from the K classes (after z, from the same ``generator``).
        """
        z = self.sample_layers(n, generator, temperature)[0]  # z_1 [n, D]
        if self.conditional and label is None:
            label = self.uniform_labels(z.shape[0], generator)
        return self.decode(z, label).mean

    def uniform_labels(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[n] class indices drawn uniformly from the K classes of a conditional model, on ``generator``'s device."""
        device = generator.device if generator is not None else self.device
        return torch.randint(self.n_classes, (n,), generator=generator, device=device)

    # -- what a model declares about itself ------------------------------------
    # Evaluation, the figures and the report read these instead of probing for
    # methods; a new model overrides the ones that differ from the defaults.

    @property
    def stochastic_layers(self) -> int:
        """L, the number of layers of latent variables z_1 … z_L (1 but for a hierarchical model).

        A model with L > 1 overrides :meth:`layer_posteriors` and
        :meth:`sample_layers` and returns one KL per layer in its
        ``elbo_terms(x).kl_layers``.
        """
        return 1

    def layer_posteriors(self, x: torch.Tensor, label: Any = None) -> list[Distribution]:
        """q(z_l | ·) for l = 1 … L (bottom first), each batch [B], event [D]; [encode(x)] for one layer."""
        return [self.encode(x, label)]

    @torch.no_grad()
    def sample_layers(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0,
                      fixed: dict[int, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Ancestral samples [z_1, …, z_L] from the prior, each [n, D]; ``fixed`` {layer (1-based): z [n, D]}
        holds layers.  One layer: [z], z drawn as :meth:`sample` draws it (or ``fixed[1]``)."""
        n = _sample_count(n, temperature)
        if fixed and 1 in fixed:
            return [fixed[1]]
        return [self.prior_module.sample(self, n, generator, temperature)]  # [n, D]

    def input_corruption(self) -> str | None:
        """How training corrupts the encoder's input (``"masking 0.5"``), or None where it sees x itself.

        A model that names a corruption applies it with
        ``corrupt(x, generator)`` (:class:`~aevb.model.autoencoders.DenoisingAE`).
        """
        return None

    def code_statistics(self, codes: torch.Tensor) -> dict[str, float]:
        """Model-specific numbers about the codes E_q[z|x] [N, D] of a test set (for ``evaluate``)."""
        return {}

    def codebook(self) -> torch.Tensor | None:
        """For a model whose code is discrete: the K vectors [K, C] that each of the code's G = D / C parts is
        one of (a sampler of codes then models G indices); None for a continuous code."""
        return None

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, label: Any = None) -> torch.Tensor:
        """[B, *data_shape]: mean of p(x|z) at the posterior mean z = E_q[z] (of p(x|z, y), q(z|x, y) given
        ``label`` [B], for a conditional model)."""
        return self.decode(self.encode(x, label).mean, label).mean

    def save(self, path: str | Path, *, step: int | None = None) -> None:
        """Write ``path/config.json`` and ``path/weights.safetensors`` (each atomically).

        ``step``: the training step of the weights, recorded in config.json
        (:func:`aevb.model.saved.exported_step`) so that what is computed from them can say so.
        """
        path = Path(path)
        config = {"format": FORMAT, "version": FORMAT_VERSION, "model": self.name, "args": self.config,
                  "dtype": str(self._dtype).removeprefix("torch.")}
        if step is not None:
            config["step"] = _whole(step, "step")
        try:
            json.dumps(config)  # before any file is written
        except (TypeError, ValueError) as e:
            raise UserError(f"cannot save: the model's arguments are not plain numbers, strings and lists ({e})") from None
        if path.exists() and not path.is_dir():
            raise UserError(f"cannot save to {path}: it is a file; pass a folder")
        path.mkdir(parents=True, exist_ok=True)
        write_safetensors(path / "weights.safetensors", self.state_dict(), metadata={"format": FORMAT})
        write_json(path / "config.json", config)

    def extra_repr(self) -> str:
        classes = f", n_classes={self.n_classes}" if self.conditional else ""
        return f"data_shape={self.data_shape}, latent_dim={self.latent_dim}{classes}"


def _constructor_signature(cls: type[Model]) -> inspect.Signature:
    """The parameters ``cls(...)`` takes: those of the nearest base's ``__init__`` (itself merged so), then the
    keyword-only ones ``cls.__init__`` adds before passing ``*args, **kwargs`` on (a redefined one replaces it)."""
    own = inspect.signature(vars(cls)["__init__"])
    forwarded = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    if not any(p.kind in forwarded for p in own.parameters.values()):
        return own  # a constructor that passes nothing on says everything itself
    base = inspect.signature(cls.__mro__[1].__init__)
    added = {name: p for name, p in own.parameters.items() if p.kind not in forwarded and name != "self"}
    inherited = [p for name, p in base.parameters.items() if name not in added and p.kind not in forwarded]
    positional = [p for p in inherited if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    keyword = [p for p in inherited if p.kind is inspect.Parameter.KEYWORD_ONLY]
    added_kw = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in added.values()]
    return base.replace(parameters=[*positional, *keyword, *added_kw], return_annotation=inspect.Signature.empty)


def _posterior_stats(posterior: Distribution) -> tuple[torch.Tensor, torch.Tensor]:
    # Independent's stddev is sqrt(variance), two passes; a Normal's is its scale
    base = posterior.base_dist if isinstance(posterior, Independent) else posterior
    return base.mean.detach().mean(), base.stddev.detach().mean()


def build_model(name: str, **kwargs: Any) -> Model:
    """Build a registered model by name: ``build_model("vae", data_shape=(1, 28, 28))``."""
    cls = MODELS.get(name)
    try:
        return cls(**kwargs)
    except TypeError as e:  # torch's own messages can hold its C++ stack after the first line
        raise UserError(f"bad arguments for model {name!r}: {str(e).strip().splitlines()[0]}") from None


def legacy_model_args(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments of a model saved by an older aevb, with what it meant then.

    Models saved before ``posterior_args`` existed had a Gaussian posterior read
    from (μ, log σ); today's default is (μ, log σ²).
    """
    if "posterior_args" not in args and MODELS.get(name).posterior_family == "gaussian":
        return {**args, "posterior_args": {"scale_param": "log-scale"}}
    return args


def _whole(value: Any, name: str) -> int:
    """A whole number given as any int-like value (numpy included); a UserError for 2.5 or True."""
    if isinstance(value, bool) or not float(value).is_integer():
        raise UserError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def _size(value: Any, name: str) -> int:
    """A size (of a layer, of the data): a whole number in [1, 2^31), whatever file or caller gave it."""
    size = _whole(value, name)
    if not 1 <= size < LAYER_SIZES:
        raise UserError(f"{name} must be sizes in [1, 2^31), got {value!r}")
    return size


def _sample_count(n: Any, temperature: float) -> int:
    """``n`` as an int, after the checks every model's ``sample`` makes of its arguments."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise UserError(f"sample(n): n is a number of samples ≥ 1, got {n!r}")
    if not _finite_at_least(temperature, 0):
        raise UserError(f"sample(temperature=...) must be a finite number ≥ 0, got {temperature}")
    return int(n)


def _finite_at_least(value: Any, low: float) -> bool:
    """Whether ``value`` is a finite number ≥ ``low`` (NaN is not: every comparison with it is false)."""
    return math.isfinite(value) and value >= low


def _sizes(hidden: Sequence[int] | None) -> list[int] | None:
    """Hidden layer sizes as a list of ints (None or empty: the network's default)."""
    if hidden is None:
        return None
    sizes = [_size(h, "hidden") for h in list(hidden)]
    return sizes or None


def plain(value: Any) -> Any:
    """``value`` with numpy and 0-d tensor numbers made Python numbers and tuples made lists (for JSON)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (np.generic, torch.Tensor)) and np.ndim(value) == 0:
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
