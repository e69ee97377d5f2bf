"""aevb.acceleration.optim.Adam: torch's fused Adam with a lean step, bit for bit the same updates."""

from __future__ import annotations

import pytest
import torch

from aevb.acceleration import optim
from aevb.model.vae import VAE


def _model(seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(data_shape=(1, 8, 8), latent_dim=3, arch="mlp", hidden=[16], likelihood="bernoulli")


def _train(model, optimizer, steps: int, x: torch.Tensor, seed: int | None = 1, on_step=None) -> list[float]:
    if seed is not None:
        torch.manual_seed(seed)
    losses = []
    for i in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(x).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(i, optimizer)
    return losses


def _assert_same(a: torch.nn.Module, b: torch.nn.Module, opt_a, opt_b) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(a.parameters(), b.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a.state[p][key], opt_b.state[q][key]), key


X = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.01, "betas": (0.8, 0.99), "eps": 1e-6}, {"maximize": True}])
def test_updates_are_torchs_fused_adam_bit_for_bit(kwargs):
    ours, theirs = _model(), _model()

    def lower_lr(i, opt):  # a learning rate changed between steps is read at the next
        if i == 5:
            for group in opt.param_groups:
                group["lr"] = 3e-4

    opt_ours = optim.Adam(ours.parameters(), lr=1e-2, **kwargs)
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=1e-2, fused=True, **kwargs)
    assert _train(ours, opt_ours, 12, X, on_step=lower_lr) == _train(theirs, opt_theirs, 12, X, on_step=lower_lr)
    _assert_same(ours, theirs, opt_ours, opt_theirs)
    assert opt_ours._lean is not None  # the steps after the first took the lean path


def test_a_parameter_without_gradient_falls_back_to_torchs_step():
    ours, theirs = _model(), _model()
    for model in (ours, theirs):
        next(model.encoder.parameters()).requires_grad_(False)  # frozen: no gradient, no state
    opt_ours = optim.Adam(ours.parameters(), lr=1e-2)
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=1e-2, fused=True)
    assert _train(ours, opt_ours, 6, X) == _train(theirs, opt_theirs, 6, X)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q)
    assert next(ours.encoder.parameters()) not in opt_ours.state


def test_state_dict_round_trip_continues_as_the_uninterrupted_run():
    whole = _model()
    opt_whole = optim.Adam(whole.parameters(), lr=1e-2)
    _train(whole, opt_whole, 10, X)

    first = _model()
    opt_first = optim.Adam(first.parameters(), lr=1e-2)
    _train(first, opt_first, 4, X)
    rng = torch.get_rng_state()
    second = _model(seed=5)
    opt_second = optim.Adam(second.parameters(), lr=1e-2)
    _train(second, opt_second, 2, X)  # its own state and a filled cache, which loading must replace
    second.load_state_dict(first.state_dict())
    opt_second.load_state_dict(opt_first.state_dict())
    torch.set_rng_state(rng)
    _train(second, opt_second, 6, X, seed=None)
    _assert_same(whole, second, opt_whole, opt_second)


def test_step_hooks_run_once_per_step_and_a_scheduler_sets_the_rate():
    ours, theirs = _model(), _model()
    opt_ours = optim.Adam(ours.parameters(), lr=1e-2)
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=1e-2, fused=True)
    calls = []
    opt_ours.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    opt_ours.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    schedulers = [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) for opt in (opt_ours, opt_theirs)]

    def schedule(i, opt):
        schedulers[0 if opt is opt_ours else 1].step()

    assert _train(ours, opt_ours, 7, X, on_step=schedule) == _train(theirs, opt_theirs, 7, X, on_step=schedule)
    assert calls == ["pre", "post"] * 7
    assert opt_ours.param_groups[0]["lr"] == opt_theirs.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 3)
    _assert_same(ours, theirs, opt_ours, opt_theirs)


def test_zero_grad():
    model = _model()
    opt = optim.Adam(model.parameters(), lr=1e-2)
    model.loss(X).loss.backward()
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_training_uses_it():
    from aevb.config import make_config
    from aevb.training.accelerations import make_optimizer

    opt = make_optimizer(_model(), make_config(), torch.device("cpu"))
    assert isinstance(opt, optim.Adam) and opt.param_groups[0]["fused"]


def test_a_grad_scale_set_after_the_cache_is_applied_as_torch_applies_it():
    """GradScaler sets grad_scale / found_inf on a fused optimiser around each step: read each step here too."""
    ours, theirs = _model(), _model()
    opt_ours = optim.Adam(ours.parameters(), lr=1e-2)
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=1e-2, fused=True)
    _train(ours, opt_ours, 3, X)
    _train(theirs, opt_theirs, 3, X)
    assert opt_ours._lean is not None
    for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
        torch.manual_seed(2)
        opt.zero_grad()
        (model.loss(X).loss * 1024).backward()
        opt.grad_scale = torch.tensor(1024.0)  # as GradScaler.step sets it for fused optimisers
        opt.found_inf = torch.tensor(0.0)
        opt.step()
        del opt.grad_scale, opt.found_inf
    _assert_same(ours, theirs, opt_ours, opt_theirs)
    _train(ours, opt_ours, 2, X, seed=3)
    _train(theirs, opt_theirs, 2, X, seed=3)
    _assert_same(ours, theirs, opt_ours, opt_theirs)
