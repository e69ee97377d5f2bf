"""The autoregressive prior over a VQ-VAE's code: a distribution over every code, one that learns a known code
distribution to its entropy, samples that follow it, a saved fit that draws the same samples, and `aevb sample`
on a VQ-VAE run drawing from it by default."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

import aevb
from aevb.errors import UserError
from aevb.sampling.autoregressive import AutoregressiveCodeSampler, CodeTransformer
from aevb.sampling.samplers import PriorSampler
from conftest import aevb_cli

K, G = 4, 4  # entries, places
FAST = {"layers": 1, "width": 32, "heads": 2, "dropout": 0.0, "epochs": 60, "patience": 8, "validation": 0.2}


def test_the_code_model_is_a_distribution_over_every_code(one_thread):
    torch.manual_seed(0)
    net = CodeTransformer(codebook_size=3, code_length=3, width=16, layers=2, heads=2, dropout=0.0).eval()
    every = torch.tensor(list(itertools.product(range(3), repeat=3)))  # all 27 codes
    with torch.no_grad():
        log_p = net.log_prob(every)
    assert torch.logsumexp(log_p.double(), 0).abs() < 1e-5
    # causal: a place's probability does not depend on the places after it
    with torch.no_grad():
        logits = net(every[:, :-1])  # [27, 3, K]
        changed = every.clone()
        changed[:, 2] = (changed[:, 2] + 1) % 3
        assert torch.allclose(logits[:, :3], net(changed[:, :-1])[:, :3], atol=1e-6)
        changed = every.clone()
        changed[:, 1] = (changed[:, 1] + 1) % 3
        assert torch.allclose(logits[:, :2], net(changed[:, :-1])[:, :2], atol=1e-6)


def _known_codes(n: int, generator: torch.Generator) -> torch.Tensor:
    """Codes [n, G] of a known distribution: c1 uniform over 4, c2 = c1 + 1 (mod 4), c3 uniform over {0, 1},
    c4 = c3 + 2; entropy log 4 + log 2 nats."""
    c1 = torch.randint(K, (n,), generator=generator)
    c3 = torch.randint(2, (n,), generator=generator)
    return torch.stack([c1, (c1 + 1) % K, c3, c3 + 2], dim=1)


ENTROPY = math.log(4) + math.log(2)


@pytest.fixture(scope="module")
def fitted(one_thread):
    generator = torch.Generator().manual_seed(0)
    codebook = torch.randn(K, 2, generator=generator)  # [K, C]
    index = _known_codes(2000, generator)
    codes = codebook[index].reshape(len(index), -1)  # [N, G·C]: what a VQ-VAE's training split gives
    return AutoregressiveCodeSampler.fit(codes, seed=0, codebook=codebook, **FAST), codebook


def test_it_learns_a_known_code_distribution_to_its_entropy(fitted):
    sampler, codebook = fitted
    found = sampler.description
    assert found["code_length"] == G and found["codebook_size"] == K and found["code_dim"] == 2
    assert found["uniform_log_likelihood"] == pytest.approx(-G * math.log(K))
    # the held-out codes' log-probability reaches the negative entropy, far above uniform and per-place frequencies
    assert found["held_out_log_likelihood"] == pytest.approx(-ENTROPY, abs=0.05)
    assert found["frequency_log_likelihood"] < -ENTROPY - 1
    index = sampler.sample_indices(1000, torch.Generator().manual_seed(1))
    follows = (index[:, 1] == (index[:, 0] + 1) % K) & (index[:, 3] == index[:, 2] + 2) & (index[:, 2] < 2)
    assert follows.float().mean() > 0.95  # against 1 in 32 for codes drawn uniformly
    counts = torch.bincount(index[:, 0], minlength=K).float() / 1000
    assert (counts - 0.25).abs().max() < 0.06  # the free place keeps its spread
    z, index = sampler.sample(8, torch.Generator().manual_seed(1)), sampler.sample_indices(8, torch.Generator().manual_seed(1))
    assert z.shape == (8, G * 2) and torch.equal(z.reshape(8, G, 2), codebook[index])  # codebook entries
    with torch.no_grad():
        assert torch.allclose(sampler.log_prob(z), sampler.net.log_prob(index), atol=1e-5)
    assert (sampler.log_prob(z) > -ENTROPY - 0.5).all()


def test_temperature_zero_gives_the_most_probable_code_and_a_seed_the_same_samples(fitted):
    sampler, _ = fitted
    modes = sampler.sample_indices(5, torch.Generator().manual_seed(2), temperature=0)
    assert (modes == modes[0]).all()
    assert torch.equal(sampler.sample(6, torch.Generator().manual_seed(3)),
                       sampler.sample(6, torch.Generator().manual_seed(3)))
    hot = sampler.sample_indices(1000, torch.Generator().manual_seed(4), temperature=3.0)
    broken = ~((hot[:, 1] == (hot[:, 0] + 1) % K) & (hot[:, 3] == hot[:, 2] + 2))
    assert broken.float().mean() > 0.05  # a higher temperature flattens the conditionals


def test_a_saved_fit_draws_the_same_samples(fitted):
    sampler, _ = fitted
    tensors, description = sampler.state()
    loaded = AutoregressiveCodeSampler.restore(tensors, json.loads(json.dumps(description)))
    assert torch.equal(loaded.sample(16, torch.Generator().manual_seed(5)),
                       sampler.sample(16, torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="is not 4 entries of 3"):
        AutoregressiveCodeSampler.restore(tensors, {**description, "code_dim": 3})
    with pytest.raises(RuntimeError):
        AutoregressiveCodeSampler.restore({**tensors, "net.extra": torch.zeros(1)}, description)


def test_one_seed_gives_one_fit(one_thread):
    generator = torch.Generator().manual_seed(0)
    codebook = torch.randn(K, 1, generator=generator)
    codes = codebook[_known_codes(300, generator)].reshape(300, -1)
    options = {**FAST, "epochs": 3, "dropout": 0.1}
    first = AutoregressiveCodeSampler.fit(codes, seed=7, codebook=codebook, **options)
    second = AutoregressiveCodeSampler.fit(codes, seed=7, codebook=codebook, **options)
    for a, b in zip(first.net.state_dict().values(), second.net.state_dict().values()):
        assert torch.equal(a, b)


def test_continuous_codes_are_refused_and_a_vq_vae_is_pointed_at_it():
    ae = aevb.AE(data_shape=(1, 8, 8), latent_dim=3, hidden=[16])
    with pytest.raises(UserError, match="models a discrete code .*--sampler gmm"):
        AutoregressiveCodeSampler.fit_to(ae, torch.randn(20, 3))
    vq = aevb.model.base.build_model("vq-vae", data_shape=(1, 8, 8), latent_dim=4, code_dim=2, codebook_size=8,
                                     hidden=[16])
    with pytest.raises(UserError, match="--sampler autoregressive"):
        PriorSampler(vq)
    with pytest.raises(UserError, match="not divisible by --heads"):
        AutoregressiveCodeSampler.fit(torch.randn(20, 4), codebook=torch.randn(8, 2), width=10, heads=4)


def test_a_vq_vae_samples_from_its_code_prior_from_the_command_line(tmp_path, one_thread, capsys):
    run = tmp_path / "vq"
    assert aevb_cli("train", "--model", "vq-vae", "--latent-dim", "8", "--code-dim", "2", "--codebook-size", "16",
                    "--epochs", "3", "--val-split", "0", "--quiet", "--out", run) == 0
    out = tmp_path / "samples.npy"
    capsys.readouterr()
    assert aevb_cli("sample", run, "-n", 6, "-o", out) == 0  # the default sampler of a VQ-VAE: fitted now
    said = capsys.readouterr().out
    assert "fitting the autoregressive sampler" in said
    samples = np.load(out)
    assert samples.shape == (6, 1, 8, 8) and np.isfinite(samples).all() and samples.std() > 0
    record = json.loads((run / "samplers" / "autoregressive.json").read_text())
    fit = record["fit"]
    assert fit["code_length"] == 4 and fit["codebook_size"] == 16
    # the digits' codes are far from uniform: the prior learnt them
    assert fit["held_out_log_likelihood"] > fit["uniform_log_likelihood"] + 1
    assert aevb_cli("sample", run, "-n", 6, "-o", out) == 0
    assert np.array_equal(np.load(out), samples) and "autoregressive sampler: fitted to" in capsys.readouterr().out
    assert aevb_cli("fit-sampler", run, "--sampler", "autoregressive", "--layers", 1, "--width", 32, "--epochs",
                    5) == 0
    said = capsys.readouterr().out
    assert "held out log likelihood" in said and "uniform log likelihood" in said
    assert json.loads((run / "samplers" / "autoregressive.json").read_text())["options"]["width"] == 32
    assert aevb_cli("report", run, "-k", 2) == 0
    assert (run / "images" / "samples-autoregressive.png").is_file()
    assert "Samples from an autoregressive prior fitted to the codes" in (run / "report.html").read_text()
    assert aevb_cli("sample", run, "--sampler", "prior") == 2
    assert "--sampler autoregressive" in capsys.readouterr().err
    # the explorer offers its draws, codes made of codebook entries
    from aevb.run.open import open_run
    from aevb.serve.explorer import Explorer

    explorer = Explorer.from_run(open_run(run))
    assert list(explorer.samplers) == ["autoregressive"]
    z = torch.tensor(explorer.draw("autoregressive", 3, seed=1)["z"])  # [3, 8]
    codebook = explorer.model.codebook()
    assert torch.cdist(z.reshape(-1, 2), codebook).min(1).values.max() < 1e-5
