"""Extractive question answering data: SQuAD-format examples, overlapping windows, answer decoding, batches.

Rows are SQuAD-format JSONL, one question each::

    {"id": ..., "title": ..., "context": ..., "question": ...,
     "answers": {"text": ["..."], "answer_start": [char offset, ...]}}

A context longer than the model's window is cut into overlapping windows as Hugging Face's ``run_qa`` does:
each window is ``[CLS] question [SEP] context piece [SEP]`` (the tokenizer's own pair template), consecutive
pieces share ``stride`` tokens, and only the context is cut. Every token keeps its character span in the
context, so a predicted token span maps back to an exact substring of the context, whatever the tokenizer
(WordPiece, or Sora's byte-level BPE where one Chinese character may be several tokens).

Answers are checked against their context when read (a wrong ``answer_start`` silently teaches a wrong span),
and every problem is a ``DataError`` naming ``file:line``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sora.data.batching import collate
from sora.data.readers import detect_layout, read_records, resolve_split
from sora.errors import DataError
from sora.text.tokenizer import SoraTokenizer

NO_ANSWER_SCORE = float("-inf")  # the score of an example without any valid candidate span
# Code points ``str.isspace`` accepts: offsets are trimmed of them (byte-level BPE spans start at the space).
_SPACES = np.array([c for c in range(0x3001) if chr(c).isspace()], dtype=np.uint32)


@dataclass
class QAExample:
    """One question. ``answers``/``starts``: the gold texts and their character offsets in ``context``
    (empty for inference rows); ``line``: where it is in the file, for messages."""

    id: str
    question: str
    context: str
    answers: list[str]
    starts: list[int]
    line: int = 0


@dataclass
class QAFeature:
    """One window of one example, ready for the model.

    ``offsets[i]`` is the ``(start, end)`` character span of token ``i`` in the example's context, None for
    question and special tokens; context tokens are ``ids[context_start:context_end]``. ``start``/``end``
    (inclusive token positions of the first answer) are set by ``qa_features(train=True)``: both 0, the
    first token ([CLS]), when the answer is not wholly inside this window; None without labels.
    """

    ids: list[int]
    types: list[int]
    offsets: list[tuple[int, int] | None]
    example: int
    context_start: int
    context_end: int
    start: int | None = None
    end: int | None = None


# ------------------------------------------------------------------------------------------------- reading


def _text(p: Path, line: int, record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if value is None:
        raise DataError(f"{p}:{line}: no {key} (every row needs a non-empty {key!r})")
    if not isinstance(value, str):
        raise DataError(f"{p}:{line}: {key} is a {type(value).__name__} ({value!r:.40}), not text")
    if not value.strip():
        raise DataError(f"{p}:{line}: empty {key}")
    return value


def _answers(p: Path, line: int, record: dict[str, Any]) -> tuple[list[Any], list[Any]] | None:
    """(texts, starts) from ``{"text": [...], "answer_start": [...]}`` (or a list of such objects, as the
    original SQuAD files; or that JSON in a CSV cell); None when the row has no answers."""
    value = record.get("answers")
    if isinstance(value, str) and value.strip():
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{p}:{line}: answers is not JSON ({value!r:.60})") from None
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, list) and all(isinstance(a, dict) for a in value):
        value = {"text": [a.get("text") for a in value], "answer_start": [a.get("answer_start") for a in value]}
    if not isinstance(value, dict) or "text" not in value or "answer_start" not in value:
        raise DataError(
            f'{p}:{line}: answers must be {{"text": [...], "answer_start": [...]}}, '
            f"got {json.dumps(value, ensure_ascii=False)[:80]}"
        )
    texts, starts = value["text"], value["answer_start"]
    texts = [texts] if isinstance(texts, str) else texts
    starts = [starts] if isinstance(starts, int) else starts
    if not isinstance(texts, list) or not isinstance(starts, list):
        raise DataError(f"{p}:{line}: answers' text and answer_start must be lists")
    if len(texts) != len(starts):
        raise DataError(
            f"{p}:{line}: answers has {len(texts)} text(s) but {len(starts)} answer_start(s); give one start per text"
        )
    return (texts, starts) if texts else None


def _check_answer(p: Path, line: int, context: str, text: Any, start: Any) -> None:
    if not isinstance(text, str) or not text:
        raise DataError(f"{p}:{line}: answer text {text!r} is not a non-empty string")
    if isinstance(start, bool) or not isinstance(start, int):
        raise DataError(f"{p}:{line}: answer_start {start!r} is not an integer (a character offset)")
    if not 0 <= start < len(context) or start + len(text) > len(context):
        raise DataError(
            f"{p}:{line}: answer {text!r:.40} at answer_start {start} lies outside the context "
            f"({len(context)} characters)"
        )
    found = context[start : start + len(text)]
    if found != text:
        elsewhere = context.find(text)
        hint = f"; the text occurs at {elsewhere}" if elsewhere >= 0 else "; the text is not in the context"
        raise DataError(
            f"{p}:{line}: answer {text!r:.40} does not match the context at answer_start {start}: "
            f"context[{start}:{start + len(text)}] is {found!r:.40}{hint}"
        )


def read_qa(path: str | Path, split: str = "train", require_answers: bool = True) -> list[QAExample]:
    """Examples of one split (a file, or a directory's ``<split>`` file), every answer checked against its
    context. Inference rows may omit answers with ``require_answers=False``. A row without an id gets its
    line number as id; a repeated id is an error (predictions are keyed by id)."""
    p = resolve_split(path, split)
    layout = detect_layout(p, None, None, ["question", "context", "answers"])
    examples: list[QAExample] = []
    seen: dict[str, int] = {}
    for line, record in read_records(p, layout=layout):
        question = _text(p, line, record, "question")
        context = _text(p, line, record, "context")
        parsed = _answers(p, line, record)
        if parsed is None and require_answers:
            raise DataError(
                f"{p}:{line}: no answers (training and evaluation rows need "
                '"answers": {"text": [...], "answer_start": [...]})'
            )
        texts, starts = parsed or ([], [])
        for text, start in zip(texts, starts, strict=True):
            _check_answer(p, line, context, text, start)
        qid = str(record["id"]) if record.get("id") not in (None, "") else str(line)
        if qid in seen:
            raise DataError(f"{p}:{line}: id {qid!r} repeats line {seen[qid]}; ids must be unique")
        seen[qid] = line
        examples.append(QAExample(qid, question, context, list(texts), list(starts), line))
    if not examples:
        raise DataError(f"{p}: no examples (empty data)")
    return examples


# ----------------------------------------------------------------------------------------------- windowing


@dataclass(frozen=True)
class _Template:
    """Where the tokenizer's pair template puts its special tokens around question (A) and context (B)."""

    prefix: list[int]
    middle: list[int]
    suffix: list[int]
    type_a: int
    type_b: int
    type_prefix: list[int]
    type_middle: list[int]
    type_suffix: list[int]

    @property
    def specials(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)


def _template(tokenizer: SoraTokenizer) -> _Template:
    """Probe the post-processor with a pair (so a RoBERTa-style ``<s> A </s></s> B </s>`` works as well as
    BERT's); a tokenizer without one gets ``[CLS] A [SEP] B [SEP]``."""
    tk = tokenizer.tk
    a, b = tk.encode("a", add_special_tokens=False), tk.encode("b", add_special_tokens=False)
    pair = tk.post_process(a, b, add_special_tokens=True)
    special = pair.special_tokens_mask
    body = [i for i, s in enumerate(special) if not s]
    if pair.ids[len(pair.ids) - len(b.ids) :] == b.ids and len(pair.ids) == len(a.ids) + len(b.ids):
        cls, sep = tokenizer.cls_id, tokenizer.sep_id  # no post-processor: no special tokens added
        return _Template([cls], [sep], [sep], 0, 1, [0], [0], [1])
    if len(body) != len(a.ids) + len(b.ids):
        raise ValueError("the tokenizer's pair template is not A then B with special tokens around them")
    a_end, b_start = body[len(a.ids) - 1] + 1, body[len(a.ids)]
    b_end = body[-1] + 1
    ids, types = pair.ids, pair.type_ids
    return _Template(
        ids[: body[0]],
        ids[a_end:b_start],
        ids[b_end:],
        types[body[0]],
        types[b_start],
        types[: body[0]],
        types[a_end:b_start],
        types[b_end:],
    )


def _trimmed(context: str, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """Token spans (n, 2) without leading/trailing whitespace: byte-level BPE spans include the space before a
    word, so an answer would come back as " word". A token of whitespace only becomes an empty span."""
    spans = np.array(offsets, dtype=np.int64).reshape(-1, 2)
    if not len(spans):
        return spans
    points = np.frombuffer(context.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    n = len(points)
    space = np.isin(points, _SPACES)
    if not space.any():
        return spans
    index = np.arange(n)
    # next_text[i]: the first non-space position >= i (n if none); text_end[i]: 1 + the last non-space < i.
    next_text = np.append(np.minimum.accumulate(np.where(space, n, index)[::-1])[::-1], n)
    text_end = np.concatenate([[0], np.maximum.accumulate(np.where(space, 0, index + 1))])
    s, e = spans[:, 0], spans[:, 1]
    start = np.minimum(next_text[s], e)
    end = np.maximum(text_end[e], start)
    return np.stack([start, end], axis=1)


def _answer_tokens(spans: np.ndarray, start_char: int, end_char: int) -> tuple[int, int]:
    """Token positions (in the context's tokens, inclusive) of the answer ``[start_char, end_char)``: the first
    token starting exactly at the answer, else the first one ending after its start (a token the answer
    starts inside, as ``run_qa``, or the next one); the last token ending exactly at its end, else the last
    one starting before its end. (-1, -1) if no token overlaps the answer."""
    starts, ends = spans[:, 0], spans[:, 1]
    real = ends > starts
    exact = np.flatnonzero(real & (starts == start_char))
    later = np.flatnonzero(real & (ends > start_char))
    first = exact[0] if len(exact) else (later[0] if len(later) else -1)
    exact = np.flatnonzero(real & (ends == end_char))
    earlier = np.flatnonzero(real & (starts < end_char))
    last = exact[-1] if len(exact) else (earlier[-1] if len(earlier) else -1)
    if first < 0 or last < first:
        return -1, -1
    return int(first), int(last)


def qa_features(
    tokenizer: SoraTokenizer,
    examples: Sequence[QAExample],
    max_length: int = 384,
    stride: int = 128,
    *,
    train: bool,
    max_question_length: int = 64,
) -> list[QAFeature]:
    """Windows over every example's context, in example order.

    Each window is at most ``max_length`` tokens: the question (cut to ``max_question_length`` tokens, and
    to fewer if ``max_length`` would otherwise leave the context no more than ``stride`` tokens), then a piece
    of the context; consecutive pieces overlap by ``stride`` tokens. With ``train`` each feature is labelled
    with the first answer's token positions (0/0 where it is not wholly inside the window), and an example
    without an answer is an error.
    """
    if stride < 0 or max_length < 1:
        raise ValueError(f"max_length {max_length} and stride {stride}: need max_length >= 1, stride >= 0")
    tk = tokenizer.tk
    tk.no_truncation()  # whole texts, whatever max_length the last encode() set; windows are cut here
    layout = _template(tokenizer)
    question_cap = min(max_question_length, max_length - layout.specials - stride - 1)
    if question_cap < 1:
        raise ValueError(
            f"max_length {max_length} leaves no room for a question and more than {stride} "
            f"(stride) context tokens; raise max_length or lower stride"
        )
    questions = tk.encode_batch([ex.question for ex in examples], add_special_tokens=False)
    contexts = tk.encode_batch([ex.context for ex in examples], add_special_tokens=False)
    features: list[QAFeature] = []
    for index, (ex, q, c) in enumerate(zip(examples, questions, contexts, strict=True)):
        q_ids = q.ids[:question_cap]
        spans = _trimmed(ex.context, c.offsets)
        offsets: list[tuple[int, int] | None] = list(map(tuple, spans.tolist()))
        room = max_length - layout.specials - len(q_ids)
        head = layout.prefix + q_ids + layout.middle
        head_types = layout.type_prefix + [layout.type_a] * len(q_ids) + layout.type_middle
        answer = (-1, -1)
        if train:
            if not ex.answers:
                raise DataError(
                    f"line {ex.line} (id {ex.id!r}): no answer to train on; read the data with "
                    "read_qa(require_answers=True)"
                )
            answer = _answer_tokens(spans, ex.starts[0], ex.starts[0] + len(ex.answers[0]))
        n = len(c.ids)
        begin = 0
        while True:
            stop = min(begin + room, n)
            ids = head + c.ids[begin:stop] + layout.suffix
            types = head_types + [layout.type_b] * (stop - begin) + layout.type_suffix
            window: list[tuple[int, int] | None] = [None] * len(head)
            window += offsets[begin:stop]
            window += [None] * len(layout.suffix)
            feature = QAFeature(ids, types, window, index, len(head), len(head) + stop - begin)
            if train:
                inside = begin <= answer[0] and answer[1] < stop
                feature.start = feature.end = 0
                if inside:
                    feature.start, feature.end = answer[0] - begin + len(head), answer[1] - begin + len(head)
            features.append(feature)
            if stop >= n:
                break
            begin = stop - stride
    return features


# -------------------------------------------------------------------------------------------------- decoding


def _logit_rows(logits: Any, features: Sequence[QAFeature], name: str) -> list[np.ndarray]:
    """One float array per feature, cut to its length: from a padded (features, width) array or tensor, or
    a list of per-feature rows."""
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().float().cpu().numpy()
    if len(logits) != len(features):
        raise ValueError(f"{name}: {len(logits)} rows for {len(features)} features")
    rows = []
    for f, row in zip(features, logits, strict=True):
        row = np.asarray(row.detach().float().cpu() if isinstance(row, torch.Tensor) else row, dtype=np.float64)
        if row.shape[0] < len(f.ids):
            raise ValueError(f"{name}: a row of {row.shape[0]} logits for a feature of {len(f.ids)} tokens")
        rows.append(row[: len(f.ids)])
    return rows


def _top(values: np.ndarray, k: int) -> np.ndarray:
    return np.argpartition(-values, k - 1)[:k] if k < len(values) else np.arange(len(values))


def best_answers(
    examples: Sequence[QAExample],
    features: Sequence[QAFeature],
    start_logits: Any,
    end_logits: Any,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> list[dict[str, Any]]:
    """The best answer span of each example, over all of its windows, as ``run_qa`` decodes it.

    In every window the ``n_best`` highest start and end logits among the context tokens are paired; a pair
    counts when end >= start, it is at most ``max_answer_length`` tokens and its text is not empty; its score
    is start logit + end logit. Returns per example ``{"id", "answer", "start", "end", "score",
    "probability"}``: ``answer`` is ``context[start:end]`` (character offsets), ``probability`` the softmax of
    the best score over the example's ``n_best`` best candidates (``run_qa``'s). An example without any valid
    candidate gets ``answer ""``, ``start = end = 0``, ``score = NO_ANSWER_SCORE`` (-inf), probability 0.

    ``start_logits``/``end_logits``: a (features, width) array or tensor (padding beyond a feature's length
    is ignored) or one row per feature.
    """
    starts, ends = _logit_rows(start_logits, features, "start_logits"), _logit_rows(end_logits, features, "end_logits")
    found: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in examples]
    for f, s_row, e_row in zip(features, starts, ends, strict=True):
        lo, hi = f.context_start, f.context_end
        if hi <= lo or max_answer_length < 1:
            continue
        k = min(n_best, hi - lo)
        top_s, top_e = _top(s_row[lo:hi], k) + lo, _top(e_row[lo:hi], k) + lo
        char_s = np.array([f.offsets[i][0] for i in top_s], dtype=np.int64)  # type: ignore[index]
        char_e = np.array([f.offsets[i][1] for i in top_e], dtype=np.int64)  # type: ignore[index]
        length = top_e[None, :] - top_s[:, None] + 1
        valid = (length >= 1) & (length <= max_answer_length) & (char_e[None, :] > char_s[:, None])
        si, ei = np.nonzero(valid)
        if len(si):
            score = s_row[top_s[si]] + e_row[top_e[ei]]
            found[f.example].append((score, char_s[si], char_e[ei]))
    results = []
    for ex, candidates in zip(examples, found, strict=True):
        if not candidates:
            results.append(
                {"id": ex.id, "answer": "", "start": 0, "end": 0, "score": NO_ANSWER_SCORE, "probability": 0.0}
            )
            continue
        score = np.concatenate([c[0] for c in candidates])
        char_s = np.concatenate([c[1] for c in candidates])
        char_e = np.concatenate([c[2] for c in candidates])
        best = _top(score, min(n_best, len(score)))
        i = int(best[np.argmax(score[best])])
        top_scores = score[best]
        probability = float(1.0 / np.exp(top_scores - score[i]).sum())
        s, e = int(char_s[i]), int(char_e[i])
        results.append(
            {
                "id": ex.id,
                "answer": ex.context[s:e],
                "start": s,
                "end": e,
                "score": float(score[i]),
                "probability": probability,
            }
        )
    return results


# --------------------------------------------------------------------------------------------------- batches


def qa_batches(
    features: Sequence[QAFeature], batch_size: int, pad_id: int, with_positions: bool
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches in feature order (shuffle the features to shuffle batches): ``input_ids``,
    ``attention_mask``, ``token_type_ids`` (padding 0), and with ``with_positions`` ``start_positions`` /
    ``end_positions`` (long)."""
    if with_positions and any(f.start is None or f.end is None for f in features):
        raise ValueError("with_positions needs labelled features: qa_features(..., train=True)")
    for i in range(0, len(features), batch_size):
        chunk = features[i : i + batch_size]
        batch = collate([f.ids for f in chunk], pad_id)
        batch["token_type_ids"] = collate([f.types for f in chunk], 0)["input_ids"]
        if with_positions:
            batch["start_positions"] = torch.tensor([f.start for f in chunk], dtype=torch.long)
            batch["end_positions"] = torch.tensor([f.end for f in chunk], dtype=torch.long)
        yield batch
