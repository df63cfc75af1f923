"""From a split's rows to checked pairs, the same way for every dataset: a bad row (missing field, empty
or non-text response, chosen == rejected, a label outside [0, 1]) is skipped and counted, and the first few
are named (file and line) in one warning and in the report; with `dataset.strict=true` the first one is an
error naming file, line and field. The warning comes before any size check, and a split with no usable
pairs or a held-out cut too small says in its error what was dropped and why (a `DataError`). The sizes of
both splits are logged."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from prefopt.data.pairs import BadRow, Filtered, Pair, TextData, TextPairs, check_pair, collect_pairs
from prefopt.data.source import RowLocator, Source, SourceConfig, open_source
from prefopt.errors import DataError

log = logging.getLogger(__name__)

FIRST_BAD = 5  # bad rows named in the warning and the report
Candidates = Iterable[tuple[int, "Pair | Exception"]]  # (row index in the split, its pair or why not)
PairsOf = Callable[[object, str], Candidates]  # (split rows, "train" | "eval") -> candidates


@dataclass
class SplitReport:
    split: str
    read: int = 0
    kept: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)  # "field: reason" -> bad rows
    filtered: Counter = field(default_factory=Counter)  # filter -> rows it dropped (by design, not bad)
    first_bad: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "split": self.split,
            "read": self.read,
            "kept": self.kept,
            "skipped": self.skipped,
            "skipped_by_reason": dict(self.reasons),
            "filtered": dict(self.filtered),
            "first_bad": self.first_bad,
        }


def attempt(format_row: Callable[..., Pair], *args) -> Pair | Exception:
    try:
        return format_row(*args)
    except (BadRow, Filtered) as error:
        return error


def each_row(rows, format_row: Callable[[dict], Pair]) -> Iterator[tuple[int, Pair | Exception]]:
    for index, row in enumerate(rows):
        yield index, attempt(format_row, row)


def collect(
    dataset: str, candidates: Candidates, locate: Callable[[int], str], split: str, strict: bool, limit
) -> tuple[TextPairs, SplitReport]:
    """Checked pairs of one split, up to `limit` good ones, and the report of what was read."""
    pairs, report = [], SplitReport(split)
    for index, result in candidates:
        if limit is not None and len(pairs) >= limit:
            break
        report.read += 1
        if isinstance(result, Pair):
            result = attempt(check_pair, result)
        if isinstance(result, Filtered):
            report.filtered[result.reason] += 1
        elif isinstance(result, BadRow):
            where = locate(index)
            if strict:
                raise DataError(
                    f"dataset={dataset}: {where}: field {result.field!r}: {result.reason} "
                    "(dataset.strict=true: the first bad row stops the run)"
                )
            report.skipped += 1
            report.reasons[f"{result.field}: {result.reason}"] += 1
            if len(report.first_bad) < FIRST_BAD:
                report.first_bad.append({"row": where, "field": result.field, "reason": result.reason})
        else:
            pairs.append(result)
    report.kept = len(pairs)
    if not pairs:
        files = ", ".join(locate.files()) if isinstance(locate, RowLocator) else ""
        raise DataError(
            f"dataset={dataset} split {split!r}: no usable pairs in {report.read} rows"
            + (f" of {files}" if files else "")
            + (f": every row dropped: {_why(report)}" if report.read else "")
        )
    return collect_pairs(pairs), report


def read_split(
    dataset: str, source: Source, cfg: SourceConfig, key: str, role: str, columns, pairs_of, optional=()
):
    """The pairs of the split `cfg.<key>` names, read as the `role` ("train" | "eval") side; `columns`
    must be there, `optional` ones are read when they are."""
    split = getattr(cfg, key)
    rows = source.split(split, key)
    missing = [c for c in columns if c not in rows.column_names]
    if missing:
        raise DataError(
            f"dataset={dataset} {source.name} split {split!r}: no column {missing} "
            f"(it has {rows.column_names})"
        )
    rows = rows.select_columns([*columns, *(c for c in optional if c in rows.column_names)])
    limit = cfg.max_train_examples if role == "train" else cfg.max_eval_examples
    return collect(dataset, pairs_of(rows, role), RowLocator(source, split), split, cfg.strict, limit)


def load_text_data(
    cfg: SourceConfig, seed: int, dataset: str, columns, pairs_of: PairsOf, optional=()
) -> TextData:
    """Open the source, read train and eval (or cut eval from train), report, log, warn once."""
    source = open_source(cfg, dataset)
    seed = cfg.seed if cfg.seed is not None else seed
    train, train_report = read_split(
        dataset, source, cfg, "train_split", "train", columns, pairs_of, optional
    )
    reports = [train_report]
    has_eval = cfg.eval_split is not None and cfg.eval_split in source.splits
    if has_eval:
        held_out, eval_report = read_split(
            dataset, source, cfg, "eval_split", "eval", columns, pairs_of, optional
        )
        reports.append(eval_report)
    warn_bad_rows(dataset, reports)  # before any size check: what was dropped is said first
    if has_eval:
        eval_from = f"split {cfg.eval_split!r}"
        if len(held_out) < cfg.min_eval_pairs:
            log.warning(
                "dataset=%s: only %d held-out pairs in %s (%s)",
                dataset,
                len(held_out),
                eval_from,
                dropped(reports),
            )
    else:
        train, held_out = hold_out(train, cfg, seed, dataset, list(source.splits), dropped(reports))
        eval_from = f"{cfg.eval_fraction:g} of split {cfg.train_split!r} held out (seed {seed})"
    log.info(
        "dataset=%s: %d train pairs (split %r), %d eval pairs (%s)",
        dataset,
        len(train),
        cfg.train_split,
        len(held_out),
        eval_from,
    )
    report = {"dataset": dataset, "path": cfg.path, "train_pairs": len(train), "eval_pairs": len(held_out)}
    report |= {"eval_from": eval_from, "splits": {r.split: r.as_dict() for r in reports}}
    return TextData(
        train,
        held_out,
        cfg.max_prompt_tokens,
        cfg.max_response_tokens,
        max_length=cfg.max_length,
        report=report,
    )


def hold_out(
    train: TextPairs, cfg: SourceConfig, seed: int, dataset: str, splits: list[str], dropped: str = ""
):
    """(train, held-out): a seeded `eval_fraction` of train, refused below `min_eval_pairs` (the error
    says what `dropped` says: rows skipped or filtered on the way)."""
    cut = round(cfg.eval_fraction * len(train))
    if cut < cfg.min_eval_pairs or cut >= len(train):
        raise DataError(
            f"dataset={dataset}: no eval split {cfg.eval_split!r} (splits: {splits}), and "
            f"dataset.eval_fraction={cfg.eval_fraction:g} of {len(train)} train pairs "
            f"({dropped or 'no rows dropped'}) holds out {cut}, "
            f"fewer than dataset.min_eval_pairs={cfg.min_eval_pairs}: give an eval split (a test file beside "
            "the train file, dataset.eval_split, or dataset.data_files={train: ..., test: ...}), raise "
            "dataset.eval_fraction, or lower dataset.min_eval_pairs"
        )
    order = np.random.default_rng(seed).permutation(len(train))
    held_out = train.subset(order[:cut])
    if cfg.max_eval_examples is not None:
        held_out = held_out.subset(range(min(cfg.max_eval_examples, len(held_out))))
    return train.subset(np.sort(order[cut:])), held_out


def dropped(reports: list[SplitReport]) -> str:
    """What the splits dropped and why, e.g. "split 'train': 40 of 80 rows dropped: prompt: not text (40; e.g.
    pairs.jsonl lines 3, 5, 7)"; "no rows dropped" when none were."""
    parts = [
        f"split {r.split!r}: {r.skipped + r.filtered.total()} of {r.read} rows dropped: {_why(r)}"
        for r in reports
        if r.skipped or r.filtered
    ]
    return "; ".join(parts) or "no rows dropped"


def _why(r: SplitReport) -> str:
    why = [f"{reason} ({count})" for reason, count in r.reasons.most_common()]
    why += [f"filtered: {reason} ({count})" for reason, count in r.filtered.most_common()]
    return ", ".join(why) + (f"; e.g. {_rows([b['row'] for b in r.first_bad])}" if r.first_bad else "")


def _rows(rows: list[str]) -> str:
    """["f line 3", "f line 5", "g line 2"] -> "f lines 3, 5, g line 2"."""
    groups: dict[str, list[str]] = {}
    for row in rows:
        file, sep, line = row.rpartition(" line ")
        groups.setdefault(file if sep else row, []).append(line if sep else "")
    return ", ".join(
        f"{file} line{'s' * (len(lines) > 1)} {', '.join(lines)}" if lines[0] else file
        for file, lines in groups.items()
    )


def warn_bad_rows(dataset: str, reports: list[SplitReport]) -> None:
    """One warning for the whole dataset: how many rows each split skipped, and the first few by line."""
    for report in reports:
        if report.filtered:
            log.info("dataset=%s split %r: filtered %s", dataset, report.split, dict(report.filtered))
    skipped = [r for r in reports if r.skipped]
    if not skipped:
        return
    counts = ", ".join(f"{r.split} {r.skipped} of {r.read}" for r in skipped)
    first = [bad for r in skipped for bad in r.first_bad][:FIRST_BAD]
    named = "; ".join(f"{b['row']}: {b['field']}: {b['reason']}" for b in first)
    log.warning(
        "dataset=%s: skipped %d bad rows (%s); first: %s (dataset.strict=true makes the first one an error)",
        dataset,
        sum(r.skipped for r in skipped),
        counts,
        named,
    )
