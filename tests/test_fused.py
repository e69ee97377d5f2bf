"""The fused VAE loss (aevb.acceleration.fused) against model.loss, the reference path: the same values,
the same gradients, the same random draws; and recognised only for the models it computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import aevb
from aevb.acceleration import fused, optim
from aevb.errors import UserError
from aevb.acceleration.bf16 import bf16_is_native
from aevb.model.precision import matmul_dtype

BF16 = torch.bfloat16
needs_bf16 = pytest.mark.skipif(not bf16_is_native(torch.device("cpu")), reason="this CPU has no native bf16 multiplies")

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(shape, n=32, seed=0, dtype=torch.float32):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _loss_and_grads(model, x, beta=None, dtype=None, general=False):
    """(LossOutput as a tensor, {name: grad}) of one loss and backward, ε from seed 1."""
    model.zero_grad(set_to_none=True)
    plan = fused.plan(model)
    assert plan is not None
    torch.manual_seed(1)
    with matmul_dtype(dtype):
        if general:
            out = model.loss(x, beta=beta)
        else:
            out = fused.vae_loss(model, x, model.beta if beta is None else beta, plan)
    out.loss.backward()
    return out.as_tensor(), {name: p.grad for name, p in model.named_parameters()}


def _assert_same(model, x, beta=None, dtype=None, rtol=1e-5):
    values, grads = _loss_and_grads(model, x, beta, dtype)
    general_values, general_grads = _loss_and_grads(model, x, beta, dtype, general=True)
    torch.testing.assert_close(values, general_values, rtol=rtol, atol=rtol)
    assert grads.keys() == general_grads.keys()
    for name, grad in grads.items():
        reference = general_grads[name]
        assert grad.dtype == reference.dtype and grad.shape == reference.shape, name
        # relative to the largest entry: bf16 rounds entries near zero differently on each path
        scale = reference.abs().max().clamp_min(1e-12)
        assert ((grad - reference).abs().max() / scale).item() < rtol, name


@pytest.mark.parametrize("shape,hidden", [((1, 28, 28), None), ((1, 8, 8), [64, 32]), ((10,), [16])])
@pytest.mark.parametrize("mc_samples", [1, 3])
@pytest.mark.parametrize("scale_param", ["log-variance", "log-scale"])
def test_fp32_loss_and_gradients_are_the_general_paths(shape, hidden, mc_samples, scale_param):
    torch.manual_seed(0)
    model = aevb.VAE(data_shape=shape, latent_dim=5, arch="mlp", hidden=hidden, mc_samples=mc_samples,
                     posterior_args={"scale_param": scale_param})
    x = _batch(shape)
    model.init_output_bias(x.mean(0))
    _assert_same(model, x)
    _assert_same(model, x, beta=0.25)  # a warm-up's β


def test_beta_vae_and_the_linear_network():
    torch.manual_seed(0)
    for model in (aevb.VAE(data_shape=(1, 8, 8), latent_dim=3, arch="mlp", beta=4.0),
                  aevb.VAE(data_shape=(1, 8, 8), latent_dim=3, arch="linear")):
        _assert_same(model, _batch((1, 8, 8)))


def test_float64_is_the_general_path_to_float64_rounding():
    torch.manual_seed(0)
    model = aevb.VAE(data_shape=(1, 8, 8), latent_dim=4, arch="mlp").double()
    _assert_same(model, _batch((1, 8, 8), dtype=torch.float64), rtol=1e-12)


@needs_bf16
@pytest.mark.parametrize("mc_samples", [1, 2])
def test_bf16_loss_and_gradients_are_the_general_paths_to_bf16_rounding(mc_samples):
    """The MLP VAE of bench/ at batch 128: its 784 → 400 layers multiply in bf16, the small ones in fp32."""
    torch.manual_seed(0)
    model = aevb.VAE(data_shape=(1, 28, 28), latent_dim=20, arch="mlp", mc_samples=mc_samples)
    x = _batch((1, 28, 28), n=128)
    model.init_output_bias(x.mean(0))
    # the two paths round at a few different points (the KL's gradient is one sum, not three)
    _assert_same(model, x, dtype=BF16, rtol=1e-2)


def test_a_frozen_layer_gets_no_gradient():
    torch.manual_seed(0)
    model = aevb.VAE(data_shape=(1, 8, 8), latent_dim=3, arch="mlp")
    model.encoder[1].requires_grad_(False)
    x = _batch((1, 8, 8))
    values, grads = _loss_and_grads(model, x)
    general_values, general_grads = _loss_and_grads(model, x, general=True)
    torch.testing.assert_close(values, general_values)
    assert grads["encoder.1.weight"] is None and general_grads["encoder.1.weight"] is None
    torch.testing.assert_close(grads["decoder.0.weight"], general_grads["decoder.0.weight"])


@pytest.mark.parametrize("hidden,steps,atol", [([32], 20, 1e-5), (None, 10, 1e-5)])
def test_training_steps_follow_the_reference_path(hidden, steps, atol):
    """Adam steps: the same random draws and updates, so the same weights."""
    arch, shape = "mlp", (1, 8, 8)
    x = _batch(shape, n=4).round().repeat(16, 1, 1, 1)  # four binary images, repeated
    weights = []
    for general in (False, True):
        torch.manual_seed(0)
        model = aevb.VAE(data_shape=shape, latent_dim=4, arch=arch, hidden=hidden)
        optimizer = optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        plan = fused.plan(model)
        for _ in range(steps):
            out = model.loss(x) if general else fused.vae_loss(model, x, model.beta, plan)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            losses.append(out.loss.item())
        assert losses[-1] < losses[0] - 1  # it trains
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-4, atol=atol)


def _vae(**kwargs):
    torch.manual_seed(0)
    return aevb.VAE(data_shape=(1, 8, 8), latent_dim=3, **{"arch": "mlp", **kwargs})


def _conv(**kwargs):
    torch.manual_seed(0)
    return aevb.VAE(data_shape=(1, 28, 28), latent_dim=5, arch="conv", **kwargs)


@pytest.mark.parametrize("make", [
    lambda: _vae(likelihood="gaussian"),
    lambda: _vae(likelihood="continuous-bernoulli"),
    lambda: _vae(free_bits=0.5),
    lambda: _vae(prior="mog"),
    lambda: aevb.IWAE(data_shape=(1, 8, 8), latent_dim=3, arch="mlp"),
    lambda: _conv(),
], ids=["gaussian", "continuous-bernoulli", "free-bits", "mog-prior", "iwae", "conv"])
def test_other_models_are_not_recognised(make):
    assert fused.plan(make()) is None


def test_hooks_and_replaced_layers_are_not_recognised():
    """Anything the reference path would run that the node skips: the trainer then uses model.loss."""
    model = _vae()
    assert isinstance(fused.plan(model), fused.Plan)
    for module in (model.decoder[0], model.likelihood, model.encoder):
        handle = module.register_forward_hook(lambda *args: None)
        assert fused.plan(model) is None
        handle.remove()
    handle = nn.modules.module.register_module_forward_pre_hook(lambda *args: None)
    assert fused.plan(model) is None
    handle.remove()
    assert isinstance(fused.plan(model), fused.Plan)
    model.decoder[0] = nn.Linear(3, 400)  # not aevb's Linear
    assert fused.plan(model) is None
    model = _vae()
    del model.encoder[0]  # no Flatten: the layers would multiply the images' rows
    assert fused.plan(model) is None


def test_bad_input_is_refused_as_on_the_reference_path():
    model = _vae()
    plan = fused.plan(model)
    with pytest.raises(UserError, match="does not fit this model"):
        fused.vae_loss(model, torch.rand(4, 1, 9, 9), 1.0, plan)
    with pytest.raises(UserError, match="empty batch"):
        fused.vae_loss(model, torch.rand(0, 1, 8, 8), 1.0, plan)
    with pytest.raises(UserError, match="floating-point"):
        fused.vae_loss(model, torch.zeros(4, 1, 8, 8, dtype=torch.uint8), 1.0, plan)


def test_second_derivatives_need_the_reference_path():
    model, x = _vae(), _batch((1, 8, 8))
    loss = fused.vae_loss(model, x, 1.0, fused.plan(model)).loss
    with pytest.raises(RuntimeError, match="use model.loss"):  # not a constant gradient, silently
        torch.autograd.grad(loss, model.decoder[0].weight, create_graph=True)
    loss = model.loss(x).loss
    (grad,) = torch.autograd.grad(loss, model.decoder[0].weight, create_graph=True)
    grad.square().sum().backward()  # a penalty on the gradient trains


def test_a_bf16_model_reads_the_targets_unrounded():
    """The encoder's input is cast to the model's dtype; the likelihood's x is the batch's own (as on the general path)."""
    model = _vae().to(BF16)
    x = _batch((1, 8, 8))  # grey values k/255-like, not bf16-representable
    values, grads = _loss_and_grads(model, x)
    general_values, general_grads = _loss_and_grads(model, x, general=True)
    torch.testing.assert_close(values, general_values, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, general_grads[name], rtol=2e-2, atol=2e-2 * general_grads[name].abs().max().item())


@pytest.mark.parametrize("frozen", ["encoder", "decoder"])
def test_a_frozen_network_gets_no_gradient_and_the_other_the_same(frozen):
    model, x = _vae(), _batch((1, 8, 8))
    getattr(model, frozen).requires_grad_(False)
    values, grads = _loss_and_grads(model, x)
    general_values, general_grads = _loss_and_grads(model, x, general=True)
    torch.testing.assert_close(values, general_values)
    for name, grad in grads.items():
        if name.startswith(frozen):
            assert grad is None and general_grads[name] is None
        else:
            torch.testing.assert_close(grad, general_grads[name])


class _ZeroCodeVAE(aevb.VAE):
    def decode(self, z):
        return super().decode(z * 0)


def test_overrides_of_the_data_path_are_not_recognised():
    torch.manual_seed(0)
    subclass = _ZeroCodeVAE(data_shape=(1, 8, 8), latent_dim=3, arch="mlp")
    assert fused.plan(subclass) is None
    for change in (lambda m: setattr(m, "decode", lambda z: aevb.VAE.decode(m, z * 0)),
                   lambda m: setattr(m, "elbo_terms", lambda x, n: None),
                   lambda m: setattr(m.posterior, "forward", lambda params: None),
                   lambda m: setattr(m.decoder[0], "forward", lambda z: nn.Linear.forward(m.decoder[0], z))):
        model = _vae()
        change(model)
        assert fused.plan(model) is None
    model = _vae()
    nn.utils.parametrizations.weight_norm(model.decoder[2])  # a parametrisation swaps the layer's class
    assert fused.plan(model) is None


def test_the_trainer_takes_the_fused_loss_for_the_models_it_recognises_only():
    """training.accelerations.make_loss is the one place an accelerated loss is chosen; its numbers are model.loss's."""
    from aevb.config import make_config
    from aevb.training.accelerations import make_loss

    cpu = torch.device("cpu")
    model, x = _vae(), _batch((1, 8, 8))
    loss_of = make_loss(model, make_config(arch="mlp"), cpu)
    assert loss_of is not model.loss
    torch.manual_seed(1)
    fast = loss_of(x, 0.5)
    torch.manual_seed(1)
    reference = model.loss(x, 0.5)
    torch.testing.assert_close(fast.as_tensor(), reference.as_tensor().detach(), rtol=1e-5, atol=1e-5)
    other = _vae(likelihood="gaussian")
    assert make_loss(other, make_config(arch="mlp", likelihood="gaussian"), cpu) == other.loss
