"""EXPO, regression variant -- OUR RECONSTRUCTION, not the paper's recovered formula.

Hu, Kong, He and Wipf, "Explicit Preference Optimization", ICML 2025, name a "regularized regression"
variant but its formula was not recovered. We replace the Bradley-Terry term of `expo` by a squared error
on the preference probability and keep the same KL term:

    d    = lp(y_w) - lp(y_l)                                                    # (B,)
    loss = (sigma(d) - p)^2 + lam KL(pi_ref(.|x) || pi_theta(.|x))               # (B,) p = Extras.labels

The population minimizer of the squared error also has sigma(d) = p*, so on contexts with pi_ref = pi* it
keeps pi* for every lam, like `expo`. KL conventions (sum over responses, mean over examples) and the
options are those of `expo`, length_normalize included: d = lp(y_w)/|y_w| - lp(y_l)/|y_l| and lam KL / n,
n = (|y_w| + |y_l|)/2, for the reasons given there. Implied rewards: lp(y), or lp(y)/|y| when normalized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefopt.objectives.base import Extras, Objective, ObjectiveOutput, PairLogps
from prefopt.objectives.expo import EXPOConfig, require_kl, scores


@dataclass
class EXPORegConfig(EXPOConfig):
    """Same fields, defaults and requirements as `expo` (lam, kl_estimator, kl_samples_per_prompt,
    length_normalize)."""


def loss(
    policy: PairLogps,
    reference: PairLogps | None,
    extras: Extras,
    *,
    lam: float,
    length_normalize: bool = False,
) -> ObjectiveOutput:
    """Reconstructed EXPO regression loss; log-probs, labels, kl and token counts (B,) -> losses (B,)."""
    kl = require_kl(extras, "expo_reg")  # (B,)
    s_w, s_l, kl_scale = scores(policy, extras, length_normalize)  # (B,) each
    sq = (torch.sigmoid(s_w - s_l) - extras.labels) ** 2  # (B,)
    return ObjectiveOutput(
        losses=sq + lam * kl_scale * kl,
        chosen_rewards=s_w.detach(),
        rejected_rewards=s_l.detach(),
        metrics={"kl": kl.detach(), "sq_loss": sq.detach()},
    )


OBJECTIVE = Objective(
    loss=loss,
    config=EXPORegConfig,
    description="EXPO-reg (our reconstruction): (sig(lp_w - lp_l) - p)^2 + lam KL(pi_ref || pi_theta)",
)
