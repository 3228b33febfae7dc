"""An evaluation run on disk: ``metrics.json``, ``report.md`` and PNG plots.

Plots use matplotlib's ``Figure`` with the Agg canvas directly, not pyplot: no global backend state, no
display needed, and nothing leaks between calls. matplotlib is imported on first plot so that importing
``sora.evaluate`` for its metrics stays cheap.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sora.errors import DataError, missing
from sora.metrics.labels import expected_calibration_error, reliability_curve

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_MD_CONFUSION = 20  # a wider Markdown table is unreadable; the PNG still shows it
MAX_CELL_TEXT = 20  # numbers inside confusion-matrix cells only up to this many labels
MAX_TICK_LABELS = 100  # past this, label names on the axes overlap into a black bar
MAX_EXAMPLE_CHARS = 160  # an example perturbation's text in the report (metrics.json keeps it whole)

def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise missing(exc, "plots") from exc

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(_fmt(v)) for v in row) + " |" for row in rows]
    return lines


# --- plots ---------------------------------------------------------------------------------------------


def confusion_matrix_plot(matrix: Sequence[Sequence[int]], labels: Sequence[str], out: Path) -> Path:
    """Row-normalised confusion matrix (each true class sums to 1); fonts shrink as labels grow."""
    counts = np.asarray(matrix, dtype=np.float64)
    support = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, support, out=np.zeros_like(counts), where=support > 0)
    k = len(labels)
    side = float(np.clip(3.0 + 0.25 * k, 4.5, 16.0))
    font = float(np.clip(0.6 * side * 72 / max(k, 1), 3.0, 10.0))  # ~60% of a cell's height, in points
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of true class")
    if k <= MAX_TICK_LABELS:
        ax.set_xticks(range(k), [str(lab) for lab in labels], rotation=90, fontsize=font)
        ax.set_yticks(range(k), [str(lab) for lab in labels], fontsize=font)
    if k <= MAX_CELL_TEXT:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=font,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (normalised per true class)")
    return _save(fig, out)


def reliability_plot(probs: np.ndarray, y_true_idx: np.ndarray, out: Path, bins: int = 15) -> Path:
    """Reliability diagram: accuracy per confidence bin against the diagonal, ECE in the title."""
    curve = reliability_curve(probs, y_true_idx, bins)
    edges = np.asarray(curve["edges"])
    width = edges[1] - edges[0]
    filled = [b for b in range(bins) if curve["count"][b]]
    ece = expected_calibration_error(probs, y_true_idx, bins)
    fig = _figure(5.5, 6.0)
    ax, hist = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.bar(edges[:-1][filled], [curve["accuracy"][b] for b in filled], width=width, align="edge",
           edgecolor="black", color="tab:blue", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.plot([curve["confidence"][b] for b in filled], [curve["accuracy"][b] for b in filled], "o", color="tab:red",
            markersize=4, label="mean confidence")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"Reliability (ECE = {ece:.4f}, {bins} bins)")
    ax.legend(loc="upper left", fontsize=8)
    hist.bar(edges[:-1], curve["count"], width=width, align="edge", edgecolor="black", color="lightgray")
    hist.set(xlabel="confidence (max probability)", ylabel="rows")
    return _save(fig, out)


def _read_log(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):  # a run killed mid-write leaves a torn last line; the rest is still good
                break
            raise DataError(f"{path}:{i}: not a JSON line ({e.msg})") from e
    return records


def _smooth(values: np.ndarray) -> np.ndarray:
    """Exponential moving average with a span of ~2% of the run, so noise fades but trends stay."""
    alpha = 1.0 / max(1.0, len(values) / 50)
    out = np.empty_like(values)
    acc = values[0]
    for i, v in enumerate(values):
        acc = alpha * v + (1 - alpha) * acc
        out[i] = acc
    return out


def training_curves_plot(train_log: Path, out: Path, task: str | None = None) -> Path | None:
    """Training loss (raw, faint, and smoothed) and every ``val_*`` series against step.

    Loss-like validation series share the loss panel; the rest (accuracy, F1, …) get a second panel,
    as their scale differs; a multi-task run's task weights (``weight/{task}``) a third. ``task``: in a multi-task
    log (keys ``val_{task}_{metric}``), plot that task's validation metrics only (six tasks' dozen metrics each
    would not fit a legend). Returns None when the log holds nothing to plot.
    """
    records = _read_log(train_log)
    own = f"val_{task}_" if task else None
    if own and any(k.startswith(own) for r in records for k in r):
        records = [{k: v for k, v in r.items() if not k.startswith("val_") or k.startswith(own) or "loss" in k}
                   for r in records]
    train = [(r["step"], r["loss"]) for r in records if "step" in r and isinstance(r.get("loss"), int | float)]
    val: dict[str, list[tuple[float, float]]] = {}
    weights: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        for key, value in r.items():
            if "step" in r and isinstance(value, int | float) and key.startswith(("val_", "weight/")):
                (val if key.startswith("val_") else weights).setdefault(key, []).append((r["step"], value))
    if not train and not val:
        return None
    val_loss = {k: v for k, v in val.items() if "loss" in k}
    val_other = {k: v for k, v in val.items() if "loss" not in k}
    panels = (2 if val_other and (train or val_loss) else 1) + bool(weights)
    fig = _figure(6.0 * panels, 4.2)
    axes = list(np.atleast_1d(fig.subplots(1, panels)))
    if train or val_loss:
        ax = axes[0]
        if train:
            steps, loss = np.asarray(train, dtype=np.float64).T
            ax.plot(steps, loss, color="C0", alpha=0.25, linewidth=0.8)
            ax.plot(steps, _smooth(loss), color="C0", label="train loss (smoothed)")
        for i, (key, series) in enumerate(sorted(val_loss.items()), 1):  # C0 is the training loss
            steps, values = np.asarray(series, dtype=np.float64).T
            ax.plot(steps, values, "o-", markersize=3, color=f"C{i % 10}", label=key)
        ax.set(xlabel="step", ylabel="loss", title="Loss")
        ax.legend(fontsize=8)
    if val_other:
        ax = axes[-2] if weights else axes[-1]
        for key, series in sorted(val_other.items()):
            steps, values = np.asarray(series, dtype=np.float64).T
            ax.plot(steps, values, "o-", markersize=3, label=key)
        ax.set(xlabel="step", title="Validation")
        ax.legend(fontsize=8)
    if weights:
        ax = axes[-1]
        for key, series in sorted(weights.items()):
            steps, values = np.asarray(series, dtype=np.float64).T
            ax.plot(steps, values, label=key.removeprefix("weight/"))
        ax.set(xlabel="step", title="Task weights")
        ax.legend(fontsize=8)
    return _save(fig, out)


def label_curve_plot(points: Sequence[dict[str, Any]], out: Path) -> Path:
    """Accuracy against labels per class (log2 axis), one line and mean ± std band per system.

    Each point is ``{"labels_per_class": int, "mean": float, "std": float, "system": str}``.
    """
    if not points:
        raise ValueError("label_curve_plot needs at least one point")
    systems: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        systems.setdefault(str(p["system"]), []).append(p)
    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot()
    ticks: set[int] = set()
    for system, pts in systems.items():
        pts = sorted(pts, key=lambda p: p["labels_per_class"])
        x = np.array([p["labels_per_class"] for p in pts], dtype=np.float64)
        mean = np.array([p["mean"] for p in pts], dtype=np.float64)
        std = np.array([p.get("std") or 0.0 for p in pts], dtype=np.float64)
        (line,) = ax.plot(x, mean, "o-", markersize=4, label=system)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        ticks.update(int(v) for v in x)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
    ax.set(xlabel="labelled examples per class", ylabel="accuracy", title="Label efficiency (mean ± std)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def robustness_plot(robustness: dict[str, dict[str, Any]], out: Path) -> Path:
    """Accuracy on the attacked sample, clean against under attack, one pair of bars per attack."""
    names = list(robustness)
    clean = [robustness[n].get("clean_accuracy") or 0.0 for n in names]
    attacked = [robustness[n].get("attacked_accuracy") or 0.0 for n in names]
    x = np.arange(len(names), dtype=np.float64)
    fig = _figure(max(4.0, 1.6 + 1.4 * len(names)), 4.0)
    ax = fig.add_subplot()
    series = (("clean", clean, "tab:blue", -0.2), ("under attack", attacked, "tab:red", 0.2))
    for label, values, color, offset in series:
        bars = ax.bar(x + offset, values, width=0.4, label=label, color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(x, [f"{n} ({robustness[n].get('n', '?')})" for n in names])
    ax.set(ylim=(0, 1.25), ylabel="accuracy", title="Robustness: accuracy clean vs under attack")
    ax.legend(fontsize=8, loc="upper center", ncols=2)
    return _save(fig, out)


# --- report --------------------------------------------------------------------------------------------


def _clip(text: Any) -> str:
    text = str(text)
    return text if len(text) <= MAX_EXAMPLE_CHARS else text[: MAX_EXAMPLE_CHARS - 1] + "…"


def _robustness_lines(robustness: dict[str, dict[str, Any]]) -> list[str]:
    """The attacks' table, then a few example perturbations of each."""

    def pct(v: Any) -> Any:
        return None if v is None else f"{100 * v:.1f}%"

    lines = ["", "## Robustness", "",
             "Each attack on the same sample; accuracy under attack counts an example right only if the attack "
             "failed to change its prediction within the budget.", ""]
    lines += _table(["attack", "examples", "clean accuracy", "accuracy under attack", "success rate",
                     "words perturbed", "queries"],
                    [(name, r.get("n"), r.get("clean_accuracy"), r.get("attacked_accuracy"), r.get("success_rate"),
                      pct(r.get("words_perturbed")), r.get("queries")) for name, r in robustness.items()])
    rows = [(name, e.get("label"), e.get("perturbed_label"), _clip(e.get("original")), _clip(e.get("perturbed")))
            for name, r in robustness.items() for e in r.get("examples") or []]
    if rows:
        lines += ["", "### Example perturbations", ""]
        lines += _table(["attack", "label", "prediction after", "original", "perturbed"], rows)
    return lines


def _markdown(metrics: dict[str, Any], task: str, kind: str, plots: dict[str, Path],
              headline: Sequence[str] | None) -> str:
    """The report: headline numbers, then whichever sections the metrics hold (per class or label, ...)."""
    lines = [f"# Evaluation: {task}", "", f"Kind: {kind} · rows: {metrics.get('n', 'n/a')}", "", "## Headline", ""]
    keys = headline or [k for k, v in metrics.items() if isinstance(v, int | float | None) and not k.endswith("_note")]
    lines += _table(["metric", "value"], [(k, metrics[k]) for k in keys if k in metrics])
    notes = [f"- {k}: {v}" for k, v in metrics.items() if k.endswith("_note")]
    if notes:
        lines += ["", *notes]

    if metrics.get("spearman") is not None and metrics.get("pearson") is not None:
        lines += ["", f"Correlations × 100 (as usually reported for STS): "
                  f"Spearman ρ {100 * metrics['spearman']:.2f}, Pearson r {100 * metrics['pearson']:.2f}."]
    for key, title in (("per_class", "Per class"), ("per_relation", "Per relation")):
        if metrics.get(key):
            lines += ["", f"## {title}", ""]
            lines += _table(["label", "precision", "recall", "F1", "support"],
                            [(lab, m["precision"], m["recall"], m["f1"], m["support"])
                             for lab, m in metrics[key].items()])
    if metrics.get("per_label"):
        lines += ["", "## Per label", ""]
        lines += _table(["label", "F1", "threshold", "support"],
                        [(lab, m["f1"], m["threshold"], m["support"]) for lab, m in metrics["per_label"].items()])

    matrix, labels = metrics.get("confusion_matrix"), metrics.get("labels")
    if matrix and labels:
        lines += ["", "## Confusion matrix", ""]
        if len(labels) <= MAX_MD_CONFUSION:
            lines += ["Rows are true labels, columns predicted.", ""]
            rows = [(lab, *row) for lab, row in zip(labels, matrix, strict=True)]
            lines += _table(["true \\ predicted", *labels], rows)
        else:
            lines += [f"{len(labels)} labels: too many for a table; see the plot and `metrics.json`."]

    if metrics.get("robustness"):
        lines += _robustness_lines(metrics["robustness"])

    if plots:
        lines += ["", "## Plots", ""]
        titles = {"confusion_matrix": "Confusion matrix", "reliability": "Reliability diagram",
                  "training_curves": "Training curves", "robustness": "Robustness"}
        for name, path in plots.items():
            lines += [f"![{titles.get(name, name)}]({path.name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    out_dir: Path,
    metrics: dict[str, Any],
    task: str,
    kind: str,
    train_log: Path | None = None,
    probs: np.ndarray | None = None,
    y_true_idx: np.ndarray | None = None,
    labels: Sequence[str] | None = None,
    headline: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md`` and whichever plots have their inputs; return the paths written.

    ``labels`` names the confusion-matrix axes when ``metrics`` has no ``labels`` entry. The reliability
    diagram needs ``probs`` and ``y_true_idx``; the training curves need an existing ``train_log``; the
    robustness table and plot, ``metrics["robustness"]`` (``sora.attack.robustness``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if labels is not None and "labels" not in metrics:
        metrics = {**metrics, "labels": [str(lab) for lab in labels]}

    plots: dict[str, Path] = {}
    if metrics.get("confusion_matrix") and metrics.get("labels"):
        plots["confusion_matrix"] = confusion_matrix_plot(metrics["confusion_matrix"], metrics["labels"],
                                                          out_dir / "confusion_matrix.png")
    if probs is not None and y_true_idx is not None and len(y_true_idx):
        plots["reliability"] = reliability_plot(probs, y_true_idx, out_dir / "reliability.png")
    if metrics.get("robustness"):
        plots["robustness"] = robustness_plot(metrics["robustness"], out_dir / "robustness.png")
    if train_log is not None and Path(train_log).is_file():
        path = training_curves_plot(Path(train_log), out_dir / "training_curves.png", task)
        if path is not None:
            plots["training_curves"] = path

    written = {"metrics": out_dir / "metrics.json", "report": out_dir / "report.md"}
    written["metrics"].write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    written["report"].write_text(_markdown(metrics, task, kind, plots, headline), encoding="utf-8")
    return {**written, **plots}
