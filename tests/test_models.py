"""Every model × likelihood × network builds, trains, samples and round-trips;
β, Monte Carlo samples, errors, dtypes and the tutorial conv network."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import aevb
from aevb.model import objectives
from aevb.errors import NoLikelihoodError, UserError
from aevb.registry import LIKELIHOODS, MODELS, NETWORKS

MODEL_NAMES = [name for name, _ in MODELS.items()]
LIKELIHOOD_NAMES = [name for name, _ in LIKELIHOODS.items()]
NETWORK_NAMES = [name for name, _ in NETWORKS.items()]
LATENT = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def _cases():
    cases = []
    for model in MODEL_NAMES:
        for likelihood in LIKELIHOOD_NAMES:
            for arch in NETWORK_NAMES:
                cases.append((model, likelihood, arch, (1, 8, 8)))
                if arch in ("linear", "mlp"):
                    cases.append((model, likelihood, arch, (6,)))
            for_rgb = likelihood in ("bernoulli", "gaussian-diag")
            if for_rgb and "conv" in NETWORK_NAMES:
                cases.append((model, likelihood, "conv", (3, 32, 32)))
    return cases


def test_registries_hold_the_expected_entries():
    assert set(MODEL_NAMES) >= {"ae", "vae", "iwae"}
    assert set(NETWORK_NAMES) >= {"linear", "mlp", "conv"}
    assert len(LIKELIHOOD_NAMES) == 8


def first_layer(module: nn.Module) -> nn.Module:
    return next(m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)))


def last_layer(module: nn.Module) -> nn.Module:
    return [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))][-1]


@pytest.mark.parametrize("model_name,likelihood,arch,data_shape", _cases(),
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_model_end_to_end(model_name, likelihood, arch, data_shape, tmp_path):
    torch.manual_seed(0)
    # a model whose loss needs the training set's size (β-TCVAE) declares it; the trainer passes it, as here
    sized = {"dataset_size": 1000} if MODELS.get(model_name).needs_dataset_size else {}
    model = aevb.build_model(model_name, data_shape=data_shape, latent_dim=LATENT, arch=arch,
                             likelihood=likelihood, **sized)
    assert isinstance(model, MODELS.get(model_name))
    B = 4
    x = torch.rand(B, *data_shape)

    # the loss is a finite scalar whose gradient reaches both networks
    out = model.loss(x)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    for field in ("reconstruction", "kl", "mu", "sigma"):
        value = getattr(out, field)
        assert value.shape == () and torch.isfinite(value) and not value.requires_grad
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert first_layer(model.encoder).weight.grad.abs().sum() > 0
    assert last_layer(model.decoder).weight.grad.abs().sum() > 0
    if not model.has_kl:  # the AE family: no KL, a point-mass posterior, loss = reconstruction + penalties
        assert out.kl == 0 and out.sigma == 0
        weights = {"sparsity": getattr(model, "sparsity_weight", 0.0),
                   "contractive": getattr(model, "contractive_weight", 0.0),
                   "mmd": getattr(model, "mmd_weight", 0.0),
                   "code_norm": getattr(model, "rae_code_weight", 0.0),
                   "decoder_penalty": getattr(model, "rae_decoder_weight", 0.0),
                   "commitment": getattr(model, "commitment_weight", 0.0),
                   # the VQ-VAE's diagnostics, not penalties
                   "perplexity": 0.0, "codebook_usage": 0.0, "restarted_codes": 0.0}
        penalties = sum(weights[name] * value for name, value in out.extras.items())
        torch.testing.assert_close(out.loss.detach(), out.reconstruction + penalties)
    else:
        assert out.kl > 0 and out.sigma > 0
        # the reconstruction term alone (no KL) sends gradient to the encoder: z is reparameterised
        model.zero_grad()
        objectives.elbo_terms(model, x).reconstruction.sum().backward()
        assert first_layer(model.encoder).weight.grad.abs().sum() > 0

    # the decoder's output channels follow the likelihood
    k = model.likelihood.params_per_channel
    assert k == (2 if likelihood == "gaussian-diag" else 1)
    with torch.no_grad():
        raw = model.decoder(torch.zeros(2, LATENT))
    assert raw.shape == (2, k * data_shape[0], *data_shape[1:])

    # distributions and shapes
    q = model.encode(x)
    assert tuple(q.batch_shape) == (B,) and tuple(q.event_shape) == (LATENT,)
    p = model.decode(q.mean)
    assert tuple(p.batch_shape) == (B,) and tuple(p.event_shape) == data_shape
    p2 = model.decode(torch.zeros(5, B, LATENT))
    assert tuple(p2.batch_shape) == (5, B) and p2.log_prob(x).shape == (5, B)
    assert model.sample(5).shape == (5, *data_shape)
    recon = model.reconstruct(x)
    assert recon.shape == x.shape and torch.isfinite(recon).all()
    torch.testing.assert_close(recon, model.decode(model.encode(x).mean).mean)
    if model.has_kl:
        assert model.elbo(x).shape == (B,)
        if model.likelihood.normalized:
            assert model.log_likelihood(x, n_samples=3).shape == (B,)
        else:  # the σ-VAE's profile likelihood: no density of x to estimate
            with pytest.raises(NoLikelihoodError, match="not a normalised density"):
                model.log_likelihood(x, n_samples=3)

    # save and load: same weights, same outputs
    model.eval()
    model.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model"] == model_name
    loaded = aevb.load(tmp_path / "m")
    assert type(loaded) is type(model)
    assert loaded.config == model.config
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for key in state:
        assert torch.equal(state[key], loaded_state[key]), key
    assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(loaded.sample(3, generator=g1), model.sample(3, generator=g2))
    if model.has_kl:
        torch.manual_seed(7)
        a = model.elbo(x)
        torch.manual_seed(7)
        b = loaded.elbo(x)
        assert torch.equal(a, b)
    # a freshly built model differs, so the comparisons above are not vacuous
    torch.manual_seed(1)
    other = aevb.build_model(model_name, data_shape=data_shape, latent_dim=LATENT, arch=arch, likelihood=likelihood)
    assert not torch.equal(other.reconstruct(x), model.reconstruct(x))


def test_ae_defines_no_likelihood():
    model = aevb.AE(data_shape=(1, 8, 8), latent_dim=2, arch="mlp", likelihood="bernoulli", hidden=[16])
    x = torch.rand(3, 1, 8, 8)
    with pytest.raises(NoLikelihoodError, match="point-mass"):
        model.elbo(x)
    with pytest.raises(NoLikelihoodError):
        model.log_likelihood(x, n_samples=10)
    assert issubclass(NoLikelihoodError, UserError)
    # the AE loss is −log p(x | z = f(x)), averaged over the batch
    expected = -model.decode(model.encode(x).mean).log_prob(x).mean()
    torch.testing.assert_close(model.loss(x).loss, expected)


def _pair(beta: float, **kwargs):
    torch.manual_seed(0)
    base = aevb.VAE(data_shape=(1, 8, 8), latent_dim=4, arch="mlp", likelihood="bernoulli", hidden=[32], **kwargs)
    weighted = aevb.VAE(data_shape=(1, 8, 8), latent_dim=4, arch="mlp", likelihood="bernoulli", hidden=[32],
                        beta=beta, **kwargs)
    weighted.load_state_dict(base.state_dict())
    return base, weighted


def test_beta_weights_kl_in_the_loss_only():
    base, vae4 = _pair(4.0)
    assert vae4.beta == 4.0 and vae4.config["beta"] == 4.0
    x = torch.rand(6, 1, 8, 8)
    torch.manual_seed(3)
    out = vae4.loss(x)
    torch.testing.assert_close(out.loss.detach(), out.reconstruction + 4 * out.kl)
    # and the terms are the SGVB terms drawn with the same seed
    torch.manual_seed(3)
    terms = objectives.elbo_terms(vae4, x)
    torch.testing.assert_close(out.reconstruction, terms.reconstruction.mean())
    torch.testing.assert_close(out.kl, terms.kl.mean())
    assert out.kl > 0.01  # so β makes a difference
    torch.manual_seed(3)
    out1 = base.loss(x)
    torch.testing.assert_close(out.loss - out1.loss, 3 * out.kl)
    # the per-call override (KL warm-up)
    torch.manual_seed(3)
    torch.testing.assert_close(vae4.loss(x, beta=0.0).loss.detach(), out.reconstruction)
    # elbo is the true ELBO, β = 1, whatever the training β
    torch.manual_seed(9)
    e4 = vae4.elbo(x)
    torch.manual_seed(9)
    e1 = base.elbo(x)
    assert torch.equal(e4, e1)
    torch.testing.assert_close(-e1.mean(), out1.loss.detach(), rtol=0.2, atol=0)


def test_mc_samples_average_over_samples():
    L = 5
    torch.manual_seed(0)
    model = aevb.VAE(data_shape=(1, 8, 8), latent_dim=4, arch="mlp", likelihood="bernoulli", hidden=[32],
                     mc_samples=L)
    assert model.config["mc_samples"] == L
    x = torch.rand(3, 1, 8, 8)
    torch.manual_seed(11)
    loss = model.loss(x).loss
    torch.manual_seed(11)
    terms = objectives.elbo_terms(model, x, n_samples=L)
    torch.testing.assert_close(loss, (terms.reconstruction + terms.kl).mean())
    # the reconstruction term is the average over the L samples drawn (same seed, same z)
    torch.manual_seed(11)
    q = model.encode(x)
    z = q.rsample((L,))  # [L, B, D]
    per_sample = torch.stack([-model.decode(z[l]).log_prob(x) for l in range(L)])  # [L, B]
    assert per_sample.std(0).min() > 0  # the samples differ, so averaging is not trivial
    torch.testing.assert_close(terms.reconstruction, per_sample.mean(0))
    kl = 0.5 * (q.mean**2 + q.variance - 1 - q.variance.log()).sum(-1)
    torch.testing.assert_close(terms.kl, kl)
    torch.testing.assert_close(loss, (per_sample.mean(0) + kl).mean())
    # and it differs from a one-sample loss under the same seed
    torch.manual_seed(11)
    single = objectives.elbo_terms(model, x, n_samples=1)
    assert not torch.allclose(single.reconstruction, terms.reconstruction)


def test_iwae_loss_is_the_importance_weighted_bound():
    torch.manual_seed(0)
    model = aevb.IWAE(data_shape=(6,), latent_dim=2, arch="mlp", likelihood="gaussian", hidden=[16], k=7)
    x = torch.randn(5, 6)
    torch.manual_seed(4)
    loss = model.loss(x).loss
    torch.manual_seed(4)
    w = objectives.log_weights(model, x, 7)  # [7, B]
    torch.testing.assert_close(loss, -(torch.logsumexp(w, 0) - math.log(7)).mean())


# ---------------------------------------------------------------------------
# Errors


def _saved(tmp_path, **kwargs):
    torch.manual_seed(0)
    args = dict(data_shape=(1, 8, 8), latent_dim=4, arch="mlp", likelihood="bernoulli", hidden=[16])
    args.update(kwargs)
    model = aevb.VAE(**args)
    path = tmp_path / f"model-{args['latent_dim']}"
    model.save(path)
    return model, path


def test_load_missing_folder(tmp_path):
    with pytest.raises(UserError, match="no saved model") as e:
        aevb.load(tmp_path / "nothing-here")
    assert "nothing-here" in str(e.value)


def test_load_missing_file(tmp_path):
    _, path = _saved(tmp_path)
    (path / "weights.safetensors").unlink()
    with pytest.raises(UserError, match="weights.safetensors is missing"):
        aevb.load(path)


def test_load_config_not_json(tmp_path):
    _, path = _saved(tmp_path)
    (path / "config.json").write_text("{this is not json", encoding="utf-8")
    with pytest.raises(UserError, match="corrupt") as e:
        aevb.load(path)
    assert "config.json" in str(e.value)


def test_load_config_of_something_else(tmp_path):
    _, path = _saved(tmp_path)
    (path / "config.json").write_text(json.dumps({"model": "vae", "args": {}, "format": "other"}))
    with pytest.raises(UserError, match="not an aevb model"):
        aevb.load(path)


@pytest.mark.parametrize("keep", [0.5, 0.0001])
def test_load_truncated_weights(tmp_path, keep):
    _, path = _saved(tmp_path)
    weights = path / "weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(4, int(len(data) * keep))])
    with pytest.raises(UserError, match="corrupt or unreadable") as e:
        aevb.load(path)
    assert "weights.safetensors" in str(e.value)


def test_load_weights_of_another_model(tmp_path):
    _, small = _saved(tmp_path, latent_dim=4)
    _, large = _saved(tmp_path, latent_dim=8)
    (small / "weights.safetensors").write_bytes((large / "weights.safetensors").read_bytes())
    with pytest.raises(UserError, match="wrong shape") as e:
        aevb.load(small)
    assert "encoder" in str(e.value) and "different models" in str(e.value)


def test_wrong_input_shape(tmp_path):
    model, _ = _saved(tmp_path)
    for bad in (torch.rand(2, 1, 7, 7), torch.rand(2, 64), torch.rand(2, 3, 8, 8)):
        with pytest.raises(UserError, match=r"expects \[batch, 1, 8, 8\]"):
            model.encode(bad)
        with pytest.raises(UserError):
            model.loss(bad)


def test_bad_constructor_arguments():
    with pytest.raises(UserError, match="unknown likelihood"):
        aevb.VAE(data_shape=(4,), latent_dim=2, likelihood="poisson")
    with pytest.raises(UserError, match="unknown network"):
        aevb.VAE(data_shape=(4,), latent_dim=2, arch="transformer")
    with pytest.raises(UserError):
        aevb.VAE(data_shape=(4,), latent_dim=0)
    with pytest.raises(UserError):
        aevb.VAE(data_shape=(4,), latent_dim=2, beta=-1)
    with pytest.raises(UserError):
        aevb.IWAE(data_shape=(4,), latent_dim=2, k=0)
    # counts are whole numbers and β a finite one: none is truncated or let through as NaN
    for model, args in (("vae", {"mc_samples": 2.5}), ("iwae", {"k": 2.7}), ("hvae", {"stochastic_layers": 2.9}),
                        ("vae", {"beta": float("nan")}), ("vae", {"free_bits": float("inf")}),
                        ("hvae", {"beta": float("nan")})):
        with pytest.raises(UserError, match="whole number|finite"):
            MODELS.get(model)(data_shape=(4,), latent_dim=2, **args)
    with pytest.raises(UserError, match="conv"):
        aevb.VAE(data_shape=(6,), latent_dim=2, arch="conv")
    with pytest.raises(UserError, match="multiples of 4"):
        aevb.VAE(data_shape=(1, 10, 10), latent_dim=2, arch="conv")
    with pytest.raises(UserError, match="likelihood_args"):
        aevb.VAE(data_shape=(4,), latent_dim=2, likelihood="bernoulli", likelihood_args={"scale": 2.0})


def test_likelihood_args_round_trip(tmp_path):
    torch.manual_seed(0)
    model = aevb.VAE(data_shape=(5,), latent_dim=2, arch="linear", likelihood="gaussian",
                     likelihood_args={"scale": 0.25})
    assert model.likelihood.scale == 0.25
    model.save(tmp_path / "m")
    assert aevb.load(tmp_path / "m").likelihood.scale == 0.25


# ---------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian-learned", "gaussian-optimal", "gaussian-diag"])
def test_float64_and_bfloat16(likelihood):
    torch.manual_seed(0)
    model = aevb.VAE(data_shape=(1, 8, 8), latent_dim=4, arch="mlp", likelihood=likelihood, hidden=[32]).eval()
    x = torch.rand(6, 1, 8, 8)

    def run(m):
        """Stochastic (same seed) and deterministic outputs, all finite."""
        torch.manual_seed(3)
        loss = m.loss(x).loss.detach()
        torch.manual_seed(3)
        elbo = m.elbo(x, n_samples=200)
        torch.manual_seed(3)
        ll = m.log_likelihood(x, n_samples=200) if m.likelihood.normalized else elbo
        q = m.encode(x)
        reconstruction = m.decode(q.mean).log_prob(x.to(q.mean.dtype))
        kl = torch.distributions.kl_divergence(q, m.prior())
        values = (loss, elbo, ll, reconstruction, kl)
        for value in values:
            assert torch.isfinite(value).all()
        return values

    reference = run(model)
    double = _converted(model, torch.float64)
    values = run(double)
    # a float64 model computes in float64 (no silent downcast to float32) ...
    for value in values:
        assert value.dtype == torch.float64
    torch.manual_seed(3)
    assert objectives.elbo_terms(double, x).reconstruction.dtype == torch.float64
    assert objectives.log_weights(double, x, 2).dtype == torch.float64
    # ... and agrees with float32 on the deterministic terms, and on the stochastic ones
    # up to Monte Carlo noise (float64 draws a different random stream)
    for a, b in zip(reference[3:], values[3:]):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
    for a, b in zip(reference[1:3], values[1:3]):
        torch.testing.assert_close(a.double().mean(), b.mean(), rtol=0.02, atol=0.2)

    bf16 = _converted(model, torch.bfloat16)
    assert next(bf16.decoder.parameters()).dtype == torch.bfloat16
    values = run(bf16)
    for value in values:
        assert value.dtype == torch.float32  # reductions run in float32
    for a, b in zip(reference, values):  # same random stream as float32
        torch.testing.assert_close(a, b, rtol=0.05, atol=1.0)
    # a low-precision model still trains
    bf16.train().loss(x).loss.backward()
    assert first_layer(bf16.encoder).weight.grad.abs().sum() > 0


def test_the_model_follows_its_weights_dtype():
    """The dtype encode/decode cast to is read once per conversion, not per call: every way of changing it counts."""
    torch.manual_seed(0)
    model = aevb.VAE(data_shape=(1, 8, 8), latent_dim=4, arch="mlp", hidden=[16])
    x = torch.rand(3, 1, 8, 8)
    assert model.encode(x).mean.dtype == torch.float32
    assert model.double().encode(x).mean.dtype == torch.float64
    assert model.to(torch.float32).decode(torch.zeros(3, 4)).mean.dtype == torch.float32
    halves = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    model.load_state_dict(halves, assign=True)
    assert model.encode(x).mean.dtype == torch.float32  # bf16 weights, float32 distributions
    assert model.prior().mean.device == x.device
    # the networks converted or loaded on their own
    model.encoder.double(), model.decoder.double()
    assert model.elbo(x.double()).dtype == torch.float64
    other = aevb.VAE(data_shape=(1, 8, 8), latent_dim=4, arch="mlp", hidden=[16])
    for network in (other.encoder, other.decoder):
        network.load_state_dict({k: v.double() for k, v in network.state_dict().items()}, assign=True)
    assert other.elbo(x.double()).dtype == torch.float64

    class Elbo(nn.Module):  # functional_call swaps the parameters in for one call
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model.elbo(x)

    wrapper = Elbo(aevb.VAE(data_shape=(1, 8, 8), latent_dim=4, arch="mlp", hidden=[16]))
    params = {k: v.double() for k, v in wrapper.named_parameters()}
    assert torch.func.functional_call(wrapper, params, (x.double(),)).dtype == torch.float64


def test_a_model_pickles_and_its_prior_survives_inference_mode():
    """In-process copies (pickle, as multiprocessing does) work; a prior first built under
    inference_mode still trains; the standard normal is float32 whatever torch's default dtype."""
    import pickle

    torch.manual_seed(0)
    model = aevb.VAE(data_shape=(1, 8, 8), latent_dim=4, arch="mlp", hidden=[16])
    x = torch.rand(3, 1, 8, 8)
    with torch.inference_mode():
        model.elbo(x)
    model.loss(x).loss.backward()
    copy = pickle.loads(pickle.dumps(model))
    torch.manual_seed(1)
    a = model.elbo(x)
    torch.manual_seed(1)
    assert torch.equal(copy.elbo(x), a)
    fresh = aevb.VAE(data_shape=(1, 8, 8), latent_dim=4, arch="mlp", hidden=[16])
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert fresh.prior().mean.dtype == torch.float32
    finally:
        torch.set_default_dtype(default)


def _converted(model, dtype):
    torch.manual_seed(0)
    copy = aevb.VAE(**model.config)
    copy.load_state_dict(model.state_dict())
    return copy.to(dtype).eval()


# ---------------------------------------------------------------------------
# the tutorial conv network


def test_conv_network_for_28x28_is_the_tutorial_network():
    D = 20
    model = aevb.VAE(data_shape=(1, 28, 28), latent_dim=D, arch="conv", likelihood="bernoulli")

    def layers(module):
        return [m for m in module.modules() if not isinstance(m, nn.Sequential)]

    def describe(m):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            return (type(m).__name__, m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding)
        if isinstance(m, nn.Linear):
            return ("Linear", m.in_features, m.out_features)
        if isinstance(m, nn.Unflatten):
            return ("Unflatten", tuple(m.unflattened_size))
        return (type(m).__name__,)

    assert [describe(m) for m in layers(model.encoder)] == [
        ("Conv2d", 1, 16, (4, 4), (2, 2), (1, 1)),
        ("ReLU",),
        ("Conv2d", 16, 32, (4, 4), (2, 2), (1, 1)),
        ("Flatten",),  # before the ReLU, the same function (aevb.model.networks says why)
        ("ReLU",),
        ("Linear", 32 * 7 * 7, 128),
        ("ReLU",),
        ("Linear", 128, 2 * D),
    ]
    assert [describe(m) for m in layers(model.decoder)] == [
        ("Linear", D, 128),
        ("ReLU",),
        ("Linear", 128, 32 * 7 * 7),
        ("ReLU",),
        ("Unflatten", (32, 7, 7)),
        ("ConvTranspose2d", 32, 16, (4, 4), (2, 2), (1, 1)),
        ("ReLU",),
        ("ConvTranspose2d", 16, 1, (4, 4), (2, 2), (1, 1)),
    ]
    x = torch.rand(2, 1, 28, 28)
    assert model.encoder(x).shape == (2, 2 * D)
    assert model.decoder(torch.zeros(2, D)).shape == (2, 1, 28, 28)


@pytest.mark.parametrize("arch,likelihood", [("mlp", "bernoulli"), ("mlp", "gaussian"), ("conv", "bernoulli"),
                                             ("conv", "laplace-learned")])
def test_init_output_bias_starts_at_the_data_mean(arch, likelihood):
    """With the last layer's weights at zero, p(x|z) is then exactly the data's average
    (per pixel for an MLP, per channel for a convolution's bias)."""
    torch.manual_seed(0)
    model = aevb.VAE(data_shape=(1, 8, 8), latent_dim=3, arch=arch, likelihood=likelihood)
    x = torch.rand(50, 1, 8, 8) * torch.linspace(0.05, 0.95, 64).reshape(1, 1, 8, 8)
    assert model.init_output_bias(x.mean(0))
    last = [m for m in model.decoder.modules() if getattr(m, "bias", None) is not None][-1]
    with torch.no_grad():
        last.weight.zero_()
    mean = model.decode(torch.randn(4, 3)).mean  # [4, 1, 8, 8]
    expected = x.mean(0) if arch == "mlp" else x.mean().expand(1, 8, 8)
    if arch == "conv" and likelihood == "bernoulli":  # the mean of the per-pixel logits, per channel
        expected = torch.sigmoid(torch.logit(x.mean(0).clamp(1e-3, 1 - 1e-3)).mean()).expand(1, 8, 8)
    torch.testing.assert_close(mean, expected.expand_as(mean), rtol=1e-5, atol=1e-6)


def test_init_output_bias_refuses_what_it_cannot_invert():
    model = aevb.VAE(data_shape=(1, 8, 8), latent_dim=3, likelihood="gaussian-diag")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not model.init_output_bias(torch.rand(1, 8, 8))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_data_mean_start_is_a_better_starting_point_on_digits():
    """Before any step, the data-mean start scores a far better ELBO than torch's init (and the
    first epoch stays ahead: bench/ measures the time to a target ELBO)."""
    from aevb.data.datasets import load_data

    data = load_data("digits", test_split=0.2)
    elbos = {}
    for init in ("default", "data-mean"):
        torch.manual_seed(0)
        model = aevb.VAE(data_shape=data.data_shape, latent_dim=8)
        if init == "data-mean":
            assert model.init_output_bias(data.train.mean(0))
        torch.manual_seed(1)
        with torch.no_grad():
            elbos[init] = float(model.elbo(data.test).mean())
    assert elbos["data-mean"] > elbos["default"] + 5, elbos


def test_posterior_parametrisation_is_saved_and_old_models_load_as_they_were(tmp_path):
    """New models read the encoder's second half as log σ²; a model saved before that choice
    existed (no ``posterior_args`` in its config.json) is read as log σ, and gives the same q(z|x)."""
    torch.manual_seed(0)
    x = torch.rand(4, 1, 8, 8)
    new = aevb.VAE(data_shape=(1, 8, 8), latent_dim=3)
    assert new.posterior.scale_param == "log-variance"
    new.save(tmp_path / "new")
    assert aevb.load(tmp_path / "new").posterior.scale_param == "log-variance"

    old = aevb.VAE(data_shape=(1, 8, 8), latent_dim=3, posterior_args={"scale_param": "log-scale"})
    old.save(tmp_path / "old")
    config_path = tmp_path / "old" / "config.json"
    config = json.loads(config_path.read_text())
    del config["args"]["posterior_args"]  # as aevb wrote it before the option
    config_path.write_text(json.dumps(config))
    loaded = aevb.load(tmp_path / "old")
    assert loaded.posterior.scale_param == "log-scale"
    torch.testing.assert_close(loaded.encode(x).stddev, old.encode(x).stddev)
    with pytest.raises(UserError, match="scale"):
        aevb.VAE(data_shape=(1, 8, 8), latent_dim=3, posterior_args={"scale_param": "sigma"})
