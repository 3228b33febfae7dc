"""Model compression: structured pruning, int8 (PyTorch dynamic or ONNX Runtime), ONNX export, each behind an
accuracy gate on the task's validation split. ``sora.compress.compress(checkpoint, out, method, ...)``.

Imported lazily: ``sora.load`` only needs ``sora.compress.runtime`` (light), never the whole pipeline.
"""

from __future__ import annotations

from typing import Any

METHODS = ("prune", "int8", "onnx", "onnx-int8", "bf16")

__all__ = ["METHODS", "compress"]


def __getattr__(name: str) -> Any:
    if name == "compress":
        from sora.compress.core import compress

        return compress
    raise AttributeError(f"module 'sora.compress' has no attribute {name!r}")
