"""Task heads: small modules on the shared encoder, saved beside it.

A head reads the sentence code. Pairs are either cross-encoded (``[CLS] a [SEP] b [SEP]``, one code)
or siamese (two codes u, v combined as [u, v, |u - v|, u * v], as in Sentence-BERT). Each head's
``HeadSpec`` is stored in the checkpoint's config.json so loading re-creates it before the weights.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn

from sora.models.autoencoder import SoraModel


class HeadSpec(BaseModel):
    type: Literal["classification", "multilabel", "pair", "regression"]
    pair: bool = False
    pair_mode: Literal["cross", "siamese"] = "cross"
    labels: list[str] | None = None
    dropout: float = 0.1
    thresholds: list[float] | None = None  # multilabel, tuned on validation
    metric: str = "accuracy"
    normalize: bool = False  # the head reads L2-normalised codes (siamese: u and v normalised before combining)

    @property
    def outputs(self) -> int:
        return 1 if self.type == "regression" else len(self.labels or [])

    @property
    def siamese(self) -> bool:
        return self.pair and self.pair_mode == "siamese"


class Head(nn.Module):
    def __init__(self, spec: HeadSpec, code_dim: int):
        super().__init__()
        self.drop = nn.Dropout(spec.dropout)
        self.out = nn.Linear(code_dim * (4 if spec.siamese else 1), spec.outputs)
        self.normalize = spec.normalize and not spec.siamese  # siamese: done in head_features

    def inputs(self, features: torch.Tensor) -> torch.Tensor:
        """What the linear layer reads (before dropout)."""
        return F.normalize(features, dim=-1) if self.normalize else features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.inputs(features)))


def add_head(model: SoraModel, name: str, spec: HeadSpec) -> None:
    model.heads[name] = Head(spec, model.code_dim)
    model.head_specs[name] = spec


def build_heads(model: SoraModel, config: dict) -> None:
    """Re-create the heads a checkpoint's config lists (used by ``load_checkpoint``)."""
    for name, raw in (config.get("heads") or {}).items():
        add_head(model, name, HeadSpec.model_validate(raw))


def head_features(model: SoraModel, spec: HeadSpec, batch: dict[str, torch.Tensor],
                  code: torch.Tensor | None = None) -> torch.Tensor:
    """What the head reads. ``code`` lets several single-text heads share one encoder pass."""
    if spec.siamese:
        u = model.embed(batch["input_ids"], batch["attention_mask"])
        v = model.embed(batch["b_input_ids"], batch["b_attention_mask"])
        if spec.normalize:
            u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
        return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)
    if code is not None:
        return code
    return model.embed(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))


def task_logits(model: SoraModel, name: str, batch: dict[str, torch.Tensor],
                code: torch.Tensor | None = None) -> torch.Tensor:
    spec = model.head_specs[name]
    logits = model.heads[name](head_features(model, spec, batch, code))
    return logits.squeeze(-1) if spec.type == "regression" else logits


def scores(spec: HeadSpec, logits: torch.Tensor) -> torch.Tensor:
    """Probabilities (softmax / sigmoid) or the regression value."""
    if spec.type == "regression":
        return logits
    if spec.type == "multilabel":
        return torch.sigmoid(logits)
    return torch.softmax(logits.float(), dim=-1)
