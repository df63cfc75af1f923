"""Datasets: a plain registry from `dataset.name` to a schema and a loader returning text pairs.

Every loader maps its source to the one pair format (`TextPairs`: prompt, chosen, rejected, a label
P(chosen preferred), optional scores and metadata) and reports what it read (`TextData.report`).
"""

from __future__ import annotations

import numpy as np

from prefopt.data.hh_rlhf import HHConfig, load_hh_rlhf
from prefopt.data.imdb import IMDbConfig, load_imdb
from prefopt.data.mixture import MixtureConfig, load_mixture
from prefopt.data.oasst import OASSTConfig, load_oasst
from prefopt.data.pairs import TextData, TextPairs
from prefopt.data.preference import PreferenceFileConfig, load_preference
from prefopt.data.registry import DATASETS, DatasetSpec, register
from prefopt.data.shp import SHPConfig, load_shp
from prefopt.data.synthetic import SyntheticConfig, build_task
from prefopt.data.ultrafeedback import UltraFeedbackConfig, load_ultrafeedback

__all__ = ["DATASETS", "DatasetSpec", "TextData", "TextPairs", "load_synthetic", "register"]


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


DATASETS.update(  # the registry lives in prefopt.data.registry, so that the mixture can read it
    {
        "synthetic": DatasetSpec(
            SyntheticConfig,
            load_synthetic,
            "generated task with known pi*, pi_ref, oracle",
            ground_truth=True,
        ),
        "preference": DatasetSpec(
            PreferenceFileConfig,
            load_preference,
            "your prompt/chosen/rejected files (jsonl/json/parquet/csv)",
        ),
        "hh_rlhf": DatasetSpec(HHConfig, load_hh_rlhf, "Anthropic/hh-rlhf dialogues (helpful, harmless)"),
        "ultrafeedback": DatasetSpec(
            UltraFeedbackConfig,
            load_ultrafeedback,
            "HuggingFaceH4/ultrafeedback_binarized, chat pairs + scores",
        ),
        "shp": DatasetSpec(SHPConfig, load_shp, "stanfordnlp/SHP Reddit comment pairs, score-ratio filtered"),
        "oasst": DatasetSpec(OASSTConfig, load_oasst, "OpenAssistant/oasst1 ranked sibling replies as pairs"),
        "imdb": DatasetSpec(
            IMDbConfig, load_imdb, "stanfordnlp/imdb review prefixes; precomputed pairs for now"
        ),
        "mixture": DatasetSpec(
            MixtureConfig, load_mixture, "weighted mixture of the above (HH + OASST + SHP)"
        ),
    }
)
