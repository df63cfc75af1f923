"""Models: every conf/model option composes and validates; LoRA through peft (the reference is the base
with the adapters disabled, adapters train and reach the log-probs on every architecture we configure,
adapter and merged checkpoints reload to the same numbers); a local pretrained tiny Llama trains end to
end, with and without LoRA; a missing local path and trust_remote_code speak up. Offline: every model is
built here (hidden 32, 2 layers) and saved with save_pretrained."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import FAST, compose_config, run_training, save_tiny_llama, torch_threads
from test_logps import LOGPS_CLOSE
from transformers import AutoModelForCausalLM

from prefopt.config import ConfigError, load_run_config
from prefopt.data.batching import PaddedSequences
from prefopt.models import (
    AdapterDisabledReference,
    LoraConfig,
    PretrainedModelConfig,
    TinyModelConfig,
    adapter_reference,
    build_tiny,
    build_word_tokenizer,
    is_lora,
    load_pretrained,
    save_checkpoint,
)
from prefopt.models.logps import hidden_states, model_logps
from prefopt.models.pretrained import check_local_path

CONF_MODELS = Path(__file__).resolve().parent.parent / "conf" / "model"
WORDS = ["tell", "me", "about", "a", "b", "c", "the", "cat", "sat", "dog", "ran", "on", "big", "red", "sun"]
# (prompt, response) word ids are looked up below; lengths differ so every batch is padded.
ROWS = [("tell me about a", "the cat sat"), ("tell me", "dog"), ("tell me about a b c", "big red sun on the")]
HUB = {
    "llama": "meta-llama/Llama-3.2-1B",
    "qwen": "Qwen/Qwen2.5-0.5B-Instruct",
    "pythia": "EleutherAI/pythia-1.4b",
    "gpt2": "gpt2-large",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def tiny(r: int = 0, seed: int = 0, **lora):
    torch.manual_seed(seed)
    cfg = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    cfg.lora = LoraConfig(r=r, **lora)
    return build_tiny(cfg, WORDS)


def padded(tokenizer, rows=ROWS) -> PaddedSequences:
    """Right-padded prompt + response + EOS rows; the response (and EOS) tokens are the scored ones."""
    sequences = []
    for prompt, response in rows:
        x = tokenizer.convert_tokens_to_ids(prompt.split())
        y = tokenizer.convert_tokens_to_ids(response.split()) + [tokenizer.eos_token_id]
        sequences.append((x, y))
    width = max(len(x) + len(y) for x, y in sequences)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    attention, response = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width) > 0
    for i, (x, y) in enumerate(sequences):
        ids[i, : len(x) + len(y)] = torch.tensor(x + y)
        attention[i, : len(x) + len(y)] = 1
        response[i, len(x) : len(x) + len(y)] = True
    return PaddedSequences(ids, attention, response, torch.tensor([len(x) for x, _ in sequences]))


def full_logits_logps(model, rows: PaddedSequences) -> torch.Tensor:
    """The naive way, through the model's own forward and its full (R, T, V) logits."""
    logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits.float()
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, rows.input_ids[:, 1:, None]).squeeze(-1)
    return (token_logps * rows.response_mask[:, 1:]).sum(-1)


@torch.no_grad()
def move_adapters(model, scale: float = 0.3, seed: int = 1) -> None:
    """What training does to a LoRA policy: nonzero B (and a moved A)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.add_(scale * torch.randn(p.shape, generator=gen))


def lora_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if "lora_" in n]


@pytest.fixture(scope="module")
def synthetic_vocabulary() -> list[str]:
    """The words of the FAST synthetic task, so a local model's tokenizer covers them."""
    from prefopt.data import DATASETS

    rc = load_run_config(compose_config(*FAST, "model=pretrained", "model.name_or_path=x"))
    return DATASETS[rc.dataset_name].load(rc.dataset, rc.seed).task.vocabulary()


@pytest.fixture(scope="module")
def local_llama(tmp_path_factory, synthetic_vocabulary) -> Path:
    """A tiny Llama and its word tokenizer written with save_pretrained: a local `model=pretrained` path."""
    tokenizer = build_word_tokenizer(sorted(set(synthetic_vocabulary) | set(WORDS)))
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


# ---- configs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF_MODELS.glob("*.yaml")))
def test_every_model_config_composes_validates_and_starts_without_adapters(name: str):
    extra = ["model.name_or_path=x"] if name == "pretrained" else []
    rc = load_run_config(compose_config(f"model={name}", *extra))
    assert isinstance(rc.model, TinyModelConfig if name == "tiny" else PretrainedModelConfig)
    assert rc.model.lora == LoraConfig()  # LoRA off unless asked for
    if name in HUB:
        assert rc.model_name == "pretrained" and rc.model.name_or_path == HUB[name]
        assert rc.model.trust_remote_code is False


@pytest.mark.parametrize("name", ["tiny", "llama"])
def test_lora_options_reach_the_typed_config(name: str):
    overrides = ["model.lora.r=8", "model.lora.alpha=32", "model.lora.dropout=0.1"]
    overrides += ["model.lora.target_modules=[q_proj,v_proj]", "model.lora.save_merged=true"]
    rc = load_run_config(compose_config(f"model={name}", *overrides))
    assert rc.model.lora == LoraConfig(8, 32.0, 0.1, ["q_proj", "v_proj"], True)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.lora.r=-1", "model.lora.r"),
        ("model.lora.r=1.5", "model.lora.r"),
        ("model.lora.alpha=0", "model.lora.alpha"),
        ("model.lora.dropout=1.0", "model.lora.dropout"),
        ("model.lora.dropout=-0.1", "model.lora.dropout"),
        ("model.lora.target_modules=[]", "model.lora.target_modules"),
        ("model.dtype=float64", "model.dtype"),
        ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing"),
    ],
)
def test_bad_model_values_fail_naming_their_key(override: str, key: str):
    with pytest.raises(ConfigError, match=rf"^{key}\b"):
        load_run_config(compose_config("model=llama", override))


# ---- LoRA: adapters, reference, log-probs -------------------------------------------------------------


def test_the_reference_is_the_base_with_adapters_disabled_and_the_policy_moves_with_its_adapters():
    base, tokenizer = tiny()
    frozen_base = copy.deepcopy(base)
    policy, _ = tiny(r=4)  # same seed: the same base weights under the adapters
    rows = padded(tokenizer)
    reference = adapter_reference(policy)
    # exact up to 1e-6 (under an ulp here): B = 0 adds exact zeros to the base's own matmuls, and disabled
    # adapters run the base layers alone; merging or reloading (below) rounds, so those get LOGPS_CLOSE
    with torch.no_grad():
        expected = model_logps(frozen_base, rows)
        torch.testing.assert_close(model_logps(policy, rows), expected, atol=1e-6, rtol=0)  # B = 0
    move_adapters(policy)
    with torch.no_grad():
        moved = model_logps(policy, rows)
        torch.testing.assert_close(model_logps(reference, rows), expected, atol=1e-6, rtol=0)
        with policy.disable_adapter():
            torch.testing.assert_close(model_logps(policy, rows), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(moved, full_logits_logps(policy, rows), **LOGPS_CLOSE)
    assert (moved - expected).abs().min() > 1e-3  # the adapters are on in the policy's log-prob path


def test_the_reference_holds_no_weights_of_its_own_and_restores_the_policys_mode():
    policy, tokenizer = tiny(r=4)
    reference = adapter_reference(policy)
    assert isinstance(reference, AdapterDisabledReference) and reference.policy is policy
    policy.train()
    move_adapters(policy)
    rows = padded(tokenizer)
    hidden = hidden_states(reference, rows)
    assert not hidden.requires_grad
    assert all(m.training for m in policy.modules())  # the policy trains on, dropout and all
    prompt = rows.input_ids[:1, :4]
    generated = reference.generate(prompt, do_sample=False, max_new_tokens=4, pad_token_id=0)
    with policy.disable_adapter(), torch.no_grad():
        policy.eval()
        expected = policy.generate(prompt, do_sample=False, max_new_tokens=4, pad_token_id=0)
    assert generated.tolist() == expected.tolist()  # exact: the same base layers, the same greedy decode


def test_only_adapters_train_once_the_reference_is_taken_and_their_gradients_arrive():
    policy, tokenizer = tiny(r=4)
    adapter_reference(policy)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable == lora_names(policy) and len(trainable) > 0
    model_logps(policy, padded(tokenizer), chunk_tokens=3).sum().backward()
    grads = {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # B = 0: only B moves first


def test_weights_trained_before_the_reference_is_taken_are_folded_into_it():
    """The tiny model's reference fit trains base and adapters; the reference must be that fitted policy."""
    policy, tokenizer = tiny(r=4)
    rows = padded(tokenizer)
    move_adapters(policy)
    with torch.no_grad():
        fitted = model_logps(policy, rows)
        reference = adapter_reference(policy)
        # folding W + s B A into the base rounds the weights: close, not equal
        torch.testing.assert_close(model_logps(reference, rows), fitted, **LOGPS_CLOSE)
        torch.testing.assert_close(model_logps(policy, rows), fitted, **LOGPS_CLOSE)
    assert all(not p.any() for n, p in policy.named_parameters() if "lora_B" in n)


def _tiny_causal_lms(vocab_size: int) -> dict:
    import transformers as tf

    shared = {"vocab_size": vocab_size, "bos_token_id": None, "eos_token_id": 1, "pad_token_id": 0}
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    return {
        "llama": tf.LlamaForCausalLM(tf.LlamaConfig(**shared, **layers, num_key_value_heads=2)),
        "qwen2": tf.Qwen2ForCausalLM(tf.Qwen2Config(**shared, **layers, num_key_value_heads=2)),
        "gpt2": tf.GPT2LMHeadModel(tf.GPT2Config(**shared, n_embd=32, n_layer=2, n_head=2)),
        "gpt_neox": tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**shared, **layers)),
    }


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_logps_go_through_the_adapters_on_every_configured_architecture(architecture: str):
    """Llama (llama), Qwen2 (qwen), GPT-2 (gpt2: Conv1D layers) and GPT-NeoX (pythia), with LoRA on every
    linear layer: the chunked log-probs equal the full-logit forward's, adapters on and off."""
    from prefopt.models.lora import apply_lora

    tokenizer = build_word_tokenizer(WORDS)
    torch.manual_seed(0)
    model = _tiny_causal_lms(len(tokenizer))[architecture].eval()
    base = copy.deepcopy(model)
    rows = padded(tokenizer)
    policy = apply_lora(model, LoraConfig(r=4))
    reference = adapter_reference(policy)
    move_adapters(policy)
    with torch.no_grad():
        moved = model_logps(policy, rows)
        torch.testing.assert_close(moved, full_logits_logps(policy, rows), **LOGPS_CLOSE)
        torch.testing.assert_close(model_logps(reference, rows), full_logits_logps(base, rows), **LOGPS_CLOSE)
        assert (moved - model_logps(reference, rows)).abs().min() > 1e-3


# ---- pretrained: loading, checkpoints ------------------------------------------------------------------


def test_a_local_model_loads_with_lora_adapters_on_a_frozen_base(local_llama):
    policy, tokenizer = load_pretrained(
        PretrainedModelConfig(name_or_path=str(local_llama), lora=LoraConfig(r=8))
    )
    assert is_lora(policy)
    assert [n for n, p in policy.named_parameters() if p.requires_grad] == lora_names(policy)
    base = AutoModelForCausalLM.from_pretrained(local_llama)
    rows = padded(tokenizer)
    with torch.no_grad():
        # B = 0: the base's matmuls plus exact zeros, so equal (1e-6 is under an ulp here)
        torch.testing.assert_close(model_logps(policy, rows), model_logps(base, rows), atol=1e-6, rtol=0)
    adapter = policy.peft_config["default"]
    assert adapter.base_model_name_or_path == str(local_llama.resolve()) and adapter.r == 8


def test_adapter_and_merged_checkpoints_reload_to_the_same_logps(local_llama, tmp_path):
    from peft import PeftModel

    cfg = PretrainedModelConfig(name_or_path=str(local_llama), lora=LoraConfig(r=8, alpha=8))
    policy, tokenizer = load_pretrained(cfg)
    move_adapters(policy)
    rows = padded(tokenizer)
    with torch.no_grad():
        expected = model_logps(policy, rows)
    save_checkpoint(policy, tokenizer, tmp_path / "checkpoint", merged=True)
    files = {p.name for p in (tmp_path / "checkpoint").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "merged"} <= files
    assert "model.safetensors" not in files  # the adapter only, not a second copy of the base
    reloaded = {
        "peft": PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(local_llama), tmp_path / "checkpoint"
        ),
        "model=pretrained": load_pretrained(PretrainedModelConfig(name_or_path=str(tmp_path / "checkpoint")))[
            0
        ],
        "merged": AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint" / "merged"),
    }
    for name, model in reloaded.items():
        with torch.no_grad():
            torch.testing.assert_close(model_logps(model, rows), expected, **LOGPS_CLOSE, msg=name)  # merged


@pytest.mark.parametrize("r", [0, 8])
def test_gradient_checkpointing_changes_no_value_and_no_gradient(local_llama, r: int):
    rows = None
    results = []
    for checkpointing in (False, True):
        cfg = PretrainedModelConfig(
            name_or_path=str(local_llama), gradient_checkpointing=checkpointing, lora=LoraConfig(r=r)
        )
        torch.manual_seed(0)  # the same adapter init both times
        model, tokenizer = load_pretrained(cfg)
        if r:
            move_adapters(model)  # B != 0, so A gets a gradient too
        model.train()
        rows = rows or padded(tokenizer)
        logps = model_logps(model, rows)
        logps.sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        assert all(g.abs().sum() > 0 for g in grads)
        results.append((logps.detach(), grads))
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == checkpointing
    # checkpointing reruns the same layers on the same inputs in backward: the same numbers, to under an ulp
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=0)
    for with_checkpoints, without in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(with_checkpoints, without, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("path", ["/nonexistent/model", "./no-such-dir", "~/no-such-dir-prefopt", "runs/a/b"])
def test_a_missing_local_model_is_one_line_naming_the_key(path: str):
    with pytest.raises(ValueError) as error:
        load_pretrained(PretrainedModelConfig(name_or_path=path))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("model.name_or_path=") and "does not exist" in message


def test_a_hub_id_is_not_mistaken_for_a_local_path(tmp_path):
    assert check_local_path("meta-llama/Llama-3.2-1B", "model.name_or_path") is None
    assert check_local_path("gpt2-large", "model.name_or_path") is None
    assert check_local_path(str(tmp_path), "model.name_or_path") == tmp_path
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        check_local_path(str(tmp_path / "file"), "model.reference_name_or_path")


def test_trust_remote_code_warns(local_llama, caplog):
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        load_pretrained(PretrainedModelConfig(name_or_path=str(local_llama), trust_remote_code=True))
    assert any(r.levelno == logging.WARNING and "trust_remote_code" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        load_pretrained(PretrainedModelConfig(name_or_path=str(local_llama)))
    assert not any("trust_remote_code" in r.getMessage() for r in caplog.records)


# ---- end to end ---------------------------------------------------------------------------------------


def test_a_local_pretrained_model_trains_end_to_end_with_and_without_lora(local_llama, tmp_path):
    """2 steps through the real loop. LoRA starts from B = 0, so its step-0 numbers are the full model's;
    its checkpoint is the adapter (and the merged model), and the adapter is the next run's model."""
    model = ["model=pretrained", f"model.name_or_path={local_llama}", "trainer.max_steps=2"]
    full = run_training(tmp_path / "full", *model, tiny_model=False)
    lora = run_training(
        tmp_path / "lora", *model, "model.lora.r=8", "model.lora.save_merged=true", tiny_model=False
    )
    assert full["status"] == lora["status"] == "completed"
    assert lora["reference_eval"] == pytest.approx(full["reference_eval"], rel=1e-5, abs=1e-7)
    assert lora["final_eval"]["eval/loss"] != lora["reference_eval"]["eval/loss"]  # the adapters moved
    checkpoint = tmp_path / "lora" / "checkpoint"
    assert (checkpoint / "adapter_model.safetensors").exists()
    assert not (checkpoint / "model.safetensors").exists()
    assert (checkpoint / "merged" / "model.safetensors").exists()
    assert json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        local_llama.resolve()
    )
    following = ["model=pretrained", f"model.name_or_path={checkpoint}", "trainer.max_steps=1"]
    second = run_training(tmp_path / "second", *following, "model.lora.r=4", tiny_model=False)
    assert second["reference_eval"]["eval/kl_star"] == pytest.approx(
        lora["final_eval"]["eval/kl_star"], rel=1e-4
    )


@pytest.mark.parametrize("estimator", ["token", "samples"])
def test_lora_runs_the_kl_estimators_that_call_the_live_reference(local_llama, tmp_path, estimator: str):
    """The token KL scores the reference's hidden states every step; the samples estimator draws from it."""
    summary = run_training(
        tmp_path,
        "model=pretrained",
        f"model.name_or_path={local_llama}",
        "model.lora.r=4",
        "objective=expo",
        f"kl={estimator}",
        *(["kl.samples_per_prompt=2"] if estimator == "samples" else []),
        "trainer.max_steps=2",
        tiny_model=False,
    )
    assert summary["status"] == "completed"
    assert summary["reference_eval"]["eval/kl_policy_reference"] == pytest.approx(0.0, abs=1e-6)


def test_the_tiny_model_with_lora_fits_its_reference_then_trains_adapters_only(tmp_path, monkeypatch):
    """The fit trains every weight and is folded into the base, so the reference is the fitted policy
    (KL 0 at step 0), from a fresh fit and from the cache alike."""
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    lora = ["model.lora.r=8", "trainer.max_steps=2", "model.lora.save_merged=true"]
    fresh = run_training(tmp_path / "fresh", *lora)
    cached = run_training(tmp_path / "cached", *lora)
    assert not fresh["reference_fit"]["cached"] and cached["reference_fit"]["cached"]
    assert fresh["reference_fit"]["kl"] <= 0.2
    assert fresh["reference_eval"]["eval/kl_policy_reference"] == pytest.approx(0.0, abs=1e-6)
    assert cached["final_eval"] == fresh["final_eval"]  # exact: the cache holds the fit's very weights
    assert (tmp_path / "fresh" / "checkpoint" / "adapter_config.json").exists()
    assert (tmp_path / "fresh" / "checkpoint" / "merged" / "model.safetensors").exists()
