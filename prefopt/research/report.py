"""`prefopt report <sweep dir> [--out DIR]`: tables, figures and REPORT.md for any Hydra multirun.

A sweep dir holds one dir per job (any child with a `.hydra/` dir). Each job may have `summary.json` (status,
final/reference evals, runtime, convergence) and `eval.json` (the eval history, and the final and reference
evals with per-prompt detail); a job without a summary is reported as missing. Outputs: `runs.csv` (one row
per job, no per-prompt metrics), `summary.csv` (mean and std over seeds per group of swept keys), one PNG per
figure and `REPORT.md`. A run whose `convergence.converged` is false is left out of the means and readings
(a cell with no converged run shows all its runs, marked); a run without a verdict counts as converged.
Figures come from the config's optional `report:` node:

    report:
      title: "EXPO preservation"
      notes: "free text"
      figures:
        - {name: preservation, kind: line, x: strength, y: [eval/kl_star_good], hue: objective, logx: true,
           hlines: {eval/kl_star_good: reference_eval/eval/kl_star_good}}  # or a number
        - {name: trajectory, kind: trajectory, y: [eval/win_rate], hue: objective, facet: strength}
        - {name: pareto, kind: scatter, x: eval/aux_reward/keyword, y: eval/win_rate, hue: objective,
           style: aux_reward.keyword.weight, label: objective.gamma, label_format: "γ={}"}

Keys (x of a line, hue, facet, label, style) name an override first, then a config value, then a summary
field. `logy` is true or a list of the metrics whose panels get a log scale. Figures may name per-prompt
metrics (`eval/pi_theta/p0/y0`); they are read from `eval.json`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from prefopt.files import atomic_write_text
from prefopt.research import figures
from prefopt.research.figures import CONVERGED, FigureResult, FigureSpec
from prefopt.research.formatting import fmt, fmt_value, sort_key
from prefopt.research.sweep import (
    OUTSIDE_MASS,
    PER_PROMPT,
    Job,
    history_frame,
    job_value,
    load_sweep,
    reference_value,
    report_node,
    runs_frame,
    swept_keys,
    with_detail,
)

PRIORITY_METRICS = [  # summary-table metrics when no figure names any, most telling first
    "eval/rewards/accuracies",
    "eval/win_rate",
    "eval/oracle_reward",
    "eval/kl_policy_reference",
    "eval/kl_star_good",
    "eval/kl_star_bad",
    "eval/aux_reward",
    "eval/loss",
]
MAX_TABLE_METRICS = 8
SEED_KEY = "seed"
MAX_LISTED_CELLS = 20


def key_metrics(runs: pd.DataFrame, named: list[str]) -> list[str]:
    """Metrics for the summary table: those the figures name, else the usual eval metrics, at most 8."""
    present = [c for c in runs.columns if pd.api.types.is_numeric_dtype(runs[c]) and runs[c].notna().any()]
    chosen = [m for m in dict.fromkeys(named) if m in present]
    if not chosen:
        evals = [m for m in present if m.startswith("eval/") and not PER_PROMPT.search(m)]
        chosen = [m for m in PRIORITY_METRICS if m in evals] + [m for m in evals if m not in PRIORITY_METRICS]
    if OUTSIDE_MASS in present and OUTSIDE_MASS not in chosen[:MAX_TABLE_METRICS]:
        return [*chosen[: MAX_TABLE_METRICS - 1], OUTSIDE_MASS]
    return chosen[:MAX_TABLE_METRICS]


def summary_frame(runs: pd.DataFrame, group_keys: list[str], metrics: list[str]) -> pd.DataFrame:
    """Per group of `group_keys`: n, `converged` ("k/n"), and `<metric>_mean` / `<metric>_std` (ddof=1)
    over the runs that did not fail to converge; over all its runs when none converged (`stats_over`)."""
    rows = []
    groups = (
        runs.groupby(group_keys, dropna=False, sort=False) if group_keys else [((), runs)] * (len(runs) > 0)
    )
    for values, group in groups:
        kept, _ = figures.split_converged(group)
        row: dict[str, Any] = dict(zip(group_keys, values)) | {"n": len(group)}
        row |= {CONVERGED: converged_label(group), "stats_over": "converged" if len(kept) else "all runs"}
        for metric in metrics:
            column = pd.to_numeric((kept if len(kept) else group)[metric], errors="coerce")
            row |= {f"{metric}_mean": column.mean(), f"{metric}_std": column.std(ddof=1)}
        rows.append(row)
    stats = [f"{metric}_{stat}" for metric in metrics for stat in ("mean", "std")]
    frame = pd.DataFrame(rows, columns=[*group_keys, "n", CONVERGED, "stats_over", *stats])
    order = sorted(range(len(frame)), key=lambda i: [sort_key(frame.iloc[i][k]) for k in group_keys])
    return frame.iloc[order].reset_index(drop=True)


def converged_label(group: pd.DataFrame) -> str:
    """'k/n' (k runs converged of n), '(u not judged)' appended for runs without a verdict."""
    verdicts = group[CONVERGED] if CONVERGED in group.columns else pd.Series([None] * len(group))
    converged, failed = int(verdicts.eq(True).sum()), int(verdicts.eq(False).sum())
    unknown = len(group) - converged - failed
    if unknown == len(group):
        return "not judged"
    return f"{converged}/{len(group)}" + (f" ({unknown} not judged)" if unknown else "")


def write_report(sweep_dir: Path, out_dir: Path | None = None) -> Path:
    """Write runs.csv, summary.csv, the figures and REPORT.md for a sweep; returns REPORT.md's path."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir
    jobs = load_sweep(sweep_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = runs_frame(jobs)
    atomic_write_text(out_dir / "runs.csv", runs.to_csv(index=False))

    completed = [job for job in jobs if job.status == "completed"]
    swept = swept_keys(jobs)
    group_keys = [key for key in swept if key != SEED_KEY]
    node = report_node(completed)
    specs = figures.parse_specs(node.get("figures"))
    named = [m for spec in specs for m in spec.final_metrics()]
    done = with_detail(runs[runs["status"] == "completed"].reset_index(drop=True), completed, named)
    metrics = key_metrics(done, named)
    history = history_frame(completed)
    specs = specs or figures.default_specs(done, group_keys, metrics, history)
    summary = summary_frame(done, group_keys, metrics)
    atomic_write_text(out_dir / "summary.csv", summary.to_csv(index=False))

    by_name = {job.name: job for job in completed}
    for key in dict.fromkeys(k for spec in specs for k in spec.keys_used()):
        done[key] = [job_value(by_name[name], key) for name in done["job"]]
    results = [_figure(spec, done, history, group_keys, completed, out_dir) for spec in specs]

    text = _markdown(sweep_dir, node, jobs, swept, summary, group_keys, metrics, results)
    path = out_dir / "REPORT.md"
    atomic_write_text(path, text)
    return path


def _figure(spec: FigureSpec, runs, history, group_keys, jobs: list[Job], out_dir: Path) -> FigureResult:
    hlines = {metric: reference_value(ref, jobs) for metric, ref in spec.hlines.items()}
    found = {metric: value for metric, value in hlines.items() if value is not None}
    result = figures.render_figure(spec, runs, history, group_keys, found, out_dir)
    for metric in hlines.keys() - found.keys():
        result.warnings.append(f"figure '{spec.name}': hline {spec.hlines[metric]!r} not found")
    return result


def _markdown(sweep_dir, node, jobs, swept, summary, group_keys, metrics, results) -> str:
    lines = [f"# {node.get('title') or f'Sweep report: {sweep_dir.name}'}", ""]
    lines += [str(node["notes"]).strip(), ""] if node.get("notes") else []
    lines += _header(sweep_dir, jobs, swept)
    lines += _convergence_header(jobs, group_keys)
    lines += ["", "## Summary", "", SUMMARY_NOTE, ""]
    lines += [_summary_table(summary, group_keys, metrics), ""]
    lines += ["Per run: `runs.csv`. Per group: `summary.csv`.", "", "## Figures", ""]
    lines += [line for result in results for line in _figure_section(result)] or ["_No figures._"]
    return "\n".join(lines).rstrip() + "\n"


SUMMARY_NOTE = (
    "Mean ± std over seeds (ddof=1) of the runs that converged (or whose convergence was not judged); "
    "n = completed runs per group, converged = k/n of them. Where no run of a group converged, the values "
    "are over all its runs and marked (not converged)."
)


def _header(sweep_dir: Path, jobs: list[Job], swept: list[str]) -> list[str]:
    missing = [job for job in jobs if job.status == "missing"]
    failed = [job for job in jobs if job.status not in ("completed", "missing")]
    completed = len(jobs) - len(missing) - len(failed)
    lines = [
        f"- Sweep: `{sweep_dir.resolve()}`",
        f"- Jobs: {len(jobs)} ({completed} completed, {len(failed)} failed, {len(missing)} missing)",
        f"- Swept keys: {', '.join(_describe_key(key, jobs) for key in swept) or 'none'}",
    ]
    lines += [f"- Missing: `{job.name}` ({job.problem})" for job in missing]
    return lines + [f"- Failed: `{job.name}` ({_failure(job)})" for job in failed]


def _convergence_header(jobs: list[Job], group_keys: list[str]) -> list[str]:
    """How many completed runs converged, and the cells with runs that did not (with the first reason)."""
    completed = [job for job in jobs if job.status == "completed"]
    failed = [job for job in completed if job.converged is False]
    unknown = sum(job.converged is None for job in completed)
    if completed and unknown == len(completed):
        return ["- Convergence: not recorded (run dirs without a convergence report)"]
    converged = len(completed) - len(failed) - unknown
    lines = [
        f"- Convergence: {converged} of {len(completed)} completed runs converged, {len(failed)} did not"
        + (f", {unknown} not judged" if unknown else "")
    ]
    cells: dict[str, list[Job]] = {}
    for job in failed:
        where = ", ".join(f"{key}={fmt_value(job.overrides.get(key))}" for key in group_keys) or "all runs"
        cells.setdefault(where, []).append(job)
    for where, cell in list(cells.items())[:MAX_LISTED_CELLS]:
        size = sum(_cell(job, group_keys) == _cell(cell[0], group_keys) for job in completed)
        names = ", ".join(f"`{job.name}`" for job in cell)
        reasons = [str(r) for r in cell[0].convergence.get("reasons") or []]
        reason = f": {reasons[0][:150]}" if reasons else ""
        lines.append(f"- Not converged: {where}: {len(cell)} of {size} runs ({names}){reason}")
    if len(cells) > MAX_LISTED_CELLS:
        lines.append(f"- Not converged: {len(cells) - MAX_LISTED_CELLS} more cells (see `summary.csv`)")
    return lines


def _cell(job: Job, group_keys: list[str]) -> tuple[str, ...]:
    return tuple(fmt_value(job.overrides.get(key)) for key in group_keys)


def _failure(job: Job) -> str:
    error = str((job.summary or {}).get("error") or "").splitlines()
    return f"status {job.status}" + (f": {error[0][:150]}" if error else "")


def _figure_section(result: FigureResult) -> list[str]:
    lines = [f"### {result.spec.name}", ""]
    if result.path is not None:
        lines += [f"![{result.spec.name}]({result.path.name})", ""]
    lines += [f"- {reading}" for reading in result.readings]
    lines += [f"- **Warning:** {warning}" for warning in result.warnings]
    return lines + [""]


def _summary_table(summary: pd.DataFrame, group_keys: list[str], metrics: list[str]) -> str:
    if summary.empty:
        return "_No completed runs._"
    header = [*group_keys, "n", CONVERGED, *metrics]
    rows = []
    for _, row in summary.iterrows():
        cells = [fmt_value(row[key]) for key in group_keys] + [str(int(row["n"])), str(row[CONVERGED])]
        mark = " (not converged)" if row["stats_over"] != "converged" else ""
        for metric in metrics:
            mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
            cells.append((fmt(mean) if pd.isna(std) else f"{fmt(mean)} ± {fmt(std)}") + mark)
        rows.append(cells)
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in lines)


def _describe_key(key: str, jobs: list[Job]) -> str:
    values = sorted({job.overrides.get(key) for job in jobs}, key=sort_key)
    shown = ", ".join(fmt_value(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
    return f"`{key}` ({shown})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefopt report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun dir (its children are the jobs)")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: the sweep dir)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.sweep_dir, args.out)
    except (FileNotFoundError, ValueError) as error:
        print(f"prefopt report: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0
