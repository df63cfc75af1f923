"""What a run reports besides its metrics: the closing table, the one-line brief of a metrics dict, and
the generation-based evaluation's files."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra

from prefopt.config import RunConfig
from prefopt.files import atomic_write_text

log = logging.getLogger(__name__)
CLOSING_ROWS = {  # the closing summary: reference (step 0) beside final
    "held-out accuracy": "eval/rewards/accuracies",
    "win rate vs reference": "eval/win_rate",
    "KL(pi* || pi_theta)": "eval/kl_star",
    "outside mass": "eval/outside_mass",
    "oracle reward": "eval/oracle_reward",
    "aux reward": "eval/aux_reward",
    "held-out loss": "eval/loss",
}


def generation_eval(rc: RunConfig, run, run_dir: Path, device, tracker, step: int | None = None) -> dict:
    """eval/generate/* metrics, logged at `step` (None: trainer.max_steps); samples and judgements to
    generations.jsonl and a W&B table."""
    from prefopt.evaluation.generation import evaluate_generations, markdown_table, write_samples

    cfg = rc.eval.generation
    judge = None
    if cfg.judge == "llm":
        from prefopt.config import LLMJudgeConfig
        from prefopt.evaluation.judges import LLMJudge
        from prefopt.schema import validate

        options = validate(LLMJudgeConfig, cfg.llm, "eval.generation.llm")
        judge = LLMJudge(options, run_dir / "judge_cache")
    metrics, samples, scores, judgements = evaluate_generations(run, cfg, rc.seed, device, judge)
    rows = write_samples(run_dir / "generations.jsonl", samples, scores, judgements)
    atomic_write_text(run_dir / "generation_eval.md", markdown_table(metrics, len(rows)))
    tracker.log(metrics, rc.trainer.max_steps if step is None else step)
    tracker.table("eval/generations", ["prompt", "policy", "reference", "chosen"], rows)
    return metrics


BRIEF = ["loss", "rewards/accuracies", "rewards/margins", "win_rate", "kl_star", "outside_mass", "grad_norm"]
BRIEF += ["lr", "tokens_per_s"]


def brief(metrics: dict) -> str:
    """The telling part of a metrics dict for one log line (the rest is in metrics.jsonl and eval.json)."""
    values = {k.split("/", 1)[1]: v for k, v in metrics.items() if "/" in k}
    return ", ".join(f"{k}={values[k]:.4g}" for k in BRIEF if k in values)


def log_closing_summary(rc: RunConfig, summary: dict, run_dir: Path) -> None:
    start, final = summary["reference_eval"], summary["final_eval"]
    lines = [f"finished {run_name(rc)} in {summary['runtime_s']:.0f} s; run dir: {run_dir}"]
    lines.append(f"  {'':24} {'reference':>10} {'final':>10}")
    for label, key in CLOSING_ROWS.items():
        if key in final:
            before = f"{start[key]:.4g}" if key in start else "-"
            lines.append(f"  {label:24} {before:>10} {final[key]:>10.4g}")
    convergence = summary["convergence"]
    verdict = {True: "yes", False: "no", None: "not judged"}[convergence["converged"]]
    lines.append(f"  converged: {verdict}" + "".join(f"; {r}" for r in convergence["reasons"]))
    if convergence["tv_to_minimizer"] is not None:
        lines.append(f"  TV to the minimizer of its own training pairs: {convergence['tv_to_minimizer']:.4f}")
    log.info("\n".join(lines))


def run_name(rc: RunConfig) -> str:
    try:
        overrides = [
            o for o in hydra.core.hydra_config.HydraConfig.get().overrides.task if not o.startswith("hydra")
        ]
    except ValueError:
        overrides = []
    return " ".join([rc.objective_name, *overrides])
