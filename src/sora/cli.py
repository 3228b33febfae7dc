"""The command line (``sora --help``). Errors a user can fix print as one line, exit code 2."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from sora.errors import SoraError, SoraWarning, missing

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Sora: denoising-autoencoder text representations from your own unlabeled text.")


MODEL_HELP = "a Sora checkpoint or run directory, a local Hugging Face encoder directory, or all-MiniLM-L6-v2"
TUNED_HELP = ("a fine-tuned Sora checkpoint or run directory (a Hugging Face encoder or all-MiniLM-L6-v2 loads "
              "too, but has no task heads)")
DELIMITER_HELP = "CSV/TSV/TXT field delimiter: one character, or tab (default: detected from the header)"


def _delimiter(value: str | None) -> str | None:
    """``--delimiter`` as a recipe override: JSON-quoted, so that YAML keeps ``|`` or a tab a string."""
    from sora.data.readers import parse_delimiter

    d = parse_delimiter(value)
    return None if d is None else json.dumps(d)


def _check_writable(output: Path) -> None:
    """Refuse an output that cannot be written before doing the work (a parent that is a file, or a directory
    this user may not write)."""
    for parent in output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SoraError(f"{output}: cannot write it ({parent} is a file, not a directory)")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise SoraError(f"{output}: cannot write it (no permission to write in {parent})")
            return


def _write_atomically(output: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``output``, then rename it into place: a failure (disk full,
    no permission) leaves neither a half-written file nor the directories made for it, and an older file
    where it was."""
    _check_writable(output)
    made = [d for d in output.parents if not d.exists()]
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, output)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        for d in made:  # deepest first
            try:
                d.rmdir()
            except OSError:
                break
        if isinstance(exc, OSError):
            raise SoraError(f"{output}: cannot write it ({exc.strerror or exc})") from None
        raise


def _overrides(pairs: list[str] | None, **flags: Any) -> dict[str, Any]:
    """Flags that were given (not None) plus ``--set key=value`` pairs, as dotted recipe keys."""
    out = {k: v for k, v in flags.items() if v is not None}
    for pair in pairs or []:
        if "=" not in pair:
            raise SoraError(f"--set {pair!r}: expected key=value, e.g. --set model.dim=256")
        key, value = pair.split("=", 1)
        out[key.strip()] = value
    return out


@app.command()
def pretrain(
    recipe: Annotated[Path | None, typer.Argument(help="YAML recipe; flags override it")] = None,
    train: Annotated[str | None, typer.Option(help="training text: a file or a directory with train.*")] = None,
    validation: Annotated[str | None, typer.Option(help="validation text file")] = None,
    column: Annotated[str | None, typer.Option(help="text column (JSONL/CSV/TSV/Parquet)")] = None,
    format: Annotated[str | None, typer.Option(help="jsonl|csv|tsv|txt|parquet (default: extension)")] = None,
    delimiter: Annotated[str | None, typer.Option(help=DELIMITER_HELP + "; recipe key data.delimiter")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="run directory")] = None,
    backbone: Annotated[str | None, typer.Option(help="local HF encoder directory (domain adaptation)")] = None,
    max_steps: Annotated[int | None, typer.Option(help="optimizer steps")] = None,
    minutes: Annotated[float | None, typer.Option(help="wall-clock budget in minutes")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    max_length: Annotated[int | None, typer.Option(help="tokens per text")] = None,
    vocab_size: Annotated[int | None, typer.Option(help="size of the tokenizer trained on the corpus")] = None,
    device: Annotated[str | None, typer.Option(help="auto|cpu|cuda")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    save_every: Annotated[int | None, typer.Option(help="checkpoint every N steps")] = None,
    resume: Annotated[bool, typer.Option(help="continue from the run's last checkpoint")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    set_: Annotated[list[str] | None, typer.Option("--set", help="any recipe key, e.g. model.dim=256")] = None,
) -> None:
    """Pretrain the denoising autoencoder on unlabeled text."""
    from sora.config import load_recipe
    from sora.train.pretrain import run_pretrain

    overrides = _overrides(
        set_, **{"data.train": train, "data.validation": validation, "data.column": column, "data.format": format,
                 "data.delimiter": _delimiter(delimiter), "output": output, "model.backbone": backbone,
                 "train.max_steps": max_steps,
                 "train.max_minutes": minutes, "data.batch_size": batch_size, "train.lr": lr,
                 "data.max_length": max_length, "tokenizer.vocab_size": vocab_size, "train.device": device,
                 "train.seed": seed, "train.save_every": save_every,
                 "train.progress": None if progress else False})
    summary = run_pretrain(load_recipe(recipe, overrides), resume=resume)
    if summary.get("rank", 0) != 0:  # under torchrun: rank 0 reports for all
        return
    if summary.get("history"):
        last = summary["history"][-1]
        typer.echo("final " + ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k != "step"))
    typer.echo(f"model: {summary['output']}/model  ({summary['steps']} steps, {summary['tokens']:,} tokens, "
               f"{summary['elapsed_s']} s)")


@app.command()
def finetune(
    recipe: Annotated[Path | None, typer.Argument(help="YAML recipe; flags override it")] = None,
    init: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    data: Annotated[str | None, typer.Option(help="task data: a dir with train/validation/test, or a file")] = None,
    validation: Annotated[str | None, typer.Option(help="validation file (model selection)")] = None,
    test: Annotated[str | None, typer.Option(help="test file (for sora evaluate)")] = None,
    task_type: Annotated[str | None, typer.Option(help="classification|pair|multilabel|regression|relation|qa|"
                                                       "seq2seq (sora.tasks.KINDS)")] = None,
    text_column: Annotated[str | None, typer.Option()] = None,
    label_column: Annotated[str | None, typer.Option()] = None,
    delimiter: Annotated[str | None, typer.Option(help=DELIMITER_HELP + "; recipe key tasks[].delimiter")] = None,
    labels_per_class: Annotated[int | None, typer.Option(help="few-label regime: N per class")] = None,
    class_weights: Annotated[bool | None, typer.Option("--class-weights/--no-class-weights")] = None,
    epochs: Annotated[float | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    max_length: Annotated[int | None, typer.Option()] = None,
    aux_weight: Annotated[float | None, typer.Option(help="α of continued denoising on unlabeled text")] = None,
    unlabeled: Annotated[str | None, typer.Option(help="unlabeled text for the auxiliary loss")] = None,
    adversarial: Annotated[str | None, typer.Option(help="adversarial training: none|fgm|pgd|freelb|smart|examples "
                                                         "(sora.objectives.ADVERSARIAL; settings: --set "
                                                         "adversarial.KEY=...)")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="run directory")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option(help="auto|cpu|cuda")] = None,
    resume: Annotated[bool, typer.Option(help="continue from the run's last checkpoint")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    set_: Annotated[list[str] | None, typer.Option("--set", help="any recipe key, e.g. finetune.patience=5")] = None,
) -> None:
    """Fine-tune task heads (and the encoder) on labeled data; keeps the best validation checkpoint."""
    from sora.config import load_finetune_recipe
    from sora.train.finetune import run_finetune

    overrides = _overrides(
        set_, **{"finetune.init": init, "tasks.0.data": data, "tasks.0.validation": validation, "tasks.0.test": test,
                 "tasks.0.type": task_type, "tasks.0.text_column": text_column,
                 "tasks.0.label_column": label_column, "tasks.0.delimiter": _delimiter(delimiter),
                 "tasks.0.labels_per_class": labels_per_class,
                 "tasks.0.class_weights": class_weights, "finetune.epochs": epochs, "train.lr": lr,
                 "data.batch_size": batch_size, "data.max_length": max_length,
                 "finetune.aux_denoise_weight": aux_weight, "finetune.unlabeled": unlabeled, "output": output,
                 "adversarial.method": adversarial,
                 "finetune.seed": seed, "train.device": device, "train.progress": None if progress else False})
    summary = run_finetune(load_finetune_recipe(recipe, overrides), resume=resume)
    best = summary.get("validation") or {}
    typer.echo("best validation: " + ", ".join(f"{k} {v:.4f}" for k, v in best.items()))
    if "multitask" in summary:  # tasks that differ 100x in size see their data a different number of times
        mt = summary["multitask"]
        typer.echo(f"multi-task ({mt['sampler']['sampler']} sampling, {mt['weighting']} weighting): "
                   + ", ".join(f"{t} {e:g} epochs (weight {mt['weights'].get(t, 1.0):.3g})"
                               for t, e in mt["epochs_seen"].items()))
    typer.echo(f"model: {summary['output']}/model  ({summary['steps']} steps, {summary['elapsed_s']} s)")


@app.command()
def evaluate(
    checkpoint: Annotated[str, typer.Argument(help=MODEL_HELP + " (task heads for labeled data; any model for "
                                                  "retrieval and scored pairs)")],
    data: Annotated[str | None, typer.Option(help="labeled data (default: the task's test split), a BEIR "
                                                  "folder (corpus.jsonl, queries.jsonl, qrels/) or scored "
                                                  "pairs")] = None,
    split: Annotated[str, typer.Option(help="split to read when --data is a directory (BEIR: "
                                            "qrels/SPLIT.tsv)")] = "test",
    task: Annotated[str | None, typer.Option(help="task head (when there are several)")] = None,
    score_column: Annotated[str | None, typer.Option(help="pairs: the numeric column to correlate with cosine "
                                                          "similarity (default for a model without task heads: "
                                                          "relatedness, score, similarity or label)")] = None,
    max_length: Annotated[int | None, typer.Option(help="tokens per text (default: the model's)")] = None,
    batch_size: Annotated[int, typer.Option()] = 64,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="report folder")] = None,
    device: Annotated[str, typer.Option()] = "cpu",
    attack: Annotated[str | None, typer.Option(help="task heads: attacks for the robustness section, comma-separated "
                                                    "(char, word) or none (default: char where the head predicts "
                                                    "a label)")] = None,
    attack_examples: Annotated[int, typer.Option(help="examples attacked (a seeded sample of the split)")] = 100,
    lexicon: Annotated[str | None, typer.Option(help="word attack: substitutes, a JSON word → list (default: "
                                                     "../shared/data/lexicon where it exists)")] = None,
) -> None:
    """Metrics and a Markdown report: a task head (confusion matrix, curves, reliability, robustness under a
    character attack), retrieval on a BEIR folder (nDCG@10, recall@100, MRR@10), or cosine-similarity
    correlation on scored pairs (Spearman, Pearson)."""
    import sora
    from sora.attack import parse_methods
    from sora.evaluate.retrieval import summary_line
    from sora.evaluate.run import evaluate_model

    if max_length is not None and max_length < 2:
        raise SoraError(f"--max-length {max_length}: must be at least 2 (the [CLS] and [SEP] tokens)")
    if batch_size < 1:
        raise SoraError(f"--batch-size {batch_size}: must be at least 1")
    if attack_examples < 1:
        raise SoraError(f"--attack-examples {attack_examples}: must be at least 1")
    attacks = None if attack is None else parse_methods(attack)
    result = evaluate_model(sora.load(checkpoint, device=device), data, split, task, output, batch_size, max_length,
                            score_column, progress=sys.stderr.isatty(), attacks=attacks,
                            attack_examples=attack_examples, attack_options={"lexicon": lexicon} if lexicon else None)
    if result["mode"] == "tasks":  # a multi-task checkpoint: every head on its own test split
        for one in result["tasks"].values():
            _task_lines(one)
        for name, why in result["skipped"].items():
            typer.echo(f"{name}: not evaluated: {why}")
        return
    if result["mode"] == "task":
        _task_lines(result)
        return
    typer.echo(summary_line(result))
    typer.echo(f"report: {result['files'].get('report')}")


def _task_lines(result: dict[str, Any]) -> None:
    """One task head's evaluation: its headline metrics, robustness, and where the report is."""
    m = result["metrics"]
    headline = [k for k in result.get("headline") or m if k != "n" and isinstance(m.get(k), int | float)]
    typer.echo(f"{result['task']} on {result['data']} ({m.get('n')} examples): "
               + ", ".join(f"{k} {m[k]:.4f}" for k in headline))
    for name, r in (m.get("robustness") or {}).items():
        typer.echo(_robustness_line(name, r))
    if m.get("robustness_note"):
        typer.echo(f"robustness: {m['robustness_note']}")
    typer.echo(f"report: {result['files'].get('report')}")


def _robustness_line(method: str, r: dict[str, Any]) -> str:
    def num(v: Any, fmt: str = ".4f") -> str:
        return "n/a" if v is None else format(v, fmt)

    words = "n/a" if r.get("words_perturbed") is None else f"{100 * r['words_perturbed']:.1f}%"
    return (f"robustness, {method} attack on {r['n']} examples: accuracy {num(r['clean_accuracy'])} -> "
            f"{num(r['attacked_accuracy'])} under attack, success rate {num(r['success_rate'])}, "
            f"{words} words perturbed, {num(r['queries'], '.1f')} queries")


@app.command("attack")
def attack_command(
    checkpoint: Annotated[str, typer.Argument(help=TUNED_HELP)],
    data: Annotated[str, typer.Argument(help="labeled data: a file, or a directory with the --split")],
    output: Annotated[Path, typer.Option("--output", "--out", "-o", help="outcomes, one JSON line per example")],
    method: Annotated[str, typer.Option(help="word (synonyms, semantic constraint) | char (typos)")] = "word",
    task: Annotated[str | None, typer.Option(help="task head (when there are several)")] = None,
    split: Annotated[str, typer.Option(help="split to read when DATA is a directory")] = "test",
    max_examples: Annotated[int | None, typer.Option(help="attack a seeded sample of this many (default: all)")]
    = None,
    max_words: Annotated[float | None, typer.Option(help="fraction of a text's words that may change [0.3]")] = None,
    max_queries: Annotated[int | None, typer.Option(help="texts the model may score per example [500]")] = None,
    seed: Annotated[int, typer.Option()] = 13,
    lexicon: Annotated[str | None, typer.Option(help="word: substitutes, a JSON word → list, or a directory holding "
                                                     "one (default: ../shared/data/lexicon where it exists; none: "
                                                     "the model's embedding neighbours only)")] = None,
    min_similarity: Annotated[float | None, typer.Option(help="word: least cosine of the original and perturbed "
                                                               "texts' codes [0.8]")] = None,
    encoder: Annotated[str | None, typer.Option(help="word: the model computing those codes (default: the one "
                                                     "attacked), e.g. all-MiniLM-L6-v2")] = None,
    batch_size: Annotated[int, typer.Option()] = 64,
    device: Annotated[str, typer.Option()] = "cpu",
) -> None:
    """Attack a task head offline (TextFooler-like synonym swaps or DeepWordBug-like typos) on labeled data: one
    JSON line per example (original, perturbed, input, labels, success, words changed, queries) and a summary."""
    import random

    import sora
    from sora.attack import Victim, make_attack, summarize
    from sora.evaluate.run import task_config

    if output.suffix.lower() != ".jsonl":
        raise SoraError(f"--output {output}: use a .jsonl file")
    if max_examples is not None and max_examples < 1:
        raise SoraError(f"--max-examples {max_examples}: must be at least 1")
    _check_writable(output)
    model = sora.load(checkpoint, device=device)
    victim = Victim(model, task, batch_size)
    options: dict[str, Any] = {k: v for k, v in {"max_words": max_words, "max_queries": max_queries,
                                                  "min_similarity": min_similarity, "encoder": encoder}.items()
                               if v is not None}
    if lexicon is not None:
        options["lexicon"] = lexicon
    attacker = make_attack(method, victim, seed=seed, **options)
    cfg = task_config(model, victim.name)
    examples = victim.kind.read(data, cfg, split, pair=victim.spec.pair)
    victim.kind.check_labels(examples, victim.spec.labels, str(data))
    if max_examples is not None and len(examples) > max_examples:
        examples = [examples[i] for i in sorted(random.Random(seed).sample(range(len(examples)), max_examples))]
    outcomes = attacker.run(examples)

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as fh:
            for o in outcomes:
                fh.write(json.dumps(o.as_dict(), ensure_ascii=False) + "\n")

    _write_atomically(output, write)
    typer.echo(_robustness_line(method, summarize(outcomes)))
    typer.echo(f"{len(outcomes)} outcomes -> {output}")


@app.command()
def predict(
    checkpoint: Annotated[str, typer.Argument(help=TUNED_HELP)],
    input: Annotated[str, typer.Argument(help="texts: JSONL/CSV/TSV/TXT/Parquet")],
    output: Annotated[Path, typer.Option("--output", "-o", help=".jsonl or .csv")],
    task: Annotated[str | None, typer.Option(help="one task head (default: all)")] = None,
    text_column: Annotated[str | None, typer.Option(help="default: text (text_a for pair tasks when present)")] = None,
    text_b_column: Annotated[str, typer.Option(help="second text of pair tasks")] = "text_b",
    delimiter: Annotated[str | None, typer.Option(help=DELIMITER_HELP)] = None,
    batch_size: Annotated[int, typer.Option()] = 64,
    device: Annotated[str, typer.Option()] = "cpu",
    dtype: Annotated[str | None, typer.Option(help="float32|bfloat16|float16 for the encoder (default: the "
                                                   "checkpoint's)")] = None,
    url: Annotated[str | None, typer.Option(help="a `sora serve` URL to predict with (CHECKPOINT is then ignored; "
                                                 "API key from $SORA_API_KEY)")] = None,
) -> None:
    """Batch predictions with scores, written as JSONL or CSV (one row per input row, in order)."""
    import csv

    import sora
    from sora.data.readers import detect_layout, read_records, resolve_split, text_value
    from sora.errors import DataError
    from sora.tasks import kind_of

    suffix = output.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise SoraError(f"--output {output}: use a .jsonl or .csv file")
    _check_writable(output)
    if url:
        from sora.client import SoraClient

        client = SoraClient(url, api_key=os.environ.get("SORA_API_KEY"), batch_size=batch_size)
        cards = {n: s for n, s in client.models()["tasks"].items() if task in (None, n)}
        pair = any(s["pair"] for s in cards.values())
        kinds = {n: kind_of(s["type"]) for n, s in cards.items()}
    else:
        model = sora.load(checkpoint, device=device, dtype=dtype)
        if not model.model.head_specs:
            kind = "a Hugging Face encoder" if model.config.get("kind") == "hf-encoder" else "a checkpoint"
            raise SoraError(f"{checkpoint}: {kind} with no task heads, so nothing to predict (embed with it: "
                            f"sora embed {checkpoint} ...; or fine-tune it first: sora finetune --init {checkpoint})")
        pair = any(s.pair for n, s in model.model.head_specs.items() if task in (None, n))
        kinds = {n: kind_of(s) for n, s in model.model.head_specs.items() if task in (None, n)}
    # A kind with inputs of its own (QA: question and context) reads those columns; with several heads, choose one.
    own = {n: k.input_columns for n, k in kinds.items() if k.input_columns}
    if own and len(kinds) > 1:
        raise SoraError(f"task {next(iter(own))!r} reads {' and '.join(next(iter(own.values())))} columns: choose "
                        f"it (or another task) with --task (tasks: {', '.join(kinds)})")
    path = resolve_split(input)
    wanted = [text_column or "text", "text_a", text_b_column] if pair else [text_column or "text"]
    if own:
        wanted = list(next(iter(own.values())))
    layout = detect_layout(path, None, delimiter, wanted)
    rows = list(read_records(path, layout=layout))
    if not rows:
        raise DataError(f"{path}: no rows to predict (empty data)")
    if text_column is None:
        first = rows[0][1]
        text_column = "text_a" if pair and "text_a" in first and "text" not in first else "text"
    columns = ([text_column, text_b_column] if pair else [text_column]) if not own else wanted
    records, inputs = [], []
    for line, r in rows:
        absent = [c for c in columns if c not in r]
        if absent:
            raise DataError(f"{path}:{line}: no column {absent[0]!r} ({layout.describe(r)})")
        texts = [text_value(layout, line, r, c) for c in columns]
        records.append(r)
        inputs.append(tuple(texts) if pair else texts[0])
    if url and own:  # a question-answering head is served by /v1/answer
        name = next(iter(own))
        preds = [{name: a} for a in client.answer(inputs, task=name)]
    else:
        preds = client.predict(inputs, tasks=task) if url else model.predict(inputs, task=task, batch_size=batch_size)

    def write(tmp: Path) -> None:
        if suffix == ".jsonl":
            with tmp.open("w", encoding="utf-8") as fh:
                for r, p in zip(records, preds, strict=True):
                    fh.write(json.dumps({**r, "predictions": p}, ensure_ascii=False) + "\n")
            return
        flat = [{**r, **{f"{t}.{k}": (json.dumps(v) if isinstance(v, dict | list) else v)
                         for t, pr in p.items() for k, v in pr.items()}} for r, p in zip(records, preds, strict=True)]
        fields = list(dict.fromkeys(k for row in flat for k in row))  # rows of a JSONL input may differ
        with tmp.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(flat)

    _write_atomically(output, write)
    typer.echo(f"{len(preds)} predictions -> {output}")


@app.command()
def generate(
    checkpoint: Annotated[str, typer.Argument(help="a Sora checkpoint or run directory with a seq2seq head "
                                                   "(sora finetune --task-type seq2seq)")],
    input: Annotated[str, typer.Argument(help="source texts: JSONL/CSV/TSV/TXT/Parquet")],
    output: Annotated[Path, typer.Option("--output", "-o", help=".jsonl: one {source, output} row per input row")],
    beam: Annotated[int | None, typer.Option(help="beam size, 1 = greedy (default: the head's, 4)")] = None,
    max_length: Annotated[int | None, typer.Option(help="most tokens generated per text (default: the head's "
                                                        "max_target_length)")] = None,
    task: Annotated[str | None, typer.Option(help="the seq2seq head (when there are several)")] = None,
    column: Annotated[str | None, typer.Option(help="the source column (default: the first of source, dialogue, "
                                                    "document, text, src in the first row)")] = None,
    delimiter: Annotated[str | None, typer.Option(help=DELIMITER_HELP)] = None,
    batch_size: Annotated[int, typer.Option()] = 32,
    device: Annotated[str, typer.Option()] = "cpu",
) -> None:
    """Generate text (translations, summaries) for each source text, written as JSONL in input order."""
    import sora
    from sora.data.readers import detect_layout, read_records, resolve_split, text_value
    from sora.data.seq2seq import SOURCE_COLUMNS
    from sora.errors import DataError

    if output.suffix.lower() != ".jsonl":
        raise SoraError(f"--output {output}: use a .jsonl file")
    if beam is not None and beam < 1 or max_length is not None and max_length < 1:
        raise SoraError("--beam and --max-length must be at least 1")
    _check_writable(output)
    model = sora.load(checkpoint, device=device)
    name = model.generation_task(task)  # before reading: a model without a seq2seq head says so at once
    path = resolve_split(input)
    layout = detect_layout(path, None, delimiter, [column] if column else list(SOURCE_COLUMNS))
    rows = list(read_records(path, layout=layout))
    if layout.plain_text:
        column = "text"
    elif column is None:
        column = next((c for c in SOURCE_COLUMNS if rows and c in rows[0][1]), "source")
    sources = []
    for line, r in rows:
        if column not in r:
            raise DataError(f"{path}:{line}: no column {column!r} ({layout.describe(r)}); choose it with --column")
        text = text_value(layout, line, r, column)
        if not text.strip():
            raise DataError(f"{path}:{line}: empty {column!r}: nothing to generate from")
        sources.append(text)
    if not sources:
        raise DataError(f"{path}: no rows to generate from (empty data)")
    outputs = model.generate(sources, beam=beam, max_length=max_length, task=name, batch_size=batch_size)

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as fh:
            for source, out in zip(sources, outputs, strict=True):
                fh.write(json.dumps({"source": source, "output": out}, ensure_ascii=False) + "\n")

    _write_atomically(output, write)
    typer.echo(f"{len(outputs)} outputs ({name}) -> {output}")


@app.command()
def tune(
    recipe: Annotated[Path, typer.Argument(help="fine-tuning YAML recipe: the base of every trial")],
    trials: Annotated[int, typer.Option(help="number of trials")] = 20,
    timeout_min: Annotated[float | None, typer.Option("--timeout-min", help="start no new trial after M minutes")
                           ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="study folder (default: <output>-tune)")
                      ] = None,
    seed: Annotated[int, typer.Option(help="seed of the TPE sampler")] = 13,
    set_: Annotated[list[str] | None, typer.Option("--set", help="any recipe key, e.g. data.batch_size=16")] = None,
) -> None:
    """Search lr, epochs, head dropout and the denoising weight (Optuna TPE), pruning bad trials early."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from sora.train.tune import run_tune, trials_table

    summary = run_tune(recipe, _overrides(set_), trials, timeout_min * 60 if timeout_min else None, output, seed,
                       echo=typer.echo)
    header, cells = trials_table(summary["trials"], list(summary["space"]), summary["metric"])
    table = Table(*header, title=f"{summary['n_trials']} trials", title_justify="left", box=box.SIMPLE_HEAD)
    best = summary["best"]
    for row in cells:
        table.add_row(*row, style="bold green" if row[0] == str(best["number"]) else None)
    console = Console()
    (console if console.is_terminal else Console(width=120)).print(table)
    typer.echo(f"best: trial {best['number']}, validation {summary['metric']} {best['value']:.4f}")
    typer.echo(f"recipe: {summary['files']['best_recipe']}  (sora finetune {summary['files']['best_recipe']})")


@app.command("label-curve")
def label_curve(
    recipe: Annotated[Path, typer.Argument(help="fine-tuning YAML recipe; its first task is sampled and tested")],
    sizes: Annotated[str, typer.Option(help="labelled examples per class, comma-separated; full: all")
                     ] = "8,16,32,64,full",
    seeds: Annotated[int, typer.Option(help="runs per size (different label samples)")] = 3,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="folder (default: <output>-label-curve)")
                      ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="any recipe key, e.g. finetune.epochs=10")] = None,
) -> None:
    """Test score against labels per class (mean ± std over seeds): does labelling more pay off?"""
    from sora.train.label_curve import parse_sizes, run_label_curve

    result = run_label_curve(recipe, _overrides(set_), parse_sizes(sizes), seeds, output, echo=typer.echo)
    for s in result["summary"]:
        typer.echo(f"{s['size']:>6} per class: test {result['metric']} {s['mean']:.4f} ± {s['std']:.4f} (n={s['n']})")
    typer.echo(f"plot: {result['files']['plot']}  table: {result['files']['markdown']}")


@app.command()
def serve(
    checkpoint: Annotated[str, typer.Argument(help=MODEL_HELP)],
    host: Annotated[str, typer.Option(help="address to bind (loopback unless you say otherwise)")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    workers: Annotated[int, typer.Option(help="worker processes (each loads the model and batches on its own)")
                       ] = 1,
    threads: Annotated[int | None, typer.Option(help="torch threads per worker (default: its share of the CPUs, "
                                                     "less one for HTTP)")] = None,
    api_key_env: Annotated[str, typer.Option(help="env var holding the bearer API key; unset or empty: no auth")
                           ] = "SORA_API_KEY",
    max_batch_tokens: Annotated[int, typer.Option(help="padded tokens per forward pass")] = 8192,
    max_wait_ms: Annotated[float, typer.Option(help="how long a request may wait for others to batch with")] = 5.0,
    max_queue: Annotated[int, typer.Option(help="requests waiting for a forward pass before 429")] = 1024,
    max_texts: Annotated[int, typer.Option(help="texts per request before 413")] = 256,
    max_chars: Annotated[int, typer.Option(help="characters per text before 413")] = 5000,
    max_new_tokens: Annotated[int, typer.Option(help="/v1/generate: tokens generated per text (default and "
                                                     "cap)")] = 128,
    max_beam: Annotated[int, typer.Option(help="/v1/generate: the widest beam a request may ask for")] = 8,
    max_body_bytes: Annotated[int | None, typer.Option(help="request body bytes before 413 (default: what "
                                                            "--max-texts and --max-chars allow)",
                                                       envvar="SORA_MAX_BODY_BYTES")] = None,
    body_timeout_s: Annotated[float, typer.Option(help="seconds a request body may take to arrive before 408",
                                                  envvar="SORA_BODY_TIMEOUT_S")] = 10.0,
    backend: Annotated[str, typer.Option(help="auto|torch|onnx (auto: what the checkpoint says, see sora compress)")
                       ] = "auto",
    device: Annotated[str, typer.Option()] = "cpu",
    dtype: Annotated[str, typer.Option(help="auto|float32|bfloat16|float16: what the encoder computes in (auto: "
                                            "the checkpoint's; bfloat16 pays on CPUs with AVX-512 BF16 / AMX)")
                     ] = "auto",
    access_log: Annotated[bool, typer.Option(help="log every request")] = False,
    model_name: Annotated[str | None, typer.Option(help="name in /v1/models, answers and metrics (default: the "
                                                        "checkpoint's directory name)", envvar="SORA_MODEL_NAME")
                          ] = None,
) -> None:
    """Serve a checkpoint over HTTP (FastAPI): /v1/embed, /v1/predict, /v1/answer, /v1/generate, /v1/models,
    /healthz, /readyz, /metrics."""
    from pydantic import ValidationError

    from sora.errors import ConfigError
    from sora.serve import ServeSettings, run

    try:
        settings = ServeSettings(checkpoint=checkpoint, host=host, port=port, workers=workers, threads=threads,
                                 api_key_env=api_key_env or None, max_batch_tokens=max_batch_tokens,
                                 max_wait_ms=max_wait_ms, max_queue=max_queue, max_texts=max_texts,
                                 max_chars=max_chars, max_new_tokens=max_new_tokens, max_beam=max_beam,
                                 backend=backend, device=device, access_log=access_log,
                                 model_name=model_name, dtype=dtype, max_body_bytes=max_body_bytes,
                                 body_timeout_s=body_timeout_s)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
    run(settings)


@app.command()
def compress(
    checkpoint: Annotated[str, typer.Argument(help=TUNED_HELP)],
    output: Annotated[Path, typer.Option("--output", "-o", help="directory of the compressed checkpoint")],
    method: Annotated[str, typer.Option(help="prune | int8 (PyTorch) | onnx | onnx-int8 (ONNX Runtime) | bf16 "
                                             "(encoder in bfloat16: CPUs with AVX-512 BF16 / AMX, GPUs)")],
    prune_heads: Annotated[float | None, typer.Option(help="fraction of attention heads to remove "
                                                           "(default: 0.3 with --method prune, else 0)")] = None,
    prune_layers: Annotated[int, typer.Option(help="encoder layers to remove")] = 0,
    layer_order: Annotated[str, typer.Option(help="which layers go: importance (lowest) | top")] = "importance",
    max_drop: Annotated[float, typer.Option(help="largest validation metric drop allowed, in points")] = 1.0,
    warn_only: Annotated[bool, typer.Option(help="keep the model (with a warning) when it drops more")] = False,
    data: Annotated[str | None, typer.Option(help="validation data (default: the task's, from the recipe)")] = None,
    task: Annotated[str | None, typer.Option(help="task head to measure (default: all)")] = None,
    max_examples: Annotated[int | None, typer.Option(help="validation examples at most (sampled)")] = None,
    keep_decoder: Annotated[bool, typer.Option(help="keep the denoising decoder (to pretrain further)")] = False,
    keep_fp32: Annotated[str, typer.Option(help="int8 methods: layers left fp32, comma-separated name endings; "
                                                "none: every encoder Linear in int8")] = "ffn.down",
) -> None:
    """Prune, quantize or export a fine-tuned model, refusing it if validation accuracy drops too far."""
    from sora.compress.core import compress as run_compress

    fp32 = tuple(x.strip() for x in keep_fp32.split(",") if x.strip() and x.strip().lower() != "none")
    r = run_compress(checkpoint, output, method, prune_heads=prune_heads, prune_layers=prune_layers,
                     layer_order=layer_order, max_drop=max_drop, warn_only=warn_only, data=data, task=task,
                     max_examples=max_examples, keep_decoder=keep_decoder, keep_fp32=fp32)
    if r.get("warning"):
        typer.secho(f"warning: {r['warning']}", fg="yellow", err=True)
    fmt = ", ".join(f"{k} {v:.4f}" for k, v in r["validation_after"].items())
    typer.echo(f"{method}: validation {fmt} ({r['accuracy_drop_points']:+.2f} points lost), "
               f"{r['size_mb_before']:.1f} -> {r['size_mb']:.1f} MB, {r['speedup']:.2f}x faster "
               f"({r['latency_ms_per_text']:.2f} ms/text at batch 32)")
    typer.echo(f"model: {r['output']}")


@app.command()
def embed(
    checkpoint: Annotated[str, typer.Argument(help=MODEL_HELP)],
    input: Annotated[str, typer.Argument(help="texts: JSONL/CSV/TSV/TXT/Parquet")],
    output: Annotated[Path, typer.Option("--output", "-o", help=".npy or .parquet")],
    column: Annotated[str, typer.Option()] = "text",
    format: Annotated[str | None, typer.Option()] = None,
    delimiter: Annotated[str | None, typer.Option(help=DELIMITER_HELP)] = None,
    batch_size: Annotated[int, typer.Option()] = 64,
    normalize: Annotated[bool, typer.Option(help="L2-normalise the vectors")] = False,
    device: Annotated[str, typer.Option()] = "cpu",
    dtype: Annotated[str | None, typer.Option(help="float32|bfloat16|float16 for the encoder (default: the "
                                                   "checkpoint's)")] = None,
) -> None:
    """Embed texts into sentence vectors, one per input row in order, an empty text included (.npy, or
    .parquet with row, line and text beside each vector)."""
    import numpy as np

    import sora
    from sora.data.readers import read_column

    suffix = output.suffix.lower()
    if suffix not in (".npy", ".parquet"):
        raise SoraError(f"--output {output}: use a .npy or .parquet file")
    if suffix == ".parquet":  # before the work, not after it
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise missing(exc, f"--output {output}") from exc
    _check_writable(output)
    model = sora.load(checkpoint, device=device, dtype=dtype)
    lines, texts = [], []
    for line, text in read_column(input, column, format, delimiter):
        lines.append(line)
        texts.append(text)
    vectors = model.embed(texts, batch_size=batch_size, normalize=normalize, progress=True)

    def write(tmp: Path) -> None:
        if suffix == ".npy":
            with tmp.open("wb") as fh:  # a file object: np.save would add .npy to the temporary name
                np.save(fh, vectors)
        else:  # row: the .npy row and input record index; line: where the record is in the input file
            table = pa.table({"row": pa.array(range(len(texts)), pa.int64()), "line": pa.array(lines, pa.int64()),
                              "text": texts, "embedding": list(vectors)})
            pq.write_table(table, tmp)

    _write_atomically(output, write)
    typer.echo(f"{len(texts)} vectors of dim {vectors.shape[1]} -> {output}")


@app.command()
def info(
    checkpoint: Annotated[str, typer.Argument(help=MODEL_HELP)],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Describe a model: architecture, size, training and metadata."""
    import sora

    details = sora.load(checkpoint).info()
    if as_json:
        typer.echo(json.dumps(details, indent=2))
        return
    for key, value in details.items():
        typer.echo(f"{key:>15}: {value}")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Sora's own warnings as one yellow line, like its errors; others as Python shows them."""
    if issubclass(category, SoraWarning):
        typer.secho(f"warning: {message}", fg="yellow", err=True)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main() -> None:
    warnings.showwarning = _show_warning
    try:
        app(standalone_mode=False)
    except SoraError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.TyperException as exc:  # usage errors: typer ≥ 0.26 raises its own (vendored) click's, not click's
        if not hasattr(exc, "show"):
            raise
        exc.show()
        sys.exit(getattr(exc, "exit_code", 2))


if __name__ == "__main__":
    main()
