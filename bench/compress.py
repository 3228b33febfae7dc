"""Compression: speed, size and accuracy of fp32 / PyTorch int8 / ONNX fp32 / ONNX int8 / pruned / bf16 variants.

For each dataset (sst2, banking77) all-MiniLM-L6-v2 is fine-tuned within a CPU budget (≤ 2000 training
examples, one epoch, max_length 64; cached under runs/bench-compress/), then compressed with
``sora.compress.compress`` (gate off: max_drop 100, so every variant is measured; a variant compressed by an
earlier run from the same fine-tuned checkpoint is reused unless --fresh). Every variant is then loaded the
way a user loads it (``sora.load``) and timed in this process, interleaved: each repeat runs every variant
once over the same ≤ 512 validation texts (``Sora.codes``, batch 32, tokenization included), the order
rotating between repeats. Speedup = median over repeats of (variant texts/s ÷ fp32 texts/s in the same
repeat), so load from other jobs on the machine hits numerator and denominator alike. ``--threads 2,1``
times at each thread count (PyTorch and ONNX Runtime alike); the first headlines.

    python bench/compress.py                  # full (~30-60 min on 2 cores shared with other jobs)
    python bench/compress.py --threads 2,1    # the same, timed on 2 threads then on 1
    python bench/compress.py --quick          # < 2 min: tiny fine-tune on sst2, 64 validation texts
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from common import (  # noqa: E402
    SHARED_DATA,
    add_common_args,
    command_line,
    load_average,
    machine_info,
    offline,
    resolve_device,
    set_threads,
    write_result,
)

RUNS = ROOT / "runs" / "bench-compress"
TIMING_TEXTS = 512  # validation texts timed per variant and repeat (accuracy uses the whole split)
# name -> (method, extra arguments of sora.compress.compress); None: the fine-tuned checkpoint itself
VARIANTS: dict[str, tuple[str, dict] | None] = {
    "fp32": None,
    "torch-int8": ("int8", {}),
    "onnx-fp32": ("onnx", {}),
    "onnx-int8": ("onnx-int8", {}),
    "onnx-int8-all-matmul": ("onnx-int8", {"keep_fp32": ()}),  # ffn.down int8 too
    "pruned-30%": ("prune", {"prune_heads": 0.3}),
    "pruned-30%+onnx-int8": ("onnx-int8", {"prune_heads": 0.3}),
    "bf16": ("bf16", {}),  # needs a CPU with native bfloat16 (AVX-512 BF16 / AMX); skipped elsewhere
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def task_data(name: str, quick: bool) -> Path:
    """The dataset directory; ``--quick``: a slice (64 train, 64 validation) written under runs/."""
    src = SHARED_DATA / name
    if not quick:
        return src
    dst = RUNS / "quick-data" / name
    for split, n in (("train", 64), ("validation", 64)):
        rows = read_jsonl(src / f"{split}.jsonl")
        write_jsonl(dst / f"{split}.jsonl", random.Random(13).sample(rows, min(n, len(rows))))
    return dst


def finetune(name: str, data: Path, quick: bool, log) -> tuple[Path, dict]:
    """MiniLM fine-tuned on ``data`` (cached: reused when the settings match)."""
    from sora.config import load_finetune_recipe
    from sora.train.finetune import run_finetune

    settings = {
        "finetune.init": "all-MiniLM-L6-v2", "tasks.0.name": name, "tasks.0.data": str(data),
        "tasks.0.max_train": 64 if quick else 2000, "finetune.epochs": 1.0,
        "finetune.max_steps": 4 if quick else None,
        "finetune.max_evaluations": 1, "finetune.head_lr_multiplier": 10.0, "data.max_length": 64,
        "data.batch_size": 16, "train.lr": 1e-4, "train.warmup_steps": 0, "train.eval_every": 0,
        "train.save_every": 0, "train.progress": False, "train.device": "cpu", "finetune.seed": 13,
    }
    out = RUNS / f"{'quick-' if quick else ''}{name}"
    stamp = out / "bench-settings.json"
    model = out / "finetune" / "model"
    if model.is_dir() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        log(f"{name}: reusing {model.relative_to(ROOT)}")
        return model, {"cached": True, **json.loads((model / "config.json").read_text()).get("metadata", {})}
    t0 = time.perf_counter()
    summary = run_finetune(load_finetune_recipe(None, {**settings, "output": str(out / "finetune")}))
    stamp.write_text(json.dumps(settings, indent=2))
    shutil.rmtree(out / "finetune" / "checkpoints", ignore_errors=True)  # resume state: not needed here
    log(f"{name}: fine-tuned in {time.perf_counter() - t0:.0f} s, validation {summary['validation']}")
    return model, {"cached": False, "seconds": round(time.perf_counter() - t0, 1), "steps": summary["steps"],
                   "validation": summary["validation"]}


def use_threads(models: dict, n: int) -> None:
    """``n`` threads for PyTorch and for every ONNX Runtime session (``sora.load`` gives them all cores)."""
    from sora.compress.onnx_export import OnnxEncoder

    torch.set_num_threads(n)
    for m in models.values():
        if m.onnx is not None:
            m.onnx = OnnxEncoder(m.onnx.path, threads=n)


def throughput(models: dict, texts: list[str], repeats: int) -> dict[str, dict]:
    """texts/s per variant (median over repeats) and speedup vs fp32 (median of same-repeat ratios)."""
    names = list(models)
    for n in names:  # warm-up (ONNX Runtime allocates on first use of each shape)
        models[n].codes(texts[:64], batch_size=32)
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            models[n].codes(texts, batch_size=32)
            rates[n].append(len(texts) / (time.perf_counter() - t0))
    out = {}
    for n in names:
        ratios = [a / b for a, b in zip(rates[n], rates["fp32"], strict=True)]
        out[n] = {"texts_per_s": statistics.median(rates[n]), "speedup": statistics.median(ratios),
                  "texts_per_s_all": [round(x, 1) for x in rates[n]]}
    return out


def reuse(out: Path, method: str, extra: dict, ckpt: Path) -> dict | None:
    """An earlier run's variant of this very checkpoint and settings: its measurements from config.json."""
    try:
        config = json.loads((out / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    meta = config.get("metadata") or {}
    comp = meta.get("compression") or {}
    params = comp.get("params") or {}
    same = (comp.get("method") == method and comp.get("source") == str(ckpt)
            and params.get("prune_heads") == extra.get("prune_heads", 0.0)
            and params.get("prune_layers") == extra.get("prune_layers", 0)
            and params.get("keep_fp32", ["ffn.down"]) == list(extra.get("keep_fp32", ["ffn.down"]))
            and (ckpt / "model.safetensors").stat().st_mtime < (out / "model.safetensors").stat().st_mtime)
    if not same:
        return None
    keys = ("validation_before", "validation_after", "accuracy_drop_points", "size_mb", "size_mb_before",
            "speedup", "latency_ms_per_text", "latency_ms_per_text_before", "code_cosine", "onnx_max_abs_diff",
            "pruning")
    return {"method": method, "params": params, "reused": True, **{k: meta.get(k) for k in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--datasets", default=None, help="comma-separated (default: sst2,banking77; quick: sst2)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timing repeats (default 5; quick 2)")
    parser.add_argument("--threads", default=None,
                        help="comma-separated thread counts to time with, the first one headlining (default: all "
                             "cores); e.g. 2,1")
    parser.add_argument("--fresh", action="store_true", help="compress again even where an earlier run's "
                                                               "variant of the same checkpoint exists")
    args = parser.parse_args()
    offline()
    device = resolve_device(args.device)
    if device.type != "cpu":
        raise SystemExit("bench/compress.py measures CPU inference (int8 and ONNX Runtime run on the CPU)")
    cores = set_threads()
    thread_counts = [int(x) for x in args.threads.split(",")] if args.threads else [cores]
    quick = args.quick
    datasets = (args.datasets or ("sst2" if quick else "sst2,banking77")).split(",")
    repeats = args.repeats or (2 if quick else 5)
    missing = [d for d in datasets if not (SHARED_DATA / d / "train.jsonl").is_file()]
    if missing:
        from common import skip

        skip("compress", f"needs ../shared/data/{missing[0]}")

    import sora
    from sora.compress import compress
    from sora.compress.runtime import native

    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    rows, details = [], {}
    load_before = load_average()
    for ds in datasets:
        data = task_data(ds, quick)
        ckpt, ft_info = finetune(ds, data, quick, log)
        texts = [r["text"] for r in read_jsonl(data / "validation.jsonl")]
        timed_texts = random.Random(13).sample(texts, min(len(texts), TIMING_TEXTS))
        results, models = {}, {"fp32": sora.load(ckpt)}
        for name, spec in VARIANTS.items():
            if spec is None:
                continue
            method, extra = spec
            if method == "bf16" and not native("bfloat16", torch.device("cpu")):
                log(f"{ds}/{name}: skipped (no native bfloat16 on this CPU)")
                continue
            out = RUNS / f"{'quick-' if quick else ''}{ds}" / "variants" / name.replace("%", "").replace("+", "-")
            t0 = time.perf_counter()
            torch.set_num_threads(cores)
            cached = None if args.fresh else reuse(out, method, extra, ckpt)
            results[name] = cached or compress(
                ckpt, out, method, max_drop=100.0, latency_repeats=1, latency_texts=32 if quick else 256,
                importance_examples=64 if quick else 512, **extra)
            log(f"{ds}/{name}: {'reused' if cached else 'compressed'} in {time.perf_counter() - t0:.0f} s, drop "
                f"{results[name]['accuracy_drop_points']:+.2f} points, {results[name]['size_mb']:.1f} MB")
            models[name] = sora.load(out)
        speeds = {}
        for n in thread_counts:
            t0 = time.perf_counter()
            use_threads(models, n)
            speeds[n] = throughput(models, timed_texts, repeats)
            log(f"{ds}: timed {len(models)} variants × {repeats} repeats on {n} threads in "
                f"{time.perf_counter() - t0:.0f} s")
        speed = speeds[thread_counts[0]]
        by_threads = {name: {str(n): {"speedup": round(s[name]["speedup"], 3),
                                      "texts_per_s": round(s[name]["texts_per_s"], 1)} for n, s in speeds.items()}
                      for name in models}
        first = next(iter(results.values()))
        metric, base_acc = next(iter(first["validation_before"].items()))
        base = {"name": "fp32", "dataset": ds, "speedup": 1.0, "accuracy_drop_points": 0.0,
                "size_mb": first["size_mb_before"], "accuracy": base_acc,
                "texts_per_s": round(speed["fp32"]["texts_per_s"], 1), "by_threads": by_threads["fp32"]}
        rows.append(base)
        for name, r in results.items():
            rows.append({"name": name, "dataset": ds, "speedup": round(speed[name]["speedup"], 3),
                         "accuracy_drop_points": r["accuracy_drop_points"], "size_mb": r["size_mb"],
                         "accuracy": r["validation_after"][metric],
                         "texts_per_s": round(speed[name]["texts_per_s"], 1), "by_threads": by_threads[name]})
        details[ds] = {
            "finetune": ft_info, "metric": metric, "validation_texts": len(texts), "timed_texts": len(timed_texts),
            "throughput_runs": {str(t): {n: s["texts_per_s_all"] for n, s in sp.items()} for t, sp in speeds.items()},
            "compress": {n: {k: r.get(k) for k in ("params", "pruning", "code_cosine", "onnx_max_abs_diff", "reused",
                                                   "speedup", "latency_ms_per_text", "latency_ms_per_text_before")}
                         for n, r in results.items()},
        }
        for row in rows[-len(models):]:
            log(f"  {row['name']:>22}: {row['texts_per_s']:7.1f} texts/s  x{row['speedup']:.2f}  "
                f"{metric} {row['accuracy']:.4f} ({row['accuracy_drop_points']:+.2f})  {row['size_mb']:.1f} MB")

    by_name: dict[str, list[dict]] = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)
    meeting = [n for n, rs in by_name.items() if n != "fp32"
               and all(r["speedup"] >= 2.0 and r["accuracy_drop_points"] <= 1.0 for r in rs)]
    payload = {
        "variants": rows,
        "meta": {
            "command": command_line(), "machine": machine_info(device), "threads": thread_counts,
            "load_average_before": load_before, "load_average_after": load_average(),
            "quick": quick, "repeats": repeats, "batch_size": 32,
            "timing": "Sora.codes over the same <= 512 validation texts, batch 32 (tokenization included), "
                      "interleaved repeats; speedup = median of same-repeat ratios to fp32; texts_per_s and speedup "
                      "at the first thread count (PyTorch and ONNX Runtime alike), by_threads for each",
            "size_mb": "weights inference runs with (encoder + heads, not the denoising decoder): in-memory for "
                       "PyTorch (int8 packed), file size for ONNX",
            "accuracy": "validation split, the task head's metric; drop in points vs fp32",
            "target": {"speedup": 2.0, "max_drop_points": 1.0, "variants_meeting_it_on_every_dataset": meeting},
            "datasets": details, "seconds": round(time.perf_counter() - t_start, 1),
        },
    }
    write_result("compress", quick, payload)


if __name__ == "__main__":
    main()
