"""Exact minimizers on a tabular context, for checking trained policies against theory.

One context with K candidates and a free softmax policy pi_theta = softmax(theta). A preference data set
on it is a (K, K) table of pair weights w_ij >= 0 (chosen i, rejected j; zero diagonal, summing to 1), and
the loss of an objective is exactly
    L(theta) = sum_{i != j} w_ij loss(chosen=i, rejected=j),
with the KL term, where an objective has one, KL(pi_ref || pi_theta) over the K candidates (the same for
every row, so the objective is E_w[pair loss] + lam KL). L-BFGS from the uniform policy finds the minimizer.

Two weight tables matter:
- the infinite-data one (`population_weights`): pairs (y1, y2), y1 != y2, drawn uniformly from the K(K-1)
  orderings and y1 winning with p_12 = pi*(y1) / (pi*(y1) + pi*(y2)); the row (chosen i, rejected j) comes
  from the draw (i, j) with i winning and from (j, i) with i winning, so w_ij = 2 p_ij / (K(K-1));
- a run's own training pairs (`empirical_weights`): the share of the prompt's pairs that are (i, j). Its
  minimizer is what a converged run must reach, whatever the sampling noise of its data.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from prefopt.engine.kl import exact_kl
from prefopt.objectives import OBJECTIVES, Extras, PairLogps


def strength_key(name: str) -> str:
    """The hyperparameter `strength` sets: lam for EXPO, beta for the DPO family."""
    return "lam" if hasattr(OBJECTIVES[name].config(), "lam") else "beta"


def is_tabular(name: str) -> bool:
    """Whether an objective's loss is a function of the candidates' log-probs alone (no value head, no
    other prompts' responses), so that its tabular minimizer exists."""
    needs = OBJECTIVES[name].config().requirements()
    return not (needs.value_head or needs.mismatched or needs.aux_reward)


def population_weights(pi_star: Sequence[float]) -> torch.Tensor:
    """(K, K) infinite-data pair weights w_ij = 2 p*(i > j) / (K (K - 1)), zero diagonal."""
    p_star = torch.as_tensor(pi_star, dtype=torch.float64)
    k = len(p_star)
    weights = 2 * p_star[:, None] / (p_star[:, None] + p_star[None, :]) / (k * (k - 1))
    return weights.fill_diagonal_(0.0)


def empirical_weights(chosen: Sequence[int], rejected: Sequence[int], num_candidates: int) -> torch.Tensor:
    """(K, K) share of the pairs that are (chosen i, rejected j), from candidate indices of one prompt."""
    counts = torch.zeros(num_candidates, num_candidates, dtype=torch.float64)
    counts.index_put_(
        (torch.as_tensor(chosen, dtype=torch.long), torch.as_tensor(rejected, dtype=torch.long)),
        torch.ones(len(chosen), dtype=torch.float64),
        accumulate=True,
    )
    return counts / counts.sum().clamp(min=1.0)


def tabular_minimizer(
    name: str,
    weights: torch.Tensor,
    pi_ref: Sequence[float],
    tokens: Sequence[float] | None = None,
    **hparams,
) -> torch.Tensor:
    """argmin over softmax policies of sum_ij w_ij loss_ij (+ the objective's KL term): pi_theta (K,).

    weights: (K, K) pair weights; pi_ref: (K,) the reference over the candidates; tokens: (K,) response
    lengths for length-normalised objectives (default 1)."""
    weights = torch.as_tensor(weights, dtype=torch.float64)
    ref_logps = torch.as_tensor(pi_ref, dtype=torch.float64).log()
    k = len(ref_logps)
    lengths = torch.ones(k, dtype=torch.float64) if tokens is None else torch.as_tensor(tokens).double()
    chosen, rejected = (torch.tensor(ix) for ix in zip(*itertools.permutations(range(k), 2)))
    row_weights = weights[chosen, rejected]  # (K(K-1),)
    objective = OBJECTIVES[name]
    kwargs = objective.config(**hparams).loss_kwargs()
    theta = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [theta], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logps = torch.log_softmax(theta, 0)  # (K,)
        kl = exact_kl(logps, ref_logps, torch.zeros(k, dtype=torch.long), 1).expand(len(chosen))
        extras = Extras(
            chosen_tokens=lengths[chosen],
            rejected_tokens=lengths[rejected],
            labels=torch.ones(len(chosen), dtype=torch.float64),
            kl=kl,
        )
        policy = PairLogps(logps[chosen], logps[rejected])
        reference = PairLogps(ref_logps[chosen], ref_logps[rejected])
        loss = (row_weights * objective.loss(policy, reference, extras, **kwargs).losses).sum()
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)
    return torch.softmax(theta.detach(), 0)


def population_minimizer(name: str, pi_star: list[float], pi_ref: list[float], **hparams) -> torch.Tensor:
    """The infinite-data minimizer of OBJECTIVES[name] on one context: pi_theta (K,)."""
    return tabular_minimizer(name, population_weights(pi_star), pi_ref, **hparams)


def kl_divergence(p: list[float] | torch.Tensor, q: torch.Tensor) -> float:
    """KL(p || q) = sum p log(p / q)."""
    p = torch.as_tensor(p, dtype=torch.float64)
    return float((p * (p / q.double()).log()).sum())


def total_variation(p: Sequence[float] | torch.Tensor, q: Sequence[float] | torch.Tensor) -> float:
    """TV(p, q) = 1/2 sum |p - q|."""
    p, q = torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(q, dtype=torch.float64)
    return float(0.5 * (p - q).abs().sum())
