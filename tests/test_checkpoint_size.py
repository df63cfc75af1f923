"""What a training-state checkpoint holds and what writing it costs: only trainable tensors (under LoRA the
adapter, never a frozen tied embedding), handed to DCP without a copy, in files of bounded size (DCP's
safetensors writer builds a whole file in memory, twice)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import compose_config, read_jsonl, save_tiny_llama
from torch import nn

import prefopt.training.checkpoint as checkpoint
from prefopt.config import load_run_config
from prefopt.data.sampler import PairSampler
from prefopt.training.checkpoint import checkpoint_dir, load_checkpoint, read_state, save_checkpoint


def saved_shapes(path: Path) -> dict[str, list[int]]:
    """Every tensor in a checkpoint's safetensors files, as written."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted((path / "state").glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            shapes |= {key: handle.get_slice(key).get_shape() for key in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
    return shapes


@pytest.mark.parametrize("objective", [[], ["objective=hpo"]], ids=["dpo", "hpo-with-value-head"])
def test_a_lora_checkpoint_holds_the_adapter_alone_not_the_frozen_tied_embedding(tmp_path, objective):
    """A 2-layer Llama with tied embeddings, LoRA r=4 on every linear layer but the lm_head: the checkpoint's
    weights are the 2 layers x 7 linears x (lora_A, lora_B) = 28 adapter tensors, 4 x (in + out) parameters
    each (under HPO the value head's too), and nothing frozen; resuming it still takes the same steps."""
    from test_acceptance_data import fixture
    from test_tokenization import bos_tokenizer

    from prefopt.training.train import train

    model = save_tiny_llama(tmp_path / "model", bos_tokenizer(), tie_word_embeddings=True)
    common = [*fixture("preference", tmp_path / "data"), "dataset=preference", "model=pretrained"]
    common += [f"model.name_or_path={model}", "model.lora.r=4", "logger=none", "trainer.batch_size=8"]
    common += ["trainer.optimizer.lr_schedule=constant_with_warmup", "trainer.log_every_steps=1", *objective]
    common += ["trainer.checkpoint.every_steps=2", "eval.eval_every_steps=100", "eval.at_start=false"]

    def run(run_dir: Path, *overrides: str) -> dict:
        run_dir.mkdir(exist_ok=True)
        return train(load_run_config(compose_config(*common, *overrides)), run_dir)

    run(tmp_path / "whole", "trainer.max_steps=4")
    path = checkpoint_dir(tmp_path / "whole", 4)
    shapes = saved_shapes(path)
    weights = {k: v for k, v in shapes.items() if k.startswith("model.")}
    assert set(weights) == {k for k in read_state(path)["tensor_keys"] if k.startswith("model.")}
    adapter = {k: v for k, v in weights.items() if "lora_A" in k or "lora_B" in k}
    assert len(adapter) == 2 * 7 * 2
    linears = {"q": (32, 32), "k": (32, 32), "v": (32, 32), "o": (32, 32)}
    linears |= {"gate": (32, 64), "up": (32, 64), "down": (64, 32)}  # (in, out)
    assert sum(math.prod(s) for s in adapter.values()) == 2 * sum(4 * (i + o) for i, o in linears.values())
    others = sorted(set(weights) - set(adapter))
    if objective:
        assert others and all(k.startswith("model.value_head.") for k in others)
    else:
        assert others == []
    assert not [k for k in weights if "embed_tokens" in k or "lm_head" in k or "base_layer" in k]

    run(tmp_path / "parts", "trainer.max_steps=2")
    (tmp_path / "parts" / "summary.json").unlink()
    assert run(tmp_path / "parts", "trainer.max_steps=4", "trainer.checkpoint.resume=auto")["resumed_at"] == [
        2
    ]

    def losses(run_dir: Path) -> list:
        return [
            (r["step"], r["train/loss"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r
        ]

    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")


class TiedModel(nn.Module):
    """A frozen embedding tied to the output layer, and a trainable layer between them."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.hidden = nn.Linear(16, 16)
        self.out = nn.Linear(16, 50, bias=False)
        self.out.weight = self.embed.weight
        self.embed.weight.requires_grad_(False)

    def forward(self, ids):
        return self.out(torch.tanh(self.hidden(self.embed(ids))))


def trained(seed: int, steps: int = 2):
    torch.manual_seed(seed)
    modules = nn.ModuleDict({"policy": TiedModel(), "head": nn.Linear(16, 64)})
    params = [p for p in modules.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for _ in range(steps):
        ids = torch.randint(0, 50, (4, 3))
        loss = modules["policy"](ids).square().mean() + modules["head"].weight.square().sum()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return modules, optimizer, scheduler


def test_a_save_writes_the_live_tensors_in_bounded_files_and_loads_back_exactly(tmp_path, monkeypatch):
    """A frozen tied weight is left out under both its names; DCP gets the parameters and Adam's moments
    themselves (the same memory: no copy), spread over files of at most FILE_BYTES (4 KiB here) unless one
    tensor is larger; a fresh model and optimizer load back every trained value."""
    monkeypatch.setattr(checkpoint, "FILE_BYTES", 4096)
    handed = {}
    dcp = checkpoint._dcp

    def spy(save: bool, tensors: dict, path: Path) -> None:
        if save:
            handed.update(tensors)
        dcp(save, tensors, path)

    monkeypatch.setattr(checkpoint, "_dcp", spy)
    modules, optimizer, scheduler = trained(seed=0)
    path = save_checkpoint(tmp_path, 2, modules, optimizer, scheduler, PairSampler(8, 2, 0), {}, 2)

    weights = sorted(k for k in handed if k.startswith("model."))
    assert weights == [
        f"model.{k}" for k in ("head.bias", "head.weight", "policy.hidden.bias", "policy.hidden.weight")
    ]
    live = {f"model.{n}": p for n, p in modules.named_parameters() if p.requires_grad}
    names = {id(p): n for n, p in modules.named_parameters()}
    for param, moments in optimizer.state.items():
        live |= {f"optimizer.state.{names[id(param)]}.{m}": moments[m] for m in ("exp_avg", "exp_avg_sq")}
    assert set(live) <= set(handed)
    assert all(handed[k].data_ptr() == v.data_ptr() for k, v in live.items())  # the same memory

    files = sorted((path / "state").glob("*.safetensors"))
    assert len(files) > 1
    largest = max(t.numel() * t.element_size() for t in handed.values())
    assert all(f.stat().st_size <= max(checkpoint.FILE_BYTES, largest) + 4096 for f in files)  # + header

    fresh, fresh_optimizer, fresh_scheduler = trained(seed=1, steps=1)
    load_checkpoint(path, fresh, fresh_optimizer, fresh_scheduler, PairSampler(8, 2, 0))
    for (name, a), b in zip(modules.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b) == ("embed" not in name and "out" not in name)  # frozen: not restored
    for a, b in zip(optimizer.state.values(), fresh_optimizer.state.values()):
        assert all(torch.equal(a[m], b[m]) for m in ("exp_avg", "exp_avg_sq", "step"))


def test_an_older_checkpoint_with_the_frozen_tied_weight_still_loads(tmp_path, monkeypatch):
    """Checkpoints written before frozen tied weights were left out hold `lm_head`'s copy; it is not read."""
    modules, optimizer, scheduler = trained(seed=0)
    everything = checkpoint._trainable_state

    def unfiltered(modules, optimizer):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(
            modules, optimizer, options=checkpoint._state_dict_options()
        )
        return model_state, optimizer_state, set()

    monkeypatch.setattr(checkpoint, "_trainable_state", unfiltered)
    path = save_checkpoint(tmp_path, 2, modules, optimizer, scheduler, PairSampler(8, 2, 0), {}, 2)
    assert "model.policy.out.weight" in read_state(path)["tensor_keys"]
    monkeypatch.setattr(checkpoint, "_trainable_state", everything)
    fresh, fresh_optimizer, fresh_scheduler = trained(seed=1, steps=1)
    load_checkpoint(path, fresh, fresh_optimizer, fresh_scheduler, PairSampler(8, 2, 0))
    assert torch.equal(fresh["policy"].hidden.weight, modules["policy"].hidden.weight)
    assert not torch.equal(fresh["policy"].out.weight, modules["policy"].out.weight)  # the model's own
