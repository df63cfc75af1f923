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
    BetaConfig,
    Extras,
    Objective,
    ObjectiveOutput,
    PairLogps,
    require_reference,
)


@dataclass
class FDPOConfig(BetaConfig):
    """beta (> 0): inverse temperature on the Jensen-Shannon link t(y); needs reference log-probs."""


def js_link(logps: Tensor, reference_logps: Tensor) -> Tensor:
    """t(y) = log 2 + lp(y) - logaddexp(lp(y), lp_ref(y)), elementwise; (B,) -> (B,)."""
    return math.log(2.0) + logps - torch.logaddexp(logps, reference_logps)


def loss(policy: PairLogps, reference: PairLogps | None, extras: Extras, *, beta: float) -> ObjectiveOutput:
    """f-DPO (JS) loss per pair (see the module docstring); log-probs (B,) -> losses (B,)."""
    reference = require_reference(reference, "fdpo")
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
