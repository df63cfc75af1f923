"""DPO: Direct Preference Optimization, with conservative label smoothing (cDPO).

Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
NeurIPS 2023, Eq. 7; cDPO from Mitchell, "A note on DPO with noisy preferences" (2023).

    h = [lp(y_w) - lp_ref(y_w)] - [lp(y_l) - lp_ref(y_l)]                      # (B,)
    loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)                  # (B,)

eps = label_smoothing is the assumed probability that a label is flipped; eps = 0 is plain DPO.
Implied rewards: beta (lp(y) - lp_ref(y)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from prefopt.objectives.base import (
    BetaConfig,
    Extras,
    Objective,
    ObjectiveOutput,
    PairLogps,
    require_reference,
)


@dataclass
class DPOConfig(BetaConfig):
    """beta (> 0, from BetaConfig) and cDPO's label smoothing; needs reference log-probs."""

    label_smoothing: float = 0.0
    """cDPO: assumed probability that a preference label is flipped, in [0, 0.5); 0 gives plain DPO."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


def logratios(policy: PairLogps, reference: PairLogps) -> tuple[Tensor, Tensor]:
    """lp(y) - lp_ref(y) for the chosen and the rejected responses, each (B,)."""
    return policy.chosen - reference.chosen, policy.rejected - reference.rejected


def cdpo_losses(logits: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - eps) log sigma(logits) - eps log sigma(-logits), elementwise; logits (B,) -> (B,)."""
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses


def pair_output(
    policy: PairLogps,
    reference: PairLogps | None,
    *,
    beta: float,
    label_smoothing: float,
    margin: Tensor | None = None,
) -> ObjectiveOutput:
    """cDPO on logits beta h - margin; margin (B,) or None. Shared with HPO's reward-margin base."""
    r_w, r_l = logratios(policy, require_reference(reference, "dpo"))  # (B,), (B,)
    logits = beta * (r_w - r_l)  # (B,)
    if margin is not None:
        logits = logits - margin
    return ObjectiveOutput(
        losses=cdpo_losses(logits, label_smoothing),
        chosen_rewards=(beta * r_w).detach(),
        rejected_rewards=(beta * r_l).detach(),
    )


def loss(
    policy: PairLogps,
    reference: PairLogps | None,
    extras: Extras,
    *,
    beta: float,
    label_smoothing: float,
) -> ObjectiveOutput:
    """cDPO loss per pair (see the module docstring); policy/reference log-probs (B,) -> losses (B,)."""
    return pair_output(policy, reference, beta=beta, label_smoothing=label_smoothing)


OBJECTIVE = Objective(
    loss=loss,
    config=DPOConfig,
    description="DPO/cDPO: -(1-eps) log sig(beta h) - eps log sig(-beta h), h = logratio_w - logratio_l",
)
