"""Auxiliary rewards r_k(x, y) and their weighted sum R = sum_k w_k r_k (HPO, arXiv 2405.17956).

Select any number in the config: `aux_reward=[readability,length] aux_reward.length.weight=0.5`.
Each name below has a schema in its module and a file conf/aux_reward/<name>.yaml.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefopt.errors import ConfigError
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
from prefopt.schema import did_you_mean

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


def validate_aux_rewards(cfg: Mapping[str, Any] | None, *, preflight: bool = True) -> dict[str, RewardConfig]:
    """The `aux_reward` config (name -> fields) as name -> validated schema instance, each the one way
    (`validate_config`); a value that is a RewardConfig already (RunConfig.aux_reward_configs) is kept."""
    configs: dict[str, RewardConfig] = {}
    for name, raw in (cfg or {}).items():
        if name not in AUX_REWARDS:
            hint = did_you_mean(name, AUX_REWARDS)
            raise ConfigError(
                f"aux_reward.{name}: unknown auxiliary reward{hint} (one of {sorted(AUX_REWARDS)})"
            )
        schema = AUX_REWARDS[name].config
        valid = isinstance(raw, schema)
        configs[name] = raw if valid else validate_config(name, schema, raw, preflight=preflight)
    return configs


def build_aux_reward(cfg: Mapping[str, Any] | None, context: Any = None) -> CompositeReward | None:
    """Builds R from the `aux_reward` config: name -> fields (validated here) or name -> a validated
    RewardConfig (`RunConfig.aux_reward_configs`, not validated again); None when none is selected.

    `context` carries what a reward may need beyond its config, e.g. the synthetic task for `oracle`.
    """
    configs = validate_aux_rewards(cfg, preflight=False)
    components: dict[str, RewardFn] = {
        name: NamedReward(f"aux_reward.{name}", AUX_REWARDS[name].build(config, context))
        for name, config in configs.items()
    }
    weights = {name: config.weight for name, config in configs.items()}
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
    "validate_aux_rewards",
    "validate_config",
]
