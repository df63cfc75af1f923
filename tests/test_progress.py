"""Progress bars show on a terminal and stay quiet in logs and CI."""

from __future__ import annotations

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


def test_bars_are_quiet_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    monkeypatch.delenv("CI", raising=False)
    assert list(progress(range(3), desc="quiet")) == [0, 1, 2]
    assert "quiet" not in capsys.readouterr().err
