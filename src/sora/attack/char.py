"""``char``: typos on the most important words (DeepWordBug, Gao et al. 2018, as TextAttack's recipe runs it).

Each word, from the most important down (deletion importance), gets one candidate per edit: swap two adjacent
letters, substitute a letter, delete one, insert one, or replace one by a QWERTY keyboard neighbour; positions
and letters come from the example's seeded generator, so the same seed gives the same typos. The edit that
flips the prediction (or, failing that, lowers the true label's probability most) is kept. No semantic
constraint: a typo keeps the meaning for a reader, which is the point; the budget bounds how many words change.

**Chinese and Japanese.** A Han character (or kana) is a word of its own, and gets the two edits that make sense
without data: deleting it, and swapping it with the character beside it (transposed characters are read past
almost unnoticed: 研表究明, 汉字序顺并不定一能影阅响读). Visually or phonetically near characters (homoglyphs,
homophones) are what Chinese attacks use most, but they need a confusion set or a pinyin table, which Sora does
not ship and would have to download; they are left out rather than guessed. Negations and particles are never
touched (``text.CJK_STOP_WORDS``): deleting 不 from 不好 says the opposite, not the same with a typo. A swap
changes two characters, and counts as two in the budget.
"""

from __future__ import annotations

import random
import string

from sora.attack.base import Attack
from sora.attack.text import KEYBOARD, Segments, is_cjk, is_stop_word


def _letter(rng: random.Random, like: str, avoid: str = "") -> str:
    options = [c for c in string.ascii_lowercase if c != avoid.lower()]
    c = rng.choice(options)
    return c.upper() if like.isupper() else c


def typos(word: str, rng: random.Random) -> list[str]:
    """One typo per edit (swap, substitute, delete, insert, keyboard neighbour), distinct, none equal to ``word``."""
    n = len(word)
    out: list[str] = []
    swaps = [j for j in range(n - 1) if word[j] != word[j + 1]]
    if swaps:
        j = rng.choice(swaps)
        out.append(word[:j] + word[j + 1] + word[j] + word[j + 2:])
    j = rng.randrange(n)
    out.append(word[:j] + _letter(rng, word[j], word[j]) + word[j + 1:])
    j = rng.randrange(n)
    out.append(word[:j] + word[j + 1:])
    j = rng.randrange(n + 1)
    out.append(word[:j] + _letter(rng, word[min(j, n - 1)]) + word[j:])
    keys = [j for j in range(n) if word[j].lower() in KEYBOARD]
    if keys:
        j = rng.choice(keys)
        near = rng.choice(KEYBOARD[word[j].lower()])
        out.append(word[:j] + (near.upper() if word[j].isupper() else near) + word[j + 1:])
    return [t for t in dict.fromkeys(out) if t and t != word]


class CharAttack(Attack):
    name = "char"

    def candidates(self, seg: Segments, parts: list[str], i: int, rng: random.Random) -> list[dict[int, str]]:
        word = parts[i]
        if is_cjk(word):
            edits: list[dict[int, str]] = [seg.deletion(parts, i)]
            for step in (1, -1):
                j = seg.adjacent_word(parts, i, step)
                if j is not None and is_cjk(parts[j]) and parts[j] != word and not is_stop_word(parts[j]):
                    edits.append({i: parts[j], j: word})
            return edits
        if len(word) < 2:
            return []
        return [{i: t} for t in typos(word, rng)]
