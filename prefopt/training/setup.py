"""Setting a run's torch up: threads and determinism, the device, autocast, the optimizer, and the speed
options (gradient checkpointing, torch.compile) applied to the policy."""

from __future__ import annotations

import contextlib
import logging

import torch

from prefopt.engine.distributed import device_for, init_from_environment
from prefopt.optimizers import OPTIMIZERS
from prefopt.training.seeding import seed_everything

log = logging.getLogger(__name__)


def trainable_params(module) -> list:
    return [p for p in module.parameters() if p.requires_grad]


def build_optimizer(parts: dict, trainer, device) -> tuple[torch.optim.Optimizer, list]:
    """`trainer.optimizer.name` over what the parts declare trainable (`PreparedRun.trainable`: name ->
    TrainablePart), one parameter group per part with the options it declares; and the parameters."""
    groups = [{"params": trainable_params(part.module), **part.optimizer_options} for part in parts.values()]
    params = [p for group in groups for p in group["params"]]
    return OPTIMIZERS[trainer.optimizer.name](groups, trainer.optimizer, device), params


def allocate_state(optimizer, params: list) -> None:
    """Allocate the optimizer's state now, as it would at its first step: one step on zero gradients at lr
    0 and weight decay 0 (no parameter moves), then every state tensor, step counts included, back to
    zero, which is where AdamW's and RMSprop's start. Done before the first forward pass it sits below the
    activations in the heap: allocated lazily, it takes the holes the first step's activations left, and
    glibc then grows the heap for the next step's (SmolLM2, chat pairs: peak RSS -246 MiB). The same
    dry step as torch.distributed.checkpoint's `_init_optim_state`, with the counts reset."""
    if not params or optimizer.state:
        return
    saved = [(group["lr"], group.get("weight_decay", 0.0)) for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = 0.0, 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    # the step itself, without the optimizer's step hooks: it is not a training step for anything that
    # counts them (a scheduler's bookkeeping, a profiler, a benchmark's step clock)
    unhooked = getattr(type(optimizer).step, "__wrapped__", None)
    if unhooked is not None:
        unhooked(optimizer)
    else:
        optimizer.step()
    for group, (lr, weight_decay) in zip(optimizer.param_groups, saved):
        group["lr"], group["weight_decay"] = lr, weight_decay
    optimizer.zero_grad(set_to_none=True)
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                value.zero_()


def max_grad_norm(trainer) -> float:
    return trainer.optimizer.max_grad_norm if trainer.optimizer.max_grad_norm is not None else float("inf")


def speed_up(policy, trainer) -> None:
    """trainer.layout.lean_activations (`prefopt.models.lean_layers`), .gradient_checkpointing (recompute
    each layer in backward) and .compile (the decoder, in place, dynamic shapes: packed rows vary in
    length)."""
    if trainer.layout.lean_activations:
        from prefopt.models.lean_layers import use_lean_layers

        log.info(
            "trainer.layout.lean_activations: %d MLPs and norms keep fewer activations",
            use_lean_layers(policy),
        )
    if trainer.layout.gradient_checkpointing:
        options = {"use_reentrant": False}
        if hasattr(policy, "activation_checkpointing_enable"):  # transformers >= 5.2x
            policy.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    if trainer.layout.compile:
        policy.get_decoder().compile(dynamic=True)


def configure_torch(device_name: str, num_threads: int, seed: int):
    """The run's device (`trainer.device`; under torchrun the rank's), CPU threads and determinism, and
    every RNG seeded."""
    device = device_for(device_name, init_from_environment(device_name))
    if device.type == "cpu":
        torch.set_num_threads(num_threads)  # fixed: results depend on the thread count
        torch.use_deterministic_algorithms(True)
    seed_everything(seed)
    return device


def autocast_for(precision: str, device):
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
