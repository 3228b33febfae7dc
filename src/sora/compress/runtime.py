"""What ``sora.load`` does with a compressed checkpoint: config.json's ``"compression"`` entry says how it runs.

    {"method": "int8", "backend": "torch", ...}                 quantize_dynamic applied at load (CPU)
    {"method": "onnx-int8", "backend": "onnx", "file": "model.int8.onnx", ...}   codes from ONNX Runtime

``backend`` (``sora.load(path, backend=...)``): None follows the checkpoint; "torch" runs the stored PyTorch
weights (int8 still applies: it is a PyTorch model); "onnx" needs an ONNX file in the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sora.errors import CheckpointError, ConfigError
from sora.models.autoencoder import SoraModel

BACKENDS = ("torch", "onnx")


def prepare(model: SoraModel, config: dict[str, Any], path: Path, device: torch.device,
            backend: str | None = None) -> tuple[SoraModel, Any]:
    """(the PyTorch model to use, an ``OnnxEncoder`` or None)."""
    settings = config.get("compression") or {}
    if backend is not None and backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
    chosen = backend or settings.get("backend") or "torch"
    if settings.get("method") == "int8":
        from sora.compress.quantize import apply_int8

        model = apply_int8(model, settings, device)
    if chosen != "onnx":
        return model, None
    file = settings.get("file")
    if not file or not (Path(path) / file).is_file():
        raise CheckpointError(f"{path}: no ONNX model in this checkpoint (make one with "
                              "`sora compress --method onnx` or onnx-int8)")
    from sora.compress.onnx_export import OnnxEncoder

    return model, OnnxEncoder(Path(path) / file)
