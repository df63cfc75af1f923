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


@pytest.mark.parametrize("name", ["adamw", "rmsprop"])
def test_optimizer_state_allocated_before_the_first_step_changes_no_step(name):
    """`allocate_state` (the loop runs it before step 1): the parameters stay bit for bit, the state exists
    and is all zeros, and the next two real steps equal those of an optimizer that allocated lazily, with
    weight decay on (which must not leak into RMSprop's squared averages)."""
    from types import SimpleNamespace

    from prefopt.optimizers import OPTIMIZERS
    from prefopt.training.setup import allocate_state

    def fresh():
        torch.manual_seed(0)
        module = torch.nn.Linear(6, 4)
        groups = [{"params": list(module.parameters()), "lr": 0.1, "weight_decay": 0.01}]
        cfg = SimpleNamespace(fused=None, adam_betas=[0.9, 0.999])
        return module, OPTIMIZERS[name](groups, cfg, torch.device("cpu"))

    def two_steps(module, optimizer):
        for seed in (1, 2):
            torch.manual_seed(seed)
            module(torch.randn(3, 6)).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return [p.detach().clone() for p in module.parameters()]

    lazy_module, lazy = fresh()
    eager_module, eager = fresh()
    before = [p.detach().clone() for p in eager_module.parameters()]
    from torch.optim.optimizer import register_optimizer_step_post_hook

    counted = []
    hook = register_optimizer_step_post_hook(lambda *args: counted.append(args))
    try:
        allocate_state(eager, list(eager_module.parameters()))
    finally:
        hook.remove()
    assert counted == []  # not a training step for anything that counts steps
    assert all(torch.equal(p, q) for p, q in zip(eager_module.parameters(), before))
    assert len(eager.state) == 2 and all(p.grad is None for p in eager_module.parameters())
    assert all(not v.any() for state in eager.state.values() for v in state.values() if torch.is_tensor(v))
    assert [g["lr"] for g in eager.param_groups] == [0.1] and eager.param_groups[0]["weight_decay"] == 0.01
    for ours, theirs in zip(two_steps(eager_module, eager), two_steps(lazy_module, lazy)):
        assert torch.equal(ours, theirs)
    for key, state in eager.state.items():
        lazy_state = lazy.state[next(q for q in lazy_module.parameters() if q.shape == key.shape)]
        assert all(torch.equal(v, lazy_state[k]) for k, v in state.items() if torch.is_tensor(v))
