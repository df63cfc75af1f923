"""The dataset registry's entry type and the registry itself: `dataset.name` -> schema and loader.

prefopt.data fills `DATASETS` with every dataset (the one place they are named); a module that must look
datasets up by name, like the mixture, imports it from here, which imports no dataset module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefopt.data.pairs import TextData
from prefopt.registry import add_entry


@dataclass(frozen=True)
class DatasetSpec:
    config: type
    load: Callable[[Any, int], TextData]
    description: str
    ground_truth: bool = False  # the task knows pi*, pi_ref and the oracle (exact metrics, reference fit)


DATASETS: dict[str, DatasetSpec] = {}  # filled by prefopt.data


def register(name: str, spec: DatasetSpec) -> None:
    """Make `dataset.name=<name>` select `spec`, as a built-in dataset; refuses a name already taken."""
    add_entry(DATASETS, name, spec, DatasetSpec, "dataset")
