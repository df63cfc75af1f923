"""Tokenization in one place, with the conventions of TRL's DPOTrainer (1.x).

A sequence is prompt tokens followed by response tokens; only the response tokens are scored.
- Conversational data (a prompt given as chat messages) goes through the tokenizer's chat template when it
  has one: the prompt is the template's ids with the generation prompt; a response is the ids of the
  template's rendering of prompt + assistant turn after the prompt's ids (TRL's token difference), so it
  ends where the template closes the turn (ChatML's `<|im_end|>\n`, Gemma's `<end_of_turn>\n`, Llama 3's
  `<|eot_id|>`) and no EOS is appended. Without a template the messages are joined as "role: content" lines
  and treated as plain text.
- Plain text: every response ends with EOS unless its text already does.
- BOS is added exactly once, when the tokenizer adds one (a chat template that writes it is not doubled).
- A response cut by `max_response_tokens` (or by `max_length`) ends where it is cut: no EOS, it is scored as
  unfinished.
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


def uses_template(tokenizer, prompt: Prompt) -> bool:
    """Whether a prompt goes through the tokenizer's chat template: chat messages and a template."""
    return is_conversational(prompt) and bool(getattr(tokenizer, "chat_template", None))


def render_conversation(tokenizer, prompt: list[dict[str, Any]], response: str) -> str:
    """The chat template's rendering of the prompt's messages and the assistant turn `response`, without a
    generation prompt: the text whose ids, after the prompt's, are the response."""
    turn = {"role": "assistant", "content": response}
    return tokenizer.apply_chat_template([*prompt, turn], tokenize=False)


def response_after_prompt(prompt_body: list[int], whole: list[int]) -> list[int]:
    """A templated response: the conversation's ids after the prompt's (rendered with the generation
    prompt), i.e. the assistant turn through the template's end of turn, as TRL takes it."""
    if whole[: len(prompt_body)] != prompt_body:
        raise ValueError(
            "the chat template's prompt (with the generation prompt) does not tokenize as the start of the "
            "conversation with the assistant turn"
        )
    return whole[len(prompt_body) :]


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


def finish_response(tokenizer, body: list[int], room: int, eos: bool = True) -> tuple[list[int], bool]:
    """With `eos` (plain text) EOS appended unless present; a templated turn is kept as the template closes
    it. Then the right cut to `room` tokens (a cut drops what follows, EOS included); (ids, was cut)."""
    ids = [*body, tokenizer.eos_token_id] if eos and body[-1:] != [tokenizer.eos_token_id] else body
    return (ids[:room], True) if len(ids) > room else (ids, False)


def response_room(limits: TokenLimits, prompt_tokens: int) -> int:
    """Tokens a response may have after a prompt of `prompt_tokens`."""
    room = limits.max_response_tokens
    return room if limits.max_length is None else min(room, limits.max_length - prompt_tokens)
