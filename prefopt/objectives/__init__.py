"""Objective registry: name -> Objective (pure loss function + hyperparameter dataclass).

Add an objective by writing one module with a config dataclass, a `loss` function and `OBJECTIVE`, then
listing it here; from outside the package (a test, a research script), `register(name, OBJECTIVE)` before
the config is loaded. The loop reads `OBJECTIVES[name]` and never branches on the name.
"""

from prefopt.objectives import dpo, expo, expo_reg, fdpo, hpo, ipo, kto, sft, simpo
from prefopt.objectives.base import (
    BetaConfig,
    Extras,
    LossFn,
    Objective,
    ObjectiveConfig,
    ObjectiveOutput,
    PairLogps,
    Requirements,
    positive,
    require_kl,
    require_reference,
)
from prefopt.registry import add_entry

OBJECTIVES: dict[str, Objective] = {
    "dpo": dpo.OBJECTIVE,
    "ipo": ipo.OBJECTIVE,
    "fdpo": fdpo.OBJECTIVE,
    "sft": sft.OBJECTIVE,
    "simpo": simpo.OBJECTIVE,
    "kto": kto.OBJECTIVE,
    "expo": expo.OBJECTIVE,
    "expo_reg": expo_reg.OBJECTIVE,
    "hpo": hpo.OBJECTIVE,
}


def register(name: str, objective: Objective) -> None:
    """Make `objective.name=<name>` select `objective`, as a built-in one; refuses a name already taken."""
    add_entry(OBJECTIVES, name, objective, Objective, "objective")


__all__ = [
    "OBJECTIVES",
    "BetaConfig",
    "Extras",
    "LossFn",
    "Objective",
    "ObjectiveConfig",
    "ObjectiveOutput",
    "PairLogps",
    "Requirements",
    "positive",
    "register",
    "require_kl",
    "require_reference",
]
