"""Reading a Hydra multirun for `prefopt report`: its job dirs (overrides, config, summary.json, eval.json)
as `Job`s, a job's value for a key, and the runs and eval-history frames built from them. A job whose
summary.json is damaged, or says completed without its final eval, counts as failed (one warning naming
the file), never as completed."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from prefopt.config.overrides import parse_error
from prefopt.files import DamagedFile, read_json
from prefopt.research.figures import CONVERGED
from prefopt.research.formatting import fmt_value

log = logging.getLogger(__name__)
OUTSIDE_MASS = "eval/outside_mass"  # always in the summary table when present
PER_PROMPT = re.compile(r"/p\d+(/|$)")  # a per-prompt metric: eval/pi_theta/p0/y1, eval/outside_mass/p3
CONVERGENCE_VALUES = [
    "loss_change_last_10pct",
    "final_grad_norm",
    "grad_norm_ratio",
    "outside_mass",
    "tv_to_minimizer",
]


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
    summary, problem = _read_summary(path / "summary.json")
    raw = _read(path / ".hydra" / "overrides.yaml", OmegaConf.load)
    raw = list(raw) if raw is not None else (summary or {}).get("overrides") or []
    evals = _read(path / "eval.json", read_json) if summary else None
    evals = evals if isinstance(evals, dict) else {}
    overrides = dict(pair for pair in map(_job_override, raw) if pair is not None)
    return Job(path.name, path, overrides, config, summary, problem, evals.get("history") or [], evals)


def _read_summary(file: Path) -> tuple[dict | None, str]:
    """(summary.json's content, why there is none): (None, "no summary.json") when absent; a damaged or
    incomplete one becomes a failed run's summary whose error names the file, with one warning."""
    if not file.is_file():
        return None, "no summary.json"
    try:
        summary = read_json(file)
        problem = "" if isinstance(summary, dict) else f"{file}: damaged (not a JSON object)"
    except (DamagedFile, OSError) as error:
        summary, problem = None, str(error)
    completed = not problem and summary.get("status") == "completed"
    if completed and not isinstance(summary.get("final_eval"), dict):
        problem = f"{file}: incomplete (says completed, holds no final_eval)"
    if not problem:
        return summary, ""
    log.warning("%s: counted as a failed run", problem)
    return {"status": "failed", "error": problem}, ""


def parse_override(text: str) -> tuple[str, Any] | None:
    """(key, value) that an override sets, as Hydra's parser types it: `+objective.beta=0.1` ->
    ("objective.beta", 0.1), `seed=1` -> ("seed", 1), `trainer.packing=false` -> ("trainer.packing", False),
    `trainer.resume=null` -> ("trainer.resume", None). A list or dict stays text in Hydra's form, a sweep the
    text it was written as (so values group and sort). None for a deletion (`~key`): it sets nothing. A
    malformed override is a ValueError naming it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        (override,) = OverridesParser.create().parse_overrides([text])
    except HydraException as error:
        raise ValueError(f"malformed override {text!r}: {parse_error(error)}") from None
    if override.is_delete():
        return None
    key = override.key_or_group if override.package is None else f"{override.key_or_group}@{override.package}"
    if override.is_sweep_override():
        return key, override.get_value_string().strip()
    value = override.value()
    return key, override.get_value_element_as_str() if isinstance(value, list | dict) else value


def _job_override(item: Any) -> tuple[str, Any] | None:
    """parse_override of one line of a job's overrides.yaml; a malformed one is left out with a warning (a
    report must not fail on one hand-edited job)."""
    try:
        return parse_override(str(item))
    except ValueError as error:
        log.warning("%s: left out of the report's keys", error)
        return None


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


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _read(path: Path, reader) -> Any:
    """`reader(path)`, or None when the file is absent or unreadable (a report must not crash on one job)."""
    try:
        return reader(path) if path.is_file() else None
    except (OSError, ValueError, OmegaConfBaseException):
        return None
