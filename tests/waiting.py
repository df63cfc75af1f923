"""Waiting in tests without sleep polling: block on the event itself, a process's exit (its pidfd) or a
change under a directory (inotify), and re-check the condition only when one arrives.

Each wait has a deadline. It is not a timing assertion: it only turns a hang into a clear error naming what
was awaited (Linux only, as the tests that use it: they kill processes and read /proc).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

# inotify(7): a file created, written, closed after writing, renamed in, or its metadata changed
_EVENTS = 0x2 | 0x4 | 0x8 | 0x80 | 0x100
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
_libc = ctypes.CDLL(None, use_errno=True)


class ProcessEnded(AssertionError):
    """The process a wait depends on ended before the awaited condition held."""


def _remaining(deadline: float, what: str, deadline_s: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"still waiting for {what} after {deadline_s:g} s")
    return left


def _nearest_existing(path: Path) -> Path:
    while not path.is_dir():
        path = path.parent
    return path


def wait_for_file_event(
    condition: Callable[[], bool],
    watch: Iterable[Path],
    deadline_s: float,
    what: str,
    process: subprocess.Popen | None = None,
) -> None:
    """Return once `condition()` holds, re-checking it on every change in the `watch` directories (a
    directory that does not exist yet is awaited through its nearest existing ancestor). If `process` ends
    first, raise ProcessEnded with its stderr; at the deadline, TimeoutError."""
    deadline = time.monotonic() + deadline_s
    watch = [Path(w) for w in watch]
    notify = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if notify < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1 failed")
    exited = os.pidfd_open(process.pid) if process is not None else None
    try:
        while True:
            for directory in watch:  # re-armed each time: directories appear while we wait
                if _libc.inotify_add_watch(notify, bytes(_nearest_existing(directory)), _EVENTS) < 0:
                    raise OSError(ctypes.get_errno(), f"inotify_add_watch on {directory} failed")
            if condition():
                return
            if exited is not None and process.poll() is not None:
                _, err = process.communicate()
                raise ProcessEnded(f"the process ended (exit {process.returncode}) before {what}:\n{err}")
            ready, _, _ = select.select(
                [notify, *([exited] if exited is not None else [])],
                [],
                [],
                _remaining(deadline, what, deadline_s),
            )
            if notify in ready:
                try:
                    while os.read(notify, 65536):
                        pass
                except BlockingIOError:
                    pass
            elif exited not in ready:
                _remaining(deadline, what, deadline_s)
    finally:
        os.close(notify)
        if exited is not None:
            os.close(exited)


def wait_for_exit(pids: Iterable[int], deadline_s: float, what: str) -> None:
    """Return once every process in `pids` has ended (exited or a zombie: only its parent's wait is left;
    any process, not only a child), through each one's pidfd; at the deadline, TimeoutError."""
    deadline = time.monotonic() + deadline_s
    fds = []
    try:
        for pid in pids:
            try:
                fds.append(os.pidfd_open(pid))
            except ProcessLookupError:
                continue  # already gone
            except OSError as error:
                if error.errno != errno.ESRCH:
                    raise
        while fds:
            ready, _, _ = select.select(fds, [], [], _remaining(deadline, what, deadline_s))
            for fd in ready:
                os.close(fd)
                fds.remove(fd)
    finally:
        for fd in fds:
            os.close(fd)


def exit_code(process: subprocess.Popen, deadline_s: float, what: str) -> int:
    """`process.wait` with a deadline that raises a TimeoutError naming `what`."""
    try:
        return process.wait(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"still waiting for {what} after {deadline_s:g} s") from None
