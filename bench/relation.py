"""Relation extraction (SemEval-2010 Task 8): Sora's ``relation`` task kind against the Hugging Face reference, both
fine-tuned from all-MiniLM-L6-v2 on the same training rows and the SAME marked text.

Systems
  hf    transformers AutoModelForSequenceClassification(num_labels=19) + Trainer with its documented defaults
        (num_train_epochs 3 (--epochs), learning_rate 5e-5, per_device_train_batch_size 8, linear decay, no warmup,
        the last model; max_length 128 as run_glue.py's default, DataCollatorWithPadding), the [CLS] head, on the
        text as Sora marks it (sora.data.relation.mark: "@ head @ ... # tail #", Zhou & Chen 2021's punctuation
        markers), so both systems read the same input. ``--hf-sweep``: lr in {2e-5, 5e-5, 1e-4}, chosen by
        validation macro-F1 (without it, HF uses no validation set, as its users by default)
  sora  the CLI as a user types it: ``sora finetune --init all-MiniLM-L6-v2 --data DIR --task-type relation --seed S
        -o OUT`` (Sora's own schedule; it selects on DIR/validation.jsonl), then ``sora evaluate OUT/model --data DIR
        --split test -o REPORT`` (REPORT/metrics.json)

Score: the official one (sora.metrics.semeval.semeval_scores: macro-F1 over the 9 relations excluding Other,
direction-aware, scorer v1.2's (iii)), and accuracy over the 19 labels, both in percent, on the test split.

    python bench/relation.py --quick --threads 1      # < 2 minutes: 200 train rows, 1 HF epoch, 100 test rows
    python bench/relation.py --threads 2              # all 7,201 train rows, the 2,717 test rows
    python bench/relation.py --device cuda --hf-sweep

Output: bench/results/relation.json (relation.quick.json with --quick; --json PATH), the JSON as the last stdout
line. Exit status 1 when a selected system failed (its cell says why), e.g. Sora's ``relation`` kind not (yet) there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from common import (
    REPO,
    SHARED_DATA,
    SoraFailed,
    command_line,
    load_average,
    log,
    machine_info,
    minilm_path,
    offline,
    resolve_device,
    result_path,
    run_sora,
    seeded_sample,
    write_json,
)

sys.path.insert(0, str(REPO / "src"))

NAME = "relation"
SYSTEMS = ("sora", "hf")  # Sora first: its failure shows early
DATASET = "semeval2010_task8"
WORK = REPO / "runs" / "relation"
DATA_SEED = 13
HF_LR, HF_SWEEP = 5e-5, (2e-5, 5e-5, 1e-4)
HF_BATCH, HF_MAX_LENGTH = 8, 128
SORA_FINETUNE = "sora finetune --init all-MiniLM-L6-v2 --data {data} --task-type relation --seed {seed} -o {out} " \
                "--no-progress"
SORA_EVALUATE = "sora evaluate {model} --data {data} --split test -o {report}"
HF_COMMAND = ("AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=19) + Trainer("
              "TrainingArguments(learning_rate={lr}, num_train_epochs={epochs}, per_device_train_batch_size=8, "
              "seed={seed}, save_strategy='no', report_to='none'), DataCollatorWithPadding) on "
              "tok(sora.data.relation.mark(example)[0], truncation=True, max_length=128)")
BUDGETS = {"cpu": {"max_train": None, "max_val": None, "max_test": None, "epochs": 3.0},
           "cuda": {"max_train": None, "max_val": None, "max_test": None, "epochs": 3.0},
           "quick": {"max_train": 200, "max_val": 100, "max_test": 100, "epochs": 1.0}}


def sample_rows(rows: list[dict[str, Any]], cap: int | None) -> list[dict[str, Any]]:
    return seeded_sample(rows, cap, DATA_SEED)


# ---- data ------------------------------------------------------------------------------------------------------


def read_rows(split: str) -> list[dict[str, Any]]:
    with (SHARED_DATA / DATASET / f"{split}.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def make_data(b: dict[str, Any]) -> Path:
    """The rows every system reads, as the dataset has them (inline <e1>/<e2> markers)."""
    splits = {"train": sample_rows(read_rows("train"), b["max_train"]),
              "validation": sample_rows(read_rows("validation"), b["max_val"]),
              "test": sample_rows(read_rows("test"), b["max_test"])}
    d = WORK / "data" / "-".join(f"{k[0]}{len(v)}" for k, v in splits.items())
    d.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                          encoding="utf-8")
    return d


def labels() -> list[str]:
    return list(json.loads((SHARED_DATA / DATASET / "meta.json").read_text())["labels"])


# ---- Sora -------------------------------------------------------------------------------------------------------


def sora_relation(data: Path, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    out = WORK / "work" / f"sora-s{args.seed}"
    shutil.rmtree(out, ignore_errors=True)
    stdout, wall, argv = run_sora(SORA_FINETUNE, device, args.threads, data=data, seed=args.seed, out=out)
    m = re.search(r"\((\d+) steps, ([\d.]+) s\)", stdout)  # "model: OUT/model  (N steps, E s)"
    config = json.loads((out / "model" / "config.json").read_text())
    report = out / "eval-test"
    _, eval_wall, eval_argv = run_sora(SORA_EVALUATE, device, args.threads, model=out / "model", data=data,
                                      report=report)
    metrics = json.loads((report / "metrics.json").read_text())
    cell = {"macro_f1": round(float(metrics["macro_f1"]), 2), "accuracy": round(float(metrics["accuracy"]), 2),
            "seconds": round(float(m.group(2)) if m else wall, 1),
            "steps": int(m.group(1)) if m else config.get("metadata", {}).get("steps"),
            "seconds_source": "training loop (CLI 'model:' line)" if m else "wall time of sora finetune",
            "wall_s": round(wall, 1), "eval_wall_s": round(eval_wall, 1), "n": metrics.get("n"),
            "schedule": next((ln for ln in stdout.splitlines() if ln.startswith("fine-tuning:")), None),
            "validation": config.get("metadata", {}).get("validation"),
            "per_relation": metrics.get("per_relation"),
            "commands": [shlex.join(argv), shlex.join(eval_argv)]}
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return cell


# ---- HF ---------------------------------------------------------------------------------------------------------


def hf_train(data: Path, args: argparse.Namespace, device: torch.device, epochs: float, lr: float,
             splits: tuple[str, ...]) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Train on the marked text; predicted labels of each of ``splits`` and the training info."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from sora.data.relation import mark, read_relations

    names = labels()
    index = {lb: i for i, lb in enumerate(names)}
    path = str(minilm_path())
    tok = AutoTokenizer.from_pretrained(path)

    def encode(split: str) -> tuple[list[dict[str, Any]], list[str]]:
        examples = read_relations(data, split)
        enc = tok([mark(e)[0] for e in examples], truncation=True, max_length=HF_MAX_LENGTH)
        gold = [str(e.label) for e in examples]
        return [{**{k: enc[k][i] for k in enc}, "labels": index[g]} for i, g in enumerate(gold)], gold

    train, _ = encode("train")
    set_seed(args.seed)
    out = WORK / "work" / "hf-trainer"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(names), id2label=dict(enumerate(names)), label2id=index)
    # Defaults, but the seed (and the sweep's lr), no intermediate checkpoints, no logging integrations.
    targs = TrainingArguments(output_dir=str(out), learning_rate=lr, num_train_epochs=epochs, seed=args.seed,
                              save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=100,
                              use_cpu=device.type != "cuda")
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=DataCollatorWithPadding(tok))
    result = trainer.train()
    info = {"seconds": round(float(result.metrics["train_runtime"]), 1), "steps": int(result.global_step),
            "wall_s": round(time.perf_counter() - t0, 1), "lr": lr, "epochs": epochs, "train_rows": len(train),
            "batch_size": targs.per_device_train_batch_size,
            "examples_per_s": round(float(result.metrics["train_samples_per_second"]), 2)}
    preds = {}
    for split in splits:
        rows, gold = encode(split)
        logits = trainer.predict(rows).predictions
        preds[split] = [names[i] for i in logits.argmax(-1)]
        preds[f"{split}_gold"] = gold
    del trainer, model
    shutil.rmtree(out, ignore_errors=True)
    return preds, info


def run_hf(data: Path, args: argparse.Namespace, device: torch.device, epochs: float) -> dict[str, Any]:
    from sora.metrics.semeval import semeval_scores

    sweep = {}
    if args.hf_sweep:
        best = None
        for lr in HF_SWEEP:
            log(f"  hf lr {lr:g}")
            preds, info = hf_train(data, args, device, epochs, lr, ("validation", "test"))
            val = semeval_scores(preds["validation_gold"], preds["validation"])["macro_f1"]
            sweep[f"{lr:g}"] = {"val_macro_f1": round(val, 2), "seconds": info["seconds"]}
            log(f"    validation macro-F1 {val:.2f}")
            if best is None or val > best[0]:
                best = (val, preds, info)
        _, preds, info = best
    else:
        preds, info = hf_train(data, args, device, epochs, HF_LR, ("test",))
    s = semeval_scores(preds["test_gold"], preds["test"])
    cell = {"macro_f1": round(s["macro_f1"], 2), "accuracy": round(s["accuracy"], 2), **info, "n": s["n"],
            "per_relation": {k: {kk: round(vv, 2) for kk, vv in v.items()} for k, v in s["per_relation"].items()}}
    if sweep:
        cell["sweep"] = sweep
    return cell


# ---- main -------------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run (< 2 min), relation.quick.json")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch threads for every system (default: all cores)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, of sora, hf")
    p.add_argument("--json", type=Path, default=None, help="output file (default bench/results/relation[.quick].json)")
    p.add_argument("--max-train", type=int, default=None, help="training rows (default all 7,201; quick 200)")
    p.add_argument("--max-val", type=int, default=None, help="validation rows (default all 799; quick 100)")
    p.add_argument("--max-test", type=int, default=None, help="test rows (default all 2,717; quick 100)")
    p.add_argument("--epochs", type=float, default=None, help="HF epochs (default 3, TrainingArguments'; quick 1)")
    p.add_argument("--hf-sweep", action="store_true", help="HF lr in {2e-5, 5e-5, 1e-4} by validation macro-F1")
    p.add_argument("--keep", action="store_true", help="keep Sora's run folder under runs/relation/work")
    args = p.parse_args()
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        p.error(f"--systems: unknown {', '.join(unknown)} (choose from {', '.join(SYSTEMS)})")
    return args


def main() -> None:
    args = parse_args()
    offline()
    device = resolve_device(args.device)
    args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    b = dict(BUDGETS["quick" if args.quick else device.type])
    for key in b:
        if getattr(args, key, None) is not None:
            b[key] = getattr(args, key)
    t_start = time.perf_counter()
    import transformers

    import sora

    data = make_data(b)
    log(f"relation: systems {', '.join(args.systems)}; budget {b}; {args.threads} threads on {device}; data {data}")
    results: dict[str, Any] = {}
    failed = []
    for system in [s for s in SYSTEMS if s in args.systems]:
        log(system)
        try:
            cell = sora_relation(data, args, device) if system == "sora" else run_hf(data, args, device, b["epochs"])
        except Exception as exc:  # one broken system must not lose the other
            msg = f"{exc.__class__.__name__}: {exc}"
            if isinstance(exc, SoraFailed):
                msg += (" -- Sora's relation task kind (sora finetune --task-type relation) is not available "
                        "(or failed) in this checkout")
            else:
                traceback.print_exc(file=sys.stderr)
            log(f"  {system} FAILED: {msg}")
            failed.append(system)
            results[system] = {"status": "failed", "error": msg}
            continue
        results[system] = cell
        log(f"  {system}: macro-F1 {cell['macro_f1']:.2f}, accuracy {cell['accuracy']:.2f}, {cell['seconds']}s "
            f"training ({cell['steps']} steps)")
    hf_lr = results.get("hf", {}).get("lr", HF_LR)
    results["meta"] = {
        "command": command_line(),
        "commands": {"sora_finetune": SORA_FINETUNE, "sora_evaluate": SORA_EVALUATE,
                     "hf": HF_COMMAND.format(lr=f"{hf_lr:g}", epochs=f"{b['epochs']:g}", seed=args.seed),
                     "cuda": "--device cuda is appended to both sora commands on a GPU"},
        "budget": {**b, "seed": args.seed, "data_seed": DATA_SEED, "threads": args.threads, "device": device.type,
                   "hf_sweep": list(HF_SWEEP) if args.hf_sweep else None},
        "data": {"dir": str(data.relative_to(REPO)),
                 "rows": "semeval2010_task8 train / validation / test (official test), each capped as a seeded "
                         "sample (seed 13) where a cap is given; validation is read by Sora (checkpoint "
                         "selection) and by HF only with --hf-sweep",
                 "input": "both systems read the text as sora.data.relation.mark renders it (punctuation entity "
                          "markers); Sora pools the two opening markers, HF its [CLS] head as its users do"},
        "definitions": {"macro_f1": "official SemEval-2010 Task 8 score (9 relations, Other excluded, direction-"
                                    "aware; sora.metrics.semeval.semeval_scores), percent",
                        "accuracy": "exact 19-label accuracy, Other included, percent",
                        "seconds": "training time. hf: Trainer's train_runtime (the training loop). sora: the "
                                   "training loop's elapsed time printed by `sora finetune` ('model: ... (N steps, "
                                   "E s)'), its validation passes included; wall_s: the whole command",
                        "steps": "optimizer steps (Sora picks its own schedule; HF: epochs x rows / 8)"},
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "sora": getattr(sora, "__version__", "unknown")},
        "machine": machine_info(device), "load_average": load_average(), "failed": failed,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    path = args.json or result_path(NAME, args.quick)
    write_json(path, results)
    log(f"wrote {path}")
    print(json.dumps(results), flush=True)
    if failed:
        log(f"FAILED: {', '.join(failed)} (see their cells)")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
