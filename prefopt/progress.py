"""Progress bars for long phases: tqdm on a terminal, silent when stderr is not one or under CI."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress_enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


def progress(iterable=None, **kwargs) -> tqdm:
    """`tqdm(iterable, **kwargs)`, disabled when not on a terminal; the bar is cleared when it ends."""
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=not progress_enabled(), **kwargs)
