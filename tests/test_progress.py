"""Progress bars show on a terminal and stay quiet in logs and CI."""

from __future__ import annotations

import io
import sys

from prefopt.progress import progress, progress_enabled


class Terminal:
    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def test_bars_show_on_a_terminal_unless_ci_is_set(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.delenv("CI", raising=False)
    assert progress_enabled() and not progress(range(3)).disable
    monkeypatch.setenv("CI", "true")
    assert not progress_enabled() and progress(range(3)).disable


def test_bars_are_quiet_when_stderr_is_not_a_terminal(monkeypatch):
    """A redirected stderr (a log file, a pipe): the bar is disabled and writes nothing at all."""
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.delenv("CI", raising=False)
    bar = progress(range(3), desc="quiet")
    assert not progress_enabled() and bar.disable
    assert list(bar) == [0, 1, 2]
    assert log.getvalue() == ""


def test_library_notices_go_to_the_log_file_and_only_errors_to_the_terminal(tmp_path):
    """route_library_logs: a transformers or huggingface_hub warning reaches train.log, not the terminal;
    prefopt's own records reach both."""
    import logging

    from prefopt.progress import route_library_logs

    root = logging.getLogger()
    terminal, log_file = logging.StreamHandler(io.StringIO()), logging.FileHandler(tmp_path / "train.log")
    saved = root.handlers[:], root.level
    root.handlers[:] = [terminal, log_file]
    root.setLevel(logging.INFO)
    try:
        route_library_logs()
        logging.getLogger("huggingface_hub.utils").warning("Retrying in 8s [Retry 4/5].")
        logging.getLogger("transformers.modeling_utils").error("weights missing")
        logging.getLogger("prefopt.training.train").info("step 1/10")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        log_file.close()
        logging.captureWarnings(False)
    shown = terminal.stream.getvalue()
    assert "Retrying" not in shown and "weights missing" in shown and "step 1/10" in shown
    written = (tmp_path / "train.log").read_text()
    assert all(line in written for line in ("Retrying", "weights missing", "step 1/10"))
