"""Token-level data: a table of unique (prompt, response) sequences and batches that index into it.

Every per-sequence quantity the loop caches (reference log-probs, auxiliary rewards) is a tensor indexed by
sequence id. A batch forwards each distinct sequence once: rows are unique sequence ids, and chosen,
rejected and side responses (for KL estimators, KTO's mismatched pairs) point at rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prefopt.data.tokenization import (
    Prompt,
    TokenLimits,
    TruncationCounts,
    adds_bos,
    encode,
    finish_prompt,
    finish_response,
    prompt_key,
    render_conversation,
    render_prompt,
    response_after_prompt,
    response_room,
    uses_template,
)


class SequenceTable:
    """Unique prompts, responses and their pairings, tokenized once with the conventions of
    `prefopt.data.tokenization` (BOS once; a chat template's turn as rendered, plain text with EOS, unless
    cut; prompts cut from the left)."""

    def __init__(
        self, tokenizer, max_prompt_tokens: int, max_response_tokens: int, max_length: int | None = None
    ):
        self.tokenizer = tokenizer
        self.limits = TokenLimits(max_prompt_tokens, max_response_tokens, max_length)
        self.max_prompt_tokens = max_prompt_tokens
        self.max_response_tokens = max_response_tokens
        self.adds_bos = adds_bos(tokenizer)
        self.counts = TruncationCounts()
        self.prompt_texts: list[str] = []  # rendered (a chat template's text for conversational prompts)
        self.prompt_ids: list[list[int]] = []
        self._prompt_bodies: list[list[int]] = []  # rendered prompts' ids before BOS and cuts
        self.prompt_raw: list[Prompt] = []
        self.response_texts: list[str] = []
        self.response_ids: list[list[int]] = []
        self.sequence_prompt: list[int] = []
        self.sequence_response: list[int] = []
        self._prompts: dict[str, int] = {}
        self._responses: dict[tuple[int, ...], int] = {}
        self._sequences: dict[tuple[int, int], int] = {}
        # response ids before EOS and cuts: by text, or by (prompt, text) for a chat template's turn
        self._bodies: dict[str | tuple[int, str], list[int]] = {}

    def __len__(self) -> int:
        return len(self.sequence_prompt)

    def prompt(self, prompt: Prompt) -> int:
        key = prompt_key(prompt)
        if key not in self._prompts:
            self._add_prompts([prompt])
        return self._prompts[key]

    def _add_prompts(self, prompts: list[Prompt]) -> None:
        fresh = list({prompt_key(p): p for p in prompts if prompt_key(p) not in self._prompts}.values())
        texts = [render_prompt(self.tokenizer, p) for p in fresh]
        for prompt, text, body in zip(fresh, texts, encode(self.tokenizer, texts)):
            ids, cut = finish_prompt(self.tokenizer, body, self.limits, self.adds_bos)
            self.counts.prompts_cut += cut
            self._prompts[prompt_key(prompt)] = len(self.prompt_ids)
            self.prompt_texts.append(text)
            self.prompt_raw.append(prompt)
            self.prompt_ids.append(ids)
            self._prompt_bodies.append(body)

    def response(self, text: str, ids: list[int] | None = None, prompt: int | None = None) -> int | None:
        """Intern a response to prompt id `prompt` (its length bounds the room under `max_length`; its
        messages shape a chat template's rendering); `ids`, already final, skip tokenization. None when
        the prompt leaves no room for a response."""
        if ids is None:
            key = self._body_key(prompt, text)
            self._add_bodies([key])
            used = len(self.prompt_ids[prompt]) if prompt is not None else 0
            room = response_room(self.limits, used)
            if room <= 0:
                return None
            ids, cut = finish_response(self.tokenizer, self._bodies[key], room, eos=isinstance(key, str))
            self.counts.responses_cut += cut
        key = tuple(ids)
        if key not in self._responses:
            self._responses[key] = len(self.response_ids)
            self.response_texts.append(text)
            self.response_ids.append(list(ids))
        return self._responses[key]

    def add_pairs(
        self, prompts: list[Prompt], chosen: list[str], rejected: list[str]
    ) -> tuple[list[int], list[int], list[int], list[int]]:
        """Tokenize many pairs in batched calls: (kept pair indices, prompt ids, chosen and rejected
        sequence ids); a pair whose prompt leaves no room for a response is dropped and counted."""
        self._add_prompts(list(prompts))
        prompt_ids = [self._prompts[prompt_key(p)] for p in prompts]
        self._add_bodies(
            [self._body_key(i, y) for i, pair in zip(prompt_ids, zip(chosen, rejected)) for y in pair]
        )
        kept, kept_prompts, chosen_ids, rejected_ids = [], [], [], []
        for index, (prompt, y_w, y_l) in enumerate(zip(prompt_ids, chosen, rejected)):
            winner, loser = self.response(y_w, prompt=prompt), self.response(y_l, prompt=prompt)
            if winner is None or loser is None:
                self.counts.pairs_dropped += 1
                self.counts.dropped_examples.append(index)
                continue
            kept.append(index)
            kept_prompts.append(prompt)
            chosen_ids.append(self.sequence(prompt, winner))
            rejected_ids.append(self.sequence(prompt, loser))
        return kept, kept_prompts, chosen_ids, rejected_ids

    def _body_key(self, prompt: int | None, text: str) -> str | tuple[int, str]:
        """A plain response is tokenized once for all prompts; a chat template's turn once per prompt."""
        templated = prompt is not None and uses_template(self.tokenizer, self.prompt_raw[prompt])
        return (prompt, text) if templated else text

    def _add_bodies(self, keys: list[str | tuple[int, str]]) -> None:
        """Tokenize the responses not seen yet in batched calls: a plain text as itself; a chat template's
        turn as the rendered conversation, keeping the ids after the prompt's (TRL's difference)."""

        def text(key: str | tuple[int, str]) -> str:
            if isinstance(key, str):
                return key
            return render_conversation(self.tokenizer, self.prompt_raw[key[0]], key[1])

        fresh = [key for key in dict.fromkeys(keys) if key not in self._bodies]
        for key, ids in zip(fresh, encode(self.tokenizer, [text(key) for key in fresh])):
            plain = isinstance(key, str)
            self._bodies[key] = ids if plain else response_after_prompt(self._prompt_bodies[key[0]], ids)

    def sequence(self, prompt: int, response: int) -> int:
        key = (prompt, response)
        if key not in self._sequences:
            self._sequences[key] = len(self.sequence_prompt)
            self.sequence_prompt.append(prompt)
            self.sequence_response.append(response)
        return self._sequences[key]

    def add(self, prompt: Prompt, response_text: str) -> int:
        prompt_id = self.prompt(prompt)
        response = self.response(response_text, prompt=prompt_id)
        if response is None:
            raise ValueError(f"prompt {prompt_id} leaves no room for a response under dataset.max_length")
        return self.sequence(prompt_id, response)

    def texts(self, sequence_ids: list[int]) -> tuple[list[str], list[str]]:
        prompts = [self.prompt_texts[self.sequence_prompt[s]] for s in sequence_ids]
        responses = [self.response_texts[self.sequence_response[s]] for s in sequence_ids]
        return prompts, responses

    def lengths(self) -> Tensor:
        """(S,) prompt + response tokens of every sequence."""
        pairs = zip(self.sequence_prompt, self.sequence_response)
        return torch.tensor([len(self.prompt_ids[p]) + len(self.response_ids[r]) for p, r in pairs])

    def pad(self, sequence_ids: Tensor) -> PaddedSequences:
        """Right-padded prompt+response rows; response_mask marks the response tokens."""
        prompts = [self.prompt_ids[self.sequence_prompt[s]] for s in sequence_ids.tolist()]
        responses = [self.response_ids[self.sequence_response[s]] for s in sequence_ids.tolist()]
        width = max(len(p) + len(r) for p, r in zip(prompts, responses))
        input_ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        response_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
        for row, (p, r) in enumerate(zip(prompts, responses)):
            input_ids[row, : len(p) + len(r)] = torch.tensor(p + r)
            attention_mask[row, : len(p) + len(r)] = 1
            response_mask[row, len(p) : len(p) + len(r)] = True
        prompt_lengths = torch.tensor([len(p) for p in prompts])
        return PaddedSequences(input_ids, attention_mask, response_mask, prompt_lengths)


@dataclass
class PaddedSequences:
    """One sequence per row, right-padded. `prefopt.data.packing.PackedSequences` has the same interface
    (per-sequence fields, each sequence's row and start, the decoder's inputs) with several per row."""

    input_ids: Tensor  # (R, T)
    attention_mask: Tensor  # (R, T) 1 on real tokens
    response_mask: Tensor  # (R, T) True on response tokens (the ones whose log-probs are summed)
    prompt_lengths: Tensor  # (R,)

    def to(self, device) -> PaddedSequences:
        tensors = (self.input_ids, self.attention_mask, self.response_mask, self.prompt_lengths)
        return PaddedSequences(*(t.to(device) for t in tensors))

    @property
    def response_tokens(self) -> Tensor:  # (R,)
        return self.response_mask.sum(-1)

    @property
    def num_sequences(self) -> int:
        return len(self.input_ids)

    @property
    def sequence_row(self) -> Tensor:  # (R,) sequence i is row i
        return torch.arange(len(self.input_ids), device=self.input_ids.device)

    @property
    def sequence_start(self) -> Tensor:  # (R,) every sequence starts its row
        return torch.zeros(len(self.input_ids), dtype=torch.long, device=self.input_ids.device)

    @property
    def response_starts(self) -> Tensor:  # (R,) each response right after its prompt
        return self.prompt_lengths

    def decoder_inputs(self) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


@dataclass
class PairSplit:
    """One split of preference pairs as sequence ids."""

    chosen: Tensor  # (N,) sequence ids
    rejected: Tensor  # (N,)
    labels: Tensor  # (N,) P(chosen preferred)
    prompts: Tensor  # (N,) prompt ids
    mismatched: Tensor | None = None  # (N,) sequence ids pairing each prompt with another prompt's response

    def __len__(self) -> int:
        return len(self.chosen)


@dataclass
class Batch:
    """A batch of pairs: unique rows, plus indices saying which row is each pair's chosen/rejected/side."""

    sequence_ids: Tensor  # (R,) the table's ids of the rows
    rows: PaddedSequences  # (R, T)
    chosen_rows: Tensor  # (B,)
    rejected_rows: Tensor  # (B,)
    labels: Tensor  # (B,)
    kl_rows: Tensor | None = None  # (M,) side responses for a KL estimator
    kl_groups: Tensor | None = (
        None  # (M,) which group (distinct prompt of the batch) each side row belongs to
    )
    example_groups: Tensor | None = None  # (B,) group of each pair
    mismatched_rows: Tensor | None = None  # (B,)

    @property
    def num_pairs(self) -> int:
        return len(self.chosen_rows)


def make_batch(
    table: SequenceTable,
    split: PairSplit,
    examples: Tensor,
    kl_side: dict[int, list[int]] | None,
    with_mismatched: bool,
) -> Batch:
    """Assemble the pairs `examples` of `split`; `kl_side` maps a prompt id to its side sequence ids."""
    parts = [split.chosen[examples], split.rejected[examples]]
    kl_sequences = kl_groups = example_groups = None
    if kl_side is not None:
        prompt_ids, example_groups = torch.unique(split.prompts[examples], return_inverse=True)
        sides = [torch.tensor(kl_side[int(p)], dtype=torch.long) for p in prompt_ids]
        kl_sequences = torch.cat(sides)
        kl_groups = torch.cat([torch.full((len(s),), g) for g, s in enumerate(sides)])
        parts.append(kl_sequences)
    if with_mismatched:
        parts.append(split.mismatched[examples])
    sequence_ids, inverse = torch.unique(torch.cat(parts), return_inverse=True)
    pieces = list(torch.split(inverse, [len(p) for p in parts]))
    return Batch(
        sequence_ids=sequence_ids,
        rows=table.pad(sequence_ids),
        chosen_rows=pieces[0],
        rejected_rows=pieces[1],
        labels=split.labels[examples],
        kl_rows=pieces[2] if kl_side is not None else None,
        kl_groups=kl_groups,
        example_groups=example_groups,
        mismatched_rows=pieces[-1] if with_mismatched else None,
    )
