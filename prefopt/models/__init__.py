"""Models and tokenizers: the embedded tiny Llama (built from a config, no download) or any hub/local
causal LM through `from_pretrained`, either with LoRA adapters (`model.lora.r > 0`). A registry maps
`model.name` to a schema and a builder; conf/model/{llama,qwen,pythia,gpt2}.yaml are `pretrained` presets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefopt.models.lora import AdapterDisabledReference, LoraConfig, adapter_reference, is_lora
from prefopt.models.pretrained import PretrainedModelConfig, load_pretrained, load_reference, save_checkpoint
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


DROPOUT_CONFIG_KEYS = ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout")


def has_dropout(model) -> bool:
    """Whether the model's training-mode forward is random: a dropout module with p > 0 (LoRA's too) or
    a dropout probability in its config that functional attention reads (Llama's `attention_dropout`)."""
    import torch

    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    return any(float(getattr(config, key, 0) or 0) > 0 for key in DROPOUT_CONFIG_KEYS)


__all__ = [
    "MODELS",
    "SPECIAL_TOKENS",
    "AdapterDisabledReference",
    "LoraConfig",
    "ModelSpec",
    "PretrainedModelConfig",
    "TinyModelConfig",
    "adapter_reference",
    "build_tiny",
    "build_word_tokenizer",
    "count_parameters",
    "has_dropout",
    "is_lora",
    "load_pretrained",
    "load_reference",
    "save_checkpoint",
]
