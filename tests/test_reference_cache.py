"""Reference log-probs cached on disk across runs: a hit on identical inputs runs no forward pass, and any
change of weights, tokenizer, data or length budget misses; an unreadable file is recomputed."""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import weakref

import pytest
import torch
from conftest import FAST, FAST_MODEL, ROOT, compose_config, read_jsonl, run_training

from prefopt.data.batching import SequenceTable
from prefopt.engine import reference_cache
from prefopt.engine.reference import all_sequence_logps as _all_sequence_logps
from prefopt.engine.reference_cache import cache_dir, cached_reference_logps, model_fingerprint
from prefopt.models import LoraConfig, TinyModelConfig, adapter_reference, build_tiny

WORDS = ["tell", "me", "about", "topic0", "topic1", ".", "yes", "no", "maybe", "so"]
PROMPTS = ["tell me about topic0 .", "tell me about topic1 ."]  # 5 tokens each (no BOS)
CHOSEN = ["yes so", "maybe so yes"]
REJECTED = ["no", "no maybe"]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))


def build(seed: int = 0, chosen=CHOSEN, max_length: int | None = None, lora: int = 0):
    """A 2-layer tiny Llama (the same weights for the same seed) and a table of two pairs."""
    torch.manual_seed(seed)
    cfg = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    cfg.lora = LoraConfig(r=lora)
    model, tokenizer = build_tiny(cfg, WORDS)
    model.eval()
    table = SequenceTable(tokenizer, 16, 16, max_length)
    table.add_pairs(PROMPTS, list(chosen), REJECTED)
    return model, table


class Pass:
    """The real reference pass, counted."""

    def __init__(self, model, table):
        self.model, self.table, self.calls = model, table, 0

    def __call__(self):
        self.calls += 1
        return _all_sequence_logps(self.model, self.table, 2048, CPU)


def never():
    raise AssertionError("a cache hit ran the reference pass")


def cached(model, table, compute, **settings):
    return cached_reference_logps(model, table, compute, CPU, chunk_tokens=2048, **settings)


def test_an_identical_run_hits_and_runs_no_forward_pass():
    model, table = build()
    first = Pass(model, table)
    logps, status = cached(model, table, first)
    assert status == "miss" and first.calls == 1
    assert logps.shape == (len(table),) and bool((logps < 0).all())
    again, table_again = build()  # fresh objects, the same weights, tokenizer and tokens
    hit, status = cached(again, table_again, never)
    assert status == "hit"
    assert torch.equal(hit, logps)
    assert [p.name for p in cache_dir().iterdir()] != [] and not list(cache_dir().glob(".tmp-*"))


def _weights(model, table):
    with torch.no_grad():
        model.get_output_embeddings().weight[0, 0] += 1e-3
    return model, table


def _chat_template(model, table):
    table.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return model, table


def _special_token(model, table):
    table.tokenizer.add_special_tokens({"additional_special_tokens": ["<sep>"]})
    return model, table


CHANGES = {
    "model weights": _weights,
    "tokenizer chat template": _chat_template,
    "tokenizer vocabulary": _special_token,
    "data": lambda model, table: build(chosen=["yes so", "maybe no"]),
    "max length": lambda model, table: build(max_length=7),  # cuts "maybe so yes" to two tokens
    "chunking": None,
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_model_tokenizer_data_or_length_budget_misses(change):
    model, table = build()
    original, _ = cached(model, table, Pass(model, table))
    model, table = build()
    compute = Pass(model, table)
    if CHANGES[change] is None:  # a setting of the pass
        _, status = cached_reference_logps(model, table, compute, CPU, chunk_tokens=16)
    else:
        model, table = CHANGES[change](model, table)
        compute = Pass(model, table)
        logps, status = cached(model, table, compute)
        if change in {"model weights", "max length"}:  # the values themselves move
            assert not torch.equal(logps, original)
    assert status == "miss" and compute.calls == 1
    assert len(list(cache_dir().glob("*.safetensors"))) == 2  # the original entry is kept


def test_disabled_cache_computes_and_writes_nothing():
    model, table = build()
    compute = Pass(model, table)
    _, status = cached_reference_logps(model, table, compute, CPU, enabled=False)
    assert status == "off" and compute.calls == 1
    assert not cache_dir().exists()


def _garbage(path, key):
    path.write_bytes(b"\x00not a safetensors file")


def _truncated(path, key):
    path.write_bytes(path.read_bytes()[:-3])


def _wrong_length(path, key):
    from safetensors.torch import save_file

    save_file({"logps": torch.zeros(1)}, str(path), metadata={"key": key})


def _flipped(path, key):
    """One float's bytes changed under an intact header: it parses, only the sha256 tells."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_garbage, _truncated, _wrong_length, _flipped])
def test_an_unreadable_cache_file_is_recomputed_with_a_warning(damage, caplog):
    model, table = build()
    expected, _ = cached(model, table, Pass(model, table))
    (path,) = cache_dir().glob("*.safetensors")
    damage(path, path.stem)
    compute = Pass(model, table)
    with caplog.at_level(logging.WARNING, logger=reference_cache.__name__):
        logps, status = cached(model, table, compute)
    assert status == "miss" and compute.calls == 1
    assert torch.equal(logps, expected)
    assert any(r.levelno == logging.WARNING and path.name in r.getMessage() for r in caplog.records)
    assert cached(model, table, never)[1] == "hit"  # rewritten whole


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_write_that_fails_leaves_no_partial_file(error, monkeypatch, caplog):
    """A failed write costs the cache entry, not the run; an interrupted one propagates. Neither leaves a
    temporary file or an entry behind."""
    import safetensors.torch

    def failing(tensors, filename, metadata=None):
        with open(filename, "wb") as half:
            half.write(b"\x00" * 8)
        raise error

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    model, table = build()
    expected = Pass(model, table)()
    if isinstance(error, OSError):
        with caplog.at_level(logging.WARNING, logger=reference_cache.__name__):
            logps, status = cached(model, table, Pass(model, table))
        assert status == "miss" and torch.equal(logps, expected)
        assert any("disk full" in r.getMessage() for r in caplog.records)
    else:
        with pytest.raises(KeyboardInterrupt):
            cached(model, table, Pass(model, table))
    assert list(cache_dir().iterdir()) == []


def test_a_lora_reference_is_keyed_by_its_base_not_its_disabled_adapters():
    policy, _ = build(lora=2)
    reference = adapter_reference(policy)
    before = model_fingerprint(reference)
    lora_a = next(p for n, p in policy.named_parameters() if "lora_A" in n)
    base = next(p for n, p in policy.named_parameters() if "lora_" not in n and "weight" in n)
    with torch.no_grad():
        lora_a.add_(1.0)  # B = 0 and adapters off: pi_ref is unchanged
        assert model_fingerprint(reference) == before
        base.add_(1e-3)
    assert model_fingerprint(reference) != before


@pytest.mark.parametrize(
    "overrides, kept",
    [
        ([], False),
        (["eval.generate=true", "eval.generation.num_prompts=2", "eval.generation.num_samples=1"], True),
        (["objective=expo", "kl=token"], True),
    ],
)
def test_the_reference_model_is_freed_unless_token_kl_or_generation_reads_it(overrides, kept, monkeypatch):
    """After its log-probs pass the reference copy is gone (no object holds it), unless the token-level
    KL or the generation eval still samples from it."""
    from prefopt.config import load_run_config
    from prefopt.engine import prepare as prepare_module

    built = []
    make_reference = prepare_module.frozen_reference

    def tracked(*args):
        reference = make_reference(*args)
        built.append(weakref.ref(reference))
        return reference

    monkeypatch.setattr(prepare_module, "frozen_reference", tracked)
    run = prepare_module.prepare(load_run_config(compose_config(*FAST, *FAST_MODEL, *overrides)), CPU)
    gc.collect()
    assert (built[0]() is not None) is kept
    assert (run.reference is not None) is kept
    assert run.inputs.reference_logps.shape == (len(run.table),)


def prefopt_train(run_dir, *overrides: str, cache) -> dict:
    env = {**os.environ, "PREFOPT_CACHE": str(cache)}
    command = [sys.executable, "-m", "prefopt", "train", *FAST, *FAST_MODEL, f"hydra.run.dir={run_dir}"]
    result = subprocess.run(
        [*command, *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def test_prefopt_train_twice_hits_the_cache_and_takes_the_same_steps(tmp_path):
    """Two runs of one config into two run dirs with a shared cache: the second reads the reference
    log-probs (and the reference fit) from the cache and logs bit-identical losses."""
    steps = ["trainer.max_steps=4", "trainer.log_every_steps=1"]
    first = prefopt_train(tmp_path / "first", *steps, cache=tmp_path / "cache")
    second = prefopt_train(tmp_path / "second", *steps, cache=tmp_path / "cache")
    assert first["data"]["reference_logps_cache"] == "miss"
    assert second["data"]["reference_logps_cache"] == "hit"
    losses = [
        [r["train/loss"] for r in read_jsonl(tmp_path / run / "metrics.jsonl") if "train/loss" in r]
        for run in ("first", "second")
    ]
    assert len(losses[0]) == 4 and losses[1] == losses[0]
    assert second["final_eval"] == first["final_eval"]


def test_trainer_reference_cache_false_reports_off(tmp_path):
    summary = run_training(tmp_path, "trainer.max_steps=1", "trainer.layout.reference_cache=false")
    assert summary["data"]["reference_logps_cache"] == "off"
