"""Speed options change how a step is computed, never what it computes: gradient checkpointing, the
fused AdamW kernel, torch.compile of the decoder, and the bucketed packed-row widths a compiled decoder
reads."""

from __future__ import annotations

import pytest
import torch
from conftest import read_jsonl, run_training, torch_threads
from test_logps import LOGPS_CLOSE, ROWS, table_of, tiny_model

from prefopt.data.layout import Packing
from prefopt.data.packing import pack


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def losses(run_dir) -> list[float]:
    return [r["train/loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]


def test_bucketed_packed_rows_are_a_multiple_wide_and_give_the_same_logps():
    model, tokenizer = tiny_model()
    table, ids = table_of(tokenizer, ROWS)
    rows = table.pad(ids)
    bucketed = pack(rows, None, width_multiple=64)
    assert bucketed.input_ids.shape[1] == 64 and pack(rows).input_ids.shape[1] < 64
    with torch.no_grad():
        plain = Packing(True).logps(model, rows, 2048)
        wide = Packing(True, None, 64).logps(model, rows, 2048)
    torch.testing.assert_close(wide, plain, **LOGPS_CLOSE)  # a 64-wide row: other shapes, other rounding


def test_gradient_checkpointing_takes_the_same_steps(tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    name = next(
        n
        for n in ("activation_checkpointing_enable", "gradient_checkpointing_enable")
        if hasattr(PreTrainedModel, n)
    )
    enabled, original = [], getattr(PreTrainedModel, name)
    monkeypatch.setattr(
        PreTrainedModel, name, lambda self, **kwargs: enabled.append(kwargs) or original(self, **kwargs)
    )
    run_training(tmp_path / "plain", "trainer.max_steps=4", "trainer.log_every_steps=1")
    assert not enabled
    run_training(
        tmp_path / "checkpointed",
        "trainer.max_steps=4",
        "trainer.log_every_steps=1",
        "trainer.layout.gradient_checkpointing=true",
    )
    assert len(enabled) == 1 and {"use_reentrant": False} in enabled[0].values()
    # the recomputation reruns the same kernels; at worst each step's 32-pair mean loss (~0.7) rounds apart
    # (32 * 0.7 * 2^-24 = 1.3e-6), well under the ~1e-3 a lost layer gradient makes by step 4
    assert losses(tmp_path / "checkpointed") == pytest.approx(losses(tmp_path / "plain"), abs=1e-5)


def test_the_fused_adamw_kernel_takes_the_same_steps_to_rounding(tmp_path, monkeypatch):
    made = []
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: made.append(k.get("fused")) or adamw(*a, **k))
    steps = ["trainer.max_steps=6", "trainer.log_every_steps=1"]
    run_training(tmp_path / "plain", *steps, "trainer.optimizer.fused=false")
    run_training(tmp_path / "fused", *steps)  # the default, CPU included
    assert made == [None, True]
    # another kernel: each update rounds apart (~lr * 2^-24 a weight), so 6 losses agree far below 1e-5,
    # while a wrong update rule (no bias correction, a missed step) moves them by ~1e-3
    assert losses(tmp_path / "fused") == pytest.approx(losses(tmp_path / "plain"), abs=1e-5)


def test_compile_compiles_the_decoder_in_place_with_dynamic_shapes(tmp_path, monkeypatch):
    """The wiring only (compiling on 2 CPU cores takes minutes): the decoder module is compiled in place,
    so its parameters, state dict and checkpoints keep their names."""
    compiled = []
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kwargs: compiled.append((type(self).__name__, kwargs))
    )
    run_training(tmp_path, "trainer.max_steps=2", "trainer.layout.compile=true")
    assert compiled == [("LlamaModel", {"dynamic": True})]
