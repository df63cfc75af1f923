"""A user's own reward function, named by import path in the config, and the project's one allowlist helper.

Config strings are never evaluated: `resolve_callable` imports a module whose name starts with an allowed
prefix and looks an attribute up in it, nothing more. The callable found must be defined under an allowed
prefix too, so an allowed module cannot hand out what it imported (`os.system`, prefopt's training loop).
The default allowlist is prefopt's own rewards and a `user_rewards` package: never prefopt.training.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from prefopt.errors import ConfigFieldError
from prefopt.rewards.base import AuxReward, RewardConfig, RewardFn


def _is_allowed(module: str, allowed_prefixes: Sequence[str]) -> bool:
    # A prefix names a package: "user_rewards." allows user_rewards and user_rewards.x, not user_rewards_x.
    packages = [p.rstrip(".") for p in allowed_prefixes if p.rstrip(".")]
    return any(module == p or module.startswith(p + ".") for p in packages)


def _split(path: str) -> tuple[str, str, str]:
    """(module, separator, attribute) of "package.module:function" or "package.module.function"."""
    return path.partition(":") if ":" in path else path.rpartition(".")


def resolve_callable(path: str, allowed_prefixes: Sequence[str]) -> Callable:
    """Returns the callable at `path`, "package.module:function" or "package.module.function".

    The module must lie under one of `allowed_prefixes` (checked before anything is imported), and so must
    the module that defines the callable. Raises ValueError for a malformed or disallowed path (a private
    `_name` included), ImportError for a missing module, AttributeError for a missing attribute and
    TypeError when the attribute is not callable.
    """
    module, sep, attribute = _split(path)
    names = module.split(".") + attribute.split(".")
    if not sep or not all(n.isidentifier() for n in names):
        raise ValueError(f"{path!r} is not an import path like 'package.module:function'")
    if any(n.startswith("_") for n in attribute.split(".")):
        raise ValueError(f"{path!r}: private names (_...) are not resolved")
    if not _is_allowed(module, allowed_prefixes):
        raise ValueError(
            f"{path!r} is not allowed: module {module!r} is outside the allowlist {list(allowed_prefixes)}; "
            "add its package to the allowed prefixes"
        )
    try:
        target = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            raise ImportError(f"{path!r}: no module named {module!r}") from e
        raise  # the module exists but one of its own imports is missing
    for name in attribute.split("."):
        if not hasattr(target, name):
            raise AttributeError(f"{path!r}: {module!r} has no attribute {attribute!r}")
        target = getattr(target, name)
    if not callable(target):
        raise TypeError(f"{path!r} is a {type(target).__name__}, not a callable")
    defined_in = getattr(target, "__module__", None) or "?"
    if not _is_allowed(defined_in, allowed_prefixes):
        raise ValueError(
            f"{path!r} is not allowed: it is defined in {defined_in!r}, outside the allowlist "
            f"{list(allowed_prefixes)}; name it where it is defined, under an allowed prefix"
        )
    return target


@dataclass
class CustomConfig(RewardConfig):
    function: str = (
        MISSING  # "package.module:function" with signature (prompts, responses, **kwargs) -> floats
    )
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments passed to the function
    # packages `function` may come from (and be defined in); add your own here, never a bare top-level
    # like "os." nor "prefopt." (that would reach the training loop)
    allowed_prefixes: list[str] = field(default_factory=lambda: ["prefopt.rewards.", "user_rewards."])

    def preflight(self) -> None:
        """Before anything loads: `function` is an import path under the allowlist (nothing is imported)."""
        module = _split(self.function)[0]
        if not _is_allowed(module, self.allowed_prefixes):
            raise ConfigFieldError(
                "function", f"module {module!r} is outside allowed_prefixes {list(self.allowed_prefixes)}"
            )


def build_custom(cfg: CustomConfig, context: Any) -> RewardFn:
    """r(x, y) = function(prompts, responses, **kwargs), resolved through the allowlist."""
    function = resolve_callable(cfg.function, cfg.allowed_prefixes)
    kwargs = dict(cfg.kwargs)

    def custom(prompts: list[str], responses: list[str]) -> list[float]:
        values = list(function(prompts, responses, **kwargs))
        try:
            return [float(r) for r in values]
        except (TypeError, ValueError):
            bad = next(i for i, r in enumerate(values) if not _is_number(r))
            raise ValueError(
                f"aux_reward.custom.function={cfg.function}: returned {values[bad]!r} (position {bad} "
                "of the batch), not a number"
            ) from None

    return custom


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def example_word_count(prompts: list[str], responses: list[str], scale: float = 1.0) -> list[float]:
    """An example custom reward: `scale` times the number of words in the response.

    Select it with `aux_reward=[custom] aux_reward.custom.function=prefopt.rewards.custom:example_word_count`.
    """
    return [scale * len(y.split()) for y in responses]


CUSTOM = AuxReward(build_custom, CustomConfig, "user function(prompts, responses, **kwargs), by import path")
