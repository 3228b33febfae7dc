"""Evaluation: metrics on arrays for classification, multi-label and regression, and reports; retrieval and
similarity correlation of any model's embeddings (``sora.evaluate.retrieval``)."""

from sora.evaluate.report import label_curve_plot, write_report
from sora.evaluate.retrieval import evaluate_retrieval, query_metrics, retrieval_metrics, similarity_correlation
from sora.metrics.labels import (
    classification_metrics,
    expected_calibration_error,
    multilabel_metrics,
    regression_metrics,
    reliability_curve,
    tune_thresholds,
    unseen_labels,
)

__all__ = [
    "classification_metrics",
    "evaluate_retrieval",
    "expected_calibration_error",
    "label_curve_plot",
    "multilabel_metrics",
    "query_metrics",
    "regression_metrics",
    "reliability_curve",
    "retrieval_metrics",
    "similarity_correlation",
    "tune_thresholds",
    "unseen_labels",
    "write_report",
]
