"""Multi-label classification (tags): one sigmoid per label, a per-label threshold tuned on validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sora.config import TaskConfig
from sora.data.tasks import Example, TaskData
from sora.models.autoencoder import SoraModel
from sora.models.heads import HeadSpec, head_logits
from sora.tasks.base import TaskKind


class Multilabel(TaskKind):
    name = "multilabel"
    default_metric = "micro_f1"
    report = "multilabel"
    headline = ("micro_f1", "macro_f1", "subset_accuracy", "hamming_loss", "n")

    def parse_label(self, value: Any, task: TaskConfig, path: Path, line: int) -> list[str]:
        if isinstance(value, list):
            return [str(x) for x in value]
        text = str(value).strip()
        if text.startswith("["):
            return [str(x) for x in json.loads(text)]
        return [x.strip() for x in text.split(task.label_separator) if x.strip()]

    def targets(self, examples: list[Example], labels: list[str] | None) -> torch.Tensor:
        index = {lb: i for i, lb in enumerate(labels or [])}
        out = torch.zeros(len(examples), len(index))
        for i, e in enumerate(examples):
            for lb in e.label:
                out[i, index[lb]] = 1.0
        return out

    def class_weights(self, data: TaskData) -> torch.Tensor | None:
        """Negatives / positives per label (BCE's ``pos_weight``)."""
        if not data.task.class_weights or not data.labels:
            return None
        pos = self.targets(data.train, data.labels).sum(0).clamp(min=1)
        return (len(data.train) - pos) / pos

    def loss(self, model: SoraModel, name: str, batch: dict[str, torch.Tensor],
             objective: Any) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head_logits(model, model, name, batch).float()
        loss = F.binary_cross_entropy_with_logits(logits, batch["labels"].float(), pos_weight=objective.class_weights)
        return loss, logits

    def divergence(self, spec: HeadSpec, target: torch.Tensor, logits: torch.Tensor,
                   batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Bernoulli KL(target ‖ logits) per label, summed over the labels."""
        t, q = target.float(), logits.float()
        p = torch.sigmoid(t)
        kl = p * (F.logsigmoid(t) - F.logsigmoid(q)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-q))
        return kl.sum(-1).mean()

    def scores(self, spec: HeadSpec, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float())

    def format(self, spec: HeadSpec, s: np.ndarray) -> dict[str, Any]:
        labels = spec.labels or []
        th = spec.thresholds or [0.5] * len(labels)
        return {"labels": [lb for lb, p, t in zip(labels, s, th, strict=True) if p >= t],
                "scores": {lb: round(float(p), 6) for lb, p in zip(labels, s, strict=True)}}

    def metrics(self, spec: HeadSpec, scores: np.ndarray, examples: list[Any]) -> dict[str, Any]:
        from sora.metrics.labels import multilabel_metrics  # the training extra (scikit-learn, scipy)

        y = self.targets(examples, spec.labels).numpy()
        return multilabel_metrics(y, scores, np.array(spec.thresholds or 0.5), spec.labels or [])

    def after_selection(self, spec: HeadSpec, scores: np.ndarray, examples: list[Any]) -> None:
        from sora.metrics.labels import tune_thresholds

        spec.thresholds = [float(t) for t in tune_thresholds(self.targets(examples, spec.labels).numpy(), scores)]
