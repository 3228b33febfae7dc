"""Sora: denoising-autoencoder text representations from your own unlabeled text."""

from sora.attack import attack  # after the import of the package sora.attack, so ``sora.attack`` is the function
from sora.errors import SoraError

__version__ = "0.1.0"
__all__ = ["SoraError", "attack", "load", "__version__"]


def load(path, device: str = "cpu", backend: str | None = None, dtype: str | None = None):
    """Load a checkpoint (or a run directory) for inference: ``sora.load(path).embed(texts)``.
    ``backend``: None runs what the checkpoint says (``sora compress``), or "torch" / "onnx". ``dtype``: None
    runs the checkpoint's, or "float32" / "bfloat16" / "float16" for the encoder."""
    from sora.api import load as _load

    return _load(path, device=device, backend=backend, dtype=dtype)
