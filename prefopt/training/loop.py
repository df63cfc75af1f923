"""The one training loop every objective shares, read top to bottom in `run_loop`:

    schedule -> micro-batches -> forward -> loss -> backward -> clip -> step -> log -> eval -> checkpoint

then the end of the run (`finish`). What an objective needs was built by `prepare` from what the parts
declare; the loop never looks at a part's name or kind. Everything it builds before its first step (the
wrapped modules, the optimizer over what the parts declare trainable, the schedule, the sampler, a
resumed state) is in `start`; each side task is a function.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from prefopt.config import RunConfig
from prefopt.engine.prepare import PreparedRun
from prefopt.training.loop_state import LoopState, planned_steps, record_step, skip_bad_step, window_metrics
from prefopt.training.preemption import Preempted

log = logging.getLogger(__name__)


@dataclass
class Loop:
    """What the loop works with, built once by `start`."""

    rc: RunConfig
    run: PreparedRun
    run_dir: Path
    device: object
    autocast: object
    trainable: object  # TrainableModules: what the optimizer updates and checkpoints hold
    model: object  # the same modules as the loop calls them (FSDP2-sharded, DDP-wrapped or as is)
    params: list
    optimizer: object
    scheduler: object
    sampler: object
    state: LoopState
    max_steps: int
    micro_batch_size: int  # pairs per forward pass
    tracker: object


def start(rc: RunConfig, run_dir: Path, device, tracker, plan) -> Loop:
    """Prepare the run, wrap what the parts declare trainable, build the optimizer and schedule, and
    resume from `plan.checkpoint` or evaluate the reference (step 0)."""
    from transformers import get_scheduler

    from prefopt.data.sampler import PairSampler
    from prefopt.engine.distributed import TrainableModules, check_divisible, strategy_of, wrap
    from prefopt.engine.prepare import prepare
    from prefopt.progress import quiet_library_progress_bars
    from prefopt.training.seeding import seed_everything
    from prefopt.training.setup import allocate_state, autocast_for, build_optimizer, speed_up

    quiet_library_progress_bars()
    run = prepare(rc, device)
    seed_everything(rc.seed)  # training's randomness must not depend on what prepare did (fit or cache)
    trainer = rc.trainer
    max_steps = planned_steps(trainer.max_steps, trainer.epochs, trainer.batch_size, len(run.train))
    if trainer.epochs is not None:
        log.info("trainer.epochs=%g: %d steps", trainer.epochs, max_steps)
    trainable = TrainableModules({name: part.module for name, part in run.trainable.items()})
    run.inputs.packing.packs(run.policy, device)  # probe the decoder once, before any sharding
    speed_up(run.policy, trainer)
    model = wrap(
        trainable, strategy_of(trainer), device, trainer.distributed.param_dtype
    )  # FSDP2 shards in place
    optimizer, params = build_optimizer(run.trainable, trainer, device)
    allocate_state(optimizer, params)
    optimizer.zero_grad(set_to_none=True)
    scheduler = get_scheduler(
        trainer.optimizer.lr_schedule, optimizer, trainer.optimizer.warmup_steps, max_steps
    )
    pairs_per_step = min(trainer.batch_size, len(run.train))
    if pairs_per_step < trainer.batch_size:
        log.info(
            "trainer.batch_size=%d: the %d train pairs make each step", trainer.batch_size, pairs_per_step
        )
    sampler = PairSampler(len(run.train), pairs_per_step, rc.seed)  # the same on every rank
    micro_batch_size = trainer.micro_batch_size or pairs_per_step
    check_divisible(pairs_per_step, micro_batch_size)
    autocast = autocast_for(trainer.precision, device)
    loop = Loop(rc, run, run_dir, device, autocast, trainable, model, params, optimizer, scheduler,
                sampler, LoopState(), max_steps, micro_batch_size, tracker)  # fmt: skip
    if plan.checkpoint is not None:
        _resume(loop, plan)
    elif rc.eval.at_start:
        loop.state.reference_eval, loop.state.reference_detail = run_eval(loop, 0)
    return loop


def run_loop(loop: Loop, guard, started: float) -> None:
    """Optimizer steps from the state's next step to `loop.max_steps`."""
    from prefopt.engine.distributed import agreed_stop, clip_grad_norm
    from prefopt.models import has_dropout
    from prefopt.progress import progress
    from prefopt.training.setup import max_grad_norm

    run, state, trainer = loop.run, loop.state, loop.rc.trainer
    run.policy.train()
    if state.step_losses or has_dropout(run.policy):  # trained already, or a random training forward
        run.inputs.policy_is_reference = False
    log.info("training: steps %d-%d of %d pairs", state.step + 1, loop.max_steps, loop.sampler.batch_size)
    window = _Window()
    bar = progress(range(state.step + 1, loop.max_steps + 1), desc="train", unit="step")
    if guard.requested:  # a signal while preparing
        raise Preempted(guard.requested, state.step, save(loop, state.step))
    for step in bar:
        examples = loop.sampler.next()
        step_sums, tokens = forward_backward(loop, examples, step)
        grad_norm = clip_grad_norm(loop.params, max_grad_norm(trainer))
        step_sums["grad_norm"], step_sums["lr"] = grad_norm, loop.scheduler.get_last_lr()[0]
        take_step(loop, step, examples, step_sums)
        window.tokens += tokens
        bar.set_postfix(loss=f"{step_sums['loss']:.4f}", acc=f"{step_sums['rewards/accuracies']:.3f}",
                        tok_s=f"{window.tokens_per_s():.0f}")  # fmt: skip
        if step % trainer.log_every_steps == 0 or step == loop.max_steps:
            log_train(loop, step, window, started)
        if step % loop.rc.eval.eval_every_steps == 0 and step != loop.max_steps:
            run_eval(loop, step)
        state.step = step
        stop = agreed_stop(guard.requested, loop.device)  # read once; every rank stops at the same step
        checkpoint_or_stop(loop, step, stop)
    bar.close()


def forward_backward(loop: Loop, examples, step: int) -> tuple[dict, int]:
    """Loss and gradients of one optimizer step's pairs, in micro-batches: (global mean metrics, global
    real tokens). Under torchrun each rank takes its share of the pairs; see `engine.distributed`."""
    from prefopt.data.batching import make_batch
    from prefopt.engine.distributed import my_pairs, sum_floats, world
    from prefopt.engine.step import pair_loss

    run, needs = loop.run, loop.run.inputs.hparams.requirements()
    scale = world().size / len(examples)  # the reduction's mean over ranks then is the global mean
    step_sums, tokens = defaultdict(float), 0
    for micro in my_pairs(examples).split(loop.micro_batch_size):
        batch = make_batch(run.table, run.train, micro, run.kl_side, needs.mismatched)
        with loop.autocast():
            loss_sum, sums = loop.model(pair_loss, run.policy, batch, run.inputs, step - 1, loop.device)
        (loss_sum * scale).backward()  # mean over the step's pairs, however they are split
        for name, value in sums.items():
            step_sums[name] += value
        tokens += int(batch.rows.attention_mask.sum())
    totals = sum_floats({**step_sums, "_tokens": tokens}, loop.device)
    tokens = int(totals.pop("_tokens"))
    return defaultdict(float, {name: value / len(examples) for name, value in totals.items()}), tokens


def take_step(loop: Loop, step: int, examples, step_sums: dict) -> None:
    """The optimizer step, unless the loss or gradient is not finite (that batch is skipped and logged);
    the schedule advances either way."""
    if math.isfinite(step_sums["loss"]) and math.isfinite(step_sums["grad_norm"]):
        loop.optimizer.step()
        if step_sums["lr"] > 0:  # warm-up's first step (lr 0) leaves the weights as they were
            loop.run.inputs.policy_is_reference = False  # the cached reference log-probs are read from now
        record_step(loop.state, step_sums)
    else:  # a non-finite loss or gradient never reaches the weights
        skip_bad_step(loop.state, step, examples, step_sums, loop.rc.trainer.max_bad_steps)
    loop.scheduler.step()  # skipped steps keep their place in the schedule
    loop.optimizer.zero_grad(set_to_none=True)


class _Window:
    """Real tokens since the last train log, and when that window started."""

    def __init__(self):
        self.tokens, self.started = 0, time.perf_counter()

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.started, 1e-9)


def log_train(loop: Loop, step: int, window: _Window, started: float) -> None:
    from prefopt.training.run_summary import brief

    metrics = window_metrics(loop.state, window.tokens_per_s(), time.perf_counter() - started, loop.device)
    loop.tracker.log(metrics, step)
    loop.state.last_train = metrics
    log.info("step %d/%d: %s", step, loop.max_steps, brief(metrics))
    window.__init__()


def run_eval(loop: Loop, step: int) -> tuple[dict, dict]:
    """The held-out evaluation at `step`, recorded in the state's history and logged."""
    from prefopt.engine.distributed import gathered
    from prefopt.evaluation.evaluate import evaluate
    from prefopt.training.run_summary import brief

    with gathered(loop.model):  # every rank evaluates every pair: sharded layers gather as they run
        metrics, detail = evaluate(loop.run, step, loop.rc.eval.batch_size, loop.device, loop.autocast)
    loop.state.history.append({"step": step, **metrics, **detail})
    loop.tracker.log(metrics, step)
    log.info("eval @ step %d: %s", step, brief(metrics))
    return metrics, detail


def checkpoint_or_stop(loop: Loop, step: int, stop: str | None) -> None:
    """With checkpointing on, save every `checkpoint_every_steps` and at the end (a failure in the final
    evaluation loses no step); off, a finished run has nothing to resume and ends with the export alone.
    A preempted run always saves, then stops."""
    every = loop.rc.trainer.checkpoint.every_steps
    saved_at = None
    if stop or (every and (step % every == 0 or step == loop.max_steps)):
        saved_at = save(loop, step)
    if stop:
        raise Preempted(stop, step, saved_at)


def save(loop: Loop, step: int) -> Path:
    from prefopt.training.checkpoint import save_checkpoint

    record = {
        "loop": asdict(loop.state),
        "config": loop.rc.raw,
        "wandb_id": loop.tracker.run_id,
        "metrics_records": loop.tracker.records,
        "reference_logps_sha256": _digest(loop.run.inputs.reference_logps),
    }
    keep = loop.rc.trainer.checkpoint.keep_last
    return save_checkpoint(
        loop.run_dir, step, loop.trainable, loop.optimizer, loop.scheduler, loop.sampler, record, keep
    )


def _resume(loop: Loop, plan) -> None:
    from prefopt.training.checkpoint import load_checkpoint

    saved = load_checkpoint(
        plan.checkpoint, loop.trainable, loop.optimizer, loop.scheduler, loop.sampler, plan.state
    )  # RNG too
    loop.state = LoopState(**saved["loop"])
    loop.state.resumed_at.append(loop.state.step)
    if saved.get("reference_logps_sha256") != _digest(loop.run.inputs.reference_logps):
        log.warning("the reference log-probs differ from the checkpoint's: not a bit-exact continuation")
    log.info("resumed from %s at step %d of %d", plan.checkpoint, loop.state.step, loop.max_steps)


def _digest(tensor) -> str | None:
    from prefopt.engine.reference_cache import tensor_sha256

    return None if tensor is None else tensor_sha256(tensor)


def finish(loop: Loop, started: float) -> dict:
    """The end of a run: final evaluation, generation eval, convergence, the exported policy, eval.json;
    returns summary.json's content."""
    from prefopt.engine.distributed import export_policy, gathered, world
    from prefopt.evaluation.convergence import run_convergence
    from prefopt.files import atomic_write_json
    from prefopt.training.run_summary import generation_eval

    rc, run, state = loop.rc, loop.run, loop.state
    final_eval, final_detail = run_eval(loop, loop.max_steps)
    if rc.eval.generate:
        with gathered(loop.model):
            final_eval |= generation_eval(rc, run, loop.run_dir, loop.device, loop.tracker, loop.max_steps)
    full_batch = loop.sampler.batch_size == len(run.train)
    convergence = run_convergence(
        rc.objective_name,
        rc.objective,
        rc.eval.convergence,
        run,
        (state.step_losses, state.grad_norms),
        (final_eval, final_detail),
        full_batch,
    )
    if rc.trainer.checkpoint.export:  # under LoRA the adapter, and the merged model on request
        export_policy(run, rc, loop.run_dir / "checkpoint")
    evaluation = {
        "history": state.history,
        "final": {**final_eval, **final_detail},
        "reference": {**state.reference_eval, **state.reference_detail},
        "task": run.truth.record(),  # the ground truth measured against, so reports need not rebuild it
    }
    if world().is_main:
        atomic_write_json(loop.run_dir / "eval.json", evaluation)
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
