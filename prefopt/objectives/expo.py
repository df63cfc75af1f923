"""EXPO: Explicit Preference Optimization, compositional variant.

Hu, Kong, He and Wipf, "Explicit Preference Optimization: No Need for an Implicit Reward Model",
ICML 2025 (arXiv 2506.07492); the compositional loss of the official toy code:

    d    = lp(y_w) - lp(y_l)                                                    # (B,) no reference inside
    bt   = -[p log sigma(d) + (1 - p) log sigma(-d)]                             # (B,) p = Extras.labels
    loss = bt + lam KL(pi_ref(.|x) || pi_theta(.|x))                             # (B,)

The first term is the Bradley-Terry likelihood with the policy's own log-probs as the reward
(-log sigma(d) for hard labels); its population minimizer is the data's pi*. The second pulls towards
pi_ref. Where pi_ref = pi* both agree, so EXPO keeps pi* for every lam (DPO/IPO sharpen it instead).

The KL (Extras.kl, (B,)) comes from the estimator the `kl` group picks (`prefopt.engine.kl_estimators`:
kl=exact | samples, or kl=token from logits). It is a sum over the vocabulary / response space and a mean
over examples (the loop averages the per-example losses). We deliberately do NOT reproduce the official code's
`F.kl_div(..., reduction='mean')`, which silently divides lam by |Y|. lam is EXPO's own strength, not on
DPO's beta scale. Implied rewards: lp(y).

length_normalize (ours, off by default): on real text d compares summed log-probs, so it mostly measures
length (a longer answer has a lower lp). With the option on, both terms are per token, n = (|y_w| + |y_l|)/2:

    d    = lp(y_w) / |y_w| - lp(y_l) / |y_l|                                    # (B,) as in SimPO
    loss = bt(d) + lam KL / n                                                    # (B,)

The KL is divided too: it is a sum over response positions, so with a per-token bt next to it the pull
towards pi_ref would grow with |y| and lam would mean something else on every length. Dividing both terms
keeps lam's per-token balance of the paper's form, independent of length (for kl=token, KL / n
is exactly the mean per-position KL over the pair's responses; for exact / samples it is the same per-token
scale). This gives up the paper's guarantee: the minimizer of bt(d) is no longer pi* when lengths differ.
Implied rewards then: lp(y) / |y|.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.errors import ConfigFieldError
from prefopt.objectives.base import (
    Extras,
    Objective,
    ObjectiveConfig,
    ObjectiveOutput,
    PairLogps,
    Requirements,
    positive,
    require_kl,
)


@dataclass
class EXPOConfig(ObjectiveConfig):
    """lam (> 0); needs Extras.kl (estimated as the `kl` group says: kl=exact | samples | token), no
    reference log-probs."""

    requires = Requirements(reference=False, kl=True)

    lam: float = 0.1
    """Weight of KL(pi_ref || pi_theta); larger stays closer to the reference (not on DPO's beta scale)."""
    length_normalize: bool = False
    """Per-token log-probs lp(y)/|y| in the preference term and KL/mean(|y_w|, |y_l|); false: the paper's."""

    def __post_init__(self) -> None:
        if not isinstance(self.length_normalize, bool):
            raise ConfigFieldError(
                "length_normalize", f"must be true or false, got {self.length_normalize!r}"
            )
        positive("lam", self.lam)  # lam = 0 drops the KL term: an unregularized objective, not EXPO

    def loss_kwargs(self) -> dict:
        """The paper's form is called with lam alone; length_normalize is passed only when on."""
        kwargs = super().loss_kwargs()
        if not self.length_normalize:
            del kwargs["length_normalize"]
        return kwargs


def explicit_loss(
    policy: PairLogps,
    extras: Extras,
    preference_term: Callable[[Tensor, Tensor], Tensor],
    *,
    objective: str,
    metric: str,
    lam: float,
    length_normalize: bool,
) -> ObjectiveOutput:
    """The skeleton of expo and expo_reg: preference_term(d, p) + lam KL, per token when normalized.

    preference_term maps the score difference d = s_w - s_l (B,) and the labels p (B,) to a loss (B,),
    logged as `metric` next to the raw KL. Scores s are lp(y), or lp(y) / |y| with the KL over n."""
    kl = require_kl(extras, objective)  # (B,)
    s_w, s_l = policy.chosen, policy.rejected  # (B,) each
    kl_scale = torch.ones_like(s_w)  # (B,)
    if length_normalize:
        n_w, n_l = extras.chosen_tokens, extras.rejected_tokens  # (B,)
        s_w, s_l, kl_scale = s_w / n_w, s_l / n_l, 2 / (n_w + n_l)
    term = preference_term(s_w - s_l, extras.labels)  # (B,)
    return ObjectiveOutput(
        losses=term + lam * kl_scale * kl,
        chosen_rewards=s_w.detach(),
        rejected_rewards=s_l.detach(),
        metrics={"kl": kl.detach(), metric: term.detach()},
    )


def bradley_terry(d: Tensor, p: Tensor) -> Tensor:
    """-[p log sigma(d) + (1 - p) log sigma(-d)], elementwise; (B,), (B,) -> (B,)."""
    return -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d))


def loss(
    policy: PairLogps,
    reference: PairLogps | None,
    extras: Extras,
    *,
    lam: float,
    length_normalize: bool = False,
) -> ObjectiveOutput:
    """EXPO loss per pair; log-probs, labels, kl, token counts (B,) -> losses (B,). `reference` is ignored."""
    kw = dict(lam=lam, length_normalize=length_normalize)
    return explicit_loss(policy, extras, bradley_terry, objective="expo", metric="bt_loss", **kw)


OBJECTIVE = Objective(
    loss=loss,
    config=EXPOConfig,
    description="EXPO: -log sig(lp_w - lp_l) + lam KL(pi_ref || pi_theta), soft labels allowed",
)
