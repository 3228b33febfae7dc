"""Extractive question answering (SQuAD, CMRC 2018): the answer is a span of the context.

Long contexts are cut into overlapping windows (384 tokens, stride 128 by default); a head on every token state
gives start and end logits; the best valid span over all windows of a question is the answer, returned as the
exact substring of the context with its character offsets (``sora.data.qa``, as Hugging Face's ``run_qa``).
Metrics are the official SQuAD v1.1 exact match and F1, or CMRC 2018's character-level ones for Chinese
(``sora.metrics.squad``; percentages, as the official scripts print).

Task options (``tasks[].options``): ``stride`` (128), ``max_answer_length`` (30 tokens), ``n_best`` (20),
``max_question_length`` (64 tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from sora.config import TaskConfig
from sora.data.qa import QAExample, best_answers, qa_features, read_qa
from sora.data.tasks import TaskData, make_batch
from sora.errors import ConfigError, DataError
from sora.metrics.squad import qa_metrics
from sora.models.autoencoder import SoraModel
from sora.models.heads import HeadSpec, head_logits
from sora.tasks.base import TaskKind
from sora.text.tokenizer import SoraTokenizer


class QAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stride: int = Field(128, ge=1)  # tokens shared by consecutive windows of a long context
    max_answer_length: int = Field(30, ge=1)  # tokens
    n_best: int = Field(20, ge=1)  # start and end candidates per window
    max_question_length: int = Field(64, ge=1)  # tokens of the question kept in every window


class QA(TaskKind):
    name = "qa"
    default_metric = "f1"
    classes = False
    pair_input = True  # (question, context)
    report = "qa"
    answers = True
    input_columns = ("question", "context")
    points = 1.0  # EM and F1 are percentages, as the official scripts print
    headline = ("exact_match", "f1", "n")
    max_length = 384
    epochs = 2.0  # the SQuAD recipe of run_qa's README

    def read_split(self, path: str | Path, task: TaskConfig, split: str, pair: bool | None,
                   require_labels: bool = True) -> tuple[list[QAExample], bool]:
        return read_qa(path, split, require_labels), True

    def texts(self, examples: list[QAExample]) -> list[str]:
        return [t for ex in examples for t in (ex.question, ex.context)]

    def per_class(self, data: TaskData) -> float:
        return float(len(data.train))

    def examples_from(self, inputs: list[Any], spec: HeadSpec) -> list[QAExample]:
        """(question, context) pairs or {"question", "context", "id"?} rows."""
        out = []
        for i, item in enumerate(inputs):
            row = item if isinstance(item, dict) else dict(zip(("question", "context"), item, strict=True))
            question, context = row.get("question"), row.get("context")
            for key, value in (("question", question), ("context", context)):
                # Only "" is refused: a context of blanks is a question without an answer (answer ""), as the
                # server's schema (non-empty strings) has it.
                if not isinstance(value, str) or not value:
                    what = "no" if value is None else "an empty" if isinstance(value, str) else "a non-text"
                    raise DataError(f"question {i}: {what} {key}")
            out.append(QAExample(str(row.get("id", i)), question, context, [], [], i))
        return out

    @staticmethod
    def options(spec_or_task: HeadSpec | TaskConfig) -> QAOptions:
        return TaskKind.parse_options(QAOptions, spec_or_task, "qa")

    def spec(self, task: TaskConfig, data: TaskData, normalize: bool) -> HeadSpec:
        return HeadSpec(type=self.name, reads="tokens", outputs=2, pair=True, dropout=task.head_dropout,
                        metric=task.metric or self.default_metric, options=self.options(task).model_dump())

    def encode(self, examples: list[QAExample], spec: HeadSpec, tokenizer: SoraTokenizer,
               max_length: int) -> list[dict[str, Any]]:
        opt = self.options(spec)
        labelled = bool(examples) and all(ex.answers for ex in examples)
        try:
            features = qa_features(tokenizer, examples, max_length, opt.stride, train=labelled,
                                   max_question_length=opt.max_question_length)
        except ValueError as exc:  # windows that cannot fit: a setting, not the data
            raise ConfigError(f"{exc} (data.max_length / --max-length, tasks[].options.stride)") from None
        return [{"ids": f.ids, "types": f.types, "feature": f} for f in features]

    def training_targets(self, examples: list[QAExample], encoded: list[dict[str, Any]],
                         labels: list[str] | None) -> None:
        return None  # the answer positions travel with each window (collate)

    def collate(self, rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        batch = make_batch(rows, pad_id)
        if rows[0]["feature"].start is not None:
            batch["start_positions"] = torch.tensor([r["feature"].start for r in rows], dtype=torch.long)
            batch["end_positions"] = torch.tensor([r["feature"].end for r in rows], dtype=torch.long)
        return batch

    def span_logits(self, encoder: Any, model: SoraModel, name: str,
                    batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end logits (B, T) each, padding at -1e4 (never a candidate)."""
        logits = head_logits(encoder, model, name, batch).float()
        pad = ~batch["attention_mask"].bool()
        start, end = logits.unbind(-1)
        return start.masked_fill(pad, -1e4), end.masked_fill(pad, -1e4)

    def loss(self, model: SoraModel, name: str, batch: dict[str, torch.Tensor],
             objective: Any) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.span_logits(model, model, name, batch)
        loss = (F.cross_entropy(start, batch["start_positions"]) + F.cross_entropy(end, batch["end_positions"])) / 2
        return loss, torch.stack([start, end], -1)

    def divergence(self, spec: HeadSpec, target: torch.Tensor, logits: torch.Tensor,
                   batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """KL(target ‖ logits) of the start and of the end distributions over each window's real tokens
        (logits (B, T, 2)), averaged over the two and over windows."""
        pad = ~batch["attention_mask"].bool().unsqueeze(-1)
        t = target.float().masked_fill(pad, -1e4).log_softmax(1)
        q = logits.float().masked_fill(pad, -1e4).log_softmax(1)
        return (t.exp() * (t - q)).sum(1).mean()

    def batch_outputs(self, encoder: Any, model: SoraModel, name: str,
                      batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(self.span_logits(encoder, model, name, batch), -1)

    def predict(self, model: SoraModel, tokenizer: SoraTokenizer, name: str, encoded: list[dict[str, Any]],
                batch_size: int = 64, encoder: Any = None) -> list[np.ndarray]:
        """(tokens, 2) start/end logits per window, in order (each window its own length)."""
        out: list[np.ndarray] = [np.zeros((0, 2), dtype=np.float32)] * len(encoded)
        for idx, both in self.batched(model, tokenizer, name, encoded, batch_size, encoder):
            for row, i in enumerate(idx):
                out[i] = both[row, : len(encoded[i]["ids"])]
        return out

    def predictions(self, spec: HeadSpec, scores: list[np.ndarray], examples: list[QAExample],
                    encoded: list[dict[str, Any]]) -> list[dict[str, Any]]:
        opt = self.options(spec)
        features = [r["feature"] for r in encoded]
        found = best_answers(examples, features, [s[:, 0] for s in scores], [s[:, 1] for s in scores],
                             opt.n_best, opt.max_answer_length)
        for a in found:  # a span of blanks (a context of blanks) is no answer
            if not a["answer"].strip():
                a.update(answer="", start=0, end=0)
        return found

    def format(self, spec: HeadSpec, s: dict[str, Any]) -> dict[str, Any]:
        score = s["score"]
        return {"answer": s["answer"], "start": int(s["start"]), "end": int(s["end"]),
                "score": float(s["probability"]), "logit": float(score) if np.isfinite(score) else None}

    def metrics(self, spec: HeadSpec, scores: list[dict[str, Any]], examples: list[QAExample]) -> dict[str, Any]:
        return qa_metrics({ex.id: p["answer"] for ex, p in zip(examples, scores, strict=True)},
                          {ex.id: ex.answers for ex in examples})
