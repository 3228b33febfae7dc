"""Streaming readers. Each yields ``(line_number, record)`` without loading the file whole.

Every problem becomes a ``DataError`` whose message starts with ``path:line:`` so a user can open the
file at the right place: a missing file, an unknown column, bad UTF-8, bad JSON, or no text at all.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sora.errors import DataError, missing

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".txt": "txt",
           ".text": "txt", ".parquet": "parquet", ".pq": "parquet"}
SPLITS = ("train", "validation", "test")


def detect_format(path: Path, fmt: str | None = None) -> str:
    if fmt:
        return fmt
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise DataError(f"{path}: unknown format {path.suffix!r}; use one of {sorted(set(FORMATS.values()))} "
                        "or pass --format") from None


def resolve_split(path: str | Path, split: str = "train") -> Path:
    """A file stands for itself; a directory stands for its ``<split>.<ext>`` file."""
    p = Path(path)
    if p.is_dir():
        for ext in FORMATS:
            candidate = p / f"{split}{ext}"
            if candidate.is_file():
                return candidate
        raise DataError(f"{p}: no {split} file (looked for {split}.jsonl, .csv, .tsv, .txt, .parquet)")
    if not p.exists():
        raise DataError(f"file not found: {p}")
    return p


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{number}: invalid UTF-8 at byte {exc.start} of the line") from None


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def _delimited(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    lines = _decoded_lines(path)
    numbers: list[tuple[int, bool]] = []  # (line, non-empty) of the lines read for the current record

    def feed() -> Iterator[str]:
        for number, line in lines:
            numbers.append((number, bool(line.strip("\r\n"))))
            yield line

    reader = csv.DictReader(feed(), delimiter=delimiter)
    _ = reader.fieldnames  # read the header row
    numbers.clear()
    for record in reader:
        # A record starts at its first non-empty line (csv skips empty rows); a quoted field may span lines.
        yield next(n for n, nonempty in numbers if nonempty), record
        numbers.clear()


def _txt(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in _decoded_lines(path):
        line = line.rstrip("\r\n")
        if line.strip():
            yield number, {"text": line}


def _parquet(path: Path, columns: list[str] | None) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise missing(exc, f"reading {path} (Parquet)") from exc
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    names = pf.schema_arrow.names
    absent = [c for c in columns or [] if c not in names]
    if absent:
        raise DataError(f"{path}: no column {absent[0]!r} (columns: {', '.join(names)})")
    row = 0
    for batch in pf.iter_batches(batch_size=4096, columns=columns):
        for record in batch.to_pylist():
            row += 1
            yield row, record


def read_records(path: str | Path, fmt: str | None = None,
                 columns: list[str] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream ``(line, record)`` pairs; ``columns`` are checked on the first record."""
    p = resolve_split(path)
    kind = detect_format(p, fmt)
    if kind == "parquet":
        yield from _parquet(p, columns)
        return
    rows = {"jsonl": _jsonl, "txt": _txt}.get(kind)
    it = rows(p) if rows else _delimited(p, "," if kind == "csv" else "\t")
    checked = False
    for number, record in it:
        if not checked and columns:
            missing = [c for c in columns if c not in record]
            if missing:
                raise DataError(f"{p}:{number}: no column {missing[0]!r} (columns: {', '.join(map(str, record))})")
            checked = True
        yield number, record


def read_texts(path: str | Path, column: str = "text", fmt: str | None = None) -> Iterator[str]:
    """Stream the non-empty texts of one column; a file without any is an error."""
    p = resolve_split(path)
    kind = detect_format(p, fmt)
    column = "text" if kind == "txt" else column
    count = 0
    for number, record in read_records(p, kind, [column]):
        if column not in record:
            raise DataError(f"{p}:{number}: no column {column!r}")
        value = record[column]
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(f"{p}:{number}: column {column!r} holds {type(value).__name__}, not text")
        if value.strip():
            count += 1
            yield value
    if count == 0:
        raise DataError(f"{p}: no text found in column {column!r} (empty data)")


class TextSource:
    """A re-iterable stream of texts: each pass (epoch) reads the file again instead of keeping it."""

    def __init__(self, path: str | Path, column: str = "text", fmt: str | None = None, limit: int | None = None,
                 split: str = "train"):
        self.path = resolve_split(path, split)
        self.fmt = detect_format(self.path, fmt)
        self.column = column
        self.limit = limit

    def __iter__(self) -> Iterator[str]:
        texts = read_texts(self.path, self.column, self.fmt)
        # islice stops without reading past the limit (a bad record after it is never touched).
        yield from texts if self.limit is None else itertools.islice(texts, self.limit)

    def check(self) -> None:
        """Fail fast on the first record (missing column, bad bytes, empty) before any training starts."""
        next(iter(self))
