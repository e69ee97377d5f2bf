"""Diagnostics of the aggregate posterior q(z) = (1/N) Σ_n q(z|x_n) over a data set (He et al. 2019, "Lagging
inference networks and posterior collapse in variational autoencoders", https://arxiv.org/abs/1901.05534).

    I(x; z)       = E_x E_{q(z|x)}[log q(z|x)] − E_{q(z)}[log q(z)]     how much z tells about x, under
                                                                         q(x, z) = p_data(x) q(z|x)
    KL(q(z) ‖ p(z)) = E_{q(z)}[log q(z) − log p(z)]                     how far the codes the decoder was
                                                                         trained on are from the prior

One z_i ~ q(z|x_i) per example; log q(z_i) is the log-mean-exp over all N
examples j of log q(z_i|x_j), the example's own posterior among them (He et
al.'s estimator).  That makes both finite-N estimates: I is at most log N
(reached when the posteriors do not overlap), so the number of examples is
reported beside them.  Near that ceiling (a VAE whose posteriors barely
overlap: 7.56 of log 2,000 = 7.60 nats for the MNIST VAE of
``bench/samplers.py``) I is underestimated and KL(q(z) ‖ p(z)) overestimated
by the same amount.  The two add up to the ELBO's KL term,
I + KL(q(z) ‖ p(z)) = E_x KL(q(z|x) ‖ p(z)) (Hoffman & Johnson 2016, "ELBO
surgery"), and their estimates do so draw by draw.

For a posterior that is a product over the latent dimensions (the diagonal
Gaussian) it adds the total correlation of the aggregate posterior,
TC = KL(q(z) ‖ Π_d q(z_d)) = E_{q(z)}[log q(z) − Σ_d log q(z_d)], each
marginal q(z_d) = (1/N) Σ_j q(z_d|x_j) by the same log-mean-exp: what
β-TCVAE and FactorVAE penalise, reported for every such model.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch.distributions import Distribution, Independent

# the pairs (z_i, q(·|x_j)) scored at once: chunk × batch × D numbers
CHUNK = 128


@torch.no_grad()
def aggregate_posterior(posteriors: Sequence[Distribution], prior: Distribution, chunk: int = CHUNK) -> dict:
    """I(x; z) and KL(q(z) ‖ p(z)) in nats from the posteriors of N examples (each a batch [B_k], event [D],
    together the N examples in order) and the prior p(z) (event [D]); one draw of z per example from
    torch's global generator.  Returns ``mutual_information``, ``aggregate_kl`` and
    ``aggregate_posterior_examples`` (N), and ``total_correlation`` where the posteriors are products over the
    dimensions (``Independent``).
    """
    z = torch.cat([q.sample() for q in posteriors])  # [N, D]: z_i ~ q(z|x_i)
    n = z.shape[0]
    own = torch.cat([q.log_prob(zq) for q, zq in zip(posteriors, z.split([q.batch_shape[0] for q in posteriors]))])
    log_aggregate = torch.cat([  # [N]: log q(z_i) = log (1/N) Σ_j q(z_i|x_j)
        torch.cat([q.log_prob(rows[:, None, :]) for q in posteriors], dim=1).logsumexp(dim=1)  # [c, N] → [c]
        for rows in z.split(chunk)]) - math.log(n)
    result = {"mutual_information": (own.double() - log_aggregate.double()).mean().item(),
              "aggregate_kl": (log_aggregate.double() - prior.log_prob(z).double()).mean().item(),
              "aggregate_posterior_examples": n}
    if all(isinstance(q, Independent) for q in posteriors):
        log_marginals = torch.cat([  # [N]: Σ_d log q_d(z_{i,d}), q_d(z_d) = (1/N) Σ_j q(z_d|x_j)
            torch.cat([q.base_dist.log_prob(rows[:, None, :]) for q in posteriors], dim=1)  # [c, N, D]
            .logsumexp(dim=1).double().sum(-1) for rows in z.split(chunk)]) - z.shape[1] * math.log(n)
        result["total_correlation"] = (log_aggregate.double() - log_marginals).mean().item()
    return result
