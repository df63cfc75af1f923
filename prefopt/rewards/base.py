"""What every auxiliary reward is, how the selected ones combine, and how they are scored once per dataset.

An auxiliary reward maps (prompt, response) text to a float, in batches so that a classifier on a GPU can
serve as one:

    RewardFn = (prompts: list[str], responses: list[str]) -> list[float]

The selected rewards combine as R(x, y) = sum_k w_k r_k(x, y) (HPO, Badrinath et al. 2024, arXiv 2405.17956).
They are fixed functions of the dataset's text, so the loop scores every distinct response once with
`score_responses` and caches the result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from prefopt.schema import validate

RewardFn = Callable[[list[str], list[str]], list[float]]


@dataclass
class RewardConfig:
    """Fields every auxiliary reward has; each reward's schema subclasses it."""

    weight: float = 1.0  # w_k in R = sum_k w_k r_k


@dataclass(frozen=True)
class AuxReward:
    """A registry entry: how to build the reward function from its validated config and a context."""

    build: Callable[[Any, Any], RewardFn]  # (config instance, context) -> RewardFn
    config: type[RewardConfig]  # the schema of conf/aux_reward/<name>.yaml
    description: str  # one line, with the formula


def validate_config(
    name: str, schema: type[RewardConfig], raw: Mapping[str, Any] | None, *, preflight: bool = False
) -> RewardConfig:
    """Checks `raw` against `schema`, returns a schema instance; errors (ConfigError, a ValueError) name
    `aux_reward.<name>.<field>`. `preflight`: also check what it names on this machine (a local model)."""
    return validate(schema, raw or {}, f"aux_reward.{name}", preflight=preflight)


@dataclass(frozen=True)
class NamedReward:
    """A reward function and the config key that selected it (`aux_reward.<name>`), so that an error in
    its scores can name it."""

    key: str
    fn: RewardFn

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.fn(prompts, responses)


@dataclass(frozen=True)
class CompositeReward:
    """R = sum_k w_k r_k over the selected rewards.

    `components` (name -> r_k, unweighted) lets the loop score and log each reward; `combine` then gives R
    without scoring anything twice: `combine({k: score_responses(r_k, ...) for k, r_k in components})`.
    """

    components: dict[str, RewardFn]
    weights: dict[str, float]

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        scores = {k: np.asarray(r(prompts, responses), dtype=np.float64) for k, r in self.components.items()}
        return self.combine(scores).tolist()

    def combine(self, scores: Mapping[str, np.ndarray]) -> np.ndarray:
        """Weighted sum of per-component scores, each (N,), keyed like `components`."""
        return sum(self.weights[k] * np.asarray(scores[k], dtype=np.float64) for k in self.components)


def score_responses(
    reward: RewardFn,
    prompts: list[str],
    responses: list[str],
    batch_size: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """Scores each row, calling `reward` once per distinct (prompt, response); returns (N,) float64.

    Preference data repeats responses (one response appears in several pairs), and a classifier reward is
    the expensive part, so rows are deduplicated before batching. A score that is not a finite number is an
    error naming the reward, the count and the first rows: NaN or inf would reach the loss as skipped steps.
    """
    key = getattr(reward, "key", "aux reward")
    if len(prompts) != len(responses):
        raise ValueError(f"{key}: {len(prompts)} prompts but {len(responses)} responses")
    index: dict[tuple[str, str], int] = {}
    rows = np.array(
        [index.setdefault((p, y), len(index)) for p, y in zip(prompts, responses, strict=True)],
        dtype=np.int64,
    )
    unique = list(index)
    scores = np.empty(len(unique), dtype=np.float64)
    bar = tqdm(total=len(unique), desc="aux reward", unit="response", disable=not progress)
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        values = reward([p for p, _ in chunk], [y for _, y in chunk])
        if len(values) != len(chunk):
            raise ValueError(f"{key}: returned {len(values)} scores for a batch of {len(chunk)}")
        scores[start : start + len(chunk)] = values
        bar.update(len(chunk))
    bar.close()
    scores = scores[rows]
    check_finite(scores, responses, key)
    return scores


def check_finite(scores: np.ndarray, responses: list[str], key: str, shown: int = 5) -> None:
    """Every score is a finite number, else a ValueError naming `key`, the count and the first rows."""
    bad = np.flatnonzero(~np.isfinite(scores))
    if not len(bad):
        return
    kinds = ", ".join(sorted({str(v) for v in scores[bad]}))
    rows = ", ".join(str(i) for i in bad[:shown])
    raise ValueError(
        f"{key}: {len(bad)} of {len(scores)} scores are not finite ({kinds}), e.g. rows {rows} "
        f"(response of row {bad[0]}: {responses[bad[0]][:60]!r}); a reward must return finite numbers"
    )
