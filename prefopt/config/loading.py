"""`load_run_config`: the composed `DictConfig` stops here.

It resolves interpolations, checks every group against its dataclass schema (through `prefopt.schema`) and
returns a `RunConfig`, failing fast (before any model is built) with an error that names the bad key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from prefopt.config.kl import KL_CONFIGS
from prefopt.config.schemas import EvalConfig, LLMJudgeConfig, LoggerConfig, TrainerConfig
from prefopt.errors import ConfigError
from prefopt.schema import did_you_mean, validate


def register_resolvers() -> None:
    """`${strength:D}`: the top-level `strength` when a sweep sets it, else the objective's own default D."""
    if not OmegaConf.has_resolver("strength"):

        def strength(default: float, *, _root_: DictConfig) -> float:
            value = _root_.get("strength")
            return default if value is None else value

        OmegaConf.register_new_resolver("strength", strength)
    if not OmegaConf.has_resolver("objective_help"):
        OmegaConf.register_new_resolver("objective_help", _objective_help)


def _objective_help() -> str:
    """One line per registered objective, for `prefopt train --help`."""
    from prefopt.objectives import OBJECTIVES

    return "\n".join(f"{name:<9} {spec.description}" for name, spec in OBJECTIVES.items())


@dataclass
class RunConfig:
    """Everything a run needs, typed. Built objects come from these values, never from the DictConfig."""

    seed: int
    model_name: str
    model: Any
    dataset_name: str
    dataset: Any
    objective_name: str
    objective: Any
    kl_name: str  # the KL_ESTIMATORS entry the `kl` group names; read only when the objective needs a KL
    kl: Any  # that estimator's validated options (e.g. samples_per_prompt)
    aux_reward: dict[str, dict]  # name -> its options as written (resolved), for logs and resume checks
    trainer: TrainerConfig
    eval: EvalConfig
    logger: LoggerConfig
    raw: dict  # the fully resolved config, for logging and the run dir
    aux_reward_configs: dict[str, Any] = field(default_factory=dict)  # name -> its validated RewardConfig


KNOWN_TOP_LEVEL = {"seed", "strength", "model", "dataset", "objective", "kl", "aux_reward", "trainer", "eval"}
KNOWN_TOP_LEVEL |= {"logger", "report", "experiment", "hydra", "paths"}


def load_run_config(cfg: DictConfig) -> RunConfig:
    """Resolve and validate a composed config; raises ConfigError naming the first bad key."""
    from prefopt.data import DATASETS
    from prefopt.models import MODELS
    from prefopt.objectives import OBJECTIVES
    from prefopt.rewards import AUX_REWARDS, validate_aux_rewards

    register_resolvers()
    raw = _resolved(cfg)
    model_name, model = _named(raw["model"], "model", MODELS)
    _check_reference_fit(raw["dataset"], DATASETS)
    dataset_name, dataset = _named(raw["dataset"], "dataset", DATASETS)
    objective_name, objective = _named(raw["objective"], "objective", OBJECTIVES)
    kl_name, kl = _named(raw.get("kl", {"name": "exact"}), "kl", KL_CONFIGS, schema_of=lambda schema: schema)
    aux_reward = raw.get("aux_reward") or {}
    aux_reward_configs = validate_aux_rewards(aux_reward)
    if objective.requirements().aux_reward and not aux_reward:
        raise ConfigError(
            f"aux_reward: objective={objective_name} needs an auxiliary reward and none is configured; "
            f"set aux_reward=<name> (one of {sorted(AUX_REWARDS)})"
        )
    trainer = validate(TrainerConfig, raw["trainer"], "trainer")
    evaluation = validate(EvalConfig, raw["eval"], "eval")
    if evaluation.generation.judge == "llm":  # the judge's own schema, before any model loads
        validate(LLMJudgeConfig, evaluation.generation.llm, "eval.generation.llm")
    logger = validate(LoggerConfig, raw["logger"], "logger")
    return RunConfig(
        seed=raw["seed"],
        model_name=model_name,
        model=model,
        dataset_name=dataset_name,
        dataset=dataset,
        objective_name=objective_name,
        objective=objective,
        kl_name=kl_name,
        kl=kl,
        aux_reward=aux_reward,
        trainer=trainer,
        eval=evaluation,
        logger=logger,
        raw=raw,
        aux_reward_configs=aux_reward_configs,
    )


def _check_reference_fit(node: dict, datasets: dict) -> None:
    """`+dataset.reference_fit...` on a dataset whose schema has no reference fit (no pi_ref to fit to): one
    error saying so, rather than an unknown key."""
    spec = datasets.get(node.get("name"))
    if "reference_fit" not in node or spec is None or "reference_fit" in spec.config.__dataclass_fields__:
        return
    key = "dataset.reference_fit" + (".enabled" if "enabled" in _keys(node["reference_fit"]) else "")
    raise ConfigError(
        f"{key}: dataset={node['name']} defines no reference distribution to fit "
        "(only tasks with a known pi_ref do, e.g. dataset=synthetic)"
    )


def _keys(node: Any) -> list:
    return list(node) if isinstance(node, dict) else []


def _resolved(cfg: DictConfig) -> dict:
    """The config as plain containers, interpolations resolved; only known top-level keys, an int seed."""
    try:
        raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        raise ConfigError(f"{key}: {str(error).splitlines()[0]}") from None
    unknown = sorted(set(raw) - KNOWN_TOP_LEVEL)
    if unknown:
        hint = did_you_mean(unknown[0], KNOWN_TOP_LEVEL)
        raise ConfigError(f"{unknown[0]}: unknown top-level key{hint} (known: {sorted(KNOWN_TOP_LEVEL)})")
    if not isinstance(raw.get("seed"), int):
        raise ConfigError(f"seed: expected an integer, got {raw.get('seed')!r}")
    return raw


def _named(node: Any, where: str, registry: dict[str, Any], schema_of=lambda entry: entry.config) -> tuple:
    """Validate a `{name: ..., **options}` group node against the schema (`.config`) its name selects."""
    options = dict(node)
    name = options.pop("name", None)
    if name not in registry:
        hint = did_you_mean(name, registry)
        raise ConfigError(f"{where}.name: unknown {where} {name!r}{hint} (one of {sorted(registry)})")
    return name, validate(schema_of(registry[name]), options, where)
