"""Padding-free rows: several sequences back to back in one row, up to a token budget.

Position ids restart at 0 at every sequence, and that is all a transformers decoder needs to keep them
apart: given no attention mask, it reads the sequence boundaries from the position ids and builds a
block-diagonal causal mask (sdpa, eager, flex attention) or hands them to flash attention's varlen kernel.
A row's unused tail restarts its positions too, so it is one more sequence that nothing reads.
`prefopt.models.packing_support.supports_packing` checks that a model does keep packed sequences apart.

`share_prompts` goes further where the model takes `prefopt.models.shared_prompt_attention`: one row of
prompt groups, each prompt once and then its responses, so a pair's prompt is computed once, not twice.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
from torch import Tensor

from prefopt.models.shared_prompt_attention import Segments, shared_prompt_inputs


@dataclass
class PackedSequences:
    """R sequences packed into G rows of T tokens; per-sequence fields are indexed like the padded rows'."""

    input_ids: Tensor  # (G, T) sequences back to back; a row's tail repeats its first token (never read)
    position_ids: Tensor  # (G, T) 0, 1, ... from every sequence start, and from the tail's start
    attention_mask: Tensor  # (G, T) 1 on real tokens (for counting: the decoder gets no mask)
    response_mask: Tensor  # (G, T) True on response tokens (the ones whose log-probs are summed)
    prompt_lengths: Tensor  # (R,)
    response_tokens: Tensor  # (R,)
    sequence_row: Tensor  # (R,) the row holding each sequence
    sequence_start: Tensor  # (R,) where it (its prompt) begins in that row
    response_start: Tensor | None = None  # (R,) where its response begins; None: right after its prompt
    segments: Segments | None = None  # shared prompts: the row's groups, for the attention layers

    def to(self, device) -> PackedSequences:
        moved = {f: getattr(self, f) for f in self.__dataclass_fields__}
        return PackedSequences(**{f: v.to(device) if isinstance(v, Tensor) else v for f, v in moved.items()})

    @property
    def num_sequences(self) -> int:
        return len(self.prompt_lengths)

    @property
    def response_starts(self) -> Tensor:  # (R,)
        if self.response_start is None:
            return self.sequence_start + self.prompt_lengths
        return self.response_start

    def decoder_inputs(self) -> dict:
        if self.segments is not None:
            return shared_prompt_inputs(self.input_ids, self.position_ids, self.segments)
        return {"input_ids": self.input_ids, "position_ids": self.position_ids}


def best_fit_decreasing(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins holding at most `budget` in all: longest first, each into the
    bin with the least room that still fits it, else a new bin (a length over the budget gets its own)."""
    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, bin), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(rooms, (lengths[i], -1))
        if at < len(rooms):
            room, b = rooms.pop(at)
        else:
            room, b = budget, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - lengths[i] > 0:
            bisect.insort(rooms, (room - lengths[i], b))
    return bins


def pack(rows, budget: int | None = None, width_multiple: int = 1) -> PackedSequences:
    """Pack right-padded rows (`PaddedSequences`) into rows of at most `budget` tokens (None: the longest
    sequence, so no row is wider than the padded ones), best fit decreasing; sequence order is kept in the
    per-sequence fields. The rows' width is rounded up to `width_multiple` (a compiled decoder then sees
    few distinct shapes)."""
    lengths = rows.attention_mask.sum(-1)  # (R,)
    sizes = lengths.tolist()
    bins = best_fit_decreasing(sizes, max(sizes) if budget is None else budget)
    device = rows.input_ids.device
    sequence_row, sequence_start, used = torch.empty_like(lengths), torch.empty_like(lengths), []
    for g, members in enumerate(bins):
        start = 0
        for i in members:
            sequence_row[i], sequence_start[i] = g, start
            start += sizes[i]
        used.append(start)
    width = -(-max(used) // width_multiple) * width_multiple
    # Every real token: its sequence s and offset t, copied to (row of s, start of s + t).
    sequence = torch.repeat_interleave(torch.arange(len(sizes), device=device), lengths)  # (N,)
    offset = torch.arange(len(sequence), device=device) - (lengths.cumsum(0) - lengths)[sequence]  # (N,)
    row, column = sequence_row[sequence], sequence_start[sequence] + offset
    tail_start = torch.tensor(used, device=device)[:, None]  # (G, 1)
    columns = torch.arange(width, device=device)
    position_ids = (columns - tail_start).clamp(min=0)  # (G, T): the tail counts from 0; real tokens below
    position_ids[row, column] = offset
    first = torch.tensor([members[0] for members in bins], device=device)
    input_ids = rows.input_ids[first, :1].expand(-1, width).clone()  # (G, T), real tokens below
    input_ids[row, column] = rows.input_ids[sequence, offset]
    attention_mask = torch.zeros((len(bins), width), dtype=rows.attention_mask.dtype, device=device)
    attention_mask[row, column] = 1
    response_mask = torch.zeros((len(bins), width), dtype=torch.bool, device=device)
    response_mask[row, column] = rows.response_mask[sequence, offset]
    return PackedSequences(
        input_ids,
        position_ids,
        attention_mask,
        response_mask,
        rows.prompt_lengths,
        rows.response_tokens,
        sequence_row,
        sequence_start,
    )


def whole_table_passes(lengths: Tensor, rows_per_pass: int, budget: int | None) -> list[Tensor]:
    """Sequence ids (S,) in passes of at most `rows_per_pass` rows, for a pass over a whole table. Padded
    (`budget` None): longest first, so a pass pads to its neighbours in length. Packed: the table packed
    at once into rows of `budget` tokens (best fit decreasing, which fills rows far better over thousands
    of sequences than over one pass), `rows_per_pass` of those rows' sequences per pass."""
    if budget is None:
        return list(torch.argsort(lengths, descending=True, stable=True).split(rows_per_pass))
    rows = best_fit_decreasing(lengths.tolist(), budget)
    groups = [rows[start : start + rows_per_pass] for start in range(0, len(rows), rows_per_pass)]
    return [torch.tensor([i for row in group for i in row]) for group in groups]


def share_prompts(rows) -> PackedSequences:
    """Right-padded rows (`PaddedSequences`) as one row of prompt groups: every distinct prompt once (in
    order of first appearance), each followed by the responses of the rows that share it, in row order.
    Positions run 0 .. P-1 over the prompt and P, P+1, ... over each response; `segments` tells the
    attention layers where the groups are. No padding: the row is exactly as long as the tokens it holds."""
    lengths, prompts = rows.attention_mask.sum(-1).tolist(), rows.prompt_lengths.tolist()
    ids, responses = rows.input_ids.tolist(), rows.response_mask
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(tuple(ids[i][:prompt]), []).append(i)
    tokens, positions, is_response, segments = [], [], [], []
    sequence_start, response_start = [0] * len(lengths), [0] * len(lengths)
    for prompt_ids, members in groups.items():
        prompt, start = len(prompt_ids), len(tokens)
        tokens += prompt_ids
        positions += range(prompt)
        is_response += [False] * prompt
        for i in members:
            sequence_start[i], response_start[i] = start, len(tokens)
            tokens += ids[i][prompt : lengths[i]]
            positions += range(prompt, lengths[i])
            is_response += responses[i, prompt : lengths[i]].tolist()
        segments.append((prompt, tuple(lengths[i] - prompt for i in members)))
    device = rows.input_ids.device
    row = torch.tensor([tokens], device=device)  # (1, T)
    return PackedSequences(
        input_ids=row,
        position_ids=torch.tensor([positions], device=device),
        attention_mask=torch.ones_like(row, dtype=rows.attention_mask.dtype),
        response_mask=torch.tensor([is_response], device=device),
        prompt_lengths=rows.prompt_lengths,
        response_tokens=rows.response_tokens,
        sequence_row=torch.zeros(len(lengths), dtype=torch.long, device=device),
        sequence_start=torch.tensor(sequence_start, device=device),
        response_start=torch.tensor(response_start, device=device),
        segments=tuple(segments),
    )


def prompt_group_passes(
    sequence_prompt: Tensor, lengths: Tensor, prompt_lengths: Tensor, tokens: int
) -> list[Tensor]:
    """Sequence ids (S,) in passes of about `tokens` positions each once prompts are shared: sequences
    grouped by prompt (so a prompt's responses share one pass where they fit), a pass closed before the
    sequence that would take it over `tokens`. A prompt's first sequence in a pass costs its length, each
    further one its response only."""
    order = torch.argsort(sequence_prompt, stable=True).tolist()
    prompt_of, length, prompt_length = sequence_prompt.tolist(), lengths.tolist(), prompt_lengths.tolist()
    passes, current, used, open_prompt = [], [], 0, None
    for i in order:
        cost = length[i] - prompt_length[i] if prompt_of[i] == open_prompt else length[i]
        if current and used + cost > tokens:
            passes.append(current)
            current, used, cost = [], 0, length[i]
        current.append(i)
        used += cost
        open_prompt = prompt_of[i]
    if current:
        passes.append(current)
    return [torch.tensor(p) for p in passes]
