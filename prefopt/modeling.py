"""Models and tokenizers: the embedded tiny Llama (built from a config, no download) or any hub/local
causal LM through `from_pretrained`. A registry maps `model.name` to a schema and a builder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]


@dataclass
class TinyModelConfig:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 128
    reference_name_or_path: str | None = None  # None: a frozen copy of the starting policy


@dataclass
class PretrainedModelConfig:
    name_or_path: str = "???"  # hub id or local directory (e.g. a previous run's checkpoint)
    tokenizer_name_or_path: str | None = None  # None: same as name_or_path
    reference_name_or_path: str | None = None  # None: a frozen copy of the starting policy
    dtype: str = "float32"  # weight dtype: float32 | bfloat16 (autocast is set by trainer.precision)
    attn_implementation: str | None = "sdpa"
    trust_remote_code: bool = False


def build_word_tokenizer(words: list[str]):
    """A whitespace word-level fast tokenizer: one token per word, so text length is token length."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(set(words) - set(SPECIAL_TOKENS)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def build_tiny(cfg: TinyModelConfig, vocabulary: list[str]):
    """A randomly initialised Llama-architecture causal LM over a word tokenizer of `vocabulary`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_word_tokenizer(vocabulary)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config), tokenizer


def load_pretrained(cfg: PretrainedModelConfig, vocabulary: list[str] | None = None):
    """Load a causal LM and its tokenizer with `from_pretrained`; a missing pad token becomes EOS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path or cfg.name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        cfg.name_or_path,
        dtype=getattr(torch, cfg.dtype),
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
    )
    return model, tokenizer


def load_reference(name_or_path: str, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=getattr(torch, dtype))


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
