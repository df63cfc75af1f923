"""Configs are the single source of truth: every option composes and validates; bad values fail fast."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CONF_DIR, ROOT, compose_config

from prefopt.config import ConfigError, load_run_config

# Options whose required (???) keys need a value to validate.
REQUIRED = {
    ("model", "pretrained"): ["model.name_or_path=some/model"],
    ("dataset", "preference"): ["dataset.path=json"],
    ("aux_reward", "custom"): ["aux_reward.custom.function=prefopt.rewards.custom.example_word_count"],
}
GROUPS = sorted(
    p.name for p in Path(CONF_DIR).iterdir() if p.is_dir() and p.name not in {"hydra", "experiment"}
)
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((Path(CONF_DIR) / group).glob("*.yaml"))]
EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_option_of_every_group_composes_and_validates(group, option):
    rc = load_run_config(compose_config(f"{group}={option}", *REQUIRED.get((group, option), [])))
    assert rc.raw[group] is not None


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates_with_each_swept_objective(name):
    """An experiment's sweep must validate for every objective it sweeps (read from hydra.sweeper.params)."""
    cfg = compose_config(f"+experiment={name}")
    params = cfg.hydra.sweeper.params if "hydra" in cfg else {}
    objectives = str(params.get("objective", cfg.objective.name)).split(",")
    for objective in objectives:
        rc = load_run_config(compose_config(f"+experiment={name}", f"objective={objective}", "strength=0.5"))
        assert rc.objective_name == objective
    assert "report" in cfg and cfg.report.figures


def test_experiment_files_list_is_the_papers():
    assert EXPERIMENTS == ["expo_interpolation", "expo_preservation", "hpo_aux"]


def test_strength_sets_the_objectives_own_regularization_knob():
    assert load_run_config(compose_config("strength=0.7")).objective.beta == 0.7
    assert load_run_config(compose_config("objective=expo", "strength=0.7")).objective.lam == 0.7
    assert load_run_config(compose_config()).objective.beta == 0.1
    assert load_run_config(compose_config("objective=expo")).objective.lam == 0.1


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["trainer.lr=abc"], "trainer.lr"),
        (["+objective.bta=1"], "bta"),
        (["trainer.batch_size=0"], "trainer.batch_size"),
        (["dataset=preference"], "dataset.path"),
        (["aux_reward=length", "aux_reward.length.sign=abc"], "aux_reward.length"),
        (["objective=expo", "objective.kl_estimator=bogus"], "kl_estimator"),
        (["model.hidden_size=wide"], "model.hidden_size"),
    ],
)
def test_bad_values_raise_an_error_naming_the_key(overrides, named):
    with pytest.raises((ConfigError, ValueError), match=named.replace(".", r"\.")):
        load_run_config(compose_config(*overrides))


def test_hpo_brings_a_default_reward_that_the_command_line_replaces():
    assert set(compose_config("objective=hpo").aux_reward) == {"readability"}
    assert set(compose_config("objective=hpo", "aux_reward=length").aux_reward) == {"length"}
    assert set(compose_config("aux_reward=[readability,length]").aux_reward) == {"readability", "length"}


@pytest.mark.parametrize(
    ("override", "named"), [("objective=nonexistent", "nonexistent"), ("trainer.lr=abc", "trainer.lr")]
)
def test_cli_fails_fast_before_building_anything(tmp_path, override, named):
    started = time.perf_counter()
    command = [sys.executable, "-m", "prefopt", "train", override, f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert time.perf_counter() - started < 10
    assert named in result.stdout + result.stderr
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoint").exists()


def test_help_lists_groups_and_every_objective():
    result = subprocess.run(
        [sys.executable, "-m", "prefopt", "train", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    for word in [
        "model",
        "dataset",
        "objective",
        "aux_reward",
        "trainer",
        "eval",
        "logger",
        "dpo",
        "ipo",
        "fdpo",
        "sft",
        "simpo",
        "kto",
        "expo",
        "expo_reg",
        "hpo",
    ]:
        assert word in result.stdout, word
