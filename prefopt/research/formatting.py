"""Text for `prefopt report`: numbers and key values as tables, legends and readings show them, a sort
order for mixed columns, and the one-line description of a trend that a figure's readings use."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd


def fmt(value: Any) -> str:
    """A number with 4 significant digits; '—' for missing values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.4g}" if isinstance(value, (int, float, np.number)) else str(value)


def fmt_value(value: Any) -> str:
    """A key's value as shown in tables and legends (floats that are whole numbers without '.0')."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return fmt(value) if isinstance(value, (float, np.floating)) else str(value)


def sort_key(value: Any) -> tuple:
    """Orders numbers numerically before strings, missing values last, so mixed columns still sort."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (2, 0.0, "")
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def describe_trend(x: pd.Series, y: pd.Series, x_name: str, labels: list[str] | None) -> str:
    """'rises from a to b as x increases', 'falls ...', 'stays within [a, b]' or 'varies within [a, b]'."""
    points = pd.DataFrame({"x": np.asarray(x, float), "y": np.asarray(y, float)}).dropna().sort_values("x")
    if points.empty:
        return "no data"
    low, high = points["y"].min(), points["y"].max()
    if len(points) < 2 or high - low <= 0.05 * max(abs(low), abs(high)):
        return f"stays within [{fmt(low)}, {fmt(high)}]"
    if labels is not None:  # categorical x: no direction, name the extremes
        argmax, argmin = points["y"].idxmax(), points["y"].idxmin()
        at = {i: labels[int(points.loc[i, "x"])] for i in (argmax, argmin)}
        return f"within [{fmt(low)}, {fmt(high)}], highest at {x_name}={at[argmax]}, lowest at {at[argmin]}"
    rho = _spearman(points["x"], points["y"])
    first, last = fmt(points["y"].iloc[0]), fmt(points["y"].iloc[-1])
    if rho >= 0.5:
        return f"rises from {first} to {last} as {x_name} increases"
    if rho <= -0.5:
        return f"falls from {first} to {last} as {x_name} increases"
    return f"varies non-monotonically within [{fmt(low)}, {fmt(high)}] (Spearman {rho:+.2f})"


def _spearman(x: pd.Series, y: pd.Series) -> float:
    rx, ry = x.rank().to_numpy(), y.rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])
