"""The `kl` group's schemas (conf/kl/<name>.yaml): one per KL estimator, keyed by the name `kl=<name>`
selects. The estimators themselves are `prefopt.engine.kl_estimators.KL_ESTIMATORS` (same names, each with
its schema as `config`); only an objective whose requirements say `kl` reads this group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from prefopt.schema import Check, at_least


@dataclass
class ExactKLConfig:
    """kl=exact: no options."""


@dataclass
class SampledKLConfig:
    """kl=samples: how many reference samples per prompt the estimate averages over."""

    samples_per_prompt: int = 4  # responses sampled from pi_ref per prompt, drawn once per run

    checks: ClassVar[dict[str, Check]] = {"samples_per_prompt": at_least(1)}


@dataclass
class TokenKLConfig:
    """kl=token: no options."""


KL_CONFIGS: dict[str, type] = {"exact": ExactKLConfig, "samples": SampledKLConfig, "token": TokenKLConfig}
