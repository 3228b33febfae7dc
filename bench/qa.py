"""Extractive question answering: Sora's ``qa`` task kind against the Hugging Face reference, fine-tuned from the
same all-MiniLM-L6-v2 on the same SQuAD v1.1 questions.

Systems
  hf            transformers AutoModelForQuestionAnswering + Trainer, as run_qa.py runs it (bench/hf_qa.py:
                its pre/post-processing, the README's SQuAD recipe: lr 3e-5, batch 12, the bench's --epochs,
                max_seq_length / doc_stride, no validation-based selection: run_qa's users have none)
  sora          the CLI as a user types it: ``sora finetune --init all-MiniLM-L6-v2 --data DIR --task-type qa
                --seed S -o OUT`` (+ the same --epochs, --max-length and doc stride, see --sora-schedule), then
                ``sora evaluate OUT/model --data DIR --split test -o REPORT`` (REPORT/metrics.json); Sora selects
                its checkpoint on DIR/validation.jsonl (squad_v1 validation, capped)
  minilm        cmrc2018 (Chinese): the same Sora commands from all-MiniLM-L6-v2 as it is (its English WordPiece
                vocabulary covers only part of the Chinese characters)
  sora_scratch  cmrc2018: ``sora pretrain recipes/pretrain-scratch.yaml`` (its own tokenizer) on the cmrc2018
                train contexts (split into sentences), then the same fine-tuning ``--init`` that run

Evaluation sets: squad_v1_test (the second half of the official dev set, by article; --max-test) and xquad_en
(all 1,190 XQuAD questions: its three splits are only an article partition of an evaluation-only set, and no
system trains on any of it; --max-xquad), both scored by sora.metrics.squad (evaluate-v1.1.py semantics);
cmrc2018's test split (the official dev set) by the CMRC 2018 metric.

    python bench/qa.py --quick --systems hf --threads 1       # < 2 minutes: 120 questions, 128 / 32
    python bench/qa.py --threads 2                            # CPU budget: 8,000 questions, 1 epoch
    python bench/qa.py --device cuda                          # the full train set, 2 epochs (the README's)

Output: bench/results/qa.json (qa.quick.json with --quick; --json PATH), the JSON also as the last stdout line.
Exit status 1 when a selected system failed (its cell says why), e.g. Sora's ``qa`` kind not (yet) available.
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

import hf_qa
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

NAME = "qa"
SYSTEMS = ("hf", "sora", "minilm", "sora_scratch")
SQUAD_SYSTEMS, CMRC_SYSTEMS = ("sora", "hf"), ("minilm", "sora_scratch")  # Sora first: its failure shows early
WORK = REPO / "runs" / "qa"
DATA_SEED = 13  # which questions are sampled: the same for every system and every --seed

# The commands, as templates ({...} filled per run; --device cuda added on a GPU). --epochs and --max-length give
# Sora the same budget and windows as HF (--sora-schedule own drops --epochs). The doc stride: Sora's default is
# run_qa's 128 (sora.data.qa.qa_features), so SORA_STRIDE is added only for another stride (--quick's 32).
SORA_FINETUNE = ("sora finetune --init {init} --data {data} --task-type qa --seed {seed} -o {out} --epochs {epochs} "
                 "--max-length {max_length} --no-progress")
SORA_DEFAULT_STRIDE = 128
SORA_STRIDE = " --set tasks.0.options.stride={stride}"  # the qa kind's option (sora.tasks.qa.QAOptions)
SORA_EVALUATE = "sora evaluate {model} --data {data} --split test -o {report}"
SORA_PRETRAIN = ("sora pretrain recipes/pretrain-scratch.yaml --train {train} --validation {validation} --column text "
                 "--max-steps {steps} --seed {seed} -o {out} --no-progress")
HF_COMMAND = ("bench/hf_qa.py train_and_predict: AutoModelForQuestionAnswering.from_pretrained(minilm_path()) + "
              "Trainer(TrainingArguments(learning_rate=3e-5, per_device_train_batch_size=12, num_train_epochs={epochs}"
              ", seed={seed}, save_strategy='no', report_to='none'), default_data_collator) on run_qa.py's "
              "prepare_train_features(max_seq_length={max_length}, doc_stride={stride}, pad_to_max_length=True); "
              "postprocess_qa_predictions(n_best_size=20, max_answer_length=30)")

BUDGETS = {  # train questions, epochs, max length, stride, validation cap, test caps, scratch pretraining steps
    "cpu": {"train_questions": 8000, "epochs": 1.0, "max_length": 384, "stride": 128, "max_val": 1000,
            "max_test": None, "max_xquad": None, "scratch_steps": 2000},
    "cuda": {"train_questions": None, "epochs": 2.0, "max_length": 384, "stride": 128, "max_val": 1000,
             "max_test": None, "max_xquad": None, "scratch_steps": 20000},
    "quick": {"train_questions": 120, "epochs": 1.0, "max_length": 128, "stride": 32, "max_val": 30,
              "max_test": 30, "max_xquad": 30, "scratch_steps": 20},
}


def sample_rows(rows: list[dict[str, Any]], cap: int | None) -> list[dict[str, Any]]:
    return seeded_sample(rows, cap, DATA_SEED)


# ---- data ------------------------------------------------------------------------------------------------------


DROPPED: dict[str, list[str]] = {}  # rows a QA system cannot use (an empty question), by data set and split


def read_rows(name: str, split: str) -> list[dict[str, Any]]:
    """The split's rows, less those without a question, a context or an answer (cmrc2018's trial set has two
    empty questions; Sora refuses such rows with their line, as it should), recorded in meta.dropped."""
    path = SHARED_DATA / name / f"{split}.jsonl"
    with path.open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    usable = [r for r in rows if str(r.get("question", "")).strip() and str(r.get("context", "")).strip()
              and (r.get("answers") or {}).get("text")]
    if len(usable) < len(rows):
        DROPPED[f"{name}/{split}"] = [r.get("id") for r in rows if r not in usable]
        log(f"{name}/{split}: {len(rows) - len(usable)} rows without a question, context or answer left out")
    return usable


def write_split(directory: Path, split: str, rows: list[dict[str, Any]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    keys = ("id", "title", "context", "question", "answers")
    (directory / f"{split}.jsonl").write_text(
        "".join(json.dumps({k: r[k] for k in keys if k in r}, ensure_ascii=False) + "\n" for r in rows),
        encoding="utf-8")


def references(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    return {r["id"]: list(r["answers"]["text"]) for r in rows}


def squad_data(b: dict[str, Any]) -> dict[str, Any]:
    """squad_v1's train subset, validation (XQuAD's questions removed: they are SQuAD dev questions, so Sora's
    selection never sees an evaluation question) and test; xquad_en (all splits) as a second test set."""
    xquad = [r for split in ("train", "validation", "test") for r in read_rows("xquad_en", split)]
    xquad_ids = {r["id"] for r in xquad}
    train = sample_rows(read_rows("squad_v1", "train"), b["train_questions"])
    val = sample_rows([r for r in read_rows("squad_v1", "validation") if r["id"] not in xquad_ids], b["max_val"])
    test = sample_rows(read_rows("squad_v1", "test"), b["max_test"])
    xquad = sample_rows(xquad, b["max_xquad"])
    d = WORK / "data" / f"squad-q{len(train)}-v{len(val)}-t{len(test)}"
    xd = WORK / "data" / f"xquad_en-t{len(xquad)}"
    for split, rows in (("train", train), ("validation", val), ("test", test)):
        write_split(d, split, rows)
    write_split(xd, "test", xquad)
    return {"dir": d, "train": train, "sets": {"squad_v1_test": (d, test), "xquad_en": (xd, xquad)}}


def cmrc_data(b: dict[str, Any]) -> dict[str, Any]:
    train = sample_rows(read_rows("cmrc2018", "train"), b["train_questions"])
    val = sample_rows(read_rows("cmrc2018", "validation"), b["max_val"])
    test = sample_rows(read_rows("cmrc2018", "test"), b["max_test"])
    d = WORK / "data" / f"cmrc2018-q{len(train)}-v{len(val)}-t{len(test)}"
    for split, rows in (("train", train), ("validation", val), ("test", test)):
        write_split(d, split, rows)
    return {"dir": d, "train": train, "sets": {"cmrc2018": (d, test)}}


def sentences_file(path: Path, rows: list[dict[str, Any]]) -> Path:
    """The distinct contexts of ``rows`` split into sentences (after 。！？; kept whole when shorter), as JSONL."""
    seen: dict[str, None] = {}
    for r in rows:
        for s in re.split(r"(?<=[。！？])", r["context"]):
            s = " ".join(s.split())
            if len(s) >= 4:
                seen.setdefault(s)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": s}, ensure_ascii=False) + "\n" for s in seen), encoding="utf-8")
    return path


# ---- Sora -------------------------------------------------------------------------------------------------------


def sora_qa(system: str, init: str, data: dict[str, Any], args: argparse.Namespace, b: dict[str, Any],
            device: torch.device, n_features: int) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``sora finetune`` then ``sora evaluate`` on every evaluation set: ({set: cell}, training info)."""
    out = WORK / "work" / f"{system}-s{args.seed}"
    shutil.rmtree(out, ignore_errors=True)
    template = finetune_template(args, b)
    stdout, wall, argv = run_sora(template, device, args.threads, init=init, data=data["dir"], seed=args.seed, out=out,
                                 epochs=f"{b['epochs']:g}", max_length=b["max_length"], stride=b["stride"])
    # "model: OUT/model  (N steps, E s)": E is the training loop's time (its validation passes included).
    m = re.search(r"\((\d+) steps, ([\d.]+) s\)", stdout)
    config = json.loads((out / "model" / "config.json").read_text())
    steps = int(m.group(1)) if m else config.get("metadata", {}).get("steps")
    seconds = float(m.group(2)) if m else wall
    batch = (config.get("recipe") or {}).get("data", {}).get("batch_size")
    info = {"steps": steps, "seconds": round(seconds, 1), "seconds_source": "training loop (CLI 'model:' line)" if m
            else "wall time of sora finetune", "wall_s": round(wall, 1), "batch_size": batch,
            "train_questions": len(data["train"]), "command": shlex.join(argv),
            "schedule": next((ln for ln in stdout.splitlines() if ln.startswith("fine-tuning:")), None),
            "validation": config.get("metadata", {}).get("validation")}
    info["examples_per_s"] = questions_per_s(len(data["train"]), steps, batch, n_features, seconds)
    cells = {}
    for name, (directory, rows) in data["sets"].items():
        report = out / f"eval-{name}"
        _, eval_wall, eval_argv = run_sora(SORA_EVALUATE, device, args.threads, model=out / "model", data=directory,
                                          report=report)
        metrics = json.loads((report / "metrics.json").read_text())
        cells[name] = {"em": round(float(metrics["exact_match"]), 2), "f1": round(float(metrics["f1"]), 2),
                       "n": metrics.get("n", len(rows)), "examples_per_s": info["examples_per_s"],
                       "seconds": info["seconds"], "steps": steps, "eval_wall_s": round(eval_wall, 1),
                       "eval_command": shlex.join(eval_argv)}
        log(f"  {system} {name}: EM {cells[name]['em']:.2f} F1 {cells[name]['f1']:.2f}")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return cells, info


def finetune_template(args: argparse.Namespace, b: dict[str, Any]) -> str:
    template = SORA_FINETUNE if args.sora_schedule == "same" else SORA_FINETUNE.replace(" --epochs {epochs}", "")
    return template + (SORA_STRIDE if b["stride"] != SORA_DEFAULT_STRIDE else "")


def scratch_init(data: dict[str, Any], args: argparse.Namespace, b: dict[str, Any], device: torch.device,
                 validation: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    out = WORK / "work" / f"scratch-pretrain-{b['scratch_steps']}steps-s{args.seed}"
    shutil.rmtree(out, ignore_errors=True)
    train = sentences_file(WORK / "data" / "cmrc2018-sentences" / "train.jsonl", data["train"])
    val = sentences_file(WORK / "data" / "cmrc2018-sentences" / "validation.jsonl", validation)
    stdout, wall, argv = run_sora(SORA_PRETRAIN, device, args.threads, train=train, validation=val, out=out,
                                 steps=b["scratch_steps"], seed=args.seed)
    line = next((ln for ln in stdout.splitlines() if ln.startswith("model:")), "")
    return str(out), {"command": shlex.join(argv), "wall_s": round(wall, 1), "summary": line.strip(),
                      "sentences": sum(1 for _ in train.open(encoding="utf-8"))}


# ---- HF ---------------------------------------------------------------------------------------------------------


def questions_per_s(questions: int, steps: int | None, batch: int | None, features: int,
                    seconds: float) -> float | None:
    """Training questions per second: questions x epochs done / training seconds, where epochs done =
    steps x batch / training features (run_qa's windows at the common max length and stride)."""
    if not steps or not batch or not features or not seconds:
        return None
    return round(questions * steps * batch / features / seconds, 3)


def hf_qa_run(data: dict[str, Any], args: argparse.Namespace, b: dict[str, Any], device: torch.device,
              max_steps: int | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    from sora.metrics.squad import qa_metrics

    eval_sets = {name: rows for name, (_, rows) in data["sets"].items()}
    preds, info = hf_qa.train_and_predict(data["train"], eval_sets, model_path=minilm_path(), workdir=WORK / "work",
                                          seed=args.seed, device=device.type, epochs=b["epochs"],
                                          max_length=b["max_length"], stride=b["stride"], max_steps=max_steps,
                                          log=log)
    info["examples_per_s"] = questions_per_s(info["train_questions"], info["steps"], info["batch_size"],
                                             info["train_features"], info["seconds"])
    cells = {}
    for name, rows in eval_sets.items():
        m = qa_metrics(preds[name], references(rows), "zh" if name == "cmrc2018" else "en")
        cells[name] = {"em": round(m["exact_match"], 2), "f1": round(m["f1"], 2), "n": m["n"],
                       "examples_per_s": info["examples_per_s"], "seconds": round(info["seconds"], 1),
                       "steps": info["steps"]}
        log(f"  hf{'' if max_steps is None else f' ({max_steps} steps)'} {name}: EM {m['exact_match']:.2f} "
            f"F1 {m['f1']:.2f}")
    return cells, info


def count_features(rows: list[dict[str, Any]], b: dict[str, Any]) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    return len(hf_qa.prepare_train_features(tok, rows, b["max_length"], b["stride"]))


# ---- main -------------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run (< 2 min for hf at 1 thread), qa.quick.json")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch threads for every system (default: all cores)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    p.add_argument("--json", type=Path, default=None, help="output file (default bench/results/qa[.quick].json)")
    p.add_argument("--train-questions", type=int, default=None,
                   help="training questions (CPU 8000, cuda all 87,599, quick 120); cmrc2018: at most its 10,142")
    p.add_argument("--epochs", type=float, default=None, help="epochs for both systems (CPU 1, cuda 2, quick 1)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per window (384; quick 128)")
    p.add_argument("--stride", type=int, default=None, help="doc stride, overlapping tokens (128; quick 32)")
    p.add_argument("--max-val", type=int, default=None, help="Sora's validation questions (1000; quick 30)")
    p.add_argument("--max-test", type=int, default=None, help="test questions (default all; quick 30)")
    p.add_argument("--max-xquad", type=int, default=None, help="xquad_en questions (default all 1,190; quick 30)")
    p.add_argument("--scratch-steps", type=int, default=None, help="sora_scratch pretraining steps (CPU 2000, "
                   "cuda 20000, quick 20)")
    p.add_argument("--sora-schedule", choices=("same", "own"), default="same",
                   help="same: Sora gets --epochs too (default); own: Sora picks its training length")
    p.add_argument("--equal-steps", choices=("auto", "off"), default="auto",
                   help="auto: when Sora's and HF's optimizer steps differ, also run HF at Sora's step count")
    p.add_argument("--keep", action="store_true", help="keep Sora's run folders under runs/qa/work")
    args = p.parse_args()
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        p.error(f"--systems: unknown {', '.join(unknown)} (choose from {', '.join(SYSTEMS)})")
    return args


def budget(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    b = dict(BUDGETS["quick" if args.quick else device.type])
    for key in b:
        if getattr(args, key, None) is not None:
            b[key] = getattr(args, key)
    return b


def main() -> None:
    args = parse_args()
    offline()
    device = resolve_device(args.device)
    args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    b = budget(args, device)
    t_start = time.perf_counter()
    log(f"qa: systems {', '.join(args.systems)}; budget {b}; {args.threads} threads on {device}")
    import transformers

    import sora

    results: dict[str, Any] = {"squad_v1_test": {}, "xquad_en": {}, "cmrc2018": {}}
    failed: list[str] = []
    steps: dict[str, int] = {}
    info_all: dict[str, Any] = {}

    def record(system: str, fn: Any) -> dict[str, Any] | None:
        try:
            cells, info = fn()
        except Exception as exc:  # one broken system must not lose the others
            msg = f"{exc.__class__.__name__}: {exc}"
            if isinstance(exc, SoraFailed):
                msg += (" -- Sora's extractive-QA task kind (sora finetune --task-type qa) is not available "
                        "(or failed) in this checkout")
            else:
                traceback.print_exc(file=sys.stderr)
            log(f"  {system} FAILED: {msg}")
            failed.append(system)
            for name in ("cmrc2018",) if system in CMRC_SYSTEMS else ("squad_v1_test", "xquad_en"):
                results[name][system] = {"status": "failed", "error": msg}
            return None
        for name, cell in cells.items():
            results[name][system] = cell
        steps[system] = info.get("steps")
        info_all[system] = {k: v for k, v in info.items() if k not in ("examples_per_s",)}
        return info

    squad = cmrc = None
    if any(s in args.systems for s in SQUAD_SYSTEMS):
        squad = squad_data(b)
        log(f"squad_v1: {len(squad['train'])} train questions, sets "
            + ", ".join(f"{k} {len(v[1])}" for k, v in squad["sets"].items()) + f" (data in {squad['dir']})")
    if "sora" in args.systems:
        n_feat = count_features(squad["train"], b)
        log("sora (squad_v1)")
        record("sora", lambda: sora_qa("sora", "all-MiniLM-L6-v2", squad, args, b, device, n_feat))
    if "hf" in args.systems:
        log("hf (squad_v1)")
        record("hf", lambda: hf_qa_run(squad, args, b, device))
    equal = None
    differ = steps.get("sora") and steps.get("hf") and steps["sora"] != steps["hf"]
    if args.equal_steps == "auto" and not args.quick and differ:  # quick: no rerun (its 2 minutes)
        log(f"hf at Sora's {steps['sora']} optimizer steps (HF ran {steps['hf']})")
        info = record("hf_at_sora_steps", lambda: hf_qa_run(squad, args, b, device, max_steps=steps["sora"]))
        equal = {"sora_steps": steps["sora"], "hf_steps": steps["hf"], "ran": "hf_at_sora_steps" if info else "failed"}
    if any(s in args.systems for s in CMRC_SYSTEMS):
        cmrc = cmrc_data(b)
        log(f"cmrc2018: {len(cmrc['train'])} train questions, {len(cmrc['sets']['cmrc2018'][1])} test")
        n_cmrc = count_features(cmrc["train"], b)
        if "minilm" in args.systems:
            log("minilm (cmrc2018)")
            record("minilm", lambda: sora_qa("minilm", "all-MiniLM-L6-v2", cmrc, args, b, device, n_cmrc))
        if "sora_scratch" in args.systems:
            log("sora_scratch (cmrc2018)")

            def scratch() -> tuple[dict[str, Any], dict[str, Any]]:
                init, pre = scratch_init(cmrc, args, b, device, read_rows("cmrc2018", "validation"))
                try:
                    cells, info = sora_qa("sora_scratch", init, cmrc, args, b, device, n_cmrc)
                finally:
                    if not args.keep:
                        shutil.rmtree(init, ignore_errors=True)
                return cells, {**info, "pretrain": pre}

            record("sora_scratch", scratch)

    fields = {"epochs": f"{b['epochs']:g}", "max_length": b["max_length"], "stride": b["stride"], "seed": args.seed}
    results["meta"] = {
        "command": command_line(),
        "commands": {
            "sora_finetune": finetune_template(args, b),
            "sora_evaluate": SORA_EVALUATE, "sora_pretrain": SORA_PRETRAIN, "hf": HF_COMMAND.format(**fields),
            "filled": {k: {kk: vv for kk, vv in v.items() if kk in ("command", "pretrain")}
                       for k, v in info_all.items() if "command" in v},
            "cuda": "--device cuda is appended to every sora command on a GPU",
        },
        "budget": {**b, "seed": args.seed, "data_seed": DATA_SEED, "sora_schedule": args.sora_schedule,
                   "threads": args.threads, "device": device.type},
        "training": info_all, "equal_steps": equal, "dropped": DROPPED,
        "data": {
            "squad_v1_test": "squad_v1 test split (the official dev set's second half by article), capped as a seeded"
                             " sample; every gold answer counts (max over answers)",
            "xquad_en": "all 1,190 XQuAD-en questions (its train/validation/test are an article partition of an "
                        "evaluation-only set; nothing trains on it), one gold answer each. They are SQuAD v1.1 dev "
                        "questions, so about half are also in squad_v1 test; XQuAD's ids are removed from Sora's "
                        "validation set so that no evaluation question steers its checkpoint selection",
            "train": "a seeded sample (seed 13) of squad_v1 train, the same questions for every system",
            "validation": "Sora only: squad_v1 validation minus XQuAD's ids, capped (run_qa's users do no selection)",
            "cmrc2018": "cmrc2018 train sample / validation (trial set) for Sora's selection / test (the official "
                        "dev set), CMRC 2018 metric; sora_scratch pretrains on the train contexts split into "
                        "sentences, validation on the validation contexts'",
            "dirs": {k: str(v["dir"].relative_to(REPO)) for k, v in (("squad", squad), ("cmrc2018", cmrc)) if v},
        },
        "definitions": {
            "em/f1": "percent, sora.metrics.squad (evaluate-v1.1.py; cmrc2018: cmrc2018_evaluate.py semantics)",
            "examples_per_s": "training questions per second: questions x epochs done / seconds, epochs done = "
                              "optimizer steps x batch size / training features (run_qa's windows at the common "
                              "max length and stride); the same formula for every system",
            "seconds": "training time. hf: Trainer's train_runtime (the training loop). Sora: the training loop's "
                       "elapsed time that `sora finetune` prints ('model: ... (N steps, E s)'), which includes its "
                       "validation passes (model selection); wall time of the command in meta.training.*.wall_s",
            "steps": "optimizer steps; equal_steps: when they differ, hf_at_sora_steps is HF's recipe with "
                     "max_steps = Sora's steps (linear decay over those steps)",
        },
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "sora": getattr(sora, "__version__", "unknown")},
        "machine": machine_info(device), "load_average": load_average(),
        "failed": failed, "wall_s": round(time.perf_counter() - t_start, 1),
    }
    for name in ("squad_v1_test", "xquad_en", "cmrc2018"):
        if not results[name]:
            results[name] = {"status": "not_run", "reason": "no system of this set in --systems"}
    path = args.json or result_path(NAME, args.quick)
    write_json(path, results)
    log(f"wrote {path}")
    print(json.dumps(results), flush=True)
    if failed:
        log(f"FAILED: {', '.join(failed)} (see their cells)")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
