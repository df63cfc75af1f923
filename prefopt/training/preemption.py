"""Preemption: the first SIGTERM / SIGINT (or a SLURM pre-emption signal) asks the loop to checkpoint at
the end of the current step and stop; a second one stops at once (as Ctrl-C does)."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


class Preempted(Exception):
    """The run stopped on a signal after writing a checkpoint."""

    def __init__(self, signal_name: str, step: int, checkpoint):
        super().__init__(f"{signal_name} at step {step}; checkpoint {checkpoint}")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + int(signal.Signals[self.signal_name])


class PreemptionGuard:
    """`with PreemptionGuard(["SIGTERM", "SIGINT"]) as guard:` ... `if guard.requested:` checkpoint, stop."""

    def __init__(self, signal_names: list[str]):
        self.signals = [signal.Signals[name] for name in signal_names]
        self.requested: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            log.warning("%s again: stopping now, without a checkpoint", name)
            raise KeyboardInterrupt
        self.requested = name
        log.warning(
            "%s: checkpointing at the end of this step, then stopping (send it again to stop now)", name
        )
