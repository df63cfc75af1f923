"""stanfordnlp/imdb: the DPO paper's controlled-sentiment task. Prompts are prefixes of movie reviews; the
pairs are the reference model's completions of a prefix, ranked by a sentiment classifier
(p(positive | x, y_w) > p(positive | x, y_l)).

Hub format: parquet splits train / test / unsupervised (25k / 25k / 50k) with columns
    text (the review, with "<br />" line breaks), label (0 negative, 1 positive).

What exists today: `review_prefixes` (the prompts: the first 2 to 8 words of each review, drawn with the
seed; words stand in for the GPT-2 tokens of TRL's sentiment example, as the data side has no tokenizer),
`load_prompts` (them, through load_dataset), and `pairs_from_samples` (pairs from each prompt's samples and
their classifier scores), for the generation step to call. That step needs the sentiment classifier, which
comes with the sentiment reward ([6/8]); until then `dataset=imdb` trains only on precomputed pairs,
`dataset.pairs_path=<file or dir of prompt/chosen/rejected rows>` (read like dataset=preference), and
without it stops at once saying so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

import numpy as np

from prefopt.config import ConfigFieldError
from prefopt.data.pairs import TextData, TextPairs
from prefopt.data.preference import PreferenceFileConfig, load_preference
from prefopt.data.source import SourceConfig, open_source

_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


@dataclass
class IMDbConfig(SourceConfig):
    path: str = "stanfordnlp/imdb"  # the reviews the prompts come from
    text_column: str = "text"
    min_prompt_words: int = 2  # each prompt is the first n words of a review, n uniform in [min, max]
    max_prompt_words: int = 8
    pairs_path: str | None = None  # precomputed pairs (prompt/chosen/rejected rows); required until [6/8]

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.min_prompt_words <= self.max_prompt_words:
            raise ConfigFieldError("min_prompt_words", "need 1 <= min_prompt_words <= max_prompt_words")


def review_prefixes(texts: list[str], min_words: int, max_words: int, rng: np.random.Generator) -> list[str]:
    """The first n words of each review (HTML line breaks as spaces), n drawn uniformly in [min, max]."""
    lengths = rng.integers(min_words, max_words + 1, size=len(texts))
    return [" ".join(_BREAK.sub(" ", text).split()[:n]) for text, n in zip(texts, lengths)]


def load_prompts(cfg: IMDbConfig, seed: int) -> dict[str, list[str]]:
    """{"train": prompts, "eval": prompts} from the reviews of the train and eval splits (row limits
    apply), through load_dataset."""
    source = open_source(cfg, "imdb")
    rng = np.random.default_rng([cfg.seed if cfg.seed is not None else seed, 4])
    prompts = {}
    for role, key, limit in (
        ("train", "train_split", cfg.max_train_examples),
        ("eval", "eval_split", cfg.max_eval_examples),
    ):
        rows = source.split(getattr(cfg, key), key)
        if cfg.text_column not in rows.column_names:
            raise ValueError(f"dataset=imdb: no column {cfg.text_column!r} (it has {rows.column_names})")
        rows = rows.select(range(min(limit, len(rows)))) if limit is not None else rows
        texts = [t for t in rows[cfg.text_column] if isinstance(t, str) and t.strip()]
        prompts[role] = review_prefixes(texts, cfg.min_prompt_words, cfg.max_prompt_words, rng)
    return prompts


def pairs_from_samples(
    prompts: list[str],
    samples: list[list[str]],
    scores: list[list[float]],
    max_pairs_per_prompt: int | None = None,
    seed: int = 0,
) -> TextPairs:
    """Preference pairs from each prompt's sampled completions and their scores (p(positive) from the
    sentiment classifier): every pair of distinct completions with different scores, the higher-scored one
    chosen; with `max_pairs_per_prompt`, that many drawn with the seed. Scores are kept beside the pairs."""
    if not len(prompts) == len(samples) == len(scores):
        raise ValueError(f"{len(prompts)} prompts, {len(samples)} sample lists and {len(scores)} score lists")
    rng = np.random.default_rng(seed)
    out = TextPairs([], [], [], [], [], [])
    for prompt, texts, values in zip(prompts, samples, scores):
        if len(texts) != len(values):
            raise ValueError(f"prompt {prompt!r}: {len(texts)} samples but {len(values)} scores")
        pairs = [
            (i, j) if values[i] > values[j] else (j, i)
            for i in range(len(texts))
            for j in range(i + 1, len(texts))
            if values[i] != values[j] and texts[i] != texts[j]
        ]
        if max_pairs_per_prompt is not None and len(pairs) > max_pairs_per_prompt:
            pairs = [pairs[k] for k in sorted(rng.choice(len(pairs), max_pairs_per_prompt, replace=False))]
        for w, lose in pairs:
            out.prompts.append(prompt)
            out.chosen.append(texts[w])
            out.rejected.append(texts[lose])
            out.labels.append(1.0)
            out.scores_chosen.append(float(values[w]))
            out.scores_rejected.append(float(values[lose]))
    return out


def load_imdb(cfg: IMDbConfig, seed: int) -> TextData:
    if cfg.pairs_path is None:
        raise ValueError(
            "dataset=imdb: its pairs are reference completions of review prefixes ranked by a sentiment "
            "classifier, which arrives with the sentiment reward [6/8]; until then give precomputed pairs, "
            "dataset.pairs_path=<.jsonl/.json/.parquet/.csv file or dir of prompt/chosen/rejected rows> "
            "(prefopt.data.imdb.pairs_from_samples builds them from prompts, samples and scores)"
        )
    shared = {
        f.name: getattr(cfg, f.name) for f in fields(SourceConfig) if f.name not in ("path", "data_dir")
    }
    shared |= {"data_files": None, "config_name": None}
    return load_preference(PreferenceFileConfig(path=cfg.pairs_path, **shared), seed, "imdb")
