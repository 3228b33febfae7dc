"""Supervised objective (L_FT): one task head's loss on a labeled batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sora.models.autoencoder import SoraModel
from sora.models.heads import task_logits


class TaskLoss(nn.Module):
    """Cross-entropy (classification, pairs), BCE (multilabel) or MSE (regression) for head ``name``.

    ``prefix`` selects this task's keys when one batch carries several tasks (multi-task, auxiliary).
    """

    def __init__(self, name: str, task_type: str, class_weights: torch.Tensor | None = None, prefix: str = ""):
        super().__init__()
        self.name, self.type, self.prefix = name, task_type, prefix
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, model: SoraModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.prefix:
            batch = {k[len(self.prefix):]: v for k, v in batch.items() if k.startswith(self.prefix)}
        logits = task_logits(model, self.name, batch).float()
        labels = batch["labels"]
        if self.type == "regression":
            return F.mse_loss(logits, labels.float())
        if self.type == "multilabel":
            return F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=self.class_weights)
        return F.cross_entropy(logits, labels, weight=self.class_weights)
