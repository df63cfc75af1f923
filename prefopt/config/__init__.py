"""Typed run configuration: the schemas (`schemas`), `load_run_config` (`loading`), where the composed
`DictConfig` stops, and the keys that moved in the trainer's split (`aliases`). Validation itself is
`prefopt.schema`."""

from prefopt.config.loading import KNOWN_TOP_LEVEL, RunConfig, load_run_config, register_resolvers
from prefopt.config.schemas import (
    DEFAULT_TEMPLATE,
    JUDGES,
    LOGGER_MODES,
    LOGGER_NAMES,
    CheckpointConfig,
    ConvergenceConfig,
    DistributedConfig,
    EvalConfig,
    GenerationConfig,
    LayoutConfig,
    LLMJudgeConfig,
    LoggerConfig,
    OptimizerConfig,
    TrainerConfig,
)
from prefopt.errors import ConfigError, ConfigFieldError, MissingPathError
from prefopt.schema import did_you_mean

__all__ = [
    "DEFAULT_TEMPLATE",
    "JUDGES",
    "KNOWN_TOP_LEVEL",
    "LOGGER_MODES",
    "LOGGER_NAMES",
    "CheckpointConfig",
    "ConfigError",
    "ConfigFieldError",
    "ConvergenceConfig",
    "DistributedConfig",
    "EvalConfig",
    "GenerationConfig",
    "LLMJudgeConfig",
    "LayoutConfig",
    "LoggerConfig",
    "MissingPathError",
    "OptimizerConfig",
    "RunConfig",
    "TrainerConfig",
    "did_you_mean",
    "load_run_config",
    "register_resolvers",
]
