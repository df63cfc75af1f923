"""LoRA through peft (Hu et al. 2021, "LoRA", arXiv 2106.09685): W x + (alpha / r) B A x with A (r, d_in),
B (d_out, r), B = 0 at the start, only A and B trained.

The frozen reference is the policy's own base with its adapters disabled (`AdapterDisabledReference`), so
pi_ref costs no second copy of the weights. That is the starting policy only while B = 0: weights trained
before the reference is taken (the tiny model's supervised reference fit) are first folded into the base.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

from prefopt.errors import ConfigFieldError

log = logging.getLogger(__name__)


@dataclass
class LoraConfig:
    r: int = 0  # adapter rank; 0: no adapters, every weight is trained
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input, in [0, 1)
    target_modules: Any = "all-linear"  # module names (list) or "all-linear" (every linear but the lm_head)
    save_merged: bool = False  # also write the merged model to <run dir>/checkpoint/merged at the end

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
            raise ConfigFieldError("lora.r", f"expected an integer >= 0 (0: no adapters), got {self.r!r}")
        if not self.alpha > 0:
            raise ConfigFieldError("lora.alpha", f"expected a number > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigFieldError("lora.dropout", f"expected a probability in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        names = [targets] if isinstance(targets, str) else targets
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigFieldError(
                "lora.target_modules", f'expected "all-linear" or a list of module names, got {targets!r}'
            )


def apply_lora(model, cfg: LoraConfig, base_name_or_path: str | None = None):
    """Wrap `model` in a peft `PeftModel` whose only trainable weights are the adapters (B = 0: the same
    function as `model`). `base_name_or_path` goes into adapter_config.json, so the adapter checkpoint
    names the weights it applies to."""
    import peft

    config = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    policy = peft.get_peft_model(model, config)
    policy.peft_config["default"].base_model_name_or_path = base_name_or_path
    trainable, total = policy.get_nb_trainable_parameters()
    log.info("LoRA r=%d: %.3f M adapter parameters on a %.2f M model", cfg.r, trainable / 1e6, total / 1e6)
    return policy


def is_lora(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


@torch.no_grad()
def fold_adapters(model) -> bool:
    """W <- W + (alpha / r) B A, then B <- 0, in every adapter layer whose B is nonzero: the policy computes
    the same function, and with its adapters disabled it now computes it too. Returns whether any moved."""
    from peft.tuners.lora import LoraLayer

    moved = False
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in module.active_adapters:
            b = module.lora_B[name].weight if name in module.lora_B else module.lora_embedding_B[name]
            if not b.any():
                continue
            base = module.get_base_layer().weight
            base += module.get_delta_weight(name).to(base.dtype)
            b.zero_()  # A keeps its values: no random draw, so a fresh and a cached fit stay identical
            moved = True
    return moved


class _Frozen:
    """Calls `module` as part of the reference: adapters off, eval mode, no gradients."""

    def __init__(self, reference: AdapterDisabledReference, module):
        self.reference, self.module = reference, module

    def __call__(self, *args, **kwargs):
        with self.reference.frozen():
            return self.module(*args, **kwargs)


class AdapterDisabledReference:
    """pi_ref as the policy's base: a view of a `PeftModel` whose every call runs with the adapters disabled,
    in eval mode (no dropout) and without gradients, then restores the policy's train/eval modes.

    Offers what the loop asks of a reference: `get_decoder()` and `get_output_embeddings()` (the log-prob
    and token-KL path of `prefopt.models.logps`), and `generate` (reference samples). It owns no weights."""

    def __init__(self, policy):
        self.policy = policy

    @contextlib.contextmanager
    def frozen(self):
        modes = [(m, m.training) for m in self.policy.modules()]
        self.policy.eval()
        try:
            with torch.no_grad(), self.policy.disable_adapter():
                yield
        finally:
            for module, training in modes:
                module.training = training

    def get_decoder(self):
        return _Frozen(self, self.policy.get_decoder())

    def get_output_embeddings(self):
        return _Frozen(self, self.policy.get_output_embeddings())

    def generate(self, *args, **kwargs):
        with self.frozen():
            return self.policy.generate(*args, **kwargs)


def adapter_reference(policy) -> AdapterDisabledReference:
    """The frozen reference of a LoRA policy, its starting point: its base with the adapters disabled. What
    was trained before (the tiny model's reference fit) is folded into the base first, and the base is
    frozen from here on, so preference training moves the adapters only."""
    if fold_adapters(policy):
        log.info("LoRA: weights trained before the reference was taken are folded into the base")
    for name, parameter in policy.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return AdapterDisabledReference(policy)
