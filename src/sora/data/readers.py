"""Streaming readers. Each yields ``(line_number, record)`` without loading the file whole.

Every problem becomes a ``DataError`` whose message starts with ``path:line:`` so a user can open the
file at the right place: a missing file, an unknown column, bad UTF-8, bad JSON, or no text at all.

Delimited text (CSV, TSV, and a ``.txt`` file whose first line is a delimited header) is split on its
format's delimiter unless that header lacks the columns asked for and another delimiter (``;``, tab, ``,``,
``|``, found with ``csv.Sniffer``) gives them; a delimiter given explicitly (``--delimiter``) is used as it is.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sora.errors import DataError, missing

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".txt": "txt",
           ".text": "txt", ".parquet": "parquet", ".pq": "parquet"}
SPLITS = ("train", "validation", "test")
DELIMITERS = (",", ";", "\t", "|")  # what detection chooses from
DEFAULT_DELIMITER = {"csv": ",", "tsv": "\t"}
DELIMITER_NAMES = {"comma": ",", "semicolon": ";", "tab": "\t", "\\t": "\t", "pipe": "|", "space": " "}
SNIFF_BYTES = 64 * 1024
SNIFF_LINES = 50


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


def parse_delimiter(value: str | None) -> str | None:
    """``--delimiter`` / a recipe's ``delimiter``: one character, or a name (tab, comma, semicolon, pipe)."""
    if value is None or value == "":
        return None
    named = DELIMITER_NAMES.get(value.lower() if len(value) > 1 else value, value)
    if len(named) != 1 or named in "\"\r\n":
        raise DataError(f"delimiter {value!r}: use one character (e.g. ';' or '|') or tab, comma, semicolon, pipe")
    return named


def delimiter_name(delimiter: str) -> str:
    return "tab" if delimiter == "\t" else repr(delimiter)


@dataclass(frozen=True)
class Layout:
    """How a file is read: its format and, for delimited text, the delimiter and where it came from."""

    path: Path
    kind: str  # jsonl | csv | tsv | txt | parquet
    delimiter: str | None = None  # set when the file is read as delimited text (a .txt with a header too)
    how: str = ""  # "given", "detected" or "default": where ``delimiter`` came from

    @property
    def plain_text(self) -> bool:
        """One text per line, no header: each record is ``{"text": line}``."""
        return self.kind == "txt" and self.delimiter is None

    def describe(self, record: dict[str, Any]) -> str:
        """What was found, for an error message: the columns, and how they were split."""
        if self.plain_text:
            return "plain text: one text per line, in the one column 'text'"
        names = ", ".join(map(str, record))
        if self.delimiter is None:
            return f"columns: {names}"
        how = {"given": " as given", "detected": " detected", "default": f", the .{self.kind} default"}[self.how]
        return f"columns: {names}; delimiter {delimiter_name(self.delimiter)}{how}"


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{number}: invalid UTF-8 at byte {exc.start} of the line") from None


def _sample(path: Path) -> str:
    """The first lines of ``path`` for sniffing (bad bytes replaced: the reader itself reports them)."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(SNIFF_BYTES)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    lines = raw.decode("utf-8-sig", errors="replace").splitlines(keepends=True)
    if len(raw) == SNIFF_BYTES and len(lines) > 1:
        lines = lines[:-1]  # the last one may be cut
    return "".join(lines[:SNIFF_LINES])


def _header(sample: str, delimiter: str) -> list[str]:
    try:
        return next(csv.reader(sample.splitlines(keepends=True), delimiter=delimiter), [])
    except csv.Error:
        return []


def _sniff(sample: str) -> str | None:
    try:
        return csv.Sniffer().sniff(sample, delimiters="".join(DELIMITERS)).delimiter
    except csv.Error:
        return None


_NAME = re.compile(r"\S{1,64}")


def _choose(sample: str, default: str, expect: Sequence[str]) -> tuple[str, str]:
    """(delimiter, how) for a CSV/TSV file. The format's default stays unless its header has fewer of the
    ``expect``ed columns than another delimiter's (the sniffed one first), or, with nothing expected, it
    yields one column where the sniffed delimiter yields several."""
    sniffed = _sniff(sample)
    order = list(dict.fromkeys([default, *([sniffed] if sniffed else []), *DELIMITERS]))
    headers = {d: _header(sample, d) for d in order}
    wanted = set(expect)
    score = {d: len(wanted & set(h)) for d, h in headers.items()}
    best = max(order, key=lambda d: (score[d], d == default, d == sniffed))  # ties: the default, then sniffed
    if score[best] > score[default]:
        return best, "detected"
    if score[default] == 0 and sniffed and sniffed != default and len(headers[default]) == 1 \
            and len(headers[sniffed]) > 1:
        return sniffed, "detected"
    return default, "default"


def _txt_header(sample: str, expect: Sequence[str]) -> str | None:
    """The delimiter of a ``.txt`` file whose first line is a header (two or more names, no spaces, one of
    them an ``expect``ed column), else None: the file is plain text, one text per line."""
    if not expect or not sample:
        return None
    sniffed = _sniff(sample)
    for d in dict.fromkeys([*([sniffed] if sniffed else []), *DELIMITERS]):
        fields = _header(sample, d)
        if len(fields) > 1 and all(_NAME.fullmatch(f) for f in fields) and set(expect) & set(fields):
            return d
    return None


def detect_layout(path: str | Path, fmt: str | None = None, delimiter: str | None = None,
                  expect: Sequence[str] | None = None) -> Layout:
    """How ``path`` (a file) will be read. ``expect``: the columns the caller is after (guides detection)."""
    p = Path(path)
    kind = detect_format(p, fmt)
    delimiter = parse_delimiter(delimiter)
    if kind in ("jsonl", "parquet"):
        return Layout(p, kind)
    if delimiter is not None:
        return Layout(p, kind, delimiter, "given")
    if kind == "txt":
        found = _txt_header(_sample(p), expect or [])
        return Layout(p, kind, found, "detected") if found else Layout(p, kind)
    default = DEFAULT_DELIMITER.get(kind)
    if default is None:
        raise DataError(f"{p}: unknown format {kind!r}; use one of {sorted(set(FORMATS.values()))}")
    return Layout(p, kind, *_choose(_sample(p), default, expect or []))


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
    try:
        _ = reader.fieldnames  # read the header row
        numbers.clear()
        for record in reader:
            # A record starts at its first non-empty line (csv skips empty rows); a quoted field may span lines.
            yield next(n for n, nonempty in numbers if nonempty), record
            numbers.clear()
    except csv.Error as exc:
        line = numbers[0][0] if numbers else 1
        raise DataError(f"{path}:{line}: not valid delimited text ({exc})") from None


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


def read_records(path: str | Path, fmt: str | None = None, columns: list[str] | None = None, *,
                 delimiter: str | None = None, layout: Layout | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream ``(line, record)`` pairs; every record must have ``columns``. ``layout`` (see ``detect_layout``)
    says how to read the file; by default it is detected, looking for ``columns``."""
    if layout is None:
        layout = detect_layout(resolve_split(path), fmt, delimiter, columns)
    p = layout.path
    if layout.kind == "parquet":
        yield from _parquet(p, columns)
        return
    if layout.kind == "jsonl":
        it = _jsonl(p)
    elif layout.delimiter is not None:
        it = _delimited(p, layout.delimiter)
    else:
        it = _txt(p)
    for number, record in it:
        absent = [c for c in columns or [] if c not in record]
        if absent:
            raise DataError(f"{p}:{number}: no column {absent[0]!r} ({layout.describe(record)})")
        yield number, record


def text_value(layout: Layout, number: int, record: dict[str, Any], column: str) -> str:
    """``record[column]`` as a text, or a ``DataError`` naming the line: null, or not a string."""
    value = record.get(column)
    if isinstance(value, str):
        return value
    where = f"{layout.path}:{number}: the text in column {column!r}"
    if value is None:
        if layout.delimiter is not None:
            raise DataError(f"{where} is missing: the row has fewer fields than the header")
        raise DataError(f"{where} is null; fill it in (an empty string is fine) or drop the row")
    raise DataError(f"{where} is a {type(value).__name__} ({value!r:.40}), not a string")


def _text_layout(path: str | Path, column: str, fmt: str | None, delimiter: str | None) -> tuple[Layout, str]:
    layout = detect_layout(resolve_split(path), fmt, delimiter, [column])
    return layout, "text" if layout.plain_text else column  # the column does not matter for plain text


def read_texts(path: str | Path, column: str = "text", fmt: str | None = None,
               delimiter: str | None = None) -> Iterator[str]:
    """Stream the non-empty texts of one column (for training: null and blank rows are skipped); a file
    without any is an error."""
    layout, column = _text_layout(path, column, fmt, delimiter)
    count = 0
    for number, record in read_records(layout.path, columns=[column], layout=layout):
        value = record[column]
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(f"{layout.path}:{number}: column {column!r} holds {type(value).__name__}, not text")
        if value.strip():
            count += 1
            yield value
    if count == 0:
        raise DataError(f"{layout.path}: no text found in column {column!r} (empty data)")


def read_column(path: str | Path, column: str = "text", fmt: str | None = None,
                delimiter: str | None = None) -> Iterator[tuple[int, str]]:
    """``(line, text)`` for every record, in order, an empty text included (so outputs line up with the
    input); a null or non-string text, or a file without records, is an error."""
    layout, column = _text_layout(path, column, fmt, delimiter)
    count = 0
    for number, record in read_records(layout.path, columns=[column], layout=layout):
        count += 1
        yield number, text_value(layout, number, record, column)
    if count == 0:
        raise DataError(f"{layout.path}: no records (empty data)")


class TextSource:
    """A re-iterable stream of texts: each pass (epoch) reads the file again instead of keeping it."""

    def __init__(self, path: str | Path, column: str = "text", fmt: str | None = None, limit: int | None = None,
                 split: str = "train", delimiter: str | None = None):
        self.path = resolve_split(path, split)
        self.fmt = detect_format(self.path, fmt)
        self.column = column
        self.limit = limit
        self.delimiter = parse_delimiter(delimiter)

    def __iter__(self) -> Iterator[str]:
        texts = read_texts(self.path, self.column, self.fmt, self.delimiter)
        # islice stops without reading past the limit (a bad record after it is never touched).
        yield from texts if self.limit is None else itertools.islice(texts, self.limit)

    def check(self) -> None:
        """Fail fast on the first record (missing column, bad bytes, empty) before any training starts."""
        next(iter(self))
