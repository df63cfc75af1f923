"""VADER sentiment (Hutto & Gilbert, ICWSM 2014): a lexicon and rule-based scorer that runs offline.

The lexicon ships inside the `vaderSentiment` package (3.3.2; `make install` installs it), so nothing is
downloaded. Its compound score sums the valences of the lexicon's words, adjusted by rules for negation,
intensifiers ("very"), capitals, "but" and exclamation marks, and normalizes the sum s to
compound = s / sqrt(s^2 + 15), in [-1, 1]: -1 most negative, 0 neutral (or no lexicon word at all, an
empty text too), +1 most positive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefopt.errors import ConfigFieldError
from prefopt.rewards.base import AuxReward, RewardConfig, RewardFn

SCALES = ("compound", "unit")


@dataclass
class VaderConfig(RewardConfig):
    scale: str = (
        "compound"  # compound: VADER's compound score in [-1, 1] | unit: (compound + 1) / 2, in [0, 1]
    )
    text: str = "response"  # response | prompt+response: what the scorer reads

    def __post_init__(self):
        if self.scale not in SCALES:
            raise ConfigFieldError("scale", f"must be one of {', '.join(SCALES)}, got {self.scale!r}")
        if self.text not in ("response", "prompt+response"):
            raise ConfigFieldError("text", f"must be response or prompt+response, got {self.text!r}")


def build_vader(cfg: VaderConfig, context: Any) -> RewardFn:
    """r(x, y) = VADER's compound score of y (or of x + y), in [-1, 1]; `scale=unit` maps it to [0, 1]."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()  # reads the packaged lexicon once

    def vader(prompts: list[str], responses: list[str]) -> list[float]:
        texts = responses if cfg.text == "response" else [f"{x} {y}" for x, y in zip(prompts, responses)]
        compound = [analyzer.polarity_scores(t)["compound"] for t in texts]
        return [(c + 1.0) / 2.0 for c in compound] if cfg.scale == "unit" else compound

    return vader


VADER = AuxReward(build_vader, VaderConfig, "VADER compound sentiment of y, in [-1, 1] (scale=unit: [0, 1])")
