"""Extractive QA metrics, written to the semantics of the official scripts so scores compare with papers.

- SQuAD v1.1 (``evaluate-v1.1.py``): answers normalised (lower-cased, ASCII punctuation and the articles
  a/an/the removed, whitespace collapsed); exact match and bag-of-tokens F1, each the max over the gold
  answers; a question without a prediction scores 0; results in percent.
- CMRC 2018 (``cmrc2018_evaluate.py``): Chinese has no spaces, so text is segmented "mixed": every CJK
  character (U+4E00–U+9FA5) is a token and the text between them is split into words; the official list of
  punctuation (ASCII symbols and Chinese punctuation) is removed; F1 comes from the longest common *substring*
  of the token lists (not a bag of tokens); EM compares the texts with that punctuation removed.

The official CMRC script splits the non-CJK runs with ``nltk.word_tokenize``; nltk (and its punkt data) is
not a dependency, so ``_words`` stands in: runs of word characters (a number with a decimal point or
thousands separator stays one token) and every other non-space character alone. It differs from nltk only
on English contractions ("don't") and a few punctuation clusters, which CMRC answers rarely contain.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

# ---------------------------------------------------------------------------------------------- SQuAD v1.1

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (official order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    """1.0 when the normalised texts are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token F1 of the normalised texts, tokens counted with multiplicity (a bag, order ignored)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def metric_max_over_ground_truths(
    metric: Callable[[str, str], float], prediction: str, ground_truths: Sequence[str]
) -> float:
    """The best score against any gold answer. No gold answer counts as the gold answer "" (as SQuAD v2
    scores an unanswerable question), so only an empty prediction scores there."""
    return max(metric(prediction, gold) for gold in (ground_truths or [""]))


def _aggregate(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    em: Callable[[str, Sequence[str]], float],
    f1: Callable[[str, Sequence[str]], float],
) -> dict:
    """Mean EM/F1 in percent over the references; an unanswered question scores 0, extra predictions are
    ignored (both as the official scripts)."""
    total_em = total_f1 = 0.0
    for qid, golds in references.items():
        if qid not in predictions:
            continue
        prediction = str(predictions[qid])
        total_em += em(prediction, golds)
        total_f1 += f1(prediction, golds)
    n = len(references)
    return {"exact_match": 100.0 * total_em / n if n else 0.0, "f1": 100.0 * total_f1 / n if n else 0.0, "n": n}


def squad_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict:
    """``{"exact_match": %, "f1": %, "n": questions}`` as ``evaluate-v1.1.py``: ``predictions`` maps a
    question id to its answer text, ``references`` maps it to the gold answers."""
    return _aggregate(
        predictions,
        references,
        lambda p, g: metric_max_over_ground_truths(exact_match_score, p, g),
        lambda p, g: metric_max_over_ground_truths(f1_score, p, g),
    )


# ----------------------------------------------------------------------------------------------- CMRC 2018

# The official list, one character each. Its "……" is left out: it is two characters and the script compares
# one character at a time, so it never matches there (a lone "…" is kept, as there).
CMRC_PUNCTUATION = frozenset("-:_*^/\\~`+=，。：？！“”；’《》·、「」（）－～『』")
_CJK = re.compile(r"[\u4e00-\u9fa5]")
_WORD = re.compile(r"\d+(?:[.,]\d+)+|\w+|\S")


def _words(text: str) -> list[str]:
    """Stand-in for ``nltk.word_tokenize`` on the non-CJK runs (see the module docstring)."""
    return _WORD.findall(text)


def mixed_segmentation(text: str, remove_punctuation: bool = True) -> list[str]:
    """CMRC tokens: lower-cased, stripped; each CJK character and each listed punctuation mark is a token
    (punctuation dropped with ``remove_punctuation``), the runs between them are split into words."""
    tokens: list[str] = []
    run: list[str] = []
    for ch in text.lower().strip():
        if remove_punctuation and ch in CMRC_PUNCTUATION:
            continue
        if _CJK.match(ch) or ch in CMRC_PUNCTUATION:
            tokens.extend(_words("".join(run)))
            run = []
            tokens.append(ch)
        else:
            run.append(ch)
    tokens.extend(_words("".join(run)))
    return tokens


def cmrc_remove_punctuation(text: str) -> str:
    """Lower-cased, stripped, the official punctuation removed: what CMRC's exact match compares."""
    return "".join(ch for ch in text.lower().strip() if ch not in CMRC_PUNCTUATION)


def longest_common_substring(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest contiguous run of tokens shared by ``a`` and ``b`` (dynamic programming)."""
    best = 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            if x == y:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def cmrc_f1(prediction: str, answers: Sequence[str]) -> float:
    """CMRC F1: precision and recall of the longest common substring of the segmented texts, best answer."""
    pred = mixed_segmentation(prediction)
    scores = [0.0]
    for answer in answers or [""]:
        gold = mixed_segmentation(answer)
        common = longest_common_substring(gold, pred)
        if common:
            precision, recall = common / len(pred), common / len(gold)
            scores.append(2 * precision * recall / (precision + recall))
    return max(scores)


def cmrc_em(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the prediction equals some answer once both lose case, outer spaces and punctuation."""
    pred = cmrc_remove_punctuation(prediction)
    return float(any(cmrc_remove_punctuation(answer) == pred for answer in answers or [""]))


def cmrc_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict:
    """``{"exact_match": %, "f1": %, "n": questions}`` as ``cmrc2018_evaluate.py`` (same inputs as
    ``squad_metrics``)."""
    return _aggregate(predictions, references, lambda p, g: cmrc_em(p, g), lambda p, g: cmrc_f1(p, g))


# ---------------------------------------------------------------------------------------------- either one


def detect_language(references: Mapping[str, Sequence[str]]) -> str:
    """ "zh" when most non-space characters of the gold answers are CJK (U+4E00–U+9FA5), else "en"."""
    chars = [ch for golds in references.values() for answer in golds for ch in answer if not ch.isspace()]
    cjk = sum(1 for ch in chars if _CJK.match(ch))
    return "zh" if chars and cjk > len(chars) / 2 else "en"


def qa_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], language: str = "auto") -> dict:
    """CMRC 2018 metrics for Chinese, SQuAD v1.1 metrics otherwise. ``language``: "auto" (from the gold
    answers, ``detect_language``), "zh"/"cmrc" or "en"/"squad"."""
    choice = {"zh": "zh", "cmrc": "zh", "en": "en", "squad": "en"}.get(language)
    if language == "auto":
        choice = detect_language(references)
    if choice is None:
        raise ValueError(f"language {language!r}: use 'auto', 'zh' (CMRC 2018) or 'en' (SQuAD)")
    return (cmrc_metrics if choice == "zh" else squad_metrics)(predictions, references)
