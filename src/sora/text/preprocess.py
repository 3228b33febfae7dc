"""Classic preprocessing for the bag-of-words baseline: lowercasing, stopwords, stemming.

Off by default on the neural path, where subword tokenizers want the raw text.
"""

from __future__ import annotations

import re

from sora.errors import missing

try:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
except ImportError as exc:
    raise missing(exc, "sora.text.preprocess (its stop-word list)") from exc

# CJK first, and kept out of the word class: ``\w`` matches CJK too and would glue a sentence into one "word".
_WORD = re.compile(r"[\u3400-\u9fff]|(?:[^\W\u3400-\u9fff]|')+", re.UNICODE)
_SUFFIXES = ("ingly", "edly", "ing", "ies", "ied", "ed", "ly", "es", "s")


def light_stem(word: str) -> str:
    """A small suffix stripper (English); keeps words of three letters or fewer as they are."""
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)] + ("y" if suffix in ("ies", "ied") else "")
    return word


def preprocess(text: str, lowercase: bool = True, stopwords: bool = True, stem: bool = False) -> list[str]:
    """Words of ``text``; CJK characters come out one by one, as they carry no spaces."""
    if lowercase:
        text = text.lower()
    words = _WORD.findall(text)
    if stopwords:
        words = [w for w in words if w not in ENGLISH_STOP_WORDS]
    if stem:
        words = [light_stem(w) for w in words]
    return words
