"""The keys of the flat `trainer` group before its split (trainer.lr, trainer.save_checkpoint,
trainer.value_head_lr, trainer.reference_fit, ...) and EXPO's KL estimator keys before the `kl` group
(objective.kl_estimator, objective.kl_samples_per_prompt) keep working for one release: on the command line
(with a notice naming old and new key), in a run dir or checkpoint written before the split (`prefopt
evaluate`, `trainer.checkpoint.resume`), and in `trainer.checkpoint.resume_allow_changes`.

An old run is made here the way the last release wrote it: a run's config.yaml and its checkpoint's
trainer_state.json rewritten to the old layout, whose keys and defaults are spelled out below, not derived
from the alias table under test."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import FAST, FAST_MODEL, ROOT, compose_config, read_jsonl, run_training
from omegaconf import OmegaConf

from prefopt.config import load_run_config
from prefopt.config.aliases import ALIASES, new_key, rewrite_overrides, upgrade_config
from prefopt.training.checkpoint import checkpoint_dir

# conf/trainer/default.yaml of the release before the split, key for key.
OLD_TRAINER = {
    "max_steps": 200,
    "epochs": None,
    "optimizer": "adamw",
    "batch_size": 32,
    "micro_batch_size": None,
    "lr": 1.0e-3,
    "weight_decay": 0.0,
    "adam_betas": [0.9, 0.999],
    "lr_schedule": "cosine",
    "warmup_steps": 10,
    "max_grad_norm": 1.0,
    "precision": "auto",
    "device": "auto",
    "num_threads": 1,
    "logps_chunk_tokens": 256,
    "packing": "auto",
    "pack_tokens": None,
    "share_prompts": True,
    "reference_cache": True,
    "log_every_steps": 10,
    "value_head_lr": 1.0e-3,
    "value_head_width": 128,
    "save_checkpoint": True,
    "checkpoint_every_steps": 100,
    "keep_last_checkpoints": 2,
    "resume": None,
    "resume_allow_changes": [
        "trainer.max_steps",
        "trainer.checkpoint_every_steps",
        "trainer.strategy",
        "logger",
    ],
    "max_bad_steps": 5,
    "preemption_signals": ["SIGTERM", "SIGINT", "SIGUSR1"],
    "strategy": "auto",
    "compile": False,
    "gradient_checkpointing": False,
    "fused_optimizer": None,
    "param_dtype": None,
    "reference_fit": {
        "enabled": None,
        "max_steps": 600,
        "lr": 3.0e-3,
        "target_kl": 0.003,
        "max_kl": 0.05,
        "cache": True,
    },
}
# conf/objective/expo.yaml's (and expo_reg's) KL keys of the release before the `kl` group.
OLD_EXPO_KL = {"kl_estimator": "exact", "kl_samples_per_prompt": 4}


def old_layout(raw: dict) -> dict:
    """A resolved config of this release as the last one wrote it: one flat trainer node (its values from
    `raw`), the reference fit under it, no value head options on the objective, no `kl` node (EXPO's
    estimator and its samples per prompt on the objective)."""
    raw = copy.deepcopy(raw)
    kl = raw.pop("kl")
    if raw["objective"]["name"] in ("expo", "expo_reg"):
        raw["objective"]["kl_estimator"] = kl["name"]
        raw["objective"]["kl_samples_per_prompt"] = kl.get("samples_per_prompt", 4)
    trainer = raw["trainer"]
    flat = {k: v for k, v in trainer.items() if k not in ("optimizer", "layout", "checkpoint", "distributed")}
    optimizer, layout, checkpoint = trainer["optimizer"], trainer["layout"], trainer["checkpoint"]
    flat |= {"optimizer": optimizer["name"], "fused_optimizer": optimizer["fused"]}
    flat |= {k: optimizer[k] for k in ("lr", "weight_decay", "adam_betas", "lr_schedule", "warmup_steps")}
    layout = {k: v for k, v in layout.items() if k != "lean_activations"}  # new in this release
    flat |= {"max_grad_norm": optimizer["max_grad_norm"], **layout, **trainer["distributed"]}
    flat |= {"save_checkpoint": checkpoint["export"], "checkpoint_every_steps": checkpoint["every_steps"]}
    flat |= {"keep_last_checkpoints": checkpoint["keep_last"], "resume": checkpoint["resume"]}
    flat |= {"preemption_signals": checkpoint["preemption_signals"]}
    flat["resume_allow_changes"] = [
        {"trainer.checkpoint.every_steps": "trainer.checkpoint_every_steps"}.get(
            key, {"trainer.distributed.strategy": "trainer.strategy"}.get(key, key)
        )
        for key in checkpoint["resume_allow_changes"]
    ]
    flat["reference_fit"] = raw["dataset"].pop("reference_fit", OLD_TRAINER["reference_fit"])
    flat["value_head_lr"] = raw["objective"].pop("value_head_lr", OLD_TRAINER["value_head_lr"])
    flat["value_head_width"] = raw["objective"].pop("value_head_width", OLD_TRAINER["value_head_width"])
    raw["trainer"] = flat
    return raw


def resolved(*overrides: str) -> dict:
    return OmegaConf.to_container(compose_config(*overrides), resolve=True)


def test_the_old_layout_spelled_out_here_is_the_last_releases_default():
    """The literal above and `old_layout` of this release's defaults agree, key for key (the two halves of
    the next test check each other). This release's chunk default is 512, the last one's 256."""
    assert old_layout(resolved("trainer.layout.logps_chunk_tokens=256"))["trainer"] == OLD_TRAINER


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # synthetic, dpo: the reference fit moves to the dataset, the value head options are dropped
        ["objective=hpo"],  # the value head options move to the objective
        ["dataset=preference", "dataset.path=org/pairs"],  # no reference fit to move: dropped
        ["+experiment=hpo_hh"],  # rmsprop: the optimizer's name becomes trainer.optimizer.name
        ["objective=expo", "kl=samples", "kl.samples_per_prompt=3"],  # the estimator becomes the kl node
        ["+experiment=expo_hh"],  # kl=token
    ],
)
def test_an_old_config_is_read_as_the_same_config_in_the_new_layout(overrides):
    new = resolved(*overrides, "trainer.layout.lean_activations=false")  # as every older run computed
    old = old_layout(new)
    moved = upgrade_config(old)
    assert old == new
    assert {"trainer.lr", "trainer.save_checkpoint", "trainer.reference_fit"} <= set(moved)


def test_a_config_in_the_new_layout_is_left_as_it_is():
    new = resolved("objective=hpo")
    again = copy.deepcopy(new)
    assert upgrade_config(again) == [] and again == new


def test_every_old_key_was_a_trainer_or_expo_key_and_its_new_key_is_in_the_composed_config():
    raws = {"trainer": resolved("objective=hpo"), "objective": resolved("objective=expo", "kl=samples")}
    for old, new in ALIASES.items():
        group, name = old.split(".", 1)
        assert name in {"trainer": OLD_TRAINER, "objective": OLD_EXPO_KL}[group], old
        *path, last = new.split(".")
        node = raws[group]
        for part in path:
            node = node[part]
        assert last in node, new


def test_resume_allow_changes_takes_old_keys_and_prefixes():
    assert new_key("trainer.lr") == "trainer.optimizer.lr"
    assert new_key("trainer.checkpoint_every_steps") == "trainer.checkpoint.every_steps"
    assert new_key("trainer.reference_fit") == "dataset.reference_fit"
    assert new_key("trainer.reference_fit.max_kl") == "dataset.reference_fit.max_kl"
    assert new_key("trainer.value_head_lr") == "objective.value_head_lr"
    for key in ("trainer.optimizer", "trainer.optimizer.lr", "trainer.max_steps", "logger", "objective"):
        assert new_key(key) == key  # names in the new layout are never rewritten


def test_old_overrides_are_rewritten_keeping_their_prefix_and_value(capsys):
    args = [
        "-m",
        "trainer.lr=1e-3,1e-4",
        "+trainer.reference_fit.max_kl=1",
        "~trainer.fused_optimizer",
        "trainer.optimizer=rmsprop",
        "trainer.optimizer.lr=2",
        "--cfg",
        "job",
        "trainer=fsdp",
        "objective.beta=0.2",
    ]
    assert rewrite_overrides(args) == [
        "-m",
        "trainer.optimizer.lr=1e-3,1e-4",
        "+dataset.reference_fit.max_kl=1",
        "~trainer.optimizer.fused",
        "trainer.optimizer.name=rmsprop",
        "trainer.optimizer.lr=2",
        "--cfg",
        "job",
        "trainer=fsdp",
        "objective.beta=0.2",
    ]
    notices = capsys.readouterr().err.splitlines()
    assert len(notices) == 4
    for notice, (old, new) in zip(
        notices,
        [
            ("trainer.lr", "trainer.optimizer.lr"),
            ("trainer.reference_fit.max_kl", "dataset.reference_fit.max_kl"),
            ("trainer.fused_optimizer", "trainer.optimizer.fused"),
            ("trainer.optimizer", "trainer.optimizer.name"),
        ],
        strict=True,
    ):
        assert old in notice and new in notice


def test_the_kl_estimator_keys_become_the_kl_group_and_its_option_in_any_order(capsys):
    assert rewrite_overrides(["objective=expo", "objective.kl_estimator=token"]) == [
        "objective=expo",
        "kl=token",
    ]
    assert new_key("objective.kl_estimator") == "kl"
    assert new_key("objective.kl_samples_per_prompt") == "kl.samples_per_prompt"
    # samples_per_prompt is kl=samples's alone: picked for it where the command line picks no estimator
    assert rewrite_overrides(["objective.kl_samples_per_prompt=3"]) == [
        "kl=samples",
        "kl.samples_per_prompt=3",
    ]
    for args in (
        ["objective.kl_samples_per_prompt=3", "objective=expo", "objective.kl_estimator=samples"],
        ["objective=expo", "kl=samples", "objective.kl_samples_per_prompt=3"],
    ):
        rewritten = rewrite_overrides(args)
        assert sorted(rewritten) == ["kl.samples_per_prompt=3", "kl=samples", "objective=expo"]
        assert load_run_config(compose_config(*rewritten)).kl.samples_per_prompt == 3
    # under another estimator the old loop ignored it: dropped
    assert rewrite_overrides(["kl=token", "objective.kl_samples_per_prompt=3"]) == ["kl=token"]
    notices = capsys.readouterr().err.splitlines()
    assert len(notices) == 6 and all(line.startswith("prefopt: objective.kl_") for line in notices)


def test_an_old_expo_config_gets_its_kl_node_and_any_old_config_the_default():
    before_lean = "trainer.layout.lean_activations=false"  # an old config also gets lean activations off
    new = resolved("objective=expo", "kl=token", before_lean)
    old = old_layout(new)
    assert "kl" not in old and old["objective"]["kl_estimator"] == "token"
    assert {"objective.kl_estimator", "objective.kl_samples_per_prompt"} <= set(upgrade_config(old))
    assert old == new and old["kl"] == {"name": "token"}
    dpo = old_layout(resolved())
    assert "kl" not in dpo and "objective.kl_estimator" not in upgrade_config(dpo)
    assert dpo["kl"] == {"name": "exact"} and dpo == resolved(before_lean)


def test_prefopt_train_with_the_old_kl_estimator_key_runs_with_that_estimator(tmp_path):
    """The real CLI: `objective.kl_estimator=token` is `kl=token`, with one notice naming both keys."""
    args = [*FAST, *FAST_MODEL, "objective=expo", "objective.kl_estimator=token", "trainer.max_steps=2"]
    env = {**os.environ, "CI": "true"}
    result = subprocess.run(
        [sys.executable, "-m", "prefopt.cli", "train", *args, f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["kl"] == {"name": "token"} and "kl_estimator" not in config["objective"]
    notices = [line for line in result.stderr.splitlines() if "objective.kl_estimator" in line]
    assert len(notices) == 1 and "kl" in notices[0].split("objective.kl_estimator", 1)[1]


def test_prefopt_train_with_old_keys_runs_and_names_each_rewrite(tmp_path):
    """The real CLI: old keys in, a run with the same settings out, one stderr line per old key naming it and
    its new key."""
    old = [
        "trainer.reference_fit.lr=1e-2",
        "trainer.reference_fit.max_kl=0.2",
        "trainer.lr=3e-3",
        "trainer.save_checkpoint=false",
        "trainer.checkpoint_every_steps=null",
        "trainer.share_prompts=false",
    ]
    fast = [o for o in FAST if not o.startswith("dataset.reference_fit.")]
    args = [sys.executable, "-m", "prefopt.cli", "train", *fast, *FAST_MODEL, "trainer.max_steps=2", *old]
    env = {**os.environ, "CI": "true"}
    result = subprocess.run(
        [*args, f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r][-1] == 2
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["trainer"]["optimizer"]["lr"] == 3e-3
    assert config["trainer"]["checkpoint"]["export"] is False
    assert config["trainer"]["checkpoint"]["every_steps"] is None
    assert config["trainer"]["layout"]["share_prompts"] is False
    assert config["dataset"]["reference_fit"]["max_kl"] == 0.2
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "checkpoints").exists()
    for override in old:
        key = override.split("=")[0]
        assert any(key in line and new_key(key) in line for line in result.stderr.splitlines()), key


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """A finished tiny run with checkpoints at steps 5 and 6, rewritten as the last release wrote it."""
    run_dir = tmp_path_factory.mktemp("old") / "run"
    run_training(run_dir, "trainer.max_steps=6", "trainer.checkpoint.every_steps=5")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old_layout(config)))
    for step in (5, 6):
        state_file = checkpoint_dir(run_dir, step) / "trainer_state.json"
        state = json.loads(state_file.read_text())
        state["config"] = old_layout(state["config"])
        state_file.write_text(json.dumps(state))
    return run_dir


def test_prefopt_evaluate_reads_an_old_run(old_run):
    from prefopt.training.evaluate_saved import main

    assert main([str(old_run), "logger=none", "eval.generate=false", "trainer.share_prompts=true"]) == 0
    (out,) = (old_run / "evaluate").iterdir()
    final = json.loads((out / "eval.json").read_text())["final"]
    expected = json.loads((old_run / "eval.json").read_text())["final"]
    assert {k: final.get(k) for k in expected} == expected


def test_an_old_checkpoint_resumes_and_old_keys_may_be_allowed_to_change(old_run, tmp_path):
    from prefopt.errors import ConfigError
    from prefopt.training.resume import plan_resume

    def plan(*overrides, lean="trainer.layout.lean_activations=false"):  # the old run's backward
        common = [*FAST, *FAST_MODEL, "trainer.max_steps=6", "trainer.checkpoint.every_steps=5", lean]
        rc = load_run_config(compose_config(*common, f"trainer.checkpoint.resume={old_run}", *overrides))
        return plan_resume(rc, tmp_path)

    assert plan().checkpoint == checkpoint_dir(old_run, 6)
    with pytest.raises(ConfigError, match=r"trainer\.layout\.lean_activations \(False -> True\)"):
        plan(lean="trainer.layout.lean_activations=true")
    with pytest.raises(ConfigError, match=r"trainer\.optimizer\.lr"):
        plan("trainer.optimizer.lr=0.5")
    assert plan("trainer.optimizer.lr=0.5", "trainer.checkpoint.resume_allow_changes=[trainer.lr]").checkpoint
    assert plan(
        "dataset.reference_fit.max_kl=0.3", "trainer.checkpoint.resume_allow_changes=[trainer.reference_fit]"
    )
    resumed = run_training(
        tmp_path,
        "trainer.max_steps=8",
        f"trainer.checkpoint.resume={old_run}",
        "trainer.layout.lean_activations=false",
    )
    assert resumed["status"] == "completed" and resumed["resumed_at"] == [6]
