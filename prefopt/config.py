"""Typed run configuration: the composed `DictConfig` stops here.

`load_run_config` resolves interpolations, checks every group against its dataclass schema and returns a
`RunConfig`, failing fast (before any model is built) with an error that names the bad key.
"""

from __future__ import annotations

import difflib
import signal
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from prefopt.errors import ConfigError, ConfigFieldError, MissingPathError  # noqa: F401 (re-exported)


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
class ReferenceFitConfig:
    enabled: bool | None = None  # None: only when the policy starts from the embedded model's random init
    max_steps: int = 600  # loss evaluations fitting the policy to the task's reference distribution
    lr: float = 3e-3  # AdamW learning rate of the supervised phase (L-BFGS takes over if Adam stalls)
    target_kl: float = 0.003  # stop early once KL(pi_ref || pi_theta0) over the candidates is below this
    max_kl: float = 0.05  # refuse to start preference training when the fit ends above this
    cache: bool = True  # reuse a fitted reference across runs with the same model, task, fit and seed


@dataclass
class TrainerConfig:
    max_steps: int = 200  # optimizer steps
    epochs: float | None = None  # passes over the train pairs; when set, it decides max_steps
    optimizer: str = "adamw"  # adamw | rmsprop
    batch_size: int = 32  # preference pairs per optimizer step (a smaller dataset gives full-batch steps)
    micro_batch_size: int | None = None  # pairs per forward pass; None: the whole batch (no accumulation)
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_schedule: str = "cosine"  # any transformers scheduler name: constant_with_warmup | linear | cosine
    warmup_steps: int = 10  # linear warm-up steps before the schedule
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; None: no clipping
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    num_threads: int = 1  # CPU threads; fixed, so a job gives the same numbers in a sweep and alone
    logps_chunk_tokens: int = 256  # response tokens per lm_head chunk, so full (N, V) logits never coexist
    packing: bool | str = "auto"  # auto (pack where the model keeps sequences apart, else pad) | true | false
    pack_tokens: int | None = None  # tokens per packed row; None: the micro-batch's longest sequence
    share_prompts: bool = True  # packed: a prompt computed once for all its responses, where sdpa allows
    reference_cache: bool = True  # reuse reference log-probs across runs (same weights, tokenizer, tokens)
    log_every_steps: int = 10
    value_head_lr: float = 1e-3  # learning rate of a loop-owned value head (HPO)
    value_head_width: int = 128  # hidden width of that head
    save_checkpoint: bool = True  # Hugging Face checkpoint of the final policy in <run dir>/checkpoint
    checkpoint_every_steps: int | None = 100  # checkpoint period (and last step); null: preemption only
    keep_last_checkpoints: int = 2  # training-state checkpoints kept in <run dir>/checkpoints
    resume: str | None = None  # auto (newest intact checkpoint in the run dir) | a checkpoint or run dir path
    resume_allow_changes: list[str] = field(
        default_factory=lambda: [
            "trainer.max_steps",
            "trainer.checkpoint_every_steps",
            "trainer.strategy",
            "logger",
        ]
    )  # config keys (or prefixes) a resumed run may change
    max_bad_steps: int = 5  # consecutive non-finite loss or gradient steps (each skipped) that stop the run
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    strategy: str = "auto"  # under torchrun: fsdp (FSDP2) | ddp | single; auto: fsdp with several processes
    compile: bool = False  # torch.compile the decoder (dynamic shapes)
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward: less memory, more time
    fused_optimizer: bool | None = None  # fused AdamW kernel; None: on CUDA and CPU
    param_dtype: str | None = None  # FSDP2 compute weights (bfloat16) over fp32 master shards; None: as is
    reference_fit: ReferenceFitConfig = field(default_factory=ReferenceFitConfig)


@dataclass
class ConvergenceConfig:
    """When a run counts as converged (see `prefopt.evaluation.convergence`)."""

    loss_rtol: float = 0.01  # max share of the run's loss change made in its last tenth of steps
    grad_norm_ratio: float = 0.01  # max final gradient norm as a share of the run's largest one (full batch)


@dataclass
class GenerationConfig:
    """Generation-based evaluation at the end of a run (see `prefopt.evaluation.generation`)."""

    num_prompts: int = 64  # distinct held-out prompts
    num_samples: int = 1  # responses per prompt and model
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    batch_size: int = 16  # prompts per generate call
    judge: str = "reward"  # reward (the oracle, else the aux reward R) | llm (an OpenAI-compatible endpoint)
    llm: dict = field(default_factory=dict)  # the LLM judge's options (base_url, model, api_key_env, ...)
    toxicity_threshold: float = 0.5  # a sample is a violation when its max toxicity probability is above


@dataclass
class EvalConfig:
    eval_every_steps: int = 50  # held-out evaluation period in optimizer steps (and always at the end)
    at_start: bool = True  # also evaluate before training: the reference's own numbers
    batch_size: int = 512  # pairs per evaluation forward pass
    convergence: ConvergenceConfig = field(default_factory=ConvergenceConfig)
    generate: bool = False  # sample from the policy and the reference at the end, score and judge them
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    project: str = "prefopt"
    entity: str | None = None
    group: str | None = None  # None: the sweep's name in a multirun, no group otherwise
    tags: list[str] = field(default_factory=list)
    run_name: str | None = None  # None: objective and overrides
    mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled


LOGGER_NAMES = ("wandb", "none")
LOGGER_MODES = ("auto", "online", "offline", "disabled")


def did_you_mean(word: str, choices: Any, prefix: str = "") -> str:
    """A hint naming the closest of `choices` ("; did you mean <prefix>X?"), or "" when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _schema_merge(schema: type, node: Any, where: str) -> Any:
    """Merge `node` into the dataclass `schema`, turning OmegaConf errors into ones naming `where.key`.

    A schema's `preflight()`, when it has one, then checks what the config names on this machine (a local
    file or directory exists, ...) without loading anything; it runs here, not when Python builds one."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        value = OmegaConf.to_object(merged)
        if hasattr(value, "preflight"):
            value.preflight()
        return value
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        message = str(error).splitlines()[0]
        if isinstance(error, ConfigKeyError) and key.split(".")[-1] not in schema.__dataclass_fields__:
            message += did_you_mean(key, schema.__dataclass_fields__, f"{where}.")
        raise ConfigError(f"{where}.{key}: {message}") from None
    except (TypeError, ValueError) as error:  # a schema's own check; name its field when it says which
        field_name, message = getattr(error, "field", None), str(error)
        words = message.split(maxsplit=1)
        if field_name is None and len(words) == 2 and words[0] in schema.__dataclass_fields__:
            field_name, message = words  # "beta must be > 0, got 0" names its field in its first word
        key = f"{where}.{field_name}" if field_name else where
        named = message.startswith((f"{key}=", f"{key}:"))  # the message names its key already
        raise ConfigError(message if named else f"{key}: {message}") from None


def _named(node: Any, where: str, registry: dict[str, Any], schema_of=lambda entry: entry.config) -> tuple:
    """Validate a `{name: ..., **options}` group node against the schema its name selects."""
    options = dict(node)
    name = options.pop("name", None)
    if name not in registry:
        hint = did_you_mean(name, registry)
        raise ConfigError(f"{where}.name: unknown {where} {name!r}{hint} (one of {sorted(registry)})")
    return name, _schema_merge(schema_of(registry[name]), options, where)


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
    aux_reward: dict[str, dict]
    trainer: TrainerConfig
    eval: EvalConfig
    logger: LoggerConfig
    raw: dict  # the fully resolved config, for logging and the run dir


KNOWN_TOP_LEVEL = {"seed", "strength", "model", "dataset", "objective", "aux_reward", "trainer", "eval"}
KNOWN_TOP_LEVEL |= {"logger", "report", "experiment", "hydra", "paths"}


def load_run_config(cfg: DictConfig) -> RunConfig:
    """Resolve and validate a composed config; raises ConfigError naming the first bad key."""
    from prefopt.data import DATASETS
    from prefopt.models import MODELS
    from prefopt.objectives import OBJECTIVES
    from prefopt.rewards import AUX_REWARDS

    register_resolvers()
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
    model_name, model = _named(raw["model"], "model", MODELS)
    dataset_name, dataset = _named(raw["dataset"], "dataset", DATASETS)
    objective_name, objective = _named(raw["objective"], "objective", OBJECTIVES)
    aux_reward = raw.get("aux_reward") or {}
    for name, options in aux_reward.items():
        if name not in AUX_REWARDS:
            hint = did_you_mean(name, AUX_REWARDS)
            raise ConfigError(f"aux_reward.{name}: unknown reward{hint} (one of {sorted(AUX_REWARDS)})")
        _schema_merge(AUX_REWARDS[name].config, options, f"aux_reward.{name}")
    if objective.requirements().aux_reward and not aux_reward:
        raise ConfigError(
            f"aux_reward: objective={objective_name} needs an auxiliary reward and none is configured; "
            f"set aux_reward=<name> (one of {sorted(AUX_REWARDS)})"
        )
    trainer = _schema_merge(TrainerConfig, raw["trainer"], "trainer")
    _check_trainer(trainer)
    evaluation = _schema_merge(EvalConfig, raw["eval"], "eval")
    logger = _schema_merge(LoggerConfig, raw["logger"], "logger")
    _check(
        "eval",
        evaluation,
        {
            "eval_every_steps": evaluation.eval_every_steps >= 1,
            "batch_size": evaluation.batch_size >= 1,
            "convergence.loss_rtol": evaluation.convergence.loss_rtol > 0,
            "convergence.grad_norm_ratio": evaluation.convergence.grad_norm_ratio > 0,
            "generation.num_prompts": evaluation.generation.num_prompts >= 1,
            "generation.num_samples": evaluation.generation.num_samples >= 1,
            "generation.max_new_tokens": evaluation.generation.max_new_tokens >= 1,
            "generation.temperature": evaluation.generation.temperature >= 0,
            "generation.top_p": 0 < evaluation.generation.top_p <= 1,
            "generation.batch_size": evaluation.generation.batch_size >= 1,
            "generation.judge": evaluation.generation.judge in ("reward", "llm"),
            "generation.toxicity_threshold": 0 < evaluation.generation.toxicity_threshold < 1,
        },
        {
            "eval_every_steps": "an integer >= 1 (evaluation also runs at the end)",
            "generation.judge": "reward | llm",
        },
    )
    if evaluation.generation.judge == "llm":  # the judge's own schema, before any model loads
        from prefopt.evaluation.judges import LLMJudgeConfig

        _schema_merge(LLMJudgeConfig, evaluation.generation.llm, "eval.generation.llm")
    _check(
        "logger",
        logger,
        {"name": logger.name in LOGGER_NAMES, "mode": logger.mode in LOGGER_MODES},
        {"name": f"one of {list(LOGGER_NAMES)}", "mode": f"one of {list(LOGGER_MODES)}"},
    )
    if trainer.reference_fit.enabled and not DATASETS[dataset_name].ground_truth:
        raise ConfigError(
            f"trainer.reference_fit.enabled: dataset={dataset_name} defines no reference distribution to fit "
            "(only tasks with a known pi_ref do, e.g. dataset=synthetic)"
        )
    return RunConfig(
        seed=raw["seed"],
        model_name=model_name,
        model=model,
        dataset_name=dataset_name,
        dataset=dataset,
        objective_name=objective_name,
        objective=objective,
        aux_reward=aux_reward,
        trainer=trainer,
        eval=evaluation,
        logger=logger,
        raw=raw,
    )


def _check(where: str, node: Any, checks: dict[str, bool], expected: dict[str, str] | None = None) -> None:
    """Raise a ConfigError naming the first failing `where.<key>`, with what the key accepts."""
    for key, ok in checks.items():
        if not ok:
            value = node
            for part in key.split("."):
                value = getattr(value, part)
            hint = f"; expected {expected[key]}" if expected and key in expected else ""
            raise ConfigError(f"{where}.{key}: invalid value {value!r}{hint}")


_SIGNALS = {s.name for s in signal.Signals}


def _check_trainer(trainer: TrainerConfig) -> None:
    checks = {
        "max_steps": trainer.max_steps >= 0,
        "batch_size": trainer.batch_size >= 1,
        "micro_batch_size": trainer.micro_batch_size is None or trainer.micro_batch_size >= 1,
        "lr": trainer.lr > 0,
        "precision": trainer.precision in {"auto", "fp32", "bf16"},
        "logps_chunk_tokens": trainer.logps_chunk_tokens >= 1,
        "packing": trainer.packing in (True, False) or trainer.packing == "auto",
        "pack_tokens": trainer.pack_tokens is None or trainer.pack_tokens >= 1,
        "log_every_steps": trainer.log_every_steps >= 1,
        "num_threads": trainer.num_threads >= 1,
        "epochs": trainer.epochs is None or trainer.epochs > 0,
        "optimizer": trainer.optimizer in ("adamw", "rmsprop"),
        "reference_fit.max_steps": trainer.reference_fit.max_steps >= 0,
        "reference_fit.lr": trainer.reference_fit.lr > 0,
        "checkpoint_every_steps": trainer.checkpoint_every_steps is None
        or trainer.checkpoint_every_steps >= 1,
        "keep_last_checkpoints": trainer.keep_last_checkpoints >= 1,
        "max_bad_steps": trainer.max_bad_steps >= 1,
        "preemption_signals": all(name in _SIGNALS for name in trainer.preemption_signals),
        "strategy": trainer.strategy in ("auto", "fsdp", "ddp", "single"),
        "param_dtype": trainer.param_dtype in (None, "bfloat16", "float16")
        and (trainer.param_dtype is None or trainer.strategy in ("fsdp", "auto")),
    }
    expected = {"precision": "auto | fp32 | bf16", "optimizer": "adamw | rmsprop"}
    expected["packing"] = "auto | true | false"
    expected["param_dtype"] = "null, or bfloat16 | float16 with trainer=fsdp (FSDP2 mixed precision)"
    _check("trainer", trainer, checks, expected)
