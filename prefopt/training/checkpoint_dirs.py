"""Where checkpoints live and how a finished one is told from a damaged one: `<run dir>/checkpoints/
step-XXXXXX/`, published by one rename, listed newest first, checked (every file's recorded size, each
safetensors header) before it is read, and pruned to the newest few. The tensors themselves are written and
read by `prefopt.training.checkpoint`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path

from prefopt.files import DamagedFile, atomic_write_json, fsync_path, read_json

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or does not fit the run."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:06d}"


def publish(staging: Path, final: Path, tensors, aliases, optimizer_values, scheduler, python_rng, record):
    """Rank 0: trainer_state.json with every file's size, fsync, rename into place."""
    state = {
        "format_version": FORMAT_VERSION,
        "step": int(final.name.split("-")[1]),
        "tensor_keys": sorted(tensors),
        "aliases": aliases,
        "optimizer_values": optimizer_values,
        "scheduler": scheduler.state_dict(),
        "rng": python_rng,
        **record,
    }
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    state["files"] = {str(p.relative_to(staging)): p.stat().st_size for p in files}
    atomic_write_json(staging / STATE_FILE, state, indent=None)  # fsynced, as the files below
    for path in [*files, staging / "state", staging]:
        fsync_path(path)
    if final.exists():  # the same step written again (a resumed run's last step): replace it whole
        shutil.rmtree(final)
    os.replace(staging, final)
    fsync_path(final.parent)


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last`; drop staging dirs a killed write left behind."""
    for old in step_dirs(run_dir)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
    remove_staging(run_dir)


def remove_staging(run_dir: Path) -> None:
    """Staging dirs (`.step-XXXXXX.tmp-<pid>`) of saves that never finished: a killed process's, or one
    that failed. Only the run dir's one writer (its lock holder) saves, so none of them is being written."""
    for stale in (run_dir / CHECKPOINTS).glob(".step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def step_dirs(run_dir: Path) -> list[Path]:
    """Checkpoint dirs, newest first (staging dirs start with a dot and are never listed)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(root.glob("step-[0-9]*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)


def read_state(path: Path) -> dict:
    """trainer_state.json of an intact checkpoint; CheckpointError naming what is wrong otherwise."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path}: no {STATE_FILE} (not a checkpoint, or its write never finished)")
    try:
        state = read_json(state_file)
    except DamagedFile as error:  # empty, torn or overwritten
        raise CheckpointError(str(error)) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION or "files" not in state:
        raise CheckpointError(f"{state_file}: not a prefopt checkpoint of format {FORMAT_VERSION}")
    for name, size in state["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"{path}: {name} is truncated ({file.stat().st_size} of {size} bytes)")
        if file.suffix == ".safetensors" and not _safetensors_header_ok(file, size):
            raise CheckpointError(f"{path}: {name} is damaged (its safetensors header does not read)")
    return state


def _safetensors_header_ok(file: Path, size: int) -> bool:
    """A safetensors file starts with its header's length (u64, little-endian) and a JSON header that fits
    in the file: cheap to read, and it catches a file zeroed or overwritten in place."""
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return False
        (length,) = struct.unpack("<Q", head)
        if not 2 <= length <= size - 8:
            return False
        try:
            return isinstance(json.loads(handle.read(length)), dict)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False


def find_checkpoint(target: str, run_dir: Path) -> Path | None:
    """`trainer.checkpoint.resume`: `auto` is the newest intact checkpoint in the run dir (None when there is
    none; a damaged newer one is skipped with a warning); a path is that checkpoint, or the newest intact one
    of that run dir."""
    if target != "auto":
        path = Path(target).expanduser()
        if not path.exists():
            raise CheckpointError(f"trainer.checkpoint.resume={target}: no such file or directory")
        if (path / STATE_FILE).exists() or path.name.startswith("step-"):
            read_state(path)
            return path
        run_dir = path
    damaged = []
    for candidate in step_dirs(run_dir):
        try:
            read_state(candidate)
        except CheckpointError as error:
            damaged.append(str(error))
            continue
        if damaged:
            log.warning("skipping damaged checkpoints (%s); resuming from %s", "; ".join(damaged), candidate)
        return candidate
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {run_dir / CHECKPOINTS}: {'; '.join(damaged)}")
    if target != "auto":
        raise CheckpointError(f"trainer.checkpoint.resume={target}: no checkpoint in {run_dir / CHECKPOINTS}")
    return None
