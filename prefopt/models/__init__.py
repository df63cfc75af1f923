"""Models and tokenizers: the embedded tiny Llama (built from a config, no download) or any hub/local
causal LM through `from_pretrained`. A registry maps `model.name` to a schema and a builder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefopt.models.pretrained import PretrainedModelConfig, load_pretrained, load_reference
from prefopt.models.tiny import SPECIAL_TOKENS, TinyModelConfig, build_tiny, build_word_tokenizer


@dataclass(frozen=True)
class ModelSpec:
    config: type
    build: Callable[[Any, list[str]], tuple[Any, Any]]  # (config, data vocabulary) -> (model, tokenizer)
    description: str
    random_init: bool = False  # the policy starts untrained, so a task's reference must be fitted first


MODELS: dict[str, ModelSpec] = {
    "tiny": ModelSpec(
        TinyModelConfig, build_tiny, "Llama LM of a few M params, built offline", random_init=True
    ),
    "pretrained": ModelSpec(PretrainedModelConfig, load_pretrained, "any causal LM via from_pretrained"),
}


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "MODELS",
    "SPECIAL_TOKENS",
    "ModelSpec",
    "PretrainedModelConfig",
    "TinyModelConfig",
    "build_tiny",
    "build_word_tokenizer",
    "count_parameters",
    "load_pretrained",
    "load_reference",
]
