"""Preference pairs from your own files (or any hub dataset in this shape), through `datasets.load_dataset`.

`dataset.path` is a .jsonl/.json/.parquet/.csv file (its rows are the train split and `eval_fraction` of
them is held out), a dir of split files (train.jsonl + test.jsonl, data/train-*.parquet, ...), a hub name,
or a builder (json | csv | parquet) with `dataset.data_files` (a file, or {train: file, test: file}).

Rows (column names configurable):
    {"prompt": "...", "chosen": "...", "rejected": "..."}                  plain text
    {"prompt": [{"role": "user", "content": "..."}, ...],                  chat messages; the responses are
     "chosen": [{"role": "assistant", "content": "..."}], "rejected": ...}  the final assistant turns
A text prompt with message-list responses becomes one user message. Message-list responses may repeat the
prompt's messages before their final turn (UltraFeedback style); with `prompt_column: null` the prompt is
those shared messages. An optional label column gives P(chosen preferred) in [0, 1]; optional score
columns are kept beside the pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefopt.data.pairs import (
    BadRow,
    Pair,
    TextData,
    TextPairs,
    field_value,
    final_turn,
    messages,
)
from prefopt.data.rows import each_row, load_text_data
from prefopt.data.source import SourceConfig

__all__ = ["PreferenceFileConfig", "TextPairs", "load_preference"]


@dataclass
class PreferenceFileConfig(SourceConfig):
    prompt_column: str | None = (
        "prompt"  # null: the messages chosen and rejected share before their last turn
    )
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    label_column: str | None = None  # optional soft label P(chosen preferred) in [0, 1]
    score_chosen_column: str | None = None  # optional scores kept beside the pairs (a reward model's, ...)
    score_rejected_column: str | None = None


def _response(value, column: str) -> tuple[list | None, str]:
    """(messages before the final turn or None for text, the response text)."""
    if isinstance(value, list):
        return final_turn(messages(value, column), column)
    return None, value


def preference_pair(row: dict, cfg: PreferenceFileConfig) -> Pair:
    chosen_head, chosen = _response(field_value(row, cfg.chosen_column), cfg.chosen_column)
    rejected_head, rejected = _response(field_value(row, cfg.rejected_column), cfg.rejected_column)
    if cfg.prompt_column is None:
        if chosen_head is None or not chosen_head:
            raise BadRow(cfg.chosen_column, "no prompt column and no messages before the final turn")
        prompt = chosen_head
    else:
        prompt = field_value(row, cfg.prompt_column)
        if isinstance(prompt, list):
            prompt = messages(prompt, cfg.prompt_column)
        elif not isinstance(prompt, str):
            raise BadRow(cfg.prompt_column, f"not text or chat messages ({type(prompt).__name__})")
        elif chosen_head is not None:  # text prompt, message responses
            prompt = chosen_head or [{"role": "user", "content": prompt}]
    for head, column in ((chosen_head, cfg.chosen_column), (rejected_head, cfg.rejected_column)):
        if head and head != prompt:
            raise BadRow(column, "its messages before the final turn differ from the prompt")
    scores = [row.get(c) if c else None for c in (cfg.score_chosen_column, cfg.score_rejected_column)]
    label = field_value(row, cfg.label_column) if cfg.label_column else 1.0
    return Pair(prompt, chosen, rejected, label, *scores)


def load_preference(cfg: PreferenceFileConfig, seed: int, name: str = "preference") -> TextData:
    columns = [c for c in (cfg.prompt_column, cfg.chosen_column, cfg.rejected_column) if c]
    columns += [c for c in (cfg.label_column, cfg.score_chosen_column, cfg.score_rejected_column) if c]
    return load_text_data(
        cfg, seed, name, columns, lambda rows, _: each_row(rows, lambda r: preference_pair(r, cfg))
    )
