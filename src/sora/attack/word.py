"""``word``: synonym substitution (TextFooler, Jin et al. 2020), offline.

Words are visited from the most important down (deletion importance); each gets its substitutes:

- from a **neighbour lexicon**: a JSON object word → substitutes. The default is ``../shared/data/lexicon`` beside
  the repository (or ``$SORA_LEXICON``): ``counterfitted_neighbors.json``, the nearest neighbours in
  counter-fitted word-vector space (Mrkšić et al. 2016) released by Jia et al. 2019 ("Certified Robustness to
  Adversarial Word Substitutions"; github.com/robinjia/certified-word-sub, MIT licence, no separate terms for
  the data): 49,975 lower-cased words, up to 8 substitutes each, from the same counter-fitted vectors TextFooler
  draws its synonyms from. A word the lexicon lists with no substitutes ("the", "they", "br") has none on
  purpose — no neighbour was close enough — and is left alone. ``lexicon=None`` (or "none", or no lexicon
  found) uses only the next source;
- from the **model's own input embeddings**, for words the lexicon lacks: the ``neighbours`` whole-word tokens
  of the vocabulary nearest by cosine (at least ``neighbour_similarity``, 0.5 as TextFooler's bound on
  counter-fitted cosine); a word split into several tokens is the mean of their embeddings. A Han character's
  neighbours are other single characters, which is how the word attack reaches Chinese text.

**Semantic constraint.** In place of the Universal Sentence Encoder (a download), the cosine of the codes of the
original and the perturbed text, computed by the model itself (``Sora.codes``) or by the ``encoder`` given
(e.g. ``sora.load("all-MiniLM-L6-v2")``, an encoder independent of the model under attack, as USE is). It must
stay at or above ``min_similarity``: 0.8 by default. TextAttack's TextFooler recipe asks USE for an angular
similarity of 0.84 on a window of 15 words around the change (a cosine of about 0.88); a whole sentence dilutes
one word's change, so the same window-free bound would be looser, and sentence encoders trained for similarity
put paraphrases above 0.8 and sentences that merely share a topic below it. Among substitutes that flip the
prediction, the one closest to the original is kept. No part-of-speech check (it would need a tagger's data).
Stop words (``text.STOP_WORDS``: function words, modals, negations) are never replaced.
"""

from __future__ import annotations

import functools
import json
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sora.attack.base import Attack, Victim
from sora.attack.text import WORD, Segments, is_cjk, match_case
from sora.errors import DataError, SoraError

if TYPE_CHECKING:
    import numpy as np

    from sora.api import Sora

LEXICON_FILE = "counterfitted_neighbors.json"


def default_lexicon() -> Path | None:
    """``$SORA_LEXICON``, else ``../shared/data/lexicon`` beside the repository, where it exists."""
    env = os.environ.get("SORA_LEXICON")
    if env:
        return Path(env)
    path = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "lexicon"
    return path if path.is_dir() else None


def lexicon_file(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        if (p / LEXICON_FILE).is_file():
            return p / LEXICON_FILE
        found = sorted(f for f in p.glob("*.json") if f.name != "meta.json")
        if len(found) != 1:
            raise DataError(f"{p}: no {LEXICON_FILE} (a lexicon directory holds one JSON object word → "
                            "substitutes)")
        return found[0]
    if not p.is_file():
        raise DataError(f"{p}: no such lexicon (a JSON object word → substitutes, or a directory holding one)")
    return p


@functools.lru_cache(maxsize=4)
def load_lexicon(path: str | Path) -> dict[str, list[str]]:
    """Word (lower case) → substitutes, read once per file."""
    file = lexicon_file(path)
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{file}: not a readable JSON lexicon ({exc})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise DataError(f"{file}: a lexicon is a JSON object mapping each word to a list of substitutes")
    return {str(k).lower(): [str(w) for w in v] for k, v in raw.items()}


class EmbeddingNeighbours:
    """Nearest whole-word tokens by cosine of the model's input embeddings (built on first use)."""

    def __init__(self, model: Sora, k: int, min_cosine: float):
        self.model, self.k, self.min_cosine = model, k, min_cosine
        self._matrix: Any = None
        self._words: list[str] = []
        self._cache: dict[str, list[str]] = {}

    def _build(self) -> None:
        import torch.nn.functional as F

        tk = self.model.tokenizer.tk
        special = set(self.model.tokenizer.special_ids)
        ids, words = [], []
        for i in range(tk.get_vocab_size()):
            w = tk.decode([i]).strip()
            if i not in special and w.isalpha() and (len(w) > 1 or is_cjk(w)):  # no stray letters
                ids.append(i)
                words.append(w)
        encoded = tk.encode_batch(words, add_special_tokens=False) if words else []
        whole = [j for j, enc in enumerate(encoded) if enc.ids == [ids[j]]]  # the token is the whole word
        weight = self.model.model.encoder.embeddings.word.weight.detach().float()
        self._words = [words[j] for j in whole]
        self._matrix = F.normalize(weight[[ids[j] for j in whole]], dim=-1) if whole else weight[:0]
        self._weight = weight

    def __call__(self, word: str) -> list[str]:
        if word in self._cache:
            return self._cache[word]
        if self._matrix is None:
            self._build()
        import torch.nn.functional as F

        ids = self.model.tokenizer.tk.encode(word, add_special_tokens=False).ids
        out: list[str] = []
        if ids and len(self._words):
            sims = self._matrix @ F.normalize(self._weight[ids].mean(0), dim=0)
            top = sims.topk(min(len(self._words), 4 * self.k + 8))
            cjk, key = is_cjk(word), word.lower()
            for s, j in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                w = self._words[j]
                if s < self.min_cosine or len(out) == self.k:
                    break
                if w.lower() != key and is_cjk(w) == cjk and w.lower() not in (o.lower() for o in out):
                    out.append(w)
        self._cache[word] = out
        return out


class WordAttack(Attack):
    name = "word"

    def __init__(self, victim: Victim, max_words: float = 0.3, max_queries: int = 500, seed: int = 13,
                 lexicon: str | Path | dict[str, list[str]] | None = "default", min_similarity: float = 0.8,
                 encoder: Sora | str | None = None, neighbours: int = 8, neighbour_similarity: float = 0.5):
        super().__init__(victim, max_words, max_queries, seed)
        if not -1 <= min_similarity <= 1:
            raise SoraError(f"min_similarity {min_similarity}: a cosine, in [-1, 1]")
        if isinstance(lexicon, str) and lexicon.lower() in ("default", "none"):
            lexicon = default_lexicon() if lexicon.lower() == "default" else None
        self.lexicon_name = None if lexicon is None else "given" if isinstance(lexicon, dict) else str(lexicon)
        self.lexicon = ({str(k).lower(): list(v) for k, v in lexicon.items()} if isinstance(lexicon, dict)
                        else None if lexicon is None else load_lexicon(str(lexicon)))
        if isinstance(encoder, str | Path):
            from sora.api import load  # lazily, as the package

            encoder = load(encoder, device=str(victim.model.device))
        self.encoder = encoder or victim.model
        self.encoder_name = "the model" if encoder is None else str(self.encoder.path)
        self.min_similarity = float(min_similarity)
        self.neighbours = EmbeddingNeighbours(victim.model, neighbours, neighbour_similarity)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "min_similarity": self.min_similarity, "lexicon": self.lexicon_name,
                "encoder": self.encoder_name}

    def substitutes(self, word: str) -> list[str]:
        key = word.lower()
        found = self.lexicon.get(key) if self.lexicon is not None else None
        subs = found if found is not None else self.neighbours(word)
        return list(dict.fromkeys(match_case(word, s) for s in subs if s.lower() != key and WORD.fullmatch(s)))

    def candidates(self, seg: Segments, parts: list[str], i: int, rng: random.Random) -> list[dict[int, str]]:
        return [{i: s} for s in self.substitutes(parts[i])]

    def similarity(self, original: str, texts: list[str]) -> np.ndarray:
        return self.victim.similarity(self.encoder, original, texts)

    def prefer(self, probs: np.ndarray, gold: int, sims: np.ndarray | None) -> np.ndarray:
        import numpy as np

        return np.argsort(-sims, kind="stable") if sims is not None else super().prefer(probs, gold, sims)
