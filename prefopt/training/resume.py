"""`trainer.resume`: which checkpoint a run continues from, decided before anything loads.

A run dir holds one run. Without `trainer.resume` a run dir that already has `metrics.jsonl` is refused;
with `trainer.resume=auto` a finished run is skipped (so a whole multirun can be resumed), an interrupted
one continues from its newest intact checkpoint, and one that never checkpointed starts over. The config
must be the checkpoint's, except the keys `trainer.resume_allow_changes` names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prefopt.config import ConfigError, RunConfig

ALWAYS_ALLOWED = ("trainer.resume", "trainer.resume_allow_changes", "hydra")


class RunDirInUse(FileExistsError):
    """The run dir already holds another run's metrics."""


@dataclass
class ResumePlan:
    checkpoint: Path | None = None  # continue from this checkpoint
    state: dict | None = None  # its trainer_state.json
    finished: dict | None = None  # summary.json of a run that already completed: nothing to do
    restart: bool = False  # the run dir holds an earlier attempt with no checkpoint: start over


def plan_resume(rc: RunConfig, run_dir: Path) -> ResumePlan:
    """Raises RunDirInUse, or ConfigError naming `trainer.resume` or the changed keys."""
    from prefopt.training.checkpoint import CheckpointError, find_checkpoint, read_state  # loads torch

    target = rc.trainer.resume
    has_metrics = (run_dir / "metrics.jsonl").exists()
    if target is None:
        if has_metrics:
            raise RunDirInUse(
                f"{run_dir} already holds a run (metrics.jsonl); continue it with trainer.resume=auto, "
                "or choose another hydra.run.dir"
            )
        return ResumePlan()
    summary_file = run_dir / "summary.json"
    if target == "auto" and summary_file.exists():
        summary = json.loads(summary_file.read_text())
        if summary.get("status") == "completed":
            return ResumePlan(finished=summary)
    try:
        checkpoint = find_checkpoint(target, run_dir)
    except CheckpointError as error:
        raise ConfigError(f"trainer.resume: {error}") from None
    if checkpoint is None:
        return ResumePlan(restart=has_metrics)
    state = read_state(checkpoint)
    check_config_unchanged(rc.raw, state["config"], rc.trainer.resume_allow_changes)
    return ResumePlan(checkpoint=checkpoint, state=state)


def check_config_unchanged(current: dict, saved: dict, allowed: list[str]) -> None:
    """ConfigError naming every key (dotted) whose value differs from the checkpoint's, unless allowed
    (a key or any key under a prefix)."""
    now, then = _flatten(current), _flatten(saved)
    prefixes = (*ALWAYS_ALLOWED, *allowed)
    changed = sorted(
        key
        for key in now.keys() | then.keys()
        if now.get(key, "<absent>") != then.get(key, "<absent>")
        and not any(key == p or key.startswith(p + ".") for p in prefixes)
    )
    if changed:
        shown = ", ".join(
            f"{k} ({then.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r})" for k in changed[:5]
        )
        raise ConfigError(
            f"trainer.resume: the config differs from the checkpoint's in {shown}"
            f"{' and more' if len(changed) > 5 else ''}; undo the change, or list the keys in "
            "trainer.resume_allow_changes"
        )


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        flat = {}
        for key, value in node.items():
            flat |= _flatten(value, f"{prefix}{key}.")
        return flat
    return {prefix[:-1]: node}
