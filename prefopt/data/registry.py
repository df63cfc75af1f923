"""The dataset registry's entry type and the registry itself: `dataset.name` -> schema and loader.

prefopt.data fills `DATASETS` with every dataset (the one place they are named); a module that must look
datasets up by name, like the mixture, imports it from here, which imports no dataset module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefopt.data.pairs import TextData


@dataclass(frozen=True)
class DatasetSpec:
    config: type
    load: Callable[[Any, int], TextData]
    description: str
    ground_truth: bool = False  # the task knows pi*, pi_ref and the oracle (exact metrics, reference fit)


DATASETS: dict[str, DatasetSpec] = {}  # filled by prefopt.data


def register(name: str, spec: DatasetSpec) -> None:
    """Make `dataset.name=<name>` select `spec`, as a built-in dataset; refuses a name already taken."""
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"register({name!r}, ...) takes a DatasetSpec, got {type(spec).__name__}")
    if name in DATASETS:
        raise ValueError(f"dataset {name!r} is already registered")
    DATASETS[name] = spec
