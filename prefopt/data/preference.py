"""Preference pairs from files or the Hugging Face hub, through `datasets.load_dataset`.

Rows need a prompt, a chosen and a rejected response (column names configurable) and may carry a soft label
P(chosen preferred). A bad row is reported with its split and index, and nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TextPairs:
    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    labels: list[float]  # P(chosen preferred); 1.0 for hard labels

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class PreferenceFileConfig:
    path: str = "???"  # load_dataset path: a hub name, or a builder (json, csv, parquet) with data_files
    data_files: dict[str, str] | None = None  # {train: file, eval: file} for local files
    config_name: str | None = None  # hub config (subset) name
    train_split: str = "train"
    eval_split: str = "test"  # held-out split; when absent, `eval_fraction` of train is held out
    eval_fraction: float = 0.05
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    label_column: str | None = None  # optional soft label column
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    max_prompt_tokens: int = 256
    max_response_tokens: int = 256
    seed: int | None = None  # shuffling seed for the held-out cut; None: the run's seed


def load_preference_pairs(cfg: PreferenceFileConfig, seed: int) -> tuple[TextPairs, TextPairs]:
    """Train and held-out pairs; rows are checked before any held-out cut, so errors give file row numbers."""
    from datasets import load_dataset

    source = load_dataset(cfg.path, cfg.config_name, data_files=cfg.data_files)
    if cfg.train_split not in source:
        raise ValueError(f"dataset.train_split: split {cfg.train_split!r} not in {cfg.path} ({list(source)})")
    train = _pairs(source[cfg.train_split], cfg, cfg.train_split, cfg.max_train_examples)
    if cfg.eval_split in source:
        return train, _pairs(source[cfg.eval_split], cfg, cfg.eval_split, cfg.max_eval_examples)
    order = np.random.default_rng(seed).permutation(len(train))
    cut = min(len(train) - 1, max(1, round(cfg.eval_fraction * len(train))))
    held_out = _subset(train, order[:cut])
    if cfg.max_eval_examples is not None:
        held_out = _subset(held_out, np.arange(min(cfg.max_eval_examples, len(held_out))))
    return _subset(train, np.sort(order[cut:])), held_out


def _subset(pairs: TextPairs, indices) -> TextPairs:
    pick = lambda column: [column[i] for i in indices]  # noqa: E731
    return TextPairs(pick(pairs.prompts), pick(pairs.chosen), pick(pairs.rejected), pick(pairs.labels))


def _pairs(rows, cfg: PreferenceFileConfig, split: str, limit: int | None) -> TextPairs:
    columns = [cfg.prompt_column, cfg.chosen_column, cfg.rejected_column]
    columns += [cfg.label_column] if cfg.label_column else []
    missing = [c for c in columns if c not in rows.column_names]
    if missing:
        raise ValueError(
            f"dataset {cfg.path} split {split!r}: missing columns {missing}; has {rows.column_names}"
        )
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    pairs = TextPairs([], [], [], [])
    for index, row in enumerate(rows):
        prompt, chosen, rejected = (row[c] for c in columns[:3])
        for column, value in zip(columns[:3], (prompt, chosen, rejected)):
            if not isinstance(value, str) or (column != cfg.prompt_column and not value.strip()):
                raise ValueError(
                    f"dataset {cfg.path} split {split!r} row {index}: {column} must be non-empty text"
                )
        label = float(row[cfg.label_column]) if cfg.label_column else 1.0
        if not 0.0 <= label <= 1.0:
            raise ValueError(f"dataset {cfg.path} split {split!r} row {index}: label {label} outside [0, 1]")
        pairs.prompts.append(prompt)
        pairs.chosen.append(chosen)
        pairs.rejected.append(rejected)
        pairs.labels.append(label)
    if not len(pairs):
        raise ValueError(f"dataset {cfg.path} split {split!r} is empty")
    return pairs
