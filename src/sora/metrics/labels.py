"""Metrics on arrays: single-label and multi-label classification, regression, calibration.

Everything returned is JSON-able (plain floats, ints, lists; ``None`` where a metric is undefined),
so a metrics dict can go straight into ``metrics.json``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from sora.errors import missing

try:
    from scipy import stats
    from sklearn import metrics as skm
except ImportError as exc:
    raise missing(exc, "evaluation metrics") from exc

from sora.errors import DataError

THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)


def _num(x: Any) -> float | None:
    """A plain float, or None for NaN/inf (json.dumps would write NaN, which is not JSON)."""
    x = float(x)
    return x if math.isfinite(x) else None


def unseen_labels(y_true: Sequence[str], labels: Sequence[str]) -> dict[str, int]:
    """Labels in ``y_true`` that are not in ``labels``, with their row counts, most frequent first."""
    known = set(labels)
    return dict(Counter(y for y in y_true if y not in known).most_common())


def _check_labels(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> None:
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels has duplicates: {list(labels)}")
    if len(y_true) != len(y_pred):
        raise DataError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    if not y_true:
        raise DataError("no rows to evaluate")
    unseen = unseen_labels(y_true, labels)
    if unseen:
        names = list(unseen)
        shown = ", ".join(map(str, names[:10])) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        known = ", ".join(map(str, labels[:20])) + (", …" if len(labels) > 20 else "")
        raise DataError(
            f"test labels the model never saw: {shown} ({sum(unseen.values())} rows); the model knows {known}. "
            "Drop or relabel those rows, or fine-tune on data that contains them."
        )
    # Predictions come from the model, so a stray one means the label list passed here is not the model's.
    stray = unseen_labels(y_pred, labels)
    if stray:
        raise DataError(f"predictions contain labels not in the model's label list: {', '.join(map(str, stray))}")


def classification_metrics(
    y_true: Sequence[str], y_pred: Sequence[str], probs: np.ndarray | None, labels: Sequence[str]
) -> dict[str, Any]:
    """Single-label classification metrics.

    ``labels`` is the model's label order: the columns of ``probs`` and the rows/columns of the confusion
    matrix. Macro averages run over the labels present in ``y_true`` or ``y_pred`` (scikit-learn's
    default), so a class absent from the test set does not count as a zero.
    """
    y_true, y_pred, labels = list(y_true), list(y_pred), list(labels)
    _check_labels(y_true, y_pred, labels)
    n = len(y_true)
    seen = set(y_true) | set(y_pred)
    present = [lab for lab in labels if lab in seen]

    out: dict[str, Any] = {"n": n, "labels": [str(lab) for lab in labels],
                           "accuracy": _num(skm.accuracy_score(y_true, y_pred))}
    for avg in ("macro", "micro"):
        p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=present, average=avg,
                                                         zero_division=0)
        out[f"{avg}_precision"], out[f"{avg}_recall"], out[f"{avg}_f1"] = _num(p), _num(r), _num(f)
    out["weighted_f1"] = _num(skm.f1_score(y_true, y_pred, labels=present, average="weighted", zero_division=0))
    # One label on both sides: MCC's denominator is 0 and it is defined as 0 (sklearn's value, minus its warning).
    out["mcc"] = _num(skm.matthews_corrcoef(y_true, y_pred)) if len(seen) > 1 else 0.0

    out["roc_auc"], out["ece"] = None, None
    if probs is None:
        out["roc_auc_note"] = "no probabilities given"
    else:
        probs = np.asarray(probs, dtype=np.float64)
        if probs.shape != (n, len(labels)):
            raise ValueError(f"probs has shape {probs.shape}, expected ({n}, {len(labels)})")
        index = {lab: i for i, lab in enumerate(labels)}
        y_idx = np.array([index[y] for y in y_true])
        out["roc_auc"], note = _roc_auc(y_idx, probs, labels)
        if note:
            out["roc_auc_note"] = note
        out["ece"] = _num(expected_calibration_error(probs, y_idx))

    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    out["per_class"] = {
        str(lab): {"precision": _num(p[i]), "recall": _num(r[i]), "f1": _num(f[i]), "support": int(s[i])}
        for i, lab in enumerate(labels)
    }
    out["confusion_matrix"] = skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return out


def _roc_auc(y_idx: np.ndarray, probs: np.ndarray, labels: list[str]) -> tuple[float | None, str | None]:
    n_labels = len(labels)
    if n_labels < 2:
        return None, "ROC-AUC needs at least two labels"
    if n_labels == 2:
        if len(np.unique(y_idx)) < 2:
            return None, "ROC-AUC undefined: only one class appears in the test labels"
        return _num(skm.roc_auc_score(y_idx == 1, probs[:, 1])), None
    absent = [str(labels[k]) for k in range(n_labels) if not (y_idx == k).any()]
    if absent:
        return None, f"one-vs-rest ROC-AUC needs every class in the test labels; missing: {', '.join(absent)}"
    # One-vs-rest by hand rather than roc_auc_score(multi_class="ovr"), which rejects rows that do not sum to 1
    # (e.g. scores from independent sigmoids); the result is the same macro average.
    return _num(np.mean([skm.roc_auc_score(y_idx == k, probs[:, k]) for k in range(n_labels)])), None


def reliability_curve(probs: np.ndarray, y_true_idx: np.ndarray, bins: int = 15) -> dict[str, list]:
    """Per-bin data for a reliability diagram, binning the max-prob confidence into equal-width bins.

    Bin b holds confidences in (b/bins, (b+1)/bins] (the first also holds 0). ``confidence`` and
    ``accuracy`` are None for empty bins.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y_true_idx = np.asarray(y_true_idx)
    if probs.ndim != 2 or probs.shape[0] != len(y_true_idx):
        raise ValueError(f"probs must be (n, labels) with n = {len(y_true_idx)}; got {probs.shape}")
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true_idx
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=conf, minlength=bins)
    correct_sum = np.bincount(which, weights=correct.astype(np.float64), minlength=bins)
    nonzero = count > 0
    return {
        "edges": [float(e) for e in np.linspace(0.0, 1.0, bins + 1)],
        "count": [int(c) for c in count],
        "confidence": [float(conf_sum[b] / count[b]) if nonzero[b] else None for b in range(bins)],
        "accuracy": [float(correct_sum[b] / count[b]) if nonzero[b] else None for b in range(bins)],
    }


def expected_calibration_error(probs: np.ndarray, y_true_idx: np.ndarray, bins: int = 15) -> float:
    """ECE: Σ_b (n_b / n) · |accuracy_b − mean confidence_b| over equal-width max-prob bins."""
    curve = reliability_curve(probs, y_true_idx, bins)
    n = sum(curve["count"])
    if n == 0:
        return float("nan")
    return float(sum(c / n * abs(a - p) for c, a, p in zip(curve["count"], curve["accuracy"], curve["confidence"],
                                                             strict=True) if c))


def _check_multilabel(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    if y_true.ndim != 2 or y_true.shape != probs.shape:
        raise ValueError(f"y_true {y_true.shape} and probs {probs.shape} must both be (n, labels)")
    if not np.isin(y_true, (0, 1)).all():
        raise DataError("multi-label targets must be 0/1")
    return y_true.astype(np.int64), probs


def tune_thresholds(y_true: np.ndarray, probs: np.ndarray, grid: np.ndarray = THRESHOLD_GRID) -> np.ndarray:
    """Per-label threshold from ``grid`` maximising that label's F1 on validation data.

    Ties go to the threshold nearest 0.5, so a label whose F1 is flat (e.g. no positives) keeps the default.
    """
    y_true, probs = _check_multilabel(y_true, probs)
    grid = np.asarray(grid, dtype=np.float64)
    pred = probs[:, :, None] >= grid[None, None, :]  # (n, L, G)
    pos = y_true[:, :, None].astype(bool)
    tp = (pred & pos).sum(axis=0)
    fp = (pred & ~pos).sum(axis=0)
    fn = (~pred & pos).sum(axis=0)
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros(tp.shape), where=denom > 0)  # (L, G)
    # Lexicographic: highest F1, then closest to 0.5.
    best = np.isclose(f1, f1.max(axis=1, keepdims=True))
    distance = np.where(best, np.abs(grid - 0.5)[None, :], np.inf)
    return grid[distance.argmin(axis=1)]


def multilabel_metrics(
    y_true: np.ndarray, probs: np.ndarray, thresholds: np.ndarray | float, labels: Sequence[str]
) -> dict[str, Any]:
    """Multi-label metrics with a label predicted when its probability ≥ its threshold."""
    y_true, probs = _check_multilabel(y_true, probs)
    labels = list(labels)
    if probs.shape[1] != len(labels):
        raise ValueError(f"probs has {probs.shape[1]} columns but {len(labels)} labels")
    if len(y_true) == 0:
        raise DataError("no rows to evaluate")
    thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (len(labels),))
    pred = (probs >= thresholds[None, :]).astype(np.int64)
    f1 = skm.f1_score(y_true, pred, average=None, zero_division=0)
    return {
        "n": len(y_true),
        "labels": [str(lab) for lab in labels],
        "micro_f1": _num(skm.f1_score(y_true, pred, average="micro", zero_division=0)),
        "macro_f1": _num(skm.f1_score(y_true, pred, average="macro", zero_division=0)),
        "subset_accuracy": _num(skm.accuracy_score(y_true, pred)),
        "hamming_loss": _num(skm.hamming_loss(y_true, pred)),
        "per_label": {
            str(lab): {"f1": _num(f1[i]), "threshold": float(thresholds[i]), "support": int(y_true[:, i].sum())}
            for i, lab in enumerate(labels)
        },
    }


def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, Any]:
    """Pearson and Spearman correlation, MSE, MAE. Correlations are None when either side is constant."""
    y_true, y_pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise DataError(f"{y_true.shape} targets but {y_pred.shape} predictions; expected two equal-length lists")
    if len(y_true) < 2:
        raise DataError(f"need at least 2 rows for correlations, got {len(y_true)}")
    constant = np.ptp(y_true) == 0 or np.ptp(y_pred) == 0
    out: dict[str, Any] = {
        "n": len(y_true),
        "pearson": None if constant else _num(stats.pearsonr(y_true, y_pred).statistic),
        "spearman": None if constant else _num(stats.spearmanr(y_true, y_pred).statistic),
        "mse": _num(skm.mean_squared_error(y_true, y_pred)),
        "mae": _num(skm.mean_absolute_error(y_true, y_pred)),
    }
    if constant:
        out["correlation_note"] = "targets or predictions are constant; correlations undefined"
    return out
