"""The pretraining recipe: small builders assemble tokenizer, model, objectives and data, then ``fit``.

``DriftGuard`` watches the geometry of the codes while pretraining (see its docstring): it is what keeps a
domain adaptation from silently rewriting what the starting encoder knew.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sora.config import DOCUMENT_TOKENS, DataConfig, GuardConfig, ModelConfig, ObjectiveConfig, Recipe, TokenizerConfig
from sora.data import TextSource, token_batches
from sora.errors import ConfigError, DataError, SoraWarning
from sora.models.autoencoder import SoraModel
from sora.models.checkpoint import save_checkpoint
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


# ---- the drift guard --------------------------------------------------------------------------------------


def knn_agreement(current: torch.Tensor, reference: torch.Tensor, k: int = 10) -> float:
    """Mean share of each row's ``k`` nearest neighbours (cosine, itself excluded) in ``reference`` that are
    among its ``k`` nearest in ``current``: 1.0 when the two rank every neighbourhood alike."""
    n = len(current)
    k = min(k, n - 1)
    if k < 1:
        return 1.0

    def neighbours(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.double(), dim=-1)
        sim = (x @ x.T).fill_diagonal_(-math.inf)
        return sim.topk(k, dim=1).indices

    a, b = neighbours(current), neighbours(reference)
    hits = (a[:, :, None] == b[:, None, :]).any(-1).sum(1)
    return float(hits.double().mean() / k)


def uniformity(codes: torch.Tensor, t: float = 2.0) -> float:
    """Wang & Isola (2020): log E exp(−t‖x−y‖²) over distinct pairs of L2-normalised codes; from −2t (spread
    evenly) up to 0 (every code the same)."""
    x = F.normalize(codes.double(), dim=-1)
    sq = torch.cdist(x, x).pow(2)
    off = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    return float(torch.logsumexp(-t * sq[off], 0) - math.log(int(off.sum())))


def effective_rank(codes: torch.Tensor) -> float:
    """Roy & Vetterli (2007): exp of the entropy of the normalised singular values of the centred codes."""
    x = codes.double() - codes.double().mean(0)
    s = torch.linalg.svdvals(x)
    if float(s.max()) <= 1e-6 * max(float(codes.double().norm()), 1e-12):
        return 0.0  # every code the same (up to rounding): no direction at all
    p = s / s.sum().clamp(min=1e-12)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def embed_batches(model: SoraModel, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The codes of pre-tokenized batches, in eval mode (no dropout), float32 on the CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        return torch.cat([model.embed(b["input_ids"].to(device), b["attention_mask"].to(device)).float().cpu()
                          for b in batches])
    finally:
        model.train(was_training)


class DriftGuard:
    """How far the geometry of the codes has drifted from the starting model's, at every validation.

    On a fixed held-out set (the validation texts, else the first texts of train; geometry needs no labels and
    does not overfit to a slice it trains on, so the training slice is a fair stand-in) it logs
    ``val_knn_agreement`` (the share of each text's k nearest neighbours, as the starting encoder ranks them,
    that the current codes keep), ``val_code_cosine`` (mean cosine of a text's current and starting code),
    ``val_uniformity_share`` (Wang & Isola's uniformity over the starting codes': 1 as spread as they were, 0
    when every text gets the same direction) and ``val_rank_share`` (effective rank over the starting codes').
    All four lie around [0, 1], so they share the validation panel of ``sora evaluate``'s training curves.

    It is on by default when the run starts from a pretrained encoder. From scratch it is opt-in
    (``guard.enabled: true``) and measures collapse only (uniformity, rank): the starting point is a random
    encoder, which pretraining must move away from, so agreement with it means nothing.

    Collapse (any start): the effective rank or the uniformity of the codes falls below ``min_rank_share`` /
    ``min_uniformity_share`` of the start's (uniformity catches what rank cannot: every code pulled into one
    narrow cone, which centring hides). The first evaluation that fails warns (``SoraWarning``, one line).

    Selection, from a pretrained encoder only: ``model/`` is the evaluation with the lowest validation loss (the
    latest, without validation data) among those that pass (agreement ≥ ``min_agreement``, no collapse); when
    none passes, the starting encoder itself (``selected_step`` 0 in ``model/config.json``). From scratch
    ``model/`` stays the last step (the random start is no fallback). The guard's state (best weights, what it
    has seen) is in every checkpoint (``fit(stateful=...)``), so a resumed run selects alike.
    """

    def __init__(self, model: SoraModel, batches: list[dict[str, torch.Tensor]], cfg: GuardConfig,
                 pretrained: bool):
        self.batches, self.cfg, self.pretrained = batches, cfg, pretrained
        self.reference = embed_batches(model, batches)  # the starting model's codes (built fresh, before resume)
        self.start_rank = max(effective_rank(self.reference), 1e-12)
        self.start_uniformity = min(uniformity(self.reference), -1e-12)
        self.seen_step = -1
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_metrics: dict[str, float] = {}
        self.warned = False
        self.seconds = 0.0  # spent measuring, so that a throughput can leave it out

    def measure(self, codes: torch.Tensor) -> dict[str, float]:
        metrics = {}
        if self.pretrained:
            metrics["val_knn_agreement"] = knn_agreement(codes, self.reference, self.cfg.k)
            metrics["val_code_cosine"] = float(F.cosine_similarity(codes.double(), self.reference.double()).mean())
        metrics["val_uniformity_share"] = uniformity(codes) / self.start_uniformity
        metrics["val_rank_share"] = effective_rank(codes) / self.start_rank
        return metrics

    def __call__(self, model: SoraModel) -> dict[str, float]:
        """``fit(evaluate=...)``: the drift metrics, logged beside the validation losses."""
        t0 = time.perf_counter()
        metrics = self.measure(embed_batches(model, self.batches))
        self.seconds += time.perf_counter() - t0
        return metrics

    def failures(self, metrics: dict[str, float]) -> list[str]:
        why = []
        agreement = metrics.get("val_knn_agreement")
        if agreement is not None and agreement < self.cfg.min_agreement:
            why.append(f"held-out texts keep {agreement:.0%} of their {self.cfg.k} nearest neighbours from the "
                       f"starting encoder (guard.min_agreement {self.cfg.min_agreement:.0%})")
        share = metrics["val_rank_share"]
        if share < self.cfg.min_rank_share:
            why.append(f"the codes' effective rank fell to {share:.0%} of the start's (collapse; guard."
                       f"min_rank_share {self.cfg.min_rank_share:.0%})")
        spread = metrics["val_uniformity_share"]
        if spread < self.cfg.min_uniformity_share:
            why.append(f"the codes' uniformity fell to {spread:.0%} of the start's (collapse: every text gets "
                       f"nearly the same direction; guard.min_uniformity_share {self.cfg.min_uniformity_share:.0%})")
        return why

    def on_step(self, state, model: SoraModel) -> None:
        """``fit(on_step=...)``: judge each validation once it is in the history (it holds the losses too)."""
        for record in state.history:
            if record["step"] <= self.seen_step or "val_rank_share" not in record:
                continue
            self.seen_step = record["step"]
            why = self.failures(record)
            if why and not self.warned:
                self.warned = True
                advice = ("lower train.lr or add the distill objective" if self.pretrained
                          else "add the contrastive objective (as recipes/pretrain-scratch.yaml does)")
                warnings.warn(f"drift guard, step {record['step']}: {'; '.join(why)}; {advice}", SoraWarning,
                              stacklevel=2)
            if why or not self.pretrained:  # from scratch: warn only; model/ stays the last step
                continue
            score = record.get("val_loss", -record["step"])  # without validation data: the latest
            if self.best_score is None or score < self.best_score:
                self.best_score, self.best_step = score, record["step"]
                self.best_metrics = {k: v for k, v in record.items() if k.startswith("val_")}
                self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    _STATE = ("seen_step", "best_score", "best_step", "best_state", "best_metrics", "warned")

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self._STATE:
            setattr(self, k, state[k])


def guard_batches(recipe: Recipe, tokenizer: SoraTokenizer, corpus: TextSource,
                  val: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The guard's held-out texts: the validation batches up to ``guard.texts`` texts, else the first texts
    of train, tokenized like them (batches of 64, not shuffled)."""
    n = recipe.guard.texts
    if val:
        out, count = [], 0
        for b in val:
            if count >= n:
                break
            take = min(len(b["input_ids"]), n - count)
            out.append({k: v[:take] for k, v in b.items()})
            count += take
        return out
    texts = list(itertools.islice(corpus, n))
    return list(token_batches(texts, tokenizer, 64, recipe.data.max_length, shuffle=False))


def median_tokens(tokenizer: SoraTokenizer, texts: list[str]) -> float:
    """Median length in tokens (untruncated, specials included) of ``texts``; 0 for none."""
    return float(statistics.median(len(ids) for ids in tokenizer.encode(texts, 1_000_000))) if texts else 0.0


def describe(objective: ObjectiveConfig) -> str:
    """``reconstruct(delete 0.6)``, ``distill``, ``contrastive(crop 0.1)``: how the log names an objective."""
    return objective.name if objective.noise == "none" else f"{objective.name}({objective.noise} {objective.ratio:g})"


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
        sample = list(itertools.islice(corpus, 2000))
        if dist.is_main and (recipe.model.backbone or recipe.tokenizer.path):  # one trained here has no [UNK]
            tokenizer.warn_unknown(sample, f"{recipe.data.train}")
        if recipe.adapts_by_default:  # sentences or documents: every rank measures the same sample
            median = median_tokens(tokenizer, sample)
            recipe, texts_are = recipe.with_adaptation_objectives(median)
            if dist.is_main:
                print(f"adapting on {texts_are} (median {median:.0f} tokens; documents from "
                      f"{DOCUMENT_TOKENS}): {' + '.join(describe(o) for o in recipe.objectives)}", flush=True)
        torch.manual_seed(recipe.train.seed)  # identical initial weights on every rank
        model = build_model(recipe.model, tokenizer)
        objectives = {f"{o.name}_{o.noise}" if o.name == "reconstruct" else o.name:
                      (o.weight, build_objective(o, model=model)) for o in recipe.objectives}
        val = validation_batches(recipe.data, tokenizer) if dist.is_main else []
        d = recipe.data

        def batches(epoch: int):
            return token_batches(corpus, tokenizer, d.batch_size, d.max_length, seed=recipe.train.seed,
                                 epoch=epoch, bucket_batches=d.bucket_batches, rank=dist.rank,
                                 world_size=dist.world_size)

        guard = None
        guarded = recipe.guard.enabled if recipe.guard.enabled is not None else bool(recipe.model.backbone)
        if guarded and dist.is_main:
            guard = DriftGuard(model, guard_batches(recipe, tokenizer, corpus, val), recipe.guard,
                               pretrained=bool(recipe.model.backbone))
        info = {"recipe": recipe.model_dump(), "kind": "pretrain"}
        hooks = {"evaluate": guard, "on_step": guard.on_step, "stateful": {"drift_guard": guard}} if guard else {}
        state: TrainState = fit(model, tokenizer, objectives, batches, recipe.train, out, dist,
                                val_batches=val, info=info, resume=resume, **hooks)
        summary = {"output": str(out), "steps": state.step, "tokens": state.tokens,
                   "elapsed_s": round(state.elapsed_s, 1), "history": state.history, "rank": dist.rank}
        if guard is not None and recipe.guard.select and guard.pretrained and guard.seen_step >= 0:
            if guard.best_state is None:  # no evaluation passed: back to the starting encoder (rebuilt as above)
                torch.manual_seed(recipe.train.seed)
                model.load_state_dict(build_model(recipe.model, tokenizer).state_dict())
                selected, metrics = 0, {}
            else:
                if guard.best_step != state.step:
                    model.load_state_dict(guard.best_state)
                selected, metrics = guard.best_step, guard.best_metrics
            info["metadata"] = {"selected_step": selected, "validation": metrics}
            save_checkpoint(out / "model", model, tokenizer, info)
            summary["selected_step"] = selected
        if guard is not None:
            summary["guard_s"] = round(guard.seconds, 1)
        finish(dist)
        return summary
    finally:
        teardown()
