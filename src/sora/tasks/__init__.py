"""Task kinds, one module each; ``KINDS`` maps a recipe's ``type:`` to its kind.

Adding a kind is one new module and one line here; nothing else in Sora branches on a kind's name.
"""

from __future__ import annotations

from sora.errors import ConfigError
from sora.tasks.base import TaskKind, scalar_metrics
from sora.tasks.classification import Classification, Pair
from sora.tasks.multilabel import Multilabel
from sora.tasks.qa import QA
from sora.tasks.regression import Regression
from sora.tasks.relation import Relation
from sora.tasks.seq2seq import Seq2Seq

KINDS: dict[str, TaskKind] = {kind.name: kind for kind in (
    Classification(),
    Pair(),
    Multilabel(),
    Regression(),
    Relation(),
    QA(),
    Seq2Seq(),
)}


def kind_of(name_or_spec) -> TaskKind:
    """The kind of a task type name, a ``TaskConfig`` or a ``HeadSpec``."""
    name = getattr(name_or_spec, "type", name_or_spec)
    try:
        return KINDS[name]
    except KeyError:
        raise ConfigError(f"unknown task type {name!r} (choose from {', '.join(KINDS)})") from None


__all__ = ["KINDS", "TaskKind", "kind_of", "scalar_metrics"]
