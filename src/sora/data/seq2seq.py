"""Sequence-to-sequence data (translation, summarisation): a source text and the target text(s) to generate.

Rows name their columns as the common datasets do; the first present of each list is used, unless the recipe
names the column (``tasks[].text_column`` / ``label_column``)::

    source: source, dialogue, document, text, src
    target: target, summary, summary1, tgt

Several references (DialogSum's test set: three summaries) come as a list in ``references`` (or in the target
column), or as numbered columns ``summary1``, ``summary2``, ... / ``target1``, ...; the first is the training
target, all of them are scored. Problems are ``DataError``s naming ``file:line``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sora.data.batching import collate
from sora.data.readers import detect_layout, read_records, resolve_split
from sora.data.tasks import make_batch
from sora.errors import DataError
from sora.text.tokenizer import SoraTokenizer

SOURCE_COLUMNS = ("source", "dialogue", "document", "text", "src")
TARGET_COLUMNS = ("target", "summary", "summary1", "tgt")
NUMBERED = ("summary", "target", "reference")  # summary1, summary2, ...: one reference each


@dataclass
class Seq2SeqExample:
    """One source and its references (empty for inference rows); ``target`` is the first, what training
    teaches; ``line``: where it is in its file, for messages."""

    source: str
    references: list[str] = field(default_factory=list)
    id: str = ""
    line: int = 0

    @property
    def target(self) -> str | None:
        return self.references[0] if self.references else None

    @property
    def text(self) -> str:
        """The source (what the encoder reads: the unknown-token check, auxiliary denoising)."""
        return self.source


def _column(record: dict[str, Any], given: str | None, candidates: Sequence[str]) -> str | None:
    if given is not None:
        return given if given in record else None
    return next((c for c in candidates if c in record and record[c] not in (None, "")), None)


def _text(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} is a {type(value).__name__} ({value!r:.40}), not text")
    if not value.strip():
        raise DataError(f"{where}: empty {what}")
    return value


def _numbered(record: dict[str, Any]) -> list[Any]:
    """``summary1``, ``summary2``, ... (or ``target1``, ``reference1``, ...) in order, while present."""
    for stem in NUMBERED:
        found, i = [], 1
        while record.get(f"{stem}{i}") not in (None, ""):
            found.append(record[f"{stem}{i}"])
            i += 1
        if len(found) > 1:
            return found
    return []


def parse_seq2seq(record: dict[str, Any], where: str, line: int = 0, require_target: bool = True,
                  source_column: str | None = None, target_column: str | None = None) -> Seq2SeqExample:
    """One row as an example; ``where`` starts every error message."""
    src_key = _column(record, source_column, SOURCE_COLUMNS)
    if src_key is None:
        wanted = repr(source_column) if source_column else " or ".join(map(repr, SOURCE_COLUMNS))
        raise DataError(f"{where}: no source text (column {wanted}; columns: {', '.join(map(str, record))})")
    source = _text(record[src_key], where, f"source {src_key!r}")
    references: list[Any] = []
    listed = record.get("references")
    if isinstance(listed, list) and listed:
        references = listed
    elif _numbered(record):
        references = _numbered(record)
    else:
        tgt_key = _column(record, target_column, TARGET_COLUMNS)
        value = record.get(tgt_key) if tgt_key is not None else None
        if value not in (None, "", []):
            references = value if isinstance(value, list) else [value]
    references = [_text(r, where, "target") for r in references]
    if not references and require_target:
        wanted = repr(target_column) if target_column else " or ".join(map(repr, TARGET_COLUMNS))
        raise DataError(f"{where}: no target text (column {wanted}, or a 'references' list)")
    ident = record.get("id")
    return Seq2SeqExample(source, references, str(ident) if ident not in (None, "") else str(line), line)


def read_seq2seq(path: str | Path, split: str = "train", require_targets: bool = True,
                 source_column: str | None = None, target_column: str | None = None) -> list[Seq2SeqExample]:
    """Examples of one split (a file, or a directory's ``<split>`` file)."""
    p = resolve_split(path, split)
    expect = [source_column or SOURCE_COLUMNS[0], target_column or TARGET_COLUMNS[0], *SOURCE_COLUMNS,
              *TARGET_COLUMNS]
    layout = detect_layout(p, None, None, expect)
    examples = [parse_seq2seq(record, f"{p}:{line}", line, require_targets, source_column, target_column)
                for line, record in read_records(p, layout=layout)]
    if not examples:
        raise DataError(f"{p}: no examples (empty data)")
    return examples


def target_ids(tokenizer: SoraTokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """``[CLS] text [SEP]`` (bos, eos) with the text cut to ``max_length`` tokens, whatever template the
    tokenizer's post-processor has."""
    tk = tokenizer.tk
    tk.no_truncation()
    return [[tokenizer.cls_id, *enc.ids[:max_length], tokenizer.sep_id]
            for enc in tk.encode_batch(texts, add_special_tokens=False)]


def encode_seq2seq(examples: Sequence[Seq2SeqExample], source: SoraTokenizer, target: SoraTokenizer,
                   max_source_length: int, max_target_length: int) -> list[dict[str, Any]]:
    """Model inputs per example: source ``ids`` and, when every example has one, its ``target`` ids."""
    rows: list[dict[str, Any]] = [{"ids": ids} for ids in source.encode([ex.source for ex in examples],
                                                                        max_source_length)]
    if examples and all(ex.target is not None for ex in examples):
        for row, ids in zip(rows, target_ids(target, [ex.target for ex in examples], max_target_length),
                            strict=True):
            row["target"] = ids
    return rows


def seq2seq_batch(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Padded source (``input_ids``, ``attention_mask``) and, for labelled rows, ``target_ids`` / ``target_mask``
    (padded with 0: every vocabulary has that id, and the mask keeps it out of attention and the loss)."""
    batch = make_batch(rows, pad_id)
    if "target" in rows[0]:
        t = collate([r["target"] for r in rows], 0)
        batch["target_ids"], batch["target_mask"] = t["input_ids"], t["attention_mask"]
    return batch
