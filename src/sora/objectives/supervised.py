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

    def own(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This task's keys of ``batch``, unprefixed."""
        if not self.prefix:
            return batch
        return {k[len(self.prefix):]: v for k, v in batch.items() if k.startswith(self.prefix)}

    def loss_and_logits(self, model: SoraModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss and the head's outputs it was computed from (what SMART compares)."""
        return self.kind.loss(model, self.name, self.own(batch), self)

    def divergence(self, model: SoraModel, batch: dict[str, torch.Tensor], target: torch.Tensor,
                   logits: torch.Tensor) -> torch.Tensor:
        """How far ``logits``' predictions are from ``target``'s, as the kind measures it (``TaskKind.divergence``)."""
        return self.kind.divergence(model.head_specs[self.name], target, logits, self.own(batch))

    def forward(self, model: SoraModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_and_logits(model, batch)[0]
