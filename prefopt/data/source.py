"""Where a dataset's rows come from: a hub name, a local file, a local dir of split files, or a builder
(json | csv | parquet) with `data_files`, always through `datasets.load_dataset`; and where a row sits in
its file, so a bad row is named by the file's line (jsonl, csv) or record index (json array, parquet).

Local text files are checked before `datasets` reads them (an empty file, a byte that is not UTF-8), and a
file it cannot parse is read again to find the line: each is a `DataError` naming the file and the line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefopt.data.text_files import BUILDERS, builder_for, check_text_file, json_error, record_lines
from prefopt.errors import ConfigFieldError, DataError, MissingPathError

log = logging.getLogger(__name__)

GLOB = set("*?[")


@dataclass
class SourceConfig:
    """Fields every dataset adapter has; each adapter's schema subclasses it."""

    path: str = "???"  # hub name, a local .jsonl/.json/.parquet/.csv file, a local dir, or json|csv|parquet
    data_files: Any = None  # a file, a list, or {split: file(s)}; relative to `path` when that is a dir
    data_dir: str | None = None  # a subset folder of the dataset (Anthropic/hh-rlhf: harmless-base, ...)
    config_name: str | None = None  # hub config (subset) name
    train_split: str = "train"
    eval_split: str | None = "test"  # held-out split; when absent, eval_fraction of train is held out
    eval_fraction: float = 0.05
    min_eval_pairs: int = 32  # a hold-out cut from train smaller than this is refused
    max_train_examples: int | None = None  # keep the first N good pairs (null: all)
    max_eval_examples: int | None = None
    max_prompt_tokens: int = 256
    max_response_tokens: int = 256
    max_length: int | None = None  # prompt + response tokens (null: the two limits above only)
    strict: bool = False  # the first bad row is an error (default: skipped, counted and reported)
    seed: int | None = None  # seed of the held-out cut and any sampling; null: the run's seed

    def __post_init__(self):
        check_data_files(self.data_files)
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigFieldError("eval_fraction", f"{self.eval_fraction} is not in (0, 1)")
        for name in ("max_train_examples", "max_eval_examples", "max_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigFieldError(name, f"{getattr(self, name)} is not >= 1 (null: no limit)")
        if self.min_eval_pairs < 1:
            raise ConfigFieldError("min_eval_pairs", f"{self.min_eval_pairs} is not >= 1")
        check_token_limits(self)

    def preflight(self) -> None:
        """Before anything loads: the local file, dir or data files named exist (a hub name is looked up
        when it loads)."""
        load_arguments(self)


def check_token_limits(cfg) -> None:
    """Each limit holds a token, and `max_length` leaves room for a response after a full-length prompt."""
    for name in ("max_prompt_tokens", "max_response_tokens"):
        if getattr(cfg, name) < 1:
            raise ConfigFieldError(name, f"{getattr(cfg, name)} is not >= 1")
    if cfg.max_length is not None and cfg.max_prompt_tokens >= cfg.max_length:
        raise ConfigFieldError(
            "max_length",
            f"{cfg.max_length} leaves no room for a response after a prompt of max_prompt_tokens="
            f"{cfg.max_prompt_tokens}; make max_prompt_tokens smaller",
        )


def check_data_files(value: Any) -> None:
    """A string, a list of strings, or {split: string or list}; anything else is a config error."""
    is_files = lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(f, str) for f in v))  # noqa: E731
    if value is None or is_files(value):
        return
    if isinstance(value, dict) and all(isinstance(k, str) and is_files(v) for k, v in value.items()):
        return
    raise ConfigFieldError(
        "data_files", f"expected a file, a list of files or {{split: file}}, got {value!r}"
    )


@dataclass
class Source:
    """The loaded splits of one dataset, and how to name a row of each."""

    splits: Any  # datasets.DatasetDict
    name: str  # what the user gave (dataset.path)
    load_args: tuple[str, dict]

    def split(self, split: str, key: str):
        if split not in self.splits:
            raise DataError(f"dataset.{key}: no split {split!r} in {self.name} (it has {list(self.splits)})")
        return self.splits[split]

    def files(self, split: str) -> list[str] | None:
        """The files the split was read from, in the order their rows were concatenated."""
        from datasets import load_dataset_builder

        try:
            path, kwargs = self.load_args
            return [str(f) for f in load_dataset_builder(path, **kwargs).config.data_files[split]]
        except Exception:  # noqa: BLE001 - row naming falls back to the split's record index
            return None


def open_source(cfg: SourceConfig, dataset: str) -> Source:
    """`load_dataset` on what `dataset.path` names; a missing local file or dir is a one-line error, and so
    is a local file that is empty, not UTF-8 or not parseable (naming the file and line)."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    path, kwargs = load_arguments(cfg)
    files = local_files(path, kwargs)
    try:
        for split, names in files.items():
            for file in names:
                check_text_file(Path(file), split)
    except DataError as error:
        raise DataError(f"dataset={dataset}: {error}") from None
    json_log = logging.getLogger("datasets.packaged_modules.json.json")
    level = json_log.level
    json_log.setLevel(logging.CRITICAL)  # its parse errors are ours to report, once, with the line
    try:
        splits = load_dataset(path, **kwargs)
    except OSError as error:  # a hub name not found or not reachable, data files that match nothing
        hub = path not in BUILDERS.values() and not Path(path).exists()
        hint = " (not a local file or dir, so it was looked up on the hub)" if hub else ""
        raise FileNotFoundError(
            f"dataset={dataset} dataset.path={cfg.path}{hint}: {_first_line(error)}"
        ) from error
    except DatasetGenerationError as error:  # a file it cannot parse: find the line, else the cause says why
        where = next(filter(None, (json_error(Path(f)) for fs in files.values() for f in fs)), None)
        cause = (
            where or f"dataset.path={cfg.path}: cannot read its rows: {_first_line(error.__cause__ or error)}"
        )
        raise DataError(f"dataset={dataset}: {cause}") from error
    finally:
        json_log.setLevel(level)
    return Source(splits, cfg.path, (path, kwargs))


def local_files(path: str, kwargs: dict) -> dict[str, list[str]]:
    """{split: local files} that `load_dataset(path, **kwargs)` will read; {} for a hub name (or when the
    files cannot be resolved: `load_dataset` then says why)."""
    from datasets import load_dataset_builder

    if path not in BUILDERS.values() and not Path(path).expanduser().is_dir():
        return {}
    try:
        data_files = load_dataset_builder(path, **kwargs).config.data_files or {}
    except Exception:  # noqa: BLE001 - load_dataset reports it in its own words
        return {}
    return {str(split): [str(f) for f in fs if Path(str(f)).is_file()] for split, fs in data_files.items()}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_arguments(cfg: SourceConfig, key: str = "dataset.path") -> tuple[str, dict]:
    """(path, keyword arguments) for `load_dataset`; a missing local file or dir is a MissingPathError, a
    local file of an unknown kind a ConfigFieldError (each naming the key), before anything is read."""
    kwargs = {"name": cfg.config_name, "data_dir": cfg.data_dir, "data_files": cfg.data_files}
    local = Path(cfg.path).expanduser()
    if local.is_file():
        builder = builder_for(local)
        if builder is None:
            raise ConfigFieldError("path", f"{key}={cfg.path}: not a .jsonl, .json, .parquet or .csv file")
        _check_local_files(cfg.data_files, Path.cwd())
        return builder, {**kwargs, "data_files": cfg.data_files or {"train": str(local)}}
    if local.is_dir():
        _check_local_files(cfg.data_files, local)
        return str(local), kwargs
    if cfg.path in set(BUILDERS.values()):
        if cfg.data_files is None:
            raise ConfigFieldError(
                "data_files",
                f"{key}={cfg.path} reads dataset.data_files: give a file or {{train: file}}",
            )
        _check_local_files(cfg.data_files, Path.cwd())
        return cfg.path, kwargs
    if cfg.path.startswith(("/", ".", "~")) or builder_for(local) is not None:
        raise MissingPathError("path", f"{key}={cfg.path}: no such file or directory")
    return cfg.path, kwargs  # a hub name


def _check_local_files(data_files: Any, base: Path) -> None:
    values = data_files.values() if isinstance(data_files, dict) else [data_files]
    for files in values:
        for file in [files] if isinstance(files, str) else files or []:
            if "://" in file or GLOB & set(file):
                continue
            if not (base / Path(file).expanduser()).exists():
                raise MissingPathError(
                    "data_files", f"dataset.data_files: no such file {file} (relative to {base})"
                )


class RowLocator:
    """Names a split's row as the user finds it: a jsonl file's 1-based line, a csv file's line (the header
    is line 1), a json array's or parquet file's 0-based record index. Computed only once a row is bad."""

    def __init__(self, source: Source, split: str):
        self.source, self.split = source, split
        self._spans: list[tuple[str, list[int] | None, int]] | None = None  # (file, lines or None, records)

    def __call__(self, index: int) -> str:
        if self._spans is None:
            self._spans = self._read_spans()
        start = 0
        for file, lines, count in self._spans:
            if index < start + count:
                local = index - start
                return f"{file} line {lines[local]}" if lines else f"{file} record {local} (0-based)"
            start += count
        return f"{self.source.name} split {self.split!r} record {index} (0-based)"

    def files(self) -> list[str]:
        """The split's local files, or [] when they are not known (a hub dataset's)."""
        return [f for f in self.source.files(self.split) or [] if Path(f).is_file()]

    def _read_spans(self) -> list:
        files = self.source.files(self.split) or []
        try:
            spans = [(file, *record_lines(Path(file))) for file in files]
        except Exception:  # noqa: BLE001 - a remote or unreadable file: fall back to record indices
            return []
        expected = len(self.source.splits[self.split])
        return spans if sum(count for _, _, count in spans) == expected else []
