"""Typed run configuration: the schemas (`schemas`) and `load_run_config` (`loading`), where the composed
`DictConfig` stops. Validation itself is `prefopt.schema`."""

from prefopt.config.loading import KNOWN_TOP_LEVEL, RunConfig, load_run_config, register_resolvers
from prefopt.config.schemas import (
    DEFAULT_TEMPLATE,
    JUDGES,
    LOGGER_MODES,
    LOGGER_NAMES,
    ConvergenceConfig,
    EvalConfig,
    GenerationConfig,
    LLMJudgeConfig,
    LoggerConfig,
    ReferenceFitConfig,
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
    "ConfigError",
    "ConfigFieldError",
    "ConvergenceConfig",
    "EvalConfig",
    "GenerationConfig",
    "LLMJudgeConfig",
    "LoggerConfig",
    "MissingPathError",
    "ReferenceFitConfig",
    "RunConfig",
    "TrainerConfig",
    "did_you_mean",
    "load_run_config",
    "register_resolvers",
]
