"""The keys that moved when the flat `trainer` group was split into its optimizer, layout, checkpoint and
distributed nodes, and its part-specific knobs went to their parts (HPO's value head to the objective, the
synthetic task's reference fit to the dataset, EXPO's KL estimator to its own group `kl`). Each old key
stays an alias for one release, applied

- to command-line overrides before Hydra composes (`prefopt train`, `prefopt evaluate`), with one notice
  line on stderr per rewritten key: `rewrite_overrides`;
- to a resolved config written before the split (a run dir's config.yaml, a checkpoint's
  trainer_state.json), so `prefopt evaluate` and `trainer.checkpoint.resume` read old runs: `upgrade_config`;
- to the keys `trainer.checkpoint.resume_allow_changes` lists: `new_key`.

A key that exists in the new layout is never rewritten: `trainer.optimizer` is the old name of the
optimizer (`trainer.optimizer=rmsprop` becomes `trainer.optimizer.name=rmsprop`) only where its value is
not a node of options.

The KL estimator's keys: `objective.kl_estimator=X` becomes the group choice `kl=X`. The samples option,
`objective.kl_samples_per_prompt=N`, exists only under `kl=samples`, so where the command line picks no
estimator it becomes `kl=samples kl.samples_per_prompt=N`; where it picks samples (in either spelling, in
any order) `kl.samples_per_prompt=N`; where it picks only other estimators it is dropped with a notice,
as the old loop ignored it. An old run's config gets a `kl` node (`{name: exact}` where it had none).
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
    "objective.kl_estimator": "kl",  # a group choice: objective.kl_estimator=token is kl=token
    "objective.kl_samples_per_prompt": "kl.samples_per_prompt",  # with kl=samples (`rewrite_overrides`)
}
KL_SAMPLES = "objective.kl_samples_per_prompt"
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
    kl_choice = _kl_choice(args, parser)
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
        shown = new
        if key == KL_SAMPLES and not override.is_delete():  # an option of kl=samples alone
            if kl_choice is not None and "samples" not in kl_choice:
                print(f"prefopt: {key} ignored: kl={','.join(kl_choice)} takes no samples", file=sys.stderr)
                continue
            if kl_choice is None:
                out.append("kl=samples")  # Hydra applies a group choice before any value, in any order
                shown = f"kl=samples {new}"
        start = arg.index(key)  # after the +, ++ or ~
        out.append(arg[:start] + new + arg[start + len(key) :])
        print(f"prefopt: {key} is now {shown} (the old key works for one more release)", file=sys.stderr)
    return out


def _kl_choice(args: list[str], parser) -> list[str] | None:
    """The KL estimators the command line picks (`kl=X`, its old spelling `objective.kl_estimator=X`, a
    sweep's every value), or None where it picks none."""
    for arg in args:
        if not ("=" in arg and not arg.startswith(("-", "~"))):
            continue
        try:
            (override,) = parser.parse_overrides([arg])
        except Exception:  # noqa: BLE001 - left for Hydra to report
            continue
        if override.key_or_group in ("kl", "objective.kl_estimator"):
            if override.is_sweep_override():
                return list(override.sweep_string_iterator())
            return [override.get_value_element_as_str()]
    return None


def upgrade_config(raw: dict) -> list[str]:
    """Move the old flat trainer keys and EXPO's KL keys of a resolved config (a plain dict, changed in
    place) to their new places and rename the keys its resume_allow_changes lists; returns the old keys it
    moved. A part-specific key whose part the run does not have (HPO's value head under another objective,
    the reference fit on a dataset without a pi_ref) is dropped, as the old loop ignored it. A trainer
    layout from before `lean_activations` gets it off, as such a run computed."""
    moved = _upgrade_kl(raw)
    trainer = raw.get("trainer")
    if not isinstance(trainer, dict):
        return moved
    if isinstance(trainer.get("optimizer"), str):
        trainer["optimizer"] = {"name": trainer["optimizer"]}
        moved.append("trainer.optimizer")
    for old, new in ALIASES.items():
        group, name = old.split(".", 1)
        if group != "trainer" or name not in trainer or old == "trainer.optimizer":
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
    if isinstance(trainer.get("layout"), dict):  # before the option, modules ran their own backward
        trainer["layout"].setdefault("lean_activations", False)
    allowed = trainer.get("checkpoint", {}).get("resume_allow_changes")
    if isinstance(allowed, list):
        trainer["checkpoint"]["resume_allow_changes"] = [
            new_key(k) if isinstance(k, str) else k for k in allowed
        ]
    return moved


def _upgrade_kl(raw: dict) -> list[str]:
    """An objective's kl_estimator and kl_samples_per_prompt (before the `kl` group) become the `kl` node;
    a config from before the group without them gets the default, kl=exact, which only a KL term reads."""
    objective = raw.get("objective")
    if "kl" in raw or not isinstance(objective, dict):
        return []
    old = [f"objective.{k}" for k in ("kl_estimator", "kl_samples_per_prompt") if k in objective]
    name = objective.pop("kl_estimator", "exact")
    samples_per_prompt = objective.pop("kl_samples_per_prompt", 4)  # the old default
    raw["kl"] = (
        {"name": name, "samples_per_prompt": samples_per_prompt} if name == "samples" else {"name": name}
    )
    return old


def _has_field(node: Any, group: str, field: str) -> bool:
    """Whether the schema the group node `{name: ..., ...}` names has `field` (the objective's value head
    options, the dataset's reference fit)."""
    from prefopt.data import DATASETS
    from prefopt.objectives import OBJECTIVES

    registry = {"objective": OBJECTIVES, "dataset": DATASETS}[group]
    spec = registry.get(node.get("name")) if isinstance(node, dict) else None
    return spec is not None and field in {f.name for f in dataclasses.fields(spec.config)}
