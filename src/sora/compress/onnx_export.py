"""ONNX export of the encoder path (token ids → sentence code) and ONNX Runtime int8.

The graph takes ``input_ids`` and ``attention_mask`` (int64, 1 = token; plus ``token_type_ids`` for
BERT-style backbones, which cross-encoded pairs need) with dynamic batch and sequence axes, and returns
``code`` (batch, code_dim) and ``states`` (batch, sequence, dim), the token states that span (QA) and relation
heads read. Every head, pairs included, reads from this graph (a siamese pair runs it once per side); the heads
themselves stay in PyTorch. Export uses the TorchScript exporter at opset 17, which
writes ``F.scaled_dot_product_attention`` out as MatMul/Softmax (checked: max |Δ| ~1e-6 against PyTorch);
should it ever fail, ``attention="math"`` (tried automatically) writes the same attention with plain ops.
The export traces a private copy of the model set up for tracing (no unpadding; the attention chosen), so
the caller's model and the ``sora.models.transformer`` module are never changed, not even for a moment.

int8 (``quantize_onnx``): ``onnxruntime.quantization.quantize_dynamic`` with per-channel int8 weights and
the feed-forward output MatMuls (``ffn/down``) kept fp32. Measured on all-MiniLM-L6-v2: default
per-tensor int8 drifts to mean cosine 0.95 against fp32, this keeps 0.995 at most of the speed.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sora.errors import SoraError, missing
from sora.models.autoencoder import EncoderOutput, SoraModel
from sora.models.transformer import Attention

OPSET = 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class _CodeModule(nn.Module):
    """The encoder path as one module with ONNX-friendly inputs (an int64 mask)."""

    def __init__(self, model: SoraModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.run(input_ids, attention_mask.bool(), token_type_ids)
        return out.code, out.states


def export_onnx(model: SoraModel, path: str | Path, sample: dict[str, torch.Tensor],
                attention: str = "auto") -> str:
    """Write the encoder path of ``model`` to ``path``; returns the attention used (sdpa or math).
    ``sample``: a collated batch (``input_ids``, ``attention_mask``) to trace with."""
    path = Path(path)
    try:
        import onnx  # noqa: F401  (torch.onnx.export writes the graph with it)
    except ImportError as exc:
        raise missing(exc, "ONNX export") from exc
    traced = deepcopy(model).cpu().eval()  # set up for tracing below, while others may be using ``model``
    traced.encoder.unpad = False  # a traced graph must not depend on this sample's padding
    module = _CodeModule(traced)
    ids = sample["input_ids"].cpu()
    args = [ids, sample["attention_mask"].cpu().long()]
    names = list(INPUTS[:2])
    if model.cfg.type_vocab_size:
        args.append(torch.zeros_like(ids))
        names.append(INPUTS[2])
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"code": {0: "batch"},
                                                                 "states": {0: "batch", 1: "sequence"}}
    kinds = ["sdpa", "math"] if attention == "auto" else [attention]
    for i, kind in enumerate(kinds):
        for m in traced.modules():
            if isinstance(m, Attention):
                m.sdpa = kind == "sdpa"
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python branches
                torch.onnx.export(module, tuple(args), str(path), input_names=names, output_names=["code", "states"],
                                  dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)
            return kind
        except Exception:
            if i == len(kinds) - 1:
                raise
    raise AssertionError("unreachable")


def ffn_output_nodes(path: str | Path) -> list[str]:
    """Names of the feed-forward output MatMuls (``…/ffn/down/MatMul``) in an exported graph."""
    try:
        import onnx
    except ImportError as exc:
        raise missing(exc, "ONNX int8 quantization") from exc

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "MatMul" and "/ffn/down/" in n.name]


def quantize_onnx(src: str | Path, dst: str | Path, per_channel: bool = True,
                  keep_fp32: Sequence[str] = ("ffn.down",)) -> list[str]:
    """ORT dynamic int8 of ``src`` into ``dst``; returns the MatMul nodes kept in fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    exclude = ffn_output_nodes(src) if "ffn.down" in keep_fp32 else []
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # ORT logs a suggestion to pre-process the model on every call
    try:
        quantize_dynamic(str(src), str(dst), per_channel=per_channel, weight_type=QuantType.QInt8,
                         nodes_to_exclude=exclude)
    finally:
        logger.setLevel(level)
    return exclude


class OnnxEncoder:
    """An ONNX Runtime session over an exported encoder: ``codes(ids, mask)`` → (batch, code_dim) float32."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _feed(self, ids: np.ndarray, mask: np.ndarray, token_type_ids: np.ndarray | None) -> dict[str, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.asarray(mask).astype(np.int64)}
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = (np.zeros_like(ids) if token_type_ids is None
                                      else np.asarray(token_type_ids, dtype=np.int64))
        return feed

    def codes(self, ids: np.ndarray, mask: np.ndarray, token_type_ids: np.ndarray | None = None) -> np.ndarray:
        return self.session.run(["code"], self._feed(ids, mask, token_type_ids))[0]

    def run(self, ids: torch.Tensor, mask: torch.Tensor, type_ids: torch.Tensor | None = None) -> EncoderOutput:
        """The same call as ``SoraModel.run``: token states and code, for heads that read the tokens."""
        if "states" not in self.output_names:
            raise SoraError(f"{self.path}: this ONNX export has no token states (made before span and relation "
                            "heads); run sora compress again on the uncompressed checkpoint")
        types = None if type_ids is None else type_ids.cpu().numpy()
        code, states = self.session.run(["code", "states"], self._feed(ids.cpu().numpy(), mask.cpu().numpy(), types))
        return EncoderOutput(torch.from_numpy(states).to(ids.device), mask, torch.from_numpy(code).to(ids.device))

    def embed(self, ids: torch.Tensor, mask: torch.Tensor, type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The same call as ``SoraModel.embed``, for code that takes either."""
        types = None if type_ids is None else type_ids.cpu().numpy()
        out = self.codes(ids.cpu().numpy(), mask.cpu().numpy(), types)
        return torch.from_numpy(out).to(ids.device)
