"""Recipes: typed configuration (pydantic) read from YAML, with flag overrides on top.

Every stage reads its own section; the whole recipe is saved into each checkpoint so a run can be reproduced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from sora.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    train: str | None = None  # a file, or a directory holding train.* / validation.* / test.*
    validation: str | None = None
    column: str = "text"
    format: Literal["jsonl", "csv", "tsv", "txt", "parquet"] | None = None  # default: from the extension
    delimiter: str | None = None  # CSV/TSV/TXT field delimiter (";", "|", tab, ...); default: detected
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
    layer_heads: list[int] | None = None  # heads left in each encoder layer after pruning
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
    """One term of L = Σ α_t L_t (``sora.objectives.OBJECTIVES``). ``distill`` reads the clean text unless
    ``noise`` is set (its ``noise``/``ratio`` default to none/0; the others' to delete/0.6)."""

    name: Literal["reconstruct", "mlm", "contrastive", "distill"] = "reconstruct"
    weight: float = Field(1.0, gt=0)
    noise: Literal["none", "delete", "mask", "span", "shuffle", "crop"] = "delete"  # sora.text.noise.NOISE
    ratio: float = Field(0.6, ge=0.0, lt=1.0)
    temperature: float = Field(0.05, gt=0)  # contrastive only
    # distill only: what of the frozen starting encoder's codes to keep (sora.objectives.distill)
    match: Literal["cosine", "relational", "both"] = "cosine"

    @model_validator(mode="after")
    def _per_objective_defaults(self) -> ObjectiveConfig:
        if self.name == "distill":
            if "noise" not in self.model_fields_set:
                self.noise = "none"
            if "ratio" not in self.model_fields_set:
                self.ratio = 0.0
        return self


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
    eval_every: int = Field(200, ge=0)  # 0: only at the end
    save_every: int = Field(500, ge=0)  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 13
    device: str = "auto"
    progress: bool = True


class GuardConfig(_Strict):
    """The drift guard of ``sora pretrain`` (``train.pretrain.DriftGuard``): at every validation, how far the
    codes of held-out texts have moved from the starting encoder's, logged, used for selection, warned about."""

    # None: on from a pretrained encoder (model.backbone), off from scratch, where only its collapse measures
    # apply (set true to log and warn about them).
    enabled: bool | None = None
    texts: int = Field(1000, ge=20)  # the validation texts, else the first texts of train, up to this many
    k: int = Field(10, ge=1)  # neighbours compared
    # A pretrained start: a checkpoint whose held-out texts keep fewer than this share of their k nearest
    # neighbours (as the starting encoder ranks them) is not selected, and the run warns once.
    min_agreement: float = Field(0.5, ge=0.0, le=1.0)
    # Any start: codes whose effective rank falls below this share of the starting codes' have collapsed.
    min_rank_share: float = Field(0.25, ge=0.0, le=1.0)
    # Any start: uniformity (Wang & Isola, towards 0 as the codes crowd into one direction) below this share of
    # the starting codes' is a collapse too.
    min_uniformity_share: float = Field(0.25, ge=0.0, le=1.0)
    select: bool = True  # pretrained start: model/ = the best validation loss among passing evaluations


# What ``sora pretrain`` trains when it starts from a pretrained encoder (model.backbone set) and the recipe lists
# no objectives: denoising for the domain plus distillation towards the starting encoder, which keeps what it
# knew (bench/adapt.py measured it; recipes/adapt-minilm.yaml spells it out).
ADAPT_OBJECTIVES = (
    {"name": "reconstruct", "noise": "delete", "ratio": 0.6},
    {"name": "distill", "match": "cosine", "weight": 1.0},
)
# ... unless the texts are documents (median length at least DOCUMENT_TOKENS tokens): then two independent crops
# of each text are a query-like and a passage-like view (Contriever's cropping, InfoNCE) beside the same
# distillation. On SciFact's 5,183 abstracts (median 291 tokens): 66.28 nDCG@10 against 61.90 with
# ADAPT_OBJECTIVES and 64.51 for MiniLM as it is, at 1.8x the tokens/s; on sentences (median 12-35 tokens)
# cropping cost SICK 3.3 Spearman points, so sentences keep ADAPT_OBJECTIVES (bench/results/adapt.crop.json).
ADAPT_DOCUMENT_OBJECTIVES = (
    {"name": "distill", "match": "cosine", "weight": 1.0},
    {"name": "contrastive", "noise": "crop", "ratio": 0.1, "temperature": 0.05},
)
DOCUMENT_TOKENS = 128


class Recipe(_Strict):
    output: str = "runs/pretrain"
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    # Default: reconstruction alone from scratch; from a pretrained encoder (model.backbone) ADAPT_OBJECTIVES, or
    # ADAPT_DOCUMENT_OBJECTIVES once the training texts turn out to be documents (``with_adaptation_objectives``).
    objectives: list[ObjectiveConfig] = [ObjectiveConfig()]
    train: TrainConfig = TrainConfig()
    guard: GuardConfig = GuardConfig()
    _adaptation_default: bool = PrivateAttr(False)  # objectives filled in here, not listed by the recipe

    @model_validator(mode="after")
    def _adaptation_defaults(self) -> Recipe:
        """The one place where a pretrained start changes the objectives: only when none are listed."""
        if "objectives" not in self.model_fields_set and self.model.backbone:
            self.objectives = [ObjectiveConfig(**o) for o in ADAPT_OBJECTIVES]
            self._adaptation_default = True
        return self

    @property
    def adapts_by_default(self) -> bool:
        """A pretrained start whose recipe lists no objectives: the adaptation default, fitted to the texts."""
        return self._adaptation_default

    def with_adaptation_objectives(self, median_tokens: float) -> tuple[Recipe, str | None]:
        """The recipe with the adaptation default fitted to its texts' median length in tokens, and what was
        chosen (None: the recipe lists its objectives or starts from scratch)."""
        if not self.adapts_by_default:
            return self, None
        if median_tokens >= DOCUMENT_TOKENS:
            chosen = [ObjectiveConfig(**o) for o in ADAPT_DOCUMENT_OBJECTIVES]
            return self.model_copy(update={"objectives": chosen}), "documents"
        return self, "sentences"


def _parse_value(text: str) -> Any:
    """Parse an override value as YAML so ``3``, ``0.5``, ``true`` and ``null`` get their types."""
    return yaml.safe_load(text)


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``train.lr``, ``tasks.0.data``) in nested dicts/lists; strings are parsed as YAML."""
    for key, value in overrides.items():
        parts = key.split(".")
        node: Any = raw
        for part, nxt in zip(parts[:-1], parts[1:], strict=True):
            child = [] if nxt.isdigit() else {}
            if isinstance(node, list):
                idx = int(part)
                while len(node) <= idx:
                    node.append({})
                node[idx] = node[idx] if isinstance(node[idx], type(child)) else child
                node = node[idx]
            else:
                if part in node and not isinstance(node[part], list | dict):
                    raise ConfigError(f"override {key!r}: {part!r} is not a section")
                node = node.setdefault(part, child)
        last = parts[-1]
        value = _parse_value(value) if isinstance(value, str) else value
        if isinstance(node, list):
            while len(node) <= int(last):
                node.append({})
            node[int(last)] = value
        else:
            node[last] = value
    return raw


def load_recipe(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a YAML recipe (or start from defaults) and apply overrides; errors name the bad key."""
    return _load(Recipe, path, overrides)


def _load(kind: type[BaseModel], path: str | Path | None, overrides: dict[str, Any] | None):
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
        return kind.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ConfigError(f"recipe: {where}: {first['msg']}") from None


# ---- fine-tuning -------------------------------------------------------------------------------------------

class TaskConfig(_Strict):
    """One supervised task: its data, columns, labels and head. ``pair`` tasks read text_a/text_b."""

    name: str = "task"
    type: str = "classification"  # a task kind, sora.tasks.KINDS (checked when the task's data is read)
    data: str | None = None  # a directory with train/validation/test files, or the train file
    validation: str | None = None
    test: str | None = None
    text_column: str = "text"
    text_b_column: str = "text_b"
    inputs: Literal["auto", "single", "pair"] = "auto"  # auto: pairs when the data has text_b_column
    label_column: str = "label"
    delimiter: str | None = None  # CSV/TSV/TXT field delimiter of the task's files; default: detected
    labels: list[str] | None = None  # default: inferred from the training data, sorted
    # siamese: a head on [u, v, |u-v|, u*v] of the two codes; cross: "[CLS] a [SEP] b [SEP]". Siamese won the
    # pair sweeps at 8 labels per class and on full data (bench/results/accuracy.sweep.json).
    pair_mode: Literal["cross", "siamese"] = "siamese"
    labels_per_class: int | None = None  # few-label regime: sample N per class (seeded)
    max_train: int | None = None  # cap the training set (seeded subsample)
    class_weights: bool = False  # inverse-frequency weights against imbalance
    head_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    # The head reads L2-normalised codes. Default (None): yes for an imported or adapted backbone (MiniLM is
    # trained for cosine similarity; with a probe-initialised head the starting point is then exactly "frozen
    # embeddings + logistic regression"), no for a native Sora encoder, whose code norm carries information.
    normalize: bool | None = None
    weight: float = Field(1.0, gt=0)  # α_t when several tasks train together
    contrastive_weight: float = Field(1.0, ge=0)  # + β · supervised contrastive loss (classification, cross pairs)
    temperature: float = Field(0.1, gt=0)
    metric: str | None = None  # model selection: default accuracy / micro_f1 / pearson by type
    label_separator: str = ","  # multilabel: labels given as "a,b" (or a JSON list)
    options: dict[str, Any] = {}  # settings of the task's kind (e.g. qa: stride, max_answer_length), checked by it


class FinetuneConfig(_Strict):
    init: str | None = None  # a Sora checkpoint / run dir, or a local HF encoder (e.g. all-MiniLM-L6-v2)
    # The defaults below are the recipe the accuracy benchmark selected on validation (bench/accuracy.py).
    layer_lr_decay: float = Field(0.8, gt=0, le=1.0)  # lr × decay^(depth from the top) per encoder layer
    head_lr_multiplier: float = Field(10.0, gt=0)
    # How classification heads start: "probe" fits a logistic regression on the initial (frozen) codes, so
    # fine-tuning starts where a linear probe ends (LP-FT); "prototype" uses nearest class means; "zero" none.
    head_init: Literal["probe", "prototype", "zero"] = "probe"
    probe_c: list[float] = [0.01, 0.1, 1.0, 10.0, 100.0]  # inverse regularisation strengths tried on validation
    # After selection, fit the probe again on the fine-tuned codes (SetFit's last step) and keep it where it beats
    # the trained head on validation (8 labels per class, 3 seeds: trec +0.5, ag_news +0.5, sst2 and
    # financial_phrasebank unchanged; bench/results/accuracy.length.json, refit).
    head_refit: bool = True
    gradual_unfreeze: bool = False  # train the head first, then unfreeze one layer from the top per epoch
    # Training length. Unset: chosen from the labelled examples per class (sora.train.finetune.SCHEDULES: few
    # labels get many short epochs, full data one). ``epochs`` or ``max_steps`` set: exactly that.
    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_evaluations: int | None = Field(None, ge=1)  # validations over the run (default: the schedule's, 3)
    patience: int = Field(2, ge=0)  # evaluations without improvement before stopping (0: never stop)
    aux_denoise_weight: float = Field(0.0, ge=0)  # α of the continued denoising loss on unlabeled text
    unlabeled: str | None = None  # unlabeled text for it (default: the tasks' training texts)
    # Continue from a checkpoint with a new head without touching the old ones: the encoder (and embeddings) stay
    # as they are, so the heads already in the checkpoint predict exactly as before.
    freeze_encoder: bool = False
    seed: int = 13


class MultitaskConfig(_Strict):
    """How several tasks train together (more than one entry in ``tasks``): L = Σ_t w_t L_t over the tasks a step
    draws.

    - ``sampler``: which task(s) each step trains (``sora.train.samplers.SAMPLERS``): ``proportional`` (the
      default: p_t ∝ n_t, MT-DNN; the best mix in bench/multitask.py at 64 labels per class), ``all`` (one batch of
      every task each step), ``temperature`` (p_t ∝ n_t^{1/T}, T = 2), ``round_robin``, ``annealed``
      (proportional towards uniform); ``tasks_per_step`` of them per step (not ``all``); ``sampler_options`` e.g.
      ``{temperature: 3}``.
    - ``weighting``: how the drawn tasks' losses combine (``sora.objectives.weighting.WEIGHTINGS``): ``fixed``
      (each task's ``weight``), ``equal``, ``uncertainty`` (learned log-variances, Kendall et al. 2018), ``pcgrad``
      (gradient surgery, Yu et al. 2020); ``weighting_options`` e.g. ``{lr: 0.02}`` for uncertainty's own rate.
    - ``select_on``: model selection (and early stopping) on the mean of the tasks' validation metrics (``mean``),
      one task's (its name), or a weighted mean (``{task: weight}``).
    """

    sampler: str = "proportional"
    tasks_per_step: int = Field(1, ge=1)
    sampler_options: dict[str, float] = {}
    weighting: str = "fixed"
    weighting_options: dict[str, Any] = {}
    select_on: str | dict[str, float] = "mean"


# Fine-tuning defaults differ from pretraining ones; subclasses keep them when a recipe sets only some keys.
class FinetuneData(DataConfig):
    batch_size: int = Field(16, ge=1)
    max_length: int | None = Field(None, ge=4)  # tokens per example; default: the task kinds' (128; QA windows 384)


class FinetuneModel(ModelConfig):  # used when fine-tuning starts from an HF encoder
    code_dim: int | None = None
    output_vocab: Literal["full", "batch"] = "batch"


class FinetuneTrain(TrainConfig):
    lr: float = 2e-4  # with layer_lr_decay 0.8: the top layer at 2e-4, the embeddings at 5e-5
    warmup_steps: int = 0  # 0: finetune.warmup_ratio of the steps
    eval_every: int = Field(0, ge=0)  # 0: once per epoch, at most finetune.max_evaluations times
    save_every: int = Field(0, ge=0)
    max_steps: int = Field(1, ge=1)  # set from finetune.epochs / finetune.max_steps


class AdversarialConfig(_Strict):
    """Adversarial training of every task head: ``method`` wraps each task's loss (``sora.objectives.adversarial
    .ADVERSARIAL``; ``none``: plain fine-tuning; the auxiliary denoising loss is never wrapped). Perturbations are
    on the word embeddings' output at real tokens; an unset key takes the method's default, and a key the method
    does not read is refused:

    - ``fgm`` (Miyato et al.): ``epsilon`` 1.0 (per-example L2); loss = clean + adversarial;
    - ``pgd`` (Madry et al.): ``epsilon`` 1.0, ``steps`` 3, ``adv_lr`` 0.3 (L2 ascent step), random start in the
      ball; loss = clean + adversarial at the last step;
    - ``freelb`` (Zhu et al. 2020, their SST-2 setting): ``steps`` 2, ``adv_lr`` 0.1, ``init_mag`` 0.6 (uniform
      start scaled by init_mag/√(L·d)), ``epsilon`` 0 (the max norm; 0: unbounded); gradients averaged over the
      steps;
    - ``smart`` (Jiang et al. 2020, mt-dnn's defaults but the radius): ``lambda_`` 1.0, ``noise`` 1e-5 (σ of the
      start), ``steps`` 1, ``adv_lr`` 1e-3 (the step size η), ``epsilon`` 0.1 (the radius of the per-token
      ℓ∞-normalised perturbation; mt-dnn's 1 hurt clean and attacked accuracy on MiniLM in bench/robustness.py's
      sweep); loss = clean + λ · symmetric divergence of clean and perturbed predictions (KL for classes,
      Bernoulli KL per label, squared error for a value, KL of QA's start and end);
    - ``examples`` (adversarial examples as data, the seed's X_adv): ``attack`` "word" (a name in ``sora.attack
      .ATTACKS``) run by ``sora.attack`` on the model being trained over a seeded sample of ``pool`` 512 training
      examples, remade every ``every`` steps (0: at the start and after each validation); each step adds the
      loss on a batch of the attacked copies (the strongest perturbation found within the budget, flipped
      or not) to the clean loss. ``attack_options`` go to the attack
      (e.g. ``{lexicon: PATH, max_words: 0.2}``).
    """

    method: str = "none"  # none | a name in sora.objectives.adversarial.ADVERSARIAL
    epsilon: float | None = Field(None, ge=0)
    steps: int | None = Field(None, ge=1)
    adv_lr: float | None = Field(None, gt=0)
    init_mag: float | None = Field(None, ge=0)
    lambda_: float | None = Field(None, ge=0)
    noise: float | None = Field(None, ge=0)
    attack: str | None = None
    every: int | None = Field(None, ge=0)
    pool: int | None = Field(None, ge=1)
    attack_options: dict[str, Any] | None = None


class FinetuneRecipe(_Strict):
    output: str = "runs/finetune"
    data: FinetuneData = FinetuneData()
    finetune: FinetuneConfig = FinetuneConfig()
    tasks: list[TaskConfig] = [TaskConfig()]
    model: FinetuneModel = FinetuneModel()
    objectives: list[ObjectiveConfig] = [ObjectiveConfig()]  # the auxiliary denoising objective
    adversarial: AdversarialConfig = AdversarialConfig()
    multitask: MultitaskConfig = MultitaskConfig()
    train: FinetuneTrain = FinetuneTrain()


def load_finetune_recipe(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> FinetuneRecipe:
    return _load(FinetuneRecipe, path, overrides)
