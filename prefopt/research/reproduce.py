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
import re
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from prefopt.files import atomic_write_text
from prefopt.progress import progress
from prefopt.research.report import write_report
from prefopt.research.theory import EXPLANATION, theory_check

log = logging.getLogger("prefopt.research.reproduce")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
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


def _embed(report: Path, name: str) -> str:
    """A sub-report's Markdown with its image links made relative to the top folder."""
    text = report.read_text()
    text = re.sub(r"\]\((?!https?:)([^)]+\.png)\)", lambda m: f"]({name}/{m.group(1)})", text)
    return re.sub(r"^#", "##", text, flags=re.MULTILINE)


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
    atomic_write_text(path, "\n".join(sections).rstrip() + "\n")
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
