"""`make reproduce`: rerun the papers' experiments, report each sweep, and check them against theory.

    python -m prefopt.research.reproduce [--out outputs/reproduce] [--only NAME ...] [override ...]

Each experiment is a `conf/experiment/*.yaml` swept through the real CLI (parallel local launcher); its
sweep dir gets `prefopt report`'s files, and `<out>/REPORT.md` gathers them with a theory check of the
EXPO toy results: each run against the exact minimizer of its own training pairs (recorded by the run,
`prefopt.research.population`), cells with unconverged runs marked, and the finite-sample spread of those
minimizers beside the infinite-data one.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf

from prefopt.objectives import OBJECTIVES
from prefopt.progress import progress
from prefopt.research.figures import CONVERGED
from prefopt.research.formatting import fmt, fmt_value
from prefopt.research.population import (
    is_tabular,
    kl_divergence,
    population_minimizer,
    strength_key,
    total_variation,
)
from prefopt.research.report import converged_label, write_report
from prefopt.research.sweep import Job, job_value, load_sweep

log = logging.getLogger("prefopt.research.reproduce")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
TV_TOLERANCE = 0.01  # a converged run agrees with its own-pairs minimizer when their TV is at most this
KEYS = ["objective", "strength", "context"]  # a cell of the theory check
THEORY_COLUMNS = [*KEYS, "job", CONVERGED, "quantity", "measured", "own", "tv", "infinite"]
THEORY_HEADER = [
    "objective",
    "strength",
    "context",
    "converged",
    "measured (mean ± std)",
    "own-pairs minimizer (mean ± std)",
    "max TV to own minimizer",
    "infinite data",
    "verdict",
]

# experiment -> the sweeps it runs (extra overrides each); the swept values live in the experiment file.
EXPERIMENTS: dict[str, list[list[str]]] = {
    "expo_preservation": [[]],
    "expo_interpolation": [[]],
    "hpo_aux": [
        ["objective=dpo"],
        ["objective=hpo", "objective.gamma=0,0.25,0.5,1", "objective.actor_warmup_steps=50"],
    ],
}


def run_experiment(name: str, out: Path, overrides: list[str]) -> Path:
    """Run the experiment's sweeps through the real CLI and report them. The jobs log to their own
    train.log; the terminal gets one progress bar (or, off a terminal, one line per finished job)."""
    sweep_dir = out / name
    for index, extra in enumerate(EXPERIMENTS[name]):
        command = [
            sys.executable,
            "-m",
            "prefopt",
            "train",
            "-m",
            f"+experiment={name}",
            f"hydra.sweep.dir={sweep_dir}",
            f"hydra.sweep.subdir={index}_${{hydra.job.num}}",
            "+hydra.job_logging.handlers.console.level=WARNING",  # each job's log is in its train.log
            *extra,
            *overrides,
        ]
        log.info("%s: %s", name, " ".join(command[3:]))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        output = sweep_dir / f"sweep_{index}.log"
        with output.open("w") as sink:
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
            _follow(process, sweep_dir, f"{index}_", _job_count(name, [*extra, *overrides]), name)
        if process.returncode != 0:
            raise RuntimeError(f"{name}: the sweep failed (exit {process.returncode}); see {output}")
    return write_report(sweep_dir)


def _job_count(name: str, overrides: list[str]) -> int:
    """Jobs in one sweep: the product of the sweep sizes of the experiment's and the extra overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    params = OmegaConf.load(CONF_DIR / "experiment" / f"{name}.yaml").hydra.sweeper.params
    merged = {str(k): str(v) for k, v in params.items()}
    merged |= dict(o.split("=", 1) for o in overrides if "=" in o and not o.startswith("hydra."))
    count = 1
    for override in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in merged.items()]):
        count *= len(list(override.sweep_iterator())) if override.is_sweep_override() else 1
    return count


def _follow(process: subprocess.Popen, sweep_dir: Path, prefix: str, total: int, name: str) -> None:
    """Until `process` ends, report each job of the sweep whose summary.json appears."""
    seen: set[str] = set()
    with progress(total=total, desc=name, unit="job") as bar:
        while True:
            running = process.poll() is None
            for summary in sorted(sweep_dir.glob(f"{prefix}*/summary.json")):
                if summary.parent.name in seen:
                    continue
                seen.add(summary.parent.name)
                bar.update(1)
                if bar.disable:
                    log.info("%s: job %s finished (%d/%d)", name, summary.parent.name, len(seen), total)
            if not running:
                return
            time.sleep(1.0)


def theory_rows(jobs: list[Job]) -> tuple[pd.DataFrame, list[str]]:
    """One row per (completed run, context): the trained policy against the minimizer of the run's own
    training pairs (`summary.json` convergence.minimizer), and the infinite-data minimizer with the run's
    fitted reference (eval.json's step-0 pi_theta). Also notes on the runs left out (no tabular minimizer)."""
    rows, skipped = [], {}
    for job in jobs:
        if job.status != "completed":
            continue
        objective = str(job_value(job, "objective"))
        minimizers = job.convergence.get("minimizer")
        if not minimizers:
            skipped[objective] = skipped.get(objective, 0) + 1
            continue
        rows += _run_rows(job, objective, minimizers)
    notes = [
        f"Skipped {objective} ({count} runs): no minimizer of the run's own training pairs in its "
        "summary.json (no tabular minimizer, or a run dir without a convergence report)."
        for objective, count in sorted(skipped.items())
    ]
    return pd.DataFrame(rows, columns=THEORY_COLUMNS), notes


def _run_rows(job: Job, objective: str, minimizers: list[list[float]]) -> list[dict]:
    final, start, strength = job.detail("final"), job.detail("reference"), job_value(job, "strength")
    contexts = _contexts(job, len(minimizers))
    rows = []
    for index, (minimizer, (label, pi_star)) in enumerate(zip(minimizers, contexts)):
        policy, pi_ref = _policy(final, index, len(minimizer)), _policy(start, index, len(minimizer))
        quantity, value = _value_function(pi_star, len(contexts))
        rows.append(
            {
                "objective": objective,
                "strength": strength,
                "context": label,
                "job": job.name,
                CONVERGED: job.converged,
                "quantity": quantity,
                "measured": value(policy),
                "own": value(minimizer),
                "tv": math.nan if policy is None else total_variation(policy, minimizer),
                "infinite": value(_infinite(objective, strength, pi_star, pi_ref)),
            }
        )
    return rows


def theory_cells(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (objective, strength, context): converged "k/n", measured and own-pairs values (mean, std), max
    TV, the infinite-data value and the verdict ("not converged (k/n)", "agrees" or "disagrees")."""
    cells = []
    for (objective, strength, context), group in rows.groupby(KEYS, dropna=False):
        label = converged_label(group)
        if group[CONVERGED].eq(False).any():
            verdict = f"not converged ({label})"
        elif group["tv"].isna().any():
            verdict = "no data"
        else:
            verdict = "agrees" if (group["tv"] <= TV_TOLERANCE).all() else "disagrees"
        cells.append(
            {
                "objective": objective,
                "strength": strength,
                "context": context,
                CONVERGED: label,
                "measured_mean": group["measured"].mean(),
                "measured_std": group["measured"].std(ddof=1),
                "own_mean": group["own"].mean(),
                "own_std": group["own"].std(ddof=1),
                "max_tv": group["tv"].max(),
                "infinite": group["infinite"].mean(),
                "verdict": verdict,
            }
        )
    return pd.DataFrame(cells)


def theory_markdown(cells: pd.DataFrame, notes: list[str], quantity: str) -> list[str]:
    """The headline sentence, the table and the notes, as Markdown lines (blank lines around the table)."""
    verdicts = cells["verdict"] if len(cells) else pd.Series(dtype=str)
    agree, disagree = int(verdicts.eq("agrees").sum()), int(verdicts.eq("disagrees").sum())
    unconverged = int(verdicts.str.startswith("not converged").sum())
    lines = [
        f"Measured: {quantity}, mean ± std over seeds. Each run's policy (renormalised over the candidates) "
        "is compared with the exact minimizer of its own training pairs; a run agrees when their total "
        f"variation (TV) is at most {TV_TOLERANCE:g}. The own-pairs minimizers' spread over seeds is the "
        "finite-sample error; 'infinite data' is the population minimizer with the run's fitted reference.",
        "",
        f"**{agree} of {len(cells)} cells agree with the minimizer of their own training pairs "
        f"(TV <= {TV_TOLERANCE:g}); {unconverged} not converged; {disagree} disagree.**",
        "",
    ]
    header = list(THEORY_HEADER)
    table = [header, ["---"] * len(header)]
    for cell in cells.itertuples():
        table.append(
            [
                str(cell.objective),
                fmt_value(cell.strength),
                str(cell.context),
                str(cell.converged),
                _mean_std(cell.measured_mean, cell.measured_std),
                _mean_std(cell.own_mean, cell.own_std),
                fmt(cell.max_tv),
                fmt(cell.infinite),
                "**disagrees**" if cell.verdict == "disagrees" else cell.verdict,
            ]
        )
    lines += ["| " + " | ".join(row) + " |" for row in table] if len(cells) else ["_No cell to check._"]
    return lines + [""] + [f"- {note}" for note in notes]


def theory_check(sweep_dir: Path) -> list[str]:
    """The theory check of one sweep as Markdown lines."""
    jobs = load_sweep(sweep_dir)
    rows, notes = theory_rows(jobs)
    quantity = " or ".join(dict.fromkeys(rows["quantity"])) or "nothing"
    return theory_markdown(theory_cells(rows), notes, quantity)


def _contexts(job: Job, num_prompts: int) -> list[tuple[str, list[float] | None]]:
    """(label, pi*) per prompt: 'single' for a one-context task, else 'good'/'bad' (with the prompt index
    when labels repeat), from the config's contexts or the task recorded in eval.json; pi* None when
    neither has it (an old run dir of a drawn task)."""
    listed = OmegaConf.select(job.config, "dataset.contexts", default=None) if job.config else None
    task = job.evals.get("task") or {}  # a drawn task: the ground truth the run recorded
    if listed and len(listed) == num_prompts:
        stars = [list(context.pi_star) for context in listed]
        kinds = ["good" if c.pi_ref is None or list(c.pi_ref) == s else "bad" for c, s in zip(listed, stars)]
    elif len(task.get("pi_star") or []) == num_prompts:
        stars = task["pi_star"]
        kinds = ["good" if good else "bad" for good in task["good"]]
    else:
        return [(f"p{i}", None) for i in range(num_prompts)]
    if num_prompts == 1:
        return [("single", stars[0])]
    repeated = len(set(kinds)) < len(kinds)
    return [(f"p{i} {kind}" if repeated else kind, star) for i, (kind, star) in enumerate(zip(kinds, stars))]


def _policy(metrics: dict[str, float], index: int, size: int) -> list[float] | None:
    """pi_theta over prompt `index`'s candidates, renormalised; None when eval.json lacks it."""
    values = [metrics.get(f"eval/pi_theta/p{index}/y{k}") for k in range(size)]
    if any(v is None for v in values) or sum(values) <= 0:
        return None
    return [v / sum(values) for v in values]


def _value_function(pi_star: list[float] | None, num_contexts: int):
    """(name, pi -> value): KL(pi* || pi) on a task with several contexts and a known pi*, else pi(y_0)."""
    if pi_star is not None and num_contexts > 1:

        def kl(pi: list[float] | None) -> float:
            if pi is None:
                return math.nan
            return max(0.0, kl_divergence(pi_star, torch.tensor(pi, dtype=torch.float64)))  # no -1e-17

        return "KL(pi* || pi_theta)", kl
    return "pi_theta(y_0)", lambda pi: math.nan if pi is None else float(pi[0])


def _infinite(objective: str, strength, pi_star, pi_ref) -> list[float] | None:
    """The infinite-data minimizer; None where pi*, the reference or a tabular loss is unknown."""
    known = pi_star is not None and pi_ref is not None and isinstance(strength, float)
    if not known or objective not in OBJECTIVES or not is_tabular(objective):
        return None
    hparams = {strength_key(objective): float(strength)}
    return population_minimizer(objective, pi_star, pi_ref, **hparams).tolist()


def _mean_std(mean: float, std: float) -> str:
    return fmt(mean) if pd.isna(std) else f"{fmt(mean)} ± {fmt(std)}"


def _embed(report: Path, name: str) -> str:
    """A sub-report's Markdown with its image links made relative to the top folder."""
    text = report.read_text()
    text = re.sub(r"\]\((?!https?:)([^)]+\.png)\)", lambda m: f"]({name}/{m.group(1)})", text)
    return re.sub(r"^#", "##", text, flags=re.MULTILINE)


EXPLANATION = """Each run is compared with the exact minimizer of the loss on its own training pairs (the
run's empirical pair table and fitted reference, `prefopt/research/population.py`), so the sampling noise of a
finite data set no longer counts for or against it: a converged run reaches that minimizer to within the
TV tolerance, whatever its seed drew. The finite-sample error is reported on its own: ~270 (preservation)
or ~200 (interpolation) sampled pairs give empirical preference rates that differ from p*, so the own-pairs
minimizers scatter (their mean ± std over seeds) around the infinite-data minimizer. A cell where any run
did not converge (reasons in the experiment's header above) reads "not converged", not "agrees" or
"disagrees": its numbers say nothing about the objective. DPO, IPO and f-DPO at small strength have
minimizers near the edge of the simplex, reachable only with large logits, which is where convergence is
hardest: there the loss can be flat long before the policy reaches the minimizer (its sigmoids saturate),
so a run can pass the convergence tests and still read "disagrees". A "disagrees" with every run converged
is otherwise a real finding. One known cause is mass outside the
candidates: the minimizers assume a policy normalised over the candidates, but an LM can lower the
likelihood of every candidate at once, and DPO-style losses do (a known DPO behaviour; `eval/outside_mass`
in the tables and figures, near 1 for dpo and fdpo). DPO's loss depends only on differences of log-probs,
which a shared fall does not change, but once pi_theta << pi_ref the Jensen-Shannon link
t(y) = log 2pi_theta - log(pi_theta + pi_ref) becomes log 2 + lp - lp_ref, so f-DPO then trains exactly like
DPO and not towards the tabular f-DPO minimizer. EXPO's KL(pi_ref || pi_theta) term keeps the mass on the
candidates. The claims under test are the shapes: EXPO flat near 0 on the good context at every strength
and approaching pi* on the bad one as the strength shrinks; DPO/IPO moving away from pi* as the strength
shrinks; EXPO moving from pi* to pi_ref as the strength grows."""


def assemble_report(out: Path, names: list[str], wall_s: float | None = None) -> Path:
    """`<out>/REPORT.md`: each experiment's report (from `<out>/<name>/REPORT.md`), with the theory check
    under the EXPO ones, and how to read the checks."""
    sections = ["# prefopt: reproduced experiments", ""]
    for name in names:
        sections += [_embed(out / name / "REPORT.md", name), ""]
        if name.startswith("expo_"):
            title = f"### {name}: against the minimizers of each run's own training pairs"
            sections += [title, "", *theory_check(out / name), ""]
    sections += ["## Reading the theory checks", "", EXPLANATION, ""]
    sections += [f"Total wall time: {wall_s:.0f} s."] if wall_s is not None else []
    path = out / "REPORT.md"
    path.write_text("\n".join(sections).rstrip() + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m prefopt.research.reproduce", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/reproduce"))
    parser.add_argument("--only", action="append", choices=list(EXPERIMENTS), help="repeat to pick several")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every job, e.g. logger=none")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    started = time.perf_counter()
    names = args.only or list(EXPERIMENTS)
    for name in names:
        run_experiment(name, args.out, args.overrides)
    path = assemble_report(args.out, names, time.perf_counter() - started)
    log.info("report: %s", path.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
