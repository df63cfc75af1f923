"""Where metrics go: `metrics.jsonl` in the run dir always, Weights & Biases when enabled.

The loop calls the same methods whether W&B is on or off. W&B is imported lazily; mode `auto` goes online
with an API key and offline otherwise (or when going online fails), and says how to sync.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import time
from pathlib import Path

from prefopt.config import LoggerConfig

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class Tracker:
    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict, run_name: str, group: str | None):
        self.run_dir = run_dir
        # "x": a run dir holds one run; a second run there must not mix its records into the first's
        self.metrics_file = open(run_dir / "metrics.jsonl", "x")  # noqa: SIM115 - closed in finish()
        self.start = time.perf_counter()
        self.wandb_run = None
        if cfg.name == "wandb" and cfg.mode != "disabled":
            self.wandb_run = _start_wandb(cfg, run_dir, config, run_name, group)

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, "time_s": round(time.perf_counter() - self.start, 3), **metrics}
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        """A W&B Table (when W&B is on); the run dir keeps the same rows in its own files."""
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({name: wandb.Table(columns=columns, data=rows)})

    def summary(self, values: dict) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(
                {k: v for k, v in values.items() if isinstance(v, (int, float, str))}
            )

    def finish(self, exit_code: int = 0) -> None:
        """Close metrics.jsonl and the W&B run (marked failed with a non-zero `exit_code`); idempotent."""
        self.metrics_file.close()
        if self.wandb_run is not None:
            run, self.wandb_run = self.wandb_run, None
            offline = run.settings.mode == "offline"
            directory = run.dir
            run.finish(exit_code=exit_code)
            if offline:
                log.info("W&B ran offline; upload with: wandb sync %s", Path(directory).parent)


def _start_wandb(cfg: LoggerConfig, run_dir: Path, config: dict, run_name: str, group: str | None):
    import wandb

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
    )
    try:
        return wandb.init(mode=mode, settings=wandb.Settings(init_timeout=30, silent=True), **kwargs)
    except Exception as error:  # no network, bad key: keep the run, log offline
        if mode != "online":
            raise
        log.warning("W&B online start failed (%s); logging offline instead", error)
        return wandb.init(mode="offline", settings=wandb.Settings(silent=True), **kwargs)
