"""What every attack shares: the model under attack (``Victim``), the greedy search, outcomes and their summary.

The search is TextFooler's and DeepWordBug's (Jin et al. 2020; Gao et al. 2018), as TextAttack runs them: score
each word by how much the true label's probability drops when the word is deleted (one batched prediction per
example), then visit words from the most important down; at each, ask the attack for its edits of that word
(``Attack.candidates``), drop those outside the budget or the attack's constraint, score the rest in one batch,
and stop at the first edit that changes the prediction (among several, the one the attack prefers); otherwise
keep the edit that lowers the true label's probability most, if any does, and go on. Stop words are never
edited, nor is a word twice.

**Budget.** ``max_words``: the fraction of the attacked text's words that may change (TextDefender's protocol
uses 0.1–0.3; 0.3 by default, as TextAttack's TextFooler recipe allows); ``max_queries``: the texts the model may
score per example, the original and the importance deletions included; ``seed``: each example's random choices
come from a generator seeded by (seed, text), so results do not depend on the order or batching of examples.
A query is one text scored by the model under attack; an encoder computing the semantic constraint is not
queried in that sense (TextAttack counts USE the same way).

**Outcomes** follow TextAttack: an example the model already gets wrong is *skipped* (not attacked; it counts
as wrong under attack too); otherwise the attack *succeeds* (the prediction changed within the budget and the
constraint) or *fails* (the perturbed text is then the best attempt: it lowered the true label's probability
without changing the prediction).

Numerical libraries are imported where they are used, so that ``import sora`` (which exports ``sora.attack``)
stays cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from sora.attack.text import Segments, apply, is_stop_word, marked
from sora.errors import SoraError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from sora.api import Sora


# ---- the model under attack -------------------------------------------------------------------------------


def attackable_kinds() -> list[str]:
    from sora.tasks import KINDS

    return [name for name, kind in KINDS.items() if kind.attack is not None]


class Victim:
    """One task head of a loaded model, as the attacks query it: label probabilities for examples of its kind,
    and sentence codes (the model's own, or another encoder's) for the semantic constraint.

    Where the head reads the pooled code of a single text, the codes computed for the constraint are reused as
    the head's input, so a candidate costs one encoder pass, not two."""

    def __init__(self, model: Sora, task: str | None = None, batch_size: int = 64):
        from sora.tasks import kind_of

        self.model, self.batch_size = model, batch_size
        self.name = pick_task(model, task)
        self.spec = model.model.head_specs[self.name]
        self.kind = kind_of(self.spec)
        if self.kind.attack is None:
            raise SoraError(f"task {self.name!r} is a {self.spec.type} head, which predicts no single label for an "
                            f"attack to flip; the attacks take {', '.join(attackable_kinds())} heads")
        self.input = self.kind.attack
        self.labels = list(self.spec.labels or [])
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.reads_code = self.spec.reads == "code" and not self.spec.pair
        self._codes: dict[int, dict[str, torch.Tensor]] = {}

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Dropout off while attacking, and the model's mode restored after (adversarial examples for training
        are made on a model in training)."""
        model = self.model.model
        was_training = model.training
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)
            self._codes.clear()

    def forget(self) -> None:
        """Drop the cached codes (between examples: a text seen once is rarely seen again)."""
        self._codes.clear()

    def codes(self, encoder: Sora, texts: list[str]) -> torch.Tensor:
        import torch

        cache = self._codes.setdefault(id(encoder), {})
        missing = list(dict.fromkeys(t for t in texts if t not in cache))
        if missing:
            for text, code in zip(missing, encoder.codes(missing, self.batch_size), strict=True):
                cache[text] = code
        return torch.stack([cache[t] for t in texts])

    def similarity(self, encoder: Sora, original: str, texts: list[str]) -> np.ndarray:
        """Cosine of the codes of ``original`` and of each of ``texts``."""
        import torch.nn.functional as F

        codes = F.normalize(self.codes(encoder, [original, *texts]).float(), dim=-1)
        return (codes[1:] @ codes[0]).cpu().numpy()

    def probs(self, examples: list[Any]) -> np.ndarray:
        """(n, labels) probabilities of the head for ``examples`` (its kind's example objects)."""
        import numpy as np
        import torch

        from sora.api import predict_scores
        from sora.models.autoencoder import EncoderOutput

        if self.reads_code:
            code = self.codes(self.model, [ex.text for ex in examples])
            mask = torch.ones(len(code), 1, dtype=torch.bool, device=code.device)
            with torch.inference_mode():
                logits = self.kind.logits(self.model.model, self.model.model, self.name, {"attention_mask": mask},
                                          EncoderOutput(None, mask, code))
                return self.kind.scores(self.spec, logits).float().cpu().numpy()
        encoded = self.kind.encode(examples, self.spec, self.model.tokenizer, self.model.max_length)
        return np.asarray(predict_scores(self.model.model, self.model.tokenizer, self.name, encoded, self.batch_size,
                                         self.model.encoder), dtype=np.float32)

    def examples(self, inputs: Sequence[Any], labels: Sequence[Any]) -> list[Any]:
        """Labelled examples of the head's kind from what ``Sora.predict`` takes (texts, (a, b) pairs, texts
        with the entities marked inline)."""
        if isinstance(inputs, str):
            raise TypeError("attack() takes a list of texts, not one string")
        if len(inputs) != len(labels):
            raise SoraError(f"{len(inputs)} texts but {len(labels)} labels: give one label per text")
        examples = self.kind.examples_from(list(inputs), self.spec)
        out = []
        for i, (ex, label) in enumerate(zip(examples, labels, strict=True)):
            label = str(label)
            if label not in self.index:
                raise SoraError(f"label {label!r} of text {i} is not one of task {self.name!r}'s labels "
                                f"({', '.join(self.labels)})")
            out.append(dataclasses.replace(ex, label=label))
        return out


def pick_task(model: Sora, task: str | None) -> str:
    heads = model.model.head_specs
    if not heads:
        raise SoraError(f"{model.path}: this checkpoint has no task heads to attack (fine-tune it first)")
    if task is not None:
        if task not in heads:
            raise SoraError(f"no task {task!r} in this checkpoint (tasks: {', '.join(heads)})")
        return task
    if len(heads) == 1:
        return next(iter(heads))
    from sora.tasks import kind_of

    able = [n for n, spec in heads.items() if kind_of(spec).attack is not None]
    if len(able) == 1:
        return able[0]
    raise SoraError(f"this checkpoint has several tasks ({', '.join(heads)}): choose the one to attack with --task "
                    "(task= in Python)")


# ---- outcomes -----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One attacked example. ``original``/``perturbed``: the attacked text (a pair's second text; a relation's
    with its entities marked inline); ``input``: the perturbed input as ``Sora.predict`` takes it; ``label``:
    the gold label; ``original_label``/``perturbed_label``: the model's predictions; ``words_changed``: the
    fraction of the text's words edited; ``queries``: texts the model scored; ``example``: the perturbed
    example of the kind (to train on)."""

    original: str
    perturbed: str
    input: Any
    label: str
    original_label: str
    perturbed_label: str
    status: str  # "success" | "failed" | "skipped" (already wrong)
    words_changed: float
    queries: int
    example: Any = dataclasses.field(default=None, repr=False)

    @property
    def success(self) -> bool:
        return self.status == "success"

    def as_dict(self) -> dict[str, Any]:
        row = {k: v for k, v in dataclasses.asdict(self).items() if k != "example"}
        return {**row, "input": list(self.input) if isinstance(self.input, tuple) else self.input,
                "success": self.success, "words_changed": round(self.words_changed, 4)}


def summarize(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """TextAttack's numbers: clean accuracy and accuracy under attack over all examples; success rate over the
    examples the model got right; % words perturbed over successful attacks; queries over attacked examples."""
    n = len(outcomes)
    attacked = [o for o in outcomes if o.status != "skipped"]
    won = [o for o in attacked if o.success]

    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), 4) if values else None

    return {"n": n, "clean_accuracy": round(len(attacked) / n, 4) if n else None,
            "attacked_accuracy": round((len(attacked) - len(won)) / n, 4) if n else None,
            "success_rate": mean([float(o.success) for o in attacked]),
            "words_perturbed": mean([o.words_changed for o in won]),
            "queries": mean([float(o.queries) for o in attacked])}


# ---- the search -----------------------------------------------------------------------------------------------


def example_seed(seed: int, text: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{text}".encode()).digest()[:8], "big")


class Attack:
    """The greedy word-importance search. A subclass gives ``candidates`` (the edits of one word) and may
    constrain them (``similarity`` with a ``min_similarity``) and choose among edits that flip the label."""

    name: ClassVar[str]

    def __init__(self, victim: Victim, max_words: float = 0.3, max_queries: int = 500, seed: int = 13):
        if not 0 < max_words <= 1:
            raise SoraError(f"max_words {max_words}: a fraction of the words, in (0, 1]")
        if max_queries < 1:
            raise SoraError(f"max_queries {max_queries}: must be at least 1")
        self.victim, self.max_words, self.max_queries, self.seed = victim, float(max_words), int(max_queries), seed
        self.min_similarity: float | None = None

    def settings(self) -> dict[str, Any]:
        """What the outcomes depend on, for reports."""
        return {"max_words": self.max_words, "max_queries": self.max_queries, "seed": self.seed}

    # ---- what a subclass gives -----------------------------------------------------------------------------

    def candidates(self, seg: Segments, parts: list[str], i: int, rng: random.Random) -> list[dict[int, str]]:
        """Edits (part index → new text) of word ``i``; a word part an edit touches counts as changed."""
        raise NotImplementedError

    def similarity(self, original: str, texts: list[str]) -> np.ndarray | None:
        """Scores of ``texts`` against the original text that ``min_similarity`` bounds (None: no constraint)."""
        return None

    def prefer(self, probs: np.ndarray, gold: int, sims: np.ndarray | None) -> np.ndarray:
        """Among edits that change the prediction, the order of preference (best first): the least confident
        in the gold label."""
        import numpy as np

        return np.argsort(probs[:, gold], kind="stable")

    # ---- running --------------------------------------------------------------------------------------------

    def run(self, examples: Sequence[Any]) -> list[Outcome]:
        with self.victim.evaluating():
            out = []
            for ex in examples:
                out.append(self.attack_one(ex))
                self.victim.forget()
            return out

    def attack_one(self, example: Any) -> Outcome:
        import numpy as np

        victim = self.victim
        field = next((f for f in victim.input.fields if getattr(example, f, None) is not None), None)
        if field is None:
            raise SoraError(f"an example of task {victim.name!r} has none of {', '.join(victim.input.fields)}")
        text = getattr(example, field)
        tags = dict(victim.input.keep)
        original_spans = {name: tuple(getattr(example, name)) for name in tags}
        seg = Segments.of(text, original_spans)
        gold = victim.index[example.label]
        rng = random.Random(example_seed(self.seed, text))
        max_changes = math.floor(self.max_words * seg.n_words + 1e-9)
        queries = 0

        def build(parts: list[str]) -> Any:
            new_text, spans = seg.render(parts)
            return dataclasses.replace(example, **{field: new_text, **spans})

        def score(part_lists: list[list[str]]) -> np.ndarray:
            nonlocal queries
            queries += len(part_lists)
            return victim.probs([build(p) for p in part_lists])

        def outcome(parts: list[str], changed: set[int], pred: int, status: str) -> Outcome:
            ex = build(parts)
            shown = marked(*seg.render(parts), tags)
            inputs = tuple(shown if f == field else getattr(ex, f) for f in ("text", "text_b")
                           if getattr(ex, f, None) is not None)
            return Outcome(original=marked(text, original_spans, tags), perturbed=shown,
                           input=inputs if len(inputs) > 1 else inputs[0], label=example.label,
                           original_label=victim.labels[first], perturbed_label=victim.labels[pred], status=status,
                           words_changed=len(changed) / max(1, seg.n_words), queries=queries, example=ex)

        p0 = score([seg.parts])[0]
        first = int(np.argmax(p0))
        if first != gold:
            return outcome(seg.parts, set(), first, "skipped")
        parts, changed, confidence = list(seg.parts), set(), float(p0[gold])
        editable = [i for i in seg.words if not is_stop_word(seg.parts[i])]
        if max_changes == 0 or not editable:
            return outcome(parts, changed, first, "failed")
        ranked = editable[: max(0, self.max_queries - queries)]
        drop = p0[gold] - score([apply(parts, seg.deletion(parts, i)) for i in ranked])[:, gold] if ranked else []
        order = [ranked[j] for j in np.argsort(-np.asarray(drop), kind="stable")] + editable[len(ranked):]

        for i in order:
            left = self.max_queries - queries
            if len(changed) >= max_changes or left <= 0:
                break
            if i in changed:
                continue
            edits = []
            for edit in self.candidates(seg, parts, i, rng):
                touched = {j for j in edit if j in seg.wordset}
                if touched & changed or len(changed | touched) > max_changes:
                    continue
                edits.append(edit)
            if not edits:
                continue
            texts = [seg.render(apply(parts, e))[0] for e in edits]
            sims = self.similarity(text, texts)
            if sims is not None and self.min_similarity is not None:
                keep = [j for j in range(len(edits)) if sims[j] >= self.min_similarity]
                edits, sims = [edits[j] for j in keep], sims[keep]
            edits, sims = edits[:left], None if sims is None else sims[:left]
            if not edits:
                continue
            probs = score([apply(parts, e) for e in edits])
            preds = probs.argmax(1)
            flipping = np.flatnonzero(preds != gold)
            if len(flipping):
                best = flipping[self.prefer(probs[flipping], gold, None if sims is None else sims[flipping])[0]]
                parts = apply(parts, edits[best])
                changed |= {j for j in edits[best] if j in seg.wordset}
                return outcome(parts, changed, int(preds[best]), "success")
            best = int(np.argmin(probs[:, gold]))
            if probs[best, gold] < confidence:
                parts, confidence = apply(parts, edits[best]), float(probs[best, gold])
                changed |= {j for j in edits[best] if j in seg.wordset}
        return outcome(parts, changed, gold, "failed")
