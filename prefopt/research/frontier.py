"""The reward-KL frontier of a sweep (the DPO paper's Fig. 2): per run, the mean reward of the policy's
samples against KL(pi || pi_ref) estimated on the same samples, each with its standard error.

    python -m prefopt.research.frontier <sweep dir> [--reward aux_reward/vader]

Reads run dirs only: `summary.json` (eval/generate/kl_samples and its se, from the run's generation eval)
and `generations.jsonl` (the per-sample rewards, for the reward's se; the reference's samples give the
point at KL = 0). Writes `frontier.csv`, `frontier.png` and `REPORT.md` into the sweep dir.

Equal-KL comparison: each objective's curve is the reference point (KL 0: strength -> infinity) joined to
its runs in order of KL; at a few KL values inside every curve's range its reward is interpolated linearly,
se^2 = (1 - t)^2 se_a^2 + t^2 se_b^2 (independent points), and the best objective is compared with the next
by the difference over its combined se. The KL's own se is shown, not propagated.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from prefopt.files import atomic_write_text
from prefopt.research.sweep import load_sweep

REWARD = "aux_reward/vader"
KL, KL_SE = "eval/generate/kl_samples", "eval/generate/kl_samples_se"
COLUMNS = ["objective", "strength", "kl", "kl_se", "reward", "reward_se", "samples", "runtime_s", "run"]


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error std(ddof=1) / sqrt(n) (NaN below 2 values)."""
    x = np.asarray(values, dtype=np.float64)
    if not len(x):
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan


def sample_scores(run_dir: Path, model: str, reward: str) -> list[float]:
    """The reward of every sample of `model` (policy | reference) in the run's generations.jsonl."""
    path = run_dir / "generations.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [float(r["scores"][model][reward]) for r in rows if reward in r["scores"].get(model, {})]


def frontier_points(sweep_dir: Path, reward: str = REWARD) -> tuple[pd.DataFrame, dict]:
    """(one row per finished run: COLUMNS, the reference point {reward, reward_se, samples})."""
    rows, reference = [], {}
    for job in load_sweep(Path(sweep_dir)):
        final = (job.summary or {}).get("final_eval") or {}
        if KL not in final:
            continue
        objective = str(job.config.objective.name) if job.config is not None else "?"
        strength = job.overrides.get(
            "strength", job.config.get("strength") if job.config is not None else None
        )
        policy = sample_scores(job.path, "policy", reward)
        mean, se = mean_se(policy)
        runtime = (job.summary or {}).get("runtime_s", math.nan)
        rows.append(
            [objective, strength, final[KL], final.get(KL_SE, math.nan), mean, se, len(policy), runtime]
        )
        rows[-1].append(job.name)
        if not reference:  # the reference's samples: the same seed, prompts and model in every run
            ref_mean, ref_se = mean_se(sample_scores(job.path, "reference", reward))
            reference = {"reward": ref_mean, "reward_se": ref_se, "samples": len(policy)}
    points = pd.DataFrame(rows, columns=COLUMNS)
    points["strength"] = pd.to_numeric(points["strength"], errors="coerce")
    return points.sort_values(["objective", "strength"]).reset_index(drop=True), reference


def _curve(points: pd.DataFrame, reference: dict) -> pd.DataFrame:
    """One objective's points in order of KL, starting at the reference point (KL 0)."""
    start = pd.DataFrame([{"kl": 0.0, "reward": reference["reward"], "reward_se": reference["reward_se"]}])
    return pd.concat([start, points[["kl", "reward", "reward_se"]]]).sort_values("kl").reset_index(drop=True)


def interpolate(curve: pd.DataFrame, kl: float) -> tuple[float, float]:
    """(reward, se) of a curve at `kl`, linear between its neighbouring points."""
    x, y, s = curve["kl"].to_numpy(), curve["reward"].to_numpy(), curve["reward_se"].to_numpy()
    j = int(np.clip(np.searchsorted(x, kl), 1, len(x) - 1))
    t = 0.0 if x[j] == x[j - 1] else (kl - x[j - 1]) / (x[j] - x[j - 1])
    return float((1 - t) * y[j - 1] + t * y[j]), float(math.hypot((1 - t) * s[j - 1], t * s[j]))


def equal_kl_comparison(points: pd.DataFrame, reference: dict, fractions=(1 / 3, 2 / 3, 1.0)) -> pd.DataFrame:
    """At KL values inside every objective's range (fractions of the smallest largest KL): each
    objective's interpolated reward ± se, the best one, and its lead over the next with z = lead / se."""
    curves = {name: _curve(group, reference) for name, group in points.groupby("objective")}
    reach = min(c["kl"].max() for c in curves.values()) if curves else 0.0
    rows = []
    for fraction in fractions if reach > 0 else ():
        kl = fraction * reach
        values = {name: interpolate(curve, kl) for name, curve in curves.items()}
        ranked = sorted(values, key=lambda n: values[n][0], reverse=True)
        row = {"kl": kl} | {f"{n}": values[n][0] for n in ranked} | {f"{n}_se": values[n][1] for n in ranked}
        row["best"] = ranked[0]
        if len(ranked) > 1:
            (a, sa), (b, sb) = values[ranked[0]], values[ranked[1]]
            row |= {"next": ranked[1], "lead": a - b, "lead_se": math.hypot(sa, sb)}
            row["z"] = row["lead"] / row["lead_se"] if row["lead_se"] > 0 else math.inf
        rows.append(row)
    return pd.DataFrame(rows)


def verdict(comparison: pd.DataFrame) -> str:
    """Which objective reaches the higher reward at equal KL, and how sure the numbers let us be."""
    if comparison.empty:
        return "No comparison: fewer than one finished run per objective, or no KL above 0."
    lines = []
    for row in comparison.itertuples():
        if not hasattr(row, "lead"):
            lines.append(f"at KL {row.kl:.2f}: only {row.best}.")
            continue
        clear = "clear (> 2 se)" if row.z > 2 else "within noise (< 2 se)"
        lines.append(
            f"at KL {row.kl:.2f} nats: **{row.best}** highest, {row.lead:+.3f} ± {row.lead_se:.3f} over "
            f"{row.next} (z = {row.z:.1f}, {clear})"
        )
    bests = set(comparison["best"])
    zs = comparison["z"] if "z" in comparison else pd.Series([0.0])
    if len(bests) == 1 and (zs > 2).all():
        head = f"{bests.pop()} reaches the higher reward at equal KL at every compared KL, by more than 2 se."
    elif len(bests) == 1:
        head = (
            f"{next(iter(bests))} is ahead at every compared KL, but not everywhere by 2 se: the ranking is "
            "suggestive, not resolved at this sample size."
        )
    else:
        head = "The best objective changes with the KL: no single objective dominates at this sample size."
    return "\n".join([head, "", *[f"- {line}" for line in lines]])


def plot_frontier(points: pd.DataFrame, reference: dict, path: Path, reward: str = REWARD) -> Path:
    """One curve per objective: x KL ± se, y reward ± se, each point labelled with its strength; the
    reference at KL 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for color, (name, group) in zip(
        plt.rcParams["axes.prop_cycle"].by_key()["color"], points.groupby("objective")
    ):
        group = group.sort_values("kl")
        ax.plot(
            [0.0, *group["kl"]], [reference.get("reward", math.nan), *group["reward"]], color=color, alpha=0.4
        )
        ax.errorbar(
            group["kl"],
            group["reward"],
            xerr=group["kl_se"],
            yerr=group["reward_se"],
            fmt="o",
            color=color,
            label=name,
            capsize=3,
        )
        for row in group.itertuples():
            ax.annotate(
                f"{row.strength:g}",
                (row.kl, row.reward),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=color,
            )
    if reference:
        ax.errorbar(
            [0.0],
            [reference["reward"]],
            yerr=[reference["reward_se"]],
            fmt="*",
            color="black",
            markersize=10,
            capsize=3,
            label="reference",
        )
    ax.set_xlabel("KL(π || π_ref), nats (estimated on the policy's samples)")
    ax.set_ylabel(f"{reward.split('/')[-1]} reward of the policy's samples")
    ax.set_title("Reward-KL frontier (labels: strength)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(points: pd.DataFrame, reference: dict, comparison: pd.DataFrame, title: str) -> str:
    lines = [f"# {title}", "", "![frontier](frontier.png)", ""]
    lines += [
        "| objective | strength | KL ± se (nats) | reward ± se | samples | runtime (s) |",
        "|---|---|---|---|---|---|",
    ]
    if reference:
        lines.append(
            f"| reference | - | 0 | {reference['reward']:.3f} ± {reference['reward_se']:.3f} | "
            f"{reference['samples']} | - |"
        )
    for r in points.itertuples():
        lines.append(
            f"| {r.objective} | {r.strength:g} | {r.kl:.2f} ± {r.kl_se:.2f} "
            f"| {r.reward:.3f} ± {r.reward_se:.3f} | {r.samples} | {r.runtime_s:.0f} |"
        )
    lines += ["", "## Reward at equal KL", "", verdict(comparison), ""]
    return "\n".join(lines) + "\n"


def write_frontier_report(sweep_dir: Path, reward: str = REWARD) -> Path:
    """frontier.csv, frontier.png and REPORT.md in `sweep_dir`; returns REPORT.md's path."""
    sweep_dir = Path(sweep_dir)
    points, reference = frontier_points(sweep_dir, reward)
    points.to_csv(sweep_dir / "frontier.csv", index=False)
    plot_frontier(points, reference, sweep_dir / "frontier.png", reward)
    comparison = equal_kl_comparison(points, reference)
    title = f"Reward-KL frontier: {sweep_dir.name}"
    path = sweep_dir / "REPORT.md"
    atomic_write_text(path, markdown(points, reference, comparison, title))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m prefopt.research.frontier", description=__doc__.splitlines()[0]
    )
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--reward", default=REWARD, help="the per-sample score in generations.jsonl")
    args = parser.parse_args(argv)
    print(write_frontier_report(args.sweep_dir, args.reward))
    return 0


if __name__ == "__main__":
    sys.exit(main())
