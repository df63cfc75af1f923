"""A weighted mixture of datasets, e.g. HPO's (and KTO's) Anthropic HH + OpenAssistant + SHP.

`sources` maps a label to `{name: <dataset>, weight: <share>, ...that dataset's options}`; `name` defaults
to the label, and an option the yaml does not list is added with `+`, e.g.
`+dataset.sources.shp.data_dir=askscience`. Each source loads as it would alone (its own splits, filters,
bad-row handling; its seed is the mixture's unless set). Then each split takes from source k
n_k = N * w_k / sum(w) pairs (largest remainders, so they add up to N), drawn without replacement with the
seed, and shuffles them. N is `train_examples` / `eval_examples`; null means the largest N the weights
allow without repeating a pair (the smallest source relative to its weight sets it). Every pair's metadata
names its source; the report gives each source's counts, available and taken.

The mixture's token limits replace the sources' own; `chat` (when set) and `strict: true` apply to every
source. Sources must agree on the format: all text prompts or all chat messages.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from prefopt.data.pairs import TextData, TextPairs, concat_pairs
from prefopt.data.registry import DATASETS
from prefopt.data.source import check_token_limits
from prefopt.errors import ConfigFieldError
from prefopt.schema import build

log = logging.getLogger(__name__)

NOT_MIXABLE = ("mixture", "synthetic")


@dataclass
class MixtureSource:
    label: str
    name: str  # the dataset (a DATASETS key)
    weight: float
    config: Any  # that dataset's typed config


@dataclass
class MixtureConfig:
    # label -> {name, weight, ...options}; empty here (a schema default would merge into every mixture),
    # conf/dataset/mixture.yaml gives HPO's HH + OASST + SHP
    sources: dict[str, Any] = field(default_factory=dict)
    train_examples: int | None = None  # pairs in the mixed train split; null: the most the weights allow
    eval_examples: int | None = None  # same for the held-out split
    chat: bool | None = None  # sets every source's `chat` (null: each source's own)
    strict: bool = False  # true: the first bad row of any source is an error
    max_prompt_tokens: int = 256
    max_response_tokens: int = 256
    max_length: int | None = None
    seed: int | None = None  # seed of the draw (and of sources without their own); null: the run's seed

    def __post_init__(self):
        if not self.sources:
            raise ConfigFieldError("sources", "a mixture needs at least one source")
        for key in ("train_examples", "eval_examples"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigFieldError(key, f"{getattr(self, key)} is not >= 1 (null: the most that fit)")
        check_token_limits(self)
        self.parsed = [self._source(label, options) for label, options in self.sources.items()]

    def preflight(self) -> None:
        """Each source's own check before anything loads (its local files exist), naming its key."""
        for source in self.parsed:
            try:
                source.config.preflight()
            except ConfigFieldError as error:
                raise type(error)(f"sources.{source.label}.{error.field}", str(error)) from None

    def _source(self, label: str, options: Any) -> MixtureSource:
        where = f"sources.{label}"
        if not isinstance(options, dict):
            raise ConfigFieldError(where, "expected {name: <dataset>, weight: <share>, ...its options}")
        options = dict(options)
        name, weight = options.pop("name", label), options.pop("weight", 1.0)
        mixable = sorted(set(DATASETS) - set(NOT_MIXABLE))
        if name not in mixable:
            raise ConfigFieldError(
                f"{where}.name", f"{name!r} is not a dataset to mix; choose from {mixable}"
            )
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise ConfigFieldError(f"{where}.weight", f"{weight!r} is not a number > 0")
        schema = DATASETS[name].config
        if self.chat is not None and "chat" in schema.__dataclass_fields__:
            options["chat"] = self.chat
        options["strict"] = bool(options.get("strict")) or self.strict
        try:
            config = build(schema, options, f"dataset.{where}")
        except ConfigFieldError as error:
            raise ConfigFieldError(f"{where}.{error.field}", str(error)) from None
        return MixtureSource(label, name, float(weight), config)


def allocate(sizes: dict[str, int], weights: dict[str, float], total: int | None, key: str) -> dict[str, int]:
    """Pairs per source for a split of `total` (None: the most the weights allow without repeats):
    shares total * w_k / sum(w) rounded by largest remainders, exact in rational arithmetic."""
    weight_sum = sum(Fraction(w) for w in weights.values())
    share = {label: Fraction(w) / weight_sum for label, w in weights.items()}
    fit = min(math.floor(sizes[label] / share[label]) for label in sizes)
    total = fit if total is None else total
    exact = {label: total * share[label] for label in sizes}
    counts = {label: math.floor(value) for label, value in exact.items()}
    by_remainder = sorted(sizes, key=lambda label: exact[label] - counts[label], reverse=True)
    for label in by_remainder[: total - sum(counts.values())]:
        counts[label] += 1
    for label, count in counts.items():
        if count > sizes[label]:
            raise ValueError(
                f"dataset.{key}={total}: source {label} has {sizes[label]} pairs, fewer than its share "
                f"{count}; lower dataset.{key} (at most {fit} with these weights) or change the weights"
            )
    return counts


def _mix(parts: dict[str, TextPairs], counts: dict[str, int], rng: np.random.Generator) -> TextPairs:
    taken = []
    for label, pairs in parts.items():
        picked = pairs.subset(np.sort(rng.choice(len(pairs), counts[label], replace=False)))
        picked.metadata = [{**(m or {}), "source": label} for m in picked.metadata or [None] * len(picked)]
        taken.append(picked)
    mixed = concat_pairs(taken)
    return mixed.subset(rng.permutation(len(mixed)))


def _check_format(parts: dict[str, TextData]) -> None:
    kinds = {
        label: "chat" if isinstance(data.train.prompts[0], list) else "text" for label, data in parts.items()
    }
    if len(set(kinds.values())) > 1:
        raise ValueError(
            f"dataset=mixture: sources give different prompt formats {kinds}; set dataset.chat=true (chat "
            "messages) or dataset.chat=false (HH text) so every source gives one"
        )


def load_mixture(cfg: MixtureConfig, seed: int) -> TextData:
    seed = cfg.seed if cfg.seed is not None else seed
    parts = {s.label: DATASETS[s.name].load(s.config, seed) for s in cfg.parsed}
    _check_format(parts)
    weights = {s.label: s.weight for s in cfg.parsed}
    rng = np.random.default_rng([seed, 5])
    splits, report = {}, {"dataset": "mixture", "sources": {}}
    for role, key in (("train", "train_examples"), ("eval", "eval_examples")):
        sizes = {label: len(getattr(data, role)) for label, data in parts.items()}
        counts = allocate(sizes, weights, getattr(cfg, key), key)
        splits[role] = _mix({label: getattr(data, role) for label, data in parts.items()}, counts, rng)
        for s in cfg.parsed:
            entry = report["sources"].setdefault(s.label, {"dataset": s.name, "weight": s.weight})
            entry |= {role: counts[s.label], f"{role}_available": sizes[s.label]}
        log.info(
            "dataset=mixture: %d %s pairs (%s)",
            len(splits[role]),
            role,
            ", ".join(f"{label} {counts[label]} of {sizes[label]}" for label in counts),
        )
    for label, data in parts.items():
        report["sources"][label]["report"] = data.report
    report |= {"train_pairs": len(splits["train"]), "eval_pairs": len(splits["eval"])}
    return TextData(
        splits["train"],
        splits["eval"],
        cfg.max_prompt_tokens,
        cfg.max_response_tokens,
        max_length=cfg.max_length,
        report=report,
    )
