"""Multi-task learning: one all-MiniLM-L6-v2 model trained on six tasks of four kinds at once, against six
single-task Sora models, on each task's test metric, the mean, Δm%, training time, and serving.

Tasks: sst2, trec, financial_phrasebank, ag_news (classification), mrpc (sentence pairs) and semeval2010_task8
(relation extraction). Regimes: 64 labels per class (Sora samples them, seeded) and full data (train capped at
10,000 per task, seeded). Validation and test sets are seeded samples of at most --max-val / --max-test rows, the
same for every system.

Budget: each single-task model runs Sora's defaults (``sora finetune RECIPE -o OUT``, a recipe naming the task
and ``init: all-MiniLM-L6-v2``, nothing else); a multi-task configuration gets the same number of task batches
in total — the sum of the six single models' optimizer steps, as ``finetune.max_steps`` (divided by the tasks it
draws per step) — and otherwise the recipe's ``multitask`` section only:

- ``all``: one batch of every task each step (sampler ``all``), fixed weights — the default before this bench;
- ``equal_proportional``: sampler proportional (MT-DNN), equal weighting — the recipe's defaults now (fixed
  weights of 1 are equal weighting);
- ``temperature``: sampler temperature (T = 2), equal weighting;
- ``uncertainty``: temperature sampling, uncertainty weighting (Kendall et al., learned log-variances);
- ``pcgrad``: temperature sampling, two tasks a step, PCGrad (Yu et al.) on their gradients.

Metrics are in points: accuracy for the classification and pair tasks, SemEval's official macro-F1 (without
Other) for relations. Δm% = mean over tasks of (M_multi − M_single) / M_single × 100.

Serving: in-process, the six tasks for one batch of 32 inputs (32 texts for the five single-text heads, 32 pairs
for the pair head): one multi-task model (``Sora.predict`` once for the texts, once for the pairs) against the six
single-task models one after another; throughput = inputs answered for all six tasks per second (median of
repeats), size = the checkpoints' weights on disk.

    python bench/multitask.py                              # 64 (3 seeds) and full (1 seed)
    python bench/multitask.py --regimes 64 --seeds 1       # a CPU slice
    python bench/multitask.py --quick                      # < 2 minutes, JSON as the last line

Writes bench/results/multitask.json: {REGIME: {CONFIG: {"tasks": {TASK: points}, "mean", "delta_m_pct",
"seconds", "steps"}}, "serving": {...}, "meta": {...}}, rewritten after every run (``--resume`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from common import (
    REPO,
    SHARED_DATA,
    SoraFailed,
    add_common_args,
    command_line,
    log,
    machine_info,
    minilm_path,
    offline,
    resolve_device,
    result_path,
    run_sora,
    seeded_sample,
    set_threads,
    write_json,
)

import sora
from sora.evaluate.run import evaluate_checkpoint
from sora.tasks import kind_of

# name -> the task's recipe entry besides name/data (its kind and columns).
TASKS: dict[str, dict[str, Any]] = {
    "sst2": {"dataset": "sst2"},
    "trec": {"dataset": "trec"},
    "fpb": {"dataset": "financial_phrasebank"},
    "ag_news": {"dataset": "ag_news"},
    "mrpc": {"dataset": "mrpc", "text_column": "text_a", "text_b_column": "text_b"},
    "semeval": {"dataset": "semeval2010_task8", "type": "relation"},
}
CONFIGS: dict[str, dict[str, Any]] = {
    "all": {"sampler": "all"},  # one batch of every task each step, fixed weights (the default before this bench)
    "equal_proportional": {"sampler": "proportional", "weighting": "equal"},
    "temperature": {"sampler": "temperature", "weighting": "equal"},
    "uncertainty": {"sampler": "temperature", "weighting": "uncertainty"},
    "pcgrad": {"sampler": "temperature", "weighting": "pcgrad", "tasks_per_step": 2},
    # Uncertainty weighting on the default sampler: temperature sampling starves the relation task of steps.
    "uncertainty_proportional": {"sampler": "proportional", "weighting": "uncertainty"},
    # Two tasks a step, drawn in proportion without replacement: the relation task (half the examples) is in
    # nearly every step, so it keeps about its single-task batches while the others share the second slot.
    "proportional_k2": {"sampler": "proportional", "weighting": "equal", "tasks_per_step": 2},
    "pcgrad_proportional": {"sampler": "proportional", "weighting": "pcgrad", "tasks_per_step": 2},
}
REGIMES = ("64", "full")
TEMPLATE = "sora finetune {recipe} -o {out}"
SERVE_BATCH = 32


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def prepare(tasks: list[str], work: Path, regime: str, seed: int, args: argparse.Namespace) -> dict[str, Path]:
    """Each task's data folder: the training file (the regime's cap applied for full data), and seeded samples of
    the validation and test splits."""
    dirs = {}
    for name in tasks:
        src = SHARED_DATA / TASKS[name]["dataset"]
        out = work / f"data-{regime}-{seed}" / name
        if not (out / "test.jsonl").is_file():
            train = read_rows(src / "train.jsonl")
            if regime == "full":
                train = seeded_sample(train, args.max_train, seed)
            write_rows(out / "train.jsonl", train)
            write_rows(out / "validation.jsonl", seeded_sample(read_rows(src / "validation.jsonl"), args.max_val, 13))
            write_rows(out / "test.jsonl", seeded_sample(read_rows(src / "test.jsonl"), args.max_test, 13))
        dirs[name] = out
    return dirs


def task_entry(name: str, data: Path, regime: str, per_class: int) -> dict[str, Any]:
    entry = {k: v for k, v in TASKS[name].items() if k != "dataset"}
    entry.update(name=name, data=str(data))
    if regime == "64":
        entry["labels_per_class"] = per_class
    return entry


def train(recipe: dict[str, Any], out: Path, device, threads: int) -> tuple[float, int, list[str]]:
    """``sora finetune RECIPE -o OUT`` as a user runs it: (wall seconds, optimizer steps, argv)."""
    path = out.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    _, wall, argv = run_sora(TEMPLATE, device, threads, recipe=path, out=out)
    steps = max(r["step"] for r in read_rows(out / "train_log.jsonl"))
    return wall, steps, argv


def test_points(model_dir: Path, device: str) -> dict[str, float]:
    """Every head's primary metric on its task's test split, in points."""
    model = sora.load(model_dir, device=device)
    out: dict[str, float] = {}
    for name, spec in model.model.head_specs.items():
        metrics = evaluate_checkpoint(model, task=name, attacks=(), out=model_dir.parent / f"eval-{name}")["metrics"]
        out[name] = round(float(metrics[spec.metric]) * kind_of(spec).points, 2)
    return out


def summarise(points: dict[str, float], single: dict[str, float] | None) -> dict[str, Any]:
    mean = round(statistics.fmean(points.values()), 2)
    cell: dict[str, Any] = {"tasks": points, "mean": mean}
    if single is not None:
        cell["delta_m_pct"] = round(100 * statistics.fmean((points[t] - single[t]) / single[t] for t in points), 2)
        cell["worst_task_delta"] = round(min(points[t] - single[t] for t in points), 2)
    return cell


def mean_over_seeds(cells: list[dict[str, Any]]) -> dict[str, Any]:
    tasks = {t: round(statistics.fmean(c["tasks"][t] for c in cells), 2) for t in cells[0]["tasks"]}
    return {"tasks": tasks, "seconds": round(statistics.fmean(c["seconds"] for c in cells), 1),
            "steps": round(statistics.fmean(c["steps"] for c in cells), 1), "seeds": len(cells),
            "per_seed": cells}


def serving(single_dirs: dict[str, Path], multi_dir: Path, tasks: list[str], data: dict[str, Path],
            repeats: int, device: str) -> dict[str, Any]:
    """All tasks for one batch of inputs: one multi-task model against the single-task models in turn."""
    texts = [r["text"] for r in read_rows(data["semeval"] / "test.jsonl")[:SERVE_BATCH]] if "semeval" in data else \
        [r["text"] for r in read_rows(data[tasks[0]] / "test.jsonl")[:SERVE_BATCH]]
    pair_tasks = [t for t in tasks if "text_b_column" in TASKS[t]]
    pairs = [(r["text_a"], r["text_b"]) for r in read_rows(data[pair_tasks[0]] / "test.jsonl")[:SERVE_BATCH]] \
        if pair_tasks else []
    multi = sora.load(multi_dir, device=device)
    singles = {t: sora.load(d, device=device) for t, d in single_dirs.items()}

    specs = multi.model.head_specs
    on_code = [t for t in tasks if t not in pair_tasks and specs[t].reads == "code"]
    own_pass = [t for t in tasks if t not in pair_tasks and t not in on_code]

    def run_multi() -> None:  # as the server answers /v1/predict: one encoder pass for the heads on the code
        if on_code:
            codes = multi.codes(texts)
            for t in on_code:
                multi.head_predictions(t, codes)
        for t in own_pass:  # heads that read more than the code (relation: the entities' token states)
            multi.predict(texts, task=t)
        for t in pair_tasks:
            multi.predict(pairs, task=t)

    def run_singles() -> None:
        for t, m in singles.items():
            m.predict(pairs if t in pair_tasks else texts)

    def timed(fn) -> float:
        fn()  # warm up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    t_multi, t_single = timed(run_multi), timed(run_singles)

    def size(d: Path) -> float:
        return sum(f.stat().st_size for f in Path(d).glob("*.safetensors")) / 2**20

    return {"batch": SERVE_BATCH, "multitask_per_s": round(SERVE_BATCH / t_multi, 1),
            "single_models_per_s": round(SERVE_BATCH / t_single, 1), "speedup": round(t_single / t_multi, 2),
            "multitask_mb": round(size(multi_dir), 1), "single_models_mb": round(sum(size(d) for d in
                                                                                   single_dirs.values()), 1),
            "repeats": repeats}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--regimes", default=",".join(REGIMES))
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--seeds", type=int, default=3, help="seeds at 64 labels per class (full: 1)")
    p.add_argument("--per-class", type=int, default=64)
    p.add_argument("--max-train", type=int, default=10_000, help="full data: training examples per task")
    p.add_argument("--max-val", type=int, default=500)
    p.add_argument("--max-test", type=int, default=1000)
    p.add_argument("--single-steps", type=int, default=None, help="override the single models' steps (quick)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--resume", action="store_true", help="keep the runs already in --out")
    p.add_argument("--work", default=None, help="where runs are written (default: a temporary folder)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.tasks, args.regimes, args.configs = "sst2,trec", "64", "temperature"
        args.seeds, args.per_class, args.max_val, args.max_test = 1, 8, 40, 60
        args.single_steps, args.repeats = 3, 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    offline()
    device = resolve_device(args.device)
    threads = set_threads()
    tasks = args.tasks.split(",")
    configs = args.configs.split(",")
    out_path = Path(args.out) if args.out else result_path("multitask", args.quick)
    result: dict[str, Any] = json.loads(out_path.read_text()) if args.resume and out_path.is_file() else {}
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="sora-multitask-"))
    init = str(minilm_path())
    result["meta"] = {
        "command": command_line(), "sora_command": TEMPLATE, "tasks": {t: TASKS[t]["dataset"] for t in tasks},
        "configs": {**result.get("meta", {}).get("configs", {}), **{c: CONFIGS[c] for c in configs}},
        "init": "all-MiniLM-L6-v2",
        "budget": "single: Sora's default schedule per task; multi-task: the sum of the single models' steps "
                  "(÷ tasks per step), as finetune.max_steps",
        "max_val": args.max_val, "max_test": args.max_test, "max_train_full": args.max_train,
        "per_class": args.per_class, "machine": machine_info(device), "quick": args.quick,
    }
    runs: dict[str, Any] = result.setdefault("runs", {})

    def save() -> None:
        write_json(out_path, result)

    for regime in args.regimes.split(","):
        seeds = range(args.seeds if regime == "64" else 1)
        for seed in seeds:
            # The serving comparison loads the models, so only its runs must still be on disk to be kept (a
            # resumed bench keeps the serving figures it has).
            serves = regime == args.regimes.split(",")[0] and seed == 0 and not (args.resume and "serving" in result)
            data = prepare(tasks, work, regime, seed, args)
            base = {"finetune": {"init": init, "seed": seed}, "train": {"progress": False}}
            single_dirs: dict[str, Path] = {}
            single_points: dict[str, float] = {}
            total_steps, single_seconds = 0, 0.0
            for t in tasks:
                key = f"{regime}/{seed}/single/{t}"
                out = work / key
                if key not in runs or (serves and not (out / "model").is_dir()):
                    recipe = {**base, "tasks": [task_entry(t, data[t], regime, args.per_class)]}
                    if args.single_steps:
                        recipe["finetune"] = {**recipe["finetune"], "max_steps": args.single_steps}
                    log(f"{key}")
                    wall, steps, argv = train(recipe, out, device, threads)
                    runs[key] = {"seconds": round(wall, 1), "steps": steps, "points": test_points(out / "model",
                                                                                                args.device)}
                    save()
                single_dirs[t] = out / "model"
                single_points[t] = runs[key]["points"][t]
                total_steps += runs[key]["steps"]
                single_seconds += runs[key]["seconds"]
            cells = {"single": {"tasks": single_points, "seconds": round(single_seconds, 1), "steps": total_steps}}
            for c in configs:
                key = f"{regime}/{seed}/{c}"
                out = work / key
                per_step = len(tasks) if CONFIGS[c].get("sampler", "proportional") == "all" else CONFIGS[c].get(
                    "tasks_per_step", 1)
                if key not in runs or (serves and c == configs[0] and not (out / "model").is_dir()):
                    recipe = {**base, "finetune": {**base["finetune"], "max_steps": max(1, total_steps // per_step)},
                              "tasks": [task_entry(t, data[t], regime, args.per_class) for t in tasks],
                              **({"multitask": CONFIGS[c]} if CONFIGS[c] else {})}
                    log(f"{key} ({recipe['finetune']['max_steps']} steps)")
                    try:
                        wall, steps, argv = train(recipe, out, device, threads)
                    except SoraFailed as exc:
                        runs[key] = {"failed": str(exc)}
                        save()
                        continue
                    runs[key] = {"seconds": round(wall, 1), "steps": steps, "points": test_points(out / "model",
                                                                                                args.device)}
                    save()
                if "failed" in runs[key]:
                    continue
                cells[c] = {"tasks": runs[key]["points"], "seconds": runs[key]["seconds"],
                            "steps": runs[key]["steps"]}
                if serves and c == configs[0]:
                    result["serving"] = serving(single_dirs, out / "model", tasks, data, args.repeats, args.device)
                    save()
            # Merged with what earlier invocations measured at this seed (e.g. configs run on one seed only).
            result.setdefault("_cells", {}).setdefault(regime, {}).setdefault(str(seed), {}).update(cells)
            save()
        # The regime's table: means over seeds; Δm% against the single models' means over the same seeds.
        per_seed = result["_cells"][regime]
        names = ["single", *dict.fromkeys(c for s in per_seed.values() for c in s if c != "single")]
        table: dict[str, Any] = {}
        for c in names:
            have = [s for s in sorted(per_seed) if c in per_seed[s]]
            if not have:
                continue
            table[c] = mean_over_seeds([per_seed[s][c] for s in have])
            single = None if c == "single" else mean_over_seeds([per_seed[s]["single"] for s in have])["tasks"]
            table[c].update(summarise(table[c]["tasks"], single))
        result[regime] = table
        save()
    log(f"wrote {out_path.relative_to(REPO) if out_path.is_relative_to(REPO) else out_path}")
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "_cells")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
