"""Batches for several tasks trained together: which task(s) each step draws, and which of their batches it gets.

Each task has its own stream of batches, epoch after epoch of its own (reshuffled per epoch, as one task alone
would see them). The sampler (``sora.train.samplers``) says which tasks step ``s`` trains; a drawn task gets the
next batch of its stream, the one at position (draws of the task before ``s``) × processes + rank. Both are pure
functions of (seed, step), so the batch a step trains is known without replaying the run: a resumed run trains
exactly what the uninterrupted run did, and every process draws the same tasks at the same step (DDP graphs and
logged keys agree) while reading different batches of them.

Epochs when tasks differ 100× in size: the loop's "epoch" is a block of steps in which the tasks' batches would
all be seen once if drawn in proportion (Σ_t batches_t / tasks per step; with ``all``, the largest task's
batches), and ``epochs_seen`` says how many passes over its own data each task has made.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from sora.tasks.base import TaskKind
from sora.train.samplers import TaskSampler


@dataclass
class TaskStream:
    """One task's training batches: its kind, encoded rows and targets, and the key prefix in a mixed batch."""

    kind: TaskKind
    encoded: list[dict[str, Any]]
    targets: torch.Tensor | None
    prefix: str

    def __post_init__(self) -> None:
        # The epoch being read: (epoch, index of the next batch, its batches). Read lazily, since a large task's
        # epoch of collated batches (SQuAD's windows) does not fit in memory at once; positions only move forward
        # within a run, and a resumed run skips to its position once.
        self._reading: tuple[int, int, Iterator[dict[str, torch.Tensor]]] | None = None

    def batches_per_epoch(self, batch_size: int) -> int:
        return max(1, math.ceil(len(self.encoded) / batch_size))

    def batch(self, position: int, batch_size: int, pad_id: int, seed: int) -> dict[str, torch.Tensor]:
        """Batch ``position`` of the endless stream: batch ``position mod n`` of this task's epoch ``position // n``."""
        epoch, index = divmod(position, self.batches_per_epoch(batch_size))
        if self._reading is None or self._reading[0] != epoch or self._reading[1] > index:
            self._reading = (epoch, 0, self.kind.batches(self.encoded, self.targets, batch_size, pad_id, seed=seed,
                                                         epoch=epoch, prefix=self.prefix))
        _, at, batches = self._reading
        for _ in range(index - at):
            next(batches)
        self._reading = (epoch, index + 1, batches)
        return next(batches)


def steps_per_epoch(batches: list[int], tasks_per_step: int, world_size: int = 1) -> int:
    """Steps (micro-batches of one process) in which every task's ``batches`` are seen about once: the largest
    task's count, or the total spread over ``tasks_per_step`` draws a step when that is more."""
    steps = max(max(batches), math.ceil(sum(batches) / tasks_per_step))
    return max(1, steps // world_size)


class TaskMixer:
    """The labelled part of each step's batch: one batch of every task ``sampler`` draws for the step."""

    def __init__(self, streams: dict[str, TaskStream], sampler: TaskSampler, batch_size: int, pad_id: int,
                 seed: int, world_size: int = 1, rank: int = 0):
        if list(streams) != sampler.names:
            raise ValueError(f"streams {list(streams)} and sampler tasks {sampler.names} differ")
        self.streams, self.sampler = streams, sampler
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed
        self.world_size, self.rank = world_size, rank

    def tasks_at(self, step: int) -> list[str]:
        return self.sampler.tasks_at(step)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """Step ``step``'s labelled batch (this process's share), the drawn tasks' keys side by side."""
        out: dict[str, torch.Tensor] = {}
        counts = self.sampler.counts_before(step)
        for name in self.sampler.tasks_at(step):
            position = counts[name] * self.world_size + self.rank
            out.update(self.streams[name].batch(position, self.batch_size, self.pad_id, self.seed))
        return out

    def epochs_seen(self, steps: int) -> dict[str, float]:
        """Passes each task's data made in the first ``steps`` steps (over all processes)."""
        counts = self.sampler.counts_before(steps)
        return {name: round(counts[name] * self.world_size / s.batches_per_epoch(self.batch_size), 3)
                for name, s in self.streams.items()}
