"""The VAE's training loss as one autograd node, for the model most people train.

Kingma & Welling's model — MLP encoder and decoder, Gaussian posterior, N(0, I)
prior, Bernoulli likelihood — takes a few milliseconds a step on a CPU at
batch 128, and there autograd's bookkeeping costs about as much as the
arithmetic: some 150 ops and 50 graph nodes a step, each dispatched, each
saving its tensors and allocating its outputs.  :func:`vae_loss` computes the
same loss, diagnostics and gradients in one :class:`torch.autograd.Function`
with about 90 ops, its backward pass written out: the MLP VAE step at batch
128 on the 2-core CPU of ``bench/`` runs 1.1× as fast (``bench/README.md``).  For L samples per example, N = L·B
rows, ḡ the gradient of the loss and each row's own x:

    forward                                     backward
    (μ, log σ) = encoder(x), σ = e^(log σ)
    z = μ + σ·ε,  ε ~ N(0, I) as rsample draws
    l = decoder(z)                              ∂/∂l = ḡ·(σ(l) − x) / N
    recon = −(1/N) Σ_n Σ_p (x·l − softplus(l))
    kl = (1/B) Σ_b Σ_d (½(μ² + σ² − 1) − log σ)  ∂/∂μ = Σ_L ∂z + ḡβ·μ / B
    loss = recon + β·kl                         ∂/∂log σ = Σ_L ∂z·ε·σ + ḡβ·(σ² − 1) / B

(½ of the last for an encoder that outputs log σ²), and each Linear layer h' = relu(h Wᵀ + b) passes back ∂h = (∂h'·[h' > 0]) W,
∂W = (∂h'·[h' > 0])ᵀ h, ∂b = Σ_n ∂h'·[h' > 0].  The log-density and the KL
are the library's own functions (:func:`~aevb.model.likelihoods.bernoulli_log_prob`,
:func:`~aevb.model.posteriors.standard_normal_kl`), and every layer multiplies
in the dtype its own ``forward`` would (bf16 under
:func:`aevb.model.precision.matmul_dtype`), with the same casts, so values and
gradients are those of ``model.loss`` to rounding (``tests/test_fused.py``).

The trainer (:mod:`aevb.training.accelerations`, ``make_loss``) asks :func:`plan` once
per run and uses :func:`vae_loss` for the models it recognises: a
:class:`~aevb.model.vae.VAE` whose data path is VAE's own, with aevb's MLP networks (Flatten, Linear and
ReLU layers without hooks or a ``forward`` of their own), a Gaussian
posterior, the standard normal prior, a Bernoulli likelihood and no free
bits.  Everything else, and every caller outside the trainer, runs
``model.loss``: the reference path of :mod:`aevb.model.objectives`.  The node
is differentiable once (a gradient with ``create_graph`` is an error): for
second derivatives of the loss, use ``model.loss``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from aevb.model import noise, objectives
from aevb.model.base import LossOutput
from aevb.model.layers import Linear, cast, lowered
from aevb.model.likelihoods import BernoulliLikelihood, bernoulli_log_prob, bernoulli_log_prob_grad
from aevb.model.posteriors import GaussianPosterior, loc_and_log_scale, standard_normal_kl
from aevb.model.precision import at_least_float32
from aevb.model.priors import StandardNormalPrior
from aevb.model.vae import VAE


class _Layer(NamedTuple):
    linear: Linear
    relu: bool  # a ReLU follows


class Plan(NamedTuple):
    """The encoder's and decoder's (Linear, ReLU?) layers, in order."""

    encoder: tuple[_Layer, ...]
    decoder: tuple[_Layer, ...]


def _layers(network: nn.Module, data_shape: tuple[int, ...], flatten: bool) -> tuple[_Layer, ...] | None:
    """The (Linear, relu) pairs of Flatten, (Linear, ReLU?)+ (``flatten``: the encoder) or of
    (Linear, ReLU?)+, Unflatten to ``data_shape`` (the decoder); None for any other body."""
    if type(network) is not nn.Sequential or "forward" in network.__dict__:
        return None
    children = list(network)
    if flatten:
        if not children or type(children[0]) is not nn.Flatten or (children[0].start_dim, children[0].end_dim) != (1, -1):
            return None
        children = children[1:]
    else:
        if (not children or type(children[-1]) is not nn.Unflatten or children[-1].dim != 1
                or tuple(children[-1].unflattened_size) != tuple(data_shape)):
            return None
        children = children[:-1]
    layers: list[_Layer] = []
    for child in children:
        if type(child) is Linear and "forward" not in child.__dict__:
            layers.append(_Layer(child, False))
        elif type(child) is nn.ReLU and layers and not layers[-1].relu:
            layers[-1] = _Layer(layers[-1].linear, True)
        else:
            return None
    return tuple(layers) or None


# the methods of the reference path that the fused loss stands in for: a model whose instance
# overrides one is not recognised
_DATA_PATH = ("loss", "encode", "decode", "prior", "_run", "_check_input", "elbo_terms")
# ... and a class (a subclass, or VAE itself patched) whose method is not the reference's
_REFERENCE = {name: getattr(VAE, name) for name in _DATA_PATH}


def _hooked(modules) -> bool:
    """Whether a hook or a ``forward`` set on one of these modules would run on the reference path."""
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               or "forward" in m.__dict__ for m in modules)


def _global_hooks() -> bool:
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks)


def plan(model) -> Plan | None:
    """The layers with which :func:`vae_loss` computes ``model.loss``, or None for a model it does not compute.

    Asked once, by the trainer, for a model it built: the loss of a model
    that a hook, a subclass or another part would change is ``model.loss``.
    """
    if (not isinstance(model, VAE) or any(getattr(type(model), name) is not method for name, method in _REFERENCE.items())
            or model.free_bits or model.conditional or type(model.likelihood) is not BernoulliLikelihood
            or type(model.posterior) is not GaussianPosterior or type(model.prior_module) is not StandardNormalPrior):
        return None
    encoder = _layers(model.encoder, model.data_shape, flatten=True)
    decoder = _layers(model.decoder, model.data_shape, flatten=False)
    if encoder is None or decoder is None:
        return None
    modules = (model, model.encoder, model.decoder, *model.encoder, *model.decoder, model.posterior,
               model.likelihood, model.prior_module)
    if _global_hooks() or _hooked(modules) or any(name in model.__dict__ for name in _DATA_PATH):
        return None
    return Plan(encoder, decoder)


_threshold_backward = torch.ops.aten.threshold_backward.default  # ReLU's backward: grad where output > 0


def _forward(layers: tuple[_Layer, ...], h: torch.Tensor, params: tuple[torch.Tensor, ...]):
    """h [N, in] through the layers; returns the output and, per layer, (input, weight, output if a ReLU)."""
    saved = []
    for (linear, relu), weight, bias in zip(layers, params[0::2], params[1::2]):
        dtype = linear.multiply_dtype(h)
        if dtype is not None:  # what Linear.forward multiplies
            h, weight, bias = lowered(dtype, h, weight, bias)
        h_in = h
        h = torch.addmm(bias, h_in, weight.t()) if bias is not None else h_in @ weight.t()
        if relu:
            h.relu_()
        saved.append((h_in, weight, h if relu else None))
    return h, saved


def _backward(saved, grad: torch.Tensor, grads: list, first: int, dtypes: tuple, needs: tuple,
              input_grad: bool) -> torch.Tensor | None:
    """The layers' gradients from ``grad`` [N, out] of their output, into ``grads[first:]`` (weight, bias, …).

    Each is computed in the dtype autograd computes it in (the multiply's)
    and cast to its parameter's (``dtypes``; None: no bias), and only where
    ``needs`` says so; returns the gradient of the first layer's input, or
    None unless ``input_grad`` (then the pass stops at the lowest layer that
    needs a gradient).
    """
    wanted = [i for i in range(len(saved)) if needs[first + 2 * i] or needs[first + 2 * i + 1]]
    if not wanted and not input_grad:
        return None
    for i in reversed(range(len(saved))):
        h_in, weight, h_out = saved[i]
        w, b = first + 2 * i, first + 2 * i + 1
        grad = cast(grad, weight.dtype)
        if h_out is not None:
            grad = _threshold_backward(grad, h_out, 0)
        if needs[w]:
            grads[w] = cast(grad.t() @ h_in, dtypes[w])
        if needs[b] and dtypes[b] is not None:
            grads[b] = cast(grad.sum(0), dtypes[b])
        if not input_grad and i == wanted[0]:
            return None
        grad = grad @ weight if i or input_grad else None
    return grad


def _parameters(layers: tuple[_Layer, ...]) -> list[torch.Tensor | None]:
    return [t for layer in layers for t in (layer.linear.weight, layer.linear.bias)]


def _sample(params: torch.Tensor, n_samples: int, scale_param: str):
    """(μ, σ, log σ, ε, z) from the encoder's output params [B, 2·D]: z = μ + σ·ε [B, D] or [L, B, D], ε as rsample draws it."""
    loc, log_scale = loc_and_log_scale(params, scale_param)  # each [B, D], as the posterior reads them
    scale = log_scale.exp()
    shape = loc.shape if n_samples == 1 else (n_samples, *loc.shape)
    eps = noise.randn(shape, -2, dtype=loc.dtype, device=loc.device)  # the draw of Normal.rsample (LogScaleNormal's)
    return loc, scale, log_scale, eps, loc + eps * scale


def _rows(z: torch.Tensor) -> torch.Tensor:
    """z [B, D] or [L, B, D] as the decoder's rows [N, D] (one sample: z itself, no op)."""
    return z if z.dim() == 2 else z.reshape(-1, z.shape[-1])


def _kl(loc: torch.Tensor, scale: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of Σ_d KL(q(z_d|x) ‖ N(0, 1)), a scalar."""
    return standard_normal_kl(loc, scale, log_scale).sum().mul_(1 / loc.shape[0])


def _reconstruction(logits: torch.Tensor, target: torch.Tensor, n_samples: int) -> torch.Tensor:
    """−(mean over the batch and the samples of Σ log p(x|z)), a scalar; logits [B, …] or [L, B, …], target [B, …]."""
    return bernoulli_log_prob(logits, target).sum().mul_(-1 / (n_samples * target.shape[0]))


def _reconstruction_grad(logits: torch.Tensor, target: torch.Tensor, grad) -> torch.Tensor:
    """∂/∂logits of ``grad`` × :func:`_reconstruction`, in the logits' shape."""
    rows = logits.numel() * target.shape[0] // target.numel()  # N = L·B
    return bernoulli_log_prob_grad(logits, target).mul_(-grad / rows)


def _posterior_grad(grad_z: torch.Tensor | None, grad_kl, loc: torch.Tensor, scale: torch.Tensor,
                    eps: torch.Tensor, scale_param: str) -> torch.Tensor:
    """∂/∂params [B, 2·D] (μ, then log σ or log σ²) from ∂/∂z ([B, D] or [L, B, D]; None: 0) and ∂/∂kl."""
    batch, latent = loc.shape
    grad_kl = grad_kl / batch
    grad_params = loc.new_empty(batch, 2 * latent)
    kl_part = scale.square().sub_(1).mul_(grad_kl)
    if grad_z is None:
        torch.mul(loc, grad_kl, out=grad_params[:, :latent])
        grad_params[:, latent:] = kl_part
    else:
        grad_scale = grad_z * eps
        if grad_z.dim() == 3:  # Σ over the L samples
            grad_z, grad_scale = grad_z.sum(0), grad_scale.sum(0)
        torch.add(grad_z, grad_kl * loc, out=grad_params[:, :latent])
        torch.addcmul(kl_part, grad_scale, scale, out=grad_params[:, latent:])
    if scale_param == "log-variance":  # log σ = ½ log σ²
        grad_params[:, latent:].mul_(0.5)
    return grad_params


def _refuse_second_derivatives() -> None:
    if torch.is_grad_enabled():  # create_graph: the gradient below would be a constant
        raise RuntimeError("the fused VAE loss has no second derivatives; use model.loss for a gradient "
                           "of its gradient")


def _number(grad: torch.Tensor):
    """A scalar gradient as a Python number on the CPU: ops with a number allocate no tensor for it."""
    return grad.item() if grad.device.type == "cpu" else grad


_N_ARGS = 6  # the inputs of _FusedVAELoss before its parameters


class _FusedVAELoss(torch.autograd.Function):
    """(loss, reconstruction, kl, mean μ, mean σ) of a batch; only the loss has a gradient."""

    @staticmethod
    def forward(ctx, x, beta: float, n_samples: int, scale_param: str, plan: Plan, n_encoder_params: int,
                *params):
        x = x.flatten(1)  # [B, P]
        encoder_params, decoder_params = params[:n_encoder_params], params[n_encoder_params:]
        model_dtype = decoder_params[0].dtype  # Model._dtype: what Model._run casts each network's input to
        out, encoder_saved = _forward(plan.encoder, cast(x, model_dtype), encoder_params)
        loc, scale, log_scale, eps, z = _sample(at_least_float32(out), n_samples, scale_param)
        logits, decoder_saved = _forward(plan.decoder, cast(_rows(z), model_dtype), decoder_params)
        logits = at_least_float32(logits).view(*eps.shape[:-1], -1)  # [B, P] or [L, B, P]
        target = cast(x, logits.dtype)  # [B, P], broadcast over the L samples: x itself, not rounded to the model's dtype
        reconstruction = _reconstruction(logits, target, n_samples)
        kl = _kl(loc, scale, log_scale)
        loss = torch.add(reconstruction, kl, alpha=beta)
        # saved as autograd saves: an in-place change before backward (an optimiser step) is an error
        ctx.save_for_backward(logits, target, loc, scale, eps,
                              *(t for layer in (*encoder_saved, *decoder_saved) for t in layer))
        ctx.n_encoder_layers, ctx.n_encoder_params = len(encoder_saved), n_encoder_params
        ctx.beta, ctx.scale_param = beta, scale_param
        ctx.param_dtypes = tuple(None if p is None else p.dtype for p in params)
        diagnostics = (reconstruction, kl, loc.mean(), scale.mean())
        ctx.mark_non_differentiable(*diagnostics)
        ctx.set_materialize_grads(False)
        return (loss, *diagnostics)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        _refuse_second_derivatives()
        logits, target, loc, scale, eps, *layers = ctx.saved_tensors
        layers = [tuple(layers[i:i + 3]) for i in range(0, len(layers), 3)]  # (input, weight, output)
        encoder_saved, decoder_saved = layers[:ctx.n_encoder_layers], layers[ctx.n_encoder_layers:]
        dtypes, first_decoder = ctx.param_dtypes, ctx.n_encoder_params
        needs = ctx.needs_input_grad[_N_ARGS:]
        grads: list[torch.Tensor | None] = [None] * len(dtypes)
        if grad_loss is None:
            return (None,) * _N_ARGS + tuple(grads)
        grad = _number(grad_loss)
        grad_logits = _reconstruction_grad(logits, target, grad).view(-1, logits.shape[-1])  # [N, P]
        encoder_needs = any(needs[:first_decoder])
        grad_z = _backward(decoder_saved, grad_logits, grads, first_decoder, dtypes, needs, encoder_needs)
        if encoder_needs:
            grad_z = cast(grad_z, loc.dtype).view(eps.shape)  # [B, D] or [L, B, D]
            grad_params = _posterior_grad(grad_z, grad * ctx.beta, loc, scale, eps, ctx.scale_param)
            _backward(encoder_saved, grad_params, grads, 0, dtypes, needs, False)
        return (None,) * _N_ARGS + tuple(grads)


def vae_loss(model, x: torch.Tensor, beta: float, plan: Plan) -> LossOutput:
    """``model.loss(x, beta)`` in one autograd node, for a model whose :func:`plan` is ``plan``."""
    objectives._check(model, x, "ELBO", n_samples=model.mc_samples)
    model._check_input(x)
    encoder_params = _parameters(plan.encoder)
    params = (*encoder_params, *_parameters(plan.decoder))
    loss, reconstruction, kl, mu, sigma = _FusedVAELoss.apply(
        x, float(beta), model.mc_samples, model.posterior.scale_param, plan,
        len(encoder_params), *params)
    return LossOutput(loss, reconstruction, kl, mu, sigma)
