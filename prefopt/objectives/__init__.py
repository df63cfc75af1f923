"""Objective registry: name -> Objective (pure loss function + hyperparameter dataclass).

Add an objective by writing one module with a config dataclass, a `loss` function and `OBJECTIVE`, then
listing it here. The loop reads `OBJECTIVES[name]` and never branches on the name.
"""

from prefopt.objectives import dpo, expo, expo_reg, fdpo, hpo, ipo, kto, sft, simpo
from prefopt.objectives.base import (
    Extras,
    LossFn,
    Objective,
    ObjectiveConfig,
    ObjectiveOutput,
    PairLogps,
    Requirements,
)

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

__all__ = [
    "OBJECTIVES",
    "Extras",
    "LossFn",
    "Objective",
    "ObjectiveConfig",
    "ObjectiveOutput",
    "PairLogps",
    "Requirements",
]
