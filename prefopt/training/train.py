"""`prefopt train`: the Hydra entry point and the one training loop every objective shares.

The loop reads top to bottom: schedule, micro-batches, forward, loss, backward, clip, step, log, eval,
checkpoint. It never looks at the objective's name; what an objective needs is built in `prepare`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from prefopt.config import ConfigError, RunConfig, load_run_config

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
CLOSING_ROWS = {  # the closing summary: reference (step 0) beside final
    "held-out accuracy": "eval/rewards/accuracies",
    "win rate vs reference": "eval/win_rate",
    "KL(pi* || pi_theta)": "eval/kl_star",
    "outside mass": "eval/outside_mass",
    "oracle reward": "eval/oracle_reward",
    "aux reward": "eval/aux_reward",
    "held-out loss": "eval/loss",
}


def _adamw(groups, cfg):
    import torch

    return torch.optim.AdamW(groups, betas=tuple(cfg.adam_betas))


def _rmsprop(groups, cfg):
    import torch

    return torch.optim.RMSprop(groups)  # HPO's (lr and weight decay come from the groups)


OPTIMIZERS = {"adamw": _adamw, "rmsprop": _rmsprop}  # trainer.optimizer -> (param groups, cfg) -> optimizer


class RunDirInUse(FileExistsError):
    """The run dir already holds another run's metrics."""


def check_run_dir_free(run_dir: Path) -> None:
    if (run_dir / "metrics.jsonl").exists():
        raise RunDirInUse(
            f"{run_dir} already holds a run (metrics.jsonl); choose another hydra.run.dir, or remove it"
        )


def train(rc: RunConfig, run_dir: Path, group: str | None = None) -> dict:
    """Prepare, train, evaluate and write the run dir; returns summary.json's content. On any failure
    (or Ctrl-C) summary.json says so, the tracker is closed, and the error propagates."""
    from prefopt.training.tracking import Tracker

    check_run_dir_free(run_dir)
    started = time.perf_counter()
    tracker = None
    try:
        device = _configure_torch(rc)
        tracker = Tracker(rc.logger, run_dir, rc.raw, _run_name(rc), group)
        summary = _train(rc, run_dir, device, tracker, started)
    except BaseException as error:
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        failed = {
            "status": status,
            "objective": rc.objective_name,
            "seed": rc.seed,
            "error": repr(error),
            "traceback": traceback.format_exc(),
            "runtime_s": round(time.perf_counter() - started, 2),
        }
        (run_dir / "summary.json").write_text(json.dumps(failed, indent=1))
        if tracker is not None:
            tracker.finish(exit_code=1)
        raise
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    convergence = {
        f"convergence/{k}": v for k, v in summary["convergence"].items() if not isinstance(v, list)
    }
    tracker.summary({**summary["final_eval"], **convergence, "runtime_s": summary["runtime_s"]})
    tracker.finish()
    _log_closing_summary(rc, summary, run_dir)
    return summary


def _train(rc: RunConfig, run_dir: Path, device, tracker, started: float) -> dict:
    import torch
    from transformers import get_scheduler

    from prefopt.data.batching import PairSampler, make_batch
    from prefopt.evaluation.convergence import run_convergence
    from prefopt.evaluation.evaluate import evaluate
    from prefopt.progress import progress, quiet_library_progress_bars
    from prefopt.training.prepare import prepare
    from prefopt.training.seeding import seed_everything
    from prefopt.training.step import pair_loss

    autocast = _autocast(rc.trainer.precision, device)
    quiet_library_progress_bars()
    run = prepare(rc, device)
    seed_everything(rc.seed)  # training's randomness must not depend on what prepare did (fit or cache)
    if rc.trainer.epochs is not None:  # passes over the train pairs decide the step count
        rc.trainer.max_steps = math.ceil(rc.trainer.epochs * len(run.train) / rc.trainer.batch_size)
        log.info("trainer.epochs=%g: %d steps", rc.trainer.epochs, rc.trainer.max_steps)
    trainable = [p for p in run.policy.parameters() if p.requires_grad]
    groups = [{"params": trainable, "lr": rc.trainer.lr, "weight_decay": rc.trainer.weight_decay}]
    if run.inputs.value_head is not None:
        groups.append({"params": list(run.inputs.value_head.parameters()), "lr": rc.trainer.value_head_lr})
    params = [p for group in groups for p in group["params"]]
    optimizer = OPTIMIZERS[rc.trainer.optimizer](groups, rc.trainer)
    optimizer.zero_grad(set_to_none=True)
    scheduler = get_scheduler(
        rc.trainer.lr_schedule, optimizer, rc.trainer.warmup_steps, rc.trainer.max_steps
    )
    sampler = PairSampler(len(run.train), rc.trainer.batch_size, rc.seed)
    micro_size = rc.trainer.micro_batch_size or rc.trainer.batch_size
    max_norm = rc.trainer.max_grad_norm if rc.trainer.max_grad_norm is not None else float("inf")
    needs = rc.objective.requirements()
    history, step_losses, grad_norms = [], [], []

    def run_eval(step: int) -> tuple[dict, dict]:
        metrics, detail = evaluate(run, step, rc.eval.batch_size, device, autocast)
        history.append({"step": step, **metrics, **detail})
        tracker.log(metrics, step)
        log.info("eval @ step %d: %s", step, _brief(metrics))
        return metrics, detail

    reference_eval, reference_detail = run_eval(0) if rc.eval.at_start else ({}, {})
    run.policy.train()
    log.info("training: %d steps of %d pairs", rc.trainer.max_steps, sampler.batch_size)
    totals, tokens, window_start, train_metrics = defaultdict(float), 0, time.perf_counter(), {}
    bar = progress(range(1, rc.trainer.max_steps + 1), desc="train", unit="step")
    for step in bar:
        examples = sampler.next()
        step_sums = defaultdict(float)
        for micro in examples.split(micro_size):
            batch = make_batch(run.table, run.train, micro, run.kl_side, needs.mismatched)
            with autocast():
                loss_sum, sums = pair_loss(run.policy, batch, run.inputs, step - 1, device)
            (loss_sum / len(examples)).backward()  # mean over the step's pairs, however it is split
            for name, value in sums.items():
                step_sums[name] += value / len(examples)
            tokens += int(batch.rows.attention_mask.sum())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        step_sums["grad_norm"], step_sums["lr"] = grad_norm, scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_losses.append(step_sums["loss"])
        grad_norms.append(grad_norm)
        for name, value in step_sums.items():
            totals[name] += value
        totals["steps"] += 1
        tokens_per_s = tokens / max(time.perf_counter() - window_start, 1e-9)
        bar.set_postfix(
            loss=f"{step_sums['loss']:.4f}",
            acc=f"{step_sums['rewards/accuracies']:.3f}",
            tok_s=f"{tokens_per_s:.0f}",
        )
        if step % rc.trainer.log_every_steps == 0 or step == rc.trainer.max_steps:
            train_metrics = {f"train/{k}": v / totals["steps"] for k, v in totals.items() if k != "steps"}
            train_metrics.update(
                {"train/tokens_per_s": tokens_per_s, "train/elapsed_s": time.perf_counter() - started}
            )
            if device.type == "cuda":
                train_metrics["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            tracker.log(train_metrics, step)
            log.info("step %d/%d: %s", step, rc.trainer.max_steps, _brief(train_metrics))
            totals, tokens, window_start = defaultdict(float), 0, time.perf_counter()
        if step % rc.eval.eval_every_steps == 0 and step != rc.trainer.max_steps:
            run_eval(step)
    bar.close()
    final_eval, final_detail = run_eval(rc.trainer.max_steps)
    if rc.eval.generate:
        final_eval |= _generation_eval(rc, run, run_dir, device, tracker)
    convergence = run_convergence(
        rc, run, step_losses, grad_norms, final_eval, final_detail, sampler.batch_size == len(run.train)
    )
    if rc.trainer.save_checkpoint:  # under LoRA the adapter, and the merged model on request
        from prefopt.models import save_checkpoint

        save_checkpoint(run.policy, run.tokenizer, run_dir / "checkpoint", rc.model.lora.save_merged)
    (run_dir / "eval.json").write_text(
        json.dumps(
            {
                "history": history,
                "final": {**final_eval, **final_detail},
                "reference": {**reference_eval, **reference_detail},
                "task": _task_record(run.task),
            },
            indent=1,
        )
    )
    return {
        "status": "completed",
        "objective": rc.objective_name,
        "seed": rc.seed,
        "final_eval": final_eval,
        "reference_eval": reference_eval,
        "final_train": train_metrics,
        "convergence": convergence,
        "reference_fit": run.reference_fit,
        "data": run.data_report,
        "runtime_s": round(time.perf_counter() - started, 2),
    }


def _generation_eval(rc: RunConfig, run, run_dir: Path, device, tracker) -> dict:
    """eval/generate/* metrics; samples and judgements to generations.jsonl and a W&B table."""
    from prefopt.evaluation.generation import evaluate_generations, markdown_table, write_samples

    cfg = rc.eval.generation
    judge = None
    if cfg.judge == "llm":
        from omegaconf import OmegaConf

        from prefopt.evaluation.judges import LLMJudge, LLMJudgeConfig

        options = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LLMJudgeConfig), cfg.llm))
        judge = LLMJudge(options, run_dir / "judge_cache")
    metrics, samples, scores, judgements = evaluate_generations(run, cfg, rc.seed, device, judge)
    rows = write_samples(run_dir / "generations.jsonl", samples, scores, judgements)
    (run_dir / "generation_eval.md").write_text(markdown_table(metrics, len(rows)))
    tracker.log(metrics, rc.trainer.max_steps)
    tracker.table("eval/generations", ["prompt", "policy", "reference", "chosen"], rows)
    return metrics


def _task_record(task) -> dict | None:
    """The ground truth the run was measured against, so reports need not rebuild a drawn task."""
    if task is None:
        return None
    return {
        "prompts": task.prompts,
        "candidates": task.candidates,
        "pi_star": task.pi_star.tolist(),
        "pi_ref": task.pi_ref.tolist(),
        "good": task.good.tolist(),
    }


BRIEF = ["loss", "rewards/accuracies", "rewards/margins", "win_rate", "kl_star", "outside_mass", "grad_norm"]
BRIEF += ["lr", "tokens_per_s"]


def _brief(metrics: dict) -> str:
    """The telling part of a metrics dict for one log line (the rest is in metrics.jsonl and eval.json)."""
    values = {k.split("/", 1)[1]: v for k, v in metrics.items() if "/" in k}
    return ", ".join(f"{k}={values[k]:.4g}" for k in BRIEF if k in values)


def _log_closing_summary(rc: RunConfig, summary: dict, run_dir: Path) -> None:
    start, final = summary["reference_eval"], summary["final_eval"]
    lines = [f"finished {_run_name(rc)} in {summary['runtime_s']:.0f} s; run dir: {run_dir}"]
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


def _configure_torch(rc: RunConfig):
    import torch

    from prefopt.training.seeding import seed_everything

    name = rc.trainer.device
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cpu":
        torch.set_num_threads(rc.trainer.num_threads)  # fixed: results depend on the thread count
        torch.use_deterministic_algorithms(True)
    seed_everything(rc.seed)
    return device


def _autocast(precision: str, device):
    import torch

    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _run_name(rc: RunConfig) -> str:
    try:
        overrides = [
            o for o in hydra.core.hydra_config.HydraConfig.get().overrides.task if not o.startswith("hydra")
        ]
    except ValueError:
        overrides = []
    return " ".join([rc.objective_name, *overrides])


def _sweep_group() -> str | None:
    """The W&B group in a multirun: the sweep's name (one group per sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return "-".join(Path(hydra_cfg.sweep.dir).parts[-2:])


def _log_to_files(message: str) -> None:
    """Write to the log files only (Hydra's train.log), not to the terminal."""
    root = logging.getLogger()
    record = root.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig
    from tqdm.contrib.logging import logging_redirect_tqdm

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        rc = load_run_config(cfg)  # fails fast, before any model is built
        check_run_dir_free(run_dir)
    except (ConfigError, RunDirInUse) as error:
        print(f"prefopt: config error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(rc.raw))  # resolved: every interpolation filled in
    try:
        with logging_redirect_tqdm():  # log lines print above the progress bars
            return train(rc, run_dir, _sweep_group())
    except KeyboardInterrupt:
        print(f"prefopt: interrupted; summary.json in {run_dir} says so", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:
        _log_to_files(traceback.format_exc())
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = str(error).splitlines()[0] if str(error) else ""
        print(
            f"prefopt: {type(error).__name__}: {message} (traceback in {run_dir / 'train.log'}; "
            "HYDRA_FULL_ERROR=1 shows it here)",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
