"""Objectives: each is a small module, ``loss = objective(model, batch)``, so they add up: L = Σ α_t L_t."""

from sora.objectives.reconstruction import Contrastive, MaskedLM, Reconstruction, build_objective
from sora.objectives.supervised import TaskLoss

__all__ = ["Contrastive", "MaskedLM", "Reconstruction", "TaskLoss", "build_objective"]
