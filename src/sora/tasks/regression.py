"""Regression (a score per text or pair, e.g. relatedness): one output, mean squared error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sora.config import TaskConfig
from sora.data.tasks import Example, TaskData
from sora.errors import DataError
from sora.models.autoencoder import EncoderOutput, SoraModel
from sora.models.heads import HeadSpec, head_logits
from sora.tasks.base import TaskKind


class Regression(TaskKind):
    name = "regression"
    default_metric = "pearson"
    classes = False
    report = "regression"
    headline = ("pearson", "spearman", "mse", "mae", "n")

    def parse_label(self, value: Any, task: TaskConfig, path: Path, line: int) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise DataError(f"{path}:{line}: regression label {value!r} is not a number") from None

    def targets(self, examples: list[Example], labels: list[str] | None) -> torch.Tensor:
        return torch.tensor([float(e.label) for e in examples], dtype=torch.float)

    def class_weights(self, data: TaskData) -> torch.Tensor | None:
        return None

    def per_class(self, data: TaskData) -> float:
        return float(len(data.train))

    def outputs(self, labels: list[str] | None) -> int:
        return 1

    def logits(self, encoder: Any, model: SoraModel, name: str, batch: dict[str, torch.Tensor],
               out: EncoderOutput | None = None) -> torch.Tensor:
        return head_logits(encoder, model, name, batch, out).squeeze(-1)

    def loss(self, model: SoraModel, name: str, batch: dict[str, torch.Tensor],
             objective: Any) -> tuple[torch.Tensor, torch.Tensor]:
        value = self.logits(model, model, name, batch).float()
        return F.mse_loss(value, batch["labels"].float()), value

    def divergence(self, spec: HeadSpec, target: torch.Tensor, logits: torch.Tensor,
                   batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The squared difference of the values (mt-dnn's SMART for regression)."""
        return F.mse_loss(logits.float(), target.float())

    def scores(self, spec: HeadSpec, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def format(self, spec: HeadSpec, s: np.ndarray) -> dict[str, Any]:
        return {"value": float(s)}

    def metrics(self, spec: HeadSpec, scores: np.ndarray, examples: list[Any]) -> dict[str, Any]:
        from sora.metrics.labels import regression_metrics  # the training extra (scipy, scikit-learn)

        return regression_metrics([ex.label for ex in examples], scores.tolist())
