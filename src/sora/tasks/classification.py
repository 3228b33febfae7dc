"""Single-label classification (sentiment, topics, intents): softmax over the labels, cross-entropy plus a
supervised contrastive term that shapes the whole code space when labels are few."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sora.models.autoencoder import SoraModel
from sora.models.heads import HeadSpec, head_features
from sora.tasks.base import AttackInput, TaskKind


class Classification(TaskKind):
    name = "classification"
    default_metric = "accuracy"
    probe_init = True
    attack = AttackInput(fields=("text_b", "text"))  # pairs: the second text (the hypothesis, as TextFooler does)
    headline = ("accuracy", "macro_f1", "micro_f1", "weighted_f1", "macro_precision", "macro_recall", "mcc",
                "roc_auc", "ece", "n")

    def loss(self, model: SoraModel, name: str, batch: dict[str, torch.Tensor],
             objective: Any) -> tuple[torch.Tensor, torch.Tensor]:
        spec = model.head_specs[name]
        features = head_features(model, spec, batch)
        logits = model.heads[name](features).float()
        labels = batch["labels"]
        loss = F.cross_entropy(logits, labels, weight=objective.class_weights)
        if objective.contrastive > 0 and not spec.siamese:
            loss = loss + objective.contrastive * supervised_contrastive(features.float(), labels,
                                                                         objective.temperature)
        return loss, logits

    def metrics(self, spec: HeadSpec, scores: np.ndarray, examples: list[Any]) -> dict[str, Any]:
        from sora.metrics.labels import classification_metrics  # the training extra (scikit-learn, scipy)

        labels = spec.labels or []
        return classification_metrics([ex.label for ex in examples], [labels[i] for i in scores.argmax(1)],
                                      scores, labels)

    def report_inputs(self, spec: HeadSpec, scores: np.ndarray, examples: list[Any]) -> dict[str, Any]:
        index = {lb: i for i, lb in enumerate(spec.labels or [])}
        return {"probs": scores, "y_true_idx": np.array([index[ex.label] for ex in examples])}


class Pair(Classification):
    """Sentence pairs with a label (NLI, paraphrase): classification whose input is always two texts."""

    name = "pair"
    pair_input = True


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
