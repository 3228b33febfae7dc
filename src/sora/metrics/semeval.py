"""The official SemEval-2010 Task 8 score, as ``semeval2010_task8_scorer-v1.2.pl`` computes its headline.

The official score is (iii) of the scorer: "(9+1)-way classification with directionality taken into account",
macro-averaged F1 over the relations, ``Other`` excluded. Papers report this number, so Sora reports it the same
way rather than a sklearn macro-F1 over the 19 directed labels (which differs):

- labels are merged to their relation (``Cause-Effect(e1,e2)`` and ``Cause-Effect(e2,e1)`` → ``Cause-Effect``);
- a prediction is correct only when relation *and* direction match;
- per relation R: P = correct R / predictions whose relation is R, whatever their direction (the scorer adds its
  wrong-direction column, ``xDIRx``, back into the precision denominator: the v1.2 fix), R = correct R / gold R
  (a wrong direction is a miss), F1 = 2PR / (P + R), 0 where undefined;
- macro-F1 is the mean of the per-relation F1s (not the F1 of mean P and mean R) over the relations that occur in
  the gold labels, ``Other`` excluded (the scorer divides by the gold relations it saw); predictions of a
  relation absent from the gold labels are wrong rows but enter no relation's precision, as in the scorer;
- accuracy is exact-match over all rows, ``Other`` included.

Any label set written in the ``Name(e1,e2)`` convention gets the same treatment. Labels without a direction (plain
names) merge to themselves, so the score is then the plain macro-F1 over the gold labels except the negative ones
(``Other``, ``no_relation``). Every score is a percentage (0-100), as the scorer prints and papers report.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from sora.data.relation import split_direction
from sora.errors import DataError

NEGATIVE = ("Other", "no_relation")


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def semeval_scores(y_true: Sequence[str], y_pred: Sequence[str], negative: Iterable[str] = NEGATIVE) -> dict[str, Any]:
    """``{"macro_f1", "micro_f1", "accuracy", "per_relation": {rel: {precision, recall, f1, support}}, "n"}``,
    percentages; ``macro_f1`` is the official score. With no non-negative relation in the gold labels there is
    nothing to average: ``macro_f1`` and ``micro_f1`` are 0."""
    if len(y_true) != len(y_pred):
        raise DataError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    if not y_true:
        raise DataError("no rows to evaluate")
    skip = set(negative)
    true_rel = [split_direction(y)[0] for y in y_true]
    pred_rel = [split_direction(y)[0] for y in y_pred]
    support = Counter(true_rel)
    predicted = Counter(pred_rel)
    correct = Counter(t for t, yt, yp in zip(true_rel, y_true, y_pred, strict=True) if yt == yp)
    per_relation: dict[str, dict[str, float | int]] = {}
    for rel in sorted(support):
        if rel in skip:
            continue
        p = 100.0 * correct[rel] / predicted[rel] if predicted[rel] else 0.0
        r = 100.0 * correct[rel] / support[rel]
        per_relation[rel] = {"precision": p, "recall": r, "f1": _f1(p, r), "support": support[rel]}
    rels = list(per_relation)
    macro = sum(per_relation[r]["f1"] for r in rels) / len(rels) if rels else 0.0
    hits, proposed, gold = (sum(c[r] for r in rels) for c in (correct, predicted, support))
    micro = _f1(100.0 * hits / proposed if proposed else 0.0, 100.0 * hits / gold if gold else 0.0)
    accuracy = 100.0 * sum(c for c in correct.values()) / len(y_true)
    return {"macro_f1": macro, "micro_f1": micro, "accuracy": accuracy, "per_relation": per_relation, "n": len(y_true)}
