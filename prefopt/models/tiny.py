"""The embedded tiny model: a Llama-architecture causal LM built from a config, over a word tokenizer of
the data (nothing is downloaded)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prefopt.models.lora import LoraConfig, apply_lora

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]


@dataclass
class TinyModelConfig:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 128
    reference_name_or_path: str | None = None  # None: the starting policy (under LoRA: adapters disabled)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def separate_reference(self):
        """The frozen reference `reference_name_or_path` names (fp32); None: the starting policy."""
        from prefopt.models.pretrained import load_reference

        return load_reference(self.reference_name_or_path) if self.reference_name_or_path else None


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
    """A randomly initialised Llama-architecture causal LM over a word tokenizer of `vocabulary`, with LoRA
    adapters when `cfg.lora.r > 0`. A random base cannot be fitted through rank-r updates alone, so every
    weight stays trainable for the supervised reference fit; taking the reference (`adapter_reference`)
    folds what the fit learned into the base and freezes it, leaving the adapters to preference training."""
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
    model = LlamaForCausalLM(config)
    if cfg.lora.r > 0:
        model = apply_lora(model, cfg.lora).requires_grad_(True)
    return model, tokenizer
