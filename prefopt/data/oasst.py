"""OpenAssistant/oasst1: OpenAssistant Conversations, message trees whose sibling assistant replies are
ranked by human annotators; paired as the KTO/HALOs code does for the HH + OASST + SHP mix (HPO uses it).

Why this source: it is the OpenAssistant data those papers trained on, in its official release; the pairs
are built here from its ranks instead of taken from a third-party paired copy whose construction is not
documented.

Hub format: parquet splits train / validation (whole trees never straddle them), one row per message,
columns
    message_id, parent_id (null at a tree's root), user_id, created_date, text, role ("prompter" |
    "assistant"), lang (e.g. "en"), review_count, review_result, deleted, rank (0 = best among the
    siblings; null when unranked), synthetic, model_name, detoxify, message_tree_id, tree_state, emojis,
    labels.
Pairs: a ranking (a, b, c) of sibling replies gives (a over b), (b over c): each reply ranked r >= 1 is the
rejected response against its sibling ranked r - 1. The prompt is the conversation from the tree's root to
their parent (prompter turns as "user"), as chat messages or HH text (`chat`). Replies in a language outside
`languages` (default English, as in HALOs) are filtered; a row's number is that of the rejected reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefopt.data.dialogue import as_prompt, as_response
from prefopt.data.pairs import BadRow, Filtered, Pair, TextData, text_field
from prefopt.data.rows import attempt, load_text_data
from prefopt.data.source import SourceConfig

COLUMNS = ["message_id", "parent_id", "text", "role", "lang", "rank"]
ROLES = {"prompter": "user", "assistant": "assistant"}


@dataclass
class OASSTConfig(SourceConfig):
    path: str = "OpenAssistant/oasst1"
    eval_split: str | None = "validation"
    chat: bool = False  # true: prompts as chat messages; false: HH text ending in "\n\nAssistant:"
    languages: list[str] = field(default_factory=lambda: ["en"])  # replies' `lang` kept (empty: all)


class Tree:
    """A split's messages by id, and each parent's replies by rank."""

    def __init__(self, columns: dict[str, list]):
        self.rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        for row in self.rows:  # a rank column read with nulls as floats (NaN) holds whole numbers
            if isinstance(row["rank"], float):
                row["rank"] = None if row["rank"] != row["rank"] else int(row["rank"])
        self.by_id = {row["message_id"]: i for i, row in enumerate(self.rows)}
        self.by_rank = {
            (row["parent_id"], row["rank"]): i
            for i, row in enumerate(self.rows)
            if row["role"] == "assistant" and row["rank"] is not None
        }

    def conversation(self, message_id: str) -> list[dict[str, str]]:
        """The messages from the root down to `message_id`, as chat messages."""
        turns, seen = [], set()
        while message_id is not None:
            if message_id not in self.by_id or message_id in seen:
                raise BadRow("parent_id", f"message {message_id} is not in the split")
            seen.add(message_id)
            row = self.rows[self.by_id[message_id]]
            if row["role"] not in ROLES:
                raise BadRow("role", f"{row['role']!r} is not 'prompter' or 'assistant'")
            turns.append({"role": ROLES[row["role"]], "content": text_field(row, "text")})
            message_id = row["parent_id"]
        return turns[::-1]


def oasst_pair(tree: Tree, index: int, cfg: OASSTConfig) -> Pair:
    row = tree.rows[index]
    if cfg.languages and row["lang"] not in cfg.languages:
        raise Filtered(f"lang not in {cfg.languages}")
    better = tree.by_rank.get((row["parent_id"], row["rank"] - 1))
    if better is None:
        raise Filtered("no sibling ranked one better")
    if row["parent_id"] is None:
        raise BadRow("parent_id", "an assistant reply without a parent message")
    prompt = tree.conversation(row["parent_id"])
    if prompt[-1]["role"] != "user":
        raise BadRow("parent_id", "the reply's parent is not a prompter message")
    chosen = text_field(tree.rows[better], "text")
    return Pair(
        as_prompt(prompt, cfg.chat),
        as_response(chosen, cfg.chat),
        as_response(text_field(row, "text"), cfg.chat),
        metadata={"message_id": row["message_id"], "chosen_message_id": tree.rows[better]["message_id"]},
    )


def load_oasst(cfg: OASSTConfig, seed: int) -> TextData:
    def pairs_of(rows, _role: str):
        tree = Tree(rows[:])
        for index, row in enumerate(tree.rows):
            if row["role"] == "assistant" and isinstance(row["rank"], int) and row["rank"] >= 1:
                yield index, attempt(oasst_pair, tree, index, cfg)

    return load_text_data(cfg, seed, "oasst", COLUMNS, pairs_of)
