"""Response log-probs from a causal LM, computed in chunks so full (N, V) logits never sit in memory.

    lp(y | x) = sum_{t in response} log pi(y_t | x, y_<t)

The decoder runs once per row; the lm_head and log-softmax run over the response positions only, a chunk
of `chunk_tokens` positions at a time, recomputed in backward (activation checkpointing), so memory holds
one (chunk, V) block instead of (R, T, V). Models with extra logit transforms (soft-capping, scaling) need
them added in `_chunk_logits`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from prefopt.data.batching import PaddedSequences


def hidden_states(model, rows: PaddedSequences) -> Tensor:
    """Final decoder hidden states (R, T, D), final norm included; the lm_head is applied later, per chunk.

    The decoder is the model's public `get_decoder()` (LlamaModel, GPT2Model, GPTNeoXModel, ...), which a
    peft `PeftModel` reaches with its adapters in place; `model.base_model` would be peft's LoRA wrapper.
    A frozen `AdapterDisabledReference` answers with the same decoder, adapters off."""
    decoder = model.get_decoder()
    output = decoder(input_ids=rows.input_ids, attention_mask=rows.attention_mask, use_cache=False)
    return output.last_hidden_state


def _predicting_positions(rows: PaddedSequences) -> tuple[Tensor, Tensor, Tensor]:
    """(row, position, target) for every response token: position t predicts token t+1."""
    row, column = rows.response_mask[:, 1:].nonzero(as_tuple=True)
    return row, column, rows.input_ids[row, column + 1]


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


def sequence_logps(lm_head, hidden: Tensor, rows: PaddedSequences, chunk_tokens: int = 2048) -> Tensor:
    """Summed response log-probs per row (R,), fp32."""
    row, column, targets = _predicting_positions(rows)
    token_logps = _chunked(
        lambda h, t: _chunk_logps(lm_head, h, t), chunk_tokens, hidden[row, column], targets
    )
    return torch.zeros(len(rows.input_ids), device=hidden.device).index_add(0, row, token_logps)


def token_kl(
    policy_head,
    policy_hidden: Tensor,
    reference_head,
    reference_hidden: Tensor,
    rows: PaddedSequences,
    chunk_tokens: int = 2048,
) -> Tensor:
    """Per row (R,): sum over response positions t of KL(pi_ref(.|x, y_<t) || pi_theta(.|x, y_<t)),
    full vocabulary, in chunks. Differentiable in the policy hidden states."""
    row, column, _ = _predicting_positions(rows)

    def chunk_kl(policy_h: Tensor, reference_h: Tensor) -> Tensor:
        policy_logp = _chunk_logits(policy_head, policy_h).log_softmax(-1)
        with torch.no_grad():  # the reference is a constant, even when its head is shared or trainable
            reference_logp = _chunk_logits(reference_head, reference_h).log_softmax(-1)
        return F.kl_div(policy_logp, reference_logp, log_target=True, reduction="none").sum(-1)

    kl = _chunked(chunk_kl, chunk_tokens, policy_hidden[row, column], reference_hidden[row, column].detach())
    return torch.zeros(len(rows.input_ids), device=policy_hidden.device).index_add(0, row, kl)


def model_logps(model, rows: PaddedSequences, chunk_tokens: int = 2048) -> Tensor:
    """Convenience: decoder pass plus chunked log-probs, (R,)."""
    return sequence_logps(model.get_output_embeddings(), hidden_states(model, rows), rows, chunk_tokens)
