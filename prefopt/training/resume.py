"""`trainer.checkpoint.resume`: which checkpoint a run continues from, decided before anything loads.

A run dir holds one run. Without `trainer.checkpoint.resume` a run dir that already has `metrics.jsonl` is
refused, unless its earlier attempt failed before its first training step (then it is replaced); with
`trainer.checkpoint.resume=auto` a finished run is skipped (so a whole multirun can be resumed), an
interrupted one continues from its newest intact checkpoint, and one that never checkpointed starts over. A
damaged summary.json or checkpoint is named in a warning and passed over. The config must be the
checkpoint's, except the keys `trainer.checkpoint.resume_allow_changes` names (old keys of a checkpoint
from before the trainer's split are read as their new ones: `prefopt.config.aliases`).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from prefopt.config import RunConfig
from prefopt.config.aliases import new_key, upgrade_config
from prefopt.errors import ConfigError
from prefopt.files import DamagedFile, read_json

log = logging.getLogger(__name__)

ALWAYS_ALLOWED = ("trainer.checkpoint.resume", "trainer.checkpoint.resume_allow_changes", "hydra")


class RunDirInUse(FileExistsError):
    """The run dir already holds another run's metrics."""


@dataclass
class ResumePlan:
    checkpoint: Path | None = None  # continue from this checkpoint
    state: dict | None = None  # its trainer_state.json
    finished: dict | None = None  # summary.json of a run that already completed: nothing to do
    restart: bool = False  # the run dir holds an earlier attempt with no checkpoint: start over


def plan_resume(rc: RunConfig, run_dir: Path) -> ResumePlan:
    """Raises RunDirInUse, or ConfigError naming `trainer.checkpoint.resume` or the changed keys."""
    from prefopt.training.checkpoint import CheckpointError, find_checkpoint, read_state  # loads torch

    target = rc.trainer.checkpoint.resume
    has_metrics = (run_dir / "metrics.jsonl").exists()
    if target is None:
        if not has_metrics:
            return ResumePlan()
        if not failed_before_training(run_dir):
            raise RunDirInUse(
                f"{run_dir} already holds a run (metrics.jsonl); continue it with "
                "trainer.checkpoint.resume=auto, or choose another hydra.run.dir"
            )
        log.info("%s: replacing an earlier attempt that failed before its first training step", run_dir)
        return ResumePlan(restart=True)
    if target == "auto":
        summary = read_summary(run_dir)
        if summary.get("status") == "completed":
            return ResumePlan(finished=summary)
    try:
        checkpoint = find_checkpoint(target, run_dir)
    except CheckpointError as error:
        raise ConfigError(f"trainer.checkpoint.resume: {error}") from None
    if checkpoint is None:
        return ResumePlan(restart=has_metrics)
    state = read_state(checkpoint)
    saved = copy.deepcopy(state["config"])
    if upgrade_config(saved):  # a checkpoint from before the trainer's split
        log.info("%s: its config read with the keys of this release", checkpoint)
    allowed = [new_key(key) for key in rc.trainer.checkpoint.resume_allow_changes]  # old keys too
    check_config_unchanged(rc.raw, saved, allowed)
    return ResumePlan(checkpoint=checkpoint, state=state)


def read_summary(run_dir: Path) -> dict:
    """summary.json's content; {} when it is absent, or damaged (one warning naming it: a run whose summary
    does not read is not taken for completed)."""
    path = run_dir / "summary.json"
    if not path.exists():
        return {}
    try:
        summary = read_json(path)
    except DamagedFile as error:
        log.warning("%s; not taking the run for completed", error)
        return {}
    if not isinstance(summary, dict):
        log.warning("%s: damaged (not a JSON object); not taking the run for completed", path)
        return {}
    return summary


def failed_before_training(run_dir: Path) -> bool:
    """Whether the run dir's earlier attempt recorded no training step: no checkpoint, no metrics record
    after step 0 (the reference eval), and summary.json absent or saying failed or interrupted."""
    from prefopt.training.checkpoint import step_dirs

    if step_dirs(run_dir) or read_summary(run_dir).get("status") not in (None, "failed", "interrupted"):
        return False
    lines = (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines()
    return all(_record_step(line) == 0 for line in lines if line.strip())


def _record_step(line: str) -> int | None:
    """A metrics.jsonl line's step; None when the line does not read (so it is never taken for step 0)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step") if isinstance(record, dict) else None


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
            f"trainer.checkpoint.resume: the config differs from the checkpoint's in {shown}"
            f"{' and more' if len(changed) > 5 else ''}; undo the change, or list the keys in "
            "trainer.checkpoint.resume_allow_changes"
        )


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        flat = {}
        for key, value in node.items():
            flat |= _flatten(value, f"{prefix}{key}.")
        return flat
    return {prefix[:-1]: node}
