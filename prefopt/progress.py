"""Progress bars for long phases: tqdm on a terminal, silent when stderr is not one or under CI."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress_enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


def progress(iterable=None, quiet: bool = False, **kwargs) -> tqdm:
    """`tqdm(iterable, **kwargs)`, disabled when not on a terminal (or `quiet`, e.g. for a short phase);
    the bar is cleared when it ends."""
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=quiet or not progress_enabled(), **kwargs)


def quiet_library_progress_bars() -> None:
    """Libraries' own bars (checkpoint shards, dataset maps) follow ours: off when not on a terminal."""
    if progress_enabled():
        return
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
