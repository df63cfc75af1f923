"""One schema: the dataclasses are the source of every default and allowed value, conf/ repeats them (with
the comments) and these tests keep the two equal; `prefopt.schema` is the one validation path, and its
errors name the key.

The rule for conf/: a group's base option lists every field of its dataclass with the dataclass's default
(`???` where the field is required; `${strength:D}` where a sweep's `strength` may set it, D the default),
and any other option sets only fields the dataclass has. The base option of a named group (model, dataset,
objective, kl, aux_reward) is the file named like its registry entry; of trainer, eval and logger, the option
conf/train.yaml selects.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from omegaconf import OmegaConf

from prefopt.config import (
    JUDGES,
    LOGGER_NAMES,
    EvalConfig,
    LLMJudgeConfig,
    LoggerConfig,
    OptimizerConfig,
    TrainerConfig,
)
from prefopt.config.kl import KL_CONFIGS
from prefopt.data import DATASETS
from prefopt.engine.kl_estimators import KL_ESTIMATORS
from prefopt.errors import ConfigError, ConfigFieldError
from prefopt.models import MODELS
from prefopt.objectives import OBJECTIVES
from prefopt.rewards import AUX_REWARDS, build_aux_reward, validate_aux_rewards
from prefopt.schema import Check, at_least, between, build, each, greater_than, one_of, optional, validate

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
REGISTRIES = {
    "model": MODELS,
    "dataset": DATASETS,
    "objective": OBJECTIVES,
    "kl": KL_ESTIMATORS,
    "aux_reward": AUX_REWARDS,
}
UNNAMED = {"trainer": TrainerConfig, "eval": EvalConfig, "logger": LoggerConfig}
# Where a base file may differ from its schema, and why.
BASE_EXCEPTIONS = {
    # an empty default: a schema default would merge into every mixture; the file gives HPO's mixture
    ("dataset", "mixture"): {"sources"},
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def selected(group: str) -> str:
    """The option conf/train.yaml's defaults list selects for `group`."""
    for entry in yaml.safe_load((CONF / "train.yaml").read_text())["defaults"]:
        if isinstance(entry, dict) and group in entry:
            return entry[group]
    raise KeyError(group)


def schema_and_node(group: str, option: str) -> tuple[type | None, dict]:
    """The dataclass an option file is checked against, and the file's fields (no `name`, no `defaults`)."""
    node = yaml.safe_load((CONF / group / f"{option}.yaml").read_text()) or {}
    node.pop("defaults", None)
    if group in UNNAMED:
        return UNNAMED[group], node
    if group == "aux_reward":  # `# @package aux_reward.<name>`: the file holds the fields
        return (AUX_REWARDS[option].config if option in AUX_REWARDS else None), node
    return REGISTRIES[group][node.pop("name")].config, node


def is_base(group: str, option: str) -> bool:
    if group in UNNAMED:
        return option == selected(group)
    return option in REGISTRIES[group]


def defaults(schema: type) -> dict:
    """The schema's defaults as yaml would write them (`???` for a required field)."""
    return OmegaConf.to_container(OmegaConf.structured(schema))


def differences(node: dict, expected: dict, exact: bool, prefix: str = "") -> list[str]:
    """Keys of `node` the schema lacks; with `exact`, also keys it lacks and values that differ."""
    out = [f"{prefix}{key}: not a field of the schema" for key in node if key not in expected]
    for key, default in expected.items():
        if key not in node:
            out += [f"{prefix}{key}: missing from the file"] if exact else []
            continue
        value = node[key]
        if isinstance(default, dict) and default and isinstance(value, dict):
            out += differences(value, default, exact, f"{prefix}{key}.")
        elif exact and value != default and value != f"${{strength:{default}}}":
            out.append(f"{prefix}{key}: file {value!r}, schema {default!r}")
    return out


GROUP_OPTIONS = [(g, o) for g in [*REGISTRIES, *UNNAMED] for o in options(g)]


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}/{o}" for g, o in GROUP_OPTIONS])
def test_every_option_file_agrees_with_its_dataclass(group: str, option: str):
    schema, node = schema_and_node(group, option)
    if schema is None:  # aux_reward/none: no reward, no fields
        assert node == {} and option == "none"
        return
    exact = is_base(group, option)
    problems = differences(node, defaults(schema), exact)
    allowed = BASE_EXCEPTIONS.get((group, option), set())
    problems = [p for p in problems if p.split(":")[0].split(".")[0] not in allowed]
    assert not problems, f"conf/{group}/{option}.yaml against {schema.__name__}: {problems}"


def test_every_registry_entry_has_a_base_option_file():
    for group, registry in REGISTRIES.items():
        bases = {o for o in options(group) if is_base(group, o)}
        assert set(registry) - {"none"} <= bases | {"none"}, group


def test_the_kl_schemas_are_the_estimators_own():
    """`prefopt.config.kl` (what the config layer validates) and the engine's estimators name the same
    estimators, each with its own schema."""
    assert {name: estimator.config for name, estimator in KL_ESTIMATORS.items()} == KL_CONFIGS


# ---- allowed values come from the registries --------------------------------------------------------------


def choices(check: Check) -> tuple:
    return tuple(check.choices())


def test_allowed_optimizers_are_the_optimizer_registry():
    from prefopt.optimizers import OPTIMIZERS

    assert choices(OptimizerConfig.checks["name"]) == tuple(OPTIMIZERS)


def test_logger_names_are_the_logger_options_and_judges_the_evaluations():
    from prefopt.evaluation.generation import JUDGES as GENERATION_JUDGES

    assert choices(LoggerConfig.checks["name"]) == LOGGER_NAMES
    names = {yaml.safe_load((CONF / "logger" / f"{o}.yaml").read_text())["name"] for o in options("logger")}
    assert names == set(LOGGER_NAMES)
    assert choices(EvalConfig().generation.checks["judge"]) == JUDGES == tuple(GENERATION_JUDGES)


def test_every_check_names_a_field_of_its_schema():
    import prefopt.config.schemas as schemas

    for schema in vars(schemas).values():
        if dataclasses.is_dataclass(schema) and "checks" in vars(schema):
            assert set(schema.checks) <= {f.name for f in dataclasses.fields(schema)}, schema.__name__


# ---- the one validation helper ----------------------------------------------------------------------------


@dataclasses.dataclass
class Inner:
    rate: float = 0.5
    checks: ClassVar[dict[str, Check]] = {"rate": between(0, 1, low_open=True)}


@dataclasses.dataclass
class Outer:
    steps: int = 1
    mode: str = "fast"
    flag: bool | str = "auto"
    limit: int | None = None
    names: list[str] = dataclasses.field(default_factory=lambda: ["a"])
    inner: Inner = dataclasses.field(default_factory=Inner)
    checks: ClassVar[dict[str, Check]] = {
        "steps": at_least(1),
        "mode": one_of("fast", "slow"),
        "flag": one_of("auto", True, False),
        "limit": optional(greater_than(0)),
        "names": each(one_of("a", "b")),
    }

    def __post_init__(self):
        if self.mode == "slow" and self.steps > 10:
            raise ConfigFieldError("steps", "at most 10 when mode=slow")


def error_of(node: dict, where: str = "grp") -> str:
    with pytest.raises(ConfigError) as error:
        validate(Outer, node, where)
    return str(error.value)


def test_validate_returns_the_typed_value():
    value = validate(Outer, {"steps": 3, "inner": {"rate": 1.0}, "limit": None}, "grp")
    assert value == Outer(steps=3, inner=Inner(rate=1.0))


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"steps": 0}, "grp.steps: invalid value 0; expected >= 1"),
        ({"mode": "fsat"}, "grp.mode: invalid value 'fsat'; expected fast | slow; did you mean fast?"),
        (
            {"flag": "autoo"},
            "grp.flag: invalid value 'autoo'; expected auto | true | false; did you mean auto?",
        ),
        ({"limit": 0}, "grp.limit: invalid value 0; expected null or > 0"),
        ({"names": ["a", "c"]}, "grp.names: invalid value ['a', 'c']; expected a | b"),
        ({"inner": {"rate": 0}}, "grp.inner.rate: invalid value 0.0; expected in (0, 1]"),
        ({"stepz": 1}, "grp.stepz: Key 'stepz' not in 'Outer'; did you mean grp.steps?"),
        ({"inner": {"rat": 1}}, "did you mean grp.inner.rate?"),
        ({"steps": "many"}, "grp.steps: Value 'many' of type 'str' could not be converted to Integer"),
        ({"mode": "slow", "steps": 11}, "grp.steps: at most 10 when mode=slow"),
    ],
)
def test_a_failure_is_one_config_error_naming_the_key(node: dict, message: str):
    assert message in error_of(node)


def test_one_of_does_not_take_1_for_true():
    assert one_of(True, False).ok(True) and not one_of(True, False).ok(1)
    assert not one_of("auto", True).ok(1.0)
    assert one_of(None, True, 0, "x").describe() == "null | true | 0 | x"


def test_build_names_the_field_inside_the_node_for_schemas_that_validate_a_sub_node():
    with pytest.raises(ConfigFieldError) as error:
        build(Outer, {"inner": {"rate": 2}})
    assert error.value.field == "inner.rate" and "in (0, 1]" in str(error.value)


def test_a_preflight_failure_names_its_key(tmp_path: Path):
    @dataclasses.dataclass
    class Local:
        path: str = "x"

        def preflight(self):
            raise ConfigFieldError("path", f"{self.path}: no such file")

    with pytest.raises(ConfigError, match=r"^here\.path: nowhere: no such file$"):
        validate(Local, {"path": "nowhere"}, "here")
    assert build(Local, {"path": "nowhere"}).path == "nowhere"  # build does not look at the machine
    assert validate(Local, {}, "here", preflight=False).path == "x"


def test_the_llm_judge_schema_checks_through_the_same_helper():
    with pytest.raises(
        ConfigError, match=r"^eval\.generation\.llm\.concurrency: invalid value 0; expected >= 1"
    ):
        validate(LLMJudgeConfig, {"concurrency": 0}, "eval.generation.llm")
    with pytest.raises(ConfigFieldError) as error:
        LLMJudgeConfig(deadline_s=0)  # built in Python: the same checks
    assert error.value.field == "deadline_s"


def test_a_mixture_source_error_names_its_key():
    from prefopt.data.mixture import MixtureConfig

    with pytest.raises(
        ConfigError, match=r"^dataset\.sources\.hh\.pth: .*did you mean dataset\.sources\.hh\.path\?"
    ):
        validate(MixtureConfig, {"sources": {"hh": {"name": "hh_rlhf", "pth": "x"}}}, "dataset")
    with pytest.raises(ConfigError, match=r"^dataset\.sources\.hh\.max_prompt_tokens: 0 is not >= 1"):
        validate(MixtureConfig, {"sources": {"hh": {"name": "hh_rlhf", "max_prompt_tokens": 0}}}, "dataset")


# ---- aux rewards are validated once ------------------------------------------------------------------------


def test_validated_aux_rewards_are_built_without_validating_again(monkeypatch):
    configs = validate_aux_rewards({"length": {"max_words": 4}})
    import prefopt.rewards as rewards

    def refuse(*args, **kwargs):
        raise AssertionError("validated twice")

    monkeypatch.setattr(rewards, "validate_config", refuse)
    reward = build_aux_reward(configs)
    assert reward(["", ""], ["one two", "one two three four five"]) == [0.5, 1.0]


def test_an_unknown_aux_reward_names_the_closest():
    with pytest.raises(
        ConfigError, match=r"^aux_reward\.lenght: unknown auxiliary reward; did you mean length\?"
    ):
        validate_aux_rewards({"lenght": {}})


# ---- the layering this schema relies on ------------------------------------------------------------------


def test_config_imports_no_evaluation_and_the_mixture_not_its_package():
    code = "import sys, prefopt.config; print([m for m in sys.modules if m.startswith('prefopt.evaluation')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
    tree = ast.parse((ROOT / "prefopt" / "data" / "mixture.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "prefopt.data" not in imported


@pytest.mark.parametrize(
    "path",
    ["prefopt/schema.py", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "prefopt/config").glob("*.py"))],
)
def test_schema_modules_stay_small(path: str):
    source = (ROOT / path).read_text()
    assert len(source.splitlines()) < 300, path
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef):
            assert node.end_lineno - node.lineno < 60, f"{path}: {node.name}"


def test_messages_name_keys_not_their_first_word():
    """A ConfigFieldError's `field` names the key, whatever its message starts with."""
    with pytest.raises(ConfigError) as error:
        validate(Outer, {"mode": "slow", "steps": 20}, "grp")
    assert re.match(r"grp\.steps: ", str(error.value))
