"""Self-supervised objectives on unlabeled text.

- ``Reconstruction(noise="none")`` is L_AE: rebuild the sentence from its clean encoding.
- ``Reconstruction(noise="delete", ratio=0.6)`` is L_SP (TSDAE): rebuild it from a corrupted one.
- ``MaskedLM`` predicts masked tokens from the encoder states (optional, BERT-style).
"""

from __future__ import annotations

import torch
from torch import nn

from sora.config import ObjectiveConfig
from sora.models.autoencoder import SoraModel
from sora.text.noise import NOISE


def _specials(model: SoraModel, device: torch.device) -> torch.Tensor:
    c = model.cfg
    return torch.tensor([c.pad_id, c.cls_id, c.sep_id, c.mask_id], device=device)


class Reconstruction(nn.Module):
    """``prefix`` picks the batch's keys: ``aux_`` reads the unlabeled part of a fine-tuning batch."""

    def __init__(self, noise: str = "delete", ratio: float = 0.6, prefix: str = ""):
        super().__init__()
        self.noise, self.ratio, self.prefix = NOISE[noise], ratio, prefix

    def forward(self, model: SoraModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = batch[self.prefix + "input_ids"], batch[self.prefix + "attention_mask"]
        noisy, noisy_mask = self.noise(ids, mask, self.ratio, _specials(model, ids.device), model.cfg.mask_id)
        code = model.embed(noisy, noisy_mask)
        return model.reconstruction_loss(code, ids, mask)


class MaskedLM(nn.Module):
    def __init__(self, ratio: float = 0.15):
        super().__init__()
        self.ratio = ratio

    def forward(self, model: SoraModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        masked, _ = NOISE["mask"](ids, mask, self.ratio, _specials(model, ids.device), model.cfg.mask_id)
        labels = ids.masked_fill(masked.eq(ids), -100)
        if not labels.ne(-100).any():  # nothing masked in a tiny batch: nothing to learn
            return model.encoder.embeddings.word.weight.sum() * 0.0
        return model.mlm_loss(masked, mask, labels)


def build_objective(cfg: ObjectiveConfig, prefix: str = "") -> nn.Module:
    if cfg.name == "reconstruct":
        return Reconstruction(cfg.noise, cfg.ratio, prefix)
    if cfg.name == "mlm":
        return MaskedLM(cfg.ratio)
    raise ValueError(f"unknown objective {cfg.name!r}")
