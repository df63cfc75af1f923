"""The loop's running state and its bookkeeping: what a checkpoint stores as JSON, so a resumed run
continues every record (train metric windows, evaluations, the convergence series, skipped steps)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class NonFiniteTraining(FloatingPointError):
    """`trainer.max_bad_steps` consecutive steps had a non-finite loss or gradient."""


@dataclass
class LoopState:
    """What the loop accumulates, checkpointed as JSON so a resumed run continues every record."""

    step: int = 0  # optimizer steps taken (skipped bad steps count: they consumed their batch)
    history: list = field(default_factory=list)  # every evaluation, with its per-prompt detail
    step_losses: list = field(default_factory=list)  # per finite step, for the convergence report
    grad_norms: list = field(default_factory=list)
    window: dict = field(default_factory=dict)  # train metric sums since the last train log
    window_steps: int = 0
    bad_steps: list = field(default_factory=list)  # {step, loss, grad_norm, pairs} of each skipped step
    consecutive_bad: int = 0
    reference_eval: dict = field(default_factory=dict)
    reference_detail: dict = field(default_factory=dict)
    resumed_at: list = field(default_factory=list)  # steps a resumed run continued from
    last_train: dict = field(default_factory=dict)  # the last train/* record logged


def planned_steps(max_steps: int, epochs: float | None, batch_size: int, num_train_pairs: int) -> int:
    """The run's optimizer steps: `trainer.max_steps`, or with `trainer.epochs` set, that many passes over
    the train pairs at `batch_size` pairs a step (the config itself is never changed)."""
    if epochs is None:
        return max_steps
    return math.ceil(epochs * num_train_pairs / batch_size)


def record_step(state: LoopState, step_sums: dict) -> None:
    state.step_losses.append(step_sums["loss"])
    state.grad_norms.append(step_sums["grad_norm"])
    for name, value in step_sums.items():
        state.window[name] = state.window.get(name, 0.0) + value
    state.window_steps += 1
    state.consecutive_bad = 0


def skip_bad_step(state: LoopState, step: int, examples, step_sums: dict, max_bad_steps: int) -> None:
    pairs = examples.tolist()
    loss, grad_norm = step_sums["loss"], step_sums["grad_norm"]
    state.bad_steps.append({"step": step, "loss": loss, "grad_norm": grad_norm, "pairs": pairs})
    state.consecutive_bad += 1
    log.warning(
        "step %d: non-finite loss (%s) or gradient norm (%s): optimizer step skipped (%d in a row); "
        "train pairs %s",
        step,
        loss,
        grad_norm,
        state.consecutive_bad,
        pairs,
    )
    if state.consecutive_bad >= max_bad_steps:
        raise NonFiniteTraining(
            f"trainer.max_bad_steps={max_bad_steps}: {state.consecutive_bad} steps in a row (the last, "
            f"step {step}) had a non-finite loss or gradient; last train pairs {pairs[:8]}. Lower "
            "trainer.optimizer.lr, keep trainer.optimizer.max_grad_norm set, or check those pairs"
        )


def window_metrics(state: LoopState, tokens_per_s: float, elapsed_s: float, device) -> dict:
    """train/* means over the finite steps since the last log; resets the window."""
    import torch

    count = max(state.window_steps, 1)
    metrics = {f"train/{k}": v / count for k, v in state.window.items()}
    metrics |= {"train/tokens_per_s": tokens_per_s, "train/elapsed_s": elapsed_s}
    metrics["train/bad_steps"] = len(state.bad_steps)
    if device.type == "cuda":
        metrics["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    state.window, state.window_steps = {}, 0
    return metrics
