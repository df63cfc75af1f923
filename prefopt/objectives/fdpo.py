"""f-DPO with the Jensen-Shannon divergence, as coded in EXPO's toy experiments.

Wang et al., "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence
Constraints", ICLR 2024 (f-DPO); the JS form below follows Hu et al., "Explicit Preference Optimization"
(EXPO), ICML 2025, official `model.py`:

    t(y) = log(2 pi_theta(y)) - log(pi_theta(y) + pi_ref(y))
         = log 2 + lp(y) - logaddexp(lp(y), lp_ref(y))                          # (B,)
    loss = -log sigma(beta (t(y_w) - t(y_l)))                                   # (B,)

t is increasing in pi_theta / pi_ref and bounded above by log 2, so large ratios saturate.
Implied rewards: beta t(y).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.objectives.base import (
    Extras,
    Objective,
    ObjectiveConfig,
    ObjectiveOutput,
    PairLogps,
    Requirements,
)


@dataclass
class FDPOConfig(ObjectiveConfig):
    beta: float = 0.1
    """Inverse temperature on the Jensen-Shannon link t(y); larger stays closer to the reference."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")

    def requirements(self) -> Requirements:
        return Requirements(reference=True)


def js_link(logps: Tensor, reference_logps: Tensor) -> Tensor:
    """t(y) = log 2 + lp(y) - logaddexp(lp(y), lp_ref(y)), elementwise; (B,) -> (B,)."""
    return math.log(2.0) + logps - torch.logaddexp(logps, reference_logps)


def loss(policy: PairLogps, reference: PairLogps | None, extras: Extras, *, beta: float) -> ObjectiveOutput:
    """f-DPO (JS) loss per pair (see the module docstring); log-probs (B,) -> losses (B,)."""
    if reference is None:
        raise ValueError("fdpo needs reference log-probs (Requirements.reference=True)")
    t_w = js_link(policy.chosen, reference.chosen)  # (B,)
    t_l = js_link(policy.rejected, reference.rejected)  # (B,)
    return ObjectiveOutput(
        losses=-F.logsigmoid(beta * (t_w - t_l)),
        chosen_rewards=(beta * t_w).detach(),
        rejected_rewards=(beta * t_l).detach(),
    )


OBJECTIVE = Objective(
    loss=loss,
    config=FDPOConfig,
    description="f-DPO (JS): -log sig(beta (t_w - t_l)), t = log 2 + lp - logaddexp(lp, lp_ref)",
)
