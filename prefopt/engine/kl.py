"""Estimators of KL(pi_ref(.|x) || pi_theta(.|x)) per prompt, from log-probs of "side" responses.

Side responses are extra sequences scored under both models and grouped by prompt: `group` (N,) holds
each row's prompt-group index in [0, G). All functions are pure, vectorized over groups (scatter /
index_add, no Python loops) and differentiable in `policy_logps`; the reference is treated as constant.

- "exact"   (`exact_kl`): the group's rows enumerate every response the reference can produce (our synthetic
            testbed), so the KL is computed exactly.
- "samples" (`sampled_kl`): the rows are responses sampled from pi_ref (drawn once and cached); the Monte
            Carlo mean of lp_ref - lp_theta. Its gradient is SFT on the reference samples.
- "token": sum over response positions of the full-vocabulary KL(pi_ref(.|x,y<t) || pi_theta(.|x,y<t)),
           computed from model logits where the log-probs are computed, not here.

Log-probs are summed sequence log-probs lp(y) = sum_t log pi(y_t | x, y_<t), shape (N,); outputs are (G,).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def group_logsumexp(values: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """log sum_{i in g} exp(values_i) for each group g; (N,) -> (G,), -inf for empty groups."""
    peak = values.new_full((num_groups,), float("-inf"))
    peak = peak.scatter_reduce(0, group, values.detach(), reduce="amax", include_self=True)
    safe_peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # (G,)
    sums = values.new_zeros(num_groups).index_add(0, group, torch.exp(values - safe_peak[group]))
    return torch.log(sums) + safe_peak


def exact_kl(policy_logps: Tensor, reference_logps: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """Exact KL(q || pi_theta) per group, q = pi_ref renormalized over the group's candidates.

        q(y)  = exp(lp_ref(y)) / sum_{y' in group} exp(lp_ref(y'))
        KL_g  = sum_{y in group} q(y) (log q(y) - lp_theta(y))

    lp_theta is the unnormalized sequence log-prob, so policy mass outside the candidate set raises the KL:
    since q is zero outside the candidates this is the exact KL over the whole sequence space.
    policy_logps, reference_logps, group: (N,); returns (G,), 0 for empty groups.
    """
    reference_logps = reference_logps.detach()
    log_q = reference_logps - group_logsumexp(reference_logps, group, num_groups)[group]  # (N,)
    q = log_q.exp()
    terms = torch.where(q > 0, q * (log_q - policy_logps), torch.zeros_like(q))  # (N,) 0 log 0 = 0
    return terms.new_zeros(num_groups).index_add(0, group, terms)


def sampled_kl(policy_logps: Tensor, reference_logps: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """Monte Carlo KL per group from reference samples: mean_{y in group} (lp_ref(y) - lp_theta(y)).

    Unbiased for KL(pi_ref || pi_theta) when the group's rows are drawn from pi_ref; the gradient wrt the
    policy is -mean grad lp_theta(y), i.e. SFT on the samples. (N,) inputs -> (G,), 0 for empty groups.
    """
    diffs = reference_logps.detach() - policy_logps  # (N,)
    sums = diffs.new_zeros(num_groups).index_add(0, group, diffs)
    counts = torch.bincount(group, minlength=num_groups).clamp(min=1).to(diffs.dtype)  # (G,)
    return sums / counts


KLEstimator = Callable[[Tensor, Tensor, Tensor, int], Tensor]

KL_ESTIMATORS: dict[str, KLEstimator] = {"exact": exact_kl, "samples": sampled_kl}
