"""Metrics of generated text against references, in points (0-100): sacreBLEU corpus BLEU and chrF, and ROUGE-1/2/L
F-measure (Google's ``rouge_score``, Porter stemmer on), the numbers translation and summarisation papers report.

Inputs are detokenised strings, as a user reads them: sacreBLEU tokenises itself (``13a`` by default; ``zh`` or
``intl`` for other scripts), so scores are comparable with published ones. ``rouge_score`` keeps only ASCII letters
and digits, so ROUGE is meaningful for English (and Latin-script) text only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sora.errors import missing

try:
    import sacrebleu
    from rouge_score import rouge_scorer
except ImportError as exc:
    raise missing(exc, "generation metrics") from exc

ROUGE = ("rouge1", "rouge2", "rougeL")


def _references(references: Sequence[str | Sequence[str]], n: int) -> list[list[str]]:
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if len(refs) != n:
        raise ValueError(f"{n} predictions but {len(refs)} references")
    if any(not r for r in refs):
        raise ValueError("every prediction needs at least one reference")
    return refs


def _streams(refs: list[list[str]]) -> list[list[str | None]]:
    """sacreBLEU's layout: one stream per reference index, None where an example has fewer references."""
    width = max(len(r) for r in refs)
    return [[r[i] if i < len(r) else None for r in refs] for i in range(width)]


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]], tokenize: str = "13a") -> float:
    """Corpus BLEU (``sacrebleu.corpus_bleu``), several references per example allowed."""
    refs = _references(references, len(predictions))
    return float(sacrebleu.corpus_bleu(list(predictions), _streams(refs), tokenize=tokenize).score)


def chrf(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus chrF (``sacrebleu.corpus_chrf``: character 6-grams, β = 2)."""
    refs = _references(references, len(predictions))
    return float(sacrebleu.corpus_chrf(list(predictions), _streams(refs)).score)


def rouge(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """ROUGE-1, -2 and -L F-measure, stemmed. With several references an example scores its best reference, per
    measure (the max over references), and the corpus score is the mean over examples (DialogSum's multi-reference
    protocol; ``rouge_score``'s own ``score_multi`` picks one reference for all measures instead)."""
    refs = _references(references, len(predictions))
    scorer = rouge_scorer.RougeScorer(list(ROUGE), use_stemmer=True)
    totals = dict.fromkeys(ROUGE, 0.0)
    for prediction, candidates in zip(predictions, refs, strict=True):
        scores = [scorer.score(ref, prediction) for ref in candidates]  # score(target, prediction)
        for key in ROUGE:
            totals[key] += max(s[key].fmeasure for s in scores)
    n = max(1, len(refs))
    return {key: 100.0 * total / n for key, total in totals.items()}


def generation_metrics(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                       tokenize: str = "13a") -> dict[str, Any]:
    """BLEU, chrF, ROUGE-1/2/L (points) and the count ``n``; every metric 0.0 on no examples."""
    if not predictions:
        return {"bleu": 0.0, "chrf": 0.0, **dict.fromkeys(ROUGE, 0.0), "n": 0}
    return {"bleu": bleu(predictions, references, tokenize), "chrf": chrf(predictions, references),
            **rouge(predictions, references), "n": len(predictions)}
