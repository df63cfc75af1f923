"""stanfordnlp/SHP: Stanford Human Preferences, pairs of Reddit comments to one post, the preferred one
written later yet upvoted more.

Hub format: one folder per subreddit domain (askculinary, askscience, ...; select one with `data_dir`, none:
all 18), each with train.json, validation.json, test.json (JSON lines) of rows
    post_id, domain, upvote_ratio, history (the post: title and text),
    c_root_id_A, c_root_id_B, created_at_utc_A, created_at_utc_B, score_A, score_B (upvotes),
    human_ref_A, human_ref_B (the two comments), labels (1 if A is preferred, 0 if B),
    seconds_difference, score_ratio (the larger score over the smaller).
The prompt is `history` (HH text "\\n\\nHuman: <history>\\n\\nAssistant:", or a user message with
`chat: true`), chosen/rejected are human_ref_A/B as `labels` says, their scores are kept.

Training pairs are filtered as the SHP authors advise and as the KTO/HALOs code does: `score_ratio` at
least `min_score_ratio` (2: the preference is clear), and at most `max_pairs_per_post` pairs per post (5,
drawn with the seed; a post with hundreds of pairs would otherwise dominate). Eval pairs are not filtered.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from prefopt.data.dialogue import as_prompt, as_response
from prefopt.data.pairs import BadRow, Filtered, Pair, TextData, field_value, text_field
from prefopt.data.rows import attempt, load_text_data
from prefopt.data.source import SourceConfig
from prefopt.errors import ConfigFieldError

COLUMNS = ["post_id", "history", "human_ref_A", "human_ref_B", "labels", "score_A", "score_B", "score_ratio"]


@dataclass
class SHPConfig(SourceConfig):
    path: str = "stanfordnlp/SHP"
    chat: bool = False  # true: the post as a user message; false: HH text ending in "\n\nAssistant:"
    min_score_ratio: float = 2.0  # train pairs need score_ratio >= this (1: no filter)
    max_pairs_per_post: int | None = 5  # train pairs kept per post, drawn with the seed (null: all)

    def __post_init__(self):
        super().__post_init__()
        if self.max_pairs_per_post is not None and self.max_pairs_per_post < 1:
            raise ConfigFieldError("max_pairs_per_post", f"{self.max_pairs_per_post} is not >= 1 (null: all)")


def shp_pair(row: dict, chat: bool, min_score_ratio: float = 0.0) -> Pair:
    history = text_field(row, "history")
    a, b = text_field(row, "human_ref_A"), text_field(row, "human_ref_B")
    label = field_value(row, "labels")
    if label not in (0, 1) or isinstance(label, float | bool):
        raise BadRow("labels", f"{label!r} is not 1 (A preferred) or 0 (B preferred)")
    ratio = field_value(row, "score_ratio")
    if isinstance(ratio, bool) or not isinstance(ratio, int | float):
        raise BadRow("score_ratio", f"not a number ({ratio!r})")
    if ratio < min_score_ratio:
        raise Filtered(f"score_ratio below {min_score_ratio:g}")
    scores = (row.get("score_A"), row.get("score_B"))
    (chosen, s_c), (rejected, s_r) = ((a, scores[0]), (b, scores[1]))[:: 1 if label == 1 else -1]
    prompt = as_prompt([{"role": "user", "content": history}], chat)
    metadata = {"post_id": row.get("post_id"), "domain": row.get("domain")}
    return Pair(prompt, as_response(chosen, chat), as_response(rejected, chat), 1.0, s_c, s_r, metadata)


def kept_per_post(post_ids: list, ratios: list, cfg: SHPConfig, seed: int) -> set[int] | None:
    """Row indices kept by the per-post cap: up to `max_pairs_per_post` of each post's rows that pass the
    ratio filter, drawn with the seed (rows the filter drops, or with no ratio, are left to it)."""
    if cfg.max_pairs_per_post is None:
        return None
    by_post = defaultdict(list)
    for index, (post, ratio) in enumerate(zip(post_ids, ratios)):
        if ratio is None or ratio >= cfg.min_score_ratio:
            by_post[post].append(index)
    rng, kept = np.random.default_rng([seed, 3]), set()
    for indices in by_post.values():
        if len(indices) > cfg.max_pairs_per_post:
            indices = rng.choice(indices, cfg.max_pairs_per_post, replace=False).tolist()
        kept.update(indices)
    return kept


def load_shp(cfg: SHPConfig, seed: int) -> TextData:
    seed = cfg.seed if cfg.seed is not None else seed

    def pairs_of(rows, role: str):
        if role == "eval":
            for index, row in enumerate(rows):
                yield index, attempt(shp_pair, row, cfg.chat)
            return
        kept = kept_per_post(rows["post_id"], rows["score_ratio"], cfg, seed)
        for index, row in enumerate(rows):
            if kept is not None and index not in kept and _passes(row, cfg):
                yield index, Filtered(f"beyond {cfg.max_pairs_per_post} pairs of its post")
            else:
                yield index, attempt(shp_pair, row, cfg.chat, cfg.min_score_ratio)

    return load_text_data(cfg, seed, "shp", COLUMNS, pairs_of, ["domain"])


def _passes(row: dict, cfg: SHPConfig) -> bool:
    return row.get("score_ratio") is None or row["score_ratio"] >= cfg.min_score_ratio
