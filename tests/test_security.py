"""Nothing runs that the user did not ask for: no eval/exec of config strings, every torch.load with
weights_only=True and nothing pickled, user callables only from allowlisted packages (and the default list
does not reach prefopt's training loop), remote model code off by default and loud when on."""

from __future__ import annotations

import ast
import logging
import sys
from pathlib import Path

import pytest
from conftest import ROOT, compose_config
from omegaconf import OmegaConf

from prefopt.config import ConfigError, load_run_config
from prefopt.models.pretrained import PretrainedModelConfig, load_options, load_pretrained
from prefopt.rewards.custom import CustomConfig, resolve_callable

PACKAGE = ROOT / "prefopt"
DEFAULT_ALLOWLIST = CustomConfig.__dataclass_fields__["allowed_prefixes"].default_factory()


# ---- a scan of prefopt/ ---------------------------------------------------------------------------------


def unsafe_calls(source: str) -> list[str]:
    """`eval(`, `exec(`, `compile(`, `__import__(`, `torch.save(`, `torch.load(` without weights_only=True,
    and any pickle import, in Python source; each as "line: what"."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in {"eval", "exec", "compile", "__import__"}:
                found.append(f"{node.lineno}: {func.id}(")
            is_torch = isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
            if is_torch and func.value.id == "torch" and func.attr == "save":
                found.append(f"{node.lineno}: torch.save( pickles")
            if is_torch and func.value.id == "torch" and func.attr == "load":
                safe = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                if not safe:
                    found.append(f"{node.lineno}: torch.load( without weights_only=True")
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        found += [
            f"{node.lineno}: import {n}"
            for n in names
            if n.split(".")[0] in {"pickle", "dill", "cloudpickle"}
        ]
    return sorted(found, key=lambda line: int(line.split(":")[0]))


def test_the_scan_flags_each_unsafe_form_and_passes_the_safe_ones():
    unsafe = ["eval(s)", "exec(s)", "torch.load(f)", "torch.load(f, weights_only=False)", "torch.save(x, f)"]
    unsafe += ["import pickle", "from cloudpickle import loads"]
    assert [int(line.split(":")[0]) for line in unsafe_calls("\n".join(unsafe))] == list(range(1, 8))
    safe = ["model.eval()", "torch.load(f, weights_only=True)", "save_file(x, f)", "torch.compile(m)"]
    assert unsafe_calls("\n".join(safe)) == []


def test_prefopt_has_no_eval_exec_or_pickle_and_every_torch_load_is_weights_only():
    files = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / "training" / "train.py" in files and PACKAGE / "rewards" / "custom.py" in files
    found = {str(f.relative_to(ROOT)): unsafe_calls(f.read_text()) for f in files}
    assert {f: calls for f, calls in found.items() if calls} == {}


# ---- user callables: the allowlist ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "prefopt.training.train:train",
        "prefopt.training.train.train",
        "prefopt.training.train:main",
        "prefopt.engine.prepare:prepare",
        "prefopt.config:load_run_config",
        "prefopt:cli",
        "os:system",
        "subprocess:run",
        "builtins:eval",
    ],
)
def test_the_default_allowlist_refuses_prefopts_loop_and_the_standard_library(path: str):
    with pytest.raises(ValueError, match="not allowed"):
        resolve_callable(path, DEFAULT_ALLOWLIST)


def test_the_default_allowlist_is_prefopts_rewards_and_user_rewards_in_the_schema_and_the_yaml():
    assert DEFAULT_ALLOWLIST == ["prefopt.rewards.", "user_rewards."]
    yaml = OmegaConf.load(ROOT / "conf" / "aux_reward" / "custom.yaml")
    assert list(yaml.allowed_prefixes) == DEFAULT_ALLOWLIST
    assert resolve_callable("prefopt.rewards.custom:example_word_count", DEFAULT_ALLOWLIST)(
        [""], ["a b"]
    ) == [2]


def test_an_allowed_module_cannot_hand_out_what_it_imported(tmp_path: Path, monkeypatch):
    """`user_rewards.mod:system` is os.system imported into an allowed module: refused, because the callable
    is defined outside the allowlist; the module's own function resolves. Private names never do."""
    package = tmp_path / "user_rewards"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text(
        "from os import system\nimport subprocess\n\n\ndef score(prompts, responses):\n"
        "    return [1.0 for _ in responses]\n\n\ndef _helper():\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("user_rewards", "user_rewards.mod"):  # imported here, gone afterwards
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.delitem(sys.modules, name)
    assert resolve_callable("user_rewards.mod:score", DEFAULT_ALLOWLIST)(["p"], ["y"]) == [1.0]
    for path in ("user_rewards.mod:system", "user_rewards.mod:subprocess.run"):
        with pytest.raises(ValueError, match="defined in"):
            resolve_callable(path, DEFAULT_ALLOWLIST)
    with pytest.raises(ValueError, match="private"):
        resolve_callable("user_rewards.mod:_helper", DEFAULT_ALLOWLIST)


@pytest.mark.parametrize("function", ["prefopt.training.train:train", "no_such_package_prefopt:f"])
def test_a_custom_reward_outside_the_allowlist_fails_in_config_validation_naming_the_key(function: str):
    """Refused by name before any import: a module that does not exist is refused, not looked for."""
    with pytest.raises(ConfigError) as error:
        load_run_config(compose_config("aux_reward=custom", f"aux_reward.custom.function={function}"))
    message = str(error.value)
    assert message.startswith("aux_reward.custom.function: ") and "outside allowed_prefixes" in message
    assert "\n" not in message


# ---- remote code: off by default, a warning naming the checkpoint when on ---------------------------------


def test_trust_remote_code_is_false_in_every_model_preset_and_the_schema():
    assert PretrainedModelConfig().trust_remote_code is False
    for file in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        raw = OmegaConf.load(file)
        if file.stem == "tiny":  # built from a config, no checkpoint code to trust
            assert "trust_remote_code" not in raw
            continue
        assert raw.trust_remote_code is False, file
        extra = ["model.name_or_path=org/m"] if file.stem == "pretrained" else []
        assert load_run_config(compose_config(f"model={file.stem}", *extra)).model.trust_remote_code is False


class Recorder:
    """Stands in for from_pretrained: records the keyword arguments, loads nothing."""

    def __init__(self):
        self.calls: list[dict] = []

    def from_pretrained(self, name_or_path, **kwargs):
        self.calls.append({"name_or_path": name_or_path, **kwargs})
        return type("Loaded", (), {"pad_token": "<pad>", "eos_token": "</s>"})()


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_reaches_model_and_tokenizer_only_when_asked_and_then_warns(
    monkeypatch, caplog, trust
):
    import transformers

    model, tokenizer = Recorder(), Recorder()
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", model)
    monkeypatch.setattr(transformers, "AutoTokenizer", tokenizer)
    with caplog.at_level(logging.WARNING, logger="prefopt.models.pretrained"):
        load_pretrained(PretrainedModelConfig(name_or_path="org/remote-model", trust_remote_code=trust))
    assert [c["trust_remote_code"] for c in model.calls + tokenizer.calls] == [trust, trust]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "trust_remote_code" in w and "org/remote-model" in w]) == int(trust)
    assert load_options(PretrainedModelConfig(name_or_path="x"))["trust_remote_code"] is False
