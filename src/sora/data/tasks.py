"""Labeled task data: examples, label sets, few-label sampling and batches.

Labeled sets are small next to unlabeled corpora, so they are read into memory. Bad labels are found
here, before training, with the file and line: a missing label, or a label column of mixed types.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from sora.config import TaskConfig
from sora.data.batching import collate
from sora.data.readers import Layout, detect_layout, read_records, resolve_split
from sora.errors import DataError
from sora.text.tokenizer import SoraTokenizer


@dataclass
class Example:
    text: str
    label: Any  # str (classification), float (regression), list[str] (multilabel), None (unlabeled)
    text_b: str | None = None
    line: int = 0


class LabelRules(Protocol):
    """What reading a task's rows needs from its kind (``sora.tasks.TaskKind``)."""

    pair_input: bool

    def parse_label(self, value: Any, task: TaskConfig, path: Path, line: int) -> Any: ...

    def label_set(self, examples: list[Any], task: TaskConfig) -> list[str] | None: ...

    def read_split(self, path: str | Path, task: TaskConfig, split: str,
                   pair: bool | None) -> tuple[list[Any], bool]: ...


@dataclass
class TaskData:
    task: TaskConfig
    pair: bool
    labels: list[str] | None  # None for regression
    train: list[Example]
    validation: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)


def _label_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list):
        return "list"
    return "text"


def read_examples(path: str | Path, task: TaskConfig, split: str = "train", require_labels: bool = True,
                  pair: bool | None = None, delimiter: str | None = None, *,
                  rules: LabelRules) -> tuple[list[Example], bool]:
    """Examples of one split, and whether they are pairs. Labels are checked line by line (``rules``: the task's
    kind parses them). ``delimiter``
    (default: the task's ``delimiter`` where the recipe has one) splits CSV/TSV/TXT; else it is detected."""
    p = resolve_split(path, split)
    delimiter = delimiter or getattr(task, "delimiter", None)
    layout = detect_layout(p, None, delimiter,
                           [task.text_column, "text_a", task.text_b_column, task.label_column])
    examples: list[Example] = []
    first_kind: tuple[str, int, Any] | None = None
    for line, record in read_records(p, layout=layout):
        if pair is None:
            pair = task.inputs == "pair" or rules.pair_input or (
                task.inputs == "auto" and task.text_b_column in record)
        text_key = "text_a" if pair and "text_a" in record and task.text_column not in record else task.text_column
        for key in (text_key, task.text_b_column) if pair else (text_key,):
            if key not in record:
                raise DataError(f"{p}:{line}: no column {key!r} ({layout.describe(record)})")
            if not isinstance(record[key], str):
                raise DataError(f"{p}:{line}: column {key!r} holds {type(record[key]).__name__}, not text")
        label = record.get(task.label_column)
        if label is None or label == "":
            if require_labels:
                raise DataError(_label_error(p, line, record, task, layout))
        else:
            kind = _label_kind(label)
            if first_kind is None:
                first_kind = (kind, line, label)
            elif kind != first_kind[0]:
                raise DataError(f"{p}:{line}: label {label!r} is a {kind}, but line {first_kind[1]} has a "
                                f"{first_kind[0]} label {first_kind[2]!r}; make the label column one type")
            label = rules.parse_label(label, task, p, line)
        examples.append(Example(record[text_key], label, record[task.text_b_column] if pair else None, line))
    if not examples:
        raise DataError(f"{p}: no examples (empty data)")
    return examples, bool(pair)


def _label_error(p: Path, line: int, record: dict[str, Any], task: TaskConfig, layout: Layout) -> str:
    """Why row ``line`` has no label: plain text has no label column at all, a header without the column is
    the wrong column name (or delimiter), else this one row lacks it."""
    column = task.label_column
    if layout.plain_text:
        return (f"{p}:{line}: no label column {column!r}: a .txt file is read as plain text, one text per line "
                "(for labeled data give it a header line such as 'text,label', or use JSONL/CSV/TSV)")
    if column not in record and layout.kind != "jsonl":  # a header without the column: every row lacks it
        return (f"{p}:{line}: no column {column!r} ({layout.describe(record)}); set the task's label_column "
                "(--label-column)")
    where = "missing" if column not in record else "empty"
    return f"{p}:{line}: {where} label in column {column!r} (remove the row, or fill it in)"


def check_known(examples: list[Example], labels: list[str] | None, where: str) -> None:
    """Labels the model cannot predict would make every metric silently wrong: refuse them."""
    if labels is None:
        return
    known = set(labels)
    unseen = Counter(x for ex in examples for x in (ex.label if isinstance(ex.label, list) else [ex.label])
                     if x is not None and x not in known)
    if unseen:
        listed = ", ".join(f"{k!r} ({v} rows)" for k, v in unseen.most_common(5))
        raise DataError(f"{where}: labels the model never saw in training: {listed}; "
                        "add them to the training data or the task's `labels`, or drop those rows")


def sample_per_class(examples: list[Example], n: int, seed: int) -> list[Example]:
    """``n`` examples of each label (all of a rarer label), chosen with ``seed``; order shuffled."""
    rng = random.Random(seed)
    by_label: dict[str, list[Example]] = {}
    for ex in examples:
        key = ex.label[0] if isinstance(ex.label, list) else ex.label
        by_label.setdefault(str(key), []).append(ex)
    chosen = [ex for key in sorted(by_label) for ex in rng.sample(by_label[key], min(n, len(by_label[key])))]
    rng.shuffle(chosen)
    return chosen


def load_task(task: TaskConfig, seed: int, rules: LabelRules) -> TaskData:
    """Read train/validation/test for a task; sample the few-label regime; check labels."""
    if not task.data:
        raise DataError(f"task {task.name!r}: no data (set tasks[].data to a file or a directory)")
    train, pair = rules.read_split(task.data, task, "train", None)
    labels = rules.label_set(train, task)
    if task.labels_per_class:
        train = sample_per_class(train, task.labels_per_class, seed)
    if task.max_train and len(train) > task.max_train:
        train = random.Random(seed).sample(train, task.max_train)
    check_known(train, labels, f"{task.data} (train)")
    data = TaskData(task, pair, labels, train)
    for split, explicit in (("validation", task.validation), ("test", task.test)):
        source = explicit or (task.data if Path(task.data).is_dir() else None)
        if source is None:
            continue
        try:
            rows, _ = rules.read_split(source, task, split, pair)
        except DataError as exc:
            if explicit or "no " + split not in str(exc):
                raise
            continue
        check_known(rows, labels, f"{resolve_split(source, split)}")
        setattr(data, split, rows)
    return data


def encode_examples(examples: list[Example], pair: bool, mode: str, tokenizer: SoraTokenizer,
                    max_length: int) -> list[dict[str, Any]]:
    """Token ids per example: one sequence, a cross-encoded pair, or two sequences (siamese)."""
    if not pair:
        return [{"ids": ids} for ids in tokenizer.encode([e.text for e in examples], max_length)]
    if mode == "cross":
        enc = tokenizer.encode_pairs([(e.text, e.text_b or "") for e in examples], max_length)
        return [{"ids": ids, "types": types} for ids, types in enc]
    a = tokenizer.encode([e.text for e in examples], max_length)
    b = tokenizer.encode([e.text_b or "" for e in examples], max_length)
    return [{"ids": x, "b_ids": y} for x, y in zip(a, b, strict=True)]


def make_batch(encoded: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    batch = collate([e["ids"] for e in encoded], pad_id)
    if "types" in encoded[0]:
        batch["token_type_ids"] = collate([e["types"] for e in encoded], 0)["input_ids"]
    if "b_ids" in encoded[0]:
        b = collate([e["b_ids"] for e in encoded], pad_id)
        batch["b_input_ids"], batch["b_attention_mask"] = b["input_ids"], b["attention_mask"]
    return batch


def task_batches(encoded: list[dict[str, Any]], targets: torch.Tensor | None, batch_size: int, pad_id: int, *,
                 seed: int = 0,
                 epoch: int = 0, shuffle: bool = True, prefix: str = "",
                 collate_rows: Callable[[list[dict[str, Any]], int], dict[str, torch.Tensor]] = make_batch,
                 length: Callable[[dict[str, Any]], Any] | None = None,
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """Length-bucketed batches over in-memory examples; keys get ``prefix`` (to mix tasks in one batch).
    ``collate_rows`` pads a list of encoded rows into tensors (a kind's own, e.g. with entity positions);
    ``length`` is the sort key of the buckets (default: the input's tokens)."""
    length = length or (lambda row: len(row["ids"]))
    order = list(range(len(encoded)))
    if shuffle:
        rng = random.Random(f"{seed}/{epoch}")
        rng.shuffle(order)
        bucket = batch_size * 50
        order = [i for s in range(0, len(order), bucket) for i in sorted(order[s:s + bucket],
                                                                          key=lambda i: length(encoded[i]))]
        chunks = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        rng.shuffle(chunks)
    else:
        chunks = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    for idx in chunks:
        batch = collate_rows([encoded[i] for i in idx], pad_id)
        if targets is not None:
            batch["labels"] = targets[idx]
        yield {prefix + k: v for k, v in batch.items()}
