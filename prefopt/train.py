"""`prefopt train`: the Hydra entry point and the one training loop every objective shares.

The loop reads top to bottom: schedule, micro-batches, forward, loss, backward, clip, step, log, eval,
checkpoint. It never looks at the objective's name; what an objective needs is built in `prepare`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from prefopt.config import ConfigError, RunConfig, load_run_config

HEADLINE = ["eval/rewards/accuracies", "eval/win_rate", "eval/kl_star", "eval/aux_reward"]
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def train(rc: RunConfig, run_dir: Path, group: str | None = None, parallel_jobs: int = 1) -> dict:
    import torch
    from transformers import get_scheduler

    from prefopt.data.batching import PairSampler, make_batch
    from prefopt.evaluate import evaluate
    from prefopt.prepare import prepare
    from prefopt.step import pair_loss
    from prefopt.tracking import Tracker

    started = time.perf_counter()
    device = _configure_torch(rc, parallel_jobs)
    autocast = _autocast(rc.trainer.precision, device)
    run = prepare(rc, device)
    tracker = Tracker(rc.logger, run_dir, rc.raw, _run_name(rc), group)
    trainable = [p for p in run.policy.parameters() if p.requires_grad]
    groups = [{"params": trainable, "lr": rc.trainer.lr, "weight_decay": rc.trainer.weight_decay}]
    if run.inputs.value_head is not None:
        groups.append({"params": list(run.inputs.value_head.parameters()), "lr": rc.trainer.value_head_lr})
    optimizer = torch.optim.AdamW(groups, betas=tuple(rc.trainer.adam_betas))
    scheduler = get_scheduler(
        rc.trainer.lr_schedule, optimizer, rc.trainer.warmup_steps, rc.trainer.max_steps
    )
    sampler = PairSampler(len(run.train), rc.trainer.batch_size, rc.seed)
    micro_size = rc.trainer.micro_batch_size or rc.trainer.batch_size
    needs = rc.objective.requirements()
    history = []

    def run_eval(step: int) -> dict:
        metrics = evaluate(run, step, rc.eval.batch_size, device, autocast)
        history.append({"step": step, **metrics})
        tracker.log(metrics, step)
        return metrics

    reference_eval = run_eval(0) if rc.eval.at_start else {}
    run.policy.train()
    totals, tokens, window_start, train_metrics = defaultdict(float), 0, time.perf_counter(), {}
    for step in range(1, rc.trainer.max_steps + 1):
        examples = sampler.next()
        for micro in examples.split(micro_size):
            batch = make_batch(run.table, run.train, micro, run.kl_side, needs.mismatched)
            with autocast():
                loss_sum, sums = pair_loss(run.policy, batch, run.inputs, step - 1, device)
            (loss_sum / len(examples)).backward()  # mean over the step's pairs, however it is split
            for name, value in sums.items():
                totals[name] += value / len(examples)
            tokens += int(batch.rows.attention_mask.sum())
        max_norm = rc.trainer.max_grad_norm if rc.trainer.max_grad_norm is not None else float("inf")
        params = [p for group in groups for p in group["params"]]
        totals["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        totals["lr"] += scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        totals["steps"] += 1
        if step % rc.trainer.log_every_steps == 0 or step == rc.trainer.max_steps:
            elapsed = time.perf_counter() - window_start
            train_metrics = {f"train/{k}": v / totals["steps"] for k, v in totals.items() if k != "steps"}
            train_metrics.update(
                {"train/tokens_per_s": tokens / elapsed, "train/elapsed_s": time.perf_counter() - started}
            )
            if device.type == "cuda":
                train_metrics["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            tracker.log(train_metrics, step)
            totals, tokens, window_start = defaultdict(float), 0, time.perf_counter()
        if step % rc.eval.eval_every_steps == 0 and step != rc.trainer.max_steps:
            run_eval(step)
    final_eval = run_eval(rc.trainer.max_steps)
    if rc.trainer.save_checkpoint:
        run.policy.save_pretrained(run_dir / "checkpoint", safe_serialization=True)
        run.tokenizer.save_pretrained(run_dir / "checkpoint")
    summary = {
        "status": "completed",
        "objective": rc.objective_name,
        "seed": rc.seed,
        "final_eval": final_eval,
        "reference_eval": reference_eval,
        "final_train": train_metrics,
        "reference_fit": run.reference_fit,
        "runtime_s": round(time.perf_counter() - started, 2),
    }
    (run_dir / "eval.json").write_text(
        json.dumps({"history": history, "final": final_eval, "reference": reference_eval}, indent=1)
    )
    tracker.summary({**final_eval, "runtime_s": summary["runtime_s"]})
    tracker.finish()
    return summary


def _configure_torch(rc: RunConfig, parallel_jobs: int):
    import torch

    from prefopt.seeding import seed_everything

    name = rc.trainer.device
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cpu":
        torch.set_num_threads(
            rc.trainer.num_threads or max(1, (os.cpu_count() or 1) // max(1, parallel_jobs))
        )
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


def _sweep_context() -> tuple[str | None, int]:
    """The W&B group (the sweep's name) and the number of jobs running side by side, in a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None, 1
    sweep = Path(hydra_cfg.sweep.dir)
    return "-".join(sweep.parts[-2:]), int(OmegaConf.select(hydra_cfg, "launcher.n_jobs", default=1) or 1)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        rc = load_run_config(cfg)  # fails fast, before any model is built
    except ConfigError as error:
        print(f"prefopt: config error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    group, parallel_jobs = _sweep_context()
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(rc.raw))  # resolved: every interpolation filled in
    try:
        summary = train(rc, run_dir, group, parallel_jobs)
    except Exception as error:
        failed = {
            "status": "failed",
            "objective": rc.objective_name,
            "seed": rc.seed,
            "error": repr(error),
            "traceback": traceback.format_exc(),
        }
        (run_dir / "summary.json").write_text(json.dumps(failed, indent=1))
        raise
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    final = summary["final_eval"]
    headline = ", ".join(f"{k.removeprefix('eval/')}={final[k]:.4g}" for k in HEADLINE if k in final)
    print(
        f"[prefopt] finished {_run_name(rc)} in {summary['runtime_s']:.0f} s: {headline}; run dir: {run_dir}"
    )
    return summary
