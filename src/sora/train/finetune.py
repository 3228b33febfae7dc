"""The fine-tuning recipe: a Sora checkpoint or a local HF encoder, plus task heads, trained on labels.

Model selection is on the validation metric: the best weights are kept in memory and restored at the
end (early stopping after ``patience`` evaluations without improvement). Optional extras: layer-wise
learning rates, gradual unfreezing, class weights, few-label sampling and a continued denoising loss
on unlabeled text (α = ``aux_denoise_weight``) so the encoder keeps its domain knowledge.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sora.errors import missing

try:  # model selection scores with sora.metrics.labels
    import scipy  # noqa: F401
    import sklearn  # noqa: F401
except ImportError as exc:
    raise missing(exc, "fine-tuning") from exc

from sora.config import FinetuneRecipe, TaskConfig
from sora.data import TextSource, token_batches
from sora.data.tasks import TaskData
from sora.errors import ConfigError, SoraWarning
from sora.models.autoencoder import SoraModel
from sora.models.checkpoint import is_sora_checkpoint, load_checkpoint, save_checkpoint
from sora.models.heads import HeadSpec, add_head, head_features
from sora.objectives import TaskLoss, build_adversarial, build_objective
from sora.objectives.adversarial import Adversarial
from sora.objectives.weighting import build_weighting
from sora.tasks import kind_of, scalar_metrics
from sora.text.tokenizer import SoraTokenizer
from sora.train.adversarial_data import ExamplePool
from sora.train.distributed import finish, setup, teardown
from sora.train.loop import TrainState, fit
from sora.train.multitask import TaskMixer, TaskStream, steps_per_epoch
from sora.train.pretrain import build_model
from sora.train.samplers import build_sampler


def init_model(init: str | None, recipe: FinetuneRecipe) -> tuple[SoraModel, SoraTokenizer, dict[str, Any]]:
    """A Sora checkpoint (its heads kept), or an HF encoder directory / the MiniLM alias."""
    if not init:
        raise ConfigError("nothing to fine-tune: pass --init CHECKPOINT (or a local HF encoder, e.g. all-MiniLM-L6-v2)")
    if is_sora_checkpoint(init):
        return load_checkpoint(init)
    from sora.models.hf_import import resolve_backbone

    tokenizer = SoraTokenizer.load(resolve_backbone(init))
    model = build_model(recipe.model.model_copy(update={"backbone": init}), tokenizer)
    return model, tokenizer, {}


def head_spec(task: TaskConfig, data: TaskData, backbone: bool = False) -> HeadSpec:
    """The head ``task``'s kind builds; codes are L2-normalised by default for an imported or adapted backbone."""
    return kind_of(task).spec(task, data, task.normalize if task.normalize is not None else backbone)


@torch.no_grad()
def _features(model: SoraModel, tokenizer: SoraTokenizer, name: str, examples, data: TaskData,
              max_length: int) -> torch.Tensor:
    """What head ``name``'s linear layer reads for ``examples``: the (normalised) codes, or [u, v, |u-v|, u*v]
    for a siamese pair head."""
    from sora.data.tasks import make_batch

    spec, head = model.head_specs[name], model.heads[name]
    enc = kind_of(spec).encode(examples, spec, tokenizer, max_length)
    return torch.cat([head.inputs(head_features(model, spec, make_batch(enc[i:i + 64], tokenizer.pad_id)))
                      for i in range(0, len(enc), 64)])


# Per-dimension spreads below this fraction of the codes' RMS magnitude are treated as noise, not signal.
SPREAD_FLOOR = 0.1
COLLAPSED = 0.05  # collapse_ratio below this: warn (all-MiniLM-L6-v2 codes: about 0.8)


def probe_scale(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and shrunk spread per dimension for standardising the probe's features.

    Plain standardisation divides by each dimension's spread. On a near-collapsed code (a weak checkpoint:
    codes varying by 0.5% of their norm) that multiplies the folded head's weights by hundreds, and any
    perturbation of the code (bf16, int8, a typo) flips its predictions. Shrinking each spread towards a floor
    proportional to the codes' overall magnitude, sqrt(sd² + (0.1 · rms)²), bounds that gain; on healthy codes
    (spread ≈ magnitude) it changes the spreads by about half a percent.
    """
    mu, sd = x.mean(0), x.std(0)
    floor = SPREAD_FLOOR * x.pow(2).mean().sqrt()
    return mu, (sd.pow(2) + floor.pow(2)).sqrt().clamp(min=1e-12)


def collapse_ratio(x: torch.Tensor) -> float:
    """How much the codes vary across texts relative to their magnitude (about 1 for healthy codes)."""
    return float(x.std(0).pow(2).sum().sqrt() / x.pow(2).sum(1).mean().sqrt().clamp(min=1e-12))


@torch.no_grad()
def init_head(model: SoraModel, tokenizer: SoraTokenizer, name: str, data: TaskData, max_length: int,
              how: str, c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)) -> dict[str, float]:
    """Start a classification head from the initial codes instead of from noise.

    With 8 labels per class a head starting at random barely moves in a few dozen steps, and its early
    gradients push the encoder around at random. ``prototype``: the nearest-class-mean rule,
    logit_c = a (mu_c - m)·(x - m) - a/2 ||mu_c - m||^2 with m the mean code and a scaled so typical logit gaps
    are about one. ``probe``: a logistic regression on the standardised codes, C picked on validation (LP-FT,
    Kumar et al. 2022), folded back into the head's weights. Returns what was chosen.
    """
    spec = model.head_specs[name]
    kind = kind_of(spec)
    if how == "zero" or not kind.probe_init:
        return {}
    was = model.training
    model.eval()
    x = _features(model, tokenizer, name, data.train, data, max_length)
    ratio = collapse_ratio(x)
    if ratio < COLLAPSED:
        warnings.warn(f"task {name!r}: the starting model's codes barely differ between texts (spread "
                      f"{ratio:.1%} of their norm): the checkpoint looks collapsed, so its head starts weak; "
                      "pretrain longer or with the contrastive objective", SoraWarning, stacklevel=2)
    y = kind.targets(data.train, spec.labels)
    n_labels = len(spec.labels or [])
    head = model.heads[name].out
    info: dict[str, float] = {}
    if how == "prototype" or len(set(y.tolist())) < 2:
        m = x.mean(0)
        mus = torch.stack([x[y == c].mean(0) if (y == c).any() else m for c in range(n_labels)])
        # The same floor as the probe's: on near-collapsed codes the class means are close and ``a`` explodes.
        floor = (SPREAD_FLOOR * x.pow(2).mean().sqrt()) ** 2 * x.shape[1]
        a = 2.0 / (((x - mus[y]) ** 2).sum(1).mean() + floor).clamp(min=1e-12)
        head.weight.copy_(a * (mus - m))
        head.bias.copy_(-a * ((mus - m) * m).sum(1) - 0.5 * a * ((mus - m) ** 2).sum(1))
    else:
        from sklearn.linear_model import LogisticRegression

        mu, sd = probe_scale(x)
        xs = ((x - mu) / sd).numpy()
        xv = yv = None
        if data.validation:
            xv = ((_features(model, tokenizer, name, data.validation, data, max_length) - mu) / sd).numpy()
            yv = kind.targets(data.validation, spec.labels).numpy()
        best = None
        for c in c_grid if xv is not None else (0.1,):
            clf = LogisticRegression(C=c, max_iter=2000).fit(xs, y.numpy())
            acc = float((clf.predict(xv) == yv).mean()) if xv is not None else 0.0
            if best is None or acc > best[0]:
                best = (acc, c, clf)
        acc, c, clf = best
        coef, bias = torch.as_tensor(clf.coef_, dtype=torch.float), torch.as_tensor(clf.intercept_, dtype=torch.float)
        if len(clf.classes_) == 2:  # sklearn keeps one row (class 1 vs 0): split it symmetrically
            coef, bias = torch.stack([-coef[0] / 2, coef[0] / 2]), torch.stack([-bias[0] / 2, bias[0] / 2])
        w = torch.zeros(n_labels, x.shape[1])
        b = torch.full((n_labels,), -10.0)  # classes absent from the training sample: never predicted at first
        rows = torch.as_tensor(clf.classes_, dtype=torch.long)
        w[rows], b[rows] = coef / sd, bias - (coef / sd) @ mu
        head.weight.copy_(w.to(head.weight))
        head.bias.copy_(b.to(head.bias))
        info = {"probe_C": c, "probe_val_accuracy": acc}
    model.train(was)
    return info


@torch.no_grad()
def refit_head(model: SoraModel, tokenizer: SoraTokenizer, selector: Selector, name: str, data: TaskData,
               max_length: int, c_grid: tuple[float, ...]) -> dict[str, Any] | None:
    """SetFit's last step on top of Sora's: a logistic regression fitted again on the *fine-tuned* codes, kept only
    where it beats the trained head on validation. Returns what was compared (None: the kind has no probe)."""
    spec = model.head_specs[name]
    kind = kind_of(spec)
    if not kind.probe_init:
        return None
    before = selector.best_tasks[name][spec.metric]
    head = model.heads[name].out
    trained = {k: v.detach().clone() for k, v in head.state_dict().items()}
    init_head(model, tokenizer, name, data, max_length, "probe", c_grid)
    was = model.training
    model.eval()
    metrics = scalar_metrics(kind.metrics(spec, selector.predictions(model, name), data.validation))
    model.train(was)
    kept = metrics[spec.metric] > before
    if kept:
        selector.replace_best(name, metrics)
    else:
        head.load_state_dict(trained)
    return {"trained": before, "refit": metrics[spec.metric], "kept": kept}


@dataclass(frozen=True)
class Schedule:
    """How long fine-tuning runs when the recipe sets neither ``epochs`` nor ``max_steps``."""

    name: str
    up_to_per_class: float  # applies while labelled examples per class are at most this
    epochs: float
    min_steps: int
    max_steps: int
    evaluations: int


# The budgets the accuracy benchmark measured the default recipe with (bench/accuracy.py, CPU). With 8 labels
# per class an epoch is 1-3 steps: up to 120 steps, validated every 10 and ended by ``finetune.patience`` (2
# validations without a gain), so the length follows the data — trec's validation still climbed at step 70 while
# sst2's and financial_phrasebank's peaked at 0-20 (3 seeds each: test +2.8 on trec, +1.2 on financial_phrasebank,
# -0.3 on sst2, 0.0 on ag_news against the earlier fixed 12-30 steps; accuracy.length.json). With full data one
# epoch, capped (set finetune.epochs for more).
SCHEDULES = (Schedule("few-label", 16, 40, 120, 120, 12), Schedule("some-label", 128, 3, 30, 90, 3),
             Schedule("full-data", math.inf, 1, 100, 300, 3))


def plan_steps(fcfg, per_epoch: int, per_class: float, shares: float = 1.0) -> tuple[int, int, str | None]:
    """(steps, validate every, the schedule's name or None when the recipe set the length).

    ``shares``: how many tasks share the steps (tasks ÷ tasks drawn per step; 1 when every step trains every
    task): the schedule's bounds on the steps scale by it, so each task of a mix gets about the steps it would get
    alone."""
    if fcfg.max_steps or fcfg.epochs:
        steps = fcfg.max_steps or max(1, math.ceil(fcfg.epochs * per_epoch))
        return steps, max(per_epoch, math.ceil(steps / (fcfg.max_evaluations or 20))), None
    plan = next(s for s in SCHEDULES if per_class <= s.up_to_per_class)
    low, high = math.ceil(plan.min_steps * shares), math.ceil(plan.max_steps * shares)
    steps = min(high, max(low, math.ceil(plan.epochs * per_epoch)))
    every = max(1, math.ceil(steps / (fcfg.max_evaluations or plan.evaluations)))
    return every * math.ceil(steps / every), every, plan.name  # the last step is a validation


def with_kind_defaults(recipe: FinetuneRecipe) -> FinetuneRecipe:
    """The recipe with what it leaves to the task kinds filled in: tokens per example (the longest any task's
    kind wants: 128 for texts, 384 for QA windows) and, for kinds with a training length of their own (QA's
    2 epochs, as the SQuAD recipe), the epochs."""
    kinds = [kind_of(t) for t in recipe.tasks]
    data = recipe.data.model_copy(update={"max_length": recipe.data.max_length or max(k.max_length for k in kinds)})
    fcfg = recipe.finetune
    epochs = [k.epochs for k in kinds if k.epochs]
    if not (fcfg.epochs or fcfg.max_steps) and epochs:
        fcfg = fcfg.model_copy(update={"epochs": max(epochs)})
    return recipe.model_copy(update={"data": data, "finetune": fcfg})


def layer_lr_scale(model: SoraModel, decay: float, head_multiplier: float):
    """lr × decay^(depth below the top layer) for encoder layers; embeddings count as the lowest layer."""
    n = len(model.encoder.layers)

    def scale(name: str) -> float:
        if ".heads." in name:
            return head_multiplier
        if ".encoder.layers." in name:
            i = int(name.split(".encoder.layers.")[1].split(".")[0])
            return decay ** (n - 1 - i)
        if ".encoder.embeddings." in name:
            return decay ** n
        return 1.0

    return scale


class Selector:
    """Validation metric at each evaluation; keeps the best weights; asks to stop when patience runs out.

    The starting point (the step-0 evaluation, before any ``on_step``) is a selection candidate but not the
    reference for patience: with a probe-initialised head, fine-tuning first dips below the probe and then
    climbs past it, and counting that dip against patience stopped full-data runs before they recovered.
    Patience counts training evaluations that do not beat the best training evaluation, as the HF Trainer's."""

    def __init__(self, model: SoraModel, tokenizer: SoraTokenizer, tasks: list[tuple[str, TaskData]],
                 max_length: int, batch_size: int, patience: int,
                 report: Callable[[int, float], None] | None = None, select_on: str | dict[str, float] = "mean"):
        self.tasks, self.patience, self.report = tasks, patience, report
        self.select_weights = selection_weights(select_on, [n for n, _ in tasks])
        self.evaluations = 0
        self.encoded = {name: kind_of(model.head_specs[name]).encode(d.validation, model.head_specs[name],
                                                                    tokenizer, max_length)
                        for name, d in tasks}
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.best: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_metrics: dict[str, float] = {}
        self.best_tasks: dict[str, dict[str, float]] = {}  # each task's own metrics at the best evaluation
        self.trained = False  # set by the first on_step: evaluations before it score the starting point
        self.best_trained: float | None = None
        self.bad = 0

    def __call__(self, model: SoraModel) -> dict[str, float]:
        metrics: dict[str, float] = {}
        per_task: dict[str, dict[str, float]] = {}
        primary = []
        for name, data in self.tasks:
            spec = model.head_specs[name]
            m = scalar_metrics(kind_of(spec).metrics(spec, self.predictions(model, name), data.validation))
            per_task[name] = m
            primary.append(self.select_weights[name] * m.get(spec.metric, float("nan")))
            metrics.update({self.metric_key(name, k): v for k, v in m.items()})
        score = float(np.sum(primary))
        score = score if math.isfinite(score) else float("-inf")  # e.g. pearson of constant predictions
        self.evaluations += 1
        if self.report is not None:  # e.g. a tuner that prunes bad trials by raising
            self.report(self.evaluations, score)
        if self.best is None or score > self.best:
            self.best, self.best_metrics, self.best_tasks = score, dict(metrics), per_task
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.trained:
            if self.best_trained is None or score > self.best_trained:
                self.best_trained, self.bad = score, 0
            else:
                self.bad += 1
        return metrics

    def metric_key(self, name: str, metric: str) -> str:
        """How ``metric`` of task ``name`` is logged: ``val_accuracy`` alone, ``val_topic_accuracy`` in a mix."""
        return f"val_{name}_{metric}" if len(self.tasks) > 1 else f"val_{metric}"

    def replace_best(self, name: str, metrics: dict[str, float]) -> None:
        """Task ``name``'s head was changed after selection (a refit): the selected metrics describe it now."""
        self.best_tasks[name] = metrics
        self.best_metrics.update({self.metric_key(name, k): v for k, v in metrics.items()})

    def predictions(self, model: SoraModel, name: str) -> Any:
        """Head ``name``'s predictions on its validation examples."""
        spec, kind = model.head_specs[name], kind_of(model.head_specs[name])
        data = dict(self.tasks)[name]
        scores = kind.predict(model, self.tokenizer, name, self.encoded[name], self.batch_size)
        return kind.predictions(spec, scores, data.validation, self.encoded[name])

    def on_step(self, state: TrainState, model: SoraModel) -> None:
        self.trained = True
        if self.patience and self.bad >= self.patience:
            state.stop = True

    _STATE = ("evaluations", "best", "best_state", "best_metrics", "best_tasks", "trained", "best_trained", "bad")

    def state_dict(self) -> dict[str, Any]:
        """What selection has seen so far; each checkpoint keeps it (``fit(stateful=...)``), so a resumed run
        keeps the best weights and the patience count of the run it continues."""
        return {k: getattr(self, k) for k in self._STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self._STATE:
            setattr(self, k, state.get(k, {}) if k == "best_tasks" else state[k])  # best_tasks: newer than the rest


def selection_weights(select_on: str | dict[str, float], tasks: list[str]) -> dict[str, float]:
    """Each validated task's share of the selection score: the mean (``"mean"``), one task, or given weights."""
    if select_on == "mean":
        return {t: 1.0 / len(tasks) for t in tasks}
    wanted = {select_on: 1.0} if isinstance(select_on, str) else dict(select_on)
    unknown = sorted(set(wanted) - set(tasks))
    if unknown:
        raise ConfigError(f"multitask.select_on names {unknown[0]!r}, which is not a task with a validation split "
                          f"(those: {', '.join(tasks)})")
    total = sum(wanted.values())
    if not wanted or total <= 0 or any(w < 0 or not math.isfinite(w) for w in wanted.values()):
        raise ConfigError(f"multitask.select_on weights must be >= 0 with a positive sum, got {wanted}")
    return {t: wanted.get(t, 0.0) / total for t in tasks}


def run_finetune(recipe: FinetuneRecipe, resume: bool = False,
                 report: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Fine-tune per ``recipe``. ``report(evaluation, score)`` is called after each validation; an exception
    it raises (a pruned trial) propagates out."""
    dist = setup(recipe.train.device)
    out = Path(recipe.output)
    recipe = with_kind_defaults(recipe)
    fcfg, d = recipe.finetune, recipe.data
    try:
        tasks = [(t.name, kind_of(t).load(t, fcfg.seed)) for t in recipe.tasks]
        if len({n for n, _ in tasks}) != len(tasks):
            raise ConfigError("task names must be unique")
        torch.manual_seed(fcfg.seed)
        model, tokenizer, start = init_model(fcfg.init, recipe)
        if fcfg.freeze_encoder:  # a new head beside the old ones: they keep predicting exactly as before
            model.encoder.requires_grad_(False)
        for name, data in tasks:
            if dist.is_main:
                tokenizer.warn_unknown(kind_of(data.task).texts(data.train), f"task {name!r} ({data.task.data})")
            add_head(model, name, head_spec(data.task, data, backbone=model.cfg.backbone is not None))
            init_head(model, tokenizer, name, data, d.max_length, fcfg.head_init, tuple(fcfg.probe_c))
        multi = len(tasks) > 1
        # Each task's loss, wrapped by the adversarial method when one is set (recipe ``adversarial``).
        objectives: dict[str, tuple[float, torch.nn.Module]] = {
            name: (data.task.weight, build_adversarial(recipe.adversarial, TaskLoss(
                name, data.task.type, kind_of(data.task).class_weights(data), f"{name}/" if multi else "",
                data.task.contrastive_weight, data.task.temperature)))
            for name, data in tasks}
        adversarial = adversarial_cost(objectives)
        if dist.is_main and adversarial:
            print(f"adversarial training: {adversarial['method']} ({adversarial['settings']}), "
                  f"{adversarial['forwards']} forward and {adversarial['backwards']} backward passes per task and step "
                  "(plain: 1 and 1)", flush=True)
        # Adversarial examples as data: attacked copies of each task's training set, remade as the model learns.
        pools = {name: ExamplePool(model, tokenizer, name, dict(tasks)[name], d.max_length, objective.settings,
                                   fcfg.seed, f"{name}/" if multi else "", d.batch_size)
                 for name, (_, objective) in objectives.items() if getattr(objective, "makes_examples", False)}
        if fcfg.aux_denoise_weight > 0:
            if model.decoder is None and recipe.objectives[0].name != "mlm":  # MLM needs only the encoder
                raise ConfigError("aux_denoise_weight > 0 needs a model with a decoder (or objectives: [{name: mlm}])")
            objectives["denoise"] = (fcfg.aux_denoise_weight, build_objective(recipe.objectives[0], prefix="aux_"))

        mt = recipe.multitask
        weighting = build_weighting(mt.weighting, {n: w for n, (w, _) in objectives.items()},
                                    **mt.weighting_options)
        streams = {}
        for name, data in tasks:
            kind = kind_of(data.task)
            enc = kind.encode(data.train, model.head_specs[name], tokenizer, d.max_length)
            streams[name] = TaskStream(kind, enc, kind.training_targets(data.train, enc, data.labels),
                                       f"{name}/" if multi else "")
        sizes = {n: len(s.encoded) for n, s in streams.items()}
        sampler_name, sampler_k = (mt.sampler, mt.tasks_per_step) if multi else ("all", 1)
        # The sampler says how many tasks a step draws (``all``: every one); its length is planned from that.
        per_step = build_sampler(sampler_name, sizes, fcfg.seed, 1, sampler_k, **mt.sampler_options).tasks_per_step
        per_epoch = steps_per_epoch([s.batches_per_epoch(d.batch_size) for s in streams.values()], per_step,
                                    dist.world_size)
        largest = max((data for _, data in tasks), key=lambda t: len(t.train))
        max_steps, eval_every, schedule = plan_steps(fcfg, per_epoch, kind_of(largest.task).per_class(largest),
                                                     len(tasks) / per_step)
        if dist.is_main and schedule:
            print(f"fine-tuning: {schedule} schedule ({len(largest.train):,} labelled examples), {max_steps} steps, "
                  f"validating every {eval_every}", flush=True)
        # The sampler counts micro-batches (of this process): grad_accum of them make one optimizer step.
        sampler = build_sampler(sampler_name, sizes, fcfg.seed, max_steps * recipe.train.grad_accum, sampler_k,
                                **mt.sampler_options)
        mixer = TaskMixer(streams, sampler, d.batch_size, tokenizer.pad_id, fcfg.seed, dist.world_size, dist.rank)
        if dist.is_main and multi:
            print(f"multi-task: {len(tasks)} tasks, {sampler.name} sampling "
                  f"({', '.join(f'{t} {p:.0%}' for t, p in sampler.probabilities(0).items())} of the draws at the "
                  f"start), {weighting.name} loss weighting", flush=True)
        train_cfg = recipe.train.model_copy(update=dict(
            max_steps=max_steps,
            warmup_steps=recipe.train.warmup_steps or int(fcfg.warmup_ratio * max_steps),
            eval_every=recipe.train.eval_every or eval_every,
            save_every=recipe.train.save_every or max_steps, seed=fcfg.seed))
        unlabeled = _UnlabeledStream(fcfg.unlabeled, [ex.text for _, data in tasks for ex in data.train],
                                     tokenizer, d, fcfg.seed) if fcfg.aux_denoise_weight > 0 else None

        def refresh(pool: ExamplePool, step: int) -> None:
            record = pool.refresh(step)
            if dist.is_main:
                print(f"adversarial examples for {pool.name!r} at step {step}: {record['kept']} perturbed "
                      f"copies of {record['attacked']} training examples by the {record['attack']} attack, "
                      f"{record['flipped']} of them flipped ({record['seconds']} s)", flush=True)

        validations = [0]  # the selector's evaluation count when the pools were last looked at

        def batches(epoch: int):
            for pool in pools.values():
                if pool.refreshes == 0:  # here, not before fit: the model is on its device now
                    refresh(pool, 0)
                    validations[0] = selector.evaluations  # the starting point's evaluation is not a cue
            # Each step carries a batch of each task the sampler draws and, with α > 0, unlabeled text.
            aux = unlabeled.starting_at(epoch * per_epoch) if unlabeled is not None else None
            for i in range(per_epoch):
                step = epoch * per_epoch + i
                batch = mixer.batch(step)
                if aux is not None:
                    batch.update({"aux_" + k: v for k, v in next(aux).items()})
                for name in mixer.tasks_at(step):
                    if name in pools:
                        batch.update(pools[name].batch(epoch, i))
                yield batch

        selector = Selector(model, tokenizer, [(n, t) for n, t in tasks if t.validation], d.max_length,
                            d.batch_size * 4, fcfg.patience, report, mt.select_on if multi else "mean")
        if not selector.tasks:
            raise ConfigError("fine-tuning needs a validation split for model selection (tasks[].validation)")
        unfreeze = _gradual_unfreeze(model, per_epoch) if fcfg.gradual_unfreeze else None
        if unfreeze and dist.enabled:
            raise ConfigError("gradual_unfreeze is not supported with several processes")

        def on_step(state: TrainState, m: SoraModel) -> None:
            selector.on_step(state, m)
            if unfreeze:
                unfreeze(state)
            validated, validations[0] = selector.evaluations != validations[0], selector.evaluations
            for pool in pools.values():
                if not (state.stop or state.step >= max_steps) and pool.due(state.step, validated):
                    refresh(pool, state.step)

        info = {"recipe": recipe.model_dump(), "kind": "finetune"}
        state = fit(model, tokenizer, objectives, batches, train_cfg, out, dist, info=info, resume=resume,
                    lr_scale=layer_lr_scale(model, fcfg.layer_lr_decay, fcfg.head_lr_multiplier),
                    evaluate=selector, on_step=on_step,
                    stateful={"selector": selector, "sampler": sampler,
                              **{f"adversarial_{n}": p for n, p in pools.items()}},
                    evaluate_first=True,  # the starting point is a candidate: fine-tuning must beat it to count
                    weighting=weighting, objective_keys={n: f"{n}/" for n, _ in tasks} if multi else None)
        summary: dict[str, Any] = {"output": str(out), "steps": state.step, "elapsed_s": round(state.elapsed_s, 1)}
        if multi:
            summary["multitask"] = {"sampler": sampler.settings(), "weighting": weighting.name,
                                    "weights": weighting.weights(),
                                    "epochs_seen": mixer.epochs_seen(state.step * recipe.train.grad_accum)}
        if adversarial:
            summary["adversarial"] = adversarial
            if pools:
                summary["adversarial"]["examples"] = {n: p.history for n, p in pools.items()}
        if dist.is_main:
            if selector.best_state is not None:
                model.load_state_dict(selector.best_state)
            if fcfg.head_refit:
                refits = {n: r for n, t in selector.tasks
                          if (r := refit_head(model, tokenizer, selector, n, t, d.max_length, tuple(fcfg.probe_c)))}
                if refits:
                    summary["head_refit"] = refits
                    print("head refit on the fine-tuned codes: " + ", ".join(
                        f"{n} {r['trained']:.4f} -> {r['refit']:.4f} ({'kept' if r['kept'] else 'not kept'})"
                        for n, r in refits.items()), flush=True)
            for name, data in selector.tasks:  # e.g. multilabel thresholds, on the chosen weights
                spec = model.head_specs[name]
                kind_of(spec).after_selection(spec, selector.predictions(model, name), data.validation)
            # Each head's own validation metrics; heads kept from the starting checkpoint keep theirs.
            earlier = (start.get("metadata") or {}).get("tasks_validation") or {}
            tasks_validation = {**{n: v for n, v in earlier.items() if n in model.heads}, **selector.best_tasks}
            info["metadata"] = {"validation": selector.best_metrics, "tasks_validation": tasks_validation,
                                "train_examples": {n: len(t.train) for n, t in tasks}, "steps": state.step,
                                **({"head_refit": summary["head_refit"]} if "head_refit" in summary else {})}
            save_checkpoint(out / "model", model, tokenizer, info)
            summary["validation"] = selector.best_metrics
        finish(dist)
        return summary
    finally:
        teardown()


def adversarial_cost(objectives: dict[str, tuple[float, torch.nn.Module]]) -> dict[str, Any] | None:
    """The adversarial method wrapping the task losses and its passes per step (None without one)."""
    for _, objective in objectives.values():
        if isinstance(objective, Adversarial):
            return {"method": objective.name, "settings": objective.settings, "forwards": objective.forwards,
                    "backwards": objective.backwards}
    return None


def _gradual_unfreeze(model: SoraModel, per_epoch: int):
    """Freeze the encoder; unfreeze one layer from the top per epoch, the embeddings last (ULMFiT)."""
    groups = [model.encoder.layers[i] for i in reversed(range(len(model.encoder.layers)))]
    groups.append(model.encoder.embeddings)
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    if model.encoder.final_norm is not None:
        model.encoder.final_norm.requires_grad_(True)

    def step(state: TrainState) -> None:
        k = state.step // per_epoch  # epochs completed
        for group in groups[:k]:
            group.requires_grad_(True)

    return step


class _UnlabeledStream:
    """The endless stream of unlabeled batches for the auxiliary denoising loss, addressable by position.

    Labelled epoch e starts at batch e × (batches per epoch) of the stream, so the aux batch that goes with a
    labelled batch is a function of (epoch, index): a resumed run sees exactly the batches of an uninterrupted
    one (it re-reads and skips up to the resume point once; within a run the stream just continues)."""

    def __init__(self, path: str | None, fallback: list[str], tokenizer: SoraTokenizer, d, seed: int):
        self.source = TextSource(path, d.column, d.format, delimiter=d.delimiter) if path else fallback
        self.tokenizer, self.d, self.seed = tokenizer, d, seed
        self.position, self.stream = 0, self._forever()

    def _forever(self):
        for epoch in itertools.count():
            yield from token_batches(self.source, self.tokenizer, self.d.batch_size, self.d.max_length,
                                     seed=self.seed + 1, epoch=epoch, bucket_batches=self.d.bucket_batches)

    def starting_at(self, position: int):
        if position < self.position:
            self.position, self.stream = 0, self._forever()
        for _ in range(position - self.position):
            next(self.stream)
        self.position = position
        while True:
            self.position += 1
            yield next(self.stream)
