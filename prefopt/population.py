"""Infinite-data minimizers on a tabular context, for checking trained policies against theory.

One context with K candidates and a free softmax policy pi_theta = softmax(theta). Pairs (y1, y2), y1 != y2,
are drawn uniformly from the K(K-1) orderings and y1 wins with p_12 = pi*(y1) / (pi*(y1) + pi*(y2)). The row
(chosen i, rejected j) comes from the draw (i, j) with i winning and from (j, i) with i winning, so its
weight is w_ij = 2 p_ij / (K(K-1)), and the population loss is exactly
    L(theta) = sum_{i != j} w_ij loss(chosen=i, rejected=j),
with the KL term, where an objective has one, KL(pi_ref || pi_theta) over the K candidates. L-BFGS from the
uniform policy finds the minimizer.
"""

from __future__ import annotations

import itertools

import torch

from prefopt.kl import exact_kl
from prefopt.objectives import OBJECTIVES, Extras, PairLogps


def strength_key(name: str) -> str:
    """The hyperparameter `strength` sets: lam for EXPO, beta for the DPO family."""
    return "lam" if hasattr(OBJECTIVES[name].config(), "lam") else "beta"


def population_minimizer(name: str, pi_star: list[float], pi_ref: list[float], **hparams) -> torch.Tensor:
    """argmin over softmax policies of the exact population loss of OBJECTIVES[name]: pi_theta (K,)."""
    p_star, ref_logps = (
        torch.tensor(pi_star, dtype=torch.float64),
        torch.tensor(pi_ref, dtype=torch.float64).log(),
    )
    k = len(pi_star)
    chosen, rejected = (torch.tensor(ix) for ix in zip(*itertools.permutations(range(k), 2)))
    weights = 2 * p_star[chosen] / (p_star[chosen] + p_star[rejected]) / (k * (k - 1))  # sums to 1
    config = OBJECTIVES[name].config(**hparams)
    theta = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [theta], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logps = torch.log_softmax(theta, 0)  # (K,)
        rows = torch.ones(len(chosen), dtype=torch.float64)
        kl = exact_kl(logps, ref_logps, torch.zeros(k, dtype=torch.long), 1).expand(len(chosen))
        extras = Extras(chosen_tokens=rows, rejected_tokens=rows, labels=rows, kl=kl)
        policy = PairLogps(logps[chosen], logps[rejected])
        reference = PairLogps(ref_logps[chosen], ref_logps[rejected])
        loss = (
            weights * OBJECTIVES[name].loss(policy, reference, extras, **config.loss_kwargs()).losses
        ).sum()
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)
    return torch.softmax(theta.detach(), 0)


def kl_divergence(p: list[float] | torch.Tensor, q: torch.Tensor) -> float:
    """KL(p || q) = sum p log(p / q)."""
    p = torch.as_tensor(p, dtype=torch.float64)
    return float((p * (p / q.double()).log()).sum())
