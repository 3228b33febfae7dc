"""The pretraining recipe: small builders assemble tokenizer, model, objectives and data, then ``fit``."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch

from sora.config import DataConfig, ModelConfig, Recipe, TokenizerConfig
from sora.data import TextSource, token_batches
from sora.errors import ConfigError, DataError
from sora.models.autoencoder import SoraModel
from sora.models.hf_import import build_hf_model, resolve_backbone
from sora.objectives import build_objective
from sora.text.tokenizer import SoraTokenizer, train_tokenizer
from sora.train.distributed import finish, setup, teardown
from sora.train.loop import TrainState, fit


def build_tokenizer(cfg: TokenizerConfig, model_cfg: ModelConfig, corpus: TextSource, out: Path) -> SoraTokenizer:
    """The backbone's tokenizer, a given one, one saved by an earlier run of this recipe, or a new one."""
    if model_cfg.backbone:
        return SoraTokenizer.load(resolve_backbone(model_cfg.backbone))
    if cfg.path:
        return SoraTokenizer.load(cfg.path)
    cached = out / "tokenizer.json"
    if cached.is_file():  # resume, or a DDP rank that is not the one that trained it
        return SoraTokenizer.load(cached)
    tok = train_tokenizer(itertools.islice(corpus, cfg.train_max_texts), cfg.vocab_size, cfg.min_frequency,
                          cfg.lowercase)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    return tok


def build_model(cfg: ModelConfig, tokenizer: SoraTokenizer) -> SoraModel:
    """Native encoder sized to the tokenizer, or a local HF encoder imported into Sora's modules."""
    if cfg.backbone:
        return build_hf_model(cfg.backbone, cfg, tokenizer)
    cfg = cfg.model_copy(update=dict(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                                     cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id, mask_id=tokenizer.mask_id))
    return SoraModel(cfg)


def validation_batches(data: DataConfig, tokenizer: SoraTokenizer) -> list[dict[str, torch.Tensor]]:
    """``data.validation``, else the ``validation`` split beside a train directory, else none."""
    if data.validation:
        source = TextSource(data.validation, data.column, data.format, data.max_validation, split="validation",
                            delimiter=data.delimiter)
    elif data.train and Path(data.train).is_dir():
        try:
            source = TextSource(data.train, data.column, data.format, data.max_validation, split="validation",
                                delimiter=data.delimiter)
        except DataError:
            return []
    else:
        return []
    return list(token_batches(source, tokenizer, data.batch_size, data.max_length, shuffle=False))


def run_pretrain(recipe: Recipe, resume: bool = False) -> dict[str, Any]:
    """Pretrain per ``recipe``; returns a summary (steps, losses, paths)."""
    if not recipe.data.train:
        raise ConfigError("no training data: pass --train PATH or set data.train in the recipe")
    dist = setup(recipe.train.device)
    out = Path(recipe.output)
    try:
        corpus = TextSource(recipe.data.train, recipe.data.column, recipe.data.format, split="train",
                            delimiter=recipe.data.delimiter)
        corpus.check()
        if dist.enabled and not dist.is_main:
            torch.distributed.barrier()  # rank 0 trains the tokenizer first
        tokenizer = build_tokenizer(recipe.tokenizer, recipe.model, corpus, out)
        if dist.enabled and dist.is_main:
            torch.distributed.barrier()
        if dist.is_main and (recipe.model.backbone or recipe.tokenizer.path):  # one trained here has no [UNK]
            tokenizer.warn_unknown(list(itertools.islice(corpus, 2000)), f"{recipe.data.train}")
        torch.manual_seed(recipe.train.seed)  # identical initial weights on every rank
        model = build_model(recipe.model, tokenizer)
        objectives = {f"{o.name}_{o.noise}" if o.name == "reconstruct" else o.name: (o.weight, build_objective(o))
                      for o in recipe.objectives}
        val = validation_batches(recipe.data, tokenizer) if dist.is_main else []
        d = recipe.data

        def batches(epoch: int):
            return token_batches(corpus, tokenizer, d.batch_size, d.max_length, seed=recipe.train.seed,
                                 epoch=epoch, bucket_batches=d.bucket_batches, rank=dist.rank,
                                 world_size=dist.world_size)

        info = {"recipe": recipe.model_dump(), "kind": "pretrain"}
        state: TrainState = fit(model, tokenizer, objectives, batches, recipe.train, out, dist,
                                val_batches=val, info=info, resume=resume)
        finish(dist)
        return {"output": str(out), "steps": state.step, "tokens": state.tokens,
                "elapsed_s": round(state.elapsed_s, 1), "history": state.history, "rank": dist.rank}
    finally:
        teardown()
