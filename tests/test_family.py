"""KL schedules, free bits, priors and the autoencoder variants (issue 6): each loss equals its
definition computed here independently; the schedules' values; priors round-trip and sample."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

import aevb
from aevb.model import objectives
from aevb.errors import UserError
from aevb.training.schedules import make_schedule

from conftest import aevb_cli
from test_cli import png_size

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(n: int = 16) -> torch.Tensor:
    return (torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(3)) > 0.5).float()


# ---------------------------------------------------------------------------
# schedules


def test_cyclical_schedule_ramps_over_a_fraction_of_each_cycle():
    beta = make_schedule("cyclical", beta=2.0, cycles=2, ratio=0.5, total_steps=8)  # cycles of 4 steps
    assert [beta(s) for s in range(8)] == [0.0, 1.0, 2.0, 2.0, 0.0, 1.0, 2.0, 2.0]
    beta = make_schedule("cyclical", beta=1.0, cycles=3, ratio=1.0, total_steps=10)  # ⌈10/3⌉ = 4
    assert [beta(s) for s in range(10)] == pytest.approx([0, .25, .5, .75, 0, .25, .5, .75, 0, .25])


def test_linear_and_constant_schedules():
    assert [make_schedule("linear", beta=2.0, warmup=4)(s) for s in range(6)] == [0, .5, 1, 1.5, 2, 2]
    assert [make_schedule("linear", beta=2.0)(s) for s in range(3)] == [2, 2, 2]
    assert [make_schedule("constant", beta=3.0, warmup=4)(s) for s in range(3)] == [3, 3, 3]


# ---------------------------------------------------------------------------
# free bits


@pytest.mark.parametrize("free_bits", [0.0, 0.05, 2.0])
def test_free_bits_loss_is_its_definition(free_bits):
    torch.manual_seed(0)
    model = aevb.VAE(data_shape=SHAPE, latent_dim=4, hidden=[16], beta=0.7, free_bits=free_bits)
    x = batch()
    torch.manual_seed(1)
    out = model.loss(x)
    torch.manual_seed(1)
    params = model.encoder(x)
    mu, log_var = params.chunk(2, dim=-1)  # [B, D]: the encoder outputs (μ, log σ²)
    log_sigma = log_var / 2
    sigma = log_sigma.exp()
    z = mu + sigma * torch.randn((1, *mu.shape))[0]
    reconstruction = torch.nn.functional.binary_cross_entropy_with_logits(
        model.decoder(z), x, reduction="none").flatten(1).sum(1).mean()
    kl_per_dim = (mu ** 2 + sigma ** 2 - 1) / 2 - log_sigma  # [B, D], KL(N(μ, σ²) ‖ N(0, 1))
    kl_term = torch.clamp(kl_per_dim.mean(0), min=free_bits).sum()
    torch.testing.assert_close(out.loss, reconstruction + 0.7 * kl_term)
    torch.testing.assert_close(out.kl, kl_per_dim.sum(1).mean())  # the logged KL is the true one
    if free_bits:
        torch.testing.assert_close(out.extras["kl_free_bits"], kl_term)
    if free_bits == 2.0:  # every dimension is below the floor: the KL sends no gradient
        model.zero_grad()
        objectives.free_bits_kl(model.encode(x), model.prior(), free_bits).backward()
        assert all(p.grad is None or not p.grad.any() for p in model.encoder.parameters())


def test_free_bits_are_logged_and_refused_where_they_mean_nothing(tmp_path):
    run = tmp_path / "run"
    assert aevb_cli("train", "--out", run, "--latent-dim", 2, "--hidden", 16, "--device", "cpu", "-q",
                    "--free-bits", 0.5, "--beta-schedule", "cyclical", "--beta-cycles", 2, "--steps", 4,
                    "--batch-size", 512, "--log-every", 1) == 0
    import json

    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert [r["beta"] for r in steps] == [0.0, 1.0, 0.0, 1.0]
    for r in steps:
        assert r["kl_free_bits"] >= 2 * 0.5 - 1e-6
        assert r["loss"] == pytest.approx(r["reconstruction"] + r["beta"] * r["kl_free_bits"], rel=1e-5)
    assert aevb.load(run / "model").free_bits == 0.5
    from aevb.config import make_config
    from aevb.config import check_model_options

    with pytest.raises(UserError, match="--free-bits does not apply to --model iwae"):
        check_model_options(make_config(model="iwae", free_bits=0.5))
    with pytest.raises(UserError, match="--beta-warmup does not apply to --model ae"):
        check_model_options(make_config(model="ae", beta_warmup=10))
    with pytest.raises(UserError, match="factorising|per latent dimension"):
        aevb.VAE(data_shape=SHAPE, latent_dim=2, prior="mog", free_bits=0.5)


# ---------------------------------------------------------------------------
# priors


@pytest.mark.parametrize("prior", ["mog", "vamp"])
def test_mixture_priors_train_sample_and_round_trip(prior, tmp_path):
    torch.manual_seed(0)
    model = aevb.VAE(data_shape=SHAPE, latent_dim=3, hidden=[16], prior=prior, prior_args={"components": 4})
    x = batch()
    p = model.prior()
    z = torch.randn(5, 3)
    # the density is the mixture of its components, computed here by hand
    if prior == "mog":
        loc, scale, logits = model.prior_module.loc, model.prior_module.log_scale.exp(), model.prior_module.logits
    else:
        q = model.encode(model.prior_module.pseudo_inputs)
        loc, scale, logits = q.mean, q.stddev, torch.zeros(4)
    components = Normal(loc, scale).log_prob(z[:, None, :]).sum(-1)  # [5, K]
    torch.testing.assert_close(p.log_prob(z), torch.logsumexp(components + logits.log_softmax(-1), -1))
    # KL by Monte Carlo from the same z as the reconstruction term; gradients reach the prior's parameters
    out = model.loss(x)
    out.loss.backward()
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in model.prior_module.parameters())
    # sampling is seeded through the generator
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(model.sample(6, generator=g1), model.sample(6, generator=g2))
    # the ELBO is below the importance-sampled log-likelihood on average
    torch.manual_seed(2)
    with torch.no_grad():
        assert model.elbo(x, n_samples=20).mean() < model.log_likelihood(x, n_samples=200).mean()
    model.save(tmp_path / "m")
    loaded = aevb.load(tmp_path / "m")
    assert loaded.config["prior"] == prior and loaded.config["prior_args"] == {"components": 4}
    torch.testing.assert_close(loaded.prior().log_prob(z), model.prior().log_prob(z))
    torch.manual_seed(5)
    a = model.log_likelihood(x, n_samples=10)
    torch.manual_seed(5)
    torch.testing.assert_close(loaded.log_likelihood(x, n_samples=10), a)
    metrics = aevb.evaluate(loaded, x, iw_samples=10)
    assert metrics["kl_per_dim"] is None and metrics["prior"] == prior and math.isfinite(metrics["nll"])


# ---------------------------------------------------------------------------
# the autoencoder variants


@pytest.mark.parametrize("corruption", ["gaussian", "masking", "salt-and-pepper"])
def test_dae_loss_compares_the_reconstruction_of_the_corrupted_input_with_the_clean_one(corruption):
    torch.manual_seed(0)
    model = aevb.DenoisingAE(data_shape=SHAPE, latent_dim=3, hidden=[16], corruption=corruption, noise_level=0.4)
    x = batch()
    torch.manual_seed(1)
    out = model.loss(x)
    torch.manual_seed(1)
    u = torch.rand(x.shape) if corruption != "gaussian" else None
    if corruption == "gaussian":
        noisy = x + 0.4 * torch.randn(x.shape)
    elif corruption == "masking":
        noisy = torch.where(u < 0.4, 0.0, x)
    else:
        noisy = torch.where(u < 0.4, (torch.rand(x.shape) < 0.5).float(), x)
    assert not torch.equal(noisy, x)
    logits = model.decoder(model.encoder(noisy))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1).mean()
    torch.testing.assert_close(out.loss, expected)
    if corruption != "gaussian":  # 40% of the values are hit; half of those (binary x) change
        assert 0.1 < (noisy != x).float().mean().item() < 0.3


@pytest.mark.parametrize("sparsity", ["l1", "kl"])
def test_sparse_ae_loss_is_its_definition(sparsity):
    torch.manual_seed(0)
    model = aevb.SparseAE(data_shape=SHAPE, latent_dim=5, hidden=[16], sparsity=sparsity, sparsity_weight=0.3,
                          sparsity_target=0.1)
    x = batch()
    out = model.loss(x)
    code = model.encoder(x)  # [B, D]
    rec = torch.nn.functional.binary_cross_entropy_with_logits(model.decoder(code), x, reduction="none").flatten(1).sum(1).mean()
    if sparsity == "l1":
        penalty = code.abs().sum(1).mean()
    else:
        rho_hat = torch.sigmoid(code).mean(0)
        penalty = sum(0.1 * math.log(0.1 / r) + 0.9 * math.log(0.9 / (1 - r)) for r in rho_hat.tolist())
    torch.testing.assert_close(out.loss, rec + 0.3 * torch.as_tensor(penalty, dtype=torch.float32))
    metrics = aevb.evaluate(model, x)
    assert 0 <= metrics["code_near_zero_fraction"] <= 1 and metrics["code_l1"] > 0


def test_contractive_penalty_is_the_frobenius_norm_of_the_encoder_jacobian():
    torch.manual_seed(0)
    model = aevb.ContractiveAE(data_shape=(6,), latent_dim=3, hidden=[8], likelihood="gaussian", jacobian="exact",
                               contractive_weight=0.5)
    x = torch.randn(4, 6)
    jacobians = [torch.autograd.functional.jacobian(lambda v: model.encoder(v[None])[0], x[i]) for i in range(4)]
    expected = torch.stack([j.pow(2).sum() for j in jacobians]).mean()  # each j [D, 6]
    out = model.loss(x)
    torch.testing.assert_close(out.extras["contractive"], expected)
    rec = (0.5 * (model.decoder(model.encoder(x)) - x) ** 2 + 0.5 * math.log(2 * math.pi)).sum(1).mean()
    torch.testing.assert_close(out.loss, rec + 0.5 * expected)
    out.loss.backward()  # the penalty is differentiable (create_graph)
    # random projections: unbiased, so their mean over many draws is the exact value
    inputs = x.clone().requires_grad_(True)
    code = model.encode(inputs).mean
    torch.manual_seed(1)
    model.jacobian_projections = 4000
    estimate = model.jacobian_norm(inputs, code, exact=False)
    torch.testing.assert_close(estimate, expected, rtol=0.05, atol=0)


def test_explore_writes_the_denoising_figure_for_a_dae_run(tmp_path):
    run = tmp_path / "dae"
    assert aevb_cli("train", "--out", run, "--model", "dae", "--corruption", "masking", "--noise-level", 0.5,
                    "--latent-dim", 2, "--hidden", 16, "--device", "cpu", "-q", "--steps", 2, "--batch-size", 512) == 0
    assert aevb_cli("explore", run, "--device", "cpu") == 0
    assert png_size(run / "images" / "denoising.png")[0] > 100
    with pytest.raises(UserError, match="--noise-level does not apply to --model vae"):
        from aevb.config import make_config
        from aevb.config import check_model_options

        check_model_options(make_config(model="vae", noise_level=0.5))


# ---------------------------------------------------------------------------
# the hierarchical VAE


def test_hvae_loss_is_its_definition_and_its_elbo_is_below_its_log_likelihood():
    torch.manual_seed(0)
    model = aevb.HVAE(data_shape=SHAPE, latent_dim=3, hidden=[16], stochastic_layers=2, beta=0.5)
    x = batch(32)
    torch.manual_seed(1)
    out = model.loss(x)
    torch.manual_seed(1)
    d1 = model.encoder(x)
    d2 = model.up[0](d1)
    # every layer's parameters are (μ, log σ²); ls* below are log σ
    mu2, ls2 = d2.chunk(2, -1)
    ls2 = ls2 / 2
    z2 = mu2 + ls2.exp() * torch.randn((1, *mu2.shape))[0]
    prior1 = model.down[0](z2)
    mu1p, ls1p = prior1.chunk(2, -1)
    mu1q, ls1q = (prior1 + d1).chunk(2, -1)
    ls1p, ls1q = ls1p / 2, ls1q / 2
    z1 = mu1q + ls1q.exp() * torch.randn(mu1q.shape)

    def kl(mq, lq, mp, lp):  # KL(N(mq, e^{2lq}) ‖ N(mp, e^{2lp})) summed over dimensions
        return (lp - lq + (torch.exp(2 * lq) + (mq - mp) ** 2) / (2 * torch.exp(2 * lp)) - 0.5).sum(-1)

    kl2 = kl(mu2, ls2, torch.zeros_like(mu2), torch.zeros_like(ls2))
    kl1 = kl(mu1q, ls1q, mu1p, ls1p)
    rec = torch.nn.functional.binary_cross_entropy_with_logits(model.decoder(z1), x, reduction="none").flatten(1).sum(1)
    torch.testing.assert_close(out.loss, rec.mean() + 0.5 * (kl1 + kl2).mean())
    torch.testing.assert_close(out.extras["kl_layer1"], kl1.mean())
    torch.testing.assert_close(out.extras["kl_layer2"], kl2.mean())
    # a few steps of training so the layers are used, then ELBO ≤ importance-sampled log p(x) on average
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        optimizer.zero_grad()
        model.loss(x).loss.backward()
        optimizer.step()
    torch.manual_seed(2)
    with torch.no_grad():
        elbo, log_px = model.elbo(x, n_samples=50).mean(), model.log_likelihood(x, n_samples=500).mean()
    assert elbo < log_px
    metrics = aevb.evaluate(model, x, iw_samples=20)
    assert len(metrics["kl_per_layer"]) == 2 and len(metrics["active_units_per_layer"]) == 2
    assert metrics["kl_per_dim"] is None
    assert aevb.evaluate(model, x[:1], iw_samples=4)["active_units_per_layer"] is None  # no variance over one


def test_hvae_checks_its_arguments_as_every_model_does():
    model = aevb.HVAE(data_shape=SHAPE, latent_dim=3, hidden=[16], stochastic_layers=2)
    for call, match in ((lambda: model.elbo(batch(2), n_samples=0), "n_samples"),
                        (lambda: model.elbo(batch(2)[:0]), "empty batch"),
                        (lambda: model.sample(0), "number of samples"),
                        (lambda: model.sample(2, temperature=float("nan")), "finite")):
        with pytest.raises(UserError, match=match):
            call()
    # a fixed top layer draws nothing: the generator's next draw is the one below's
    fixed = torch.zeros(2, 3)
    held = model.sample_layers(2, torch.Generator().manual_seed(0), fixed={2: fixed})
    assert torch.equal(held[1], fixed)
    below = model._normal(model._run(model.down[0], fixed))
    eps = torch.randn(below.mean.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(held[0], below.mean + below.stddev * eps)


def test_three_layer_hvae_trains_from_the_command_line(tmp_path):
    run = tmp_path / "hvae"
    assert aevb_cli("train", "--out", run, "--model", "hvae", "--stochastic-layers", 3, "--latent-dim", 2,
                    "--hidden", 16, "--device", "cpu", "-q", "--steps", 2, "--batch-size", 512, "--log-every", 1) == 0
    import json

    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"kl_layer1", "kl_layer2", "kl_layer3"} <= set(record)
    assert aevb.load(run / "model").layers == 3


def test_hvae_layer_variation_holds_the_layers_above_and_decodes_what_it_shows(tmp_path):
    from aevb.analysis import figures

    torch.manual_seed(0)
    model = aevb.HVAE(data_shape=(1, 8, 8), latent_dim=3, hidden=[16], stochastic_layers=3).eval()
    rows, cols = 2, 4
    out = figures.layer_variation(model, tmp_path / "layers.png", rows=rows, cols=cols)
    assert (tmp_path / "layers.png").stat().st_size > 0
    assert sorted(out["images"]) == [1, 2, 3]
    for layer, zs in out["codes"].items():
        # decoded images are exactly the decoder means of the bottom codes
        expected = model.decode(zs[0]).mean.reshape(rows, cols, 1, 8, 8)
        assert torch.allclose(out["images"][layer], expected, atol=1e-6)
        varied = zs[layer - 1].reshape(rows, cols, -1)
        assert not torch.allclose(varied[:, 0], varied[:, 1])  # the layer itself changes along a row
        for upper in range(layer + 1, 4):
            held = zs[upper - 1].reshape(rows, cols, -1)
            assert torch.equal(held, held[:, :1].expand_as(held))  # layers above are held in each row


# ---------------------------------------------------------------------------
# what every model declares about itself (read by evaluation and the figures, never probed)


@pytest.mark.parametrize("name", ["ae", "dae", "sparse-ae", "cae", "vae", "iwae", "hvae"])
def test_every_model_declares_its_layers_corruption_and_device(name):
    torch.manual_seed(0)
    model = aevb.build_model(name, data_shape=SHAPE, latent_dim=3, hidden=[16]).eval()
    x = batch(4)
    layers = 2 if name == "hvae" else 1
    assert model.stochastic_layers == layers and model.device == torch.device("cpu")
    posteriors = model.layer_posteriors(x)  # bottom first: z_1's is encode(x)'s
    assert len(posteriors) == layers and all(q.mean.shape == (4, 3) for q in posteriors)
    torch.testing.assert_close(posteriors[0].mean, model.encode(x).mean)
    zs = model.sample_layers(5, torch.Generator().manual_seed(0))
    assert len(zs) == layers and all(z.shape == (5, 3) for z in zs)
    # sample decodes z_1 of the same draws
    torch.testing.assert_close(model.sample(5, torch.Generator().manual_seed(0)), model.decode(zs[0]).mean)
    assert model.input_corruption() == ("gaussian 0.3" if name == "dae" else None)


def test_layer_statistics_of_a_one_layer_model_are_its_kl_and_active_units():
    from aevb.analysis.posteriors import active_units, layer_statistics, posterior_statistics

    torch.manual_seed(0)
    model = aevb.VAE(data_shape=SHAPE, latent_dim=3, hidden=[16]).eval()
    x = batch(32)
    stats = layer_statistics(model, x, batch_size=10)  # the standard normal prior: an analytic KL
    with torch.no_grad():
        kl = objectives.elbo_terms(model, x).kl.mean()
    assert stats["kl_per_layer"] == pytest.approx([float(kl)], rel=1e-5)
    assert stats["active_units_per_layer"] == [int(active_units(posterior_statistics(model, x)["mean"]).sum())]
