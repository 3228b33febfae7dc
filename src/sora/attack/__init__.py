"""The offline attack suite: ``sora.attack(model, texts, labels, method="word")``, ``sora attack``, and the
robustness section of ``sora evaluate``.

``ATTACKS`` maps a method's name to its class; a new attack is one module (a ``base.Attack`` subclass giving
``candidates``) and one line here. Attacks run on any head whose kind says what to perturb
(``TaskKind.attack``: classification, pair — the second text —, relation — outside the entities); nothing
here asks a kind's name. Nothing is downloaded: typos, the neighbour lexicon on disk, the model's own embeddings.

``sora.attack`` is the function (``sora/__init__.py`` imports it over the package's name); take the rest by
``from sora.attack import ATTACKS, Victim, ...``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from sora.attack.base import Attack, Outcome, Victim, summarize
from sora.attack.char import CharAttack
from sora.attack.word import WordAttack
from sora.errors import SoraError

if TYPE_CHECKING:
    from sora.api import Sora

ATTACKS: dict[str, type[Attack]] = {
    "char": CharAttack,
    "word": WordAttack,
}
DEFAULT_EVAL_ATTACKS = ("char",)  # what ``sora evaluate`` runs unless told (cheap: no lexicon, no constraint pass)
DEFAULT_EVAL_EXAMPLES = 100  # examples ``sora evaluate`` attacks (a seeded sample of the split)
REPORT_EXAMPLES = 5  # example perturbations kept per attack in metrics.json and the report


class AttackResult(NamedTuple):
    """``outcomes`` (one per example, in order) and their ``summary`` (``base.summarize``)."""

    outcomes: list[Outcome]
    summary: dict[str, Any]


def options_of(method: str) -> list[str]:
    """The options (budget and method settings) an attack takes."""
    import inspect  # not at import time: ``import sora`` imports this package

    cls = ATTACKS.get(method)
    if cls is None:
        raise SoraError(f"unknown attack {method!r} (choose from {', '.join(ATTACKS)})")
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "victim")]


def make_attack(method: str, victim: Victim, **options: Any) -> Attack:
    """The attack ``method`` on ``victim``; a misspelt method or an option it does not take is one clear error."""
    accepted = options_of(method)
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise SoraError(f"the {method} attack takes no option {unknown[0]!r} (its options: {', '.join(accepted)})")
    return ATTACKS[method](victim, **options)


def parse_methods(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"char,word"`` → ("char", "word"); ``"none"`` or empty → (); unknown names are an error."""
    names = value.split(",") if isinstance(value, str) else list(value or [])
    names = [n.strip().lower() for n in names if n.strip()]
    if names in (["none"], []):
        return ()
    for n in names:
        if n not in ATTACKS:
            raise SoraError(f"--attack {n!r}: unknown attack (choose from {', '.join(ATTACKS)}, or none)")
    return tuple(dict.fromkeys(names))


def attack(model: Sora | str | Path, texts: Sequence[Any], labels: Sequence[Any], method: str = "word",
           task: str | None = None, batch_size: int = 64, **options: Any) -> AttackResult:
    """Attack ``model`` (a ``Sora``, or any name ``sora.load`` takes) on labelled ``texts``: strings, (a, b)
    pairs for pair heads, texts with ``<e1>…</e1>``/``<e2>…</e2>`` for relation heads.

    ``method``: "word" (synonym substitution with a semantic constraint) or "char" (typos); ``options``: the
    budget — ``max_words`` (fraction of the words that may change, 0.3), ``max_queries`` (texts scored per
    example, 500), ``seed`` (13) — and for "word" ``lexicon`` (a path, a dict word → substitutes, None for the
    model's embedding neighbours only; default ``../shared/data/lexicon`` where it exists), ``min_similarity``
    (0.8), ``encoder`` (what computes the constraint's codes: the model by default).

    Returns ``(outcomes, summary)``: per example the original and perturbed text, the perturbed ``input`` (to
    predict or train on), gold and predicted labels, success, fraction of words changed, queries."""
    if isinstance(model, str | Path):
        from sora.api import load  # lazily: the attack package loads no model code up front

        model = load(model)
    victim = Victim(model, task, batch_size)
    examples = victim.examples(texts, labels)
    outcomes = make_attack(method, victim, **options).run(examples)
    return AttackResult(outcomes, summarize(outcomes))


def robustness(model: Sora, task: str, examples: Sequence[Any], methods: Sequence[str],
               max_examples: int | None = DEFAULT_EVAL_EXAMPLES, seed: int = 13, batch_size: int = 64,
               **options: Any) -> dict[str, Any]:
    """The ``robustness`` entry of ``metrics.json``: each attack in ``methods`` on the same seeded sample of at
    most ``max_examples`` of ``examples`` (labelled examples of the head's kind). ``options`` go to every attack
    that takes them (``lexicon`` only to the word attack)."""
    picked = list(range(len(examples)))
    if max_examples is not None and len(picked) > max_examples:
        picked = sorted(random.Random(seed).sample(picked, max_examples))
    sample = [examples[i] for i in picked]
    victim = Victim(model, task, batch_size)
    out: dict[str, Any] = {}
    for method in methods:
        accepted = options_of(method)
        attacker = make_attack(method, victim, seed=seed, **{k: v for k, v in options.items() if k in accepted})
        outcomes = attacker.run(sample)
        shown = sorted(outcomes, key=lambda o: (not o.success, o.status == "skipped"))[:REPORT_EXAMPLES]
        out[method] = {**summarize(outcomes), **attacker.settings(),
                       "examples": [{k: v for k, v in o.as_dict().items() if k != "input"} for o in shown]}
    return out


__all__ = ["ATTACKS", "Attack", "AttackResult", "Outcome", "Victim", "attack", "make_attack", "parse_methods",
           "robustness", "summarize"]
