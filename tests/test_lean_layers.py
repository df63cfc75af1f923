"""Lean MLPs and RMSNorms (`trainer.layout.lean_activations`): the same forward bit for bit, autograd's
gradients, fewer saved activations by exactly what they no longer keep, and the module's own forward
wherever the lean one would not compute the same thing."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import read_jsonl, run_training, torch_threads
from torch import nn

from prefopt.models.lean_layers import use_lean_layers

D, MLP_WIDTH, LAYERS, T = 32, 48, 2, 11  # hidden, MLP width, decoder layers, tokens


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def llama(dtype=torch.float64, mlp_bias=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=D, intermediate_size=MLP_WIDTH, num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2, mlp_bias=mlp_bias, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(config).to(dtype).train()


def gemma3(dtype=torch.float64):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=64, hidden_size=D, intermediate_size=MLP_WIDTH, num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, attn_implementation="sdpa",
    )  # fmt: skip
    model = Gemma3ForCausalLM(config).to(dtype).train()
    with torch.no_grad():  # Gemma's norms scale by 1 + w and start at w = 0: make w matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    return model


def forward_backward(model, ids):
    """Logits, every parameter's gradient, and the bytes autograd saved for backward (parameters aside)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids).logits
    weights = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).reshape(logits.shape)
    (logits * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logits.detach(), grads, sum(saved.values())


def assert_same_gradient(lean, plain, name):
    """Equal to fp32 rounding: transformers' RMSNorms compute in fp32 even for a float64 model, and the
    lean backward orders that arithmetic differently (a wrong formula would be off by far more)."""
    scale = plain.abs().max().item()
    assert (lean - plain).abs().max().item() <= 1e-6 * scale, name


BUILDS = [llama, gemma3]
# Llama: an MLP and 2 norms per layer and the final norm; Gemma 3: 4 norms per layer, its q/k norms too
SWITCHED = {llama: LAYERS * 3 + 1, gemma3: LAYERS * 5 + 1 + LAYERS * 2}
# the norms' widths summed: Gemma's q/k norms run over each head's dim (8) on 4 query and 2 key heads
NORM_FLOATS = {llama: (2 * LAYERS + 1) * D, gemma3: (4 * LAYERS + 1) * D + LAYERS * (4 + 2) * 8}
# Gemma's plain norms also keep 1 + w, a (width,) tensor each; the lean ones keep w itself, a parameter
ONE_PLUS_W = {llama: 0, gemma3: (4 * LAYERS + 1) * D + 2 * LAYERS * 8}
IDS = ["llama (silu, w * x / rms)", "gemma3 (gelu-tanh, (1 + w) * x / rms, q/k norms)"]


@pytest.mark.parametrize("build", BUILDS, ids=IDS)
def test_lean_layers_give_the_same_logits_and_gradients(build):
    plain = build()
    lean = copy.deepcopy(plain)
    assert use_lean_layers(lean) == SWITCHED[build]
    ids = torch.randint(0, 64, (1, T), generator=torch.Generator().manual_seed(1))
    plain_logits, plain_grads, _ = forward_backward(plain, ids)
    lean_logits, lean_grads, _ = forward_backward(lean, ids)
    assert torch.equal(lean_logits, plain_logits)  # the forward is the module's own, op for op
    for name, grad in plain_grads.items():
        assert_same_gradient(lean_grads[name], grad, name)


@pytest.mark.parametrize("build", BUILDS, ids=IDS)
def test_lean_layers_save_exactly_what_they_no_longer_keep(build):
    """fp32: per layer and token the MLP keeps its gate and up, not act(gate) and their product (2 MLP_WIDTH
    floats fewer), and each norm keeps x and 1/rms, not x/rms (its width fewer; Gemma's not 1 + w either)."""
    plain = build(torch.float32)
    lean = copy.deepcopy(plain)
    use_lean_layers(lean)
    ids = torch.randint(0, 64, (1, T), generator=torch.Generator().manual_seed(1))
    plain_saved, lean_saved = forward_backward(plain, ids)[2], forward_backward(lean, ids)[2]
    fewer_floats = T * (LAYERS * 2 * MLP_WIDTH + NORM_FLOATS[build]) + ONE_PLUS_W[build]
    assert plain_saved - lean_saved == 4 * fewer_floats


def test_one_layer_of_smollm2_shape_keeps_38_percent_fewer_activations():
    """A layer of SmolLM2-135M's shape (d 576, MLP 1536, 9/3 heads), fp32: 43.8 -> 27.2 KB per token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
        num_key_value_heads=3, attn_implementation="sdpa",
    )  # fmt: skip
    plain = LlamaForCausalLM(config).train()
    lean = copy.deepcopy(plain)
    use_lean_layers(lean)
    ids = torch.randint(0, 32, (1, 64))
    plain_saved = forward_backward(plain, ids)[2]
    lean_saved = forward_backward(lean, ids)[2]
    assert plain_saved - lean_saved == 64 * 4 * (2 * 1536 + 3 * 576)  # 2 norms and the final one
    assert lean_saved / plain_saved < 0.65


def test_mlp_biases_get_their_gradients():
    plain = llama(mlp_bias=True)
    lean = copy.deepcopy(plain)
    use_lean_layers(lean)
    ids = torch.arange(T)[None]
    _, plain_grads, _ = forward_backward(plain, ids)
    _, lean_grads, _ = forward_backward(lean, ids)
    assert any("mlp.up_proj.bias" in name for name in lean_grads)
    for name, grad in plain_grads.items():
        assert_same_gradient(lean_grads[name], grad, name)


def test_under_bf16_autocast_the_forward_is_autocasts_own():
    plain = llama(torch.float32)
    lean = copy.deepcopy(plain)
    use_lean_layers(lean)
    ids = torch.arange(T)[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_logits = plain(input_ids=ids).logits
        lean_logits = lean(input_ids=ids).logits
    assert torch.equal(lean_logits, plain_logits)
    (lean_logits.float().square().sum()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lean.parameters())


def test_a_variant_it_does_not_reproduce_keeps_its_own_forward():
    class ExactGeluMLP(nn.Module):  # exact GELU: neither silu nor the tanh approximation
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (
                nn.Linear(D, MLP_WIDTH),
                nn.Linear(D, MLP_WIDTH),
                nn.Linear(MLP_WIDTH, D),
            )
            self.act_fn = nn.GELU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    class ScaledMLP(ExactGeluMLP):  # a forward of its own around the same parts
        def __init__(self):
            super().__init__()
            self.act_fn = nn.SiLU()

        def forward(self, x):
            return 2 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.exact, self.scaled = ExactGeluMLP(), ScaledMLP()

    model = nn.Module()
    model.decoder = Decoder()
    model.get_decoder = lambda: model.decoder
    assert use_lean_layers(model) == 0
    for mlp in (model.decoder.exact, model.decoder.scaled):
        assert "forward" not in vars(mlp) and not hasattr(mlp, "_own_forward")


def test_lora_wrapped_projections_and_no_grad_passes_run_the_modules_own_forward(monkeypatch):
    from peft import LoraConfig, get_peft_model

    from prefopt.models import lean_layers

    calls = []
    for name in ("_GatedMLP", "_RMSNorm"):
        own = getattr(lean_layers, name).apply
        monkeypatch.setattr(
            getattr(lean_layers, name), "apply", lambda *a, f=own, n=name: calls.append(n) or f(*a)
        )
    lean = llama()
    use_lean_layers(lean)
    calls.clear()  # the probes'
    with torch.no_grad():
        lean(input_ids=torch.arange(T)[None])
    assert calls == []
    lora = get_peft_model(lean, LoraConfig(r=2, target_modules=["gate_proj", "up_proj", "down_proj"]))
    lora(input_ids=torch.arange(T)[None]).logits.sum().backward()
    assert "_GatedMLP" not in calls and "_RMSNorm" in calls  # LoRA layers are not plain nn.Linear
    assert all(p.grad is not None for p in lora.parameters() if p.requires_grad)


def test_switching_twice_counts_the_same_modules():
    model = llama()
    assert use_lean_layers(model) == use_lean_layers(model) == LAYERS * 3 + 1


def test_a_run_takes_the_same_steps_with_and_without_lean_layers(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="prefopt.training.setup")
    run_training(tmp_path / "lean", "trainer.max_steps=4", "trainer.log_every_steps=1")
    switched = [r.getMessage() for r in caplog.records if "keep fewer activations" in r.getMessage()]
    caplog.clear()
    run_training(
        tmp_path / "plain",
        "trainer.max_steps=4",
        "trainer.log_every_steps=1",
        "trainer.layout.lean_activations=false",
    )

    def losses(run):
        return [r["train/loss"] for r in read_jsonl(tmp_path / run / "metrics.jsonl") if "train/loss" in r]

    assert len(switched) == 1 and not [r for r in caplog.records if "keep fewer" in r.getMessage()]
    # same forward, gradients equal up to rounding: by step 4 the 32-pair mean losses agree to float noise
    assert losses("lean") == pytest.approx(losses("plain"), abs=1e-5)
    assert losses("lean")[0] == losses("plain")[0]  # step 1 reads the same weights: bit for bit
