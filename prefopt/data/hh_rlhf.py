"""Anthropic/hh-rlhf: helpful and harmless dialogues, one preference pair per row.

Hub format: folders harmless-base, helpful-base, helpful-online, helpful-rejection-sampled (select one with
`data_dir`; none: all four), each with train.jsonl.gz and test.jsonl.gz of rows
    {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "\\n\\nHuman: ...\\n\\nAssistant: ..."}
the whole dialogue in each, identical up to the last assistant turn. As in the DPO paper's code, the prompt
is the dialogue up to and including the last "\\n\\nAssistant:", and each response is what follows it
(starting with a space). With `chat: true` the prompt becomes chat messages and the responses lose that
space. A rejected dialogue that does not continue the chosen one's prompt is a bad row.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefopt.data.dialogue import hh_messages, split_hh
from prefopt.data.pairs import Pair, TextData, text_field
from prefopt.data.rows import each_row, load_text_data
from prefopt.data.source import SourceConfig


@dataclass
class HHConfig(SourceConfig):
    path: str = "Anthropic/hh-rlhf"
    chat: bool = False  # true: prompts as chat messages; false: HH text ending in "\n\nAssistant:"


def hh_pair(row: dict, chat: bool) -> Pair:
    prompt, chosen, rejected = split_hh(text_field(row, "chosen"), text_field(row, "rejected"))
    if chat:
        return Pair(hh_messages(prompt), chosen.strip(), rejected.strip())
    return Pair(prompt, chosen, rejected)


def load_hh_rlhf(cfg: HHConfig, seed: int) -> TextData:
    return load_text_data(
        cfg,
        seed,
        "hh_rlhf",
        ["chosen", "rejected"],
        lambda rows, _: each_row(rows, lambda r: hh_pair(r, cfg.chat)),
    )
