"""`make reproduce`: rerun the papers' experiments, report each sweep, and check them against theory.

    python -m prefopt.reproduce [--out outputs/reproduce] [--only NAME ...] [override ...]

Each experiment is a `conf/experiment/*.yaml` swept through the real CLI (parallel local launcher); its
sweep dir gets `prefopt report`'s files, and `<out>/REPORT.md` gathers them with a comparison of the
EXPO toy results against the infinite-data minimizers of each objective (`prefopt.population`).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from prefopt.population import kl_divergence, population_minimizer, strength_key
from prefopt.report import load_sweep, write_report

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
            *extra,
            *overrides,
        ]
        print(f"[reproduce] {name}: {' '.join(command[3:])}", flush=True)
        subprocess.run(command, check=True)
    return write_report(sweep_dir)


def theory_check(sweep_dir: Path) -> list[str]:
    """Measured KL(pi* || pi_theta) (several contexts) or pi_theta(y_a) (one context) against the
    infinite-data minimizer, per objective and strength. Each run's minimizer uses that run's actual
    reference: the fitted LM's distribution over the candidates at step 0 (within the fit's KL of pi_ref)."""
    rows = []
    for job in load_sweep(sweep_dir):
        if job.status != "completed":
            continue
        objective, strength = job.overrides["objective"], float(job.overrides["strength"])
        start, final = job.summary["reference_eval"], job.summary["final_eval"]
        contexts = job.config.dataset.contexts
        for index, context in enumerate(contexts):
            pi_star = list(context.pi_star)
            pi_ref = [start[f"eval/pi_theta/p{index}/y{k}"] for k in range(len(pi_star))]
            minimizer = population_minimizer(
                objective, pi_star, pi_ref, **{strength_key(objective): strength}
            )
            measured = [final[f"eval/pi_theta/p{index}/y{k}"] for k in range(len(pi_star))]
            label = "single" if len(contexts) == 1 else ("good" if context.pi_ref is None else "bad")
            if len(contexts) > 1:  # preservation: KL(pi* || pi_theta)
                value, expected = final[f"eval/kl_star_{label}"], kl_divergence(pi_star, minimizer)
            else:  # interpolation: the best response's probability
                value, expected = measured[0], float(minimizer[0])
            rows.append(
                {
                    "objective": objective,
                    "strength": strength,
                    "context": label,
                    "measured": value,
                    "expected": expected,
                }
            )
    table = pd.DataFrame(rows).groupby(["objective", "strength", "context"], sort=True)
    lines = [
        "| objective | strength | context | measured (mean ± std, n) | infinite data (mean) "
        "| within 2 std + 0.01 |",
        "|---|---|---|---|---|---|",
    ]
    agree = 0
    for (objective, strength, label), group in table:
        mean, std, expected = (
            group["measured"].mean(),
            group["measured"].std(ddof=1),
            group["expected"].mean(),
        )
        ok = abs(mean - expected) <= 2 * std + 0.01
        agree += ok
        lines.append(
            f"| {objective} | {strength:g} | {label} | {mean:.4g} ± {std:.2g} (n={len(group)}) "
            f"| {expected:.4g} | {'yes' if ok else '**no**'} |"
        )
    quantity = "pi_theta(y_a)" if rows and rows[0]["context"] == "single" else "KL(pi* || pi_theta)"
    return [
        f"{quantity}: {agree} of {len(table)} cells agree with the infinite-data minimizer within "
        "2 std over seeds + 0.01.",
        "| within 2 std + 0.01 |",
        *lines,
    ]


def _embed(report: Path, name: str) -> str:
    """A sub-report's Markdown with its image links made relative to the top folder."""
    text = report.read_text()
    text = re.sub(r"\]\((?!https?:)([^)]+\.png)\)", lambda m: f"]({name}/{m.group(1)})", text)
    return re.sub(r"^#", "##", text, flags=re.MULTILINE)


EXPLANATION = """Where a cell disagrees, look for three causes. (1) Finite data: ~270 (preservation) or ~200
(interpolation) sampled pairs give empirical preference rates that differ from p*, so the trained policy
minimizes the empirical loss, not the population one; the std over seeds measures this. (2) Finite
training: DPO, IPO and f-DPO at small strength have minimizers on the edge of the simplex, reachable only
with unbounded logits. (3) Mass outside the candidates: the minimizers assume a policy normalized over the
candidates, but an LM can lower the probability of every candidate at once. DPO-style losses do (see
`eval/outside_mass`, near 1 for dpo and fdpo), and once pi_theta << pi_ref the Jensen-Shannon link
t(y) = log 2pi_theta - log(pi_theta + pi_ref) becomes log 2 + lp - lp_ref, so f-DPO trains exactly like
DPO: its cells then match DPO's, not the tabular f-DPO minimizer. EXPO's KL(pi_ref || pi_theta) term keeps
the mass on the candidates. The claims under test are the shapes: EXPO flat near 0 on the good context at
every strength and approaching pi* on the bad one as the strength shrinks; DPO/IPO moving away from pi* as
the strength shrinks; EXPO moving from pi* to pi_ref as the strength grows."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefopt.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/reproduce"))
    parser.add_argument("--only", action="append", choices=list(EXPERIMENTS), help="repeat to pick several")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every job, e.g. logger=none")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    sections = ["# prefopt: reproduced experiments", ""]
    for name in args.only or list(EXPERIMENTS):
        report = run_experiment(name, args.out, args.overrides)
        sections += [_embed(report, name), ""]
        if name.startswith("expo_"):
            sections += [
                f"### {name}: against the infinite-data minimizers",
                "",
                *theory_check(report.parent),
                "",
            ]
    sections += [
        "## Reading the theory checks",
        "| within 2 std + 0.01 |",
        EXPLANATION,
        "| within 2 std + 0.01 |",
        f"Total wall time: {time.perf_counter() - started:.0f} s.",
    ]
    path = args.out / "REPORT.md"
    path.write_text("\n".join(sections) + "\n")
    print(f"[reproduce] report: {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
