"""Figures for `prefopt report`: line, trajectory and scatter plots, each with a reading computed from data.

This module never touches the sweep layout. It takes plain frames: `runs` has one row per completed job (a
`job` column, one column per key a figure names, one per final metric) and `history` one row per eval step
of each job (`job`, `step`, metrics). Means and stds are over the jobs that share a plotted point, i.e.
over seeds when every other swept key is on an axis, a hue or a facet.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

KINDS = ("line", "trajectory", "scatter")
MAX_PANEL_COLUMNS = 3


@dataclass
class FigureSpec:
    """One entry of the config's `report.figures` list (see prefopt/report.py for the YAML form)."""

    name: str
    kind: str
    y: list[str]
    x: str | None = None
    hue: str | None = None
    facet: str | None = None
    label: str | None = None
    logx: bool = False
    logy: bool = False
    hlines: dict[str, Any] = field(default_factory=dict)  # metric -> number or "<summary section>/<metric>"

    @classmethod
    def from_dict(cls, raw: dict, index: int) -> FigureSpec:
        y = raw.get("y") or []
        optional = {key: str(raw[key]) if raw.get(key) else None for key in ("x", "hue", "facet", "label")}
        return cls(
            name=safe_name(str(raw.get("name") or f"figure{index}")),
            kind=str(raw.get("kind", "line")),
            y=[str(m) for m in ([y] if isinstance(y, str) else y)],
            logx=bool(raw.get("logx", False)),
            logy=bool(raw.get("logy", False)),
            hlines=dict(raw.get("hlines") or {}),
            **optional,
        )

    def keys_used(self) -> list[str]:
        """Override/config keys this figure groups or labels by (a scatter's x is a metric, not a key)."""
        keys = [self.hue, self.facet, self.label] + ([self.x] if self.kind == "line" else [])
        return [key for key in keys if key]

    def final_metrics(self) -> list[str]:
        """Metrics this figure reads from the final evals (a trajectory reads the eval history instead)."""
        if self.kind == "trajectory":
            return []
        return ([self.x] if self.kind == "scatter" and self.x else []) + self.y


@dataclass
class FigureResult:
    spec: FigureSpec
    path: Path | None  # None when nothing could be drawn
    readings: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


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


def default_specs(runs: pd.DataFrame, group_keys: list[str], metrics: list[str], history: pd.DataFrame):
    """A line figure per numeric swept key, plus a trajectory of win rate (or the first key metric)."""
    specs = []
    for key in group_keys:
        values = pd.to_numeric(runs[key], errors="coerce") if key in runs else pd.Series(dtype=float)
        if not metrics or values.empty or values.isna().any():
            continue
        hue = next((other for other in group_keys if other != key), None)
        logx = bool((values > 0).all() and values.max() >= 20 * values.min())
        specs.append(FigureSpec(safe_name(f"vs_{key}"), "line", metrics[:4], x=key, hue=hue, logx=logx))
    candidates = [m for m in ["eval/win_rate", *metrics] if m in history.columns]
    if candidates:
        hue = group_keys[0] if group_keys else None
        specs.append(FigureSpec("trajectory", "trajectory", candidates[:1], hue=hue))
    return specs


def safe_name(text: str) -> str:
    """A figure name usable as a file stem."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "figure"


def render_figure(
    spec: FigureSpec,
    runs: pd.DataFrame,
    history: pd.DataFrame,
    group_keys: list[str],
    hlines: dict[str, float],
    out_dir: Path,
) -> FigureResult:
    """Draw one figure to `out_dir/<name>.png`; problems become warnings on the result, never exceptions."""
    result = FigureResult(spec, None)
    if spec.kind not in KINDS:
        known = ", ".join(KINDS)
        result.warnings.append(f"figure '{spec.name}': unknown kind '{spec.kind}' (known: {known})")
        return result
    if spec.kind != "trajectory" and not spec.x:
        result.warnings.append(f"figure '{spec.name}': kind '{spec.kind}' needs an x")
        return result
    source = history if spec.kind == "trajectory" else runs
    for metric in spec.final_metrics() or spec.y:
        if not _present(source, metric):
            result.warnings.append(f"figure '{spec.name}': metric '{metric}' is absent from every run")
    for key in spec.keys_used():
        if not _present(runs, key):
            result.warnings.append(f"figure '{spec.name}': key '{key}' not found in overrides or config")
    metrics = [metric for metric in spec.y if _present(source, metric)]
    unknown = [attr for attr in ("hue", "facet", "label") if not _present(runs, getattr(spec, attr))]
    spec = replace(spec, **dict.fromkeys(unknown))  # draw without a key that was not found
    if not metrics or (spec.kind != "trajectory" and not _present(runs, spec.x)):
        return result
    try:
        draw = {"line": _draw_line, "trajectory": _draw_trajectory, "scatter": _draw_scatter}[spec.kind]
        fig, result.readings = draw(spec, metrics, runs, history, group_keys, hlines)
        _legend(fig, spec.hue)
        result.path = out_dir / f"{spec.name}.png"
        fig.savefig(result.path, dpi=110)
    except Exception as error:  # a report must survive any one odd figure
        result.path = None
        result.warnings.append(f"figure '{spec.name}': could not be drawn ({type(error).__name__}: {error})")
    return result


def _draw_line(spec, metrics, runs, history, group_keys, hlines):
    x, labels = _axis_positions(runs[spec.x])
    data = runs.assign(_x=x).dropna(subset=["_x"])
    colors = _colors(data, spec.hue)
    fig, axes = _new_figure(len(metrics))
    readings = []
    for ax, metric in zip(axes, metrics):
        parts = []
        for hue, group in _groups(data, spec.hue):
            stats = _mean_std(group, "_x", metric)
            _plot_band(ax, stats["_x"], stats, colors[hue], hue)
            trend = describe_trend(stats["_x"], stats["mean"], spec.x, labels)
            parts.append(f"{_named(spec.hue, hue)}: {trend}" if spec.hue else trend)
        _finish_axes(ax, metric, spec.x, spec, hlines.get(metric), labels)
        readings.append(f"{metric} vs {spec.x}: " + "; ".join(parts))
    return fig, readings


def _draw_trajectory(spec, metrics, runs, history, group_keys, hlines):
    keys = [k for k in dict.fromkeys([spec.hue, spec.facet]) if k]
    history = history.drop(columns=[k for k in keys if k in history.columns])
    data = history.merge(runs[["job", *keys]], on="job")
    colors = _colors(data, spec.hue)
    facets = _groups(data, spec.facet)
    fig, axes = _new_figure(len(facets) * len(metrics), len(metrics))
    parts: dict[str, list[str]] = {metric: [] for metric in metrics}
    for row, (facet, facet_data) in enumerate(facets):
        for col, metric in enumerate(metrics):
            ax = axes[row * len(metrics) + col]
            for hue, group in _groups(facet_data, spec.hue):
                stats = _mean_std(group, "step", metric)
                if stats.empty:
                    continue
                _plot_band(ax, stats["step"], stats, colors[hue], hue)
                where = ", ".join(_named(k, v) for k, v in [(spec.facet, facet), (spec.hue, hue)] if k)
                start, end = stats["mean"].iloc[0], stats["mean"].iloc[-1]
                steps = f"steps {stats['step'].iloc[0]:g}-{stats['step'].iloc[-1]:g}"
                parts[metric].append(f"{where + ': ' if where else ''}{fmt(start)} → {fmt(end)} over {steps}")
            title = f"{metric} ({spec.facet}={facet})" if spec.facet else metric
            _finish_axes(ax, title, "step", spec, hlines.get(metric), None)
    return fig, [f"{metric}: " + "; ".join(p) for metric, p in parts.items()]


def _draw_scatter(spec, metrics, runs, history, group_keys, hlines):
    by = [k for k in dict.fromkeys([*group_keys, spec.hue, spec.label]) if k]
    colors = _colors(runs, spec.hue)
    fig, axes = _new_figure(len(metrics))
    readings = []
    for ax, metric in zip(axes, metrics):
        points = _group_means(runs, by, [spec.x, metric])
        if points.empty:
            continue
        parts = []
        for hue, group in _groups(points, spec.hue):
            xs, ys = group[f"{spec.x}_mean"], group[f"{metric}_mean"]
            errors = {"xerr": group[f"{spec.x}_std"].fillna(0), "yerr": group[f"{metric}_std"].fillna(0)}
            ax.errorbar(xs, ys, **errors, fmt="o", capsize=3, color=colors[hue], label=hue)
            for text, xy in zip(group[spec.label].map(fmt_value), zip(xs, ys)) if spec.label else []:
                ax.annotate(text, xy, (3, 3), textcoords="offset points", fontsize=7)
            trend = describe_trend(xs, ys, spec.x, None)
            parts.append(f"{_named(spec.hue, hue)}: {trend}" if spec.hue else trend)
        best = points.loc[points[f"{metric}_mean"].idxmax()]
        where = ", ".join(f"{k}={fmt_value(best[k])}" for k in group_keys or by) or "all runs"
        best_y, best_x = fmt(best[f"{metric}_mean"]), fmt(best[f"{spec.x}_mean"])
        parts.append(f"highest at {where} ({best_y} at {spec.x} {best_x})")
        _finish_axes(ax, metric, spec.x, spec, hlines.get(metric), None)
        readings.append(f"{metric} vs {spec.x}: " + "; ".join(parts))
    return fig, readings


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


def _present(data: pd.DataFrame, column: str) -> bool:
    return column in data.columns and bool(data[column].notna().any())


def _spearman(x: pd.Series, y: pd.Series) -> float:
    rx, ry = x.rank().to_numpy(), y.rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def _groups(data: pd.DataFrame, key: str | None) -> list[tuple[str | None, pd.DataFrame]]:
    """(display value, rows) per value of `key` in sorted order; one group labelled None without a key."""
    if not key:
        return [(None, data)]
    order = dict.fromkeys(fmt_value(v) for v in sorted(data[key].tolist(), key=sort_key))
    shown = data[key].map(fmt_value)
    return [(value, data[shown == value]) for value in order]


def _colors(data: pd.DataFrame, key: str | None) -> dict[str | None, str]:
    return {hue: f"C{i % 10}" for i, (hue, _) in enumerate(_groups(data, key))}


def _mean_std(data: pd.DataFrame, by: str, metric: str) -> pd.DataFrame:
    values = data[[by]].assign(value=pd.to_numeric(data[metric], errors="coerce")).dropna()
    return values.groupby(by)["value"].agg(["mean", "std", "count"]).reset_index().sort_values(by)


def _group_means(data: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    """Mean and std of each metric per group of `by`, columns `<metric>_mean` and `<metric>_std`."""
    values = data[by].assign(**{m: pd.to_numeric(data[m], errors="coerce") for m in metrics})
    grouped = values.groupby(by, dropna=False, sort=False) if by else values.groupby(lambda _: 0)
    stats = grouped[metrics].agg(["mean", "std"])
    stats.columns = [f"{m}_{stat}" for m, stat in stats.columns]
    return stats.reset_index(drop=not by).dropna(subset=[f"{m}_mean" for m in metrics])


def _axis_positions(values: pd.Series) -> tuple[pd.Series, list[str] | None]:
    """Numeric x as is; otherwise positions 0..k-1 plus their tick labels."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all():
        return numeric, None
    labels = list(dict.fromkeys(fmt_value(v) for v in sorted(values.tolist(), key=sort_key)))
    return values.map(fmt_value).map({label: i for i, label in enumerate(labels)}).astype(float), labels


def _new_figure(panels: int, columns: int | None = None):
    """A figure with `panels` axes (2x2 for four, else rows of up to 3); unused grid cells are hidden."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = columns or (2 if panels == 4 else min(panels, MAX_PANEL_COLUMNS))
    rows = math.ceil(panels / columns)
    fig = Figure(figsize=(4.6 * columns, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend switch, nothing to close
    axes = list(fig.subplots(rows, columns, squeeze=False).flat)
    for ax in axes[panels:]:
        ax.set_axis_off()
    return fig, axes[:panels]


def _plot_band(ax, x: pd.Series, stats: pd.DataFrame, color: str, label: str | None) -> None:
    ax.plot(x, stats["mean"], marker="o", markersize=3, color=color, label=label)
    spread = stats["std"].fillna(0)
    ax.fill_between(x, stats["mean"] - spread, stats["mean"] + spread, color=color, alpha=0.2, linewidth=0)


def _finish_axes(ax, title: str, x_name: str, spec: FigureSpec, hline, labels: list[str] | None) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(x_name)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1)
    if labels is not None:
        ax.set_xticks(range(len(labels)), labels)
    elif spec.logx and x_name != "step":
        ax.set_xscale("log")
    if spec.logy:
        ax.set_yscale("log")


def _legend(fig, title: str | None) -> None:
    """One legend for the whole figure, with every hue value that any panel drew."""
    handles = {label: handle for ax in fig.axes for handle, label in zip(*ax.get_legend_handles_labels())}
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", title=title, fontsize=8)


def _named(key: str | None, value: str | None) -> str:
    """'dpo' for a word, 'strength=0.1' for a number, so readings stay unambiguous."""
    return f"{key}={value}" if key and pd.notna(pd.to_numeric(value, errors="coerce")) else str(value)
