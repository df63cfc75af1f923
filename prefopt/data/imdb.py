"""stanfordnlp/imdb: the DPO paper's controlled-sentiment task. Prompts are prefixes of movie reviews; the
pairs are the reference model's completions of a prefix, ranked by a sentiment classifier
(p(positive | x, y_w) > p(positive | x, y_l)).

Hub format: parquet splits train / test / unsupervised (25k / 25k / 50k) with columns
    text (the review, with "<br />" line breaks), label (0 negative, 1 positive).

The prompts are the first 2 to 8 words of each review (`review_prefixes`, drawn with the seed; words stand
in for the GPT-2 tokens of TRL's sentiment example). Without `dataset.pairs_path` the loader returns them
with a `SampledPairs` request: once the model is built, the run samples `samples_per_prompt` completions of
each prompt from the reference, scores them with the aux reward named by `dataset.scorer` (the sentiment
classifier, `aux_reward=sentiment`) and builds the pairs with `pairs_from_samples`, for the train and the
eval prompts alike. `dataset.pairs_path=<file or dir of prompt/chosen/rejected rows>` trains on
precomputed pairs instead (read like dataset=preference).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

import numpy as np

from prefopt.data.pairs import TextData, TextPairs
from prefopt.data.preference import PreferenceFileConfig, load_preference
from prefopt.data.source import SourceConfig, load_arguments, open_source
from prefopt.errors import ConfigFieldError

_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


@dataclass
class IMDbConfig(SourceConfig):
    path: str = "stanfordnlp/imdb"  # the reviews the prompts come from
    text_column: str = "text"
    min_prompt_words: int = 2  # each prompt is the first n words of a review, n uniform in [min, max]
    max_prompt_words: int = 8
    pairs_path: str | None = None  # precomputed pairs (prompt/chosen/rejected rows); None: sample them
    samples_per_prompt: int = 4  # completions sampled from the reference per prompt
    max_new_tokens: int = 48  # length of a sampled completion
    scorer: str = "sentiment"  # the aux reward (aux_reward=<name>) that ranks the completions
    max_pairs_per_prompt: int | None = None  # None: every pair of differently scored completions

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.min_prompt_words <= self.max_prompt_words:
            raise ConfigFieldError("min_prompt_words", "need 1 <= min_prompt_words <= max_prompt_words")
        if self.samples_per_prompt < 2:
            raise ConfigFieldError("samples_per_prompt", "need at least 2 completions to make a pair")
        if self.max_new_tokens < 1:
            raise ConfigFieldError("max_new_tokens", "need at least 1")

    def preflight(self) -> None:
        """The reviews' source, or only the precomputed pairs' file or dir when `pairs_path` is given."""
        if self.pairs_path is None:
            return super().preflight()
        try:
            load_arguments(SourceConfig(path=self.pairs_path), "dataset.pairs_path")
        except ConfigFieldError as error:
            raise type(error)("pairs_path", str(error)) from None


@dataclass(frozen=True)
class SampledPairs:
    """A request for pairs built from the reference's samples of each prompt, ranked by an aux reward."""

    train_prompts: list[str]
    eval_prompts: list[str]
    samples_per_prompt: int
    max_new_tokens: int
    scorer: str
    max_pairs_per_prompt: int | None
    seed: int

    def check_scorer(self, aux_reward_names) -> None:
        """Before the model loads: the aux reward that ranks the samples is configured."""
        if self.scorer not in aux_reward_names:
            raise ValueError(
                f"dataset.scorer={self.scorer}: the pairs are ranked by that aux reward; configure it "
                f"(aux_reward={self.scorer}) or give precomputed pairs with dataset.pairs_path"
            )


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
        prompts = load_prompts(cfg, seed)
        request = SampledPairs(
            prompts["train"],
            prompts["eval"],
            cfg.samples_per_prompt,
            cfg.max_new_tokens,
            cfg.scorer,
            cfg.max_pairs_per_prompt,
            cfg.seed if cfg.seed is not None else seed,
        )
        empty = TextPairs([], [], [], [])
        report = {"dataset": "imdb", "prompts": {k: len(v) for k, v in prompts.items()}}
        return TextData(
            empty,
            empty,
            cfg.max_prompt_tokens,
            cfg.max_response_tokens,
            max_length=cfg.max_length,
            report=report,
            pairs_from_samples=request,
        )
    shared = {
        f.name: getattr(cfg, f.name) for f in fields(SourceConfig) if f.name not in ("path", "data_dir")
    }
    shared |= {"data_files": None, "config_name": None}
    return load_preference(PreferenceFileConfig(path=cfg.pairs_path, **shared), seed, "imdb")
