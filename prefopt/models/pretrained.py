"""Any hub or local causal LM through `from_pretrained`, and a frozen reference loaded the same way."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PretrainedModelConfig:
    name_or_path: str = "???"  # hub id or local directory (e.g. a previous run's checkpoint)
    tokenizer_name_or_path: str | None = None  # None: same as name_or_path
    reference_name_or_path: str | None = None  # None: a frozen copy of the starting policy
    dtype: str = "float32"  # weight dtype: float32 | bfloat16 (autocast is set by trainer.precision)
    attn_implementation: str | None = "sdpa"
    trust_remote_code: bool = False


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
