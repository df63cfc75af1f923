"""`make reproduce`: rerun the papers' experiments, report each sweep, and check them against theory.

    python -m prefopt.research.reproduce [--out outputs/reproduce] [--only NAME ...] [override ...]

Each experiment is a `conf/experiment/*.yaml` swept through the real CLI (parallel local launcher); its
sweep dir gets `prefopt report`'s files, and `<out>/REPORT.md` gathers them with a theory check of the
EXPO toy results: each run against the exact minimizer of its own training pairs (recorded by the run,
`prefopt.evaluation.population`), cells with unconverged runs marked, and the finite-sample spread of those
minimizers beside the infinite-data one.

`--only sentiment_frontier` (`make reproduce-real`) runs the real-LM experiment instead (SmolLM2-135M on
CPU; `sentiment_frontier_gpu` at the paper's scale): its pairs are sampled once
(`prefopt.research.sampled_pairs`) and passed to every run as `dataset.pairs_path`, and its section is the
reward-KL frontier (`prefopt.research.frontier`).
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

from prefopt import CONF_DIR
from prefopt.files import atomic_write_text
from prefopt.progress import progress
from prefopt.research.report import write_report
from prefopt.research.theory import EXPLANATION, theory_check

log = logging.getLogger("prefopt.research.reproduce")
EXPERIMENTS: dict[str, list[list[str]]] = {
    "expo_preservation": [[]],
    "expo_interpolation": [[]],
    "hpo_aux": [
        ["objective=dpo"],
        ["objective=hpo", "objective.gamma=0,0.25,0.5,1", "objective.actor_warmup_steps=50"],
    ],
}
# The reward-KL frontier: each objective at strengths from far (0.05) to near (5) the reference; EXPO's lam
# is on its own scale. HPO's auxiliary reward is readability (the pairs' sentiment is its preference).
FRONTIER_SWEEPS = [
    ["objective=dpo,ipo", "strength=0.05,0.5,5"],
    [
        "objective=expo",
        "kl=token",
        "objective.length_normalize=true",
        "strength=0.03,0.3,3",
    ],
    [
        "objective=hpo",
        "aux_reward=[vader,readability]",
        "aux_reward.vader.weight=0",
        "objective.actor_warmup_steps=4",
        "strength=0.05,0.5,5",
    ],
]
REAL_EXPERIMENTS: dict[str, list[list[str]]] = {
    "sentiment_frontier": FRONTIER_SWEEPS,
    "sentiment_frontier_gpu": FRONTIER_SWEEPS,
}
SWEEPS = EXPERIMENTS | REAL_EXPERIMENTS


def run_experiment(name: str, out: Path, overrides: list[str]) -> Path:
    """Run the experiment's sweeps through the real CLI and report them. The jobs log to their own
    train.log; the terminal gets one progress bar (or, off a terminal, one line per finished job)."""
    sweep_dir = out / name
    if name in REAL_EXPERIMENTS:  # the pairs once, for every run
        pairs = _sampled_pairs(name, sweep_dir, overrides)
        # the row limits chose the prompts; the runs read every pair sampled from them
        limits = ["dataset.max_train_examples=null", "dataset.max_eval_examples=null"]
        overrides = [*overrides, f"dataset.pairs_path={pairs}", *limits]
    for index, extra in enumerate(SWEEPS[name]):
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
    if name in REAL_EXPERIMENTS:
        from prefopt.research.frontier import write_frontier_report

        return write_frontier_report(sweep_dir)
    return write_report(sweep_dir)


def _sampled_pairs(name: str, sweep_dir: Path, overrides: list[str]) -> Path:
    """The experiment's pairs, sampled once from its starting model (no adapters), as a pairs dir."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from prefopt.config import load_run_config, register_resolvers
    from prefopt.research.sampled_pairs import precompute_pairs

    register_resolvers()
    parsed = OverridesParser.create().parse_overrides(overrides)
    logger = [o for o in parsed if o.key_or_group.partition(".")[0] == "logger"]  # the sampling logs nowhere
    job = [o.input_line for o in parsed if not o.is_hydra_override() and o not in logger]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", [f"+experiment={name}", *job, "model.lora.r=0", "logger=none"])
    started = time.perf_counter()
    path = precompute_pairs(load_run_config(cfg), sweep_dir / "pairs")
    log.info("%s: pairs in %s (%.0f s)", name, path, time.perf_counter() - started)
    return path.resolve()


def _job_count(name: str, overrides: list[str]) -> int:
    """Jobs in one sweep: the product of the sweep sizes of the experiment's and the extra overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    params = OmegaConf.load(CONF_DIR / "experiment" / f"{name}.yaml").hydra.sweeper.params
    swept = parser.parse_overrides([f"{key}={value}" for key, value in params.items()])
    swept += [o for o in parser.parse_overrides(overrides) if not o.is_hydra_override()]
    by_key = {override.key_or_group: override for override in swept}  # a later one replaces an earlier one
    count = 1
    for override in by_key.values():
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
    under the EXPO ones, and how to read the checks. Experiments run earlier into `out` (the toy ones for
    `make reproduce-real`, the frontier for `make reproduce`) keep their sections."""
    earlier = [n for n in SWEEPS if n not in names and (out / n / "REPORT.md").is_file()]
    names = [n for n in SWEEPS if n in names or n in earlier]
    sections = ["# prefopt: reproduced experiments", ""]
    for name in names:
        sections += [_embed(out / name / "REPORT.md", name), ""]
        if name.startswith("expo_"):
            title = f"### {name}: against the minimizers of each run's own training pairs"
            sections += [title, "", *theory_check(out / name), ""]
    if any(n.startswith("expo_") for n in names):
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
    parser.add_argument(
        "--only", action="append", choices=list(SWEEPS), help="repeat to pick several (default: the toy ones)"
    )
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
