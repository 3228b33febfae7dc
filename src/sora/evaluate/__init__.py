"""Evaluation on arrays, not models: metrics for classification, multi-label and regression, and reports."""

from sora.evaluate.metrics import (
    classification_metrics,
    expected_calibration_error,
    multilabel_metrics,
    regression_metrics,
    reliability_curve,
    tune_thresholds,
    unseen_labels,
)
from sora.evaluate.report import label_curve_plot, write_report

__all__ = [
    "classification_metrics",
    "expected_calibration_error",
    "label_curve_plot",
    "multilabel_metrics",
    "regression_metrics",
    "reliability_curve",
    "tune_thresholds",
    "unseen_labels",
    "write_report",
]
