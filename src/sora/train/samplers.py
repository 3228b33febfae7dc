"""Task samplers for multi-task learning: which task(s) each optimizer step trains on.

``SAMPLERS`` maps a name to its class; a new sampler is one class and one line there. A sampler declares the
options it reads with their defaults (``defaults``), so a misspelt option is a ``ConfigError``, not a silent no-op.

The draws are a pure function of (seed, step): every step's uniforms are a counter-based hash (SplitMix64) of
(seed, step, task), so a resumed run draws exactly what the uninterrupted run drew without saving any state, and
any range of steps can be drawn at once in numpy (``draws``), which keeps ``draws_before`` cheap at 100k steps.
With ``tasks_per_step`` k > 1 the k tasks are drawn without replacement from p by exponential keys (Efraimidis &
Spirakis 2006): task t gets E_t / p_t with E_t ~ Exp(1) and the k smallest win, which is the same law as k
successive draws each renormalised over the tasks not yet drawn.

``probabilities(step)`` is each task's share of the draws at that step (for k > 1 with a random sampler: the law
of the first draw; its chance to be among the k is higher).
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar

import numpy as np

from sora.errors import ConfigError

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_CHUNK = 4096  # steps per block of ``draws_before``'s cache


def _mix(z: np.ndarray) -> np.ndarray:
    """The SplitMix64 finalizer on uint64 arrays (multiplications wrap modulo 2^64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, steps: np.ndarray, n: int) -> np.ndarray:
    """(len(steps), n) uniforms in (0, 1), each a pure function of (seed, step, column)."""
    base = _mix(np.array([(seed + _GOLDEN) & _MASK], dtype=np.uint64))
    per_step = _mix(base ^ steps.astype(np.uint64))[:, None]
    cols = (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(_GOLDEN))[None, :]
    h = _mix(per_step + cols)
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


class TaskSampler:
    """The task(s) step ``step`` trains, drawn from ``sizes`` (task name -> training examples)."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, float]] = {}  # the options the sampler reads, with their defaults
    # Settings that do not change the draws, so a resumed run may change them (e.g. train longer).
    ignored_on_resume: ClassVar[frozenset[str]] = frozenset({"total_steps"})

    def __init__(self, sizes: dict[str, int], seed: int, total_steps: int, tasks_per_step: int = 1,
                 **options: float):
        unread = sorted(set(options) - set(self.defaults))
        if unread:
            takes = ", ".join(self.defaults) or "no options"
            raise ConfigError(f"task sampler option {unread[0]!r}: {self.name} does not take it (it takes {takes})")
        if not sizes:
            raise ConfigError("task sampler: no tasks (sizes is empty)")
        bad = {t: n for t, n in sizes.items() if isinstance(n, bool) or not isinstance(n, int) or n < 1}
        if bad:
            raise ConfigError(f"task sampler: every task needs at least one training example, got {bad}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ConfigError(f"task sampler: total_steps must be an integer >= 1, got {total_steps!r}")
        if (isinstance(tasks_per_step, bool) or not isinstance(tasks_per_step, int)
                or not 1 <= tasks_per_step <= len(sizes)):
            raise ConfigError(f"task sampler: tasks_per_step must be between 1 and the number of tasks "
                              f"({len(sizes)}), got {tasks_per_step!r}")
        self.sizes = dict(sizes)
        self.names = list(sizes)
        self.seed, self.total_steps, self.tasks_per_step = int(seed), total_steps, tasks_per_step
        self.options: dict[str, float] = {**self.defaults, **options}
        for key, value in self.options.items():
            setattr(self, key, value)
        self._log_sizes = np.log(np.array([sizes[t] for t in self.names], dtype=np.float64))
        self._prefix: list[np.ndarray] = [np.zeros(len(self.names), dtype=np.int64)]  # counts before block b
        self._block: tuple[int, np.ndarray] | None = None  # the last block's draws, (index, cumulative counts)

    # Subclasses give ``_probs`` and, where the draws are not p-weighted random picks, ``draws``.
    def _probs(self, steps: np.ndarray) -> np.ndarray:
        """(len(steps), tasks): the distribution at each step."""
        raise NotImplementedError

    def draws(self, steps: np.ndarray | range) -> np.ndarray:
        """(len(steps), tasks) booleans: whether each step trains each task (columns in the order of ``sizes``)."""
        steps = self._steps(steps)
        k = self.tasks_per_step
        keys = -np.log(uniforms(self.seed, steps, len(self.names))) / self._probs(steps)
        out = np.zeros(keys.shape, dtype=bool)
        if k == len(self.names):
            out[:] = True
        elif k == 1:
            out[np.arange(len(steps)), keys.argmin(1)] = True
        else:
            np.put_along_axis(out, np.argpartition(keys, k - 1, axis=1)[:, :k], True, axis=1)
        return out

    def probabilities(self, step: int) -> dict[str, float]:
        """Each task's share of the draws at ``step`` (sums to 1)."""
        p = self._probs(self._steps([step]))[0]
        return {t: float(v) for t, v in zip(self.names, p, strict=True)}

    def tasks_at(self, step: int) -> list[str]:
        """The distinct tasks step ``step`` trains, in the order of ``sizes``; a pure function of (seed, step)."""
        row = self.draws(self._steps([step]))[0]
        return [t for t, chosen in zip(self.names, row, strict=True) if chosen]

    def counts_before(self, step: int) -> dict[str, int]:
        """How many times each task was drawn in steps [0, step): where its own batch stream has got to.

        Blocks of ``_CHUNK`` steps are drawn at once and their totals cached, so the loop's step-by-step calls
        cost one block draw per ``_CHUNK`` steps; the result always equals counting ``tasks_at`` directly."""
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        b, r = divmod(int(step), _CHUNK)
        while len(self._prefix) <= b:
            done = len(self._prefix) - 1
            block = self.draws(range(done * _CHUNK, (done + 1) * _CHUNK))
            self._prefix.append(self._prefix[-1] + block.sum(0))
        counts = self._prefix[b]
        if r:
            if self._block is None or self._block[0] != b:
                cum = np.cumsum(self.draws(range(b * _CHUNK, (b + 1) * _CHUNK)), axis=0)
                self._block = (b, cum)
            counts = counts + self._block[1][r - 1]
        return {t: int(c) for t, c in zip(self.names, counts, strict=True)}

    def draws_before(self, task: str, step: int) -> int:
        """How many times ``task`` was drawn in steps [0, step) (see ``counts_before``)."""
        if task not in self.sizes:
            raise KeyError(f"unknown task {task!r} (tasks: {', '.join(self.names)})")
        return self.counts_before(step)[task]

    def settings(self) -> dict[str, Any]:
        """Everything that defines the sampler, JSON-able, for logs, reports and resume checks."""
        return {"sampler": self.name, "sizes": dict(self.sizes), "seed": self.seed, "total_steps": self.total_steps,
                "tasks_per_step": self.tasks_per_step, **self.options}

    def state_dict(self) -> dict[str, Any]:
        """The settings: the draws need nothing else (they are a pure function of (seed, step))."""
        return self.settings()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check that a resumed run draws as the checkpointed run did; a ``ConfigError`` names what changed."""
        ours, theirs = json.loads(json.dumps(self.settings())), json.loads(json.dumps(state))
        if theirs.get("sampler") != ours["sampler"]:
            raise ConfigError(f"resuming with a different task sampler: the checkpoint used "
                              f"{theirs.get('sampler')!r}, this run {ours['sampler']!r}")
        changed = [f"{k} was {theirs.get(k)!r}, now {ours.get(k)!r}" for k in sorted(set(ours) | set(theirs))
                   if k not in self.ignored_on_resume and ours.get(k) != theirs.get(k)]
        if changed:
            raise ConfigError(f"resuming with different {self.name} task sampler settings: {'; '.join(changed)}")

    def _steps(self, steps: np.ndarray | range | list[int]) -> np.ndarray:
        arr = np.asarray(steps, dtype=np.int64).reshape(-1)
        if arr.size and arr.min() < 0:
            raise ValueError(f"steps must be >= 0, got {int(arr.min())}")
        return arr

    def _powered(self, alpha: np.ndarray) -> np.ndarray:
        """p_t ∝ n_t^α for each row's α, computed in log space (no overflow for large sizes)."""
        logits = alpha[:, None] * self._log_sizes[None, :]
        p = np.exp(logits - logits.max(1, keepdims=True))
        return p / p.sum(1, keepdims=True)


class Proportional(TaskSampler):
    """p_t ∝ n_t (MT-DNN, Liu et al. 2019): every example is equally likely to be seen; small tasks are rare."""

    name = "proportional"

    def _probs(self, steps):
        return self._powered(np.ones(len(steps)))


class Temperature(TaskSampler):
    """p_t ∝ n_t^{1/T}: T = 1 is proportional, T → ∞ uniform; T = 2 (the default) is the usual middle ground."""

    name = "temperature"
    defaults: ClassVar[dict[str, float]] = {"temperature": 2.0}

    def __init__(self, sizes, seed, total_steps, tasks_per_step=1, **options):
        super().__init__(sizes, seed, total_steps, tasks_per_step, **options)
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
            raise ConfigError(f"task sampler option 'temperature' must be a finite number > 0, got {t!r}")

    def _probs(self, steps):
        return self._powered(np.full(len(steps), 1.0 / self.temperature))


class Annealed(TaskSampler):
    """Annealed sampling (Stickland & Murray 2019): p_t ∝ n_t^α with α = 1 - 0.8 · step / (total_steps - 1),
    i.e. proportional (T = 1) at step 0 moving towards uniform, reaching α = 0.2 (T = 5) at the last step (and
    staying there past it). Early steps follow the data; late ones stop the large tasks drowning the small."""

    name = "annealed"
    ignored_on_resume: ClassVar[frozenset[str]] = frozenset()  # total_steps shapes the schedule

    def alpha(self, steps: np.ndarray) -> np.ndarray:
        progress = np.minimum(steps, self.total_steps - 1) / max(1, self.total_steps - 1)
        return 1.0 - 0.8 * progress

    def _probs(self, steps):
        return self._powered(self.alpha(steps))


class RoundRobin(TaskSampler):
    """A fixed cycle through the tasks in the order of ``sizes``: step s trains tasks s·k … s·k + k - 1 (mod the
    number of tasks). Every task gets the same number of steps whatever its size; the seed plays no part."""

    name = "round_robin"
    ignored_on_resume: ClassVar[frozenset[str]] = frozenset({"total_steps", "seed"})

    def _probs(self, steps):
        return np.full((len(steps), len(self.names)), 1.0 / len(self.names))

    def draws(self, steps):
        steps = self._steps(steps)
        n, k = len(self.names), self.tasks_per_step
        out = np.zeros((len(steps), n), dtype=bool)
        cols = (steps[:, None] * k + np.arange(k)[None, :]) % n
        np.put_along_axis(out, cols, True, axis=1)
        return out


class All(TaskSampler):
    """Every task at every step (one batch of each): fine-tuning's behaviour before samplers; ``tasks_per_step``
    is ignored (it is the number of tasks)."""

    name = "all"
    ignored_on_resume: ClassVar[frozenset[str]] = frozenset({"total_steps", "seed", "tasks_per_step"})

    def __init__(self, sizes, seed, total_steps, tasks_per_step=1, **options):
        super().__init__(sizes, seed, total_steps, 1, **options)
        self.tasks_per_step = len(self.names)

    def _probs(self, steps):
        return np.full((len(steps), len(self.names)), 1.0 / len(self.names))

    def draws(self, steps):
        return np.ones((len(self._steps(steps)), len(self.names)), dtype=bool)


SAMPLERS: dict[str, type[TaskSampler]] = {
    cls.name: cls for cls in (Proportional, Temperature, RoundRobin, Annealed, All)
}


def build_sampler(name: str, sizes: dict[str, int], seed: int, total_steps: int, tasks_per_step: int = 1,
                  **options: float) -> TaskSampler:
    """The sampler ``name`` (see ``SAMPLERS``); an unknown name or option is a ``ConfigError`` saying what exists."""
    try:
        cls = SAMPLERS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown task sampler {name!r} (known: {', '.join(sorted(SAMPLERS))})") from None
    return cls(sizes, seed, total_steps, tasks_per_step, **options)


__all__ = ["SAMPLERS", "All", "Annealed", "Proportional", "RoundRobin", "TaskSampler", "Temperature",
           "build_sampler", "uniforms"]
