"""The real config: every option of every group (and every experiment file) composes and validates, the
`strength` knob reaches the right hyperparameter, bad values fail fast naming the key, and the CLI stops
before building anything when the config is wrong."""

from __future__ import annotations

import copy
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from waiting import exit_code

from prefopt.config import ConfigError, RunConfig, load_run_config, register_resolvers

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
APP_GROUPS = {"model", "dataset", "objective", "kl", "aux_reward", "trainer", "eval", "logger", "experiment"}

# Options with a required `???` value, and the override each gets here (a hub name: nothing is loaded,
# and a local path would have to exist).
REQUIRED = {
    "model/pretrained": ["model.name_or_path=x"],
    "dataset/preference": ["dataset.path=org/pairs"],
    "aux_reward/custom": ["aux_reward.custom.function=prefopt.rewards.custom:example_word_count"],
}
REQUIRED_KEY = {
    "model/pretrained": "model.name_or_path",
    "dataset/preference": "dataset.path",
    "aux_reward/custom": "aux_reward.custom.function",
}


# ---- helpers -----------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _hydra_conf():
    """One Hydra initialisation for the module (composing is then ~0.1 s instead of ~0.25 s)."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def compose_cfg(*overrides: str, hydra_config: bool = False):
    return compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra_config)


def load(*overrides: str) -> RunConfig:
    return load_run_config(compose_cfg(*overrides))


def primary_defaults() -> set[str]:
    """Groups train.yaml's defaults list selects (so `group=x` works; others need `+group=x`)."""
    groups = set()
    for entry in OmegaConf.to_container(OmegaConf.load(CONF / "train.yaml"))["defaults"]:
        if isinstance(entry, dict):
            groups |= {key.removeprefix("override ").strip() for key in entry}
    return groups


def all_options() -> list[str]:
    """ "group/option" for every yaml under conf/ at any depth, except the primary train.yaml."""
    return sorted(
        p.relative_to(CONF).with_suffix("").as_posix() for p in CONF.rglob("*.yaml") if p.parent != CONF
    )


def app_options() -> list[str]:
    return [o for o in all_options() if not o.startswith("hydra/")]


def select_override(option: str) -> str:
    group, name = option.rsplit("/", 1)
    return f"{group}={name}" if group in primary_defaults() else f"+{group}={name}"


def package_of(option: str) -> str:
    """Where the file's content lands: its `# @package` header, else its group path (dotted)."""
    for line in (CONF / f"{option}.yaml").read_text().splitlines():
        if line.startswith("# @package"):
            package = line.split(None, 2)[2].strip()
            return "" if package == "_global_" else package
    return option.rsplit("/", 1)[0].replace("/", ".")


def leaves(node, prefix: str = "") -> dict:
    """Dotted path -> value for every leaf (lists and empty dicts are leaves)."""
    if isinstance(node, dict) and node:
        out = {}
        for key, value in node.items():
            out |= leaves(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return {prefix: node}


def lookup(container: dict, dotted: str):
    node = container
    for key in dotted.split(".") if dotted else []:
        node = node[key]
    return node


def has_missing(node) -> bool:
    return any(v == "???" for v in leaves(node).values())


def hand_option(option: str) -> dict:
    """The option file as written, without its defaults list (Hydra consumes that)."""
    content = OmegaConf.to_container(OmegaConf.load(CONF / f"{option}.yaml"), resolve=False)
    content.pop("defaults", None)
    return content


# ---- every option composes and validates -------------------------------------------------------------


def test_the_walk_finds_every_group_including_experiments():
    """A walk that silently skips a folder would make the composition tests vacuous."""
    found = {o.split("/")[0] for o in app_options()}
    assert found >= APP_GROUPS
    experiments = {p.stem for p in (CONF / "experiment").glob("*.yaml")}
    assert experiments and {f"experiment/{e}" for e in experiments} <= set(app_options())


@pytest.mark.parametrize("option", app_options())
def test_every_option_composes_validates_and_keeps_its_values(option: str):
    """Compose `group=option` (`+experiment=x` for experiments), validate into a RunConfig, and check every
    value the file sets reaches the composed config unchanged (at the file's package)."""
    content = hand_option(option)
    if has_missing(content):
        assert option in REQUIRED, f"{option} has a required ??? value: add its override to REQUIRED"
    extra = REQUIRED.get(option, [])
    cfg = compose_cfg(select_override(option), *extra)
    rc = load_run_config(cfg)
    assert isinstance(rc, RunConfig)
    composed = OmegaConf.to_container(cfg, resolve=False)
    overridden = {o.split("=", 1)[0] for o in extra}
    package = package_of(option)
    for path, value in leaves(content).items():
        full = ".".join(p for p in (package, path) if p)
        if full in overridden or full.split(".")[0] == "hydra":  # hydra keys are Hydra's, not the run's
            continue
        assert lookup(composed, full) == value, full


@pytest.mark.parametrize("option", sorted(REQUIRED))
def test_required_values_fail_naming_the_key_when_absent(option: str):
    with pytest.raises(ConfigError, match=REQUIRED_KEY[option].replace(".", r"\.")):
        load(select_override(option))


def test_llama_names_a_hub_model_and_only_composes():
    """model=llama is the pretrained loader pointed at Llama 3.2 1B; nothing is downloaded here."""
    rc = load("model=llama")
    assert rc.model_name == "pretrained"
    assert rc.model.name_or_path == "meta-llama/Llama-3.2-1B"
    assert rc.model.dtype == "bfloat16"


def test_group_options_match_their_registries():
    """One yaml per registered objective / dataset / aux reward, and no yaml without a registry entry."""
    from prefopt.data import DATASETS
    from prefopt.engine.kl_estimators import KL_ESTIMATORS
    from prefopt.objectives import OBJECTIVES
    from prefopt.rewards import AUX_REWARDS

    def stems(group: str) -> set[str]:
        return {p.stem for p in (CONF / group).glob("*.yaml")}

    assert stems("objective") == set(OBJECTIVES)
    assert stems("kl") == set(KL_ESTIMATORS)
    assert stems("aux_reward") - {"none"} == set(AUX_REWARDS)
    assert {OmegaConf.load(p)["name"] for p in (CONF / "dataset").glob("*.yaml")} == set(DATASETS)


@pytest.mark.parametrize("option", [o for o in all_options() if o.startswith("hydra/")])
def test_hydra_launcher_and_help_options_compose(option: str):
    """conf/hydra/* are Hydra's own groups (launcher, help): they compose with the Hydra config."""
    cfg = compose_cfg(f"{option.rsplit('/', 1)[0]}={option.rsplit('/', 1)[1]}", hydra_config=True)
    node = OmegaConf.select(cfg, package_of(option))
    for path, value in leaves(hand_option(option)).items():
        assert lookup(OmegaConf.to_container(node, resolve=False), path) == value, path


def experiment_sweeps() -> list[tuple[str, str, str]]:
    """(experiment, key, value) for each value of each `hydra.sweeper.params` entry of each experiment."""
    parser = OverridesParser.create()
    cases = []
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        params = OmegaConf.load(path).get("hydra", {}).get("sweeper", {}).get("params", {}) or {}
        for key, values in params.items():
            override = parser.parse_override(f"{key}={values}")
            if not override.is_sweep_override():  # one value (e.g. seed: 0), set on every job
                cases.append((path.stem, key, str(values)))
                continue
            cases += [(path.stem, key, v) for v in override.sweep_string_iterator()]
    return cases


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_sweep_value_of_every_experiment_validates(experiment: str):
    """Each value an experiment sweeps over, one at a time, gives a valid run config. Group values are
    composed; scalar values are set on the composed config (what Hydra's override does for a leaf)."""
    cases = [(k, v) for e, k, v in experiment_sweeps() if e == experiment]
    groups = primary_defaults()
    base = compose_cfg(f"+experiment={experiment}")
    load_run_config(base)
    for key, value in cases:
        if key in groups:
            rc = load(f"+experiment={experiment}", f"{key}={value}")
            assert rc.raw[key]["name"] == hand_option(f"{key}/{value}")["name"]
        else:
            cfg = copy.deepcopy(base)
            parsed = OverridesParser.create().parse_override(f"{key}={value}").value()
            OmegaConf.update(cfg, key, parsed)  # struct: an unknown key fails, as in Hydra
            rc = load_run_config(cfg)
            assert OmegaConf.select(OmegaConf.create(rc.raw), key) == parsed


# ---- the strength knob -------------------------------------------------------------------------------

STRENGTH_FIELD = {
    "dpo": "beta",
    "ipo": "beta",
    "fdpo": "beta",
    "kto": "beta",
    "hpo": "beta",
    "expo": "lam",
    "expo_reg": "lam",
}


@pytest.mark.parametrize("objective", sorted(STRENGTH_FIELD))
def test_strength_sets_beta_or_lam_and_defaults_to_0_1(objective: str):
    field = STRENGTH_FIELD[objective]
    cfg = compose_cfg(f"objective={objective}", "strength=0.7")
    assert getattr(load_run_config(cfg).objective, field) == 0.7
    cfg.strength = None  # what `strength: null` in train.yaml gives when no sweep sets it
    assert getattr(load_run_config(cfg).objective, field) == 0.1


def test_strength_leaves_simpo_on_its_own_scale_and_an_explicit_value_wins():
    assert load().raw["strength"] is None  # no sweep: each objective's own default
    assert load("objective=simpo", "strength=0.7").objective.beta == 2.0
    assert load("objective=dpo", "strength=0.7", "objective.beta=0.3").objective.beta == 0.3


# ---- bad values fail fast, naming the key ------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["trainer.optimizer.lr=abc"], ["trainer.optimizer.lr"]),
        (["+objective.bta=1"], ["objective", "bta"]),
        (["trainer.batch_size=0"], ["trainer.batch_size"]),
        (["trainer.optimizer.lr=0"], ["trainer.optimizer.lr"]),
        (["dataset=preference"], ["dataset.path"]),
        (["aux_reward=length", "aux_reward.length.sign=abc"], ["aux_reward.length.sign"]),
        (["objective=expo", "kl.name=bogus"], ["kl.name", "bogus"]),
        (["objective=expo", "kl=samples", "kl.samples_per_prompt=0"], ["kl.samples_per_prompt"]),
        (["+bogus_top=1"], ["bogus_top"]),
        (["seed=abc"], ["seed"]),
        (["eval.eval_every_steps=0"], ["eval.eval_every_steps"]),
        (["eval.batch_size=0"], ["eval.batch_size"]),
        (["logger.name=wandbb"], ["logger.name", "wandb"]),
        (["logger.mode=ofline"], ["logger.mode", "offline"]),
        (["trainer.num_threads=0"], ["trainer.num_threads"]),
        (["dataset.reference_fit.lr=0"], ["dataset.reference_fit.lr"]),
        (
            ["dataset=preference", "dataset.path=org/pairs", "+dataset.reference_fit.enabled=true"],
            ["dataset.reference_fit.enabled"],
        ),
    ],
)
def test_bad_values_raise_a_config_error_naming_the_key(overrides: list[str], names: list[str]):
    with pytest.raises(ConfigError) as error:
        load(*overrides)
    for name in names:
        assert name in str(error.value)


def test_an_unknown_key_without_plus_is_refused_by_hydra_naming_it():
    """`objective.bta=1` (no `+`) is stopped by Hydra's struct check before the schema sees it."""
    with pytest.raises(Exception, match=r"objective\.bta"):
        compose_cfg("objective.bta=1")


def test_a_value_a_reward_schema_rejects_names_its_field():
    """aux_reward.length.sign=3 is an int (type check passes) that LengthConfig.__post_init__ rejects;
    the ConfigError must still name the key, as every other ConfigError does."""
    with pytest.raises(ConfigError) as error:
        load("aux_reward=length", "aux_reward.length.sign=3")
    assert "aux_reward.length.sign" in str(error.value)


# ---- aux reward selection ----------------------------------------------------------------------------


def test_a_list_of_aux_rewards_selects_each():
    rc = load("aux_reward=[readability,length]")
    assert set(rc.aux_reward) == {"readability", "length"}
    assert rc.aux_reward["length"] == hand_option("aux_reward/length")


def test_hpo_defaults_to_readability_and_an_explicit_choice_replaces_it():
    assert set(load("objective=hpo").aux_reward) == {"readability"}
    assert set(load("objective=hpo", "aux_reward=length").aux_reward) == {"length"}
    assert load("objective=dpo").aux_reward == {}


# ---- the CLI fails fast ------------------------------------------------------------------------------

CLI_CASES = {
    "unknown_objective": ["objective=nonexistent"],
    "unknown_kl": ["objective=expo", "kl=bogus"],
    "bad_lr": ["trainer.optimizer.lr=abc"],
    "help": ["--help"],
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, dict]:
    """`python -m prefopt train ...` from the repo root, run dirs in a temp dir, side by side in the
    background: started for the first test that asks for them (the CLI tests only), each one's output
    written to a file (a full pipe cannot stall it), and waited on through `finished`."""
    base = tmp_path_factory.mktemp("cli")
    env = {**os.environ, "PREFOPT_CACHE": str(base / "cache"), "WANDB_MODE": "disabled"}
    runs: dict[str, dict] = {}
    for name, args in CLI_CASES.items():
        run_dir = base / name
        extra = [] if args == ["--help"] else ["logger=none", f"hydra.run.dir={run_dir}"]
        command = [sys.executable, "-m", "prefopt", "train", *args, *extra]
        output = base / f"{name}.out"
        with open(output, "w") as sink:
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        runs[name] = {"run_dir": run_dir, "process": process, "output_file": output}
    yield runs
    for run in runs.values():
        if run["process"].poll() is None:
            run["process"].kill()
            run["process"].wait()


def finished(runs: dict[str, dict], name: str) -> dict:
    """The run once its process has ended: its exit code and its output (stdout and stderr)."""
    run = runs[name]
    run["rc"] = exit_code(run["process"], 300, f"`prefopt train` ({name}) to end")
    run["output"] = run["output_file"].read_text()
    return run


@pytest.mark.parametrize(
    ("case", "named"),
    [("unknown_objective", "nonexistent"), ("unknown_kl", "kl=bogus"), ("bad_lr", "trainer.optimizer.lr")],
)
def test_cli_bad_config_exits_nonzero_names_the_key_and_builds_nothing(cli_runs, case: str, named: str):
    """No model, data or metrics file is touched: the error comes from validation alone."""
    run = finished(cli_runs, case)
    assert run["rc"] != 0
    assert named in run["output"]
    assert "Traceback" not in run["output"]
    built = list(itertools.chain(run["run_dir"].rglob("checkpoint"), run["run_dir"].rglob("metrics.jsonl")))
    assert built == []


def test_an_unknown_kl_estimator_is_one_line_naming_the_kl_group(cli_runs):
    """`kl=bogus` is refused while the config composes, before any model loads, in one line."""
    run = finished(cli_runs, "unknown_kl")
    lines = [line for line in run["output"].splitlines() if line.strip()]
    assert run["rc"] != 0 and len(lines) == 1
    assert "kl=bogus" in lines[0] and "token" in lines[0]


def test_cli_help_lists_every_objective_and_group(cli_runs):
    from prefopt.objectives import OBJECTIVES

    run = finished(cli_runs, "help")
    assert run["rc"] == 0
    groups_section = run["output"].split("== Configuration groups ==")[1].split("==")[0]
    listed = {line.split(":")[0].strip() for line in groups_section.splitlines() if ":" in line}
    assert {"model", "dataset", "objective", "aux_reward", "trainer", "eval", "logger"} <= listed
    objectives_section = run["output"].split("== Objectives (objective=<name>) ==")[1].split("==")[0]
    assert {line.split()[0] for line in objectives_section.splitlines() if line.strip()} == set(OBJECTIVES)
    objectives_line = next(line for line in groups_section.splitlines() if line.startswith("objective:"))
    assert {o.strip() for o in objectives_line.split(":", 1)[1].split(",")} == set(OBJECTIVES)
