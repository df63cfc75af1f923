"""What every objective sees and returns.

An objective is a pure function of log-prob tensors:

    loss(policy: PairLogps, reference: PairLogps | None, extras: Extras, **hyperparameters)
        -> ObjectiveOutput

Its hyperparameters are a dataclass (the config schema); `requirements()` on that dataclass tells the
training loop which extra inputs to provide, so the loop never branches on an objective's name. The checks
every objective shares are written once here: `positive` for a config field, `require_reference` and
`require_kl` for the inputs a loss needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import ClassVar

from torch import Tensor

from prefopt.errors import ConfigFieldError


@dataclass(frozen=True)
class PairLogps:
    """Summed response log-probs, log pi(y|x) = sum_t log pi(y_t | x, y_<t), of a batch of pairs."""

    chosen: Tensor  # (B,)
    rejected: Tensor  # (B,)


@dataclass(frozen=True)
class Extras:
    """Per-batch inputs beyond the policy and reference log-probs; optional ones are None unless required."""

    chosen_tokens: Tensor  # (B,) response token counts |y_w|
    rejected_tokens: Tensor  # (B,) response token counts |y_l|
    labels: Tensor  # (B,) probability that `chosen` is preferred: 1.0 for hard labels, soft otherwise
    step: int = 0  # optimizer steps taken so far (for warm-ups)
    kl: Tensor | None = None  # (B,) differentiable estimate of KL(pi_ref(.|x) || pi_theta(.|x))
    mismatched_logratios: Tensor | None = None  # (M,) lp_theta(y'|x) - lp_ref(y'|x), y' from another prompt
    aux_chosen: Tensor | None = None  # (B,) auxiliary reward R(x, y_w)
    aux_rejected: Tensor | None = None  # (B,) auxiliary reward R(x, y_l)
    values: Tensor | None = None  # (B,) value head V(x); gradients reach the head only


@dataclass(frozen=True)
class ObjectiveOutput:
    """Per-example losses, the objective's implied rewards (for margins/accuracies) and extra metrics."""

    losses: Tensor  # (B,) per-example loss; the loop averages over examples
    chosen_rewards: Tensor  # (B,) detached implied reward of y_w
    rejected_rewards: Tensor  # (B,) detached implied reward of y_l
    metrics: dict[str, Tensor] = field(default_factory=dict)  # name -> (B,) or scalar, detached


@dataclass(frozen=True)
class Requirements:
    """Inputs an objective needs from the loop beyond the policy log-probs."""

    reference: bool = True  # reference log-probs of chosen/rejected
    kl: bool = False  # Extras.kl, by the configured KL estimator
    mismatched: bool = False  # Extras.mismatched_logratios
    aux_reward: bool = False  # Extras.aux_chosen / aux_rejected
    value_head: bool = False  # Extras.values, from a value head the loop owns and optimizes


@dataclass
class ObjectiveConfig:
    """Base hyperparameter schema. Fields marked `loop_only` steer the loop and are not passed to the loss."""

    requires: ClassVar[Requirements] = Requirements()
    """What the loop provides, declared per class; override `requirements()` only where a field decides it."""

    def requirements(self) -> Requirements:
        return self.requires

    def loss_kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("loop_only")}


@dataclass
class BetaConfig(ObjectiveConfig):
    """Schema of an objective with an inverse temperature beta > 0 on its implied reward (the DPO family)."""

    beta: float = 0.1
    """Inverse temperature of the implicit reward; larger keeps the policy closer to the reference."""

    def __post_init__(self) -> None:
        positive("beta", self.beta)


def positive(name: str, value: float) -> None:
    """A config field's check `value > 0`; the error names the field so the CLI can print its key."""
    if value <= 0:
        raise ConfigFieldError(name, f"must be > 0, got {value}")


def require_reference(reference: PairLogps | None, objective: str) -> PairLogps:
    """The reference log-probs, or a clear error when the loop did not provide them."""
    if reference is None:
        raise ValueError(f"{objective} needs reference log-probs (Requirements.reference=True)")
    return reference


def require_kl(extras: Extras, objective: str) -> Tensor:
    """Extras.kl (B,), or a clear error when the loop did not provide it."""
    if extras.kl is None:
        raise ValueError(f"{objective} needs Extras.kl (Requirements.kl=True)")
    return extras.kl


LossFn = Callable[..., ObjectiveOutput]


@dataclass(frozen=True)
class Objective:
    """A registry entry: the pure loss function and its hyperparameter schema."""

    loss: LossFn
    config: type[ObjectiveConfig]
    description: str  # one line, with the formula, shown in `prefopt train --help`
