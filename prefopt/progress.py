"""Progress bars for long phases: tqdm on a terminal, silent when stderr is not one or under CI."""

from __future__ import annotations

import logging
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


class _OursOrErrors(logging.Filter):
    """On the terminal: prefopt's records, and only errors from libraries (whose retries and notices fill
    train.log instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith(("prefopt", "__main__")) or record.levelno >= logging.ERROR


def route_library_logs() -> None:
    """transformers' and datasets' records go through the root logger (so Hydra's train.log holds them),
    not their own stderr handlers; the terminal shows prefopt's records and libraries' errors."""
    import datasets  # noqa: F401 - configures its logger on import; undone below
    import huggingface_hub  # noqa: F401 - the same
    import transformers

    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    for name in ("datasets", "huggingface_hub"):  # their own stderr handlers, added at import
        library = logging.getLogger(name)
        for handler in [h for h in library.handlers if type(h) is logging.StreamHandler]:
            library.removeHandler(handler)
        library.propagate = True
    logging.captureWarnings(True)  # Python warnings (deprecations, ...) to the log, not the terminal
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler) and not any(
            isinstance(f, _OursOrErrors) for f in handler.filters
        ):
            handler.addFilter(_OursOrErrors())
