"""Auxiliary rewards r_k(x, y) and their weighted sum R = sum_k w_k r_k (HPO, arXiv 2405.17956).

Select any number in the config: `aux_reward=[readability,length] aux_reward.length.weight=0.5`.
Each name below has a schema in its module and a file conf/aux_reward/<name>.yaml.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefopt.rewards.base import (
    AuxReward,
    CompositeReward,
    NamedReward,
    RewardConfig,
    RewardFn,
    score_responses,
    validate_config,
)
from prefopt.rewards.classifier import REWARD_MODEL, SENTIMENT, TOXICITY
from prefopt.rewards.custom import CUSTOM, resolve_callable
from prefopt.rewards.oracle import ORACLE
from prefopt.rewards.text import KEYWORD, LENGTH, READABILITY
from prefopt.rewards.vader import VADER

AUX_REWARDS: dict[str, AuxReward] = {
    "length": LENGTH,
    "readability": READABILITY,
    "keyword": KEYWORD,
    "oracle": ORACLE,
    "custom": CUSTOM,
    "toxicity": TOXICITY,
    "sentiment": SENTIMENT,
    "vader": VADER,
    "reward_model": REWARD_MODEL,
}


def build_aux_reward(
    cfg: Mapping[str, Mapping[str, Any]] | None, context: Any = None
) -> CompositeReward | None:
    """Validates the `aux_reward` config (name -> fields) and builds R; None when no reward is selected.

    `context` carries what a reward may need beyond its config, e.g. the synthetic task for `oracle`.
    """
    components: dict[str, RewardFn] = {}
    weights: dict[str, float] = {}
    for name, raw in (cfg or {}).items():
        if name not in AUX_REWARDS:
            raise ValueError(
                f"aux_reward.{name}: unknown auxiliary reward; choose from {sorted(AUX_REWARDS)}"
            )
        entry = AUX_REWARDS[name]
        config = validate_config(name, entry.config, raw)
        components[name] = NamedReward(f"aux_reward.{name}", entry.build(config, context))
        weights[name] = config.weight
    return CompositeReward(components, weights) if components else None


__all__ = [
    "AUX_REWARDS",
    "AuxReward",
    "CompositeReward",
    "NamedReward",
    "RewardConfig",
    "RewardFn",
    "build_aux_reward",
    "resolve_callable",
    "score_responses",
]
