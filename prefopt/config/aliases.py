"""The keys that moved when the flat `trainer` group was split into its optimizer, layout, checkpoint and
distributed nodes, and its part-specific knobs went to their parts (HPO's value head to the objective, the
synthetic task's reference fit to the dataset). Each old key stays an alias for one release, applied

- to command-line overrides before Hydra composes (`prefopt train`, `prefopt evaluate`), with one notice
  line on stderr per rewritten key: `rewrite_overrides`;
- to a resolved config written before the split (a run dir's config.yaml, a checkpoint's
  trainer_state.json), so `prefopt evaluate` and `trainer.checkpoint.resume` read old runs: `upgrade_config`;
- to the keys `trainer.checkpoint.resume_allow_changes` lists: `new_key`.

A key that exists in the new layout is never rewritten: `trainer.optimizer` is the old name of the
optimizer (`trainer.optimizer=rmsprop` becomes `trainer.optimizer.name=rmsprop`) only where its value is
not a node of options.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

ALIASES: dict[str, str] = {
    "trainer.optimizer": "trainer.optimizer.name",
    "trainer.lr": "trainer.optimizer.lr",
    "trainer.weight_decay": "trainer.optimizer.weight_decay",
    "trainer.adam_betas": "trainer.optimizer.adam_betas",
    "trainer.lr_schedule": "trainer.optimizer.lr_schedule",
    "trainer.warmup_steps": "trainer.optimizer.warmup_steps",
    "trainer.max_grad_norm": "trainer.optimizer.max_grad_norm",
    "trainer.fused_optimizer": "trainer.optimizer.fused",
    "trainer.packing": "trainer.layout.packing",
    "trainer.pack_tokens": "trainer.layout.pack_tokens",
    "trainer.share_prompts": "trainer.layout.share_prompts",
    "trainer.compile": "trainer.layout.compile",
    "trainer.gradient_checkpointing": "trainer.layout.gradient_checkpointing",
    "trainer.logps_chunk_tokens": "trainer.layout.logps_chunk_tokens",
    "trainer.reference_cache": "trainer.layout.reference_cache",
    "trainer.save_checkpoint": "trainer.checkpoint.export",
    "trainer.checkpoint_every_steps": "trainer.checkpoint.every_steps",
    "trainer.keep_last_checkpoints": "trainer.checkpoint.keep_last",
    "trainer.resume": "trainer.checkpoint.resume",
    "trainer.resume_allow_changes": "trainer.checkpoint.resume_allow_changes",
    "trainer.preemption_signals": "trainer.checkpoint.preemption_signals",
    "trainer.strategy": "trainer.distributed.strategy",
    "trainer.param_dtype": "trainer.distributed.param_dtype",
    "trainer.value_head_lr": "objective.value_head_lr",
    "trainer.value_head_width": "objective.value_head_width",
    "trainer.reference_fit": "dataset.reference_fit",  # and every key under it
}
NODE_ALIASES = ("trainer.reference_fit",)  # a node that moved whole: its keys move with it


def new_key(key: str) -> str:
    """The new name of a dotted `key` (a key under a node that moved included); `key` itself when it did not
    move or names something in the new layout (`trainer.optimizer`, now the optimizer's node)."""
    if key in ALIASES and not ALIASES[key].startswith(key + "."):
        return ALIASES[key]
    for old in NODE_ALIASES:
        if key.startswith(old + "."):
            return ALIASES[old] + key[len(old) :]
    return key


def rewrite_overrides(args: list[str]) -> list[str]:
    """`args` of `prefopt train` or `prefopt evaluate` with every old key replaced by its new one (its
    `+`, `++` or `~` and its value kept), one notice line on stderr per rewritten override; anything that
    is not a Hydra override (a flag, a path) or does not parse is left as it is, for Hydra to judge."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, out = OverridesParser.create(), []
    for arg in args:
        key = new = None
        if ("=" in arg or arg.startswith("~")) and not arg.startswith("-"):
            try:
                (override,) = parser.parse_overrides([arg])
            except Exception:  # noqa: BLE001 - Hydra reports a malformed override in its own words
                out.append(arg)
                continue
            key = override.key_or_group
            new = new_key(key)
            if key == "trainer.optimizer" and not (
                override.is_delete() or isinstance(override.value(), dict)
            ):
                new = ALIASES[key]  # the optimizer's name, as it was written before the split
        if new == key:
            out.append(arg)
            continue
        start = arg.index(key)  # after the +, ++ or ~
        out.append(arg[:start] + new + arg[start + len(key) :])
        print(f"prefopt: {key} is now {new} (the old key works for one more release)", file=sys.stderr)
    return out


def upgrade_config(raw: dict) -> list[str]:
    """Move the old flat trainer keys of a resolved config (a plain dict, changed in place) to their new
    places and rename the keys its resume_allow_changes lists; returns the old keys it moved. A part-specific
    key whose part the run does not have (HPO's value head under another objective, the reference fit on a
    dataset without a pi_ref) is dropped, as the old loop ignored it."""
    trainer = raw.get("trainer")
    if not isinstance(trainer, dict):
        return []
    moved = []
    if isinstance(trainer.get("optimizer"), str):
        trainer["optimizer"] = {"name": trainer["optimizer"]}
        moved.append("trainer.optimizer")
    for old, new in ALIASES.items():
        name = old.split(".", 1)[1]
        if name not in trainer or old == "trainer.optimizer":
            continue
        value = trainer.pop(name)
        moved.append(old)
        group, *path, last = new.split(".")
        if group != "trainer" and not _has_field(raw.get(group), group, last):
            continue
        node = raw.setdefault(group, {})
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    allowed = trainer.get("checkpoint", {}).get("resume_allow_changes")
    if isinstance(allowed, list):
        trainer["checkpoint"]["resume_allow_changes"] = [
            new_key(k) if isinstance(k, str) else k for k in allowed
        ]
    return moved


def _has_field(node: Any, group: str, field: str) -> bool:
    """Whether the schema the group node `{name: ..., ...}` names has `field` (the objective's value head
    options, the dataset's reference fit)."""
    from prefopt.data import DATASETS
    from prefopt.objectives import OBJECTIVES

    registry = {"objective": OBJECTIVES, "dataset": DATASETS}[group]
    spec = registry.get(node.get("name")) if isinstance(node, dict) else None
    return spec is not None and field in {f.name for f in dataclasses.fields(spec.config)}
