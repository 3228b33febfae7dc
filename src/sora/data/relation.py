"""Relation extraction data: two marked entities in a sentence, and the relation between them.

Input rows come in one of two forms, so both SemEval-style corpora and a user's own annotations load as is:

- inline markers: ``{"text": "... <e1>configuration</e1> of antenna <e2>elements</e2>.", "label": ...}``;
  ``<e1>`` marks the head, ``<e2>`` the tail, in either order in the text;
- character spans over plain text: ``{"text", "label", "head_span": [start, end], "tail_span": [start, end]}``
  (``end`` exclusive).

``head``/``tail`` strings, where a row has them, must equal the marked text: a mismatch means the spans were
computed on another version of the text, which would silently train on the wrong words. Every problem is a
one-line ``DataError`` naming ``file:line``.

**Entity marking.** The encoder sees the entities wrapped in punctuation, ``@ head @`` and ``# tail #``
(``@ * type * head @`` / ``# ^ type ^ tail #`` where a row gives ``head_type``/``tail_type``): the "entity marker
(punct)" and "typed entity marker (punct)" of Zhou & Chen 2021, "An Improved Baseline for Sentence-level Relation
Extraction". The alternative, new special tokens such as ``[E1]``, needs new embedding rows that start random and
must be learned from the labeled set alone — exactly what few labels cannot pay for — and a resized vocabulary in
every exported model. Punctuation reuses tokens every backbone already has (WordPiece and Sora's byte-level BPE
alike), so a MiniLM checkpoint, a Sora checkpoint and its ONNX export work unchanged; Zhou & Chen found the
punctuation markers as good as or better than new tokens. The head of a relation task reads the token states at
the two opening markers (entity-start pooling, as in Matching-the-Blanks); ``encode_relations`` finds them through
the tokenizer's character offsets, never by looking for the marker ids (the sentence may contain ``@`` or ``#``).

**Long texts.** Truncating at ``max_length`` would drop an entity late in a sentence. Instead a window of tokens
that holds both marked entities is kept, with the rest of the budget spent on context around them (cut at word
boundaries). Where the two entities are too far apart for any window, two pieces are joined: the head (whole if it
fits, leaving room for at least the tail's opening marker) and the start of the tail, so both entity starts are
always inside the sequence.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sora.data.batching import collate
from sora.data.readers import detect_layout, read_records, resolve_split
from sora.data.tasks import task_batches
from sora.errors import ConfigError, DataError
from sora.text.tokenizer import SoraTokenizer

HEAD_MARK, TAIL_MARK = "@", "#"  # opening and closing marker of each entity
HEAD_TYPE_MARK, TAIL_TYPE_MARK = "*", "^"  # around an entity type, inside the entity's markers
_TAG = re.compile(r"</?e(\d+)>")
_DIRECTION = re.compile(r"^(.+?)\s*\(\s*(e[12])\s*,\s*(e[12])\s*\)\s*$")

Span = tuple[int, int]


@dataclass
class RelationExample:
    """One sentence with its two entities. ``head``/``tail`` are ``(start, end)`` character spans of ``text``
    (markers removed), ``end`` exclusive; ``label`` is None for unlabeled rows."""

    text: str
    label: str | None
    head: Span
    tail: Span
    line: int = 0
    head_type: str | None = None
    tail_type: str | None = None


def split_direction(label: str) -> tuple[str, str]:
    """``"Cause-Effect(e2,e1)"`` → ``("Cause-Effect", "(e2,e1)")``; a label without a direction → ``(label, "")``.
    The direction comes back normalised (no spaces), so ``"X (e1, e2)"`` and ``"X(e1,e2)"`` agree."""
    m = _DIRECTION.match(label)
    if m is None or m.group(2) == m.group(3):
        return label, ""
    return m.group(1), f"({m.group(2)},{m.group(3)})"


def _strip(text: str, start: int, end: int) -> Span:
    """The span without surrounding whitespace (``<e1> x </e1>`` marks ``x``)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def parse_markers(text: str, where: str) -> tuple[str, Span, Span] | None:
    """``(clean text, head span, tail span)`` from ``<e1>…</e1>`` / ``<e2>…</e2>``, or None without any tag.
    Missing, repeated, unbalanced, nested or overlapping tags are a ``DataError`` starting with ``where``."""
    tags = list(_TAG.finditer(text))
    if not tags:
        return None
    found: dict[str, int] = {}  # "<e1>" → index in the clean text
    order: list[str] = []
    pieces: list[str] = []
    pos = clean_len = 0
    for m in tags:
        tag = m.group(0)
        if m.group(1) not in ("1", "2"):
            raise DataError(f"{where}: unknown entity marker {tag} (only <e1>…</e1> and <e2>…</e2>)")
        if tag in found:
            raise DataError(f"{where}: {tag} appears twice (one <e1>…</e1> and one <e2>…</e2> per row)")
        pieces.append(text[pos : m.start()])
        clean_len += m.start() - pos
        pos = m.end()
        found[tag] = clean_len
        order.append(tag)
    pieces.append(text[pos:])
    clean = "".join(pieces)
    for n in ("1", "2"):
        opening, closing = f"<e{n}>", f"</e{n}>"
        if opening not in found or closing not in found:
            absent = opening if opening not in found else closing
            raise DataError(f"{where}: unbalanced entity markers: no {absent} (expected <e1>…</e1> and <e2>…</e2>)")
        if order.index(closing) < order.index(opening):
            raise DataError(f"{where}: unbalanced entity markers: {closing} comes before {opening}")
    first = order[0][2]  # "1" or "2": the entity that opens first
    second = "2" if first == "1" else "1"
    if order != [f"<e{first}>", f"</e{first}>", f"<e{second}>", f"</e{second}>"]:
        kind = "nested" if order[1:3] == [f"<e{second}>", f"</e{second}>"] else "overlapping"
        raise DataError(f"{where}: {kind} entity markers ({' '.join(order)}); the two entities must not overlap")
    spans = {}
    for n in ("1", "2"):
        start, end = _strip(clean, found[f"<e{n}>"], found[f"</e{n}>"])
        if start == end:
            raise DataError(f"{where}: empty entity <e{n}></e{n}>")
        spans[n] = (start, end)
    return clean, spans["1"], spans["2"]


def _span(value: Any, key: str, text: str, where: str) -> Span:
    """A ``[start, end]`` span (a JSON list, or its text in CSV/TSV), checked against ``text``."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{where}: {key} {value!r} is not a [start, end] list") from None
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise DataError(f"{where}: {key} {value!r:.40} is not a [start, end] pair of integers")
    start, end = value
    if not 0 <= start < end <= len(text):
        if start >= end:
            raise DataError(f"{where}: {key} [{start}, {end}] is empty (end is exclusive and must exceed start)")
        raise DataError(f"{where}: {key} [{start}, {end}] is outside the text (0 to {len(text)} characters)")
    start, end = _strip(text, start, end)
    if start == end:
        raise DataError(f"{where}: {key} {list(value)} covers only whitespace")
    return start, end


def _check_string(record: dict[str, Any], key: str, text: str, span: Span, where: str) -> None:
    given = record.get(key)
    if given is None or given == "":
        return
    marked = text[span[0] : span[1]]
    if str(given).strip() != marked:
        raise DataError(f"{where}: {key} {given!r} does not match the marked text {marked!r}")


def _optional_text(record: dict[str, Any], key: str, where: str) -> str | None:
    value = record.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {key} {value!r:.40} is not a non-empty text")
    return value.strip()


def parse_relation(
    record: dict[str, Any],
    where: str,
    line: int = 0,
    *,
    require_labels: bool = True,
    text_column: str = "text",
    label_column: str = "label",
) -> RelationExample:
    """One row (markers or spans) → ``RelationExample``; ``where`` (``file:line``) starts every error."""
    text = record.get(text_column)
    if text is None:
        raise DataError(f"{where}: no text in column {text_column!r}")
    if not isinstance(text, str):
        raise DataError(f"{where}: column {text_column!r} holds {type(text).__name__}, not text")
    if not text.strip():
        raise DataError(f"{where}: empty text")
    has_spans = any(record.get(k) not in (None, "") for k in ("head_span", "tail_span"))
    marked = parse_markers(text, where)
    if marked is not None:
        if has_spans:
            raise DataError(f"{where}: both entity markers and head_span/tail_span; give one of them")
        text, head, tail = marked
    elif has_spans:
        for key in ("head_span", "tail_span"):
            if record.get(key) in (None, ""):
                raise DataError(f"{where}: {key} is missing (give both head_span and tail_span)")
        head = _span(record["head_span"], "head_span", text, where)
        tail = _span(record["tail_span"], "tail_span", text, where)
        if head[0] < tail[1] and tail[0] < head[1]:
            raise DataError(f"{where}: head_span {list(head)} and tail_span {list(tail)} overlap")
    else:
        raise DataError(
            f"{where}: no entities: mark them in the text (<e1>head</e1> … <e2>tail</e2>) or give "
            "head_span and tail_span ([start, end] character offsets, end exclusive)"
        )
    _check_string(record, "head", text, head, where)
    _check_string(record, "tail", text, tail, where)
    label = record.get(label_column)
    if label is None or label == "":
        if require_labels:
            where_label = "missing" if label_column not in record else "empty"
            raise DataError(f"{where}: {where_label} label in column {label_column!r} (remove the row, or fill it in)")
        label = None
    elif isinstance(label, dict | list):
        raise DataError(f"{where}: label {label!r:.40} is a {type(label).__name__}, not one relation name")
    else:
        label = str(label)
    return RelationExample(
        text,
        label,
        head,
        tail,
        line,
        _optional_text(record, "head_type", where),
        _optional_text(record, "tail_type", where),
    )


def read_relations(
    path: str | Path,
    split: str = "train",
    require_labels: bool = True,
    *,
    text_column: str = "text",
    label_column: str = "label",
) -> list[RelationExample]:
    """All examples of one split (a file, or ``<split>.<ext>`` of a directory), checked row by row."""
    p = resolve_split(path, split)
    layout = detect_layout(p, None, None, [text_column, label_column, "head_span", "tail_span"])
    examples = [
        parse_relation(
            record,
            f"{p}:{line}",
            line,
            require_labels=require_labels,
            text_column=text_column,
            label_column=label_column,
        )
        for line, record in read_records(p, layout=layout)
    ]
    if not examples:
        raise DataError(f"{p}: no examples (empty data)")
    return examples


def _marked(example: RelationExample) -> tuple[str, Span, Span]:
    """The marked text, and the character positions of each entity's opening and closing marker."""
    text = example.text
    entities = sorted(
        [
            (example.head, "head", HEAD_MARK, HEAD_TYPE_MARK, example.head_type),
            (example.tail, "tail", TAIL_MARK, TAIL_TYPE_MARK, example.tail_type),
        ]
    )
    out = ""
    at: dict[str, Span] = {}
    pos = 0
    for (start, end), name, mark_char, type_char, kind in entities:
        out += text[pos:start]
        if out and not out[-1].isspace():
            out += " "  # a marker glued to a word would be merged into its token
        opening = len(out)
        out += mark_char + (f" {type_char} {kind} {type_char}" if kind else "") + f" {text[start:end]} "
        at[name] = (opening, len(out))
        out += mark_char
        pos = end
        if pos < len(text) and not text[pos].isspace():
            out += " "
    out += text[pos:]
    return out, at["head"], at["tail"]


def mark(example: RelationExample) -> tuple[str, int, int]:
    """``(marked text, head's opening-marker position, tail's opening-marker position)``:
    ``"an @ antenna @ of # elements # ."``. The positions are character offsets into the marked text."""
    text, head, tail = _marked(example)
    return text, head[0], tail[0]


def _window(lo: int, hi: int, n: int, budget: int, words: list[int | None]) -> tuple[int, int]:
    """``[a, b)`` of ``n`` content tokens: at most ``budget`` long, holding ``[lo, hi)``, centred on it, and cut
    at word boundaries where the context allows."""
    extra = budget - (hi - lo)
    a = max(0, lo - extra // 2)
    b = min(n, a + budget)
    a = max(0, b - budget)
    while a < lo and a > 0 and words[a] is not None and words[a] == words[a - 1]:
        a += 1
    while b > hi and b < n and words[b] is not None and words[b] == words[b - 1]:
        b -= 1
    return a, b


def _pieces(head: Span, tail: Span, budget: int) -> list[Span]:
    """Two token ranges when no window holds both entities: the head (room left for the tail's start) and the
    start of the tail, in text order; spare budget goes to the context between them."""
    h_len, t_len = head[1] - head[0], tail[1] - tail[0]
    nh = min(h_len, budget - 1)
    nt = min(t_len, budget - nh)
    h, t = [head[0], head[0] + nh], [tail[0], tail[0] + nt]
    first, second = (h, t) if head[0] < tail[0] else (t, h)
    spare = budget - nh - nt  # > 0 only if both are whole; the gap between them is wider than it
    first[1] += spare - spare // 2
    second[0] -= spare // 2
    return [(first[0], first[1]), (second[0], second[1])]


def _crop(body: list[int], words: list[int | None], head: Span, tail: Span, budget: int) -> list[Span]:
    """The token ranges of ``body`` to keep: all of it, one window holding both entities, or two pieces."""
    if len(body) <= budget:
        return [(0, len(body))]
    lo, hi = min(head[0], tail[0]), max(head[1], tail[1])
    if hi - lo <= budget:
        return [_window(lo, hi, len(body), budget, words)]
    return _pieces(head, tail, budget)


def _moved(k: int, pieces: list[Span], offset: int) -> int:
    """Where token ``k`` of the body lands once only ``pieces`` are kept, after ``offset`` leading tokens."""
    for a, b in pieces:
        if a <= k < b:
            return offset + k - a
        offset += b - a
    raise AssertionError(f"token {k} outside the kept pieces {pieces}")  # _window and _pieces keep both starts


def encode_relations(
    tokenizer: SoraTokenizer, examples: list[RelationExample], max_length: int
) -> list[dict[str, Any]]:
    """``{"ids", "e1", "e2"}`` per example: the token ids of the marked text (at most ``max_length``, cropped
    around the entities where longer) and the indices in ``ids`` of the head's and tail's opening markers."""
    marked = [_marked(ex) for ex in examples]
    tokenizer.tk.no_truncation()  # whole texts: cropping below keeps the entities that truncation would drop
    encodings = tokenizer.tk.encode_batch([text for text, _, _ in marked])
    out = []
    for ex, (text, head, tail), enc in zip(examples, marked, encodings, strict=True):
        content = [i for i, special in enumerate(enc.special_tokens_mask) if not special]
        c0, c1 = content[0], content[-1] + 1
        prefix, body, suffix = enc.ids[:c0], enc.ids[c0:c1], enc.ids[c1:]
        budget = max_length - len(prefix) - len(suffix)
        if budget < 2:
            raise ConfigError(f"max_length {max_length} leaves no room for the two entity markers")
        at = []  # body indices of: head opening, head closing, tail opening, tail closing marker
        for char in (*head, *tail):
            index = enc.char_to_token(char)
            if index is None or not c0 <= index < c1:
                raise DataError(
                    f"line {ex.line}: the tokenizer gives no token for the entity marker at character "
                    f"{char} of {text!r:.80}"
                )
            at.append(index - c0)
        pieces = _crop(body, enc.word_ids[c0:c1], (at[0], at[1] + 1), (at[2], at[3] + 1), budget)
        ids = prefix + [i for a, b in pieces for i in body[a:b]] + suffix
        out.append({"ids": ids, "e1": _moved(at[0], pieces, len(prefix)), "e2": _moved(at[2], pieces, len(prefix))})
    return out


def make_relation_batch(encoded: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` (padded per batch) and ``entity_starts`` (B, 2): head's, tail's index."""
    batch = collate([e["ids"] for e in encoded], pad_id)
    batch["entity_starts"] = torch.tensor([[e["e1"], e["e2"]] for e in encoded], dtype=torch.long)
    return batch


def relation_batches(
    encoded: list[dict[str, Any]],
    targets: torch.Tensor | None,
    batch_size: int,
    pad_id: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    prefix: str = "",
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches over in-memory examples, ordered as task batches are (``data.tasks.task_batches``), with the
    entity positions."""
    return task_batches(encoded, targets, batch_size, pad_id, seed=seed, epoch=epoch, shuffle=shuffle, prefix=prefix,
                        collate_rows=make_relation_batch)
