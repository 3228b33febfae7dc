"""Recipes: typed configuration (pydantic) read from YAML, with flag overrides on top.

Every stage reads its own section; the whole recipe is saved into each checkpoint so a run can be reproduced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sora.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    train: str | None = None  # a file, or a directory holding train.* / validation.* / test.*
    validation: str | None = None
    column: str = "text"
    format: Literal["jsonl", "csv", "tsv", "txt", "parquet"] | None = None  # default: from the extension
    max_length: int = Field(128, ge=4)
    batch_size: int = Field(32, ge=1)
    bucket_batches: int = Field(50, ge=1)  # batches read ahead and sorted by length
    max_validation: int = Field(1000, ge=1)


class TokenizerConfig(_Strict):
    path: str | None = None  # tokenizer.json or a model directory; None: train one on the corpus
    vocab_size: int = Field(8000, ge=300)
    min_frequency: int = Field(2, ge=1)
    lowercase: bool = False
    train_max_texts: int = Field(500_000, ge=1)


class ModelConfig(_Strict):
    """The denoising autoencoder. ``backbone`` set to a local HF directory replaces the native encoder."""

    backbone: str | None = None
    vocab_size: int = 8000
    dim: int = 256
    layers: int = 4
    heads: int = 4
    ffn_dim: int = 1024
    max_length: int = 512
    type_vocab_size: int = 0  # 2 for BERT-style backbones
    norm: Literal["pre", "post"] = "pre"  # post for BERT-style backbones
    layer_norm_eps: float = 1e-5
    dropout: float = 0.1
    pooling: Literal["mean", "cls"] = "mean"
    code_dim: int | None = 128  # None: the pooled vector is the code
    decoder_layers: int = 2
    decoder_heads: int | None = None  # default: same as the encoder
    output_vocab: Literal["full", "batch"] = "full"  # batch: softmax over the batch's target tokens only
    pad_id: int = 0
    cls_id: int = 2
    sep_id: int = 3
    mask_id: int = 4


class ObjectiveConfig(_Strict):
    name: Literal["reconstruct", "mlm"] = "reconstruct"
    weight: float = Field(1.0, gt=0)
    noise: Literal["none", "delete", "mask", "span", "shuffle"] = "delete"
    ratio: float = Field(0.6, ge=0.0, lt=1.0)


class TrainConfig(_Strict):
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_steps: int = Field(1000, ge=1)
    max_minutes: float | None = None  # wall-clock budget; stops early, checkpoint included
    grad_clip: float = 1.0
    grad_accum: int = Field(1, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    eval_every: int = 200
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 13
    device: str = "auto"
    progress: bool = True


class Recipe(_Strict):
    output: str = "runs/pretrain"
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    objectives: list[ObjectiveConfig] = [ObjectiveConfig()]
    train: TrainConfig = TrainConfig()


def _parse_value(text: str) -> Any:
    """Parse an override value as YAML so ``3``, ``0.5``, ``true`` and ``null`` get their types."""
    return yaml.safe_load(text)


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``train.lr``) in a nested dict; values given as strings are parsed as YAML."""
    for key, value in overrides.items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node = node.setdefault(part, {})
        node[parts[-1]] = _parse_value(value) if isinstance(value, str) else value
    return raw


def load_recipe(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a YAML recipe (or start from defaults) and apply overrides; errors name the bad key."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc.__class__.__name__})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: a recipe must be a mapping of sections")
    raw = apply_overrides(raw, overrides or {})
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ConfigError(f"recipe: {where}: {first['msg']}") from None
