"""Where metrics go: `metrics.jsonl` in the run dir always, Weights & Biases when enabled.

The loop calls the same methods whether W&B is on or off. W&B is imported lazily; mode `auto` goes online
with an API key and offline otherwise. W&B never takes a run down: if it cannot start online it logs
offline, if it cannot start at all, or fails mid-run, it is turned off with one warning, and
`metrics.jsonl` stays the durable record: appended to, one flushed line per record. A resumed run rewrites
it (atomically) to the records its checkpoint covers, then continues the same file and the same W&B run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import netrc
import os
import time
from pathlib import Path

from prefopt.config import LoggerConfig
from prefopt.files import atomic_write_text

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class Tracker:
    def __init__(
        self,
        cfg: LoggerConfig,
        run_dir: Path,
        config: dict,
        run_name: str,
        group: str | None,
        kept_records: list[str] | None = None,
        wandb_id: str | None = None,
    ):
        """`kept_records`: a resumed (or restarted) run's metrics.jsonl lines to keep; None for a new run,
        whose run dir must not hold another run's records."""
        self.run_dir = run_dir
        path = run_dir / "metrics.jsonl"
        if kept_records is None:
            self.metrics_file = open(path, "x")  # noqa: SIM115 - closed in finish()
        else:  # rewrite what the checkpoint covers (never half of it), then continue after it
            atomic_write_text(path, "".join(line + "\n" for line in kept_records))
            self.metrics_file = open(path, "a")  # noqa: SIM115
        self.records = len(kept_records or [])
        self.start = time.perf_counter()
        self.wandb_run = None
        if cfg.name == "wandb" and cfg.mode != "disabled":
            self.wandb_run = _start_wandb(cfg, run_dir, config, run_name, group, wandb_id)

    @property
    def run_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, "time_s": round(time.perf_counter() - self.start, 3), **metrics}
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        self.records += 1
        self._wandb("log", lambda run: run.log(metrics, step=step))

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        """A W&B Table (when W&B is on); the run dir keeps the same rows in its own files."""

        def log_table(run):
            import wandb

            run.log({name: wandb.Table(columns=columns, data=rows)})

        self._wandb("table", log_table)

    def summary(self, values: dict) -> None:
        plain = {k: v for k, v in values.items() if isinstance(v, (int, float, str))}
        self._wandb("summary", lambda run: run.summary.update(plain))

    def finish(self, exit_code: int = 0, preempted: bool = False) -> None:
        """Close metrics.jsonl and the W&B run (marked failed with a non-zero `exit_code`, or preempting,
        so W&B expects it back); idempotent. A record a full disk kept from metrics.jsonl is dropped here:
        a resume rewrites the file to its checkpoint's records."""
        with contextlib.suppress(OSError):
            self.metrics_file.close()
        if self.wandb_run is None:
            return
        run, self.wandb_run = self.wandb_run, None
        try:
            offline = run.settings.mode == "offline"
            directory = run.dir
            if preempted:
                run.mark_preempting()
            run.finish(exit_code=exit_code)
        except Exception as error:  # W&B must not fail the run at its very end
            log.warning("W&B failed to finish the run (%s); metrics.jsonl holds every record", error)
            return
        if offline:
            log.info("W&B ran offline; upload with: wandb sync %s", Path(directory).parent)

    def _wandb(self, what: str, call) -> None:
        if self.wandb_run is None:
            return
        try:
            call(self.wandb_run)
        except Exception as error:  # a W&B crash turns W&B off, never the run
            log.warning(
                "W&B %s failed (%s): W&B is off for the rest of the run; metrics.jsonl continues", what, error
            )
            run, self.wandb_run = self.wandb_run, None
            with contextlib.suppress(Exception):  # already broken; nothing more to save
                run.finish(exit_code=1, quiet=True)


class NullTracker:
    """What ranks other than 0 log to under torchrun: nothing (rank 0 writes the run's records)."""

    run_id, records = None, 0

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self, exit_code: int = 0, preempted: bool = False) -> None:
        pass


def _start_wandb(cfg: LoggerConfig, run_dir: Path, config: dict, run_name: str, group, wandb_id):
    """online -> offline -> off, each fall with one warning. `wandb_id` continues a run (resume)."""
    try:
        import wandb
    except ImportError as error:
        log.warning("W&B unavailable (%s): logging to metrics.jsonl only", error)
        return None
    mode = cfg.mode if cfg.mode != "auto" else ("online" if _has_api_key() else "offline")
    kwargs = dict(
        project=cfg.project,
        entity=cfg.entity,
        group=cfg.group or group,
        tags=cfg.tags or None,
        name=cfg.run_name or run_name,
        config=config,
        dir=str(run_dir),
        reinit="finish_previous",
        id=wandb_id,
        resume="allow" if wandb_id else None,
    )
    attempts = [mode, "offline"] if mode == "online" else [mode]
    for attempt in attempts:
        try:
            settings = wandb.Settings(init_timeout=30, silent=True)
            return wandb.init(mode=attempt, settings=settings, **kwargs)
        except Exception as error:  # no network, a bad key, a broken install
            fallback = "logging offline instead" if attempt != attempts[-1] else "W&B is off for this run"
            log.warning(
                "W&B %s start failed (%s); %s (metrics.jsonl has every record)", attempt, error, fallback
            )
    return None
