"""Ordinary mistakes get one line naming the key, before anything loads: a bad value, a missing local file or
directory, an objective without the aux reward it needs, a typo'd key or group option (with the closest
existing one). A hub id is never mistaken for a missing local path. An error only loading can find still
gets one line on stderr, and its traceback goes to train.log."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import ROOT, compose_config

from prefopt import cli
from prefopt.config import ConfigError, load_run_config

MISSING = "/nonexistent/prefopt-test"  # a local path (it starts with /) that does not exist


def config_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as error:
        load_run_config(compose_config(*overrides))
    return str(error.value)


# ---- bad values, missing paths and requirements fail in load_run_config, naming the key ------------------


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["objective.beta=0"], "objective.beta"),
        (["objective.beta=-0.1"], "objective.beta"),
        (["objective=ipo", "objective.beta=0"], "objective.beta"),
        (["objective=simpo", "objective.beta=0"], "objective.beta"),
        (["objective=kto", "objective.beta=-1"], "objective.beta"),
        (["objective=hpo", "objective.beta=0"], "objective.beta"),
        (["objective=expo", "objective.lam=-1"], "objective.lam"),
        (["trainer.optimizer.lr=0"], "trainer.optimizer.lr"),
        (["trainer.optimizer.lr=-0.001"], "trainer.optimizer.lr"),
        (
            ["dataset=hh_rlhf", "dataset.max_prompt_tokens=128", "dataset.max_length=128"],
            "dataset.max_length",
        ),
        (["dataset=mixture", "dataset.max_length=100"], "dataset.max_length"),
        (["objective=hpo", "aux_reward=none"], "aux_reward"),
        (["model=pretrained", f"model.name_or_path={MISSING}"], "model.name_or_path"),
        (
            ["model=pretrained", "model.name_or_path=org/m", "model.tokenizer_name_or_path=./no-tok"],
            "model.tokenizer_name_or_path",
        ),
        (
            ["model=llama", "model.reference_name_or_path='~/no-such-prefopt-ref'"],
            "model.reference_name_or_path",
        ),
        (["dataset=preference", f"dataset.path={MISSING}/pairs.jsonl"], "dataset.path"),
        (["dataset=preference", "dataset.path=no_such_dir/pairs.jsonl"], "dataset.path"),
        (
            ["dataset=preference", "dataset.path=json", "dataset.data_files=no_such_pairs.jsonl"],
            "dataset.data_files",
        ),
        (["dataset=preference", "dataset.path=json"], "dataset.data_files"),
        (["dataset=hh_rlhf", "dataset.path=./no-hh-copy"], "dataset.path"),
        (["dataset=mixture", f"dataset.sources.shp.path={MISSING}"], "dataset.sources.shp.path"),
        (["dataset=imdb", f"dataset.pairs_path={MISSING}/pairs.jsonl"], "dataset.pairs_path"),
        (["aux_reward=toxicity", f"aux_reward.toxicity.model={MISSING}"], "aux_reward.toxicity.model"),
    ],
)
def test_a_bad_config_is_one_line_from_load_run_config_naming_the_key(overrides: list[str], named: str):
    message = config_error(*overrides)
    assert "\n" not in message
    assert message.startswith(named), message


def test_the_objectives_own_checks_name_the_key_not_just_the_group():
    """beta=0 is refused by the objective's dataclass, whose message says `beta ...`; the error leads with
    the full key."""
    assert config_error("objective.beta=0").startswith("objective.beta: ")
    assert "aux_reward=<name>" in config_error("objective=hpo", "aux_reward=none")


def test_a_local_file_where_a_directory_belongs_and_an_unknown_file_kind_are_refused(tmp_path: Path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not pairs")
    assert "is a file" in config_error("model=pretrained", f"model.name_or_path={notes}")
    assert config_error("dataset=preference", f"dataset.path={notes}").startswith("dataset.path=")


@pytest.mark.parametrize(
    ("overrides", "hint"),
    [
        (["objective.name=dpoo"], "did you mean dpo?"),
        (["dataset.name=synthetc"], "did you mean synthetic?"),
        (["+aux_reward.lenght.weight=1"], "did you mean length?"),
        (["+objective.bta=1"], "did you mean objective.beta?"),
        (["+objectiv.beta=1"], "did you mean objective?"),
    ],
)
def test_a_name_or_key_the_schema_does_not_know_suggests_the_closest(overrides: list[str], hint: str):
    message = config_error(*overrides)
    assert hint in message and "\n" not in message


def test_hub_ids_and_existing_local_paths_pass_the_existence_check(tmp_path: Path):
    """Hub ids are looked up only when they load (offline, that fails there with its own one line)."""
    rc = load_run_config(
        compose_config(
            "model=pretrained",
            "model.name_or_path=meta-llama/Llama-3.2-1B",
            "model.reference_name_or_path=gpt2",
            "dataset=hh_rlhf",
            "aux_reward=toxicity",
        )
    )
    assert rc.model.name_or_path == "meta-llama/Llama-3.2-1B" and rc.dataset.path == "Anthropic/hh-rlhf"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    rc = load_run_config(
        compose_config(
            f"model.name_or_path={tmp_path}",
            "model=pretrained",
            "dataset=preference",
            f"dataset.path={pairs}",
        )
    )
    assert rc.model.name_or_path == str(tmp_path) and rc.dataset.path == str(pairs)


# ---- typo'd keys and options: one line with the closest match, before Hydra runs ------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["trainer.max_step=5"], ["trainer.max_step", "trainer.max_steps"]),
        (["objective.bta=0.1"], ["objective.bta", "objective.beta"]),
        (["objective=expo", "objective.lamm=1"], ["objective.lamm", "objective.lam"]),
        (["objectiv=dpo"], ["objectiv", "objective"]),
        (
            ["dataset.reference_fit.max_stp=3"],
            ["dataset.reference_fit.max_stp", "dataset.reference_fit.max_steps"],
        ),
        (["hydra.run.dri=/tmp/x"], ["hydra.run.dri", "hydra.run.dir"]),
        (["trainer.zzzzzz=1"], ["trainer.zzzzzz", "+trainer.zzzzzz="]),  # no close match: how to add it
        (["objective=dpoo"], ["objective=dpoo", "objective=dpo"]),
        (["aux_reward=[readability,lenght]"], ["aux_reward=lenght", "aux_reward=length"]),
        (["+experiment=hpo_ax"], ["experiment=hpo_ax", "experiment=hpo_aux"]),
        (["-m", "objective=dpo,expo", "trainer.max_step=1"], ["trainer.max_step", "trainer.max_steps"]),
        (["-m", "trainer.max_step=1,2"], ["trainer.max_step", "trainer.max_steps"]),
        (["--cfg", "job", "objective.bta=1"], ["objective.bta", "objective.beta"]),
    ],
)
def test_a_typo_is_one_line_with_the_closest_match_and_exit_2(capsys, args: list[str], named: list[str]):
    """The promise is structure: exit 2, one line on stderr, naming the typo first and then the closest
    existing key or option (the wording around them is free)."""
    assert cli.main(["train", *args]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    typo, match = named
    assert typo in lines[0] and match in lines[0][lines[0].index(typo) + len(typo) :], lines[0]


@pytest.mark.parametrize(
    "args",
    [
        ["objective=expo", "objective.lam=0.5"],
        ["-m", "objective=dpo,expo,hpo", "seed=0,1,2"],
        ["-m", "objective=glob(*)"],
        ["+experiment=hpo_aux"],
        ["+new.key=1"],  # composes; load_run_config names it as an unknown top-level key
        ["--cfg", "job"],
        ["--help"],
        ["hydra.run.dir=/tmp/x", "hydra/launcher=local", "hydra.launcher.n_jobs=4", "hydra.job.chdir=false"],
        ["aux_reward=[readability,length]", "aux_reward.length.weight=0.5"],
        ["trainer.optimizer.lr=["],  # a syntax error: Hydra's own message says where
    ],
)
def test_commands_without_a_typo_pass_the_check_untouched(args: list[str]):
    assert cli.override_mistake(args) is None


# ---- the real CLI: exit code, one stderr line, nothing loaded; a load-time error's traceback in train.log --


CASES = {
    "missing_model": (["model=pretrained", f"model.name_or_path={MISSING}"], {}),
    "typo": (["trainer.max_step=5"], {}),
    "load_time": (["dataset=preference", "dataset.path={empty}"], {}),
    "load_time_full_error": (["dataset=preference", "dataset.path={empty}"], {"HYDRA_FULL_ERROR": "1"}),
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, dict]:
    """`prefopt train` in subprocesses, side by side; an empty dir is a data path only loading can reject."""
    base = tmp_path_factory.mktemp("bad-input")
    empty = base / "empty"
    empty.mkdir()
    runs: dict[str, dict] = {}

    def run(name: str, args: list[str], env: dict) -> None:
        run_dir = base / name
        command = [sys.executable, "-m", "prefopt", "train", *[a.format(empty=empty) for a in args]]
        command += ["logger=none", f"hydra.run.dir={run_dir}"]
        env = {**os.environ, "PREFOPT_CACHE": str(base / "cache"), "HYDRA_FULL_ERROR": "0", **env}
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        runs[name] = {"rc": done.returncode, "stderr": done.stderr, "run_dir": run_dir}

    threads = [threading.Thread(target=run, args=(name, *case)) for name, case in CASES.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return runs


def test_cli_a_missing_model_dir_is_one_line_exit_2_before_data_or_model_load(cli_runs):
    run = cli_runs["missing_model"]
    assert run["rc"] == 2
    lines = run["stderr"].splitlines()  # one line naming the key and the missing directory
    assert len(lines) == 1 and "model.name_or_path" in lines[0] and MISSING in lines[0], run["stderr"]
    assert not (run["run_dir"] / "metrics.jsonl").exists()
    log = (run["run_dir"] / "train.log").read_text() if (run["run_dir"] / "train.log").exists() else ""
    assert "prefopt.engine.prepare" not in log  # it logs the data and the model as they load


def test_cli_a_typo_is_one_line_exit_2_and_no_run_dir(cli_runs):
    run = cli_runs["typo"]
    assert run["rc"] == 2
    lines = run["stderr"].splitlines()  # one line naming the typo and the closest key
    assert len(lines) == 1 and "trainer.max_step:" in lines[0] and "trainer.max_steps" in lines[0], lines
    assert not run["run_dir"].exists()


def test_cli_a_load_time_error_is_one_line_and_its_traceback_is_in_train_log(cli_runs):
    run = cli_runs["load_time"]
    assert run["rc"] == 1
    lines = run["stderr"].splitlines()
    assert len(lines) == 1 and "dataset.path=" in lines[0] and "train.log" in lines[0], run["stderr"]
    assert "Traceback (most recent call last)" not in run["stderr"]
    assert "Traceback (most recent call last)" in (run["run_dir"] / "train.log").read_text()


def test_cli_hydra_full_error_shows_the_traceback(cli_runs):
    run = cli_runs["load_time_full_error"]
    assert run["rc"] != 0
    assert "Traceback (most recent call last)" in run["stderr"]


def test_expo_without_its_kl_term_is_refused_naming_lam():
    """lam = 0 drops EXPO's regularizer; like beta <= 0 it fails in the config, naming the key."""
    for lam in ("0", "-0.5"):
        with pytest.raises(ConfigError, match=r"^objective\.lam: must be > 0"):
            load_run_config(compose_config("objective=expo", f"objective.lam={lam}"))
