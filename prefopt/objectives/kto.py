"""KTO: Kahneman-Tversky Optimization, HALOs form.

Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization", ICML 2024, Eq. 8, as
implemented in the HALOs codebase:

    r(y) = lp(y) - lp_ref(y)                                                    # per response
    z    = sg(max(0, mean_{y'} [lp(y'|x') - lp_ref(y'|x')]))                    # scalar; y' mismatched
    desirable loss   l_D(y) = 1 - sigma(beta (r(y) - z))
    undesirable loss l_U(y) = 1 - sigma(beta (z - r(y)))

z is a batch-level estimate of KL(pi_theta || pi_ref) from responses paired with another prompt; it is
detached (sg) and clamped at 0. KTO is defined per response, so `response_losses` takes a boolean
`desirable` mask and serves unpaired data; the paired loss treats y_w as desirable and y_l as undesirable:

    loss = (desirable_weight l_D(y_w) + undesirable_weight l_U(y_l)) / 2        # (B,)

Implied rewards: beta r(y).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prefopt.objectives.base import (
    BetaConfig,
    Extras,
    Objective,
    ObjectiveOutput,
    PairLogps,
    Requirements,
    require_reference,
)
from prefopt.objectives.dpo import logratios


@dataclass
class KTOConfig(BetaConfig):
    """beta (> 0): inverse temperature of the value function; needs reference log-probs and the mismatched
    log-ratios of responses paired with another prompt."""

    requires = Requirements(reference=True, mismatched=True)

    desirable_weight: float = 1.0
    """lambda_D: weight on the losses of desirable (chosen) responses."""
    undesirable_weight: float = 1.0
    """lambda_U: weight on the losses of undesirable (rejected) responses."""


def kl_baseline(mismatched_logratios: Tensor | None) -> Tensor:
    """z = max(0, mean(lp - lp_ref)) over mismatched (x, y') pairs, detached; (M,) -> scalar."""
    if mismatched_logratios is None:
        raise ValueError("kto needs Extras.mismatched_logratios (Requirements.mismatched=True)")
    return mismatched_logratios.detach().mean().clamp(min=0)


def response_losses(
    logratios: Tensor,
    desirable: Tensor,
    z: Tensor,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> Tensor:
    """Weighted per-response KTO losses; logratios (N,), boolean desirable (N,), scalar z -> (N,)."""
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z - logratios)))
    return torch.where(desirable, desirable_losses, undesirable_losses)


def loss(
    policy: PairLogps,
    reference: PairLogps | None,
    extras: Extras,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> ObjectiveOutput:
    """Paired KTO loss (see the module docstring); log-probs (B,), mismatched (M,) -> losses (B,)."""
    r_w, r_l = logratios(policy, require_reference(reference, "kto"))  # (B,), (B,)
    z = kl_baseline(extras.mismatched_logratios)  # ()
    weights = dict(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    l_w = response_losses(r_w, torch.ones_like(r_w, dtype=torch.bool), z, **weights)  # (B,)
    l_l = response_losses(r_l, torch.zeros_like(r_l, dtype=torch.bool), z, **weights)  # (B,)
    return ObjectiveOutput(
        losses=(l_w + l_l) / 2,
        chosen_rewards=(beta * r_w).detach(),
        rejected_rewards=(beta * r_l).detach(),
        metrics={"kl": z},
    )


OBJECTIVE = Objective(
    loss=loss,
    config=KTOConfig,
    description="KTO: (w_D [1 - sig(beta (r_w - z))] + w_U [1 - sig(beta (z - r_l))]) / 2, r = lp - lp_ref",
)
