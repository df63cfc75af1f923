"""Shared helpers: compose the real config, run the real loop in-process on a very small model."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import prefopt
from prefopt.config import load_run_config, register_resolvers

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = str(prefopt.CONF_DIR)

# A few-second run: a 2-layer width-32 Llama on 6 prompts x 3 candidates.
FAST_MODEL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64"]
FAST = [
    "logger=none",
    "dataset.num_prompts=6",
    "dataset.num_candidates=3",
    "dataset.train_draws_per_prompt=60",
    "dataset.eval_draws_per_prompt=60",
    "trainer.max_steps=10",
    "dataset.reference_fit.lr=1e-2",
    "dataset.reference_fit.max_kl=0.2",
    "eval.eval_every_steps=5",
]


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Fitted references are cached per test session, never in the user's ~/.cache."""
    os.environ["PREFOPT_CACHE"] = str(tmp_path_factory.mktemp("prefopt-cache"))
    os.environ.setdefault("WANDB_SILENT", "true")


def compose_config(*overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def run_training(run_dir: Path, *overrides: str, tiny_model: bool = True) -> dict:
    """Train in-process through the real loop on the FAST settings; returns summary.json's content."""
    from prefopt.training.train import train

    run_dir.mkdir(parents=True, exist_ok=True)
    rc = load_run_config(compose_config(*FAST, *(FAST_MODEL if tiny_model else []), *overrides))
    return train(rc, run_dir)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@contextmanager
def torch_threads(count: int):
    """Run with `count` torch threads (tiny models gain nothing from more; a fit's path depends on it)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def save_tiny_llama(directory: Path, tokenizer, seed: int = 0, head=None, **config) -> Path:
    """A 2-layer width-32 Llama over `tokenizer`, written with its tokenizer by save_pretrained: a local
    `model=pretrained` path (its BOS and EOS are the tokenizer's). `head`: the model class (default a
    causal LM); `config`: LlamaConfig fields to change."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    config = LlamaConfig(**(fields | config))
    torch.manual_seed(seed)
    (head or LlamaForCausalLM)(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
