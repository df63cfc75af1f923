"""Figures for `prefopt report`: line, trajectory and scatter plots, each with a reading computed from data.

This module never touches the sweep layout. It takes plain frames: `runs` has one row per completed job (a
`job` column, one column per key a figure names, one per final metric, and optionally `converged`: True,
False, or None/NaN when unknown) and `history` one row per eval step of each job (`job`, `step`, metrics).
Means and stds are over the jobs that share a plotted point, i.e. over seeds when every other swept key is
on an axis, a hue or a facet. A run with `converged` False is drawn on its own (an x) and left out of the
means and the readings; a run whose convergence is unknown counts as converged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from prefopt.research.figure_spec import FigureSpec, safe_name
from prefopt.research.figure_spec import parse_specs as parse_specs  # re-exported: report.py reads it here
from prefopt.research.formatting import describe_trend, fmt, fmt_value
from prefopt.research.plotting import (
    _annotate,
    _axis_positions,
    _colors,
    _finish_axes,
    _group_means,
    _groups,
    _legend,
    _markers,
    _mean_std,
    _new_figure,
    _plot_band,
    _plot_left_out,
    _point_labels,
    _scatter_legend,
)

KINDS = ("line", "trajectory", "scatter")
CONVERGED = "converged"  # runs column: True, False, or None/NaN (unknown, counted as converged)


@dataclass
class FigureResult:
    spec: FigureSpec
    path: Path | None  # None when nothing could be drawn
    readings: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


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
    if spec.style and spec.kind != "scatter":
        result.warnings.append(f"figure '{spec.name}': style is drawn by scatter figures only")
    source = history if spec.kind == "trajectory" else runs
    for metric in spec.final_metrics() or spec.y:
        if not _present(source, metric):
            result.warnings.append(f"figure '{spec.name}': metric '{metric}' is absent from every run")
    for key in spec.keys_used():
        if not _present(runs, key):
            result.warnings.append(f"figure '{spec.name}': key '{key}' not found in overrides or config")
    metrics = [metric for metric in spec.y if _present(source, metric)]
    unknown = [attr for attr in ("hue", "facet", "label", "style") if not _present(runs, getattr(spec, attr))]
    spec = replace(spec, **dict.fromkeys(unknown))  # draw without a key that was not found
    if not metrics or (spec.kind != "trajectory" and not _present(runs, spec.x)):
        return result
    try:
        fig, result.readings = draw_figure(spec, metrics, runs, history, group_keys, hlines)
        result.path = out_dir / f"{spec.name}.png"
        fig.savefig(result.path, dpi=110)
    except Exception as error:  # a report must survive any one odd figure
        result.path = None
        result.warnings.append(f"figure '{spec.name}': could not be drawn ({type(error).__name__}: {error})")
    return result


def draw_figure(spec, metrics, runs, history, group_keys, hlines) -> tuple[Any, list[str]]:
    """(matplotlib Figure, readings) for a spec whose keys and metrics are known to be present."""
    draw = {"line": _draw_line, "trajectory": _draw_trajectory, "scatter": _draw_scatter}[spec.kind]
    fig, readings = draw(spec, metrics, runs, history, group_keys, hlines)
    _legend(fig, spec.hue)
    left_out = int(split_converged(runs)[1]["job"].nunique()) if "job" in runs else 0
    if left_out:
        readings.append(
            f"{left_out} run(s) did not converge: drawn as x, left out of the means and these readings."
        )
    return fig, readings


def split_converged(data: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows of runs that converged or may have, rows of runs that did not)."""
    if CONVERGED not in data.columns:
        return data, data.iloc[:0]
    failed = data[CONVERGED].map(lambda value: value is False or value is np.False_)
    return data[~failed], data[failed]


def _draw_line(spec, metrics, runs, history, group_keys, hlines):
    x, labels = _axis_positions(runs[spec.x])
    data = runs.assign(_x=x).dropna(subset=["_x"])
    colors = _colors(data, spec.hue)
    fig, axes = _new_figure(len(metrics))
    readings = []
    for ax, metric in zip(axes, metrics):
        parts = []
        for hue, group in _groups(data, spec.hue):
            kept, left_out = split_converged(group)
            stats = _mean_std(kept, "_x", metric)
            _plot_band(ax, stats["_x"], stats, colors[hue], hue)
            _plot_left_out(ax, left_out["_x"], left_out[metric], colors[hue])
            trend = describe_trend(stats["_x"], stats["mean"], spec.x, labels)
            trend = "no converged run" if stats.empty and len(left_out) else trend
            parts.append(f"{_named(spec.hue, hue)}: {trend}" if spec.hue else trend)
        _finish_axes(ax, metric, spec.x, spec, hlines.get(metric), labels, metric)
        readings.append(f"{metric} vs {spec.x}: " + "; ".join(parts))
    return fig, readings


def _draw_trajectory(spec, metrics, runs, history, group_keys, hlines):
    keys = [k for k in dict.fromkeys([spec.hue, spec.facet]) if k]
    columns = ["job", *keys] + ([CONVERGED] if CONVERGED in runs.columns else [])
    history = history.drop(columns=[k for k in columns if k in history.columns and k != "job"])
    data = history.merge(runs[columns], on="job").sort_values(["job", "step"])
    colors = _colors(data, spec.hue)
    facets = _groups(data, spec.facet)
    fig, axes = _new_figure(len(facets) * len(metrics), len(metrics))
    parts: dict[str, list[str]] = {metric: [] for metric in metrics}
    for row, (facet, facet_data) in enumerate(facets):
        for col, metric in enumerate(metrics):
            ax = axes[row * len(metrics) + col]
            for hue, group in _groups(facet_data, spec.hue):
                kept, left_out = split_converged(group)
                for _, run in left_out.groupby("job"):
                    _plot_left_out(ax, run["step"], run[metric], colors[hue], line=True)
                stats = _mean_std(kept, "step", metric)
                if stats.empty:
                    ax.plot([], [], color=colors[hue], label=hue)  # the hue's legend entry
                    continue
                _plot_band(ax, stats["step"], stats, colors[hue], hue)
                where = ", ".join(_named(k, v) for k, v in [(spec.facet, facet), (spec.hue, hue)] if k)
                start, end = stats["mean"].iloc[0], stats["mean"].iloc[-1]
                steps = f"steps {stats['step'].iloc[0]:g}-{stats['step'].iloc[-1]:g}"
                parts[metric].append(f"{where + ': ' if where else ''}{fmt(start)} → {fmt(end)} over {steps}")
            title = f"{metric} ({spec.facet}={facet})" if spec.facet else metric
            _finish_axes(ax, title, "step", spec, hlines.get(metric), None, metric)
    return fig, [f"{metric}: " + ("; ".join(p) or "no converged run") for metric, p in parts.items()]


def _draw_scatter(spec, metrics, runs, history, group_keys, hlines):
    by = [k for k in dict.fromkeys([*group_keys, spec.hue, spec.style, spec.label]) if k]
    colors, markers = _colors(runs, spec.hue), _markers(runs, spec.style)
    kept, left_out = split_converged(runs)
    fig, axes = _new_figure(len(metrics))
    readings = []
    for ax, metric in zip(axes, metrics):
        points = _group_means(kept, by, [spec.x, metric])
        parts, labels = [], []
        hues = _groups(points, spec.hue)
        for order, (hue, group) in enumerate(hues):
            size = 6 + 4 * (len(hues) - 1 - order)  # earlier hues larger: coinciding points stay visible
            for style, part in _groups(group, spec.style):
                xs, ys = part[f"{spec.x}_mean"], part[f"{metric}_mean"]
                errors = {"xerr": part[f"{spec.x}_std"].fillna(0), "yerr": part[f"{metric}_std"].fillna(0)}
                ax.errorbar(
                    xs, ys, **errors, fmt=markers[style], markersize=size, capsize=3, color=colors[hue]
                )
                labels += _point_labels(spec, part, xs, ys)
            trend = describe_trend(group[f"{spec.x}_mean"], group[f"{metric}_mean"], spec.x, None)
            parts.append(f"{_named(spec.hue, hue)}: {trend}" if spec.hue else trend)
        for hue, group in _groups(left_out, spec.hue):
            _plot_left_out(ax, group[spec.x], group[metric], colors[hue])
        _scatter_legend(ax, spec, colors, markers)
        if not points.empty:
            best = points.loc[points[f"{metric}_mean"].idxmax()]
            where = ", ".join(f"{k}={fmt_value(best[k])}" for k in group_keys or by) or "all runs"
            best_y, best_x = fmt(best[f"{metric}_mean"]), fmt(best[f"{spec.x}_mean"])
            parts.append(f"highest at {where} ({best_y} at {spec.x} {best_x})")
        _finish_axes(ax, metric, spec.x, spec, hlines.get(metric), None, metric)
        _annotate(ax, labels)
        readings.append(f"{metric} vs {spec.x}: " + ("; ".join(parts) or "no converged run"))
    return fig, readings


def _present(data: pd.DataFrame, column: str) -> bool:
    return column in data.columns and bool(data[column].notna().any())


def _named(key: str | None, value: str | None) -> str:
    """'dpo' for a word, 'strength=0.1' for a number, so readings stay unambiguous."""
    return f"{key}={value}" if key and pd.notna(pd.to_numeric(value, errors="coerce")) else str(value)
