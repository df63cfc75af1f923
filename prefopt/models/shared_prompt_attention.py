"""Attention over a row of prompt groups: a pair's prompt runs through the decoder once, and each of its
responses attends to that one copy.

A group in the row is a prompt of P tokens followed by its responses y_1 .. y_k (positions P, P+1, ...
for each), and token t of y_j attends to

    the prompt (all P tokens) and y_j's own tokens up to t; never another response or another group,

which is exactly what it would see in its own row [prompt, y_j]: the same hidden states and log-probs,
for P + sum_j |y_j| positions instead of k P + sum_j |y_j|. Implemented as transformers' sdpa attention,
registered under `IMPLEMENTATION`, that reads the groups from the `shared_prompt_segments` keyword the
decoder passes down to every attention layer (`prefopt.data.packing.share_prompts` builds them): one
causal call over [prompt, y_1] and one call over [prompt, y_j] for each further response, with no padding
and no (T, T) mask. Without that keyword it is plain sdpa, so generation and padded batches are unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

IMPLEMENTATION = "prefopt_shared_prompt_sdpa"
Segments = tuple[tuple[int, tuple[int, ...]], ...]  # per group: (prompt tokens, each response's tokens)


def shared_prompt_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    shared_prompt_segments: Segments | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """query (1, H, T, d), key and value (1, H_kv, T, d) over one row of groups -> (1, T, H, d)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if shared_prompt_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    # One split per tensor (its backward is one concatenation), in pieces [prompt + y_1], y_2, ..., y_k.
    sizes = [n for prompt, replies in shared_prompt_segments for n in (prompt + replies[0], *replies[1:])]
    queries, keys, values = query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2)
    outputs, piece = [], 0
    for prompt, responses in shared_prompt_segments:
        first = sdpa_attention_forward(module, queries[piece], keys[piece], values[piece], None, **kwargs)[0]
        outputs.append(first)
        prompt_keys, prompt_values = keys[piece][:, :, :prompt], values[piece][:, :, :prompt]
        piece += 1
        for length in responses[1:]:  # query t of y_j sees the prompt and y_j's first t + 1 tokens
            sees = torch.ones(length, prompt + length, dtype=torch.bool, device=query.device).tril(prompt)
            attended_keys = torch.cat([prompt_keys, keys[piece]], 2)
            attended_values = torch.cat([prompt_values, values[piece]], 2)
            out = sdpa_attention_forward(
                module, queries[piece], attended_keys, attended_values, sees[None, None], **kwargs
            )[0]
            outputs.append(out)
            piece += 1
    return torch.cat(outputs, 1), None


def shared_prompt_inputs(input_ids: Tensor, position_ids: Tensor, segments: Segments) -> dict:
    """The decoder's keyword arguments for one row of groups (1, T). The attention mask is a (1, 1, 1, 1)
    placeholder: transformers takes any 4D mask as already built, so it builds no (T, T) mask that the
    groups' attention would never read. A decoder that did not pass `shared_prompt_segments` down would
    attend everywhere under that placeholder, which `prefopt.models.packing_support` detects."""
    placeholder = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=input_ids.device)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": placeholder,
        "shared_prompt_segments": segments,
    }


def _register() -> None:
    """Make `IMPLEMENTATION` a transformers attention implementation with sdpa's mask builder (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(IMPLEMENTATION, shared_prompt_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def why_not_shareable(model) -> str | None:
    """None when the model's decoder can take `IMPLEMENTATION`: it runs sdpa with a plain causal mask (no
    sliding window, no soft-capping, which the groups' calls would leave out); else the reason."""
    config = getattr(model.get_decoder(), "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation == IMPLEMENTATION:
        return None
    if implementation != "sdpa":
        return f"its attention is {implementation}, not sdpa"
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    if sliding or any("sliding" in str(kind) for kind in getattr(config, "layer_types", None) or []):
        return "it has sliding-window attention"
    if getattr(config, "attn_logit_softcapping", None):
        return "it soft-caps attention logits"
    return None


def use_shared_prompt_attention(model, on: bool) -> None:
    """Switch the model's decoder between sdpa and `IMPLEMENTATION` (its config is shared with the model,
    so the whole model follows). Exported weights and configs are unaffected: the implementation is not
    saved."""
    decoder = model.get_decoder()
    if on:
        _register()
    decoder.set_attn_implementation(IMPLEMENTATION if on else "sdpa")
