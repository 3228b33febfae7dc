"""Objectives: each is a small module, ``loss = objective(model, batch)``, so they add up: L = Σ α_t L_t."""

from sora.objectives.reconstruction import MaskedLM, Reconstruction, build_objective

__all__ = ["MaskedLM", "Reconstruction", "build_objective"]
