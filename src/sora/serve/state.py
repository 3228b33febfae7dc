"""What one server process holds: settings, metrics, the model (loaded in the background) and the batcher."""

from __future__ import annotations

import asyncio
import logging
import math
import os
from pathlib import Path
from typing import Any

from sora.serve.batcher import Job, MicroBatcher
from sora.serve.engine import TEXT, Engine
from sora.serve.metrics import Metrics
from sora.serve.settings import ServeSettings

log = logging.getLogger("sora.serve")

WARMUP_TEXTS = ["Warm-up text for the first forward pass.", "一段用于预热的文字。"] * 4


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 quota (a container's CPU limit)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def default_threads(workers: int) -> int:
    """torch intra-op threads per worker: its share of the CPUs less one, which its event loop needs (HTTP
    parsing, JSON, batching). Sharing every core with the event loop stalls the threads at each op's barrier."""
    share = available_cpus() // max(1, workers)
    return max(1, share - 1)


class ServeState:
    def __init__(self, settings: ServeSettings, routes: list[str], batched_paths: set[str]):
        self.settings = settings
        self.api_key = settings.api_key()
        self.metrics = Metrics(routes)
        self.batched_paths = batched_paths
        self.engine: Engine | None = None
        self.status = "loading"  # loading → ready → draining; or failed
        self.detail: str | None = None
        self.batched_inflight = 0  # HTTP requests on batched routes being handled (the batcher's hint)
        self.batcher = MicroBatcher(self._run, settings.max_batch_tokens, settings.max_wait_ms / 1000,
                                    settings.max_queue, expected=lambda: self.batched_inflight,
                                    on_batch=self._on_batch, on_depth=self.metrics.queue_depth.set)
        self._loader: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    # ---- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        self.batcher.start()
        self._loader = asyncio.get_running_loop().create_task(self._load(), name="sora-load")

    async def _load(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        try:
            import torch

            if s.threads or not os.environ.get("OMP_NUM_THREADS"):
                torch.set_num_threads(s.threads or default_threads(s.workers))
            self.engine = await loop.run_in_executor(
                None, lambda: Engine.load(s.checkpoint, s.backend, s.device, s.max_batch_tokens, s.model_name, s.dtype))
            e = self.engine
            # Warm-up through the batcher, so the first real request finds the inference thread ready too.
            # Heads on the pooled code (plain texts; an entity-marked or question head needs inputs of its own kind).
            plain = [t for t in e.single_tasks if e.specs[t].reads == "code"]
            payload = ("predict", plain) if plain else ("embed", False)
            job = await self.batcher(TEXT, WARMUP_TEXTS, e.count_tokens(WARMUP_TEXTS), payload)
            job.future.result()
            self.metrics.set_model(e.name, e.version, list(e.specs), e.backend)
            self.status = "ready"
            log.info("sora serve: %s (version %s, tasks: %s, backend %s) ready; auth %s", e.name, e.version,
                     ", ".join(e.specs) or "none", e.backend, "on" if self.api_key else "off")
        except Exception as exc:  # a checkpoint that cannot load: report it on /readyz and stop the process
            self.status, self.detail = "failed", f"{type(exc).__name__}: {exc}"
            log.error("sora serve: could not load %s: %s", s.checkpoint, self.detail)
            import signal

            os.kill(os.getpid(), signal.SIGTERM)

    async def stop(self) -> None:
        if self.status != "failed":
            self.status = "draining"
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        await self.batcher.close()
        self.metrics.process_exit()

    # ---- inference ----------------------------------------------------------------------------------------

    def _run(self, key, jobs: list[Job]) -> list[Any]:
        assert self.engine is not None
        return self.engine.run(key, jobs)

    def _on_batch(self, jobs: list[Job]) -> None:
        m = self.metrics
        m.batch_size.observe(sum(j.size for j in jobs))
        m.inference_duration.observe(jobs[0].inference_s)
        for j in jobs:
            m.queue_duration.observe(j.queue_s)

    async def infer(self, scope_state: dict, key, items: list[Any], payload: Any) -> Any:
        """Run one request's items through the batcher; its timings go where the middleware reads them."""
        assert self.engine is not None
        self.batcher.check_capacity()  # before tokenising: the queue may have filled since the request was admitted
        job = await self.batcher(key, items, self.engine.count_tokens(items), payload)
        timing = scope_state.setdefault("timing", {})
        timing["queue"] = max(timing.get("queue", 0.0), job.queue_s)
        timing["inference"] = max(timing.get("inference", 0.0), job.inference_s)
        return job.future.result()
