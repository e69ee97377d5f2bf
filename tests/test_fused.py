"""The fused VAE loss (aevb.acceleration.fused) against the general path: the same values, the same
gradients, the same random draws, and the general path wherever it does not apply."""

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
    torch.manual_seed(1)
    with matmul_dtype(dtype), (fused.disabled() if general else matmul_dtype(dtype)):
        assert fused.applies(model, x, model.beta if beta is None else beta) is not general
        out = model.loss(x, beta=beta)
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
    model.init_output_bias(x)
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
    model.init_output_bias(x)
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


@pytest.mark.parametrize("arch,shape,steps,atol", [("mlp", (1, 8, 8), 20, 1e-5), ("conv", (1, 28, 28), 10, 1e-4)])
def test_training_steps_follow_the_general_path(arch, shape, steps, atol):
    """Adam steps: the same random draws and updates, so the same weights.

    (Adam's first steps move a weight whose gradient is rounding noise by up
    to lr: the conv's 422k weights have a few, hence 1% of lr.)
    """
    x = _batch(shape, n=4).round().repeat(16 if arch == "mlp" else 4, 1, 1, 1)  # four binary images, repeated
    weights = []
    for general in (False, True):
        torch.manual_seed(0)
        model = aevb.VAE(data_shape=shape, latent_dim=4, arch=arch, hidden=[32] if arch == "mlp" else None)
        optimizer = optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        with fused.disabled() if general else matmul_dtype(None):
            for _ in range(steps):
                out = model.loss(x)
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
], ids=["gaussian", "continuous-bernoulli", "free-bits", "mog-prior", "iwae"])
def test_other_models_take_the_general_path(make):
    assert not fused.applies(make(), _batch((1, 8, 8)), 1.0)


def test_hooks_replaced_layers_and_traced_calls_take_another_path():
    """A hook on a layer: the networks run as modules (the distributions' path); elsewhere: the general path."""
    model, x = _vae(), _batch((1, 8, 8))
    assert isinstance(fused.plan_for(model, x, 1.0), tuple)  # the whole loss in one node
    calls = []
    handle = model.decoder[0].register_forward_hook(lambda *args: calls.append(1))
    assert fused.plan_for(model, x, 1.0) is fused.DISTRIBUTIONS
    model.loss(x)
    assert calls == [1]  # the hook ran
    handle.remove()
    handle = model.likelihood.register_forward_hook(lambda *args: None)  # no fused path calls the likelihood
    assert not fused.applies(model, x, 1.0)
    handle.remove()
    handle = nn.modules.module.register_module_forward_pre_hook(lambda *args: None)
    assert not fused.applies(model, x, 1.0)
    handle.remove()
    assert isinstance(fused.plan_for(model, x, 1.0), tuple)
    assert not fused.applies(model, x.clone().requires_grad_(), 1.0)  # the gradient of x is asked for
    assert not fused.applies(model, x, torch.tensor(1.0))
    with fused.disabled():
        assert not fused.applies(model, x, 1.0)
    with torch.autocast("cpu", dtype=BF16):
        assert not fused.applies(model, x, 1.0)
    model.decoder[0] = nn.Linear(3, 400)  # not aevb's Linear: its own forward, run as a module
    assert fused.plan_for(model, x, 1.0) is fused.DISTRIBUTIONS
    model = _vae()
    del model.encoder[0]  # no Flatten: the layers would multiply the images' rows
    assert fused.plan_for(model, x, 1.0) is fused.DISTRIBUTIONS
    seen = []

    def under_a_transform(w):
        seen.append(fused.applies(_vae(), x, 1.0))
        return w.sum()

    torch.func.grad(under_a_transform)(torch.ones(2))  # torch.func traces the general path's ops
    assert seen == [False]


def test_bad_input_is_refused_as_on_the_general_path():
    model = _vae()
    with pytest.raises(UserError, match="does not fit this model"):
        model.loss(torch.rand(4, 1, 9, 9))
    with pytest.raises(UserError, match="empty batch"):
        model.loss(torch.rand(0, 1, 8, 8))
    with pytest.raises(UserError, match="floating-point"):
        model.loss(torch.zeros(4, 1, 8, 8, dtype=torch.uint8))


def test_second_derivatives_need_the_general_path():
    model, x = _vae(), _batch((1, 8, 8))
    loss = model.loss(x).loss
    with pytest.raises(RuntimeError, match="fused.disabled"):  # not a constant gradient, silently
        torch.autograd.grad(loss, model.decoder[0].weight, create_graph=True)
    with fused.disabled():
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
@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_a_frozen_network_gets_no_gradient_and_the_other_the_same(arch, frozen):
    model, x = (_vae(), _batch((1, 8, 8))) if arch == "mlp" else (_conv(), _batch((1, 28, 28), n=8))
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


def test_overrides_of_the_data_path_take_the_general_path():
    x = _batch((1, 8, 8))
    torch.manual_seed(0)
    subclass = _ZeroCodeVAE(data_shape=(1, 8, 8), latent_dim=3, arch="mlp")
    assert not fused.applies(subclass, x, 1.0)
    for change in (lambda m: setattr(m, "decode", lambda z: aevb.VAE.decode(m, z * 0)),
                   lambda m: setattr(m, "elbo_terms", lambda x, n: None),
                   lambda m: setattr(m.posterior, "forward", lambda params: None)):
        model = _vae()
        model.loss(x)  # the plan is cached by now
        change(model)
        assert not fused.applies(model, x, 1.0)
    model = _vae()
    model.loss(x)
    model.decoder[0].forward = lambda z: nn.Linear.forward(model.decoder[0], z)
    assert fused.plan_for(model, x, 1.0) is fused.DISTRIBUTIONS
    model = _vae()
    model.loss(x)
    nn.utils.parametrizations.weight_norm(model.decoder[2])  # a parametrisation swaps the layer's class
    assert fused.plan_for(model, x, 1.0) is fused.DISTRIBUTIONS  # which runs it as a module
    _assert_same(model, x)


# the distributions' path: any networks, run under autograd as modules; the posterior's draw
# and KL, and the Bernoulli log-density, each one node


@pytest.mark.parametrize("mc_samples", [1, 3])
@pytest.mark.parametrize("scale_param", ["log-variance", "log-scale"])
def test_conv_fp32_loss_and_gradients_are_the_general_paths(mc_samples, scale_param):
    model = _conv(mc_samples=mc_samples, posterior_args={"scale_param": scale_param})
    x = _batch((1, 28, 28), n=16)
    model.init_output_bias(x)
    assert fused.plan_for(model, x, 1.0) is fused.DISTRIBUTIONS
    _assert_same(model, x)
    _assert_same(model, x, beta=0.25)


def test_conv_float64_is_the_general_path_to_float64_rounding():
    _assert_same(_conv().double(), _batch((1, 28, 28), n=8, dtype=torch.float64), rtol=1e-12)


@needs_bf16
def test_conv_bf16_loss_and_gradients_are_the_general_paths_to_bf16_rounding():
    """The conv VAE of bench/ at batch 64 in bf16 channels-last convolutions."""
    model = _conv(mc_samples=2)
    x = _batch((1, 28, 28), n=64)
    model.init_output_bias(x)
    _assert_same(model, x, dtype=BF16, rtol=1e-2)


def test_the_distributions_path_has_no_second_derivatives_and_checks_the_decoders_output():
    model, x = _conv(), _batch((1, 28, 28), n=4)
    loss = model.loss(x).loss
    with pytest.raises(RuntimeError, match="fused.disabled"):
        torch.autograd.grad(loss, model.decoder[0].weight, create_graph=True)
    model.decoder = nn.Sequential(nn.Linear(5, 10))  # 10 logits for 784 pixels
    with pytest.raises(UserError, match="one logit per value"):
        model.loss(x)


class _ConstantDecoder(nn.Module):
    """Logits that ignore z: the encoder's only gradient is the KL's."""

    def __init__(self, shape):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(shape))

    def forward(self, z):
        return self.logits.expand(z.shape[0], *self.logits.shape)


def test_a_decoder_that_ignores_z_leaves_the_encoder_the_kls_gradient():
    model = _conv()
    model.decoder = _ConstantDecoder((1, 28, 28))
    x = _batch((1, 28, 28), n=8)
    assert fused.plan_for(model, x, 1.0) is fused.DISTRIBUTIONS
    _assert_same(model, x)
    _assert_same(model, x, beta=0.25)
