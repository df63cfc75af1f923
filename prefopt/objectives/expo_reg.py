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
from torch import Tensor

from prefopt.objectives.base import Extras, Objective, ObjectiveOutput, PairLogps
from prefopt.objectives.expo import EXPOConfig, explicit_loss


@dataclass
class EXPORegConfig(EXPOConfig):
    """Same fields, defaults and requirements as `expo` (lam, length_normalize); the KL estimator is the
    `kl` group's."""


def squared_error(d: Tensor, p: Tensor) -> Tensor:
    """(sigma(d) - p)^2, elementwise; (B,), (B,) -> (B,)."""
    return (torch.sigmoid(d) - p) ** 2


def loss(
    policy: PairLogps,
    reference: PairLogps | None,
    extras: Extras,
    *,
    lam: float,
    length_normalize: bool = False,
) -> ObjectiveOutput:
    """Reconstructed EXPO regression loss; log-probs, labels, kl and token counts (B,) -> losses (B,)."""
    kw = dict(lam=lam, length_normalize=length_normalize)
    return explicit_loss(policy, extras, squared_error, objective="expo_reg", metric="sq_loss", **kw)


OBJECTIVE = Objective(
    loss=loss,
    config=EXPORegConfig,
    description="EXPO-reg (our reconstruction): (sig(lp_w - lp_l) - p)^2 + lam KL(pi_ref || pi_theta)",
)
