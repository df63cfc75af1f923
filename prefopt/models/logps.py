"""Response log-probs from a causal LM, computed in chunks so full (N, V) logits never sit in memory.

    lp(y | x) = sum_{t in response} log pi(y_t | x, y_<t)

The decoder runs once per row, over padded rows (one sequence each), packed rows (several, positions
restarting per sequence) or one row of prompt groups (each prompt once, then its responses:
`prefopt.data.packing`); `prefopt.data.layout.Packing` picks the layout per model. The lm_head and
log-softmax run over the response positions only: through Liger's fused linear + cross-entropy kernel when
it is installed and the hidden states are on CUDA, else a chunk of `chunk_tokens` positions at a time,
recomputed in backward (activation checkpointing), so memory holds one (chunk, V) block instead of
(R, T, V). Models with extra logit transforms (soft-capping, scaling) need them added in `_chunk_logits`
(and get no fused kernel).
"""

from __future__ import annotations

import functools
import inspect
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class Rows(Protocol):
    """A layout of sequences in decoder rows (`prefopt.data`'s PaddedSequences and PackedSequences): what
    the log-prob math reads of it. Tensors of R sequences laid out in G rows of T columns."""

    input_ids: Tensor  # (G, T)
    num_sequences: int  # R
    response_tokens: Tensor  # (R,) scored tokens of each sequence
    sequence_row: Tensor  # (R,) the row holding each sequence
    sequence_start: Tensor  # (R,) the column of its prompt's first token
    prompt_lengths: Tensor  # (R,)
    response_starts: Tensor  # (R,) the column of its response's first token

    def decoder_inputs(self) -> dict: ...


# Each chunk reads the (V, D) head about five times (forward, and in backward the recomputed logits, the
# hidden gradient and the weight gradient's read-modify-write), so larger chunks cost less traffic and more
# buffer: SmolLM2's head (V 49152, d 576) over 2048 tokens, forward + backward on 1 CPU thread, took
# 6.37 / 6.22 / 5.92 / 5.66 s at 128 / 256 / 512 / 1024 tokens; 512 holds a 100 MB fp32 buffer there.
CHUNK_TOKENS = 512


def hidden_states(model, rows: Rows) -> Tensor:
    """Final decoder hidden states (G, T, D) of the rows, final norm included; the lm_head comes later.

    The decoder is the model's public `get_decoder()` (LlamaModel, GPT2Model, GPTNeoXModel, ...), which a
    peft `PeftModel` reaches with its adapters in place; `model.base_model` would be peft's LoRA wrapper.
    A frozen `AdapterDisabledReference` answers with the same decoder, adapters off. Padded rows pass an
    attention mask; packed rows pass position ids and no mask (see `prefopt.data.packing`)."""
    decoder = model.get_decoder()
    return decoder(**rows.decoder_inputs(), use_cache=False).last_hidden_state


def scored_positions(rows: Rows) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(sequence, row, column, target) (N,) for every response token, sequence by sequence in order:
    position `column` of `row` predicts `target`. The same order in any layout. A response's first token
    is predicted from its prompt's last position, each later one from the token before it (in a shared
    prompt group the response need not follow its prompt directly)."""
    counts = rows.response_tokens  # (R,)
    sequence = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)  # (N,)
    offset = torch.arange(len(sequence), device=counts.device) - (counts.cumsum(0) - counts)[sequence]
    row = rows.sequence_row[sequence]
    at = rows.response_starts[sequence] + offset  # (N,) the target token's own column
    last_prompt = rows.sequence_start[sequence] + rows.prompt_lengths[sequence] - 1
    column = torch.where(offset == 0, last_prompt, at - 1)
    return sequence, row, column, rows.input_ids[row, at]


def _chunk_logits(lm_head, hidden: Tensor) -> Tensor:
    return lm_head(hidden).float()  # (n, V), fp32 for a stable log-softmax


def _chunk_logps(lm_head, hidden: Tensor, targets: Tensor) -> Tensor:
    logits = _chunk_logits(lm_head, hidden)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _chunked(fn, chunk_tokens: int, *tensors: Tensor) -> Tensor:
    """Apply `fn` to row chunks of `tensors`, checkpointed when gradients are on, and concatenate."""
    pieces = []
    for start in range(0, len(tensors[0]), chunk_tokens):
        chunk = [t[start : start + chunk_tokens] for t in tensors]
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in chunk)
        pieces.append(checkpoint(fn, *chunk, use_reentrant=False) if grad else fn(*chunk))
    return torch.cat(pieces) if pieces else tensors[0].new_zeros(0)


class _LinearLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[target] (n,) fp32 for n positions, `chunk` rows at a time through one
    reused (chunk, V) buffer, without keeping any logits for backward.

    Forward, per chunk: the logits into the buffer, the target's logit, then the log-sum-exp in place
    (max, subtract, exp, sum: torch.logsumexp's own steps, so the same values). Backward recomputes each
    chunk's logits once: d lp / d logits = onehot(target) - softmax, so with g the upstream gradient,
    grad_h = (g (onehot - p)) W and grad_W = sum over chunks of (g (onehot - p))^T h, accumulated in one
    (V, D) tensor. Three matmuls of a chunk against the vocabulary in all, and no (n, V) or per-chunk
    (V, D) allocation: on CPU a fresh 50 MB block costs about as much to fault in as a third of its matmul.
    Under autocast the matmuls run in its dtype (the weight cast once, not once per chunk)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        ctx.dtype, ctx.chunk = dtype, chunk
        logps = hidden.new_empty(len(hidden), dtype=torch.float32)
        lse = torch.empty_like(logps)  # (n,) kept for backward
        with torch.autocast(device, enabled=False):
            head = _HeadBlocks(weight, bias, dtype, min(chunk, len(hidden)))
            for rows in _spans(len(hidden), chunk):
                logits = head.logits(hidden[rows])  # (n, V) fp32, the buffer
                target = logits.gather(1, targets[rows, None]).squeeze(1)
                top = logits.amax(1)
                top.masked_fill_(top.abs() == float("inf"), 0)
                lse[rows] = logits.sub_(top[:, None]).exp_().sum(1).log_().add_(top)
                logps[rows] = target - lse[rows]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return logps

    @staticmethod
    def backward(ctx, grad: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        head = _HeadBlocks(weight, bias, ctx.dtype, min(ctx.chunk, len(hidden)))
        d_hidden = torch.empty_like(hidden) if want_h else None
        d_weight = torch.zeros_like(weight) if want_w else None
        d_bias = torch.zeros_like(bias, dtype=torch.float32) if want_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            for rows in _spans(len(hidden), ctx.chunk):
                g = grad[rows].float()
                d_logits = head.logits(hidden[rows]).sub_(lse[rows, None]).exp_().mul_(-g[:, None])  # -g p
                d_logits[torch.arange(len(g), device=g.device), targets[rows]] += g  # + g onehot
                if d_bias is not None:
                    d_bias += d_logits.sum(0)
                d_logits = d_logits.to(ctx.dtype)
                if d_hidden is not None:
                    d_hidden[rows] = (d_logits @ head.weight).to(hidden.dtype)
                if d_weight is not None:
                    h = hidden[rows].to(ctx.dtype)
                    if d_weight.dtype == ctx.dtype:
                        d_weight.addmm_(d_logits.T, h)
                    else:
                        d_weight += d_logits.T @ h
        return d_hidden, d_weight, None if d_bias is None else d_bias.to(bias.dtype), None, None


class _HeadBlocks:
    """The head's weight in the compute dtype (cast once) and a reused (chunk, V) fp32 logits buffer."""

    def __init__(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype, chunk: int):
        self.weight = weight.to(dtype)
        self.bias = None if bias is None else bias.to(dtype)
        self.raw = weight.new_empty((chunk, len(weight)), dtype=dtype)
        self.buffer = self.raw if dtype == torch.float32 else self.raw.float()

    def logits(self, hidden: Tensor) -> Tensor:
        n = len(hidden)
        raw, out = self.raw[:n], self.buffer[:n]
        if self.bias is None:
            torch.mm(hidden.to(self.weight.dtype), self.weight.T, out=raw)
        else:
            torch.addmm(self.bias, hidden.to(self.weight.dtype), self.weight.T, out=raw)
        return out if out is raw else out.copy_(raw)


def _spans(n: int, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, n)) for start in range(0, n, chunk)]


def token_logps(lm_head, hidden: Tensor, targets: Tensor, chunk_tokens: int = CHUNK_TOKENS) -> Tensor:
    """log pi(target | h) (n,) fp32 for hidden states (n, D): fused when `fused_kernel_applies`; for a
    plain linear head, through `_LinearLogps` (with or without gradients); else checkpointed chunks of
    the head."""
    if fused_kernel_applies(lm_head, hidden):
        return fused_token_logps(lm_head, hidden, targets)
    if type(lm_head) is nn.Linear:
        return _LinearLogps.apply(hidden, lm_head.weight, lm_head.bias, targets, chunk_tokens)
    return _chunked(lambda h, t: _chunk_logps(lm_head, h, t), chunk_tokens, hidden, targets)


def sequence_logps(lm_head, hidden: Tensor, rows: Rows, chunk_tokens: int = CHUNK_TOKENS) -> Tensor:
    """Summed response log-probs per sequence (R,), fp32, from the rows' hidden states (G, T, D)."""
    sequence, row, column, targets = scored_positions(rows)
    logps = token_logps(lm_head, hidden[row, column], targets, chunk_tokens)  # (N,)
    return torch.zeros(rows.num_sequences, device=hidden.device).index_add(0, sequence, logps)


def token_kl(
    policy_head,
    policy_hidden: Tensor,
    reference_head,
    reference_hidden: Tensor,
    rows: Rows,
    chunk_tokens: int = CHUNK_TOKENS,
    reference_rows: Rows | None = None,
) -> Tensor:
    """Per sequence (R,): sum over response positions t of KL(pi_ref(.|x, y_<t) || pi_theta(.|x, y_<t)),
    full vocabulary, in chunks. Differentiable in the policy hidden states. `reference_rows`: the
    reference's layout of the same sequences when it differs from the policy's `rows`."""
    sequence, row, column, _ = scored_positions(rows)
    _, reference_row, reference_column, _ = scored_positions(reference_rows or rows)

    def chunk_kl(policy_h: Tensor, reference_h: Tensor) -> Tensor:
        policy_logp = _chunk_logits(policy_head, policy_h).log_softmax(-1)
        with torch.no_grad():  # the reference is a constant, even when its head is shared or trainable
            reference_logp = _chunk_logits(reference_head, reference_h).log_softmax(-1)
        return F.kl_div(policy_logp, reference_logp, log_target=True, reduction="none").sum(-1)

    reference_h = reference_hidden[reference_row, reference_column].detach()
    kl = _chunked(chunk_kl, chunk_tokens, policy_hidden[row, column], reference_h)
    return torch.zeros(rows.num_sequences, device=policy_hidden.device).index_add(0, sequence, kl)


def model_logps(model, rows: Rows, chunk_tokens: int = CHUNK_TOKENS) -> Tensor:
    """Convenience: decoder pass plus chunked log-probs, (R,), in the rows' own layout (to pack them first:
    `prefopt.data.layout.Packing.logps`)."""
    return sequence_logps(model.get_output_embeddings(), hidden_states(model, rows), rows, chunk_tokens)


@functools.cache
def _liger() -> tuple[object, bool] | None:
    """(Liger's fused linear + cross-entropy, whether its per-token backward is exact) when installed.
    Versions before the `token_grad_output` fix scale a reduction="none" gradient by one scalar, which is
    wrong for per-sequence weights: those serve gradient-free passes only."""
    try:
        from liger_kernel.ops import fused_linear_cross_entropy as ops
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    exact = "token_grad_output" in inspect.signature(ops.fused_linear_cross_entropy_forward).parameters
    return liger_fused_linear_cross_entropy, exact


def fused_kernel_applies(lm_head, hidden: Tensor) -> bool:
    """Liger is installed, the hidden states are on CUDA, the head is a plain linear layer (no logit
    transform), and its backward is exact or no gradient is needed."""
    kernel = _liger()
    if kernel is None or not hidden.is_cuda or type(lm_head) is not nn.Linear:
        return False
    grad = torch.is_grad_enabled() and (hidden.requires_grad or lm_head.weight.requires_grad)
    return kernel[1] or not grad


def fused_token_logps(lm_head: nn.Linear, hidden: Tensor, targets: Tensor) -> Tensor:
    """log pi(target | h) (n,) fp32 through Liger's fused linear + cross-entropy: the kernel computes the
    logits a chunk at a time and never holds all (n, V) of them."""
    fused, _ = _liger()
    return -fused(hidden, lm_head.weight, targets, bias=lm_head.bias, reduction="none").float()
