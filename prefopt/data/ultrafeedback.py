"""HuggingFaceH4/ultrafeedback_binarized: UltraFeedback prompts with the best-rated of four completions as
chosen and one of the others as rejected (as in Zephyr).

Hub format: parquet splits train_prefs / test_prefs (also train_sft, test_sft, train_gen, test_gen) with
columns
    prompt (str), prompt_id (str),
    chosen, rejected (lists of {"role", "content"}: the user prompt, then the assistant completion),
    messages (= chosen), score_chosen, score_rejected (float ratings, 1 to 10).
The prompt is every message before the final assistant turn (shared by chosen and rejected, or the row is
bad), the responses are the final turns' contents. `chat: false` renders the prompt as HH text instead.

Labels: `label: hard` gives 1.0 (chosen preferred); `label: scores` gives the Bradley-Terry probability of
the ratings read as rewards, P(chosen preferred) = sigmoid((score_chosen - score_rejected) / T) with
T = `score_temperature` (a tie gives 0.5). The scores are kept either way (scores_chosen/scores_rejected).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prefopt.data.dialogue import as_prompt, as_response
from prefopt.data.pairs import BadRow, Pair, TextData, field_value, final_turn, messages
from prefopt.data.rows import each_row, load_text_data
from prefopt.data.source import SourceConfig
from prefopt.errors import ConfigFieldError

LABELS = ("hard", "scores")


@dataclass
class UltraFeedbackConfig(SourceConfig):
    path: str = "HuggingFaceH4/ultrafeedback_binarized"
    train_split: str = "train_prefs"
    eval_split: str | None = "test_prefs"
    chat: bool = True  # true: prompts as chat messages; false: HH text ending in "\n\nAssistant:"
    label: str = "hard"  # hard: 1.0 | scores: sigmoid((score_chosen - score_rejected) / score_temperature)
    score_temperature: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.label not in LABELS:
            raise ConfigFieldError("label", f"{self.label!r} is not one of {list(LABELS)}")
        if not self.score_temperature > 0:
            raise ConfigFieldError("score_temperature", f"{self.score_temperature} is not > 0")


def score(row: dict, column: str) -> float:
    value = field_value(row, column)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise BadRow(column, f"not a number ({value!r})")
    return float(value)


def ultrafeedback_pair(row: dict, cfg: UltraFeedbackConfig) -> Pair:
    prompt, chosen = final_turn(messages(field_value(row, "chosen"), "chosen"), "chosen")
    rejected_prompt, rejected = final_turn(messages(field_value(row, "rejected"), "rejected"), "rejected")
    if rejected_prompt != prompt:
        raise BadRow("rejected", "its messages before the final turn differ from chosen's")
    if not prompt:
        raise BadRow("chosen", "no prompt message before the final assistant turn")
    scored = cfg.label == "scores" or row.get("score_chosen") is not None
    s_c, s_r = (score(row, "score_chosen"), score(row, "score_rejected")) if scored else (None, None)
    label = 1.0 if cfg.label == "hard" else 0.5 * (1.0 + math.tanh((s_c - s_r) / (2 * cfg.score_temperature)))
    return Pair(
        as_prompt(prompt, cfg.chat),
        as_response(chosen, cfg.chat),
        as_response(rejected, cfg.chat),
        label,
        s_c,
        s_r,
        {"prompt_id": row["prompt_id"]} if row.get("prompt_id") is not None else None,
    )


def load_ultrafeedback(cfg: UltraFeedbackConfig, seed: int) -> TextData:
    scores = ["score_chosen", "score_rejected"]
    columns = ["chosen", "rejected"] + (scores if cfg.label == "scores" else [])
    optional = ["prompt_id"] + ([] if cfg.label == "scores" else scores)
    pairs_of = lambda rows, _: each_row(rows, lambda r: ultrafeedback_pair(r, cfg))  # noqa: E731
    return load_text_data(cfg, seed, "ultrafeedback", columns, pairs_of, optional)
