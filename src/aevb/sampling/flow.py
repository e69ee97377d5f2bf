"""A normalising flow fitted to a trained model's codes: neural spline flows (Durkan et al. 2019) from zuko.

    z = m + s ⊙ f⁻¹(u),  u ~ N(0, T² I)

f is zuko's ``NSF`` (autoregressive rational-quadratic splines, with MADE
conditioners) on the codes standardised per dimension (m, s: the mean and
standard deviation of the training codes), trained by maximum likelihood
with Adam; a held-out part of the codes stops the training once its
log-likelihood has not improved for ``patience`` epochs, and the best
epoch's weights are kept.  Saved as the flow's state dict (safetensors) and
its options (JSON), from which the same flow is rebuilt.  The temperature T
scales the base distribution; T = 0 gives the one code f⁻¹(0).
"""

from __future__ import annotations

import torch

from aevb.options import Option
from aevb.registry import SAMPLERS
from aevb.sampling.samplers import (FIT_EPOCHS, HELD_OUT, PATIENCE, Sampler, fit_by_gradient, noise_device,
                                    split_held_out)


def build_flow(features: int, transforms: int, hidden_units: list[int], seed: int = 0) -> torch.nn.Module:
    """An untrained zuko NSF over ``features`` dimensions, its initial weights drawn from ``seed`` (torch's
    global stream untouched)."""
    import zuko  # imported by the flow alone: the other samplers and --help need none of it

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return zuko.flows.NSF(features, transforms=transforms, hidden_features=tuple(hidden_units))


@SAMPLERS.register("flow")
class FlowSampler(Sampler):
    """A neural spline flow trained on the codes; T scales its base distribution N(0, I)."""

    options = (
        Option("transforms", 3, "flow: autoregressive spline transforms", low=1, high=32, metavar="N"),
        Option("hidden_units", [64, 64], "flow: hidden units of each transform's network, comma-separated",
               kind="list[int]", low=1, high=4096, metavar="N,N"),
        FIT_EPOCHS,
        HELD_OUT,
        PATIENCE,
    )

    def __init__(self, flow: torch.nn.Module, loc: torch.Tensor, scale: torch.Tensor, description: dict):
        self.flow = flow.eval()
        self.loc, self.scale = loc, scale  # [D] each: the codes' mean and standard deviation
        self.description = description  # the options and what the training found

    def sample(self, n, generator=None, temperature=1.0):
        device = noise_device(generator)
        u = temperature * torch.randn(n, len(self.loc), generator=generator, device=device)  # [n, D]
        flow = self.flow.to(device)
        with torch.no_grad():
            standardized = flow().transform.inv(u)  # [n, D]
        return self.loc.to(device) + self.scale.to(device) * standardized

    def log_prob(self, z):
        with torch.no_grad():
            standardized = (z.cpu().float() - self.loc) / self.scale
            return self.flow.cpu()().log_prob(standardized) - self.scale.log().sum()

    @classmethod
    def fit(cls, codes, seed=0, *, transforms=3, hidden_units=(64, 64), epochs=200, validation=0.1, patience=20):
        codes = codes.float().cpu()  # [N, D]
        generator = torch.Generator().manual_seed(seed)
        train, held_out = split_held_out(codes, validation, generator, "a flow")
        loc, scale = train.mean(0), train.std(0).clamp_min(1e-6)  # a dimension that never varies: kept finite
        train, held_out = (train - loc) / scale, (held_out - loc) / scale
        flow = build_flow(codes.shape[1], transforms, list(hidden_units), seed)
        found = fit_by_gradient(flow, lambda batch: -flow().log_prob(batch).mean(), train, held_out, generator,
                                epochs=epochs, patience=patience)  # standardised codes' nats per example
        description = {"transforms": transforms, "hidden_units": list(hidden_units), "epochs": epochs,
                       "validation": validation, "patience": patience, "features": int(codes.shape[1]),
                       "epochs_run": found["epochs_run"], "best_epoch": found["best_epoch"],
                       "held_out_codes": len(held_out),
                       # in the codes' own units: the standardisation's Jacobian added back
                       "held_out_log_likelihood": -found["held_out_nll"] - scale.log().sum().item()}
        return cls(flow, loc, scale, description)

    def state(self):
        tensors = {f"flow.{name}": value for name, value in self.flow.state_dict().items()}
        return {**tensors, "loc": self.loc, "scale": self.scale}, self.description

    @classmethod
    def restore(cls, tensors, description):
        loc, scale = tensors["loc"].float(), tensors["scale"].float()
        features = int(description["features"])
        if loc.shape != (features,) or scale.shape != (features,) or not (scale > 0).all():
            raise ValueError(f"loc {tuple(loc.shape)} and scale {tuple(scale.shape)} do not fit {features} codes")
        flow = build_flow(features, int(description["transforms"]), [int(h) for h in description["hidden_units"]])
        flow.load_state_dict({name[len("flow."):]: value for name, value in tensors.items()
                              if name.startswith("flow.")})  # strict: a missing or foreign tensor is a RuntimeError
        return cls(flow, loc, scale, description)
