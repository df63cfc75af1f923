"""The errors every layer raises (a leaf: it imports nothing of prefopt). A `ConfigError` is a bad config or
input the CLI prints as one line (exit 2); the others are raised by a part's own check and mapped to the
config key they name."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type; the message names the key."""


class ConfigFieldError(ValueError):
    """A schema's `__post_init__` rejects a value; `field` names it so the error can give the config key."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class MissingPathError(ConfigFieldError, FileNotFoundError):
    """A local file or directory the config names does not exist."""


class DataError(ConfigError):
    """A data file cannot be read, or a split gives no usable pairs; one line naming the file and the line
    (a ConfigError: the CLI prints it as one line and exits 2)."""
