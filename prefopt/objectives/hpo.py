"""HPO: Hybrid Preference Optimization (DPO/KTO + advantage-weighted auxiliary-reward regression).

Badrinath, Agarwal and Xu, "Hybrid Preference Optimization: Augmenting Direct Preference Optimization
with Auxiliary Objectives", arXiv 2405.17956 (2024). With an offline auxiliary reward R(x, y) and a value
head V(x) owned by the loop:

    L       = L_base + gamma L_actor + value_coef L_value                         # (B,)
    L_base  = cDPO on logits beta h - alpha (R_w - R_l)      (base=dpo; alpha = margin_alpha)
            | paired KTO                                      (base=kto)
    A(y)    = R(x, y) - V(x),  w(y) = sg(min(exp(adv_temperature A(y)), max_weight))
    L_actor = -mean_{y in (y_w, y_l)} w(y) lp(y) / |y|      (0 while step < actor_warmup_steps)
    L_value = mean_{y in (y_w, y_l)} |tau - 1(A(y) < 0)| A(y)^2   (tau = expectile; grads reach V only)

The margin form corrects the paper's printed sign typo. Terms with a zero coefficient are not added, so
gamma = value_coef = margin_alpha = 0 reproduces the base loss exactly. Implied rewards: the base's.

max_weight (ours; the paper leaves exp(lambda A) unclipped) defaults to 20, AWR's cap (Peng et al. 2019).
Unclipped, e^{5A} is 148 at A = 1 (rewards in [0, 1], as the paper's) and 2e4 at A = 2 (a larger reward
scale): the actor term then swamps the base loss. Capped, |L_actor| <= max_weight x the mean
per-token NLL and |d L_actor / d lp(y)| <= max_weight / (2 |y|); at lambda = 5 the cap acts on A > 0.6.
w is a constant (detached) either way: no gradient through the clip or into V. null / inf: unclipped,
exactly. Metrics: actor_weight (mean w), actor_weight_clipped (share of weights at the cap), actor_loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from prefopt.errors import ConfigFieldError
from prefopt.objectives import dpo, kto
from prefopt.objectives.base import Extras, Objective, ObjectiveOutput, PairLogps, Requirements

BASES = ("dpo", "kto")


@dataclass
class HPOConfig(dpo.DPOConfig):
    """DPO's beta (> 0, the base loss's inverse temperature) and label_smoothing (the dpo base's), plus the
    base, its reward margin, KTO's weights, the actor and value terms and the value head the loop builds and
    optimizes (`loop_only`: not passed to the loss)."""

    base: str = "dpo"
    """Base preference loss: dpo | kto."""
    margin_alpha: float = 0.0
    """alpha: auxiliary-reward margin inside the dpo base, beta h - alpha (R_w - R_l); dpo base only."""
    desirable_weight: float = 1.0
    """KTO base: weight on the chosen (desirable) response losses."""
    undesirable_weight: float = 1.0
    """KTO base: weight on the rejected (undesirable) response losses."""
    gamma: float = 0.5
    """Weight of the advantage-weighted actor (regression) loss."""
    adv_temperature: float = 5.0
    """lambda in the actor weight exp(lambda (R - V))."""
    value_coef: float = 0.1
    """Weight of the value head's expectile loss."""
    expectile: float = 0.7
    """tau in (0, 1) of the value head's expectile regression (0.5 = mean regression)."""
    actor_warmup_steps: int = 100
    """Optimizer steps with the actor loss off, so that V can fit first."""
    max_weight: float | None = 20.0
    """Upper clamp on the actor weight exp(lambda A) (AWR's 20); None or inf: unclipped, as in the paper."""
    value_head_lr: float = field(default=1e-3, metadata={"loop_only": True})
    """Learning rate of the value head V(x) the loop owns and optimizes (its own parameter group)."""
    value_head_width: int = field(default=128, metadata={"loop_only": True})
    """Hidden width of the value head's MLP."""

    def __post_init__(self) -> None:
        if self.base not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {self.base!r}")
        if self.margin_alpha != 0 and self.base != "dpo":
            raise ValueError(f"margin_alpha applies to base=dpo only; got margin_alpha={self.margin_alpha}")
        if not 0.0 < self.expectile < 1.0:
            raise ValueError(f"expectile must be in (0, 1), got {self.expectile}")
        if self.max_weight is not None and not self.max_weight > 0:
            raise ConfigFieldError("max_weight", f"must be > 0 (or null: unclipped), got {self.max_weight}")
        super().__post_init__()  # beta and label_smoothing, as DPO's

    def requirements(self) -> Requirements:
        return Requirements(reference=True, aux_reward=True, value_head=True, mismatched=self.base == "kto")


def expectile_loss(residuals: Tensor, expectile: float) -> Tensor:
    """IQL expectile regression |tau - 1(u < 0)| u^2, elementwise; u = R - V, any shape."""
    return torch.abs(expectile - (residuals < 0).to(residuals.dtype)) * residuals**2


def loss(
    policy: PairLogps,
    reference: PairLogps | None,
    extras: Extras,
    *,
    base: str,
    beta: float,
    label_smoothing: float,
    margin_alpha: float,
    desirable_weight: float,
    undesirable_weight: float,
    gamma: float,
    adv_temperature: float,
    value_coef: float,
    expectile: float,
    actor_warmup_steps: int,
    max_weight: float | None,
) -> ObjectiveOutput:
    """HPO loss (see the module docstring); log-probs, aux rewards, values (B,) -> losses (B,)."""
    if extras.aux_chosen is None or extras.aux_rejected is None or extras.values is None:
        raise ValueError("hpo needs Extras.aux_chosen, aux_rejected (aux_reward) and values (value_head)")
    R = torch.stack([extras.aux_chosen, extras.aux_rejected], dim=-1)  # (B, 2)
    if base == "kto":
        kw = dict(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
        out = kto.loss(policy, reference, extras, **kw)
    else:
        margin = margin_alpha * (R[:, 0] - R[:, 1]) if margin_alpha else None  # (B,) or None
        out = dpo.pair_output(policy, reference, beta=beta, label_smoothing=label_smoothing, margin=margin)
    V = extras.values.unsqueeze(-1)  # (B, 1)
    adv = R - V.detach()  # (B, 2) the actor weight passes no gradient to V
    cap = float("inf") if max_weight is None else max_weight
    w = torch.exp(adv_temperature * adv).detach()  # (B, 2) a constant, as in AWR
    clipped = w > cap  # (B, 2)
    w = w.clamp(max=cap)
    lp = torch.stack([policy.chosen, policy.rejected], dim=-1)  # (B, 2)
    tokens = torch.stack([extras.chosen_tokens, extras.rejected_tokens], dim=-1)  # (B, 2)
    actor = -(w * lp / tokens).mean(-1)  # (B,)
    if extras.step < actor_warmup_steps:
        actor = torch.zeros_like(actor)
    value = expectile_loss(R - V, expectile).mean(-1)  # (B,) the only path from the loss into V
    losses = out.losses
    if gamma:  # skipped at 0 so the base loss is reproduced exactly
        losses = losses + gamma * actor
    if value_coef:
        losses = losses + value_coef * value
    metrics = dict(out.metrics, base_loss=out.losses.detach(), actor_loss=actor.detach())
    metrics.update(value_loss=value.detach(), advantage=adv.mean(-1), actor_weight=w.mean(-1))
    metrics["actor_weight_clipped"] = clipped.to(w.dtype).mean(-1)  # (B,) share of the pair's weights
    return ObjectiveOutput(losses, out.chosen_rewards, out.rejected_rewards, metrics)


OBJECTIVE = Objective(
    loss=loss,
    config=HPOConfig,
    description="HPO: L_base(dpo|kto; margin alpha dR) + gamma AWR(w = exp(lambda (R - V))) + c_v expectile",
)
