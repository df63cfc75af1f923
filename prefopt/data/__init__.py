"""Datasets: a plain registry from `dataset.name` to a schema and a loader returning text pairs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from prefopt.data.preference import PreferenceFileConfig, TextPairs, load_preference_pairs
from prefopt.data.synthetic import SyntheticConfig, SyntheticTask, build_task


@dataclass
class TextData:
    """Train and held-out pairs as text, the ground-truth task when there is one, token limits."""

    train: TextPairs
    eval: TextPairs
    max_prompt_tokens: int
    max_response_tokens: int
    task: SyntheticTask | None = None


def load_synthetic(cfg: SyntheticConfig, seed: int) -> TextData:
    task_seed = cfg.seed if cfg.seed is not None else seed
    task = build_task(cfg, task_seed)
    rng = np.random.default_rng([task_seed, 1])

    def split(draws: int) -> TextPairs:
        rows = task.sample_pairs(draws, rng)
        return TextPairs(
            prompts=[task.prompts[p] for p, _, _ in rows],
            chosen=[task.candidates[p][c] for p, c, _ in rows],
            rejected=[task.candidates[p][r] for p, _, r in rows],
            labels=[1.0] * len(rows),
        )

    train, held_out = split(cfg.train_draws_per_prompt), split(cfg.eval_draws_per_prompt)
    return TextData(train, held_out, cfg.max_prompt_tokens, cfg.max_response_tokens, task)


def load_files(cfg: PreferenceFileConfig, seed: int) -> TextData:
    train, held_out = load_preference_pairs(cfg, cfg.seed if cfg.seed is not None else seed)
    return TextData(train, held_out, cfg.max_prompt_tokens, cfg.max_response_tokens)


@dataclass(frozen=True)
class DatasetSpec:
    config: type
    load: Callable[[Any, int], TextData]
    description: str
    ground_truth: bool = False  # the task knows pi*, pi_ref and the oracle (exact metrics, reference fit)


DATASETS: dict[str, DatasetSpec] = {
    "synthetic": DatasetSpec(
        SyntheticConfig, load_synthetic, "generated task with known pi*, pi_ref, oracle", ground_truth=True
    ),
    "preference": DatasetSpec(
        PreferenceFileConfig, load_files, "prompt/chosen/rejected rows via load_dataset"
    ),
}
