"""``sora label-curve``: test-set score against labels per class, to decide whether labelling more pays off.

For each size (``8, 16, 32, 64, full``) and seed, the recipe's first task is fine-tuned on that many labelled
examples per class (sampled with the seed; ``full``: all of them), then scored on the task's test split with
``sora evaluate``'s code. Results: ``label_curve.json`` (every run and mean ± std per size), ``label_curve.md``
and ``label_curve.png``.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sora.config import apply_overrides, load_finetune_recipe
from sora.errors import ConfigError

FULL = "full"


def parse_sizes(text: str) -> list[int | None]:
    """``"8,16,full"`` -> ``[8, 16, None]`` (None: every labelled example)."""
    sizes: list[int | None] = []
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        if part in (FULL, "all"):
            size = None
        else:
            try:
                size = int(part)
            except ValueError:
                raise ConfigError(f"--sizes {text!r}: {part!r} is neither a number nor 'full'") from None
            if size < 1:
                raise ConfigError(f"--sizes {text!r}: sizes must be at least 1")
        if size not in sizes:
            sizes.append(size)
    if not sizes:
        raise ConfigError(f"--sizes {text!r}: give at least one size, e.g. 8,16,32,full")
    return sizes


def _label(size: int | None) -> str:
    return FULL if size is None else str(size)


def _aggregate(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    summary = []
    for size in dict.fromkeys(p["size"] for p in points):
        pts = [p for p in points if p["size"] == size]
        values = np.array([p["metric"] for p in pts], dtype=np.float64)
        summary.append({
            "size": size, "labels_per_class": pts[0]["labels_per_class"], "train_examples": pts[0]["train_examples"],
            "n": len(pts), "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,  # sample std across seeds
            "min": float(values.min()), "max": float(values.max()),
            "seconds": round(float(np.mean([p["seconds"] for p in pts])), 1),
        })
    return sorted(summary, key=lambda s: (s["labels_per_class"], s["size"] == FULL))


def _markdown(result: dict[str, Any]) -> str:
    metric, summary = result["metric"], result["summary"]
    lines = [f"# Label curve: {result['task']}", "",
             f"Test {metric} after fine-tuning on N labelled examples per class "
             f"({result['seeds']} seed{'s' if result['seeds'] > 1 else ''} per size; mean ± sample std).", "",
             f"| labels per class | train examples | {metric} mean | std | min | max | seconds/run |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        size = f"full ({s['labels_per_class']})" if s["size"] == FULL else s["size"]
        lines.append(f"| {size} | {s['train_examples']} | {s['mean']:.4f} | {s['std']:.4f} | {s['min']:.4f} | "
                     f"{s['max']:.4f} | {s['seconds']} |")
    if len(summary) > 1:
        lines += ["", "Gain from each step up (what more labels bought):", ""]
        for a, b in zip(summary, summary[1:], strict=False):
            lines.append(f"- {a['size']} → {b['size']}: "
                         f"{b['mean'] - a['mean']:+.4f} {metric}")
    lines += ["", "![label curve](label_curve.png)"]
    return "\n".join(lines) + "\n"


def run_label_curve(recipe_path: str | Path | None, overrides: dict[str, Any] | None = None,
                    sizes: Sequence[int | str | None] = (8, 16, 32, 64, None), seeds: int = 3,
                    out_dir: str | Path | None = None, *, keep_checkpoints: bool = False,
                    echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fine-tune and test every (size, seed); write ``label_curve.{json,md,png}`` in ``out_dir``; return the result.

    Seeds are ``finetune.seed``, ``finetune.seed + 1``, …: each draws its own label sample and training order.
    Run directories (``out_dir/lpc-SIZE-seed-S``) keep ``model/`` and the test report, not ``checkpoints/``.
    """
    import sora
    from sora.evaluate.report import label_curve_plot
    from sora.evaluate.run import evaluate_checkpoint
    from sora.tasks import kind_of
    from sora.train.distributed import pick_device
    from sora.train.finetune import run_finetune
    from sora.train.tune import raw_recipe

    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: must be at least 1")
    wanted = [None if s is None or str(s).lower() in (FULL, "all") else int(s) for s in sizes]
    if not wanted:
        raise ConfigError("label-curve needs at least one size")
    raw = raw_recipe(recipe_path, overrides)
    recipe = load_finetune_recipe(None, copy.deepcopy(raw))
    task = recipe.tasks[0]
    kind = kind_of(task)
    if not kind.classes:
        raise ConfigError(f"label-curve samples N labelled examples per class: the first task must have classes, "
                          f"not {task.type}")
    full = kind.load(task.model_copy(update={"labels_per_class": None}), recipe.finetune.seed)
    if not full.test:
        raise ConfigError(f"task {task.name!r}: label-curve scores on the test split; set tasks.0.test "
                          "(or use a data directory with test.*)")
    counts = Counter(str(ex.label[0] if isinstance(ex.label, list) else ex.label) for ex in full.train)
    largest = max(counts.values())
    metric = task.metric or kind.default_metric
    out = Path(out_dir) if out_dir else Path(f"{recipe.output.rstrip('/')}-label-curve")
    out.mkdir(parents=True, exist_ok=True)
    device = str(pick_device(recipe.train.device))
    base_seed = recipe.finetune.seed

    points: list[dict[str, Any]] = []
    total = len(wanted) * seeds
    for size in wanted:
        for k in range(seeds):
            seed = base_seed + k
            run_dir = out / f"lpc-{_label(size)}-seed-{seed}"
            trial = apply_overrides(copy.deepcopy(raw), {"output": str(run_dir), "tasks.0.labels_per_class": size,
                                                         "finetune.seed": seed, "train.progress": False})
            started = time.perf_counter()
            try:
                summary = run_finetune(load_finetune_recipe(None, trial))
            finally:
                if not keep_checkpoints:
                    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            model = sora.load(run_dir, device=device)
            result = evaluate_checkpoint(model, task=task.name, out=run_dir / "eval-test")
            value = result["metrics"].get(metric)
            if not isinstance(value, int | float):
                have = ", ".join(k for k, v in result["metrics"].items() if isinstance(v, float))
                raise ConfigError(f"task {task.name!r}: the test report has no {metric!r} (has: {have})")
            n_train = ((model.config.get("metadata") or {}).get("train_examples") or {}).get(task.name)
            point = {"size": _label(size), "labels_per_class": largest if size is None else min(size, largest),
                     "seed": seed, "metric": float(value), "train_examples": n_train,
                     "validation": summary.get("validation"), "seconds": round(time.perf_counter() - started, 1),
                     "output": str(run_dir)}
            points.append(point)
            if echo:
                echo(f"[{len(points)}/{total}] {_label(size)} per class, seed {seed}: test {metric} {value:.4f} "
                     f"({n_train} train examples, {point['seconds']} s)")

    summary = _aggregate(points)
    result = {"recipe": str(recipe_path) if recipe_path else None, "task": task.name, "metric": metric,
              "split": "test", "seeds": seeds, "sizes": [_label(s) for s in wanted],
              "class_counts": dict(sorted(counts.items())), "points": points, "summary": summary}
    plot = label_curve_plot([{"labels_per_class": s["labels_per_class"], "mean": s["mean"], "std": s["std"],
                              "system": f"{task.name} (test {metric})"} for s in summary], out / "label_curve.png")
    files = {"json": out / "label_curve.json", "markdown": out / "label_curve.md", "plot": plot}
    result["files"] = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    files["markdown"].write_text(_markdown(result), encoding="utf-8")
    return result
