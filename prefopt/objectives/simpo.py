"""SimPO: Simple Preference Optimization with a reference-free, length-normalized reward.

Meng, Xia and Chen, "SimPO: Simple Preference Optimization with a Reference-Free Reward", NeurIPS 2024,
Eq. 6:

    loss = -log sigma(beta (lp(y_w) / |y_w| - lp(y_l) / |y_l|) - gamma)          # (B,)

gamma is the absolute target reward margin (not the gamma/beta ratio some codebases configure).
Implied rewards: beta lp(y) / |y|.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from prefopt.objectives.base import BetaConfig, Extras, Objective, ObjectiveOutput, PairLogps, Requirements


@dataclass
class SimPOConfig(BetaConfig):
    """beta (> 0) on SimPO's own scale and the target margin gamma; reference-free."""

    requires = Requirements(reference=False)

    beta: float = 2.0
    """Scale of the length-normalized reward beta lp(y)/|y| (on its own scale, not the common strength)."""
    gamma: float = 0.5
    """Target reward margin subtracted inside the sigmoid (absolute, in reward units)."""


def loss(
    policy: PairLogps, reference: PairLogps | None, extras: Extras, *, beta: float, gamma: float
) -> ObjectiveOutput:
    """SimPO loss per pair; log-probs and token counts (B,) -> losses (B,). `reference` is ignored."""
    r_w = beta * policy.chosen / extras.chosen_tokens  # (B,)
    r_l = beta * policy.rejected / extras.rejected_tokens  # (B,)
    return ObjectiveOutput(
        losses=-F.logsigmoid(r_w - r_l - gamma),
        chosen_rewards=r_w.detach(),
        rejected_rewards=r_l.detach(),
    )


OBJECTIVE = Objective(
    loss=loss,
    config=SimPOConfig,
    description="SimPO: -log sig(beta (lp_w/|y_w| - lp_l/|y_l|) - gamma), reference-free",
)
