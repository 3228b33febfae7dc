"""Supervised objective (L_FT): one task head's loss on a labeled batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sora.models.autoencoder import SoraModel
from sora.models.heads import head_features


class TaskLoss(nn.Module):
    """Cross-entropy (classification, pairs), BCE (multilabel) or MSE (regression) for head ``name``.

    ``prefix`` selects this task's keys when one batch carries several tasks (multi-task, auxiliary).
    """

    def __init__(self, name: str, task_type: str, class_weights: torch.Tensor | None = None, prefix: str = "",
                 contrastive: float = 0.0, temperature: float = 0.1):
        super().__init__()
        self.name, self.type, self.prefix = name, task_type, prefix
        self.contrastive, self.temperature = contrastive, temperature
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, model: SoraModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.prefix:
            batch = {k[len(self.prefix):]: v for k, v in batch.items() if k.startswith(self.prefix)}
        spec = model.head_specs[self.name]
        features = head_features(model, spec, batch)
        logits = model.heads[self.name](features).float()
        labels = batch["labels"]
        if self.type == "regression":
            return F.mse_loss(logits.squeeze(-1), labels.float())
        if self.type == "multilabel":
            return F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=self.class_weights)
        loss = F.cross_entropy(logits, labels, weight=self.class_weights)
        if self.contrastive > 0 and not spec.siamese:
            loss = loss + self.contrastive * supervised_contrastive(features.float(), labels, self.temperature)
        return loss


def supervised_contrastive(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon (Khosla et al., 2020; for fine-tuning, Gunel et al., 2021): pull same-label codes together.

    With few labels it shapes the whole code space rather than one hyperplane, which is what SetFit's
    contrastive pairs do, but inside one batch and one loss.
    """
    z = F.normalize(features, dim=-1)
    sim = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    positives = (labels[:, None] == labels[None, :]) & ~eye
    has_pos = positives.any(1)
    if not has_pos.any():
        return features.sum() * 0.0
    log_prob = sim.masked_fill(eye, float("-inf")).log_softmax(dim=1)
    mean_pos = (log_prob.masked_fill(~positives, 0.0).sum(1) / positives.sum(1).clamp(min=1))
    return -mean_pos[has_pos].mean()
