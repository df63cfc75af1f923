"""Decoder MLPs and RMSNorms that keep fewer activations for backward, with the same forward.

Under autograd a gated MLP  down(act(x Wg^T) * (x Wu^T))  keeps x, the gate g = x Wg^T, act(g), the up
projection u and act(g) * u for backward. `_GatedMLP` keeps x, g and u and recomputes act(g) and the
product in backward (two elementwise passes beside three matmuls). An RMSNorm  w * x / rms(x)  keeps x,
1 / rms(x) and x / rms(x); `_RMSNorm` keeps the first two. On SmolLM2 (d 576, MLP 1536) that is 43.7 ->
27.2 KB per position and layer, fp32; nothing is recomputed through a matmul.

`use_lean_layers` swaps the forward of each MLP and RMSNorm in a decoder whose computation it reproduces
exactly: it runs the module's own forward and the lean one on a probe input and keeps the lean one only
where the two are equal bit for bit (Llama, Qwen, Mistral, SmolLM and Gemma's MLPs and norms are; an
unknown variant keeps its own forward). The lean path runs only where gradients are wanted and the MLP's
projections are plain linear layers (LoRA-wrapped ones keep theirs); generation and no-grad passes are
untouched.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {  # name -> (forward, backward(grad, input))
    "silu": (F.silu, torch.ops.aten.silu_backward),
    "gelu_tanh": (
        lambda x: F.gelu(x, approximate="tanh"),
        lambda grad, x: torch.ops.aten.gelu_backward(grad, x, approximate="tanh"),
    ),
}


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def _linear_grads(grad: Tensor, inputs: Tensor, weight: Tensor, want: tuple[bool, bool]):
    """For y = x W^T + b over flattened rows: (dW, db) as asked, in the parameters' dtypes."""
    rows = grad.reshape(-1, grad.shape[-1])
    d_weight = (rows.T @ inputs.reshape(-1, inputs.shape[-1])).to(weight.dtype) if want[0] else None
    d_bias = rows.sum(0) if want[1] else None
    return d_weight, d_bias


class _GatedMLP(torch.autograd.Function):
    """down(act(x Wg^T + bg) * (x Wu^T + bu)) Wd^T + bd, keeping x, the gate and up for backward."""

    @staticmethod
    def forward(ctx, x, gate_w, gate_b, up_w, up_b, down_w, down_b, activation: str):
        dtype = _compute_dtype(x, gate_w)
        act, _ = ACTIVATIONS[activation]
        with torch.autocast(x.device.type, enabled=False):
            weights = [
                None if t is None else t.to(dtype) for t in (gate_w, gate_b, up_w, up_b, down_w, down_b)
            ]
            xc = x.to(dtype)
            gate = F.linear(xc, weights[0], weights[1])
            up = F.linear(xc, weights[2], weights[3])
            out = F.linear(act(gate) * up, weights[4], weights[5])
        ctx.activation, ctx.x_dtype, ctx.biases = activation, x.dtype, (gate_b, up_b, down_b)
        ctx.save_for_backward(xc, gate, up, gate_w, up_w, down_w)
        return out

    @staticmethod
    def backward(ctx, grad):
        xc, gate, up, gate_w, up_w, down_w = ctx.saved_tensors
        need = ctx.needs_input_grad
        act, act_backward = ACTIVATIONS[ctx.activation]
        dtype = gate.dtype
        with torch.autocast(xc.device.type, enabled=False):
            grad = grad.to(dtype)
            activated = act(gate)
            d_down_w, d_down_b = _linear_grads(grad, activated * up, down_w, (need[5], need[6]))
            d_product = grad @ down_w.to(dtype)
            d_up = d_product * activated
            d_gate = act_backward(d_product.mul_(up), gate)
            d_gate_w, d_gate_b = _linear_grads(d_gate, xc, gate_w, (need[1], need[2]))
            d_up_w, d_up_b = _linear_grads(d_up, xc, up_w, (need[3], need[4]))
            d_x = None
            if need[0]:
                d_x = (d_gate @ gate_w.to(dtype)).add_(d_up @ up_w.to(dtype)).to(ctx.x_dtype)
        biases = [
            None if b is None or d is None else d.to(b.dtype)
            for b, d in zip(ctx.biases, (d_gate_b, d_up_b, d_down_b))
        ]
        return d_x, d_gate_w, biases[0], d_up_w, biases[1], d_down_w, biases[2], None


class _RMSNorm(torch.autograd.Function):
    """x / rms(x) scaled by w ("weight": w * n.to(dtype)) or by 1 + w ("one_plus": (n * (1 + w)) in fp32,
    then the input's dtype), rms over the last dimension in fp32; keeps x and 1 / rms for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, scale: str):
        xf = x.float()
        inv_rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.scale = scale
        ctx.save_for_backward(x, weight, inv_rms)
        if scale == "weight":
            return weight * (xf * inv_rms).to(x.dtype)
        return ((xf * inv_rms) * (1.0 + weight.float())).type_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, inv_rms = ctx.saved_tensors
        xf = x.float()
        normed = xf * inv_rms
        if ctx.scale == "weight":
            d_weight = (grad * normed.to(x.dtype)).reshape(-1, len(weight)).sum(0)
            d_normed = (grad * weight).float()
        else:
            gf = grad.float()
            d_weight = (gf * normed).reshape(-1, len(weight)).sum(0)
            d_normed = gf * (1.0 + weight.float())
        # n = x r, r = (mean(x^2) + eps)^(-1/2):  dx = r dn - x r^3 mean(dn * x)
        d_x = inv_rms * (d_normed - normed * (d_normed * normed).mean(-1, keepdim=True))
        need = ctx.needs_input_grad
        return (
            (d_x.to(x.dtype) if need[0] else None),
            (d_weight.to(weight.dtype) if need[1] else None),
            None,
            None,
        )


def _lean_mlp_forward(self, x: Tensor) -> Tensor:
    projections = (self.gate_proj, self.up_proj, self.down_proj)
    if not torch.is_grad_enabled() or any(type(p) is not nn.Linear for p in projections):
        return self._own_forward(x)
    tensors = [t for p in projections for t in (p.weight, p.bias)]
    return _GatedMLP.apply(x, *tensors, self._lean_activation)


def _lean_norm_forward(self, x: Tensor) -> Tensor:
    if not torch.is_grad_enabled():
        return self._own_forward(x)
    return _RMSNorm.apply(x, self.weight, self._lean_eps, self._lean_scale)


def _norm_eps(module) -> float | None:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return eps if isinstance(eps, float) else None


def _candidates(module: nn.Module) -> list[tuple[object, dict]]:
    """(forward, attributes) that might reproduce `module`'s own forward."""
    projections = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if all(isinstance(p, nn.Linear) for p in projections) and callable(getattr(module, "act_fn", None)):
        return [(_lean_mlp_forward, {"_lean_activation": name}) for name in ACTIVATIONS]
    weight, eps = getattr(module, "weight", None), _norm_eps(module)
    is_norm = type(module).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter)
    if is_norm and weight.dim() == 1 and eps is not None:
        return [(_lean_norm_forward, {"_lean_eps": eps, "_lean_scale": s}) for s in ("weight", "one_plus")]
    return []


def _reproduces(module: nn.Module, forward, attributes: dict) -> bool:
    width = module.gate_proj.in_features if hasattr(module, "gate_proj") else len(module.weight)
    parameter = next(module.parameters())
    generator = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(2, 3, width, generator=generator).to(parameter.device, parameter.dtype)
    probe.requires_grad_(True)
    for name, value in attributes.items():
        setattr(module, name, value)
    try:
        with torch.enable_grad():
            lean = forward(module, probe)
            own = module._own_forward(probe)
    except (RuntimeError, TypeError, ValueError):
        return False
    return lean.shape == own.shape and torch.equal(lean.detach(), own.detach())


def use_lean_layers(model: nn.Module) -> int:
    """Give every MLP and RMSNorm under the model's decoder the lean forward where it computes exactly the
    module's own (a probe decides); the number of modules switched."""
    switched = 0
    for module in model.get_decoder().modules():
        if getattr(module, "_own_forward", None) is not None:  # switched before (kept only when switched)
            switched += 1
            continue
        candidates = _candidates(module)
        if not candidates:
            continue
        module._own_forward = module.forward
        for forward, attributes in candidates:
            if _reproduces(module, forward, attributes):
                module.forward = types.MethodType(forward, module)
                switched += 1
                break
        else:
            del module._own_forward
    return switched
