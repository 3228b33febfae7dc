"""What ``sora.load`` does with a compressed checkpoint: config.json's ``"compression"`` entry says how it runs.

    {"method": "int8", "backend": "torch", ...}                 quantize_dynamic applied at load (CPU)
    {"method": "onnx-int8", "backend": "onnx", "file": "model.int8.onnx", ...}   codes from ONNX Runtime
    {"method": "bf16", "backend": "torch", "dtype": "bfloat16"}  the encoder (and a seq2seq decoder) in bfloat16

``backend`` (``sora.load(path, backend=...)``): None follows the checkpoint; "torch" runs the stored PyTorch
weights (int8 still applies: it is a PyTorch model); "onnx" needs an ONNX file in the checkpoint.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from sora.compress.quantize import apply_int8
from sora.errors import CheckpointError, ConfigError, SoraWarning
from sora.models.autoencoder import SoraModel

BACKENDS = ("torch", "onnx")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def native(dtype: str, device: torch.device) -> bool:
    """Whether ``device`` computes ``dtype`` matrix products in hardware. Without it (a CPU without AVX-512
    BF16 or AMX) they are emulated, far slower than float32."""
    if dtype == "float32":
        return True
    if device.type == "cuda":
        return dtype == "float16" or torch.cuda.is_bf16_supported()
    flags = {"bfloat16": ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
             "float16": ("_is_amx_fp16_supported",)}[dtype]
    return any(getattr(torch.cpu, f, lambda: False)() for f in flags)


def set_dtype(model: SoraModel, dtype: str, device: torch.device) -> SoraModel:
    """Run the encoder in ``dtype``, and the heads that follow its precision (``precision = "encoder"``: a seq2seq
    head's decoder). Pooling, the code projection and the other heads stay float32: they are small, and the mean
    over tokens keeps float32's precision."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if not native(dtype, device):
        lacks = "bfloat16 support" if device.type == "cuda" else "AVX-512 BF16 / AMX"
        warnings.warn(f"{dtype} is emulated on this {device.type.upper()} (no {lacks}): expect it to run slower "
                      "than float32", SoraWarning, stacklevel=3)
    model.encoder.to(DTYPES[dtype])
    for head in model.encoder_precision_heads().values():
        head.to(DTYPES[dtype])
    return model


def prepare(model: SoraModel, config: dict[str, Any], path: Path, device: torch.device,
            backend: str | None = None, dtype: str | None = None) -> tuple[SoraModel, Any]:
    """(the PyTorch model to use, an ``OnnxEncoder`` or None). ``dtype`` overrides the checkpoint's."""
    settings = config.get("compression") or {}
    if backend is not None and backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
    chosen = backend or settings.get("backend") or "torch"
    dtype = dtype or settings.get("dtype") or "float32"
    if dtype != "float32" and (chosen == "onnx" or settings.get("method") == "int8"):
        raise ConfigError(f"dtype {dtype}: applies to the PyTorch float model, not to "
                          f"{'ONNX Runtime' if chosen == 'onnx' else 'an int8 model'}")
    if settings.get("method") == "int8":
        model = apply_int8(model, settings, device)
    if dtype != "float32":  # weights always load into float32 parameters (a bf16 checkpoint's too)
        model = set_dtype(model, dtype, device)
    if chosen != "onnx":
        return model, None
    file = settings.get("file")
    if not file or not (Path(path) / file).is_file():
        raise CheckpointError(f"{path}: no ONNX model in this checkpoint (make one with "
                              "`sora compress --method onnx` or onnx-int8)")
    from sora.compress.onnx_export import OnnxEncoder

    return model, OnnxEncoder(Path(path) / file)
