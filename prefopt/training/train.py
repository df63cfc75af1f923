"""`prefopt train`: the Hydra entry point, and `train`, which runs the one loop (`prefopt.training.loop`)
in a run dir: tracker, preemption guard, and summary.json however the run ends.

Checkpoints hold the whole training state (`prefopt.training.checkpoint`), so a run killed at any moment
and resumed with `trainer.checkpoint.resume=auto` takes the same steps as one never interrupted. One process
writes a run dir (`prefopt.files.RunDirLock`), every state file is written atomically, and a full disk ends
the run with one line naming the command that resumes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from prefopt import CONF_DIR
from prefopt.config import RunConfig, load_run_config
from prefopt.errors import ConfigError
from prefopt.files import RunDirLock, RunDirLocked, atomic_write_json, atomic_write_text, is_disk_full
from prefopt.training.loop_state import (
    NonFiniteTraining,
)
from prefopt.training.preemption import Preempted, PreemptionGuard
from prefopt.training.resume import RunDirInUse, plan_resume
from prefopt.training.run_summary import log_closing_summary, run_name

log = logging.getLogger(__name__)
__all__ = ["NonFiniteTraining", "RunDirInUse", "main", "train"]


def train(rc: RunConfig, run_dir: Path, group: str | None = None) -> dict:
    """Prepare, train, evaluate and write the run dir; returns summary.json's content. Raises RunDirInUse
    or ConfigError (a resume that does not fit) before anything loads. On any failure, preemption or
    Ctrl-C, summary.json says so, the tracker is closed, and the error propagates."""
    from prefopt.engine.distributed import release_own_group, world
    from prefopt.training.loop import finish, run_loop, start
    from prefopt.training.setup import configure_torch
    from prefopt.training.tracking import NullTracker, Tracker

    plan = plan_resume(rc, run_dir)
    if plan.finished is not None:
        log.info("%s already finished (summary.json says completed): nothing to resume", run_dir)
        return plan.finished
    main_process = world().is_main
    if main_process:
        resolved = OmegaConf.to_yaml(rc.raw)  # interpolations filled
        atomic_write_text(run_dir / "config.yaml", resolved)
    saved = plan.state  # the checkpoint's trainer_state.json, read once by plan_resume
    started = time.perf_counter()
    tracker = None
    try:
        device = configure_torch(rc.trainer.device, rc.trainer.num_threads, rc.seed)
        kept = _kept_records(plan.checkpoint, saved) if saved else ([] if plan.restart else None)
        wandb_id = saved.get("wandb_id") if saved else None
        tracker = (
            Tracker(rc.logger, run_dir, rc.raw, run_name(rc), group, kept, wandb_id)
            if main_process
            else NullTracker()
        )
        with PreemptionGuard(rc.trainer.checkpoint.preemption_signals) as guard:
            try:
                loop = start(rc, run_dir, device, tracker, plan)
                run_loop(loop, guard, started)
                summary = finish(loop, started)
            finally:
                release_own_group()
    except BaseException as error:
        if main_process:
            _write_failed_summary(rc, run_dir, error, started)
        if tracker is not None:
            tracker.finish(exit_code=getattr(error, "exit_code", 1), preempted=isinstance(error, Preempted))
        raise
    if main_process:
        atomic_write_json(run_dir / "summary.json", summary)
    convergence = {
        f"convergence/{k}": v for k, v in summary["convergence"].items() if not isinstance(v, list)
    }
    tracker.summary({**summary["final_eval"], **convergence, "runtime_s": summary["runtime_s"]})
    tracker.finish()
    log_closing_summary(rc, summary, run_dir)
    return summary


def _kept_records(checkpoint: Path, saved: dict) -> list[str]:
    """The metrics.jsonl lines written up to the checkpoint (the checkpoint's run dir may be another); what
    a kill or a second writer left after them is dropped."""
    source = checkpoint.parents[1] / "metrics.jsonl"
    lines = source.read_text(errors="replace").splitlines() if source.exists() else []
    return lines[: saved["metrics_records"]]


def _write_failed_summary(rc: RunConfig, run_dir: Path, error: BaseException, started: float) -> None:
    """summary.json of a run that did not complete, written atomically; a write that fails (the disk that
    ended the run is full) leaves the previous file and never hides the run's own error."""
    status = {Preempted: "preempted", KeyboardInterrupt: "interrupted"}.get(type(error), "failed")
    failed = {
        "status": status,
        "objective": rc.objective_name,
        "seed": rc.seed,
        "error": repr(error),
        "traceback": traceback.format_exc(),
        "runtime_s": round(time.perf_counter() - started, 2),
    }
    if isinstance(error, Preempted):
        failed |= {"step": error.step, "checkpoint": str(error.checkpoint), "resume": resume_command(run_dir)}
    try:
        atomic_write_json(run_dir / "summary.json", failed)
    except OSError as write_error:
        log.warning("summary.json not written (%s)", write_error)


def resume_command(run_dir: Path) -> str:
    """The command that continues this run: its own overrides, its run dir, trainer.checkpoint.resume=auto."""
    try:
        task = hydra.core.hydra_config.HydraConfig.get().overrides.task
    except ValueError:  # called without Hydra (a test, `prefopt evaluate`)
        task = []
    kept = [o for o in task if not o.startswith(("hydra.run.dir=", "trainer.checkpoint.resume="))]
    words = ["prefopt", "train", *kept, f"hydra.run.dir={run_dir}", "trainer.checkpoint.resume=auto"]
    return " ".join(shlex.quote(w) for w in words)


def _sweep_group() -> str | None:
    """The W&B group in a multirun: the sweep's name (one group per sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return "-".join(Path(hydra_cfg.sweep.dir).parts[-2:])


class RunDirUnwritable(OSError):
    """The run dir cannot be written (a read-only file system, no permission)."""


@contextlib.contextmanager
def _sole_writer(run_dir: Path):
    """Hold the run dir's lock while the run lasts (rank 0 alone under torchrun: the others write only
    through it). RunDirLocked names the dir and the pid of the process already writing it."""
    from prefopt.engine.distributed import world

    if not world().is_main:
        yield
        return
    try:
        lock = RunDirLock(run_dir).acquire()
    except OSError as error:
        raise RunDirUnwritable(f"cannot write to {run_dir}: {error.strerror or error}") from None
    try:
        yield
    finally:
        lock.release()  # a multirun's worker process goes on to its next job


def _end_with_sweep_parent() -> None:
    """In a multirun job run by a worker process (joblib's loky workers), end this process as soon as the
    process that started the sweep is gone, however it ended (SIGKILL included): a worker left training
    would otherwise write on, unseen, and race a resumed sweep. Checked every 0.2 s; one watcher a worker."""
    import multiprocessing

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if multiprocessing.parent_process() is None or HydraConfig.get().mode != RunMode.MULTIRUN:
        return  # the process the user started: it ends when they end it
    if any(thread.name == _WATCHER for thread in threading.enumerate()):
        return
    threading.Thread(target=_watch_parent, args=(os.getppid(),), name=_WATCHER, daemon=True).start()


_WATCHER = "prefopt-sweep-parent-watcher"


def _watch_parent(parent: int) -> None:
    """SIGKILL this process once its parent is no longer `parent` (it died; the process was re-parented)."""
    while os.getppid() == parent:
        time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)


def _log_to_files(message: str) -> None:
    """Write to the log files only (Hydra's train.log), not to the terminal."""
    root = logging.getLogger()
    record = root.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _join_ranks(device_name: str, run_dir: Path) -> Path:
    """Under torchrun: join the process group; every rank writes to rank 0's run dir (Hydra's own clock
    may name another), and ranks other than 0 log to their own file. The run dir as it is otherwise."""
    from prefopt.engine.distributed import broadcast_object, init_from_environment

    current = init_from_environment(device_name)
    if not current.distributed:
        return run_dir
    run_dir = Path(broadcast_object(str(run_dir)))
    if not current.is_main:
        _log_rank_to_own_file(run_dir, current.rank)
    return run_dir


def _log_rank_to_own_file(run_dir: Path, rank: int) -> None:
    """Ranks other than 0 log to train.rank<r>.log, and only warnings to the terminal."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
        else:
            handler.setLevel(logging.WARNING)
    own = logging.FileHandler(run_dir / f"train.rank{rank}.log")
    own.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(own)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig
    from tqdm.contrib.logging import logging_redirect_tqdm

    from prefopt.progress import route_library_logs

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    logging.raiseExceptions = False  # a log file on a full disk: no '--- Logging error ---' per record
    _end_with_sweep_parent()
    try:
        rc = load_run_config(cfg)  # fails fast, before torch, any model or any data is loaded
        run_dir = _join_ranks(rc.trainer.device, run_dir)
        with _sole_writer(run_dir):  # before anything of ours is written to the run dir
            route_library_logs()  # libraries' notices to train.log; the terminal shows ours and errors
            with logging_redirect_tqdm():  # log lines print above the progress bars
                return train(rc, run_dir, _sweep_group())
    except (ConfigError, RunDirInUse) as error:  # raised before anything loads
        print(f"prefopt: config error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except (RunDirLocked, RunDirUnwritable) as error:
        print(f"prefopt: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except Preempted as stop:
        print(
            f"prefopt: stopped by {stop.signal_name} after step {stop.step}; checkpoint {stop.checkpoint}\n"
            f"resume with: {resume_command(run_dir)}",
            file=sys.stderr,
        )
        raise SystemExit(stop.exit_code) from None
    except KeyboardInterrupt:
        print(f"prefopt: interrupted; summary.json in {run_dir} says so", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:
        _log_to_files(traceback.format_exc())
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(_failure_line(error, run_dir), file=sys.stderr)
        raise SystemExit(1) from None


def _failure_line(error: Exception, run_dir: Path) -> str:
    """The one terminal line for a run that failed: a full disk names the command that resumes the run
    once space is freed (exit code 1 as any failure; summary.json says failed where it could be written)."""
    if is_disk_full(error):
        return f"prefopt: no space left on {run_dir}; free space, then resume with: {resume_command(run_dir)}"
    message = str(error).splitlines()[0] if str(error) else ""
    return (
        f"prefopt: {type(error).__name__}: {message} (traceback in {run_dir / 'train.log'}; "
        "HYDRA_FULL_ERROR=1 shows it here)"
    )
