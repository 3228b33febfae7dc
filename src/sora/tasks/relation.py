"""Relation extraction (SemEval-2010 Task 8 style): which relation holds between two marked entities.

Rows carry the entities as inline markers or character spans (``sora.data.relation``); the encoder reads them
wrapped in punctuation markers, and the head reads the token states at the two opening markers ("entity start"
pooling, Baldini Soares et al. 2019), not the pooled code. The score is the official one: macro-F1 over the
relations, direction-aware, without Other (``sora.metrics.semeval``; percentages, as the scorer prints).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sora.config import TaskConfig
from sora.data.relation import RelationExample, encode_relations, make_relation_batch, parse_relation, read_relations
from sora.data.tasks import TaskData
from sora.metrics.semeval import semeval_scores
from sora.models.autoencoder import SoraModel
from sora.models.heads import HeadSpec, head_logits
from sora.tasks.base import AttackInput, TaskKind
from sora.text.tokenizer import SoraTokenizer


class Relation(TaskKind):
    name = "relation"
    default_metric = "macro_f1"
    report = "relation"
    headline = ("macro_f1", "accuracy", "micro_f1", "n")
    # A head that starts from nothing on the entity states (no probe initialisation as for the pooled code) needs
    # more than the full-data schedule's one capped epoch: 3 epochs, as the HF Trainer's default.
    epochs = 3.0
    points = 1.0  # the official scorer's percentages
    attack = AttackInput(keep=(("head", "e1"), ("tail", "e2")))  # never inside the entities

    def read_split(self, path: str | Path, task: TaskConfig, split: str, pair: bool | None,
                   require_labels: bool = True) -> tuple[list[RelationExample], bool]:
        return read_relations(path, split, require_labels, text_column=task.text_column,
                              label_column=task.label_column), False

    def texts(self, examples: list[RelationExample]) -> list[str]:
        return [ex.text for ex in examples]

    def examples_from(self, inputs: list[Any], spec: HeadSpec) -> list[RelationExample]:
        """Texts with the entities marked inline (``<e1>…</e1> … <e2>…</e2>``), or rows with spans."""
        return [parse_relation(t if isinstance(t, dict) else {"text": t}, f"input {i}", i, require_labels=False)
                for i, t in enumerate(inputs)]

    def spec(self, task: TaskConfig, data: TaskData, normalize: bool) -> HeadSpec:
        return HeadSpec(type=self.name, reads="entities", outputs=self.outputs(data.labels), labels=data.labels,
                        dropout=task.head_dropout, metric=task.metric or self.default_metric)

    def encode(self, examples: list[RelationExample], spec: HeadSpec, tokenizer: SoraTokenizer,
               max_length: int) -> list[dict[str, Any]]:
        return encode_relations(tokenizer, examples, max_length)

    def collate(self, rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        return make_relation_batch(rows, pad_id)

    def loss(self, model: SoraModel, name: str, batch: dict[str, torch.Tensor],
             objective: Any) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head_logits(model, model, name, batch).float()
        return F.cross_entropy(logits, batch["labels"], weight=objective.class_weights), logits

    def metrics(self, spec: HeadSpec, scores: np.ndarray, examples: list[RelationExample]) -> dict[str, Any]:
        labels = spec.labels or []
        predicted = [labels[i] for i in scores.argmax(1)]
        return semeval_scores([ex.label for ex in examples], predicted)
