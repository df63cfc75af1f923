"""The synthetic task's ground-truth reward, for checking that an objective recovers a known reward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefopt.rewards.base import AuxReward, RewardConfig, RewardFn

NO_ORACLE = "aux_reward.oracle needs a dataset with a known ground truth (dataset=synthetic)"


@dataclass
class OracleConfig(RewardConfig):
    pass  # the ground truth is the dataset's; only its weight is configured


def build_oracle(cfg: OracleConfig, context: Any) -> RewardFn:
    """r(x, y) = context.oracle_reward(prompts, responses), which only a task with a ground truth provides."""
    oracle_reward = getattr(context, "oracle_reward", None)
    if not callable(oracle_reward):
        raise ValueError(NO_ORACLE)

    def oracle(prompts: list[str], responses: list[str]) -> list[float]:
        return [float(r) for r in oracle_reward(prompts, responses)]

    return oracle


ORACLE = AuxReward(
    build_oracle, OracleConfig, "the dataset's ground-truth reward r*(x, y) (dataset=synthetic)"
)
