"""IPO: Identity Preference Optimization.

Azar et al., "A General Theoretical Paradigm to Understand Learning from Human Preferences",
AISTATS 2024, Eq. 17 (the sampled IPO loss):

    h = [lp(y_w) - lp_ref(y_w)] - [lp(y_l) - lp_ref(y_l)]                      # (B,)
    loss = (h - 1 / (2 beta))^2                                                  # (B,)

We use summed response log-probs as written in the paper (some codebases length-average them first).
The loss regresses h onto the target margin 1/(2 beta), so its gradient vanishes there.
Implied rewards: beta (lp(y) - lp_ref(y)).
"""

from __future__ import annotations

from dataclasses import dataclass

from prefopt.objectives.base import (
    BetaConfig,
    Extras,
    Objective,
    ObjectiveOutput,
    PairLogps,
    require_reference,
)
from prefopt.objectives.dpo import logratios


@dataclass
class IPOConfig(BetaConfig):
    """beta (> 0): regularization strength, the target log-ratio margin is 1 / (2 beta); needs reference
    log-probs."""


def loss(policy: PairLogps, reference: PairLogps | None, extras: Extras, *, beta: float) -> ObjectiveOutput:
    """IPO loss per pair (see the module docstring); log-probs (B,) -> losses (B,)."""
    r_w, r_l = logratios(policy, require_reference(reference, "ipo"))  # (B,), (B,)
    return ObjectiveOutput(
        losses=(r_w - r_l - 1 / (2 * beta)) ** 2,
        chosen_rewards=(beta * r_w).detach(),
        rejected_rewards=(beta * r_l).detach(),
    )


OBJECTIVE = Objective(
    loss=loss,
    config=IPOConfig,
    description="IPO: (h - 1/(2 beta))^2, h = logratio(y_w) - logratio(y_l), summed log-probs",
)
