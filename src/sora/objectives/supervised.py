"""Supervised objective (L_FT): one task head's loss on a labeled batch, as its kind defines it."""

from __future__ import annotations

import torch
from torch import nn

from sora.models.autoencoder import SoraModel
from sora.tasks import kind_of


class TaskLoss(nn.Module):
    """The loss of head ``name`` (``sora.tasks``: cross-entropy + supervised contrastive for classes, BCE for
    multilabel, MSE for regression, span cross-entropy for QA, ...).

    ``prefix`` selects this task's keys when one batch carries several tasks (multi-task, auxiliary).
    """

    def __init__(self, name: str, task_type: str, class_weights: torch.Tensor | None = None, prefix: str = "",
                 contrastive: float = 0.0, temperature: float = 0.1):
        super().__init__()
        self.name, self.kind, self.prefix = name, kind_of(task_type), prefix
        self.contrastive, self.temperature = contrastive, temperature
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, model: SoraModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.prefix:
            batch = {k[len(self.prefix):]: v for k, v in batch.items() if k.startswith(self.prefix)}
        return self.kind.loss(model, self.name, batch, self)[0]
