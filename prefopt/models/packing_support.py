"""Which padding-free layouts a model's decoder reads exactly, probed once per model on a few tokens.

`prefopt.data.layout.Packing` asks `supports_packing` before it packs: packed rows ("rows": a batch of rows;
"one_row": a single row, as flash attention's varlen kernel needs), and one row of prompt groups
(`shares_prompts`, through `prefopt.models.shared_prompt_attention`). Anything the probe cannot confirm is
padded.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prefopt.models.shared_prompt_attention import (
    shared_prompt_inputs,
    use_shared_prompt_attention,
    why_not_shareable,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackingSupport:
    layout: str | None  # "rows": packed rows in a batch; "one_row": a single packed row; None: pad
    reason: str  # why not, when layout is None
    shares_prompts: bool = False  # one row of prompt groups works (`share_prompts`)


_PROBE_FIRST = [1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5]  # token ids < 8: any vocabulary has them
_PROBE_OTHER = [7, 6, 5, 4, 3, 2, 1, 7, 6, 5, 4, 3]  # as long as _PROBE_FIRST, other tokens
_PROBE_LAST = [3, 1, 4]
_PROBE_ROW = [2, 7, 1, 6, 3, 5, 4, 1, 2, 7, 1, 6, 3, 5, 4]  # a second row, as long as the first
_SUPPORT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def supports_packing(model, device) -> PackingSupport:
    """Whether the model's decoder keeps packed sequences apart, probed once per model on a few tokens.

    A row holding a sequence and then `_PROBE_LAST` (positions restarting there), beside a second row,
    must give `_PROBE_LAST` exactly the same hidden states whatever sequence precedes it (no attention
    across the boundary), and close to those it has alone (positions restart). Transformers' Llama,
    Qwen2, Mistral, GPT-2, GPT-NeoX, ... pass (their masks come from the position ids: "rows"); flash
    attention keeps the boundaries of a single row only ("one_row": its varlen kernel); OPT and Bloom
    build their masks or positions without the position ids and are padded. A decoder on plain sdpa is
    also switched to `shared_prompt_attention` and kept on it if prompt groups pass the same checks."""
    if model not in _SUPPORT:
        _SUPPORT[model] = _probe(model, torch.device(device))
        support = _SUPPORT[model]
        name = type(model).__name__
        if support.shares_prompts:
            log.info("packing on for %s (one row; a prompt computed once for all its responses)", name)
        elif support.layout is None:
            log.info("packing off for %s: %s; sequences are padded", name, support.reason)
        else:
            log.info("packing on for %s (%s)", name, support.layout.replace("_", " "))
    return _SUPPORT[model]


@torch.no_grad()
def _probe(model, device: torch.device) -> PackingSupport:
    decoder = model.get_decoder()
    with _eval_mode(model), torch.autocast(device_type=device.type, enabled=False):
        ids = torch.tensor([_PROBE_LAST], device=device)
        alone = decoder(input_ids=ids, use_cache=False).last_hidden_state[0].float()
        support = _probe_rows(decoder, alone, device)
        why_not = why_not_shareable(model)
        if why_not is None:
            use_shared_prompt_attention(model, True)
            shares = _probe_shared_prompts(decoder, device)
            if not shares:
                use_shared_prompt_attention(model, False)
            else:
                support = PackingSupport(support.layout, support.reason, shares_prompts=True)
        else:
            log.debug("prompts not shared for %s: %s", type(model).__name__, why_not)
    return support


def _probe_rows(decoder, alone: Tensor, device: torch.device) -> PackingSupport:
    try:
        for layout in ("rows", "one_row"):
            after_first = _probe_hidden(decoder, _PROBE_FIRST, layout, device)
            after_other = _probe_hidden(decoder, _PROBE_OTHER, layout, device)
            scale = alone.abs().max()
            if (after_first - after_other).abs().max() > 1e-6 * scale:
                continue  # the previous sequence leaks in
            if (after_first - alone).abs().max() > _tolerance(alone) * scale:
                return PackingSupport(None, "its positions do not restart at a packed sequence")
            return PackingSupport(layout, "")
    except (TypeError, ValueError, RuntimeError) as error:  # e.g. no position_ids argument
        return PackingSupport(None, f"its decoder refuses packed rows ({type(error).__name__}: {error})")
    return PackingSupport(None, "a packed sequence attends to the sequence before it")


def _tolerance(hidden: Tensor) -> float:
    return 1e-3 if hidden.dtype == torch.float32 else 5e-2


def _probe_hidden(decoder, first: list[int], layout: str, device) -> Tensor:
    """Hidden states of `_PROBE_LAST` packed after `first`, in a batch of two rows or as one row."""
    ids = torch.tensor([first + _PROBE_LAST, _PROBE_ROW], device=device)  # (2, T)
    positions = [list(range(len(first))) + list(range(len(_PROBE_LAST))), list(range(len(_PROBE_ROW)))]
    positions = torch.tensor(positions, device=device)
    if layout == "one_row":
        ids, positions = ids.view(1, -1), positions.view(1, -1)
    hidden = decoder(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    return hidden.reshape(2, ids.numel() // 2, -1)[0, len(first) :].float()


def _probe_shared_prompts(decoder, device: torch.device) -> bool:
    """Two prompt groups in one row, [FIRST: ROW, LAST] [OTHER: LAST]: the first group's LAST must not see
    ROW (exactly the same with another sibling), and must equal [FIRST, LAST] alone; the second group
    must not see the first (exactly the same when the first changes)."""
    try:
        second = (_PROBE_OTHER, [_PROBE_LAST])
        first = _shared_prompt_hidden(decoder, [(_PROBE_FIRST, [_PROBE_ROW, _PROBE_LAST]), second], device)
        flipped = _PROBE_ROW[::-1]
        sibling = _shared_prompt_hidden(decoder, [(_PROBE_FIRST, [flipped, _PROBE_LAST]), second], device)
        other = _shared_prompt_hidden(decoder, [(_PROBE_OTHER, [_PROBE_ROW, _PROBE_LAST]), second], device)
        ids = torch.tensor([_PROBE_FIRST + _PROBE_LAST], device=device)
        alone = decoder(input_ids=ids, use_cache=False).last_hidden_state[0, len(_PROBE_FIRST) :].float()
    except (TypeError, ValueError, RuntimeError):
        return False
    scale = alone.abs().max()
    no_sibling = (first[1] - sibling[1]).abs().max() <= 1e-6 * scale
    no_group = (first[2] - other[2]).abs().max() <= 1e-6 * scale
    return bool(no_sibling and no_group and (first[1] - alone).abs().max() <= _tolerance(alone) * scale)


def _shared_prompt_hidden(decoder, groups: list[tuple[list[int], list[list[int]]]], device) -> list[Tensor]:
    """The hidden states of every response of `groups` [(prompt, responses)], run as one row of groups."""
    ids, positions, spans = [], [], []
    for prompt, responses in groups:
        ids += prompt
        positions += range(len(prompt))
        for response in responses:
            spans.append(slice(len(ids), len(ids) + len(response)))
            ids += response
            positions += range(len(prompt), len(prompt) + len(response))
    segments = tuple((len(p), tuple(map(len, r))) for p, r in groups)
    ids, positions = torch.tensor([ids], device=device), torch.tensor([positions], device=device)
    hidden = decoder(**shared_prompt_inputs(ids, positions, segments), use_cache=False).last_hidden_state[0]
    return [hidden[span].float() for span in spans]


@contextlib.contextmanager
def _eval_mode(model):
    """No dropout during the probe; each module's own mode restored after."""
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    modes = [m.training for m in modules]
    for module in modules:
        module.training = False
    try:
        yield
    finally:
        for module, training in zip(modules, modes):
            module.training = training
