"""``sora evaluate``: score a fine-tuned checkpoint on a labeled split and write the report; or, for any model
(task heads or not), retrieval on a BEIR folder and similarity correlation on scored pairs
(``evaluate.retrieval``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sora.api import Sora, predict_scores
from sora.config import TaskConfig
from sora.errors import ConfigError
from sora.evaluate.report import write_report
from sora.tasks import kind_of


def task_config(model: Sora, name: str) -> TaskConfig:
    """The task as it was declared for fine-tuning (columns, data), from the checkpoint's recipe."""
    for raw in (model.config.get("recipe") or {}).get("tasks") or []:
        if raw.get("name") == name:
            return TaskConfig.model_validate(raw)
    spec = model.model.head_specs[name]
    return TaskConfig(name=name, type=spec.type, pair_mode=spec.pair_mode)


def pick_task(model: Sora, task: str | None) -> str:
    names = list(model.model.head_specs)
    if not names:
        raise ConfigError(f"{model.path}: this checkpoint has no task heads (fine-tune it first)")
    if task is None:
        if len(names) > 1:
            raise ConfigError(f"this checkpoint has several tasks ({', '.join(names)}): choose one with --task")
        return names[0]
    if task not in names:
        raise ConfigError(f"no task {task!r} in this checkpoint (tasks: {', '.join(names)})")
    return task


def evaluate_checkpoint(model: Sora, data: str | None = None, split: str = "test", task: str | None = None,
                        out: str | Path | None = None, batch_size: int = 64, attacks: Sequence[str] | None = (),
                        attack_examples: int | None = None, attack_options: dict[str, Any] | None = None
                        ) -> dict[str, Any]:
    """A task head on labelled data: its kind's metrics and the report. ``attacks`` (``sora.attack.ATTACKS``
    names) adds ``metrics["robustness"]``, each attack on the same seeded sample of ``attack_examples``
    (default 100); None runs ``sora evaluate``'s default (a cheap character attack) where the kind can be
    attacked and notes why not where it cannot; () runs none."""
    name = pick_task(model, task)
    cfg = task_config(model, name)
    spec = model.model.head_specs[name]
    source = data or cfg.test or cfg.data
    if source is None:
        raise ConfigError("no evaluation data: pass --data PATH")
    if data is None and cfg.test is None and Path(source).is_file():  # the training file itself: not a test set
        raise ConfigError(f"no test split: the task was trained on the file {source} and has no tasks[].test; "
                          "pass --data PATH")
    if source == cfg.test and data is None:
        split = "test"
    kind = kind_of(spec)
    examples = kind.read(source, cfg, split, pair=spec.pair)
    kind.check_labels(examples, spec.labels, str(source))
    encoded = kind.encode(examples, spec, model.tokenizer, model.max_length)
    scores = predict_scores(model.model, model.tokenizer, name, encoded, batch_size, model.encoder)  # ONNX too
    predictions = kind.predictions(spec, scores, examples, encoded)
    metrics = kind.metrics(spec, predictions, examples)
    metrics = {**metrics, **attack_section(model, name, examples, attacks, attack_examples, attack_options or {},
                                           batch_size)}
    extras = kind.report_inputs(spec, predictions, examples)
    out_dir = Path(out) if out else model.path.parent / f"eval-{name}-{split}"
    run_dir = model.path.parent if model.path.name == "model" else model.path.parent.parent
    log = run_dir / "train_log.jsonl"
    files = write_report(out_dir, metrics, name, kind.report, log if log.is_file() else None,
                         extras.get("probs"), extras.get("y_true_idx"), spec.labels, kind.headline or None)
    return {"task": name, "data": str(source), "split": split, "metrics": metrics, "headline": list(kind.headline),
            "files": {k: str(v) for k, v in files.items()}}


def attack_section(model: Sora, name: str, examples: list[Any], attacks: Sequence[str] | None,
                   max_examples: int | None, options: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """``{"robustness": {attack: summary}}``, or a note where the default attack cannot run on this kind."""
    from sora.attack import DEFAULT_EVAL_ATTACKS, DEFAULT_EVAL_EXAMPLES, robustness

    spec = model.model.head_specs[name]
    if attacks is None:
        if kind_of(spec).attack is None:
            return {"robustness_note": f"not measured: a {spec.type} head predicts no single label to attack"}
        attacks = DEFAULT_EVAL_ATTACKS
    if not attacks:
        return {}
    n = DEFAULT_EVAL_EXAMPLES if max_examples is None else max_examples
    return {"robustness": robustness(model, name, examples, attacks, n, batch_size=batch_size, **options)}


def evaluate_model(model: Sora, data: str | None = None, split: str = "test", task: str | None = None,
                   out: str | Path | None = None, batch_size: int = 64, max_length: int | None = None,
                   score_column: str | None = None, progress: bool = False, attacks: Sequence[str] | None = None,
                   attack_examples: int | None = None, attack_options: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """What ``sora evaluate`` runs, chosen by the data and the model:

    - ``data`` is a BEIR folder (corpus.jsonl, queries.jsonl, qrels/): retrieval (``evaluate_retrieval``);
    - ``score_column`` is given, or the model has no task heads: the correlation of the pairs' score with the
      cosine similarity of their embeddings (``similarity_correlation``; the score column auto-detected);
    - otherwise a task head on labeled data (``evaluate_checkpoint``), with a robustness section: ``attacks``
      None runs the default attack (``sora.attack.DEFAULT_EVAL_ATTACKS`` on a capped sample), () none.

    - a checkpoint with several heads and neither ``task`` nor ``data``: every head on its task's test split
      (``evaluate_every_task``, mode "tasks").

    Every result has ``mode`` ("retrieval", "similarity", "task" or "tasks"), ``data``, ``split``, ``metrics``,
    ``files``."""
    from sora.evaluate.retrieval import evaluate_retrieval, find_score_column, is_beir_dir, similarity_correlation

    if is_beir_dir(data):
        return evaluate_retrieval(model, data, split, batch_size=batch_size, max_length=max_length, out=out,
                                  progress=progress)
    headless = not model.model.head_specs
    if score_column is None and headless:
        kind = "a Hugging Face encoder" if model.config.get("kind") == "hf-encoder" else "a checkpoint"
        needs = (f"{model.path}: {kind} with no task heads, so `sora evaluate` scores it on retrieval (--data a BEIR "
                 "folder: corpus.jsonl, queries.jsonl, qrels/) or on pairs with a numeric score (--score-column)")
        if data is None:
            raise ConfigError(f"{needs}; pass --data (or fine-tune it first)")
        score_column = find_score_column(data, split)
        if score_column is None:
            raise ConfigError(f"{needs}; {data} has no numeric relatedness/score/similarity/label column "
                              "(name one with --score-column, or fine-tune the model first)")
    if score_column is not None:
        if data is None:
            raise ConfigError("--score-column needs --data (pairs with text_a, text_b and the score)")
        return similarity_correlation(model, data, split, score_column=score_column, batch_size=batch_size,
                                      max_length=max_length, out=out, progress=progress)
    if max_length:
        model.max_length = int(max_length)
    if task is None and data is None and len(model.model.head_specs) > 1:
        return evaluate_every_task(model, split, out, batch_size, attacks, attack_examples, attack_options)
    result = evaluate_checkpoint(model, data, split, task, out, batch_size, attacks, attack_examples, attack_options)
    return {"mode": "task", **result}


def evaluate_every_task(model: Sora, split: str = "test", out: str | Path | None = None, batch_size: int = 64,
                        attacks: Sequence[str] | None = None, attack_examples: int | None = None,
                        attack_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A multi-task checkpoint without ``--task`` or ``--data``: every head on its own task's test split, each
    with its report (``out/TASK`` or beside the model). A head whose task has no test split is listed in
    ``skipped`` with the reason; none with one is a ``ConfigError``."""
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name in model.model.head_specs:
        try:
            results[name] = evaluate_checkpoint(model, None, split, name, Path(out) / name if out else None,
                                                batch_size, attacks, attack_examples, attack_options)
        except ConfigError as exc:
            skipped[name] = str(exc)
    if not results:
        raise ConfigError("no task of this checkpoint has a test split to evaluate: "
                          + "; ".join(f"{n}: {why}" for n, why in skipped.items()))
    return {"mode": "tasks", "tasks": results, "skipped": skipped, "data": None, "split": split,
            "metrics": {n: r["metrics"] for n, r in results.items()},
            "files": {f"{n}/{k}": v for n, r in results.items() for k, v in r["files"].items()}}
