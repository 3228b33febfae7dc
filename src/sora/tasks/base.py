"""What a task kind is: everything that depends on what a head's outputs *mean*.

A kind reads and checks its rows, builds its head's spec, encodes examples into model inputs, turns a batch
into a loss, turns head outputs into user-facing predictions, and scores predictions against gold labels.
Training, evaluation, compression, serving and the Python API ask the kind (``sora.tasks.kind_of``) and never
branch on its name. ``TaskKind`` holds the defaults for kinds whose examples are texts (or pairs of texts)
with one label each and whose head reads one vector per example; span QA and relations override what differs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ValidationError

from sora.config import TaskConfig
from sora.data.tasks import (
    Example,
    TaskData,
    check_known,
    encode_examples,
    load_task,
    make_batch,
    read_examples,
    task_batches,
)
from sora.errors import ConfigError
from sora.models.autoencoder import EncoderOutput, SoraModel
from sora.models.heads import HeadSpec, head_logits
from sora.text.tokenizer import SoraTokenizer


@dataclass(frozen=True)
class AttackInput:
    """What ``sora.attack`` perturbs in a kind's examples: the first of ``fields`` (text attributes) an example has,
    leaving the character spans of ``keep`` (attributes holding (start, end) over that text) untouched; each span
    is shown marked by its tag where an outcome prints the text (``("head", "e1")``: ``<e1>…</e1>``)."""

    fields: tuple[str, ...] = ("text",)
    keep: tuple[tuple[str, str], ...] = ()


class TaskKind:
    name: ClassVar[str]
    default_metric: ClassVar[str] = "accuracy"
    classes: ClassVar[bool] = True  # labels form a finite set: few-label sampling, one output per label
    pair_input: ClassVar[bool] = False  # always a pair of texts (else single, or pairs when the data has text_b)
    probe_init: ClassVar[bool] = False  # the head can start as a logistic-regression probe of the codes
    report: ClassVar[str] = "classification"  # the kind named in ``sora evaluate``'s report
    headline: ClassVar[tuple[str, ...]] = ()  # the report's headline metrics, in order (empty: every number)
    input_columns: ClassVar[tuple[str, ...] | None] = None  # what ``sora predict`` reads (None: text / text_b)
    points: ClassVar[float] = 100.0  # metric points per unit of its metrics (fractions: 100; percentages: 1)
    answers: ClassVar[bool] = False  # its heads answer questions: ``Sora.answer``, ``POST /v1/answer``
    generates: ClassVar[bool] = False  # its heads generate text: ``Sora.generate``, ``sora generate``, ``/v1/generate``
    max_length: ClassVar[int] = 128  # tokens per example when the recipe sets no data.max_length
    epochs: ClassVar[float | None] = None  # training length when the recipe sets none (None: finetune.SCHEDULES)
    attack: ClassVar[AttackInput | None] = None  # what ``sora.attack`` edits (None: no single label to flip)

    # ---- rows ---------------------------------------------------------------------------------------------

    def parse_label(self, value: Any, task: TaskConfig, path: Path, line: int) -> Any:
        return str(value)

    def label_set(self, examples: list[Any], task: TaskConfig) -> list[str] | None:
        if not self.classes:
            return None
        if task.labels:
            return list(task.labels)
        seen: set[str] = set()
        for ex in examples:
            seen.update(ex.label if isinstance(ex.label, list) else [ex.label])
        return sorted(seen, key=lambda x: (0, int(x)) if x.lstrip("-").isdigit() else (1, x))

    def load(self, task: TaskConfig, seed: int = 13) -> TaskData:
        """Train/validation/test of ``task``, few-label sampled and checked."""
        return load_task(task, seed, self)

    def read(self, path: str | Path, task: TaskConfig, split: str, pair: bool | None = None,
             require_labels: bool = True) -> list[Any]:
        """One split's examples (``sora evaluate --data``, compression's gate)."""
        return self.read_split(path, task, split, pair, require_labels)[0]

    def read_split(self, path: str | Path, task: TaskConfig, split: str, pair: bool | None,
                   require_labels: bool = True) -> tuple[list[Any], bool]:
        """One split's examples and whether they are pairs (what ``load`` reads each split with)."""
        return read_examples(path, task, split, require_labels, pair=pair, rules=self)

    def check_labels(self, examples: list[Any], labels: list[str] | None, where: str) -> None:
        """Refuse gold labels the head cannot predict (every metric would be silently wrong)."""
        check_known(examples, labels if self.classes else None, where)

    def targets(self, examples: list[Example], labels: list[str] | None) -> torch.Tensor:
        index = {lb: i for i, lb in enumerate(labels or [])}
        return torch.tensor([index[e.label] for e in examples], dtype=torch.long)

    def class_weights(self, data: TaskData) -> torch.Tensor | None:
        """Inverse label frequency, scaled to mean 1 (``tasks[].class_weights``)."""
        if not data.task.class_weights or not data.labels:
            return None
        counts = torch.bincount(self.targets(data.train, data.labels), minlength=len(data.labels)).float()
        w = len(data.train) / (len(data.labels) * counts.clamp(min=1))
        return w / w.mean()

    def texts(self, examples: list[Any]) -> list[str]:
        """The texts of ``examples`` the tokenizer must read (its [UNK] check)."""
        return [t for ex in examples for t in (ex.text, ex.text_b) if t]

    def per_class(self, data: TaskData) -> float:
        """Labelled examples per class: what picks the fine-tuning schedule."""
        return len(data.train) / max(1, len(data.labels or []))

    def examples_from(self, inputs: list[Any], spec: HeadSpec) -> list[Any]:
        """Unlabelled examples from what a caller passes to ``predict`` (texts, or (a, b) pairs)."""
        return [Example(t[0], None, t[1]) if spec.pair else Example(t, None) for t in inputs]

    @staticmethod
    def parse_options(options: type[BaseModel], spec_or_task: HeadSpec | TaskConfig, kind: str) -> Any:
        """A kind's ``tasks[].options`` validated by its pydantic model; a bad key is one clear ConfigError."""
        try:
            return options.model_validate(spec_or_task.options)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ConfigError(f"tasks[].options.{'.'.join(map(str, first['loc']))}: {first['msg']} "
                              f"({kind} options: {', '.join(options.model_fields)})") from None

    # ---- the head -----------------------------------------------------------------------------------------

    def outputs(self, labels: list[str] | None) -> int:
        return len(labels or [])

    def spec(self, task: TaskConfig, data: TaskData, normalize: bool) -> HeadSpec:
        siamese = data.pair and task.pair_mode == "siamese"
        return HeadSpec(type=self.name, reads="siamese" if siamese else "code", outputs=self.outputs(data.labels),
                        pair=data.pair, pair_mode=task.pair_mode, labels=data.labels, dropout=task.head_dropout,
                        normalize=normalize, metric=task.metric or self.default_metric)

    # ---- model inputs -------------------------------------------------------------------------------------

    def encode(self, examples: list[Any], spec: HeadSpec, tokenizer: SoraTokenizer,
               max_length: int) -> list[dict[str, Any]]:
        """Model inputs per example (or per window, for kinds that split long texts)."""
        return encode_examples(examples, spec.pair, spec.pair_mode, tokenizer, max_length)

    def batches(self, encoded: list[dict[str, Any]], targets: torch.Tensor | None, batch_size: int, pad_id: int, *,
                seed: int = 0, epoch: int = 0, shuffle: bool = True,
                prefix: str = "") -> Iterator[dict[str, torch.Tensor]]:
        return task_batches(encoded, targets, batch_size, pad_id, seed=seed, epoch=epoch, shuffle=shuffle,
                            prefix=prefix, collate_rows=self.collate, length=self.length)

    def length(self, row: dict[str, Any]) -> Any:
        """What training batches are bucketed by (rows of similar ``length`` share a batch, so little of it is
        padding): the input's tokens; a kind whose cost lies elsewhere (a seq2seq target) says so."""
        return len(row["ids"])

    def collate(self, rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        """Encoded rows → padded tensors (training and prediction alike)."""
        return make_batch(rows, pad_id)

    def training_targets(self, examples: list[Any], encoded: list[dict[str, Any]],
                         labels: list[str] | None) -> torch.Tensor | None:
        """The labels ``batches`` attaches to each encoded row (kinds whose targets live in the encoding: None)."""
        return self.targets(examples, labels)

    # ---- forward ------------------------------------------------------------------------------------------

    def logits(self, encoder: Any, model: SoraModel, name: str, batch: dict[str, torch.Tensor],
               out: EncoderOutput | None = None) -> torch.Tensor:
        return head_logits(encoder, model, name, batch, out)

    def loss(self, model: SoraModel, name: str, batch: dict[str, torch.Tensor],
             objective: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) of head ``name`` on a labelled batch; ``objective`` is the ``TaskLoss`` asking (class
        weights, contrastive weight and temperature)."""
        raise NotImplementedError

    def divergence(self, spec: HeadSpec, target: torch.Tensor, logits: torch.Tensor,
                   batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """How far the predictions of ``logits`` are from those of ``target`` (both as ``loss`` returns them),
        mean over examples: ≥ 0, and 0 when they are equal. SMART's smoothness term compares clean and perturbed
        predictions with it (``sora.objectives.adversarial``). Here KL(target ‖ logits) of the softmax over the
        outputs (classes)."""
        return F.kl_div(logits.float().log_softmax(-1), target.float().log_softmax(-1), log_target=True,
                        reduction="batchmean")

    def scores(self, spec: HeadSpec, logits: torch.Tensor) -> torch.Tensor:
        """What predictions are made from: probabilities, or the value."""
        return torch.softmax(logits.float(), dim=-1)

    def batch_outputs(self, encoder: Any, model: SoraModel, name: str,
                      batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What ``predict`` keeps of one batch, a row per encoded row (here the scores)."""
        return self.scores(model.head_specs[name], self.logits(encoder, model, name, batch))

    @torch.inference_mode()
    def batched(self, model: SoraModel, tokenizer: SoraTokenizer, name: str, encoded: list[dict[str, Any]],
                batch_size: int, encoder: Any) -> Iterator[tuple[list[int], np.ndarray]]:
        """(row indices, ``batch_outputs``) over ``eval_batches``."""
        encoder = model if encoder is None else encoder
        for idx, batch in self.eval_batches(model, tokenizer, encoded, batch_size):
            yield idx, self.batch_outputs(encoder, model, name, batch).float().cpu().numpy()

    @torch.inference_mode()  # torch enters and leaves it around each step of a generator
    def eval_batches(self, model: SoraModel, tokenizer: SoraTokenizer, encoded: list[dict[str, Any]],
                     batch_size: int) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """(row indices, the collated batch on the model's device) over longest-first batches (little padding),
        the model in eval mode meanwhile."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]["ids"]))
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                rows = self.collate([encoded[i] for i in idx], tokenizer.pad_id)
                yield idx, {k: v.to(device) for k, v in rows.items()}
        finally:
            model.train(was_training)

    def predict(self, model: SoraModel, tokenizer: SoraTokenizer, name: str, encoded: list[dict[str, Any]],
                batch_size: int = 64, encoder: Any = None) -> Any:
        """Scores per encoded row, in order. ``encoder`` computes what the head reads: ``model`` by default, or
        an ``OnnxEncoder`` — the compression gate and the server both come here, so the gate measures what is
        served."""
        out: np.ndarray | None = None
        for idx, s in self.batched(model, tokenizer, name, encoded, batch_size, encoder):
            if out is None:
                out = np.zeros((len(encoded), *s.shape[1:]), dtype=np.float32)
            out[idx] = s
        return out if out is not None else np.zeros((0,), dtype=np.float32)

    def predictions(self, spec: HeadSpec, scores: Any, examples: list[Any],
                    encoded: list[dict[str, Any]]) -> Any:
        """Per example, what ``metrics`` and ``format`` read (windowed kinds gather their windows here)."""
        return scores

    def format(self, spec: HeadSpec, s: Any) -> dict[str, Any]:
        """One example's prediction as the API and the server return it."""
        labels = spec.labels or []
        best = int(np.argmax(s))
        return {"label": labels[best], "score": float(s[best]),
                "scores": {lb: round(float(p), 6) for lb, p in zip(labels, s, strict=True)}}

    # ---- metrics (sora.metrics: one implementation for selection, evaluate, compress, bench) -------

    def metrics(self, spec: HeadSpec, scores: Any, examples: list[Any]) -> dict[str, Any]:
        """The full metrics of predictions ``scores`` on gold ``examples``."""
        raise NotImplementedError

    def report_inputs(self, spec: HeadSpec, scores: Any, examples: list[Any]) -> dict[str, Any]:
        """Extra inputs of the report's plots (probabilities and gold indices for the reliability diagram)."""
        return {}

    def after_selection(self, spec: HeadSpec, scores: Any, examples: list[Any]) -> None:
        """Adjust the spec on validation predictions once the weights are chosen (multilabel thresholds)."""


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The defined numbers among ``metrics`` (what a training log and model selection keep; not the count)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "n"}
