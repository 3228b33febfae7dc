"""Objectives: each is a small module, ``loss = objective(model, batch)``, so they add up: L = Σ α_t L_t.

``OBJECTIVES`` is the registry a recipe's ``objectives: [{name: ...}]`` reads: name → builder
``(cfg, prefix, model) -> nn.Module``; ``model`` is the model about to be trained, as it starts (``distill``
copies it as its frozen teacher). A new objective is one module and one line here.

``adversarial.ADVERSARIAL`` is the registry of adversarial training methods, wrappers around a task objective
(fine-tuning's ``adversarial: {method: ...}``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from sora.config import ObjectiveConfig
from sora.errors import ConfigError
from sora.models.autoencoder import SoraModel
from sora.objectives.adversarial import ADVERSARIAL, build_adversarial
from sora.objectives.distill import Distill
from sora.objectives.reconstruction import Contrastive, MaskedLM, Reconstruction
from sora.objectives.supervised import TaskLoss


def _distill(cfg: ObjectiveConfig, prefix: str, model: SoraModel | None) -> nn.Module:
    if model is None:
        raise ConfigError("objective 'distill' needs the starting model as its teacher (only sora pretrain has one)")
    return Distill(model, cfg.match, cfg.noise, cfg.ratio, prefix)


Builder = Callable[[ObjectiveConfig, str, SoraModel | None], nn.Module]

OBJECTIVES: dict[str, Builder] = {
    "reconstruct": lambda c, prefix, model: Reconstruction(c.noise, c.ratio, prefix),
    "contrastive": lambda c, prefix, model: Contrastive(c.noise, c.ratio, c.temperature, prefix),
    "mlm": lambda c, prefix, model: MaskedLM(c.ratio, prefix),
    "distill": _distill,
}


def build_objective(cfg: ObjectiveConfig, prefix: str = "", model: SoraModel | None = None) -> nn.Module:
    """``prefix``: the batch keys the objective reads (``aux_`` for fine-tuning's auxiliary loss; see
    ``reconstruction._text``). ``model``: the model to be trained, before training (see ``OBJECTIVES``)."""
    try:
        builder = OBJECTIVES[cfg.name]
    except KeyError:
        raise ValueError(f"unknown objective {cfg.name!r}") from None
    return builder(cfg, prefix, model)


__all__ = ["ADVERSARIAL", "OBJECTIVES", "Contrastive", "Distill", "MaskedLM", "Reconstruction", "TaskLoss",
           "build_adversarial", "build_objective"]
