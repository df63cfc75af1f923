"""What a figure of `prefopt report` draws: one entry of the config's `report.figures` list, parsed."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FigureSpec:
    """One entry of the config's `report.figures` list (see prefopt/research/report.py for the YAML form)."""

    name: str
    kind: str
    y: list[str]
    x: str | None = None
    hue: str | None = None
    facet: str | None = None
    label: str | None = None
    label_format: str | None = None  # e.g. "γ={}": "{}" is replaced by the label's value
    style: str | None = None  # scatter: one marker per value of this key
    logx: bool = False
    logy: bool | list[str] = False  # True: every panel; a list: the panels of these metrics
    hlines: dict[str, Any] = field(default_factory=dict)  # metric -> number or "<summary section>/<metric>"

    @classmethod
    def from_dict(cls, raw: dict, index: int) -> FigureSpec:
        y = raw.get("y") or []
        keys = ("x", "hue", "facet", "label", "label_format", "style")
        optional = {key: str(raw[key]) if raw.get(key) else None for key in keys}
        logy = raw.get("logy", False)
        return cls(
            name=safe_name(str(raw.get("name") or f"figure{index}")),
            kind=str(raw.get("kind", "line")),
            y=[str(m) for m in ([y] if isinstance(y, str) else y)],
            logx=bool(raw.get("logx", False)),
            logy=[str(m) for m in logy] if isinstance(logy, list) else bool(logy),
            hlines=dict(raw.get("hlines") or {}),
            **optional,
        )

    def keys_used(self) -> list[str]:
        """Override/config keys this figure groups or labels by (a scatter's x is a metric, not a key)."""
        keys = [self.hue, self.facet, self.label, self.style] + ([self.x] if self.kind == "line" else [])
        return [key for key in keys if key]

    def log_y(self, metric: str) -> bool:
        return metric in self.logy if isinstance(self.logy, list) else self.logy

    def final_metrics(self) -> list[str]:
        """Metrics this figure reads from the final evals (a trajectory reads the eval history instead)."""
        if self.kind == "trajectory":
            return []
        return ([self.x] if self.kind == "scatter" and self.x else []) + self.y


def parse_specs(raw: Any) -> list[FigureSpec]:
    """Figure specs from the `report.figures` list; repeated names get a numeric suffix."""
    specs, seen = [], set()
    for index, entry in enumerate(raw if isinstance(raw, list) else []):
        spec = FigureSpec.from_dict(entry if isinstance(entry, dict) else {}, index)
        while spec.name in seen:
            spec.name += f"_{index}"
        seen.add(spec.name)
        specs.append(spec)
    return specs


def safe_name(text: str) -> str:
    """A figure name usable as a file stem."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "figure"
