"""The deterministic autoencoders: AE, and the denoising, sparse and contractive AEs.

Each has a point-mass posterior (z = f(x), no KL and no density of x) and
differs from the plain AE only in :meth:`AE.corrupt` (the denoising AE) or
:meth:`AE.penalties` (the sparse and contractive AEs); the target of the
reconstruction term is always the clean x.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch

from aevb.errors import UserError
from aevb.model import noise
from aevb.model.base import LossOutput, Model, _posterior_stats
from aevb.options import COUNTS, Option, as_argument
from aevb.registry import MODELS

@MODELS.register("ae")
class AE(Model):
    """Deterministic autoencoder: z = f(x), loss = −log p(x|z).

    With the Gaussian likelihood (σ = 1) this is the MSE autoencoder, with
    the Bernoulli likelihood the BCE autoencoder.  Having a point-mass
    posterior it defines no likelihood of x: ``elbo`` and ``log_likelihood``
    raise :class:`~aevb.errors.NoLikelihoodError` (from :mod:`aevb.objectives`, like any model without a density).
    """

    name = "ae"
    posterior_family = "point-mass"
    has_kl = False
    needs_input_grad: ClassVar[bool] = False  # the penalty differentiates the code with respect to x

    def loss(self, x: torch.Tensor, beta: float | None = None, label: Any = None) -> LossOutput:
        """−log p(x | z = f(corrupt(x))) + Σ weight·penalty, mean over the batch.

        The variants below change only :meth:`corrupt` (the DAE) or
        :meth:`penalties` (sparse and contractive AEs); the target is always the clean x.
        """
        inputs = self.corrupt(x)
        if self.needs_input_grad:
            inputs = inputs.to(self._dtype).detach().requires_grad_(True)
        posterior = self.encode(inputs, label)  # label: None (no AE is conditional), refused otherwise
        code = posterior.mean  # [B, D]
        reconstruction = -self.decode(code, label).log_prob(x.to(code.dtype)).mean()
        penalties = self.penalties(inputs, code)  # {name: (weight, [] value)}
        loss = reconstruction
        for weight, value in penalties.values():
            loss = loss + weight * value
        mu, sigma = _posterior_stats(posterior)
        return LossOutput(loss, reconstruction.detach(), torch.zeros_like(reconstruction.detach()), mu, sigma,
                          {name: value.detach() for name, (_, value) in penalties.items()})

    def corrupt(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The encoder's input in training (the identity but for the denoising AE)."""
        return x

    def penalties(self, inputs: torch.Tensor, code: torch.Tensor) -> dict[str, tuple[float, torch.Tensor]]:
        """Regularisers of the code as {name: (weight, scalar value)}; none for the plain AE."""
        return {}


CORRUPTION = Option("corruption", "gaussian", "dae: corruption of the input: gaussian (additive noise of σ = level), "
                    "masking (each value zeroed with probability level) or salt-and-pepper (each value set to 0 or 1 "
                    "with probability level)", choices=("gaussian", "masking", "salt-and-pepper"))
NOISE_LEVEL = Option("noise_level", 0.3, "dae: corruption level (σ or probability)", low=0, metavar="LEVEL")


@MODELS.register("dae")
class DenoisingAE(AE):
    """Denoising autoencoder (Vincent et al. 2008): −log p(x | z = f(x̃)), x̃ a corrupted x.

    The encoder sees the corrupted input only in training (``loss``);
    ``encode``/``reconstruct`` take what they are given.

    Args (besides :class:`Model`'s):
        corruption: ``gaussian`` (x̃ = x + level·ε), ``masking`` (each value
            set to 0 with probability level) or ``salt-and-pepper`` (each value
            set to 0 or 1, equally likely, with probability level).
        noise_level: σ of the Gaussian noise or the probability above.
    """

    name = "dae"
    options = (CORRUPTION, NOISE_LEVEL)

    def __init__(self, *args, corruption: str = CORRUPTION.default, noise_level: float = NOISE_LEVEL.default,
                 **kwargs):
        super().__init__(*args, **kwargs)
        options = self.check_options({"corruption": corruption, "noise_level": noise_level})
        self.corruption, self.noise_level = options["corruption"], options["noise_level"]
        self.config.update(options)

    @classmethod
    def check_options(cls, values: dict[str, Any], spelled: Callable[[str], str] = as_argument) -> dict[str, Any]:
        """The noise level of masking and salt-and-pepper is a probability, at most 1."""
        values = super().check_options(values, spelled)
        corruption = values.get("corruption", CORRUPTION.default)
        if corruption != "gaussian" and values.get("noise_level", NOISE_LEVEL.default) > 1:
            raise UserError(f"{spelled('noise_level')} is a probability for {spelled('corruption')} {corruption}, "
                            f"got {values['noise_level']}")
        return values

    def input_corruption(self) -> str:
        """The corruption and its level, as the figures label it: ``"masking 0.5"``."""
        return f"{self.corruption} {self.noise_level:g}"

    def corrupt(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x̃ [B, *data_shape], a corrupted copy of x (seeded by ``generator`` if given)."""
        def uniform():
            if generator is None:  # the trainer's rows of a global batch, or the global generator
                return noise.rand(x.shape, 0, device=x.device, dtype=x.dtype)
            return torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)

        if self.corruption == "gaussian":
            eps = (noise.randn(x.shape, 0, device=x.device, dtype=x.dtype) if generator is None
                   else torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype))
            return x + self.noise_level * eps
        if self.corruption == "masking":
            return torch.where(uniform() < self.noise_level, torch.zeros_like(x), x)
        hit, salt = uniform() < self.noise_level, uniform() < 0.5
        return torch.where(hit, salt.to(x.dtype), x)


SPARSITY = Option("sparsity", "l1", "sparse-ae: penalty on the code: l1 (Σ|z_d|) or kl (Σ_d KL(ρ ‖ ρ̂_d) with ρ̂_d the "
                  "batch-mean sigmoid activation)", choices=("l1", "kl"))
SPARSITY_WEIGHT = Option("sparsity_weight", 0.1, "sparse-ae: weight of the sparsity penalty", low=0, metavar="W")
SPARSITY_TARGET = Option("sparsity_target", 0.05, "sparse-ae: target mean activation ρ of the kl penalty",
                         above=0, below=1, metavar="RHO")


@MODELS.register("sparse-ae")
class SparseAE(AE):
    """Sparse autoencoder: −log p(x|z = f(x)) + weight · penalty(z).

    Args (besides :class:`Model`'s):
        sparsity: ``l1``: mean over the batch of Σ_d |z_d|; ``kl``: the classic
            sparse autoencoder's Σ_d KL(Bernoulli(ρ) ‖ Bernoulli(ρ̂_d)), where
            ρ̂_d is the batch mean of the sigmoid activation σ(z_d) (Ng's notes).
        sparsity_weight: weight of the penalty.
        sparsity_target: ρ, the target mean activation of the ``kl`` penalty.
    """

    name = "sparse-ae"
    options = (SPARSITY, SPARSITY_WEIGHT, SPARSITY_TARGET)

    def __init__(self, *args, sparsity: str = SPARSITY.default, sparsity_weight: float = SPARSITY_WEIGHT.default,
                 sparsity_target: float = SPARSITY_TARGET.default, **kwargs):
        super().__init__(*args, **kwargs)
        options = self.check_options({"sparsity": sparsity, "sparsity_weight": sparsity_weight,
                                      "sparsity_target": sparsity_target})
        self.sparsity, self.sparsity_weight = options["sparsity"], options["sparsity_weight"]
        self.sparsity_target = options["sparsity_target"]
        self.config.update(options)

    def sparsity_penalty(self, code: torch.Tensor) -> torch.Tensor:
        """The unweighted penalty of codes [B, D], a scalar."""
        if self.sparsity == "l1":
            return code.abs().sum(-1).mean()
        rho, rho_hat = self.sparsity_target, torch.sigmoid(code).mean(0).clamp(1e-6, 1 - 1e-6)  # [D]
        return (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()

    def penalties(self, inputs, code):
        return {"sparsity": (self.sparsity_weight, self.sparsity_penalty(code))}

    def code_statistics(self, codes: torch.Tensor) -> dict[str, float]:
        """``code_l1`` (mean Σ_d |z_d|), ``code_near_zero_fraction`` (|z_d| < 0.01) and
        ``code_mean_activation`` (mean σ(z_d), what the kl penalty pulls towards ρ)."""
        return {"code_l1": codes.abs().sum(-1).mean().item(),
                "code_near_zero_fraction": (codes.abs() < 0.01).float().mean().item(),
                "code_mean_activation": torch.sigmoid(codes).mean().item(),
                "sparsity_penalty": self.sparsity_penalty(codes).item()}


CONTRACTIVE_WEIGHT = Option("contractive_weight", 0.1, "cae: weight of the penalty ‖∂f/∂x‖²_F", low=0, metavar="W")
JACOBIAN = Option("jacobian", "auto", "cae: Jacobian norm exactly (one backward pass per code dimension), by random "
                  "projections, or auto (exact up to 16 code dimensions)", choices=("auto", "exact", "projections"))
JACOBIAN_PROJECTIONS = Option("jacobian_projections", 1, "cae: random projections per example for --jacobian "
                              "projections", low=1, below=COUNTS, metavar="N", memory=True)


@MODELS.register("cae")
class ContractiveAE(AE):
    """Contractive autoencoder (Rifai et al. 2011): −log p(x|z = f(x)) + weight · ‖∂f/∂x‖²_F.

    The squared Frobenius norm of the encoder's Jacobian J [D, n] at each
    example, averaged over the batch, is computed

    * exactly: Σ_d ‖∂f_d/∂x‖², one backward pass per code dimension (the
      examples are independent, so one pass gives the rows of every example);
    * by random projections: E_v ‖vᵀJ‖² = tr(J Jᵀ) = ‖J‖²_F for v ~ N(0, I_D),
      one backward pass per projection (unbiased; Hutchinson's estimator);
    * ``auto``: exactly up to 16 code dimensions, else by one projection.

    Both keep the graph (``create_graph``) so the penalty is trained.
    """

    name = "cae"
    options = (CONTRACTIVE_WEIGHT, JACOBIAN, JACOBIAN_PROJECTIONS)
    needs_input_grad = True
    EXACT_UP_TO = 16

    def __init__(self, *args, contractive_weight: float = CONTRACTIVE_WEIGHT.default, jacobian: str = JACOBIAN.default,
                 jacobian_projections: int = JACOBIAN_PROJECTIONS.default, **kwargs):
        super().__init__(*args, **kwargs)
        options = self.check_options({"contractive_weight": contractive_weight, "jacobian": jacobian,
                                      "jacobian_projections": jacobian_projections})
        self.contractive_weight, self.jacobian = options["contractive_weight"], options["jacobian"]
        self.jacobian_projections = options["jacobian_projections"]
        self.config.update(options)

    def jacobian_norm(self, inputs: torch.Tensor, code: torch.Tensor, exact: bool | None = None) -> torch.Tensor:
        """Mean over the batch of ‖∂code/∂inputs‖²_F, a scalar; ``inputs`` must require grad."""
        if exact is None:
            exact = self.jacobian == "exact" or (self.jacobian == "auto" and code.shape[-1] <= self.EXACT_UP_TO)
        if exact:
            # the unit vectors made where the code is: one_hot of a CPU index was checked (two reads) and copied
            # to the device at every step
            basis = torch.eye(code.shape[-1], dtype=code.dtype, device=code.device)  # [D, D]
            directions = [basis[d].expand_as(code) for d in range(code.shape[-1])]
        else:
            directions = [noise.randn(code.shape, 0, dtype=code.dtype, device=code.device)
                          for _ in range(self.jacobian_projections)]
        total = code.new_zeros(())
        for v in directions:  # each [B, D]
            (vjp,) = torch.autograd.grad(code, inputs, grad_outputs=v, create_graph=True)  # [B, *data_shape]
            total = total + vjp.pow(2).flatten(1).sum(1).mean()
        return total if exact else total / len(directions)

    def penalties(self, inputs, code):
        return {"contractive": (self.contractive_weight, self.jacobian_norm(inputs, code))}


RAE_CODE_WEIGHT = Option("rae_code_weight", 0.1, "rae: weight β of ½‖z‖², which keeps the codes near the origin for "
                         "a density fitted to them after training", low=0, metavar="W")
RAE_DECODER = Option("rae_decoder", "l2", "rae: regulariser of the decoder: l2 (the sum of its squared weights) or "
                     "gradient (‖∂g/∂z‖²_F at the codes, by one random projection)", choices=("l2", "gradient"))
RAE_DECODER_WEIGHT = Option("rae_decoder_weight", 1e-4, "rae: weight λ of the decoder's regulariser", low=0,
                            metavar="W")


@MODELS.register("rae")
class RegularizedAE(AE):
    """Regularised deterministic autoencoder (Ghosh et al. 2020): −log p(x|z = f(x)) + β·½‖z‖² + λ·R(decoder).

    A VAE's noise smooths the decoder; the RAE asks for that smoothness
    directly, with R the decoder's squared weights (RAE-L2) or the squared
    Frobenius norm of its Jacobian at the codes (RAE-GP; E_v ‖vᵀJ‖² with
    v ~ N(0, I) over the output, one projection a step).  It samples through
    a density fitted to its codes after training ("ex-post density
    estimation": a Gaussian mixture, ``aevb sample --sampler gmm``).
    """

    name = "rae"
    default_sampler = "gmm"  # its ex-post density: the codes were only kept near the origin, never fitted to a prior
    options = (RAE_CODE_WEIGHT, RAE_DECODER, RAE_DECODER_WEIGHT)

    def __init__(self, *args, rae_code_weight: float = RAE_CODE_WEIGHT.default, rae_decoder: str = RAE_DECODER.default,
                 rae_decoder_weight: float = RAE_DECODER_WEIGHT.default, **kwargs):
        super().__init__(*args, **kwargs)
        options = self.check_options({"rae_code_weight": rae_code_weight, "rae_decoder": rae_decoder,
                                      "rae_decoder_weight": rae_decoder_weight})
        self.rae_code_weight, self.rae_decoder = options["rae_code_weight"], options["rae_decoder"]
        self.rae_decoder_weight = options["rae_decoder_weight"]
        self.config.update(options)

    def decoder_penalty(self, code: torch.Tensor) -> torch.Tensor:
        """R(decoder), a scalar: Σ w² over its weights, or the batch mean of ‖∂g(z)/∂z‖²_F at the codes [B, D]."""
        if self.rae_decoder == "l2":
            return sum(p.square().sum() for name, p in self.decoder.named_parameters() if not name.endswith("bias"))
        if not code.requires_grad:  # encode under no_grad (evaluation): no slope to measure
            return code.new_zeros(())
        output = self._run(self.decoder, code)  # [B, k·C, ...]
        direction = noise.randn(output.shape, 0, dtype=output.dtype, device=output.device)
        (slope,) = torch.autograd.grad(output, code, grad_outputs=direction, create_graph=True)  # vᵀJ: [B, D]
        return slope.square().sum(-1).mean()

    def penalties(self, inputs, code):
        return {"code_norm": (self.rae_code_weight, 0.5 * code.square().sum(-1).mean()),
                "decoder_penalty": (self.rae_decoder_weight, self.decoder_penalty(code))}
