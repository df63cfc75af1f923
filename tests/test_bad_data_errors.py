"""Bad data is one line naming the file and the line: a malformed JSON line (or a JSON array's error
position), a byte that is not UTF-8, an empty file or split; rows dropped as bad are counted and named
before, and in, the split-size error they cause. A non-finite aux reward names the reward and the rows."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from prefopt.config import ConfigError
from prefopt.data import DATASETS
from prefopt.errors import DataError


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def rows(n: int) -> list[dict]:
    return [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(n)]


def lines(n: int) -> list[str]:
    return [json.dumps(row) for row in rows(n)]


def load(path: Path | str, **fields):
    spec = DATASETS["preference"]
    return spec.load(spec.config(path=str(path), **fields), 0)


def data_error(path: Path | str, **fields) -> str:
    with pytest.raises(DataError) as error:
        load(path, **fields)
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, ConfigError)  # the CLI: one line, exit 2
    return message


def test_a_malformed_jsonl_line_is_named_by_file_and_line(tmp_path: Path):
    text = lines(80)
    text[40] = '{"prompt": "p40", "chosen": oops}'
    file = tmp_path / "pairs.jsonl"
    file.write_text("\n".join(text) + "\n")
    assert f"{file} line 41: not valid JSON" in data_error(file)


def test_a_jsonl_line_that_is_not_an_object_is_named(tmp_path: Path):
    file = tmp_path / "pairs.jsonl"
    file.write_text("\n".join([*lines(3), "[1, 2]", *lines(3)]) + "\n")
    assert f"{file} line 4: a JSON list, not an object" in data_error(file)


def test_a_malformed_json_array_is_named_by_the_line_of_the_error(tmp_path: Path):
    file = tmp_path / "pairs.json"
    file.write_text("[\n" + ",\n".join(lines(10)) + ",\n{bad}\n]\n")  # "[" is line 1, the rows 2..11
    assert f"{file} line 12: not valid JSON" in data_error(file)


def test_a_byte_that_is_not_utf8_is_named_by_its_line(tmp_path: Path):
    raw = [line.encode() for line in lines(40)]
    raw[30] = b'{"prompt": "caf\xe9", "chosen": "c", "rejected": "r"}'
    file = tmp_path / "pairs.jsonl"
    file.write_bytes(b"\n".join(raw) + b"\n")
    message = data_error(file)
    assert f"{file} line 31: not UTF-8 text (byte 0xe9" in message


@pytest.mark.parametrize(("name", "text"), [("e.jsonl", ""), ("e.jsonl", "\n\n"), ("e.json", "[]\n")])
def test_an_empty_file_is_named(tmp_path: Path, name: str, text: str):
    file = tmp_path / name
    file.write_text(text)
    assert f"{file}: empty, no rows (split 'train')" in data_error(file)


def test_a_csv_with_only_its_header_is_empty(tmp_path: Path):
    file = tmp_path / "pairs.csv"
    file.write_text("prompt,chosen,rejected\n")
    assert f"{file}: empty, only a header" in data_error(file)


def test_an_empty_test_file_beside_the_train_file_names_its_split(tmp_path: Path):
    (tmp_path / "train.jsonl").write_text("\n".join(lines(10)) + "\n")
    (tmp_path / "test.jsonl").write_text("")
    assert f"{tmp_path / 'test.jsonl'}: empty, no rows (split 'test')" in data_error(tmp_path)


def test_a_split_with_every_row_bad_names_its_file_and_why(tmp_path: Path):
    file = tmp_path / "pairs.jsonl"
    file.write_text("\n".join(json.dumps({**r, "prompt": 7}) for r in rows(4)) + "\n")
    message = data_error(file)
    assert f"split 'train': no usable pairs in 4 rows of {file}" in message
    assert "prompt: not text or chat messages (int) (4)" in message
    assert f"{file} lines 1, 2, 3, 4" in message


def test_dropped_rows_are_reported_before_and_in_the_hold_out_error(tmp_path: Path, caplog):
    """80 rows, 40 of them (lines 1, 3, 5, ...) with a number for a prompt: 40 pairs are left, whose 5%
    hold-out (2) is under min_eval_pairs; the warning comes first, and the error repeats the count."""
    file = tmp_path / "pairs.jsonl"
    data = [{**r, "prompt": i} if i % 2 == 0 else r for i, r in enumerate(rows(80))]
    file.write_text("\n".join(json.dumps(r) for r in data) + "\n")
    with caplog.at_level(logging.WARNING, logger="prefopt.data.rows"):
        message = data_error(file)
    assert "of 40 train pairs (split 'train': 40 of 80 rows dropped: prompt: not text" in message
    assert f"e.g. {file} lines 1, 3, 5, 7, 9" in message
    assert "fewer than dataset.min_eval_pairs=32" in message
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("skipped 40 bad rows" in w and f"{file} line 1" in w for w in warned), warned


def test_the_cli_prints_a_data_error_as_one_line_and_exits_2(tmp_path: Path, capsys):
    from prefopt import cli

    file = tmp_path / "pairs.jsonl"
    file.write_text("\n".join([*lines(5), "{oops", *lines(5)]) + "\n")
    args = ["train", "dataset=preference", f"dataset.path={file}", "logger=none"]
    with pytest.raises(SystemExit) as stop:
        cli.main([*args, f"hydra.run.dir={tmp_path / 'run'}"])
    assert stop.value.code == 2
    # one line (the product's promise for data errors) naming the file and the bad line, not a wording
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{file} line 6" in err[0], err


# ---- a non-finite aux reward: the reward's key, the count and example rows, before training ------------


def test_a_nan_reward_names_the_reward_the_count_and_the_rows():
    from prefopt.rewards import NamedReward, score_responses

    def half_nan(prompts, responses):
        return [math.nan if y.startswith("bad") else 1.0 for y in responses]

    reward = NamedReward("aux_reward.flaky", half_nan)
    responses = ["ok a", "bad b", "ok c", "bad d", "bad b"]
    with pytest.raises(ValueError) as error:
        score_responses(reward, ["p"] * 5, responses, progress=False)
    message = str(error.value)
    assert message.startswith("aux_reward.flaky: 3 of 5 scores are not finite (nan)")
    assert "rows 1, 3, 4" in message and "'bad b'" in message


def test_a_custom_reward_that_returns_inf_or_none_is_named(monkeypatch):
    import sys
    import types

    from prefopt.rewards import build_aux_reward, score_responses

    module = types.ModuleType("user_rewards_test_bad")
    module.inf = lambda prompts, responses: [math.inf] * len(responses)
    module.none = lambda prompts, responses: [None] * len(responses)
    module.inf.__module__ = module.none.__module__ = module.__name__
    monkeypatch.setitem(sys.modules, module.__name__, module)
    build = lambda f: build_aux_reward(  # noqa: E731
        {"custom": {"function": f"{module.__name__}:{f}", "allowed_prefixes": [module.__name__]}}
    ).components["custom"]
    with pytest.raises(ValueError, match=r"^aux_reward\.custom: 2 of 2 scores are not finite \(inf\)"):
        score_responses(build("inf"), ["p", "q"], ["x", "y"], progress=False)
    with pytest.raises(ValueError, match=r"^aux_reward\.custom\.function=user_rewards_test_bad:none: .*None"):
        score_responses(build("none"), ["p"], ["x"], progress=False)


# ---- weights load from .safetensors only, unless the config opts out -----------------------------------


def save_pickled(directory: Path, model) -> Path:
    """A checkpoint of pickled weights only (pytorch_model.bin), as older hub checkpoints are; transformers
    5 writes .safetensors whatever save_pretrained is told, so the pickle is written with torch.save."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return directory


def test_a_pickled_model_is_refused_naming_the_dir_and_the_opt_out_and_loads_with_it(tmp_path: Path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefopt.models.pretrained import load_causal_lm, load_reference

    config = LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(config)
    directory = save_pickled(tmp_path / "old", model)
    with pytest.raises(ConfigError) as error:
        load_causal_lm(str(directory), "float32", "model.name_or_path")
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"model.name_or_path={directory}: ")
    assert "pytorch_model.bin" in message and "model.use_safetensors=false" in message
    with pytest.raises(ConfigError, match=r"^model\.reference_name_or_path=.*model\.use_safetensors=false"):
        load_reference(str(directory))
    loaded = load_causal_lm(str(directory), "float32", "model.name_or_path", use_safetensors=False)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    model.save_pretrained(tmp_path / "new")  # .safetensors: loads by default
    assert load_causal_lm(str(tmp_path / "new"), "float32", "model.name_or_path") is not None


def test_a_pickled_classifier_is_refused_naming_its_own_opt_out(tmp_path: Path):
    from transformers import BertConfig, BertForSequenceClassification

    from prefopt.models.tiny import build_word_tokenizer
    from prefopt.rewards.classifier import ClassifierConfig, load_classifier

    tokenizer = build_word_tokenizer(["good", "bad"])
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        pad_token_id=tokenizer.pad_token_id,
    )
    directory = save_pickled(tmp_path / "bert", BertForSequenceClassification(config))
    tokenizer.save_pretrained(directory)
    with pytest.raises(
        ConfigError, match=r"^aux_reward\.toxicity\.model=.*aux_reward\.toxicity\.use_safetensors"
    ):
        load_classifier(ClassifierConfig(model=str(directory), device="cpu"), "toxicity")
    opted_out = ClassifierConfig(model=str(directory), device="cpu", use_safetensors=False)
    assert load_classifier(opted_out, "toxicity").labels is not None
