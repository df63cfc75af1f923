"""Command-line overrides read by Hydra's own parser and applied to a config dict as Hydra applies them,
for the commands that build their config from a saved one (`prefopt evaluate`) or read a sweep's jobs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from prefopt import CONF_DIR

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override


def parse_overrides(overrides: list[str]) -> list[Override]:
    """Hydra's `Override`s of `overrides`; a malformed or unsupported one is a one-line ConfigError naming
    it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from prefopt.errors import ConfigError

    parser, parsed = OverridesParser.create(), []
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except HydraException as error:
            raise ConfigError(f"override {text!r}: {parse_error(error)}") from None
        if not override.key_or_group:
            raise ConfigError(f"override {text!r}: no key before '='")
        if override.is_sweep_override():
            raise ConfigError(f"override {text!r}: a sweep; an evaluation takes one value")
        if override.package is not None:
            raise ConfigError(f"override {text!r}: a package (@) is not supported by prefopt evaluate")
        parsed.append(override)
    return parsed


def apply_override(config: DictConfig, override: Override) -> None:
    """`override` applied to `config` as Hydra applies it: `group=option` (a folder of conf/) sets that
    option's node; `key=value` changes an existing key, `+key=value` adds a new one, `++key=value` sets it
    either way and `~key` (or `~key=value`, when it has that value) deletes it. A ConfigError names it."""
    from omegaconf import open_dict

    from prefopt.errors import ConfigError

    key, text = override.key_or_group, override.input_line
    group = "." not in key and "/" not in key and (CONF_DIR / key).is_dir()
    value = _option(key, override) if group and override.value() is not None else override.value()
    path, _, name = key.rpartition(".")
    parent = OmegaConf.select(config, path, throw_on_missing=False) if path else config
    present = isinstance(parent, DictConfig) and name in list(parent)  # `in` skips a ??? key
    current = parent[name] if present and not OmegaConf.is_missing(parent, name) else None
    if override.is_delete():
        if not present:
            raise ConfigError(f"override {text!r}: no such key to delete")
        if value is not None and value != current:
            raise ConfigError(f"override {text!r}: {key} is {current}, not {value}")
        with open_dict(config):
            del parent[name]
    elif override.is_add() and current is not None and not isinstance(value, dict | list):
        raise ConfigError(f"override {text!r}: {key} is already set (write +{text} to replace it)")
    elif not present and not (override.is_add() or override.is_force_add()):
        raise ConfigError(f"override {text!r}: no such key (to add a new one, write +{text})")
    else:
        OmegaConf.update(config, key, value, merge=not group, force_add=True)


def _option(group: str, override: Override) -> DictConfig:
    """The node of `group=option`: conf/<group>/<option>.yaml."""
    from prefopt.errors import ConfigError

    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    name = override.value()
    if not isinstance(name, str) or name not in options:
        raise ConfigError(f"override {override.input_line!r}: no such option (options: {', '.join(options)})")
    return OmegaConf.load(CONF_DIR / group / f"{name}.yaml")


def parse_error(error: Exception) -> str:
    """The line of a Hydra override-parser error that says what is wrong (without its header and link)."""
    lines = [line.strip() for line in str(error).splitlines()]
    skip = ("Error parsing override", "See https://", "^")
    return next((line for line in lines if line and not line.startswith(skip)), "cannot be parsed")
