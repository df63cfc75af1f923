"""EXPO: Explicit Preference Optimization, compositional variant.

Hu, Kong, He and Wipf, "Explicit Preference Optimization: No Need for an Implicit Reward Model",
ICML 2025 (arXiv 2506.07492); the compositional loss of the official toy code:

    d    = lp(y_w) - lp(y_l)                                                    # (B,) no reference inside
    bt   = -[p log sigma(d) + (1 - p) log sigma(-d)]                             # (B,) p = Extras.labels
    loss = bt + lam KL(pi_ref(.|x) || pi_theta(.|x))                             # (B,)

The first term is the Bradley-Terry likelihood with the policy's own log-probs as the reward
(-log sigma(d) for hard labels); its population minimizer is the data's pi*. The second pulls towards
pi_ref. Where pi_ref = pi* both agree, so EXPO keeps pi* for every lam (DPO/IPO sharpen it instead).

The KL (Extras.kl, (B,)) comes from the loop's configured estimator (`prefopt.kl`: exact | samples, or
token-level from logits). It is a sum over the vocabulary / response space and a mean over examples (the
loop averages the per-example losses). We deliberately do NOT reproduce the official code's
`F.kl_div(..., reduction='mean')`, which silently divides lam by |Y|. lam is EXPO's own strength, not on
DPO's beta scale. Implied rewards: lp(y).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor

from prefopt.config import ConfigFieldError
from prefopt.objectives.base import (
    Extras,
    Objective,
    ObjectiveConfig,
    ObjectiveOutput,
    PairLogps,
    Requirements,
)

KL_ESTIMATOR_CHOICES = ("exact", "token", "samples")


@dataclass
class EXPOConfig(ObjectiveConfig):
    lam: float = 0.1
    """Weight of KL(pi_ref || pi_theta); larger stays closer to the reference (not on DPO's beta scale)."""
    kl_estimator: str = field(default="exact", metadata={"loop_only": True})
    """How the loop estimates the KL: exact (enumerable responses) | token (full-vocab logits) | samples."""
    kl_samples_per_prompt: int = field(default=4, metadata={"loop_only": True})
    """Reference samples per prompt for kl_estimator=samples (drawn once and cached)."""

    def __post_init__(self) -> None:
        if self.kl_estimator not in KL_ESTIMATOR_CHOICES:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATOR_CHOICES}, got {self.kl_estimator!r}")
        if self.kl_samples_per_prompt < 1:
            raise ValueError(f"kl_samples_per_prompt must be >= 1, got {self.kl_samples_per_prompt}")
        if self.lam <= 0:  # lam = 0 drops the KL term: an unregularized objective, not EXPO
            raise ConfigFieldError("lam", f"must be > 0, got {self.lam}")

    def requirements(self) -> Requirements:
        return Requirements(reference=False, kl=True)


def require_kl(extras: Extras, name: str) -> Tensor:
    """Extras.kl, or a clear error when the loop did not provide it."""
    if extras.kl is None:
        raise ValueError(f"{name} needs Extras.kl (Requirements.kl=True)")
    return extras.kl


def loss(policy: PairLogps, reference: PairLogps | None, extras: Extras, *, lam: float) -> ObjectiveOutput:
    """EXPO loss per pair; log-probs, labels and kl (B,) -> losses (B,). `reference` is ignored."""
    kl = require_kl(extras, "expo")  # (B,)
    d = policy.chosen - policy.rejected  # (B,)
    p = extras.labels  # (B,)
    bt = -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d))  # (B,)
    return ObjectiveOutput(
        losses=bt + lam * kl,
        chosen_rewards=policy.chosen.detach(),
        rejected_rewards=policy.rejected.detach(),
        metrics={"kl": kl.detach(), "bt_loss": bt.detach()},
    )


OBJECTIVE = Objective(
    loss=loss,
    config=EXPOConfig,
    description="EXPO: -log sig(lp_w - lp_l) + lam KL(pi_ref || pi_theta), soft labels allowed",
)
