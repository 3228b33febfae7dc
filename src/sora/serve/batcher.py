"""Dynamic micro-batching: concurrent requests share one forward pass.

Each request becomes a ``Job`` (its texts, the length in tokens of its longest text, and what to do with
the output). One worker task takes the oldest waiting job and gathers the jobs behind it that have the
same batch key (single texts share a pass; pairs of one task share another) until

- the token budget is reached: ``texts × longest ≤ max_batch_tokens`` (padded tokens, what a pass costs),
- ``max_wait`` has passed since the first job arrived, or
- every request the server is working on is already in the batch (``expected()``), so waiting longer
  could only add latency; a single client is therefore never delayed by ``max_wait``.

The pass runs in a one-thread executor (``run_in_executor``): the event loop keeps accepting requests
while the model computes, and the next batch fills meanwhile. Results are split back to each job's
future. Admission is bounded: more than ``max_queue`` jobs waiting raises ``QueueFull`` (HTTP 429) at
once instead of letting latency grow without limit. ``close()`` stops admission and drains what is
queued before returning (graceful shutdown).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """Too many requests are waiting; retry after ``retry_after`` seconds."""

    def __init__(self, depth: int, retry_after: int):
        super().__init__(f"server busy: {depth} requests waiting; retry after {retry_after} s")
        self.depth, self.retry_after = depth, retry_after


class BatcherClosed(Exception):
    """The server is shutting down and takes no new work."""


@dataclass(eq=False)
class Job:
    key: Hashable
    items: Sequence[Any]
    tokens: int  # the longest item, in tokens
    payload: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    finished: float = 0.0

    @property
    def size(self) -> int:
        return len(self.items)

    @property
    def queue_s(self) -> float:
        return self.started - self.enqueued

    @property
    def inference_s(self) -> float:
        return self.finished - self.started


# Runs in the executor thread: one result (or an Exception instance) per job, in order.
Runner = Callable[[Hashable, list[Job]], list[Any]]


class MicroBatcher:
    def __init__(self, runner: Runner, max_batch_tokens: int = 8192, max_wait_s: float = 0.005,
                 max_queue: int = 1024, expected: Callable[[], int] | None = None,
                 on_batch: Callable[[list[Job]], None] | None = None,
                 on_depth: Callable[[int], None] | None = None):
        self.runner, self.max_batch_tokens, self.max_wait_s, self.max_queue = (runner, max_batch_tokens,
                                                                                max_wait_s, max_queue)
        self.expected, self.on_batch, self.on_depth = expected, on_batch, on_depth
        self._pending: deque[Job] = deque()
        self._collecting = 0  # jobs gathered into the batch being formed (still waiting for their pass)
        self._wake = asyncio.Event()
        self._closing = False
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._batch_s = 0.05  # running averages, for Retry-After
        self._batch_jobs = 1.0
        self.batches = 0

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._worker is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sora-infer")
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="sora-batcher")

    async def close(self) -> None:
        """Refuse new jobs, finish the queued ones, stop the worker."""
        self._closing = True
        self._wake.set()
        if self._worker is not None:
            await self._worker
            self._worker = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def depth(self) -> int:
        """Requests waiting for a forward pass: queued, or gathered into the batch being formed."""
        return len(self._pending) + self._collecting

    def notify(self) -> None:
        """Something the worker may be waiting on changed (e.g. a request finished)."""
        self._wake.set()

    # ---- admission ----------------------------------------------------------------------------------------

    def retry_after(self) -> int:
        batches_ahead = self.depth / max(self._batch_jobs, 1.0) + 1
        return max(1, min(60, math.ceil(batches_ahead * self._batch_s)))

    def check_capacity(self) -> None:
        """QueueFull if a job submitted now would be refused: cheap, so a server can refuse a request before it
        parses and tokenises it."""
        if self.depth >= self.max_queue:
            raise QueueFull(self.depth, self.retry_after())

    def submit(self, key: Hashable, items: Sequence[Any], tokens: int, payload: Any = None) -> Job:
        if self._closing or self._worker is None:
            raise BatcherClosed("the server is shutting down")
        self.check_capacity()
        job = Job(key, items, max(1, tokens), payload, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._depth_changed()
        self._wake.set()
        return job

    async def __call__(self, key: Hashable, items: Sequence[Any], tokens: int, payload: Any = None) -> Job:
        """Submit and wait; the job comes back with its result in ``job.future`` and its timings set."""
        job = self.submit(key, items, tokens, payload)
        await job.future
        return job

    # ---- the worker ---------------------------------------------------------------------------------------

    def _depth_changed(self) -> None:
        if self.on_depth is not None:
            self.on_depth(self.depth)

    def _cost(self, n: int, longest: int) -> int:
        return n * longest

    def _gather(self, batch: list[Job]) -> bool:
        """Move waiting jobs with the batch's key into it while they fit; True once the budget is reached."""
        n = sum(j.size for j in batch)
        longest = max((j.tokens for j in batch), default=0)
        key = batch[0].key if batch else None
        keep: deque[Job] = deque()
        full = False
        while self._pending:
            job = self._pending.popleft()
            if job.future.done():  # the client went away
                continue
            if full or (key is not None and job.key != key):
                keep.append(job)
                continue
            if batch and self._cost(n + job.size, max(longest, job.tokens)) > self.max_batch_tokens:
                full = True
                keep.append(job)
                continue
            batch.append(job)
            key = job.key
            n += job.size
            longest = max(longest, job.tokens)
            if self._cost(n, longest) >= self.max_batch_tokens:
                full = True
        self._pending = keep
        self._collecting = len(batch)
        self._depth_changed()
        return full

    def _nobody_else(self, batch: list[Job]) -> bool:
        """Every request the server holds is already batched or queued: no one else can join soon."""
        if self.expected is None:
            return False
        return len(batch) + len(self._pending) >= self.expected()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch: list[Job] = []
            full = self._gather(batch)
            if not batch:
                continue
            deadline = batch[0].enqueued + self.max_wait_s
            while not full and not self._closing and not self._nobody_else(batch):
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    break
                full = self._gather(batch)
            await self._execute(loop, batch)

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[Job]) -> None:
        self._collecting = 0
        self._depth_changed()
        started = time.perf_counter()
        for job in batch:
            job.started = started
        try:
            results = await loop.run_in_executor(self._executor, self.runner, batch[0].key, batch)
        except Exception as exc:  # a bug in the runner: every job of the batch fails with it
            results = [exc] * len(batch)
        finished = time.perf_counter()
        for job, result in zip(batch, results, strict=True):
            job.finished = finished
            if job.future.done():
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
        self.batches += 1
        self._batch_s = 0.8 * self._batch_s + 0.2 * (finished - started)
        self._batch_jobs = 0.8 * self._batch_jobs + 0.2 * len(batch)
        if self.on_batch is not None:
            self.on_batch(batch)
