"""Words of a text as an attack sees them: where they are, which may change, and how to put the text back together.

A text is cut into *parts*: gaps (spaces, punctuation, digits) and words, alternating, plus one frozen part per
span the kind keeps (a relation's entities). Latin-script words are runs of letters (``don't`` is one word); a
Han character or kana is a word of its own, since Chinese and Japanese put no spaces between words and there is
no offline segmenter to rely on. Edits replace word parts only, so the kept spans come back exactly where the
rebuilt text puts them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff"  # Han (with extension A and compatibility), kana
_LETTER = rf"(?:(?![{CJK}])[^\W\d_])"
WORD = re.compile(rf"[{CJK}]|{_LETTER}+(?:['’]{_LETTER}+)*")

# English function words (NLTK's list, plus modals and negations): TextFooler and TextAttack's recipes never
# change them — swapping "not" or "no" changes the meaning, not the wording.
_ENGLISH_STOP = """
a about above after again against ain all also am an and any are aren as at be because been before being below
between both but by can cannot could couldn d did didn do does doesn doing don down during each either else ever
every few for from further had hadn has hasn have haven having he her here hers herself him himself his how however
i if in into is isn it its itself just ll m ma may me might mightn more most must mustn my myself needn neither never
no nor not now o of off on once only or other our ours ourselves out over own re s same shall shan she should
shouldn so some such t than that the their theirs them themselves then there these they this those through to too
under until up upon ve very was wasn we were weren what when where whether which while who whom whose why will with
won would wouldn y yet you your yours yourself yourselves
"""
STOP_WORDS = frozenset(_ENGLISH_STOP.split())
# Chinese: particles, the copula and the negations (deleting 不 from 不好 turns "not good" into "good").
CJK_STOP_WORDS = frozenset("的了是在和与及或也都就还很吗呢吧啊呀着过地得之其而不没沒无無非未别別否莫勿")

KEYBOARD = {  # QWERTY neighbours of each letter (same row and the rows above and below)
    "q": "wa", "w": "qeas", "e": "wrsd", "r": "etdf", "t": "ryfg", "y": "tugh", "u": "yihj", "i": "uojk",
    "o": "ipkl", "p": "ol", "a": "qwsz", "s": "awedxz", "d": "serfcx", "f": "drtgvc", "g": "ftyhbv",
    "h": "gyujnb", "j": "huikmn", "k": "jiolm", "l": "kop", "z": "asx", "x": "zsdc", "c": "xdfv", "v": "cfgb",
    "b": "vghn", "n": "bhjm", "m": "njk",
}

Span = tuple[int, int]


def is_cjk(word: str) -> bool:
    return len(word) == 1 and re.match(f"[{CJK}]", word) is not None


def is_stop_word(word: str) -> bool:
    w = word.lower().replace("’", "'")
    return w in STOP_WORDS or w in CJK_STOP_WORDS or w.endswith("n't") or w.split("'")[0] in STOP_WORDS


def match_case(original: str, new: str) -> str:
    """``new`` written in ``original``'s case: GREAT → SUPERB, Great → Superb, great → superb."""
    if len(original) > 1 and original.isupper():
        return new.upper()
    if original[:1].isupper():
        return new[:1].upper() + new[1:]
    return new


@dataclass
class Segments:
    """One text as parts. ``words``: indices of the parts an attack may edit (words outside the kept spans);
    ``kept``: span name → index of the frozen part holding it; ``n_words``: the words of the whole text, kept
    ones included (what a budget's fraction is of)."""

    parts: list[str]
    words: list[int]
    kept: dict[str, int]
    n_words: int
    wordset: set[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.wordset = set(self.words)

    @classmethod
    def of(cls, text: str, spans: dict[str, Span] | None = None) -> Segments:
        parts: list[str] = []
        words: list[int] = []
        kept: dict[str, int] = {}
        n_words, pos = 0, 0
        for name, (start, end) in sorted((spans or {}).items(), key=lambda kv: kv[1]):
            n_words += cls._cut(text[pos:start], parts, words)
            kept[name] = len(parts)
            parts.append(text[start:end])
            n_words += len(WORD.findall(text[start:end]))
            pos = end
        n_words += cls._cut(text[pos:], parts, words)
        return cls(parts, words, kept, n_words)

    @staticmethod
    def _cut(region: str, parts: list[str], words: list[int]) -> int:
        pos, n = 0, 0
        for m in WORD.finditer(region):
            parts.append(region[pos : m.start()])
            words.append(len(parts))
            parts.append(m.group())
            pos, n = m.end(), n + 1
        parts.append(region[pos:])
        return n

    def render(self, parts: list[str]) -> tuple[str, dict[str, Span]]:
        """The text of ``parts`` and where each kept span now lies in it."""
        spans: dict[str, Span] = {}
        at = {i: name for name, i in self.kept.items()}
        pos = 0
        for i, p in enumerate(parts):
            if i in at:
                spans[at[i]] = (pos, pos + len(p))
            pos += len(p)
        return "".join(parts), spans

    def deletion(self, parts: list[str], i: int) -> dict[int, str]:
        """The edit that removes word ``i`` with one space beside it (so no double space is left)."""
        edit = {i: ""}
        for gap in (i - 1, i + 1):
            if 0 <= gap < len(parts) and gap not in self.kept.values() and parts[gap] and parts[gap].isspace():
                edit[gap] = parts[gap][:-1]
                break
        return edit

    def adjacent_word(self, parts: list[str], i: int, step: int) -> int | None:
        """The editable word right beside word ``i`` (``step`` ±1) with nothing between them, or None."""
        gap, j = i + step, i + 2 * step
        if 0 <= j < len(parts) and parts[gap] == "" and j in self.wordset:
            return j
        return None


def apply(parts: list[str], edit: dict[int, str]) -> list[str]:
    out = list(parts)
    for i, value in edit.items():
        out[i] = value
    return out


def marked(text: str, spans: dict[str, Span], tags: dict[str, str]) -> str:
    """``text`` with each kept span wrapped in its tag (``<e1>…</e1>``): how a relation row writes entities."""
    for name, (start, end) in sorted(spans.items(), key=lambda kv: -kv[1][0]):
        tag = tags[name]
        text = f"{text[:start]}<{tag}>{text[start:end]}</{tag}>{text[end:]}"
    return text
