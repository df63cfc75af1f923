"""`prefopt train`: the Hydra entry point and the one training loop every objective shares.

The loop reads top to bottom: schedule, micro-batches, forward, loss, backward, clip, step, log, eval,
checkpoint. It never looks at the objective's name; what an objective needs is built in `prepare`.
Checkpoints hold the whole training state (`prefopt.training.checkpoint`), so a run killed at any moment
and resumed with `trainer.resume=auto` takes the same steps as one never interrupted. One process writes a
run dir (`prefopt.files.RunDirLock`), every state file is written atomically, and a full disk ends the run
with one line naming the command that resumes it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from prefopt import CONF_DIR
from prefopt.config import RunConfig, load_run_config
from prefopt.errors import ConfigError
from prefopt.files import RunDirLock, RunDirLocked, atomic_write_json, atomic_write_text, is_disk_full
from prefopt.training.loop_state import (
    LoopState,
    NonFiniteTraining,
    record_step,
    skip_bad_step,
    window_metrics,
)
from prefopt.training.preemption import Preempted, PreemptionGuard
from prefopt.training.resume import RunDirInUse, plan_resume
from prefopt.training.run_summary import brief, generation_eval, log_closing_summary, run_name, task_record

log = logging.getLogger(__name__)
__all__ = ["NonFiniteTraining", "RunDirInUse", "main", "train"]


def train(rc: RunConfig, run_dir: Path, group: str | None = None) -> dict:
    """Prepare, train, evaluate and write the run dir; returns summary.json's content. Raises RunDirInUse
    or ConfigError (a resume that does not fit) before anything loads. On any failure, preemption or
    Ctrl-C, summary.json says so, the tracker is closed, and the error propagates."""
    from prefopt.engine.distributed import release_own_group, world
    from prefopt.training.setup import configure_torch
    from prefopt.training.tracking import NullTracker, Tracker

    plan = plan_resume(rc, run_dir)
    if plan.finished is not None:
        log.info("%s already finished (summary.json says completed): nothing to resume", run_dir)
        return plan.finished
    main_process = world().is_main
    if main_process:
        resolved = OmegaConf.to_yaml(rc.raw)  # interpolations filled
        atomic_write_text(run_dir / "config.yaml", resolved)
    saved = plan.state  # the checkpoint's trainer_state.json, read once by plan_resume
    started = time.perf_counter()
    tracker = None
    try:
        device = configure_torch(rc)
        kept = _kept_records(plan.checkpoint, saved) if saved else ([] if plan.restart else None)
        wandb_id = saved.get("wandb_id") if saved else None
        tracker = (
            Tracker(rc.logger, run_dir, rc.raw, run_name(rc), group, kept, wandb_id)
            if main_process
            else NullTracker()
        )
        with PreemptionGuard(rc.trainer.preemption_signals) as guard:
            try:
                summary = _train(rc, run_dir, device, tracker, started, plan, guard)
            finally:
                release_own_group()
    except BaseException as error:
        if main_process:
            _write_failed_summary(rc, run_dir, error, started)
        if tracker is not None:
            tracker.finish(exit_code=getattr(error, "exit_code", 1), preempted=isinstance(error, Preempted))
        raise
    if main_process:
        atomic_write_json(run_dir / "summary.json", summary)
    convergence = {
        f"convergence/{k}": v for k, v in summary["convergence"].items() if not isinstance(v, list)
    }
    tracker.summary({**summary["final_eval"], **convergence, "runtime_s": summary["runtime_s"]})
    tracker.finish()
    log_closing_summary(rc, summary, run_dir)
    return summary


def _kept_records(checkpoint: Path, saved: dict) -> list[str]:
    """The metrics.jsonl lines written up to the checkpoint (the checkpoint's run dir may be another); what
    a kill or a second writer left after them is dropped."""
    source = checkpoint.parents[1] / "metrics.jsonl"
    lines = source.read_text(errors="replace").splitlines() if source.exists() else []
    return lines[: saved["metrics_records"]]


def _write_failed_summary(rc: RunConfig, run_dir: Path, error: BaseException, started: float) -> None:
    """summary.json of a run that did not complete, written atomically; a write that fails (the disk that
    ended the run is full) leaves the previous file and never hides the run's own error."""
    status = {Preempted: "preempted", KeyboardInterrupt: "interrupted"}.get(type(error), "failed")
    failed = {
        "status": status,
        "objective": rc.objective_name,
        "seed": rc.seed,
        "error": repr(error),
        "traceback": traceback.format_exc(),
        "runtime_s": round(time.perf_counter() - started, 2),
    }
    if isinstance(error, Preempted):
        failed |= {"step": error.step, "checkpoint": str(error.checkpoint), "resume": resume_command(run_dir)}
    try:
        atomic_write_json(run_dir / "summary.json", failed)
    except OSError as write_error:
        log.warning("summary.json not written (%s)", write_error)


def _train(rc: RunConfig, run_dir: Path, device, tracker, started: float, plan, guard) -> dict:
    from transformers import get_scheduler

    from prefopt.data.batching import PairSampler
    from prefopt.engine.distributed import (
        TrainableModules,
        agreed_stop,
        check_divisible,
        clip_grad_norm,
        export_policy,
        gathered,
        strategy_of,
        world,
        wrap,
    )
    from prefopt.engine.prepare import prepare
    from prefopt.evaluation.convergence import run_convergence
    from prefopt.evaluation.evaluate import evaluate
    from prefopt.models import has_dropout
    from prefopt.progress import progress, quiet_library_progress_bars
    from prefopt.training.checkpoint import load_checkpoint
    from prefopt.training.seeding import seed_everything
    from prefopt.training.setup import OPTIMIZERS, autocast_for, max_grad_norm, speed_up, trainable_params

    autocast = autocast_for(rc.trainer.precision, device)
    quiet_library_progress_bars()
    run = prepare(rc, device)
    seed_everything(rc.seed)  # training's randomness must not depend on what prepare did (fit or cache)
    if rc.trainer.epochs is not None:  # passes over the train pairs decide the step count
        rc.trainer.max_steps = math.ceil(rc.trainer.epochs * len(run.train) / rc.trainer.batch_size)
        log.info("trainer.epochs=%g: %d steps", rc.trainer.epochs, rc.trainer.max_steps)
    max_steps = rc.trainer.max_steps
    trainable = TrainableModules({"policy": run.policy})  # what the optimizer updates and checkpoints hold
    if run.inputs.value_head is not None:
        trainable["value_head"] = run.inputs.value_head
    run.inputs.packing.packs(run.policy, device)  # probe the decoder once, before any sharding
    speed_up(run.policy, rc.trainer)
    model = wrap(trainable, strategy_of(rc.trainer), device, rc.trainer.param_dtype)  # FSDP2 shards in place
    groups = [
        {"params": trainable_params(run.policy), "lr": rc.trainer.lr, "weight_decay": rc.trainer.weight_decay}
    ]
    if run.inputs.value_head is not None:
        groups.append({"params": trainable_params(run.inputs.value_head), "lr": rc.trainer.value_head_lr})
    params = [p for group in groups for p in group["params"]]
    optimizer = OPTIMIZERS[rc.trainer.optimizer](groups, rc.trainer, device)
    optimizer.zero_grad(set_to_none=True)
    scheduler = get_scheduler(rc.trainer.lr_schedule, optimizer, rc.trainer.warmup_steps, max_steps)
    sampler = PairSampler(len(run.train), rc.trainer.batch_size, rc.seed)  # the same on every rank
    check_divisible(sampler.batch_size, rc.trainer)
    state = LoopState()

    def run_eval(step: int) -> tuple[dict, dict]:
        with gathered(model):  # every rank evaluates every pair: sharded layers gather as they run
            metrics, detail = evaluate(run, step, rc.eval.batch_size, device, autocast)
        state.history.append({"step": step, **metrics, **detail})
        tracker.log(metrics, step)
        log.info("eval @ step %d: %s", step, brief(metrics))
        return metrics, detail

    def save(step: int) -> Path:
        from prefopt.training.checkpoint import save_checkpoint

        record = {
            "loop": asdict(state),
            "config": rc.raw,
            "wandb_id": tracker.run_id,
            "metrics_records": tracker.records,
            "reference_logps_sha256": _digest(run.inputs.reference_logps),
        }
        keep = rc.trainer.keep_last_checkpoints
        return save_checkpoint(run_dir, step, trainable, optimizer, scheduler, sampler, record, keep)

    checkpoint = plan.checkpoint
    if checkpoint is not None:
        saved = load_checkpoint(checkpoint, trainable, optimizer, scheduler, sampler, plan.state)  # RNG too
        state = LoopState(**saved["loop"])
        state.resumed_at.append(state.step)
        if saved.get("reference_logps_sha256") != _digest(run.inputs.reference_logps):
            log.warning("the reference log-probs differ from the checkpoint's: not a bit-exact continuation")
        log.info("resumed from %s at step %d of %d", checkpoint, state.step, max_steps)
    elif rc.eval.at_start:
        state.reference_eval, state.reference_detail = run_eval(0)
    run.policy.train()
    if state.step_losses or has_dropout(run.policy):  # trained already, or a random training forward
        run.inputs.policy_is_reference = False
    log.info("training: steps %d-%d of %d pairs", state.step + 1, max_steps, sampler.batch_size)
    every = rc.trainer.checkpoint_every_steps
    tokens, window_start = 0, time.perf_counter()
    bar = progress(range(state.step + 1, max_steps + 1), desc="train", unit="step")
    if guard.requested:  # a signal while preparing
        raise Preempted(guard.requested, state.step, save(state.step))
    for step in bar:
        examples = sampler.next()
        step_sums, step_tokens = _forward_backward(model, run, examples, rc.trainer, step, device, autocast)
        tokens += step_tokens
        grad_norm = clip_grad_norm(params, max_grad_norm(rc.trainer))
        step_sums["grad_norm"], step_sums["lr"] = grad_norm, scheduler.get_last_lr()[0]
        if math.isfinite(step_sums["loss"]) and math.isfinite(grad_norm):
            optimizer.step()
            if step_sums["lr"] > 0:  # warm-up's first step (lr 0) leaves the weights as they were
                run.inputs.policy_is_reference = False  # the cached reference log-probs are read from now
            record_step(state, step_sums)
        else:  # a non-finite loss or gradient never reaches the weights
            skip_bad_step(state, step, examples, step_sums, rc.trainer.max_bad_steps)
        scheduler.step()  # skipped steps keep their place in the schedule
        optimizer.zero_grad(set_to_none=True)
        tokens_per_s = tokens / max(time.perf_counter() - window_start, 1e-9)
        bar.set_postfix(
            loss=f"{step_sums['loss']:.4f}",
            acc=f"{step_sums['rewards/accuracies']:.3f}",
            tok_s=f"{tokens_per_s:.0f}",
        )
        if step % rc.trainer.log_every_steps == 0 or step == max_steps:
            train_metrics = window_metrics(state, tokens_per_s, time.perf_counter() - started, device)
            tracker.log(train_metrics, step)
            state.last_train = train_metrics
            log.info("step %d/%d: %s", step, max_steps, brief(train_metrics))
            tokens, window_start = 0, time.perf_counter()
        if step % rc.eval.eval_every_steps == 0 and step != max_steps:
            run_eval(step)
        state.step = step
        stop = agreed_stop(guard.requested, device)  # read once; every rank stops at the same step
        # with checkpointing on, at the end too (a failure in the final evaluation loses no step); off, a
        # finished run has nothing to resume and ends with the export alone; a preempted one always saves
        if stop or (every and (step % every == 0 or step == max_steps)):
            saved_at = save(step)
        if stop:
            raise Preempted(stop, step, saved_at)
    bar.close()
    final_eval, final_detail = run_eval(max_steps)
    if rc.eval.generate:
        with gathered(model):
            final_eval |= generation_eval(rc, run, run_dir, device, tracker)
    convergence = run_convergence(
        rc,
        run,
        state.step_losses,
        state.grad_norms,
        final_eval,
        final_detail,
        sampler.batch_size == len(run.train),
    )
    if rc.trainer.save_checkpoint:  # under LoRA the adapter, and the merged model on request
        export_policy(run, rc, run_dir / "checkpoint")
    evaluation = {
        "history": state.history,
        "final": {**final_eval, **final_detail},
        "reference": {**state.reference_eval, **state.reference_detail},
        "task": task_record(run.task),
    }
    if world().is_main:
        atomic_write_json(run_dir / "eval.json", evaluation)
    return {
        "status": "completed",
        "objective": rc.objective_name,
        "seed": rc.seed,
        "final_eval": final_eval,
        "reference_eval": state.reference_eval,
        "final_train": state.last_train,
        "convergence": convergence,
        "reference_fit": run.reference_fit,
        "data": run.data_report,
        "bad_steps": state.bad_steps,
        "resumed_at": state.resumed_at,
        "runtime_s": round(time.perf_counter() - started, 2),
    }


def _forward_backward(model, run, examples, trainer, step: int, device, autocast) -> tuple[dict, int]:
    """Loss and gradients of one optimizer step's pairs, in micro-batches: (global mean metrics, global
    real tokens). Under torchrun each rank takes its share of the pairs; see `distributed`."""
    from collections import defaultdict

    from prefopt.data.batching import make_batch
    from prefopt.engine.distributed import my_pairs, sum_floats, world
    from prefopt.engine.step import pair_loss

    needs = run.inputs.hparams.requirements()
    micro_size = trainer.micro_batch_size or trainer.batch_size
    scale = world().size / len(examples)  # the reduction's mean over ranks then is the global mean
    step_sums, tokens = defaultdict(float), 0
    for micro in my_pairs(examples).split(micro_size):
        batch = make_batch(run.table, run.train, micro, run.kl_side, needs.mismatched)
        with autocast():
            loss_sum, sums = model(pair_loss, run.policy, batch, run.inputs, step - 1, device)
        (loss_sum * scale).backward()  # mean over the step's pairs, however they are split
        for name, value in sums.items():
            step_sums[name] += value
        tokens += int(batch.rows.attention_mask.sum())
    totals = sum_floats({**step_sums, "_tokens": tokens}, device)
    tokens = int(totals.pop("_tokens"))
    return defaultdict(float, {name: value / len(examples) for name, value in totals.items()}), tokens


def _digest(tensor) -> str | None:
    from prefopt.engine.reference_cache import tensor_sha256

    return None if tensor is None else tensor_sha256(tensor)


def resume_command(run_dir: Path) -> str:
    """The command that continues this run: its own overrides, its run dir, trainer.resume=auto."""
    try:
        task = hydra.core.hydra_config.HydraConfig.get().overrides.task
    except ValueError:  # called without Hydra (a test, `prefopt evaluate`)
        task = []
    kept = [o for o in task if not o.startswith(("hydra.run.dir=", "trainer.resume="))]
    words = ["prefopt", "train", *kept, f"hydra.run.dir={run_dir}", "trainer.resume=auto"]
    return " ".join(shlex.quote(w) for w in words)


def _sweep_group() -> str | None:
    """The W&B group in a multirun: the sweep's name (one group per sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return "-".join(Path(hydra_cfg.sweep.dir).parts[-2:])


class RunDirUnwritable(OSError):
    """The run dir cannot be written (a read-only file system, no permission)."""


@contextlib.contextmanager
def _sole_writer(run_dir: Path):
    """Hold the run dir's lock while the run lasts (rank 0 alone under torchrun: the others write only
    through it). RunDirLocked names the dir and the pid of the process already writing it."""
    from prefopt.engine.distributed import world

    if not world().is_main:
        yield
        return
    try:
        lock = RunDirLock(run_dir).acquire()
    except OSError as error:
        raise RunDirUnwritable(f"cannot write to {run_dir}: {error.strerror or error}") from None
    try:
        yield
    finally:
        lock.release()  # a multirun's worker process goes on to its next job


def _end_with_sweep_parent() -> None:
    """In a multirun job run by a worker process (joblib's loky workers), end this process as soon as the
    process that started the sweep is gone, however it ended (SIGKILL included): a worker left training
    would otherwise write on, unseen, and race a resumed sweep. Checked every 0.2 s; one watcher a worker."""
    import multiprocessing

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if multiprocessing.parent_process() is None or HydraConfig.get().mode != RunMode.MULTIRUN:
        return  # the process the user started: it ends when they end it
    if any(thread.name == _WATCHER for thread in threading.enumerate()):
        return
    threading.Thread(target=_watch_parent, args=(os.getppid(),), name=_WATCHER, daemon=True).start()


_WATCHER = "prefopt-sweep-parent-watcher"


def _watch_parent(parent: int) -> None:
    """SIGKILL this process once its parent is no longer `parent` (it died; the process was re-parented)."""
    while os.getppid() == parent:
        time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)


def _log_to_files(message: str) -> None:
    """Write to the log files only (Hydra's train.log), not to the terminal."""
    root = logging.getLogger()
    record = root.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _join_ranks(rc: RunConfig, run_dir: Path) -> Path:
    """Under torchrun: join the process group; every rank writes to rank 0's run dir (Hydra's own clock
    may name another), and ranks other than 0 log to their own file. The run dir as it is otherwise."""
    from prefopt.engine.distributed import broadcast_object, init_from_environment

    current = init_from_environment(rc.trainer.device)
    if not current.distributed:
        return run_dir
    run_dir = Path(broadcast_object(str(run_dir)))
    if not current.is_main:
        _log_rank_to_own_file(run_dir, current.rank)
    return run_dir


def _log_rank_to_own_file(run_dir: Path, rank: int) -> None:
    """Ranks other than 0 log to train.rank<r>.log, and only warnings to the terminal."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
        else:
            handler.setLevel(logging.WARNING)
    own = logging.FileHandler(run_dir / f"train.rank{rank}.log")
    own.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(own)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig
    from tqdm.contrib.logging import logging_redirect_tqdm

    from prefopt.progress import route_library_logs

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    logging.raiseExceptions = False  # a log file on a full disk: no '--- Logging error ---' per record
    _end_with_sweep_parent()
    try:
        rc = load_run_config(cfg)  # fails fast, before torch, any model or any data is loaded
        run_dir = _join_ranks(rc, run_dir)
        with _sole_writer(run_dir):  # before anything of ours is written to the run dir
            route_library_logs()  # libraries' notices to train.log; the terminal shows ours and errors
            with logging_redirect_tqdm():  # log lines print above the progress bars
                return train(rc, run_dir, _sweep_group())
    except (ConfigError, RunDirInUse) as error:  # raised before anything loads
        print(f"prefopt: config error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except (RunDirLocked, RunDirUnwritable) as error:
        print(f"prefopt: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except Preempted as stop:
        print(
            f"prefopt: stopped by {stop.signal_name} after step {stop.step}; checkpoint {stop.checkpoint}\n"
            f"resume with: {resume_command(run_dir)}",
            file=sys.stderr,
        )
        raise SystemExit(stop.exit_code) from None
    except KeyboardInterrupt:
        print(f"prefopt: interrupted; summary.json in {run_dir} says so", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:
        _log_to_files(traceback.format_exc())
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(_failure_line(error, run_dir), file=sys.stderr)
        raise SystemExit(1) from None


def _failure_line(error: Exception, run_dir: Path) -> str:
    """The one terminal line for a run that failed: a full disk names the command that resumes the run
    once space is freed (exit code 1 as any failure; summary.json says failed where it could be written)."""
    if is_disk_full(error):
        return f"prefopt: no space left on {run_dir}; free space, then resume with: {resume_command(run_dir)}"
    message = str(error).splitlines()[0] if str(error) else ""
    return (
        f"prefopt: {type(error).__name__}: {message} (traceback in {run_dir / 'train.log'}; "
        "HYDRA_FULL_ERROR=1 shows it here)"
    )
