"""Figures for `prefopt report`: line, trajectory and scatter plots, each with a reading computed from data.

This module never touches the sweep layout. It takes plain frames: `runs` has one row per completed job (a
`job` column, one column per key a figure names, one per final metric, and optionally `converged`: True,
False, or None/NaN when unknown) and `history` one row per eval step of each job (`job`, `step`, metrics).
Means and stds are over the jobs that share a plotted point, i.e. over seeds when every other swept key is
on an axis, a hue or a facet. A run with `converged` False is drawn on its own (an x) and left out of the
means and the readings; a run whose convergence is unknown counts as converged.
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
CONVERGED = "converged"  # runs column: True, False, or None/NaN (unknown, counted as converged)
LEFT_OUT = "not converged (left out)"  # legend entry of the runs drawn on their own
MARKERS = ["o", "s", "^", "D", "v", "P", "*", "h"]  # one per `style` value; "x" marks unconverged runs
LABEL_OFFSETS = [(4, 4), (4, -12), (-4, 4), (-4, -12), (4, 16), (-4, 16), (4, -24), (-4, -24)]  # points
LABEL_FONTSIZE = 7


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
        for hue, group in _groups(points, spec.hue):
            for style, part in _groups(group, spec.style):
                xs, ys = part[f"{spec.x}_mean"], part[f"{metric}_mean"]
                errors = {"xerr": part[f"{spec.x}_std"].fillna(0), "yerr": part[f"{metric}_std"].fillna(0)}
                ax.errorbar(xs, ys, **errors, fmt=markers[style], capsize=3, color=colors[hue])
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


def _point_labels(spec: FigureSpec, points: pd.DataFrame, xs, ys) -> list[tuple[float, float, str]]:
    """(x, y, text) per point with a label value; a point whose label key is missing gets none."""
    if not spec.label:
        return []
    labels = []
    for value, x, y in zip(points[spec.label], xs, ys):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        text = fmt_value(value)
        text = spec.label_format.replace("{}", text) if spec.label_format else text
        labels.append((float(x), float(y), text))
    return labels


def _annotate(ax, labels: list[tuple[float, float, str]]) -> None:
    """Write each label at the first of LABEL_OFFSETS where its box overlaps no label already placed."""
    ax.get_xlim(), ax.get_ylim()  # settle autoscaling so transData maps to the final axes
    scale = ax.figure.dpi / 72  # points -> pixels
    placed: list[tuple[float, float, float, float]] = []
    for x, y, text in sorted(labels):
        px, py = ax.transData.transform((x, y))
        width, height = 0.6 * LABEL_FONTSIZE * len(text) * scale, 1.2 * LABEL_FONTSIZE * scale
        boxes = []
        for dx, dy in LABEL_OFFSETS:
            left, bottom = px + dx * scale - (width if dx < 0 else 0), py + dy * scale
            boxes.append((left, bottom, left + width, bottom + height))
        free = [i for i, box in enumerate(boxes) if not any(_overlap(box, other) for other in placed)]
        choice = free[0] if free else 0
        placed.append(boxes[choice])
        dx, dy = LABEL_OFFSETS[choice]
        ha = "right" if dx < 0 else "left"
        ax.annotate(text, (x, y), (dx, dy), textcoords="offset points", fontsize=LABEL_FONTSIZE, ha=ha)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _scatter_legend(ax, spec: FigureSpec, colors: dict, markers: dict) -> None:
    """Legend entries: a colour per hue value, a grey marker per style value."""
    for hue, color in colors.items():
        ax.plot([], [], "o", color=color, label=hue if spec.hue else "mean over seeds")
    for style, marker in markers.items() if spec.style else []:
        ax.plot([], [], marker, color="grey", linestyle="none", label=f"{spec.style}={style}")


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


def _markers(data: pd.DataFrame, key: str | None) -> dict[str | None, str]:
    return {value: MARKERS[i % len(MARKERS)] for i, (value, _) in enumerate(_groups(data, key))}


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


def _plot_left_out(ax, x: pd.Series, y: pd.Series, color: str, line: bool = False) -> None:
    """Runs that did not converge: an x per run (a dotted trajectory ending in an x), plus a legend entry."""
    values = pd.DataFrame({"x": np.asarray(x, float), "y": pd.to_numeric(y, errors="coerce")}).dropna()
    if values.empty:
        return
    style = {"linestyle": ":" if line else "none", "marker": "x", "markersize": 5}
    ax.plot(values["x"], values["y"], color=color, linewidth=1, markevery=[-1] if line else None, **style)
    ax.plot([], [], color="grey", label=LEFT_OUT, **style)


def _finish_axes(
    ax, title: str, x_name: str, spec: FigureSpec, hline, labels: list[str] | None, metric: str
) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(x_name)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1)
    if labels is not None:
        ax.set_xticks(range(len(labels)), labels)
    elif spec.logx and x_name != "step":
        ax.set_xscale("log")
    if spec.log_y(metric):
        ax.set_yscale("log")


def _legend(fig, title: str | None) -> None:
    """One legend for the whole figure, with every hue (and style) value that any panel drew."""
    handles = {label: handle for ax in fig.axes for handle, label in zip(*ax.get_legend_handles_labels())}
    if LEFT_OUT in handles:  # last, after the hue and style entries
        handles[LEFT_OUT] = handles.pop(LEFT_OUT)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", title=title, fontsize=8)


def _named(key: str | None, value: str | None) -> str:
    """'dpo' for a word, 'strength=0.1' for a number, so readings stay unambiguous."""
    return f"{key}={value}" if key and pd.notna(pd.to_numeric(value, errors="coerce")) else str(value)
