"""The one way a config node becomes a typed value: merged into its dataclass schema, checked, and every
failure raised as one error naming its key.

A schema is a dataclass. Its fields give the types and defaults (OmegaConf.structured checks types and
refuses unknown keys); its `checks` class attribute gives declarative constraints on values, e.g.

    checks: ClassVar[dict[str, Check]] = {"batch_size": at_least(1), "precision": one_of("auto", "fp32")}

and its `__post_init__` may raise `ConfigFieldError(field, message)` for what a constraint cannot say (one
field against another). A nested dataclass field is checked with its own `checks`. `preflight()`, when the
schema has one, checks what the config names on this machine (a local path exists) without loading it.

`build` gives the value or a ConfigFieldError whose `field` is the dotted key inside the node (for schemas
that validate a sub-node themselves, like a dataset mixture's sources); `validate` adds the preflight and
turns any failure into a `ConfigError("<where>.<key>: ...")`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from prefopt.errors import ConfigError, ConfigFieldError


def did_you_mean(word: Any, choices: Iterable[Any], prefix: str = "") -> str:
    """A hint naming the closest of `choices` ("; did you mean <prefix>X?"), or "" when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def show(value: Any) -> str:
    """A value as a user writes it in yaml or an override: null, true, false, else str."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class Check:
    """A constraint on one field's value: `ok(value)`, and what the field accepts, for the message."""

    ok: Callable[[Any], bool]
    expected: str = ""  # in words; "" for one_of: its choices, read when the message is made
    choices: Callable[[], tuple] | None = None  # the allowed values, for "did you mean"

    def describe(self) -> str:
        return self.expected or " | ".join(show(c) for c in self.choices())

    def error(self, value: Any) -> str | None:
        """None when `value` passes, else the message (without the key)."""
        if self.ok(value):
            return None
        hint = did_you_mean(value, self.choices()) if self.choices and isinstance(value, str) else ""
        return f"invalid value {value!r}; expected {self.describe()}{hint}"


def at_least(low: float) -> Check:
    return Check(lambda v: v >= low, f">= {low}")


def greater_than(low: float) -> Check:
    return Check(lambda v: v > low, f"> {low}")


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    """low <= v <= high, either end open: between(0, 1, low_open=True) is (0, 1]."""

    def ok(v: Any) -> bool:
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    return Check(ok, f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def one_of(*choices: Any, source: Callable[[], Iterable[Any]] | None = None) -> Check:
    """The value is one of `choices`, or of the keys of the registry `source()` returns (looked up when
    checked, so a schema can name a registry that lives in a module it must not import)."""

    def allowed() -> tuple:
        return tuple(source()) if source is not None else choices

    def ok(v: Any) -> bool:
        return any(v is c or (type(v) is type(c) and v == c) for c in allowed())  # 1 is not true

    return Check(ok, "", allowed)


def optional(check: Check) -> Check:
    """None (null) passes; anything else must pass `check`."""
    if check.choices:
        return Check(lambda v: v is None or check.ok(v), "", lambda: (None, *check.choices()))
    return Check(lambda v: v is None or check.ok(v), f"null or {check.expected}")


def each(check: Check, expected: str = "") -> Check:
    """Every item of a list passes `check`; `expected` says so in words (default: what an item accepts)."""
    return Check(lambda v: all(check.ok(x) for x in v), expected or check.expected, check.choices)


def run_checks(value: Any, prefix: str = "") -> None:
    """The dataclass `value`'s `checks`, then those of its nested dataclass fields; the first failure is a
    ConfigFieldError naming the dotted field."""
    for key, check in getattr(type(value), "checks", {}).items():
        problem = check.error(getattr(value, key))
        if problem is not None:
            raise ConfigFieldError(prefix + key, problem)
    for item in dataclasses.fields(value):
        nested = getattr(value, item.name)
        if dataclasses.is_dataclass(nested) and not isinstance(nested, type):
            run_checks(nested, f"{prefix}{item.name}.")


def build(schema: type, node: Any, where: str = "") -> Any:
    """`node` merged into `schema` and checked; a failure is a ConfigFieldError naming the dotted field
    inside the node (`where` only prefixes the "did you mean" of an unknown key)."""
    try:
        value = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node or {}))
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or ""
        message = str(error).splitlines()[0]
        if isinstance(error, ConfigKeyError) and key:
            message += _key_hint(schema, key, f"{where}." if where else "")
        raise ConfigFieldError(key, message) from None
    except (ConfigFieldError, ConfigError):
        raise
    except (TypeError, ValueError) as error:
        raise _legacy_field_error(schema, error) from None
    run_checks(value)
    return value


def validate(schema: type, node: Any, where: str, *, preflight: bool = True) -> Any:
    """`build`, then the schema's `preflight()`; any failure is a ConfigError "<where>.<key>: message"."""
    try:
        value = build(schema, node, where)
        if preflight and hasattr(value, "preflight"):
            value.preflight()
        return value
    except ConfigFieldError as error:
        raise config_error(where, error.field, str(error)) from None
    except (TypeError, ValueError) as error:
        field_error = _legacy_field_error(schema, error)
        raise config_error(where, field_error.field, str(field_error)) from None


def config_error(where: str, field: str, message: str) -> ConfigError:
    """ConfigError("<where>.<field>: message"), or the message alone when it names its key already."""
    key = f"{where}.{field}" if field else where
    named = message.startswith((f"{key}=", f"{key}:"))
    return ConfigError(message if named else f"{key}: {message}")


def _key_hint(schema: type, key: str, prefix: str) -> str:
    """ "; did you mean <prefix>parent.close?" for an unknown dotted `key` of `schema`, or ""."""
    *parents, last = key.split(".")
    node = OmegaConf.structured(schema)
    for part in parents:
        node = node.get(part) if OmegaConf.is_dict(node) else None
    if not OmegaConf.is_dict(node) or last in node:
        return ""
    return did_you_mean(last, list(node.keys()), prefix + "".join(f"{p}." for p in parents))


def _legacy_field_error(schema: type, error: Exception) -> ConfigFieldError:
    """A plain ValueError/TypeError from a schema's own check. Its field is read from its first word when
    that is a field ("beta must be > 0"); the schemas that still do this (prefopt/objectives: dpo, ipo,
    fdpo, simpo, kto, expo, hpo) should raise ConfigFieldError, and then this goes."""
    field = getattr(error, "field", None)
    message = str(error)
    words = message.split(maxsplit=1)
    if field is None and len(words) == 2 and words[0] in getattr(schema, "__dataclass_fields__", {}):
        field, message = words
    return ConfigFieldError(field or "", message)
