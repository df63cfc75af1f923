"""Tokenization in one place, with the conventions TRL's DPOTrainer uses.

A sequence is prompt tokens followed by response tokens; only the response tokens are scored.
- Conversational data (a prompt given as chat messages) goes through the tokenizer's chat template when it
  has one: the prompt is the template with the generation prompt, a response the template's rendering of
  prompt + assistant turn minus the prompt's (the same text difference TRL takes). Without a template the
  messages are joined as "role: content" lines.
- BOS is added exactly once, when the tokenizer adds one (a chat template that writes it is not doubled).
- Every response ends with EOS unless its text already does; a response cut by `max_response_tokens` (or by
  `max_length`) keeps no EOS: it is scored as unfinished.
- The prompt always holds at least one token (BOS, else EOS as a start token), so every response token has
  a position that predicts it.
- The prompt is cut from the left to `max_prompt_tokens` (BOS kept), then responses from the right to
  `max_response_tokens` and to `max_length - len(prompt)`; a pair with no room left for a response is dropped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Prompt = str | list[dict[str, Any]]  # plain text, or chat messages before the final assistant turn
BATCH = 1024  # texts per tokenizer call


@dataclass(frozen=True)
class TokenLimits:
    max_prompt_tokens: int
    max_response_tokens: int
    max_length: int | None = None  # prompt + response; None: no joint limit


@dataclass
class TruncationCounts:
    """How many prompts and responses were cut, and pairs dropped, while tokenizing."""

    prompts_cut: int = 0
    responses_cut: int = 0
    pairs_dropped: int = 0
    dropped_examples: list[int] = field(default_factory=list)  # first few dropped pair indices

    def as_dict(self) -> dict:
        return {
            "prompts_cut": self.prompts_cut,
            "responses_cut": self.responses_cut,
            "pairs_dropped": self.pairs_dropped,
            "dropped_examples": self.dropped_examples[:10],
        }


def is_conversational(prompt: Prompt) -> bool:
    return isinstance(prompt, list)


def prompt_key(prompt: Prompt) -> str:
    """A hashable identity for a prompt (messages are serialised)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text it encodes with special tokens."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def start_token(tokenizer) -> int:
    """The token in front of an empty prompt: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """A prompt as text: itself, or the chat template's rendering with the generation prompt (without a
    template, or a tokenizer, "role: content" lines)."""
    if isinstance(prompt, str):
        return prompt
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "


def render_response(tokenizer, prompt: Prompt, response: str) -> str:
    """A response as the text that follows the rendered prompt (the template's assistant turn)."""
    if isinstance(prompt, str) or not getattr(tokenizer, "chat_template", None):
        return response
    head = render_prompt(tokenizer, prompt)
    whole = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": response}], tokenize=False
    )
    if not whole.startswith(head):
        raise ValueError("the chat template renders the prompt differently inside a conversation")
    return whole[len(head) :]


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of many texts without special tokens, in batched tokenizer calls (a bar when many)."""
    from prefopt.progress import progress

    ids: list[list[int]] = []
    starts = range(0, len(texts), BATCH)
    for start in progress(starts, quiet=len(starts) < 4, desc="tokenize", unit="batch"):
        ids += tokenizer(list(texts[start : start + BATCH]), add_special_tokens=False)["input_ids"]
    return ids


def finish_prompt(tokenizer, body: list[int], limits: TokenLimits, bos: bool) -> tuple[list[int], bool]:
    """BOS once in front, the left cut to `max_prompt_tokens`, at least one token; (ids, was cut)."""
    if bos and body[:1] == [tokenizer.bos_token_id]:
        body = body[1:]
    room = limits.max_prompt_tokens - int(bos)
    cut = len(body) > room
    body = body[len(body) - room :] if cut else body
    ids = ([tokenizer.bos_token_id] if bos else []) + body
    return (ids or [start_token(tokenizer)]), cut


def finish_response(tokenizer, body: list[int], room: int) -> tuple[list[int], bool]:
    """EOS appended unless present, then the right cut to `room` tokens (a cut drops EOS); (ids, was cut)."""
    eos = tokenizer.eos_token_id
    ids = body if body[-1:] == [eos] else [*body, eos]
    return (ids[:room], True) if len(ids) > room else (ids, False)


def response_room(limits: TokenLimits, prompt_tokens: int) -> int:
    """Tokens a response may have after a prompt of `prompt_tokens`."""
    room = limits.max_response_tokens
    return room if limits.max_length is None else min(room, limits.max_length - prompt_tokens)
