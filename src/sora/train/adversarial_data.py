"""Adversarial examples as training data: attacked copies of a task's training examples, made by ``sora.attack``
on the model being trained and remade as it learns (``adversarial: {method: examples}``).

A refresh attacks a seeded sample of the training set (the attack skips examples the model already gets wrong)
and keeps the strongest perturbation it found of each attacked example (whether it flipped the prediction or
not), with its gold label, as encoded rows. Every training step then draws
a batch of them — which rows is a function of (seed, epoch, batch index, refresh), so a resumed run draws what
the uninterrupted one drew; the pool itself is saved in each checkpoint (``state_dict``).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import torch

from sora.api import Sora
from sora.attack import Victim, make_attack, options_of, summarize
from sora.data.tasks import TaskData
from sora.errors import ConfigError
from sora.models.autoencoder import SoraModel
from sora.objectives.adversarial import ADVERSARIAL_PREFIX
from sora.tasks import kind_of
from sora.text.tokenizer import SoraTokenizer


class ExamplePool:
    """The attacked copies of task ``name``'s training examples (``settings``: the ``examples`` wrapper's)."""

    def __init__(self, model: SoraModel, tokenizer: SoraTokenizer, name: str, data: TaskData, max_length: int,
                 settings: dict[str, Any], seed: int, prefix: str = "", batch_size: int = 64):
        self.model, self.tokenizer, self.name, self.data = model, tokenizer, name, data
        self.max_length, self.seed, self.prefix = max_length, seed, prefix
        self.spec = model.head_specs[name]
        self.kind = kind_of(self.spec)
        if self.kind.attack is None:
            raise ConfigError(f"adversarial.method examples: task {name!r} is a {self.spec.type} head, which "
                              "predicts no single label for an attack to flip")
        self.method = str(settings["attack"])
        self.options = dict(settings.get("attack_options") or {})
        accepted = options_of(self.method)  # an unknown attack or option: one clear error before training starts
        unknown = [k for k in self.options if k not in accepted]
        if unknown:
            raise ConfigError(f"adversarial.attack_options.{unknown[0]}: the {self.method} attack does not take it "
                              f"(its options: {', '.join(accepted)})")
        self.every, self.size, self.batch_size = int(settings["every"]), int(settings["pool"]), batch_size
        self.refreshes = 0  # how many times the pool was made
        self.rows: list[dict[str, Any]] = []
        self.targets: torch.Tensor | None = None
        self.history: list[dict[str, Any]] = []  # per refresh: step, attacked, kept, success rate, seconds

    def due(self, step: int, validated: bool) -> bool:
        """Remake the pool after optimizer step ``step``? (``every`` steps; 0: after each validation)."""
        return validated if self.every == 0 else step % self.every == 0

    def refresh(self, step: int) -> dict[str, Any]:
        """Attack a fresh seeded sample of the training set with the model as it is now."""
        started = time.perf_counter()
        train = self.data.train
        sample_rng = random.Random(f"{self.seed}/adversarial/{self.refreshes}")
        picked = sorted(sample_rng.sample(range(len(train)), min(self.size, len(train))))
        device = next(self.model.parameters()).device
        victim = Victim(Sora(self.model, self.tokenizer, {"recipe": {"data": {"max_length": self.max_length}}},
                             Path("."), device), self.name, self.batch_size)
        outcomes = make_attack(self.method, victim, seed=self.seed + self.refreshes, **self.options).run(
            [train[i] for i in picked])
        # The worst case the search found within the budget, flipped or not: on its own training data a model is
        # rarely flipped (often under 10% of examples), and the strongest perturbation is L_AT's inner max anyway.
        kept = [o.example for o in outcomes if o.status != "skipped" and o.words_changed > 0]
        self.rows = self.kind.encode(kept, self.spec, self.tokenizer, self.max_length) if kept else []
        self.targets = self.kind.training_targets(kept, self.rows, self.data.labels) if kept else None
        self.refreshes += 1
        record = {"step": step, "attack": self.method, "attacked": len(picked), "kept": len(kept),
                  "flipped": sum(o.success for o in outcomes),
                  **{k: v for k, v in summarize(outcomes).items() if k in ("clean_accuracy", "success_rate")},
                  "seconds": round(time.perf_counter() - started, 2)}
        self.history.append(record)
        return record

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        """Batch ``index`` of ``epoch``'s attacked copies (empty before the first refresh keeps any)."""
        if not self.rows:
            return {}
        rng = random.Random(f"{self.seed}/{epoch}/{index}/{self.refreshes}")
        idx = sorted(rng.sample(range(len(self.rows)), min(self.batch_size, len(self.rows))))
        batch = self.kind.collate([self.rows[i] for i in idx], self.tokenizer.pad_id)
        if self.targets is not None:
            batch["labels"] = self.targets[idx]
        return {ADVERSARIAL_PREFIX + self.prefix + k: v for k, v in batch.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"refreshes": self.refreshes, "rows": self.rows, "targets": self.targets, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.refreshes, self.rows, self.history = state["refreshes"], state["rows"], state["history"]
        self.targets = state["targets"]
