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
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from prefopt import report_figures as figures
from prefopt.report_figures import CONVERGED, FigureResult, FigureSpec, fmt, fmt_value, sort_key

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
OUTSIDE_MASS = "eval/outside_mass"  # always in the summary table when present
PER_PROMPT = re.compile(r"/p\d+(/|$)")  # a per-prompt metric: eval/pi_theta/p0/y1, eval/outside_mass/p3
CONVERGENCE_VALUES = [
    "loss_change_last_10pct",
    "final_grad_norm",
    "grad_norm_ratio",
    "outside_mass",
    "tv_to_minimizer",
]
MAX_LISTED_CELLS = 20


@dataclass
class Job:
    """One job dir of a sweep, as read from disk."""

    name: str
    path: Path
    overrides: dict[str, Any]
    config: DictConfig | None
    summary: dict | None  # None when summary.json is absent or unreadable
    problem: str = ""  # why there is no summary
    history: list[dict] = field(default_factory=list)
    evals: dict = field(default_factory=dict)  # eval.json: "final" and "reference" with per-prompt detail

    @property
    def status(self) -> str:
        return "missing" if self.summary is None else str(self.summary.get("status", "unknown"))

    @property
    def convergence(self) -> dict:
        section = (self.summary or {}).get("convergence")
        return section if isinstance(section, dict) else {}

    @property
    def converged(self) -> bool | None:
        """The run's convergence verdict; None when it could not be judged or was not recorded."""
        verdict = self.convergence.get("converged")
        return verdict if isinstance(verdict, bool) else None

    def detail(self, section: str) -> dict[str, float]:
        """Metrics of eval.json's `final` or `reference`, falling back to summary.json (old run dirs)."""
        fallback = {"final": "final_eval", "reference": "reference_eval"}[section]
        return flat_metrics((self.summary or {}).get(fallback)) | flat_metrics(self.evals.get(section))


def load_sweep(sweep_dir: Path) -> list[Job]:
    """Every job dir under `sweep_dir`, numeric names in numeric order."""
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep dir not found: {sweep_dir}")
    dirs = [d for d in sweep_dir.iterdir() if d.is_dir() and (d / ".hydra").is_dir()]
    if not dirs:
        raise ValueError(f"no job dirs (children with a .hydra/ dir) in {sweep_dir}")
    dirs.sort(key=lambda d: (0, int(d.name), "") if d.name.isdigit() else (1, 0, d.name))
    return [load_job(d) for d in dirs]


def load_job(path: Path) -> Job:
    config = _read(path / ".hydra" / "config.yaml", OmegaConf.load)
    summary, problem = None, "no summary.json"
    if (path / "summary.json").is_file():
        summary = _read(path / "summary.json", lambda p: json.loads(p.read_text()))
        problem = "" if isinstance(summary, dict) else "unreadable summary.json"
        summary = summary if isinstance(summary, dict) else None
    raw = _read(path / ".hydra" / "overrides.yaml", OmegaConf.load)
    raw = list(raw) if raw is not None else (summary or {}).get("overrides") or []
    evals = _read(path / "eval.json", lambda p: json.loads(p.read_text())) if summary else None
    evals = evals if isinstance(evals, dict) else {}
    overrides = dict(parse_override(str(item)) for item in raw if "=" in str(item))
    return Job(path.name, path, overrides, config, summary, problem, evals.get("history") or [], evals)


def parse_override(text: str) -> tuple[str, Any]:
    """`+objective.beta=0.1` -> ("objective.beta", 0.1): numbers become floats, everything else a string."""
    key, _, value = text.partition("=")
    value = value.strip().strip("'\"")
    try:
        number = float(value)
    except ValueError:
        return key.lstrip("+~").strip(), value
    return key.lstrip("+~").strip(), number


def job_value(job: Job, key: str) -> Any:
    """A scalar for `key`: the job's override, else its config value (unresolvable -> None), else summary."""
    if key in job.overrides:
        return job.overrides[key]
    value = None
    if job.config is not None:
        try:
            value = OmegaConf.select(job.config, key, default=None, throw_on_missing=False)
        except OmegaConfBaseException:  # e.g. an interpolation whose resolver only exists at train time
            value = None
    if value is None or isinstance(value, DictConfig) or OmegaConf.is_list(value):
        value = (job.summary or {}).get(key)
    if isinstance(value, (bool, str)):
        return value
    return float(value) if isinstance(value, (int, float)) else None


def flat_metrics(values: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a (possibly nested) dict, nested keys joined with '/'."""
    flat: dict[str, float] = {}
    for key, value in (values or {}).items() if isinstance(values, dict) else []:
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flat_metrics(value, f"{name}/")
        elif isinstance(value, (int, float)):
            flat[name] = float(value)
    return flat


def runs_frame(jobs: list[Job]) -> pd.DataFrame:
    """One row per job: job, override keys, status, runtime_s, the convergence report (`converged` and its
    numbers) and the final eval and train metrics, without per-prompt metrics."""
    rows = []
    for job in jobs:
        summary = job.summary or {}
        metrics = flat_metrics(summary.get("final_eval")) | flat_metrics(summary.get("final_train"))
        metrics = {key: value for key, value in metrics.items() if not PER_PROMPT.search(key)}
        numbers = {key: _number(job.convergence.get(key)) for key in CONVERGENCE_VALUES}
        if OUTSIDE_MASS in metrics:
            del numbers["outside_mass"]
        status = {
            "status": job.status,
            "runtime_s": _number(summary.get("runtime_s")),
            CONVERGED: job.converged,
        }
        rows.append({"job": job.name, **job.overrides, **status, **numbers, **metrics})
    return pd.DataFrame(rows)


def with_detail(runs: pd.DataFrame, jobs: list[Job], metrics: list[str]) -> pd.DataFrame:
    """`runs` plus a column per named metric it lacks, read from each job's eval.json (per-prompt detail)."""
    by_name = {job.name: job for job in jobs}
    details = {name: job.detail("final") for name, job in by_name.items()}
    missing = [m for m in dict.fromkeys(metrics) if m not in runs.columns]
    return runs.assign(**{m: [details[name].get(m, math.nan) for name in runs["job"]] for m in missing})


def swept_keys(jobs: list[Job]) -> list[str]:
    """Override keys that take more than one value across jobs (a key absent from some jobs counts)."""
    keys = list(dict.fromkeys(key for job in jobs for key in job.overrides))
    return [key for key in keys if len({fmt_value(job.overrides.get(key)) for job in jobs}) > 1]


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


def history_frame(jobs: list[Job]) -> pd.DataFrame:
    """One row per eval step of each job: job, step and the numeric metrics logged there."""
    rows = [{"job": job.name, **flat_metrics(entry)} for job in jobs for entry in job.history]
    return pd.DataFrame([row for row in rows if "step" in row])


def reference_value(ref: Any, jobs: list[Job]) -> float | None:
    """A number, or '<summary section>/<metric>' averaged over the jobs that have it (reference_eval and
    final_eval metrics also from eval.json, which holds the per-prompt ones)."""
    if isinstance(ref, (int, float)) and not isinstance(ref, bool):
        return float(ref)
    section, _, metric = str(ref).partition("/")
    detail = {"reference_eval": "reference", "final_eval": "final"}.get(section)
    read = [job.detail(detail) if detail else flat_metrics(job.summary.get(section)) for job in jobs]
    values = [found.get(metric) for job, found in zip(jobs, read) if job.summary]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def report_node(jobs: list[Job]) -> dict:
    """The `report:` node of the first completed job's config, as plain data ({} when absent)."""
    for job in jobs:
        if job.config is None:
            continue
        node = OmegaConf.select(job.config, "report", default=None, throw_on_missing=False)
        if not isinstance(node, DictConfig):
            return {}
        try:
            return OmegaConf.to_container(node, resolve=True)
        except OmegaConfBaseException:
            return OmegaConf.to_container(node, resolve=False)
    return {}


def write_report(sweep_dir: Path, out_dir: Path | None = None) -> Path:
    """Write runs.csv, summary.csv, the figures and REPORT.md for a sweep; returns REPORT.md's path."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir
    jobs = load_sweep(sweep_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = runs_frame(jobs)
    runs.to_csv(out_dir / "runs.csv", index=False)

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
    summary.to_csv(out_dir / "summary.csv", index=False)

    by_name = {job.name: job for job in completed}
    for key in dict.fromkeys(k for spec in specs for k in spec.keys_used()):
        done[key] = [job_value(by_name[name], key) for name in done["job"]]
    results = [_figure(spec, done, history, group_keys, completed, out_dir) for spec in specs]

    text = _markdown(sweep_dir, node, jobs, swept, summary, group_keys, metrics, results)
    path = out_dir / "REPORT.md"
    path.write_text(text)
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


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _read(path: Path, reader) -> Any:
    """`reader(path)`, or None when the file is absent or unreadable (a report must not crash on one job)."""
    try:
        return reader(path) if path.is_file() else None
    except (OSError, ValueError, OmegaConfBaseException):
        return None


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
