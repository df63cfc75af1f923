"""Rewards computed from the response text alone: length, readability (HPO's R1) and keywords."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from prefopt.errors import ConfigFieldError
from prefopt.rewards.base import AuxReward, RewardConfig, RewardFn


@dataclass
class LengthConfig(RewardConfig):
    max_words: int = 64  # responses this long or longer score 1 (before the sign)
    sign: int = 1  # +1 favours long responses; -1 favours short ones (the reward is then in [-1, 0])

    def __post_init__(self):
        if self.max_words < 1:
            raise ConfigFieldError("max_words", f"must be >= 1, got {self.max_words}")
        if self.sign not in (1, -1):
            raise ConfigFieldError("sign", f"must be +1 or -1, got {self.sign}")


def build_length(cfg: LengthConfig, context: Any) -> RewardFn:
    """r(x, y) = sign * min(n_words(y) / max_words, 1); words are whitespace-separated tokens."""

    def length(prompts: list[str], responses: list[str]) -> list[float]:
        return [cfg.sign * min(len(y.split()) / cfg.max_words, 1.0) for y in responses]

    return length


@dataclass
class ReadabilityConfig(RewardConfig):
    pass  # HPO's R1 has no parameters: the grade thresholds 9 and 5 are the paper's


def readability_reward(grade: float) -> float:
    """HPO's R1 = min(max((9 - grade) / 5, 0), 1): 1 at grade <= 4, 0 at grade >= 9."""
    return min(max((9.0 - grade) / 5.0, 0.0), 1.0)


def build_readability(cfg: ReadabilityConfig, context: Any) -> RewardFn:
    """R1 on the response, with grade = textstat.text_standard(y, float_output=True); empty text scores 0.

    textstat is pinned to 0.7.3: later versions fetch NLTK data at run time and fail offline. 0.7.3 imports
    `pkg_resources`, so it needs setuptools < 81 installed. Its consensus grade is the most common of eight
    formulas, with ties going to the first; SMOG is 0 below three sentences, so a short text of one or two
    sentences often gets grade 0 (reward 1) however dense it is. That is the paper's reward; we keep it.
    """
    with warnings.catch_warnings():  # pkg_resources' deprecation warning, raised on import
        warnings.simplefilter("ignore", UserWarning)
        import textstat

    def readability(prompts: list[str], responses: list[str]) -> list[float]:
        return [
            readability_reward(textstat.text_standard(y, float_output=True)) if y.strip() else 0.0
            for y in responses
        ]

    return readability


@dataclass
class KeywordConfig(RewardConfig):
    keywords: list[str] = field(default_factory=lambda: ["please"])  # matched as whole words, any case
    mode: str = (
        "any"  # any: 1 if a keyword occurs; fraction: share of keywords that occur; count: occurrences
    )
    per_word: bool = False  # mode=count only: divide the count by the response's number of words

    def __post_init__(self):
        if not self.keywords or not all(k.strip() for k in self.keywords):
            raise ConfigFieldError("keywords", f"needs at least one non-empty keyword, got {self.keywords}")
        if self.mode not in ("any", "fraction", "count"):
            raise ConfigFieldError("mode", f"must be any, fraction or count, got {self.mode!r}")


def build_keyword(cfg: KeywordConfig, context: Any) -> RewardFn:
    """Presence of configured words in the response (case-insensitive, whole words)."""
    keywords = [k.strip().lower() for k in cfg.keywords]
    # (?<!\w) and (?!\w) rather than \b so keywords that start or end with punctuation still match whole
    alternatives = "|".join(re.escape(k) for k in sorted(set(keywords), key=len, reverse=True))
    pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    def score(y: str) -> float:
        found = [m.lower() for m in pattern.findall(y)]
        if cfg.mode == "any":
            return float(bool(found))
        if cfg.mode == "fraction":
            return len(set(found)) / len(set(keywords))
        return len(found) / max(len(y.split()), 1) if cfg.per_word else float(len(found))

    def keyword(prompts: list[str], responses: list[str]) -> list[float]:
        return [score(y) for y in responses]

    return keyword


LENGTH = AuxReward(build_length, LengthConfig, "sign * min(n_words(y) / max_words, 1)")
READABILITY = AuxReward(
    build_readability, ReadabilityConfig, "HPO R1 = min(max((9 - grade(y)) / 5, 0), 1), textstat grade"
)
KEYWORD = AuxReward(build_keyword, KeywordConfig, "whole-word keyword presence in y: any, fraction or count")
