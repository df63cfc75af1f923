"""Plotting primitives for prefopt/research/figures.py: runs grouped into plotted points (hue groups,
colours, markers, means and stds, categorical x positions), figures and panels, mean bands, the runs left
out, axes, the figure legend, and point labels placed so that they do not overlap."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from prefopt.research.figure_spec import FigureSpec
from prefopt.research.formatting import fmt_value, sort_key

MAX_PANEL_COLUMNS = 3
LEFT_OUT = "not converged (left out)"  # legend entry of the runs drawn on their own
MARKERS = ["o", "s", "^", "D", "v", "P", "*", "h"]  # one per `style` value; "x" marks unconverged runs
LABEL_OFFSETS = [(4, 4), (4, -12), (-4, 4), (-4, -12), (4, 16), (-4, 16), (4, -24), (-4, -24)]  # points
LABEL_FONTSIZE = 7


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
