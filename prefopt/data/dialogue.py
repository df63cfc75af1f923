"""Dialogues as Anthropic HH text ("\\n\\nHuman: ...\\n\\nAssistant: ...") or as chat messages.

Every conversational adapter offers `chat`: true gives chat messages (the tokenizer's chat template renders
them), false gives HH-style text, the format of Anthropic/hh-rlhf and of the HH + OASST + SHP mixture on
base models: the prompt ends with "\\n\\nAssistant:" and a response starts with a space.
"""

from __future__ import annotations

import re

from prefopt.data.pairs import BadRow, Prompt

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
SPEAKERS = {"user": HUMAN, "assistant": ASSISTANT}
_TURN = re.compile(r"\n\n(Human|Assistant):")


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response): the prompt is the chosen dialogue up to and including
    its last "\\n\\nAssistant:", which the rejected dialogue must share; the responses are what follows."""
    cut = chosen.rfind(ASSISTANT)
    if cut < 0:
        raise BadRow("chosen", 'no "\\n\\nAssistant:" turn')
    prompt = chosen[: cut + len(ASSISTANT)]
    if not rejected.startswith(prompt):
        raise BadRow("rejected", "does not continue the chosen dialogue's prompt")
    chosen_response, rejected_response = chosen[len(prompt) :], rejected[len(prompt) :]
    if HUMAN in chosen_response:
        raise BadRow("chosen", "ends with a human turn, not an assistant one")
    if ASSISTANT in rejected_response or HUMAN in rejected_response:
        raise BadRow("rejected", "has more turns after the prompt than the chosen dialogue")
    return prompt, chosen_response, rejected_response


def hh_messages(prompt: str) -> list[dict[str, str]]:
    """HH prompt text (ending in "\\n\\nAssistant:") as chat messages, without the empty final turn."""
    parts = _TURN.split(prompt)  # [before, speaker, text, speaker, text, ...]
    if parts[0].strip():
        raise BadRow("chosen", 'text before the first "\\n\\nHuman:" turn')
    turns = [
        {"role": "user" if speaker == "Human" else "assistant", "content": text.strip()}
        for speaker, text in zip(parts[1::2], parts[2::2])
    ]
    return turns[:-1]  # the last is the empty assistant turn the responses fill


def hh_text(messages: list[dict[str, str]]) -> str:
    """Chat messages as an HH prompt: each turn "\\n\\nHuman: ..." or "\\n\\nAssistant: ...", then
    "\\n\\nAssistant:". A system message leads as plain text."""
    head = "".join(m["content"] for m in messages if m["role"] == "system")
    turns = "".join(f"{SPEAKERS[m['role']]} {m['content']}" for m in messages if m["role"] != "system")
    return head + turns + ASSISTANT


def as_prompt(messages: list[dict[str, str]], chat: bool) -> Prompt:
    return messages if chat else hh_text(messages)


def as_response(content: str, chat: bool) -> str:
    """The final assistant turn: its content, or in HH text the content after the space that follows
    "Assistant:"."""
    return content if chat else f" {content}"
