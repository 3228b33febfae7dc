"""Task heads: small modules on the shared encoder, saved beside it.

A head is dropout and one linear layer over what it *reads* from one encoder pass (``EncoderOutput``):

- ``code``: the sentence code (single texts, cross-encoded pairs ``[CLS] a [SEP] b [SEP]``);
- ``siamese``: two codes u, v combined as [u, v, |u - v|, u * v] (Sentence-BERT);
- ``tokens``: every token state (span extraction: start/end logits per token);
- ``entities``: the token states at two marked positions, concatenated (relation extraction, "entity start"
  pooling of Matching-the-Blanks).

What the outputs mean (classes, a value, span ends) is the task kind's business (``sora.tasks``); this module
never looks at a head's kind. Each head's ``HeadSpec`` is stored in the checkpoint's config.json so loading
re-creates the module before the weights.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, model_validator
from torch import nn

from sora.models.autoencoder import EncoderOutput, SoraModel

Reads = Literal["code", "siamese", "tokens", "entities"]


class HeadSpec(BaseModel):
    type: str  # the task kind's name (sora.tasks.KINDS)
    reads: Reads = "code"
    outputs: int = 1
    pair: bool = False
    pair_mode: Literal["cross", "siamese"] = "cross"
    labels: list[str] | None = None
    dropout: float = 0.1
    thresholds: list[float] | None = None  # multilabel, tuned on validation
    metric: str = "accuracy"
    normalize: bool = False  # the head reads L2-normalised codes (siamese: u and v normalised before combining)
    options: dict[str, Any] = {}  # kind-specific settings kept with the head (e.g. span lengths, stride)

    @model_validator(mode="before")
    @classmethod
    def _format_1(cls, raw: Any) -> Any:
        """Checkpoints written before heads recorded ``reads``/``outputs`` (format 1): both follow from the
        rest of the spec (a label set gives one output per label; none, one value)."""
        if isinstance(raw, dict) and "outputs" not in raw:
            raw = dict(raw)
            raw["outputs"] = len(raw.get("labels") or []) or 1
            raw.setdefault("reads", "siamese" if raw.get("pair") and raw.get("pair_mode") == "siamese" else "code")
        return raw

    @property
    def siamese(self) -> bool:
        return self.reads == "siamese"


def input_dim(spec: HeadSpec, model: SoraModel) -> int:
    return {"code": model.code_dim, "siamese": 4 * model.code_dim, "tokens": model.cfg.dim,
            "entities": 2 * model.cfg.dim}[spec.reads]


class Head(nn.Module):
    def __init__(self, spec: HeadSpec, in_dim: int):
        super().__init__()
        self.drop = nn.Dropout(spec.dropout)
        self.out = nn.Linear(in_dim, spec.outputs)
        self.normalize = spec.normalize and spec.reads == "code"  # siamese: done in head_features

    def inputs(self, features: torch.Tensor) -> torch.Tensor:
        """What the linear layer reads (before dropout)."""
        return F.normalize(features, dim=-1) if self.normalize else features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.inputs(features)))


def add_head(model: SoraModel, name: str, spec: HeadSpec) -> None:
    model.heads[name] = Head(spec, input_dim(spec, model))
    model.head_specs[name] = spec


def build_heads(model: SoraModel, config: dict) -> None:
    """Re-create the heads a checkpoint's config lists (used by ``load_checkpoint``)."""
    for name, raw in (config.get("heads") or {}).items():
        add_head(model, name, HeadSpec.model_validate(raw))


def encoder_output(encoder: Any, batch: dict[str, torch.Tensor], states: bool) -> EncoderOutput:
    """One encoder pass over ``batch``. ``encoder`` is a ``SoraModel`` or anything with its ``embed`` (an ONNX
    Runtime encoder): heads that read only the code need nothing more."""
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
    if states or not hasattr(encoder, "embed"):
        return encoder.run(ids, mask, types)
    return EncoderOutput(None, mask, encoder.embed(ids, mask, types))


def head_features(encoder: Any, spec: HeadSpec, batch: dict[str, torch.Tensor],
                  out: EncoderOutput | None = None) -> torch.Tensor:
    """What the head reads. ``out`` lets several heads share one encoder pass."""
    if spec.reads == "siamese":
        u = encoder.embed(batch["input_ids"], batch["attention_mask"])
        v = encoder.embed(batch["b_input_ids"], batch["b_attention_mask"])
        if spec.normalize:
            u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
        return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)
    needs_states = spec.reads in ("tokens", "entities")
    if out is None or (needs_states and out.states is None):
        out = encoder_output(encoder, batch, needs_states)
    if spec.reads == "code":
        return out.code
    states = out.states.float()
    if spec.reads == "tokens":
        return states
    starts = batch["entity_starts"]  # (B, 2): token index of each entity's opening marker
    picked = states.gather(1, starts.unsqueeze(-1).expand(-1, -1, states.shape[-1]))  # (B, 2, dim)
    return picked.flatten(1)


def head_logits(encoder: Any, model: SoraModel, name: str, batch: dict[str, torch.Tensor],
                out: EncoderOutput | None = None) -> torch.Tensor:
    """Head ``name``'s raw outputs: (B, outputs), or (B, T, outputs) for a head reading every token."""
    return model.heads[name](head_features(encoder, model.head_specs[name], batch, out))
