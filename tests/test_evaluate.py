"""Evaluation layer: metrics against hand-computed values, the unseen-label guard, and the report on disk."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sora.errors import DataError
from sora.evaluate import (
    classification_metrics,
    expected_calibration_error,
    label_curve_plot,
    multilabel_metrics,
    regression_metrics,
    reliability_curve,
    tune_thresholds,
    unseen_labels,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Three classes, six rows. Confusion (rows true a, b, c): [2 1 0], [0 1 1], [0 0 1].
LABELS = ["a", "b", "c"]
Y_TRUE = ["a", "a", "a", "b", "b", "c"]
Y_PRED = ["a", "a", "b", "b", "c", "c"]
PROBS = np.array([
    [0.8, 0.1, 0.1],
    [0.6, 0.3, 0.1],
    [0.3, 0.6, 0.1],
    [0.2, 0.7, 0.1],
    [0.1, 0.4, 0.5],
    [0.1, 0.1, 0.8],
])


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 2000, f"{path} is suspiciously small ({len(data)} bytes)"


def test_classification_hand_computed():
    m = classification_metrics(Y_TRUE, Y_PRED, PROBS, LABELS)
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    # Per class: a P=1 R=2/3 F1=0.8; b P=R=F1=1/2; c P=1/2 R=1 F1=2/3.
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["per_class"]["b"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["c"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["macro_precision"] == pytest.approx(2 / 3)
    assert m["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert m["micro_f1"] == pytest.approx(4 / 6)  # single-label: micro = accuracy
    assert m["weighted_f1"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    # Gorodkin's multi-class MCC: (c·s − Σ p_k t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²)), p = [2,2,2], t = [3,2,1].
    assert m["mcc"] == pytest.approx((4 * 6 - (6 + 4 + 2)) / math.sqrt((36 - 12) * (36 - 14)))
    # Rows are true labels, columns predicted: one "a" went to "b", none the other way.
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["roc_auc"] is not None and 0.5 < m["roc_auc"] <= 1.0
    json.dumps(m, allow_nan=False)  # JSON-able, no NaN


def test_confusion_matrix_follows_label_order():
    m = classification_metrics(Y_TRUE, Y_PRED, None, ["c", "b", "a"])
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 1, 2]]
    assert m["roc_auc"] is None and m["ece"] is None and "roc_auc_note" in m


def test_binary_roc_auc_uses_positive_column():
    # Positive-vs-negative pairs: 0.4>0.1, 0.4<0.6, 0.9>0.1, 0.9>0.6 → 3/4.
    p_pos = np.array([0.1, 0.6, 0.4, 0.9])
    probs = np.stack([1 - p_pos, p_pos], axis=1)
    m = classification_metrics(["neg", "neg", "pos", "pos"], ["neg", "pos", "neg", "pos"], probs, ["neg", "pos"])
    assert m["roc_auc"] == pytest.approx(0.75)
    assert m["mcc"] == pytest.approx(0.0)


def test_multiclass_roc_auc_null_when_a_class_is_missing():
    m = classification_metrics(["a", "b"], ["a", "b"], PROBS[:2], LABELS)
    assert m["roc_auc"] is None
    assert "missing: c" in m["roc_auc_note"]
    # Macro averages skip the class absent from both sides rather than counting it as zero.
    assert m["macro_f1"] == pytest.approx(1.0)
    assert m["per_class"]["c"]["support"] == 0


def test_unseen_labels_raise_with_counts():
    assert unseen_labels(["a", "x", "x", "y"], ["a", "b"]) == {"x": 2, "y": 1}
    with pytest.raises(DataError, match=r"test labels the model never saw: x, y \(3 rows\)"):
        classification_metrics(["a", "x", "x", "y"], ["a", "a", "a", "a"], None, ["a", "b"])
    with pytest.raises(DataError, match="predictions contain labels"):
        classification_metrics(["a", "b"], ["a", "z"], None, ["a", "b"])


def test_ece_calibrated_and_overconfident():
    # Confidence 0.8 and 8 of 10 right: perfectly calibrated.
    probs = np.tile([0.8, 0.2], (10, 1))
    assert expected_calibration_error(probs, np.array([0] * 8 + [1] * 2)) == pytest.approx(0.0, abs=1e-12)
    # Confidence 0.9 but half right: off by 0.4.
    probs = np.tile([0.9, 0.1], (10, 1))
    assert expected_calibration_error(probs, np.array([0] * 5 + [1] * 5)) == pytest.approx(0.4)
    # Two bins, half the rows each: 0.5·|1 − 0.95| + 0.5·|0.5 − 0.6| = 0.075.
    probs = np.array([[0.95, 0.05]] * 4 + [[0.6, 0.4]] * 4)
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    assert expected_calibration_error(probs, y) == pytest.approx(0.075)
    curve = reliability_curve(probs, y)
    assert len(curve["edges"]) == 16 and sum(curve["count"]) == 8
    assert curve["count"][14] == 4 and curve["accuracy"][14] == pytest.approx(1.0)
    assert curve["accuracy"][0] is None


def test_multilabel_metrics_hand_computed():
    y = np.array([[1, 0], [0, 1]])
    probs = np.array([[0.9, 0.6], [0.2, 0.7]])  # at 0.5: [[1, 1], [0, 1]]
    m = multilabel_metrics(y, probs, np.array([0.5, 0.5]), ["x", "y"])
    assert m["subset_accuracy"] == pytest.approx(0.5)
    assert m["hamming_loss"] == pytest.approx(0.25)
    assert m["micro_f1"] == pytest.approx(0.8)  # tp 2, fp 1, fn 0
    assert m["macro_f1"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert m["per_label"]["y"] == pytest.approx({"f1": 2 / 3, "threshold": 0.5, "support": 1})


def _multilabel_sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    # Label 0 is under-confident (positives 0.2–0.45), label 1 over-confident (negatives 0.55–0.7):
    # 0.5 gets both wrong, a per-label threshold separates them.
    y = rng.integers(0, 2, size=(n, 2))
    p0 = np.where(y[:, 0] == 1, rng.uniform(0.2, 0.45, n), rng.uniform(0.0, 0.15, n))
    p1 = np.where(y[:, 1] == 1, rng.uniform(0.75, 0.95, n), rng.uniform(0.55, 0.7, n))
    return y, np.stack([p0, p1], axis=1)


def test_tuned_thresholds_beat_half():
    rng = np.random.default_rng(0)
    y_val, p_val = _multilabel_sample(rng, 200)
    y_test, p_test = _multilabel_sample(rng, 200)
    thresholds = tune_thresholds(y_val, p_val)
    # Of the thresholds that separate perfectly, the one nearest 0.5 wins.
    assert thresholds.tolist() == pytest.approx([0.2, 0.7])
    tuned = multilabel_metrics(y_test, p_test, thresholds, ["under", "over"])
    default = multilabel_metrics(y_test, p_test, 0.5, ["under", "over"])
    assert tuned["micro_f1"] == pytest.approx(1.0)
    assert tuned["micro_f1"] > default["micro_f1"] + 0.2
    assert tuned["macro_f1"] > default["macro_f1"]


def test_tune_thresholds_keeps_half_when_flat():
    y = np.zeros((6, 1), dtype=int)  # no positives: F1 is 0 everywhere
    assert tune_thresholds(y, np.linspace(0, 1, 6)[:, None])[0] == pytest.approx(0.5)


def test_regression_hand_computed():
    # x = [1,2,3], y = [1,10,2]: ranks [1,3,2] → Spearman 0.5; Pearson 1/sqrt(2·146/3); errors [0,8,−1].
    m = regression_metrics([1, 2, 3], [1, 10, 2])
    assert m["spearman"] == pytest.approx(0.5)
    assert m["pearson"] == pytest.approx(1 / math.sqrt(2 * 146 / 3))
    assert m["mse"] == pytest.approx(65 / 3)
    assert m["mae"] == pytest.approx(3.0)
    assert m["n"] == 3
    constant = regression_metrics([1, 2, 3], [2, 2, 2])
    assert constant["pearson"] is None and "correlation_note" in constant
    with pytest.raises(DataError):
        regression_metrics([1.0], [1.0])


def _train_log(path: Path, torn_tail: bool = False) -> Path:
    lines = [json.dumps({"step": s, "loss": 3.0 / s + 0.01 * (s % 3), "lr": 1e-3}) for s in range(1, 41)]
    lines += [json.dumps({"step": s, "val_loss": 3.0 / s, "val_accuracy": 1 - 1 / s}) for s in (10, 20, 30, 40)]
    text = "\n".join(lines) + "\n" + ('{"step": 41, "lo' if torn_tail else "")
    path.write_text(text)
    return path


def test_write_report_classification(tmp_path):
    metrics = classification_metrics(Y_TRUE, Y_PRED, PROBS, LABELS)
    index = {lab: i for i, lab in enumerate(LABELS)}
    y_idx = np.array([index[y] for y in Y_TRUE])
    out = tmp_path / "report"
    paths = write_report(out, metrics, "toy", "classification", train_log=_train_log(tmp_path / "log.jsonl", True),
                         probs=PROBS, y_true_idx=y_idx, labels=LABELS)
    assert set(paths) == {"metrics", "report", "confusion_matrix", "reliability", "training_curves"}
    assert json.loads((out / "metrics.json").read_text()) == metrics
    md = (out / "report.md").read_text()
    assert "| accuracy | 0.6667 |" in md
    assert "| a | 1.0000 | 0.6667 | 0.8000 | 3 |" in md  # per-class row
    assert "| c | 0.5000 | 1.0000 | 0.6667 | 1 |" in md
    assert "| a | 2 | 1 | 0 |" in md  # confusion matrix row for true "a"
    for name in ("confusion_matrix.png", "reliability.png", "training_curves.png"):
        assert f"]({name})" in md
        assert_png(out / name)


def test_write_report_skips_missing_inputs(tmp_path):
    metrics = regression_metrics([1, 2, 3, 4], [1.1, 2.2, 2.9, 4.2])
    paths = write_report(tmp_path, metrics, "sts", "regression", train_log=tmp_path / "absent.jsonl")
    assert set(paths) == {"metrics", "report"}
    md = (tmp_path / "report.md").read_text()
    assert "| spearman | 1.0000 |" in md and "Spearman ρ 100.00" in md
    assert not list(tmp_path.glob("*.png"))


def test_write_report_many_labels(tmp_path):
    labels = [f"class_{i:02d}" for i in range(30)]
    rng = np.random.default_rng(1)
    y_true = [labels[i] for i in rng.integers(0, 30, 300)]
    y_pred = [y if rng.random() < 0.7 else labels[rng.integers(0, 30)] for y in y_true]
    paths = write_report(tmp_path, classification_metrics(y_true, y_pred, None, labels), "many", "classification")
    assert_png(paths["confusion_matrix"])
    assert "30 labels: too many for a table" in (tmp_path / "report.md").read_text()


def test_malformed_train_log_names_the_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    metrics = classification_metrics(["a"], ["a"], None, ["a", "b"])
    with pytest.raises(DataError, match=r"log\.jsonl:2"):
        write_report(tmp_path / "r", metrics, "t", "classification", train_log=log)


def test_label_curve_plot(tmp_path):
    points = [{"labels_per_class": k, "mean": m, "std": s, "system": sys}
              for sys, base in (("sora", 0.6), ("tf-idf", 0.5))
              for k, m, s in ((4, base, 0.05), (8, base + 0.1, 0.04), (16, base + 0.15, 0.03), (64, base + 0.2, 0.01))]
    path = label_curve_plot(points, tmp_path / "curves" / "label_curve.png")
    assert_png(path)
