"""int8 dynamic quantization in PyTorch: int8 weights, activations quantized on the fly per batch.

Packed int8 weights do not round-trip through safetensors, so a checkpoint keeps its fp32 weights and
says ``"compression": {"method": "int8", ...}`` in config.json; ``sora.load`` quantizes at load time
(``torch.ao.quantization.quantize_dynamic``: deterministic, the same int8 model every time).

Only the encoder's ``nn.Linear`` layers are quantized, and those of a head that follows the encoder's precision
(a seq2seq head's decoder, run once per generated token); other task heads and the code projection stay fp32: they
are tiny, and a head sits right on the decision. By default the weights are quantized per output channel
and the feed-forward output layers (``ffn.down``) stay fp32, the same choice as for ONNX Runtime int8:
those layers read the GELU outputs, whose heavy tail one per-batch activation scale serves badly.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sora.errors import CheckpointError
from sora.models.autoencoder import SoraModel

DEFAULT_KEEP_FP32 = ("ffn.down",)


def int8_targets(model: SoraModel, keep_fp32: Sequence[str] = DEFAULT_KEEP_FP32) -> list[str]:
    """Names of the Linear layers that get int8 weights: the encoder's, and those of heads that follow its
    precision (a seq2seq head's decoder; its output projection is the tied embedding matrix and stays float)."""
    roots = ("encoder.", *(f"heads.{name}." for name in model.encoder_precision_heads()))
    return [name for name, module in model.named_modules()
            if name.startswith(roots) and isinstance(module, nn.Linear)
            and not any(name.endswith(k) or f".{k}." in f".{name}." for k in keep_fp32)]


def quantize_int8(model: SoraModel, per_channel: bool = True,
                  keep_fp32: Sequence[str] = DEFAULT_KEEP_FP32) -> SoraModel:
    """A dynamically quantized copy of ``model`` (CPU only; the input is left untouched)."""
    from torch.ao import quantization as tq

    qconfig = tq.per_channel_dynamic_qconfig if per_channel else tq.default_dynamic_qconfig
    spec = {name: qconfig for name in int8_targets(model, keep_fp32)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notice that eager-mode quantization moves to torchao
        quantized = tq.quantize_dynamic(model.cpu().eval(), spec, dtype=torch.qint8, inplace=False)
    return quantized.eval()


def int8_settings(per_channel: bool = True, keep_fp32: Sequence[str] = DEFAULT_KEEP_FP32) -> dict[str, Any]:
    """The ``compression`` entry of config.json for an int8 checkpoint."""
    return {"method": "int8", "backend": "torch", "quantization": "int8-dynamic",
            "per_channel": per_channel, "keep_fp32": list(keep_fp32)}


def apply_int8(model: SoraModel, settings: dict[str, Any], device: torch.device) -> SoraModel:
    if device.type != "cpu":
        raise CheckpointError(f"int8 checkpoints run on the CPU only (asked for {device}); load with device='cpu'")
    return quantize_int8(model, bool(settings.get("per_channel", True)),
                         tuple(settings.get("keep_fp32", DEFAULT_KEEP_FP32)))


def inference_size_mb(model: nn.Module) -> float:
    """Bytes of what inference runs (encoder, code projection, task heads; not the decoder), serialized as
    held in memory: int8 packed weights and their scales for quantized layers, bf16 for a bf16 encoder, fp32
    elsewhere."""
    buf = io.BytesIO()
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith(("decoder.", "from_code."))}
    torch.save(state, buf)
    return buf.tell() / 1e6
