"""Likelihood heads, posteriors and the KL term against closed forms.

Every reference value here is computed with plain tensor maths (no
``torch.distributions``), in float64, so the comparisons are exact up to
rounding.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from aevb.errors import UserError
from aevb.model.likelihoods import SCALE_FLOOR
from aevb.model.posteriors import GaussianPosterior, PointMassPosterior, StandardNormal, standard_normal
from aevb.registry import LIKELIHOODS, POSTERIORS

EXPECTED_LIKELIHOODS = [
    "bernoulli",
    "continuous-bernoulli",
    "gaussian",
    "gaussian-learned",
    "gaussian-optimal",
    "gaussian-diag",
    "laplace",
    "laplace-learned",
]

LOG_2PI = math.log(2 * math.pi)

# (batch and sample dims of params, data shape); x is always [B, *data_shape].
SHAPES = {
    "image": ((2,), (3, 4, 4)),
    "image-samples": ((5, 2), (3, 4, 4)),
    "tabular": ((4,), (7,)),
    "tabular-samples": ((3, 4), (7,)),
}


def sum_event(t: torch.Tensor, event_dims: int) -> torch.Tensor:
    """Sum the trailing ``event_dims`` dimensions."""
    return t.sum(dim=tuple(range(-event_dims, 0)))


def softplus(t: torch.Tensor) -> torch.Tensor:
    """log(1 + e^t), computed stably without torch.nn.functional."""
    return t.clamp(min=0) + torch.log1p(torch.exp(-t.abs()))


def gaussian_log_density(x, loc, scale):
    return -0.5 * ((x - loc) / scale) ** 2 - torch.log(torch.as_tensor(scale, dtype=x.dtype)) - 0.5 * LOG_2PI


def laplace_log_density(x, loc, scale):
    scale = torch.as_tensor(scale, dtype=x.dtype)
    return -(x - loc).abs() / scale - torch.log(2 * scale)


def cb_log_norm(lam: torch.Tensor) -> torch.Tensor:
    """log C(λ), C(λ) = 2·atanh(1 − 2λ) / (1 − 2λ): the continuous Bernoulli normaliser."""
    u = 1 - 2 * lam
    return torch.log(2 * torch.atanh(u) / u)


# ---------------------------------------------------------------------------
# Reference log-densities: (head, params [*S, B, k·C, ...], x [B, C, ...], event_dims) -> [*S, B]


def ref_bernoulli(head, params, x, ed):
    return sum_event(x * params - softplus(params), ed)


def ref_continuous_bernoulli(head, params, x, ed):
    lam = torch.sigmoid(params)
    return sum_event(x * torch.log(lam) + (1 - x) * torch.log1p(-lam) + cb_log_norm(lam), ed)


def ref_gaussian(head, params, x, ed):
    return sum_event(gaussian_log_density(x, params, head.scale), ed)


def ref_gaussian_learned(head, params, x, ed):
    sigma = max(math.exp(head.log_scale.item()), head.floor)
    return sum_event(gaussian_log_density(x, params, sigma), ed)


def ref_gaussian_optimal(head, params, x, ed):
    dims = tuple(range(-ed, 0))
    sq = (x - params) ** 2
    n = math.prod(sq.shape[-ed:])
    sigma = sq.mean(dim=dims).sqrt().clamp(min=head.floor)  # [*S, B]
    return -0.5 * n * LOG_2PI - n * torch.log(sigma) - sq.sum(dim=dims) / (2 * sigma**2)


def ref_gaussian_diag(head, params, x, ed):
    c = params.shape[-ed] // 2  # channels: first half the means, second half the raw scales
    loc, raw = params.narrow(-ed, 0, c), params.narrow(-ed, c, c)
    sigma = softplus(raw) + head.floor
    return sum_event(-0.5 * ((x - loc) / sigma) ** 2 - torch.log(sigma) - 0.5 * LOG_2PI, ed)


def ref_laplace(head, params, x, ed):
    return sum_event(laplace_log_density(x, params, head.scale), ed)


def ref_laplace_learned(head, params, x, ed):
    b = max(math.exp(head.log_scale.item()), head.floor)
    return sum_event(laplace_log_density(x, params, b), ed)


REFERENCE = {
    "bernoulli": ref_bernoulli,
    "continuous-bernoulli": ref_continuous_bernoulli,
    "gaussian": ref_gaussian,
    "gaussian-learned": ref_gaussian_learned,
    "gaussian-optimal": ref_gaussian_optimal,
    "gaussian-diag": ref_gaussian_diag,
    "laplace": ref_laplace,
    "laplace-learned": ref_laplace_learned,
}


def make_head(name: str):
    head = LIKELIHOODS.get(name)().double()
    if hasattr(head, "log_scale"):
        with torch.no_grad():
            head.log_scale.fill_(math.log(0.37))  # away from the default 1.0
    return head


def make_inputs(name: str, head, lead: tuple[int, ...], data_shape: tuple[int, ...], gen):
    """params [*lead, k·C, ...] and x [B, C, ...] suited to the family."""
    k = head.params_per_channel
    params_shape = (*lead, k * data_shape[0], *data_shape[1:])
    x_shape = (lead[-1], *data_shape)
    if name in ("bernoulli", "continuous-bernoulli"):
        # logits with |l| in [0.2, 4]: generic λ, away from the λ = ½ limit
        mag = torch.rand(params_shape, generator=gen, dtype=torch.float64) * 3.8 + 0.2
        sign = torch.randint(0, 2, params_shape, generator=gen).double() * 2 - 1
        params = mag * sign
        x = torch.rand(x_shape, generator=gen, dtype=torch.float64)
    else:
        params = torch.randn(params_shape, generator=gen, dtype=torch.float64)
        x = torch.randn(x_shape, generator=gen, dtype=torch.float64) * 1.5
    return params, x


def test_registry_holds_exactly_the_expected_likelihoods():
    assert sorted(name for name, _ in LIKELIHOODS.items()) == sorted(EXPECTED_LIKELIHOODS)
    assert sorted(LIKELIHOODS.names()) == sorted(EXPECTED_LIKELIHOODS)
    # every registered family has a closed form in this file
    assert set(REFERENCE) == {name for name, _ in LIKELIHOODS.items()}


@pytest.mark.parametrize("shape_case", sorted(SHAPES))
@pytest.mark.parametrize("name", EXPECTED_LIKELIHOODS)
def test_log_prob_matches_closed_form(name, shape_case):
    assert name in dict(LIKELIHOODS.items()), f"likelihood {name!r} is not registered"
    lead, data_shape = SHAPES[shape_case]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{shape_case}".encode()))
    head = make_head(name)
    params, x = make_inputs(name, head, lead, data_shape, gen)
    ed = len(data_shape)

    dist = head(params, ed)
    assert tuple(dist.batch_shape) == lead
    assert tuple(dist.event_shape) == data_shape
    got = dist.log_prob(x)
    assert got.shape == lead  # summed over every data dimension
    assert got.dtype == torch.float64
    expected = REFERENCE[name](head, params, x, ed)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-9)

    sample = dist.sample()
    assert sample.shape == (*lead, *data_shape)
    assert torch.isfinite(sample).all()


def test_every_registered_likelihood_is_checked():
    """A family registered later without a closed form here must fail this test."""
    gen = torch.Generator().manual_seed(0)
    for name, cls in LIKELIHOODS.items():
        assert name in REFERENCE, f"no closed-form reference for likelihood {name!r}"
        head = make_head(name)
        params, x = make_inputs(name, head, (2,), (2, 3, 3), gen)
        torch.testing.assert_close(head(params, 3).log_prob(x), REFERENCE[name](head, params, x, 3))


def test_bernoulli_binary_and_grey():
    gen = torch.Generator().manual_seed(1)
    head = make_head("bernoulli")
    logits = torch.randn(6, 1, 5, 5, generator=gen, dtype=torch.float64) * 3
    binary = (torch.rand(6, 1, 5, 5, generator=gen) > 0.5).double()
    grey = torch.rand(6, 1, 5, 5, generator=gen, dtype=torch.float64)
    dist = head(logits, 3)
    for x in (binary, grey):
        torch.testing.assert_close(dist.log_prob(x), (x * logits - softplus(logits)).sum((1, 2, 3)))
    # for binary x it is the log of the probability of the observed bits
    p = torch.sigmoid(logits)
    direct = torch.where(binary == 1, p, 1 - p).log().sum((1, 2, 3))
    torch.testing.assert_close(dist.log_prob(binary), direct)
    torch.testing.assert_close(dist.mean, torch.sigmoid(logits))


def test_fast_bernoulli_log_prob_matches_torch_in_value_and_gradient():
    """aevb's vectorised Bernoulli log-prob (log, not log1p) against torch's BCE and float64.

    float32 error against the float64 truth is that of torch's own formula
    (about an ulp of the result), at extreme logits too; gradients (x − σ(l)
    for the logits, l for x) agree with autograd through torch's Bernoulli;
    a [S, B, …] batch of logits broadcasts against x [B, …].
    """
    from torch.distributions import Bernoulli

    from aevb.model.likelihoods import FastBernoulli

    gen = torch.Generator().manual_seed(3)
    logits = torch.cat([torch.randn(4, 3, 784, generator=gen) * 6,
                        torch.tensor([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4]).expand(4, 3, 7)], dim=-1)
    x = torch.rand(3, logits.shape[-1], generator=gen)  # grey values, broadcast over the 4 samples
    truth = x.double() * logits.double() - softplus(logits.double())
    ours = FastBernoulli(logits=logits, validate_args=False).log_prob(x)
    theirs = Bernoulli(logits=logits, validate_args=False).log_prob(x)
    assert ours.shape == theirs.shape == (4, 3, logits.shape[-1])
    assert torch.isfinite(ours).all()
    err_ours = (ours.double() - truth).abs()
    err_theirs = (theirs.double() - truth).abs()
    assert err_ours.max() <= 2 * err_theirs.max() + 1e-6
    torch.testing.assert_close(ours.double(), truth, rtol=1e-6, atol=1e-6)

    for dtype in (torch.float64, torch.float32):
        l1 = logits.to(dtype).requires_grad_(True)
        x1 = x.to(dtype).requires_grad_(True)
        l2 = logits.to(dtype).requires_grad_(True)
        x2 = x.to(dtype).requires_grad_(True)
        weight = torch.randn(logits.shape, generator=gen, dtype=dtype)
        (FastBernoulli(logits=l1, validate_args=False).log_prob(x1) * weight).sum().backward()
        (Bernoulli(logits=l2, validate_args=False).log_prob(x2) * weight).sum().backward()
        torch.testing.assert_close(l1.grad, l2.grad)
        torch.testing.assert_close(x1.grad, x2.grad)
    assert torch.autograd.gradcheck(lambda l, v: FastBernoulli(logits=l, validate_args=False).log_prob(v),
                                    (torch.randn(2, 5, dtype=torch.float64, requires_grad=True),
                                     torch.rand(5, dtype=torch.float64, requires_grad=True)))


def test_continuous_bernoulli_normaliser_and_mean():
    head = make_head("continuous-bernoulli")
    logits = torch.tensor([-6.0, -2.0, -0.7, 0.3, 1.5, 5.0], dtype=torch.float64).view(6, 1)
    lam = torch.sigmoid(logits)
    # the density integrates to one: check ∫₀¹ p(x) dx numerically for each λ
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    dist = head(logits.expand(6, 20001).unsqueeze(-1), 1)  # batch [6, 20001], event [1]
    density = dist.log_prob(grid.view(20001, 1)).exp()
    integral = torch.trapezoid(density, grid, dim=-1)
    torch.testing.assert_close(integral, torch.ones(6, dtype=torch.float64), atol=1e-6, rtol=0)
    # mean: λ/(2λ − 1) + 1/(2·atanh(1 − 2λ))
    expected_mean = lam / (2 * lam - 1) + 1 / (2 * torch.atanh(1 - 2 * lam))
    torch.testing.assert_close(head(logits, 1).mean, expected_mean)
    # and that is the mean of the density
    torch.testing.assert_close(torch.trapezoid(density * grid, grid, dim=-1), expected_mean.view(6), atol=1e-6, rtol=0)


def test_continuous_bernoulli_limit_at_half():
    """At λ = ½ the normaliser is 2 (the uniform density); near it, log C ≈ log 2 + u²/3 + 13u⁴/90."""
    head = make_head("continuous-bernoulli")
    x = torch.rand(5, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    at_half = head(torch.zeros(5, 1, dtype=torch.float64), 1)
    torch.testing.assert_close(at_half.log_prob(x), torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(at_half.mean, torch.full((5, 1), 0.5, dtype=torch.float64))
    for logit in (1e-6, -1e-4, 2e-3):
        lam = torch.sigmoid(torch.tensor(logit, dtype=torch.float64))
        u = 1 - 2 * lam
        log_c = math.log(2) + u**2 / 3 + 13 * u**4 / 90
        l = torch.full((5, 1), logit, dtype=torch.float64)
        got = head(l, 1).log_prob(x)
        expected = (x * torch.log(lam) + (1 - x) * torch.log1p(-lam)).sum(-1) + log_c
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


def _cb_reference(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float64 closed forms of the continuous Bernoulli in its logit l (|l| ≥ 1e-3 here)."""
    l = logits.double()
    return {"log_norm": torch.log(l / torch.tanh(l / 2)),
            "mean": 1 / (1 - torch.exp(-l)) - 1 / l,
            "variance": 1 / l**2 - 1 / (4 * torch.sinh(l / 2) ** 2)}


def test_continuous_bernoulli_at_large_logits_in_float32():
    """A trained decoder puts many logits beyond ±16, where torch's clamped λ would freeze the normaliser."""
    head = LIKELIHOODS.get("continuous-bernoulli")()
    logits = torch.tensor([-200.0, -100.0, -30.0, -17.0, -3.0, -0.2, -0.02, 0.05, 0.7, 9.0, 16.5, 40.0, 150.0])
    ref = _cb_reference(logits)
    x = torch.tensor([0.0, 0.3, 1.0])
    leaf = logits.clone().requires_grad_()
    dist = head(leaf.view(-1, 1).expand(-1, 3).unsqueeze(-1), 1)  # batch [13, 3], event [1]
    log_prob = dist.log_prob(x.view(1, 3, 1))
    xl = x.double().view(1, 3) * logits.double().view(-1, 1)
    expected = xl - torch.nn.functional.softplus(logits.double()).view(-1, 1) + ref["log_norm"].view(-1, 1)
    torch.testing.assert_close(log_prob.double(), expected, atol=2e-5, rtol=1e-6)
    # the gradient of Σ log p: x − σ(l) + d log C/dl, with d log C/dl = 1/l − 1/sinh(l)
    log_prob.sum().backward()
    l64 = logits.double()
    d_log_norm = 1 / l64 - 1 / torch.sinh(l64)
    expected_grad = (x.double().view(1, 3) - torch.sigmoid(l64).view(-1, 1) + d_log_norm.view(-1, 1)).sum(1)
    torch.testing.assert_close(leaf.grad.double(), expected_grad, atol=2e-5, rtol=1e-5)
    base = dist.base_dist
    torch.testing.assert_close(base.mean[:, 0, 0].double(), ref["mean"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(base.variance[:, 0, 0].double(), ref["variance"], atol=1e-7, rtol=1e-5)
    samples = base.sample((2000,))
    assert ((samples >= 0) & (samples <= 1)).all()
    # at l = −100 the mean is 1/100, not the 0.063 of a λ clamped at l ≈ −16
    assert abs(samples[:, 1].mean().item() - 0.01) < 0.002


def test_continuous_bernoulli_float64_normalised_with_matching_mean_cdf_and_quantiles():
    logits = torch.tensor([-60.0, -8.0, -0.05, -1e-8, 0.0, 3e-7, 1e-3, 0.4, 25.0], dtype=torch.float64)
    dist = LIKELIHOODS.get("continuous-bernoulli")()(logits.view(-1, 1), 0)  # batch [9, 1]
    base = dist.base_dist if hasattr(dist, "base_dist") else dist
    grid = torch.linspace(0, 1, 200001, dtype=torch.float64)
    density = base.log_prob(grid.view(1, -1).expand(len(logits), -1)).exp()  # [9, G]
    torch.testing.assert_close(torch.trapezoid(density, grid, dim=-1), torch.ones(len(logits), dtype=torch.float64),
                               atol=1e-7, rtol=0)
    torch.testing.assert_close(base.mean.view(-1), torch.trapezoid(density * grid, grid, dim=-1), atol=1e-7, rtol=0)
    second = torch.trapezoid(density * grid**2, grid, dim=-1)
    torch.testing.assert_close(base.variance.view(-1), second - base.mean.view(-1) ** 2, atol=1e-7, rtol=0)
    entropy = -torch.trapezoid(density * density.clamp_min(1e-300).log(), grid, dim=-1)
    torch.testing.assert_close(base.entropy().view(-1), entropy, atol=1e-6, rtol=0)
    u = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.95], dtype=torch.float64)
    # cdf is the integral of the density, and icdf inverts it
    cdf = torch.cumulative_trapezoid(density, grid, dim=-1)
    at = (u * (len(grid) - 1)).round().long()
    torch.testing.assert_close(base.cdf(grid[at].view(1, -1)), cdf[:, at - 1], atol=1e-6, rtol=0)
    moderate = logits.abs() < 10  # beyond, the cdf is within rounding of 0 or 1 over much of [0, 1]
    round_trip = base.icdf(base.cdf(u.view(1, -1)))
    torch.testing.assert_close(round_trip[moderate], u.expand(len(logits), -1)[moderate], atol=1e-10, rtol=0)


def test_gaussian_unit_scale_is_half_sse_plus_constant():
    gen = torch.Generator().manual_seed(4)
    head = make_head("gaussian")
    assert head.scale == 1.0
    loc = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    n = 2 * 4 * 4
    sse = ((x - loc) ** 2).sum((1, 2, 3))
    difference = head(loc, 3).log_prob(x) - (-0.5 * sse)
    torch.testing.assert_close(difference, torch.full((3,), -0.5 * n * LOG_2PI, dtype=torch.float64))
    torch.testing.assert_close(head(loc, 3).mean, loc)


@pytest.mark.parametrize("name", ["gaussian", "laplace"])
def test_fixed_scale_argument_is_used(name):
    gen = torch.Generator().manual_seed(5)
    head = LIKELIHOODS.get(name)(scale=0.3).double()
    loc = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    density = gaussian_log_density if name == "gaussian" else laplace_log_density
    torch.testing.assert_close(head(loc, 1).log_prob(x), density(x, loc, 0.3).sum(-1))
    with pytest.raises(ValueError):
        LIKELIHOODS.get(name)(scale=0.0)


@pytest.mark.parametrize("name", ["gaussian-learned", "laplace-learned"])
def test_learned_scale_value_and_floor(name):
    gen = torch.Generator().manual_seed(6)
    head = LIKELIHOODS.get(name)().double()
    assert isinstance(head.log_scale, torch.nn.Parameter)  # σ is log-parametrised and learned
    density = gaussian_log_density if name == "gaussian-learned" else laplace_log_density
    loc = torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    for log_scale, sigma in ((math.log(2.5), 2.5), (-0.4, math.exp(-0.4)), (math.log(SCALE_FLOOR) - 20, SCALE_FLOOR)):
        with torch.no_grad():
            head.log_scale.fill_(log_scale)
        torch.testing.assert_close(head.scale, torch.tensor(sigma, dtype=torch.float64))
        torch.testing.assert_close(head(loc, 3).log_prob(x), density(x, loc, sigma).sum((1, 2, 3)))
    # the floor stops the density running away when the mean is exact
    with torch.no_grad():
        head.log_scale.fill_(-1e3)
    worst = head(loc, 3).log_prob(loc)
    assert torch.isfinite(worst).all()
    torch.testing.assert_close(worst, density(loc, loc, SCALE_FLOOR).sum((1, 2, 3)))
    # a custom floor is honoured
    floored = LIKELIHOODS.get(name)(floor=0.05).double()
    with torch.no_grad():
        floored.log_scale.fill_(-10.0)
    torch.testing.assert_close(floored.scale, torch.tensor(0.05, dtype=torch.float64))


@pytest.mark.parametrize("name", ["gaussian-learned", "laplace-learned", "gaussian-diag", "gaussian-optimal"])
@pytest.mark.parametrize("floor", [0.0, -0.5, float("nan")])
def test_a_scale_floor_must_be_positive(name, floor):
    # at σ → 0 the density is unbounded: a floor ≤ 0 would give NaN or +∞ log-densities
    with pytest.raises(ValueError, match="floor must be positive"):
        LIKELIHOODS.get(name)(floor=floor)


@pytest.mark.parametrize("name", ["gaussian-learned", "laplace-learned"])
def test_learned_scale_of_a_bf16_head_is_exp_in_float32(name):
    """bf16 holds log σ; σ = exp(log σ) is taken in float32, so 784 pixels' n·log σ stays exact."""
    gen = torch.Generator().manual_seed(9)
    head = LIKELIHOODS.get(name)()
    with torch.no_grad():
        head.log_scale.fill_(-2.3)
    head = head.to(torch.bfloat16)
    log_scale = head.log_scale.detach().double()  # the value the bf16 head holds
    assert head.scale.dtype == torch.float32
    loc = torch.rand(4, 784, generator=gen)
    x = loc + 0.1 * torch.randn(4, 784, generator=gen)
    exact = head.family(loc.double(), log_scale.exp()).log_prob(x.double()).sum(-1)
    torch.testing.assert_close(head(loc, 1).log_prob(x).double(), exact, rtol=0, atol=2e-3)


def test_learned_scale_receives_gradient():
    head = LIKELIHOODS.get("gaussian-learned")()
    loc = torch.zeros(2, 5)
    x = torch.full((2, 5), 3.0)  # residuals ≫ σ = 1: the likelihood wants a larger σ
    (-head(loc, 1).log_prob(x).sum()).backward()
    assert head.log_scale.grad is not None and head.log_scale.grad.item() < 0


@pytest.mark.parametrize("name", ["gaussian-learned", "laplace-learned"])
def test_learned_scale_below_its_floor_climbs_back(name):
    """Adam can carry a log-scale under the floor; the data must still be able to pull it back up."""
    head = LIKELIHOODS.get(name)()
    with torch.no_grad():
        head.log_scale.fill_(math.log(SCALE_FLOOR) - 3)
    loc, x = torch.zeros(4, 50), torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 0.5
    (-head(loc, 1).log_prob(x).sum()).backward()
    assert head.log_scale.grad.item() < 0  # descending raises σ toward the residuals' 0.5
    optimizer = torch.optim.Adam(head.parameters(), lr=0.1)
    for _ in range(100):
        optimizer.zero_grad()
        (-head(loc, 1).log_prob(x).sum()).backward()
        optimizer.step()
    assert head.scale.item() > 3 * SCALE_FLOOR  # a plain clamp leaves it at the floor for good
    # where the data want a smaller σ, the floor holds and no gradient pushes further down
    head.zero_grad()
    with torch.no_grad():
        head.log_scale.fill_(math.log(SCALE_FLOOR) - 3)
    (-head(x, 1).log_prob(x).sum()).backward()
    assert head.log_scale.grad.item() == 0.0
    assert head.scale.item() == pytest.approx(SCALE_FLOOR)


def test_gaussian_optimal_exact_fit_has_finite_gradient():
    head = LIKELIHOODS.get("gaussian-optimal")()
    loc = torch.zeros(2, 6, requires_grad=True)
    x = torch.stack([torch.zeros(6), torch.linspace(-1, 1, 6)])  # example 0 is reconstructed exactly
    (-head(loc, 1).log_prob(x).sum()).backward()
    assert torch.isfinite(loc.grad).all()
    torch.testing.assert_close(loc.grad[0], torch.zeros(6))


def test_gaussian_optimal_is_the_profile_likelihood():
    gen = torch.Generator().manual_seed(7)
    head = make_head("gaussian-optimal")
    loc = torch.randn(4, 3, 4, 4, generator=gen, dtype=torch.float64)
    x = loc + torch.randn(4, 3, 4, 4, generator=gen, dtype=torch.float64) * torch.tensor([0.1, 0.5, 1.0, 3.0], dtype=torch.float64).view(4, 1, 1, 1)
    n = 3 * 4 * 4
    sigma_star = ((x - loc) ** 2).mean((1, 2, 3)).sqrt()  # [B]
    dist = head(loc, 3)
    got = dist.log_prob(x)
    expected = torch.stack([gaussian_log_density(x[b], loc[b], sigma_star[b].item()).sum() for b in range(4)])
    torch.testing.assert_close(got, expected)
    # closed form at σ*: −n/2·log 2π − n·log σ* − n/2
    torch.testing.assert_close(got, -0.5 * n * LOG_2PI - n * sigma_star.log() - 0.5 * n)
    torch.testing.assert_close(dist.base_dist.optimal_scale(x).view(4), sigma_star)
    # it is at least the log-density of every shared-σ Gaussian on the same example
    for sigma in torch.logspace(-3, 1, 60, dtype=torch.float64):
        other = gaussian_log_density(x, loc, sigma.item()).sum((1, 2, 3))
        assert (got >= other - 1e-9).all(), f"σ = {sigma.item():.4g} beats σ*"
    torch.testing.assert_close(dist.mean, loc)
    # floor: an exact reconstruction gives σ* = 0, floored
    exact = dist.log_prob(loc)
    torch.testing.assert_close(exact, torch.full((4,), -0.5 * n * LOG_2PI - n * math.log(SCALE_FLOOR), dtype=torch.float64))


def test_gaussian_optimal_running_scale_tracks_sigma_star_in_training_only():
    head = LIKELIHOODS.get("gaussian-optimal")(momentum=0.5).double()
    loc = torch.zeros(2, 10, dtype=torch.float64)
    x = torch.full((2, 10), 0.2, dtype=torch.float64)  # σ* = 0.2 for both examples
    head.train()
    head(loc, 1).log_prob(x)
    torch.testing.assert_close(head.running_scale, torch.tensor(0.6, dtype=torch.float64))  # 1 → ½(1 + 0.2)
    head.eval()
    head(loc, 1).log_prob(x)
    torch.testing.assert_close(head.running_scale, torch.tensor(0.6, dtype=torch.float64))
    # samples use the running scale
    sample = head(torch.zeros(20000, 1, dtype=torch.float64), 1).sample()
    assert abs(sample.std().item() - 0.6) < 0.02


@pytest.mark.parametrize("data_shape", [(3, 4, 4), (5,)])
def test_gaussian_diag_splits_channels_and_floors(data_shape):
    gen = torch.Generator().manual_seed(8)
    head = make_head("gaussian-diag")
    assert head.params_per_channel == 2
    c = data_shape[0]
    ed = len(data_shape)
    params = torch.randn(2, 2 * c, *data_shape[1:], generator=gen, dtype=torch.float64)
    x = torch.randn(2, *data_shape, generator=gen, dtype=torch.float64)
    loc, raw = params[:, :c], params[:, c:]
    dist = head(params, ed)
    torch.testing.assert_close(dist.mean, loc)
    torch.testing.assert_close(dist.stddev, F.softplus(raw) + SCALE_FLOOR)
    torch.testing.assert_close(dist.log_prob(x), sum_event(gaussian_log_density(x, loc, softplus(raw) + SCALE_FLOOR), ed))
    # a very negative raw scale gives σ = floor exactly, and a finite density at x = μ
    very_small = torch.cat([loc, torch.full_like(raw, -1e4)], dim=1)
    tiny = head(very_small, ed)
    torch.testing.assert_close(tiny.stddev, torch.full_like(loc, SCALE_FLOOR))
    n = math.prod(data_shape)
    torch.testing.assert_close(tiny.log_prob(loc), torch.full((2,), -0.5 * n * LOG_2PI - n * math.log(SCALE_FLOOR), dtype=torch.float64))


@pytest.mark.parametrize("name", EXPECTED_LIKELIHOODS)
def test_mean_and_sample_shapes(name):
    gen = torch.Generator().manual_seed(9)
    head = make_head(name)
    params, _ = make_inputs(name, head, (3, 2), (2, 4, 4), gen)
    dist = head(params, 3)
    mean = dist.mean
    assert mean.shape == (3, 2, 2, 4, 4)
    if name == "bernoulli":
        torch.testing.assert_close(mean, torch.sigmoid(params))
    elif name == "continuous-bernoulli":
        lam = torch.sigmoid(params)
        torch.testing.assert_close(mean, lam / (2 * lam - 1) + 1 / (2 * torch.atanh(1 - 2 * lam)))
    elif name == "gaussian-diag":
        torch.testing.assert_close(mean, params[:, :, :2])
    else:
        torch.testing.assert_close(mean, params)
    assert dist.sample().shape == (3, 2, 2, 4, 4)
    assert dist.sample((7,)).shape == (7, 3, 2, 2, 4, 4)
    if name in ("bernoulli",):
        assert set(dist.sample().unique().tolist()) <= {0.0, 1.0}
    if name == "continuous-bernoulli":
        s = dist.sample()
        assert ((s >= 0) & (s <= 1)).all()


# ---------------------------------------------------------------------------
# Posteriors, prior and KL


def test_registered_posteriors():
    assert {name for name, _ in POSTERIORS.items()} == {"gaussian", "point-mass", "iaf", "planar"}


def test_gaussian_posterior_from_mean_and_log_variance_or_log_scale():
    gen = torch.Generator().manual_seed(10)
    mu = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    log_sigma = torch.randn(5, 3, generator=gen, dtype=torch.float64) * 0.5
    q = GaussianPosterior()(torch.cat([mu, 2 * log_sigma], dim=-1))  # default: (μ, log σ²)
    legacy = GaussianPosterior("log-scale")(torch.cat([mu, log_sigma], dim=-1))
    torch.testing.assert_close(legacy.stddev, log_sigma.exp())
    assert GaussianPosterior().extra_config() == {"scale_param": "log-variance"}
    with pytest.raises(UserError, match="log-variance"):
        GaussianPosterior("sigma")
    assert tuple(q.batch_shape) == (5,) and tuple(q.event_shape) == (3,)
    torch.testing.assert_close(q.mean, mu)
    torch.testing.assert_close(q.stddev, log_sigma.exp())
    z = torch.randn(4, 5, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(q.log_prob(z), gaussian_log_density(z, mu, log_sigma.exp()).sum(-1))
    assert q.rsample((4,)).shape == (4, 5, 3)
    # reparameterised: gradients reach μ and log σ through the sample
    params = torch.cat([mu, log_sigma], dim=-1).requires_grad_()
    GaussianPosterior()(params).rsample((2,)).sum().backward()
    assert (params.grad[:, :3] == 2).all() and (params.grad[:, 3:] != 0).all()


def test_log_scale_normal_is_torchs_normal_that_keeps_log_sigma():
    """The posterior's Normal reads log σ where torch's takes log(σ): same values, gradients, samples and shapes."""
    from torch.distributions import Normal, kl_divergence

    from aevb.model.posteriors import LogScaleNormal

    gen = torch.Generator().manual_seed(21)
    loc = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    log_scale = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    z = torch.randn(4, 5, 3, generator=gen, dtype=torch.float64) * 2
    other = Normal(torch.randn(5, 3, dtype=torch.float64), torch.rand(5, 3, dtype=torch.float64) + 0.5)

    def terms(make):
        leaf_loc, leaf_log_scale = loc.clone().requires_grad_(True), log_scale.clone().requires_grad_(True)
        q = make(leaf_loc, leaf_log_scale)
        torch.manual_seed(5)
        sample = q.rsample((2,))
        values = (q.log_prob(z), q.entropy(), kl_divergence(q, other), sample)
        sum(v.sum() for v in values).backward()
        return (*values, leaf_loc.grad, leaf_log_scale.grad)

    ours = terms(LogScaleNormal)
    for a, b in zip(ours, terms(lambda m, s: Normal(m, s.exp()))):
        torch.testing.assert_close(a, b)
    q = LogScaleNormal(loc, log_scale)
    assert q.batch_shape == (5, 3) and q.log_scale is log_scale
    torch.testing.assert_close(q.scale, log_scale.exp())
    wide = q.expand((2, 5, 3))  # a custom __init__ needs its own expand
    assert isinstance(wide, LogScaleNormal) and wide.batch_shape == (2, 5, 3)
    torch.testing.assert_close(wide.log_prob(z[:2]), q.log_prob(z[:2]))
    # parameters that differ in shape broadcast as torch's do
    row = LogScaleNormal(loc[0], log_scale)
    assert row.batch_shape == (5, 3)
    torch.testing.assert_close(row.log_prob(z), Normal(loc[0], log_scale.exp()).log_prob(z))


def test_fast_bernoulli_is_a_bernoulli():
    from torch.distributions import Bernoulli

    from aevb.model.likelihoods import FastBernoulli

    logits = torch.randn(2, 3, 4)
    ours, torchs = FastBernoulli(logits=logits), Bernoulli(logits=logits)
    assert ours.batch_shape == torchs.batch_shape == (2, 3, 4)
    for name in ("probs", "mean", "variance", "logits"):
        torch.testing.assert_close(getattr(ours, name), getattr(torchs, name))
    assert ours.expand((5, 2, 3, 4)).batch_shape == (5, 2, 3, 4)
    with pytest.raises(ValueError):
        FastBernoulli(logits=torch.tensor([float("nan")]), validate_args=True)


def test_point_mass_posterior():
    gen = torch.Generator().manual_seed(11)
    loc = torch.randn(4, 3, generator=gen)
    q = PointMassPosterior()(loc)
    assert PointMassPosterior.has_density is False
    assert tuple(q.batch_shape) == (4,) and tuple(q.event_shape) == (3,)
    assert torch.equal(q.mean, loc)
    assert torch.equal(q.stddev, torch.zeros_like(loc))
    assert torch.equal(q.rsample(), loc)
    assert torch.equal(q.rsample((2,)), loc.expand(2, 4, 3))
    with pytest.raises(NotImplementedError):
        q.log_prob(loc)


def test_standard_normal_prior():
    like = torch.zeros((), dtype=torch.float64)
    p = standard_normal(4, like)
    assert tuple(p.event_shape) == (4,) and tuple(p.batch_shape) == ()
    z = torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(p.log_prob(z), (-0.5 * z**2 - 0.5 * LOG_2PI).sum(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_standard_normal_closed_forms_equal_torchs_normal_in_value_and_gradient(dtype):
    """The prior's own KL and log-density are torch's Normal(0, 1) ones, gradients included."""
    gen = torch.Generator().manual_seed(3)
    params = torch.randn(5, 8, generator=gen, dtype=dtype) * 2
    z = torch.randn(7, 5, 4, generator=gen, dtype=dtype) * 3

    def terms(prior):
        leaf, zz = params.clone().requires_grad_(True), z.clone().requires_grad_(True)
        q = GaussianPosterior()(leaf)
        kl = torch.distributions.kl_divergence(q, prior)  # [5]
        log_pz = prior.log_prob(zz)  # [7, 5]
        (kl.sum() + (log_pz * torch.arange(5, dtype=dtype)).sum()).backward()
        return kl, log_pz, leaf.grad, zz.grad

    zeros = torch.zeros(4, dtype=dtype)
    general = torch.distributions.Independent(torch.distributions.Normal(zeros, torch.ones_like(zeros)), 1)
    prior = standard_normal(4, zeros)
    assert isinstance(prior.base_dist, StandardNormal)
    for ours, torchs in zip(terms(prior), terms(general)):
        torch.testing.assert_close(ours, torchs)
    # a value narrower than the batch shape broadcasts as torch's does
    wide = torch.distributions.Normal(torch.zeros(3, 4, dtype=dtype), torch.ones(3, 4, dtype=dtype))
    torch.testing.assert_close(StandardNormal(torch.zeros(3, 4, dtype=dtype)).log_prob(z[0, 0]), wide.log_prob(z[0, 0]))


def test_kl_analytic_and_monte_carlo():
    gen = torch.Generator().manual_seed(12)
    mu = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    log_sigma = torch.randn(4, 3, generator=gen, dtype=torch.float64) * 0.5
    q = GaussianPosterior()(torch.cat([mu, 2 * log_sigma], dim=-1))
    p = standard_normal(3, mu)
    kl = torch.distributions.kl_divergence(q, p)
    closed = 0.5 * (mu**2 + (2 * log_sigma).exp() - 1 - 2 * log_sigma).sum(-1)
    assert kl.shape == (4,)
    torch.testing.assert_close(kl, closed)

    torch.manual_seed(13)
    n = 200_000
    z = q.sample((n,))  # [n, 4, 3]
    ratio = q.log_prob(z) - p.log_prob(z)  # [n, 4]
    estimate = ratio.mean(0)
    stderr = ratio.std(0) / math.sqrt(n)
    assert (stderr < 0.02).all()
    assert ((estimate - closed).abs() < 4 * stderr).all(), (estimate, closed, stderr)
