"""Local data files as `datasets` reads them: which builder reads a file (json, csv, parquet; gzipped or
not), whether a text file has rows and is UTF-8, the line where a .jsonl/.json file stops being JSON, and
the line (or record index) of each record, so a bad row can be named where the user finds it.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

from prefopt.errors import DataError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def builder_for(file: Path) -> str | None:
    suffixes = [s for s in file.suffixes[-2:] if s != ".gz"]
    return BUILDERS.get(suffixes[-1].lower()) if suffixes else None


def open_file(file: Path, mode: str, **kwargs):
    """`open`, or `gzip.open` for a .gz file (same arguments)."""
    return (gzip.open if file.suffix == ".gz" else open)(file, mode, **kwargs)


def check_text_file(file: Path, split: str) -> None:
    """A local .jsonl/.json/.csv file (or .gz of one) has rows and is UTF-8 text; else a DataError naming
    the file (and the line of the first byte that is not UTF-8)."""
    kind = builder_for(file)
    if kind not in ("json", "csv"):
        return
    rows, head = 0, ""
    with open_file(file, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{file} line {number}: not UTF-8 text (byte 0x{line[error.start]:02x} at byte "
                    f"{error.start + 1} of the line); save the file as UTF-8"
                ) from None
            if text.strip():
                rows += 1
                head = (head + text.strip())[:3]
    if rows == 0 or (kind == "csv" and rows == 1) or (rows <= 2 and head == "[]"):
        what = "only a header" if kind == "csv" and rows else "no rows"
        raise DataError(f"{file}: empty, {what} (split {split!r})")


def json_error(file: Path) -> str | None:
    """Where a .jsonl/.json file stops being rows of JSON: "<file> line N: why", or None."""
    if builder_for(file) != "json":
        return None
    with open_file(file, "rb") as handle:
        text = handle.read().decode("utf-8", errors="replace")
    if _is_array(text):  # one JSON array: the line of the error's position
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            return f"{file} line {error.lineno}: not valid JSON: {error.msg} (column {error.colno})"
        return None
    for number, line in _jsonl_rows(text):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            return f"{file} line {number}: not valid JSON: {error.msg} (column {error.colno})"
        if not isinstance(value, dict):
            return f"{file} line {number}: a JSON {type(value).__name__}, not an object (one row per line)"
    return None


def record_lines(file: Path) -> tuple[list[int] | None, int]:
    """(1-based line of each record, or None where records have no line; number of records)."""
    kind = builder_for(file)
    if kind == "parquet":
        import pyarrow.parquet as pq

        return None, pq.ParquetFile(file).metadata.num_rows
    with open_file(file, "rt", encoding="utf-8", newline="") as handle:
        text = handle.read()
    if kind == "csv":
        reader, lines = csv.reader(io.StringIO(text, newline="")), []
        next(reader, None)  # the header (line 1)
        end = reader.line_num  # the last line read so far; a record starts on the next one
        for record in reader:
            if record:
                lines.append(end + 1)
            end = reader.line_num
        return lines, len(lines)
    if _is_array(text):
        return None, len(json.loads(text))
    lines = [number for number, _ in _jsonl_rows(text)]
    return lines, len(lines)


def _is_array(text: str) -> bool:
    """A .json file holding one array of records (else one record per line)."""
    return text.lstrip().startswith("[")


def _jsonl_rows(text: str) -> list[tuple[int, str]]:
    """(1-based line number, line) of each line that is not blank; split at "\\n" only, not splitlines:
    JSON strings may hold U+2028."""
    return [(number, line) for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
