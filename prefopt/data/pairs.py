"""The one pair format every dataset adapter produces, and the checks every pair passes.

A prompt is plain text, or chat messages `[{"role": ..., "content": ...}]` (everything before the final
assistant turn); chosen and rejected are then that final turn's content, as plain strings. The tokenizer side
renders chat prompts with the tokenizer's chat template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefopt.data.ground_truth import NO_GROUND_TRUTH

Prompt = str | list[dict[str, str]]
ROLES = ("system", "user", "assistant")


@dataclass
class TextPairs:
    prompts: list[Prompt]
    chosen: list[str]
    rejected: list[str]
    labels: list[float]  # P(chosen preferred); 1.0 for hard labels
    scores_chosen: list[float] | None = None  # the dataset's own scores (UltraFeedback ratings, SHP upvotes)
    scores_rejected: list[float] | None = None
    metadata: list[dict] | None = None  # per pair: ids and the like (prompt_id, post_id, mixture source)

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices) -> TextPairs:
        pick = lambda column: None if column is None else [column[i] for i in indices]  # noqa: E731
        return TextPairs(
            pick(self.prompts),
            pick(self.chosen),
            pick(self.rejected),
            pick(self.labels),
            pick(self.scores_chosen),
            pick(self.scores_rejected),
            pick(self.metadata),
        )


@dataclass
class TextData:
    """Train and held-out pairs as text, the ground-truth task when there is one, token limits, and the
    loading report (rows read, kept, skipped and filtered per split, the first bad rows with reasons)."""

    train: TextPairs
    eval: TextPairs
    max_prompt_tokens: int
    max_response_tokens: int
    task: Any = None  # the ground truth the dataset declares (`prefopt.data.ground_truth`), if it has one
    max_length: int | None = None  # prompt + response tokens; None: the two limits only
    report: dict = field(default_factory=dict)
    pairs_from_samples: Any = None  # a SampledPairs request: the pairs come from the reference's samples

    def requests_after_model(self) -> list:
        """What the dataset asks of the starting model once it exists (pairs from its own samples)."""
        return [self.pairs_from_samples] if self.pairs_from_samples is not None else []

    @property
    def ground_truth(self):
        """The dataset's ground truth; `NO_GROUND_TRUTH` (empty answers) when it has none."""
        return NO_GROUND_TRUTH if self.task is None else self.task


@dataclass
class Pair:
    """One row's pair, before it joins a split."""

    prompt: Prompt
    chosen: Any
    rejected: Any
    label: Any = 1.0
    score_chosen: float | None = None
    score_rejected: float | None = None
    metadata: dict | None = None


class BadRow(ValueError):
    """A row that cannot give a pair: `field` names the column, the message says why."""

    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


class Filtered(Exception):
    """A row a dataset's filter drops by design (SHP's score ratio, OASST's language): counted, not bad."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def collect_pairs(pairs: list[Pair]) -> TextPairs:
    """Columns of checked pairs; score columns only when some pair has scores."""
    scored = any(p.score_chosen is not None for p in pairs)
    described = any(p.metadata for p in pairs)
    return TextPairs(
        prompts=[p.prompt for p in pairs],
        chosen=[p.chosen for p in pairs],
        rejected=[p.rejected for p in pairs],
        labels=[p.label for p in pairs],
        scores_chosen=[p.score_chosen for p in pairs] if scored else None,
        scores_rejected=[p.score_rejected for p in pairs] if scored else None,
        metadata=[p.metadata or {} for p in pairs] if described else None,
    )


def concat_pairs(parts: list[TextPairs]) -> TextPairs:
    def column(name: str, fill):
        if all(getattr(p, name) is None for p in parts):
            return None
        out = []
        for part in parts:
            values = getattr(part, name)
            out += values if values is not None else [fill() for _ in range(len(part))]
        return out

    return TextPairs(
        column("prompts", str),
        column("chosen", str),
        column("rejected", str),
        column("labels", float),
        column("scores_chosen", lambda: None),
        column("scores_rejected", lambda: None),
        column("metadata", dict),
    )


# ---- field checks (each raises BadRow naming the field) ---------------------------------------------


def field_value(row: dict, column: str) -> Any:
    """The row's value; absent or null is reported as missing (not as an empty text)."""
    value = row.get(column)
    if value is None:
        raise BadRow(column, "missing")
    return value


def text_field(row: dict, column: str) -> str:
    value = field_value(row, column)
    if not isinstance(value, str):
        raise BadRow(column, f"not text ({type(value).__name__})")
    return value


def messages(value: Any, column: str) -> list[dict[str, str]]:
    """Chat messages as plain {role, content} dicts; anything else in a message is dropped."""
    if not isinstance(value, list) or not value:
        raise BadRow(column, "not a non-empty list of chat messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise BadRow(column, f"message {i} has no text 'content'")
        if message.get("role") not in ROLES:
            raise BadRow(column, f"message {i} has role {message.get('role')!r}, not one of {list(ROLES)}")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def final_turn(conversation: list[dict[str, str]], column: str) -> tuple[list[dict[str, str]], str]:
    """(messages before the final turn, the final assistant turn's content)."""
    if conversation[-1]["role"] != "assistant":
        raise BadRow(column, f"the final message is a {conversation[-1]['role']!r} turn, not 'assistant'")
    return conversation[:-1], conversation[-1]["content"]


def check_pair(pair: Pair) -> Pair:
    """Responses non-empty text and distinct, a prompt of text or messages, a label in [0, 1]."""
    if not isinstance(pair.prompt, str):
        messages(pair.prompt, "prompt")
    for name, response in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if not isinstance(response, str):
            raise BadRow(name, f"not text ({type(response).__name__})")
        if not response.strip():
            raise BadRow(name, "empty response")
    if pair.chosen == pair.rejected:
        raise BadRow("rejected", "identical to chosen")
    try:
        label = float(pair.label)
    except (TypeError, ValueError):
        raise BadRow("label", f"not a number ({pair.label!r})") from None
    if not 0.0 <= label <= 1.0:  # also refuses NaN
        raise BadRow("label", f"{label} outside [0, 1]")
    pair.label = label
    return pair
