"""VQ-VAE: nearest-entry quantisation, the straight-through gradient, the moving-average codebook and its
restarts, perplexity, and a run from the command line."""

from __future__ import annotations

import json

import pytest
import torch

import aevb
from aevb.errors import UserError
from aevb.model.base import build_model
from aevb.model.vq import VectorQuantizer, perplexity
from conftest import aevb_cli

SHAPE = (1, 8, 8)


def vq(**options):
    torch.manual_seed(0)
    return build_model("vq-vae", data_shape=SHAPE, latent_dim=6, code_dim=2, codebook_size=8, hidden=[16], **options)


def test_each_vector_goes_to_its_nearest_entry():
    model = vq()
    z_e = torch.randn(5, 6)
    index, z_q = model.quantize(z_e)
    assert index.shape == (5, 3) and z_q.shape == (5, 6)
    vectors = z_e.reshape(15, 2)
    distances = ((vectors[:, None, :] - model.quantizer.codebook[None]) ** 2).sum(-1)  # [15, 8]
    assert torch.equal(index.reshape(-1), distances.argmin(1))
    assert torch.equal(z_q.reshape(15, 2), model.quantizer.codebook[index.reshape(-1)])


def test_loss_is_reconstruction_at_z_q_plus_commitment_with_a_straight_through_gradient():
    model = vq(commitment_weight=0.5)
    model.eval()  # no codebook update, so that the reference below sees the same codebook
    x = torch.rand(4, *SHAPE).round()
    out = model.loss(x)
    z_e = model.encode_continuous(x)
    _, z_q = model.quantize(z_e)
    reconstruction = -model.decode(z_q).log_prob(x).mean()
    commitment = (z_e - z_q).square().sum(-1).mean()
    assert out.loss.item() == pytest.approx((reconstruction + 0.5 * commitment).item(), rel=1e-6)
    # the encoder's gradient: the decoder's with respect to its input, as if z_e had been decoded, plus the commitment's
    out.loss.backward()
    assert isinstance(model.encoder, torch.nn.Sequential)  # the MLP: its last layer outputs z_e
    got = model.encoder[-1].weight.grad.clone()
    model.zero_grad()
    z_e = model.encode_continuous(x)
    z_q_leaf = z_q.detach().requires_grad_(True)
    (-model.decode(z_q_leaf).log_prob(x).mean()).backward()
    surrogate = (z_q_leaf.grad * z_e).sum() + 0.5 * (z_e - z_q.detach()).square().sum(-1).mean()
    model.zero_grad()
    surrogate.backward()
    torch.testing.assert_close(got, model.encoder[-1].weight.grad)
    assert out.kl == 0 and "perplexity" in out.extras


def test_the_moving_averages_follow_the_assigned_means():
    quantizer = VectorQuantizer(codebook_size=3, code_dim=2, decay=0.0, dead_threshold=0.0)
    vectors = torch.tensor([[[1.0, 1.0], [3.0, 1.0]], [[-2.0, 0.0], [-2.0, 2.0]]])  # [B=2, G=2, C=2]
    index = torch.tensor([[0, 0], [1, 1]])
    quantizer.update(vectors, index)
    # decay 0: each used entry is the mean of its vectors (to the smoothing's 1e-5)
    torch.testing.assert_close(quantizer.codebook[0], torch.tensor([2.0, 1.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(quantizer.codebook[1], torch.tensor([-2.0, 1.0]), atol=1e-4, rtol=0)
    slow = VectorQuantizer(codebook_size=3, code_dim=2, decay=0.9, dead_threshold=0.0)
    before = slow.codebook[0].clone()
    slow.update(vectors, index)
    # count 0.9·1 + 0.1·2, sum 0.9·e + 0.1·(4, 2): the entry moves a little towards (2, 1)
    expected = (0.9 * before + 0.1 * torch.tensor([4.0, 2.0])) / 1.1
    torch.testing.assert_close(slow.codebook[0], expected, atol=1e-4, rtol=1e-4)


def test_an_unused_entry_restarts_at_an_encoder_output():
    quantizer = VectorQuantizer(codebook_size=4, code_dim=2, decay=0.5, dead_threshold=0.6)
    vectors = torch.randn(3, 2, 2)
    index = torch.zeros(3, 2, dtype=torch.long)  # everything on entry 0: 1, 2 and 3 fall to a count of 0.5
    restarted = quantizer.update(vectors, index)
    assert restarted.item() == 3
    candidates = vectors.reshape(-1, 2)
    for entry in (1, 2, 3):
        assert any(torch.equal(quantizer.codebook[entry], v) for v in candidates)
    assert quantizer.ema_count[1:].eq(1.0).all()


def test_perplexity_counts_the_entries_in_use():
    assert perplexity(torch.tensor([0, 1, 2, 3] * 5), 8).item() == pytest.approx(4.0)
    assert perplexity(torch.zeros(10, dtype=torch.long), 8).item() == pytest.approx(1.0)


def test_a_latent_dimension_that_is_no_whole_number_of_vectors_is_refused():
    with pytest.raises(UserError, match="divisible"):
        build_model("vq-vae", data_shape=SHAPE, latent_dim=5, code_dim=2)


def test_vq_vae_trains_evaluates_samples_and_reloads(tmp_path, one_thread):
    run = tmp_path / "vq"
    assert aevb_cli("train", "--model", "vq-vae", "--latent-dim", "8", "--code-dim", "2", "--codebook-size", "16",
                    "--epochs", "3", "--val-split", "0", "--quiet", "--out", run) == 0
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "loss" in m]
    assert steps[-1]["reconstruction"] < steps[0]["reconstruction"]
    assert 1 <= steps[-1]["perplexity"] <= 16 and 0 < steps[-1]["codebook_usage"] <= 1
    assert aevb_cli("eval", run) == 0
    evaluation = json.loads((run / "eval.json").read_text())
    assert "nll" not in evaluation and "neg_elbo" not in evaluation  # no density of x
    assert 0 < evaluation["codebook_usage"] <= 1 and 1 <= evaluation["codebook_perplexity"] <= 16
    model = aevb.load(run / "model")
    assert torch.equal(model.quantizer.codebook, aevb.load(run / "model").quantizer.codebook)
    assert model.sample(3).shape == (3, *SHAPE)
    x = torch.rand(4, *SHAPE).round()
    codes = model.codes(x)
    assert codes.shape == (4, 4) and torch.equal(model.decode_codes(codes).mean, model.reconstruct(x))
