"""The model behind the server: loading, token counting, and the batch runner the micro-batcher calls.

Batch keys:
- ``("text",)``: single texts. One ``Sora.codes`` pass for every job of the batch, embed and predict alike;
  each predict job's heads are then applied to its rows of the codes (a head is one small linear layer), so
  one encoder pass serves every requested single-text head of every request in the batch.
- ``("pair", task)``: (a, b) pairs for one pair head, through ``Sora.predict(pairs, task=...)``.
- ``("generate", task, beam, max_new_tokens)``: source texts for one seq2seq head decoded the same way, through
  ``Sora.generate`` (requests asking for the same decoding share the encoder pass and the beam search).
- ``("stream", task, max_new_tokens, Stream)``: one streamed request's texts, decoded greedily through
  ``Sora.stream``; each piece goes to the request's ``Stream`` as it is decoded (its own batch: the key is unique).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Hashable
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sora.serve.batcher import Job
from sora.tasks import kind_of

TEXT = ("text",)


def pair_key(task: str) -> tuple[str, str]:
    return ("pair", task)


def load_sora(checkpoint: str, backend: str = "auto", device: str = "cpu", dtype: str = "auto"):
    """``sora.load``. ``auto`` runs what the checkpoint says (``sora compress`` may have made it ONNX, int8 or
    bf16)."""
    from sora import api

    return api.load(checkpoint, device=device, backend=None if backend == "auto" else backend,
                    dtype=None if dtype == "auto" else dtype)


def generate_key(task: str, beam: int, max_new_tokens: int) -> tuple[str, str, int, int]:
    return ("generate", task, beam, max_new_tokens)


class Stream:
    """Where a streamed request's pieces go from the inference thread: ``emit(index, piece)`` hands them to the
    event loop; ``cancel()`` (the client left) makes the decoding stop at its next token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.pieces = loop, asyncio.Queue()
        self._cancelled = threading.Event()

    def emit(self, index: int, piece: str) -> None:
        self.loop.call_soon_threadsafe(self.pieces.put_nowait, (index, piece))

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


def stream_key(task: str, max_new_tokens: int, stream: Stream) -> tuple[str, str, int, Stream]:
    return ("stream", task, max_new_tokens, stream)


def _finite_metrics(values: Any) -> dict[str, float] | None:
    """A task's validation metrics as the card shows them: its finite numbers (None when there are none)."""
    if not isinstance(values, dict):
        return None
    out = {str(k): float(v) for k, v in values.items()
           if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)}
    return out or None


def weights_version(path: Path) -> str:
    """A short content hash of the checkpoint's weights and config: changes whenever the model does."""
    h = hashlib.sha256()
    for f in [path / "config.json", path / "model.safetensors", *sorted(path.glob("*.onnx"))]:
        if f.is_file():
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
    return "sha256:" + h.hexdigest()[:12]


class Engine:
    def __init__(self, sora, max_batch_tokens: int, name: str | None = None):
        from tokenizers import Tokenizer

        self.sora, self.max_batch_tokens = sora, max_batch_tokens
        self.backend = "onnx" if getattr(sora, "onnx", None) is not None else "torch"  # what actually runs
        self.path = Path(sora.path)
        # runs/mine/model -> "mine"; in a container the mount point says little, so --model-name overrides it.
        self.name = name or (self.path.parent.name if self.path.name == "model" else self.path.name)
        self.config: dict[str, Any] = sora.config
        self.metadata: dict[str, Any] = dict(self.config.get("metadata") or {})
        self.version = str(self.metadata.get("version") or weights_version(self.path))
        self.specs = dict(sora.model.head_specs)
        self.answer_tasks = [n for n, s in self.specs.items() if kind_of(s).answers]  # /v1/answer
        self.generate_tasks = [n for n, s in self.specs.items() if kind_of(s).generates]  # /v1/generate
        # /v1/predict's default heads: not those with routes of their own (named in `tasks`, a generating head runs)
        self.single_tasks = [n for n, s in self.specs.items()
                             if not s.pair and n not in self.answer_tasks and n not in self.generate_tasks]
        self.pair_tasks = [n for n, s in self.specs.items() if s.pair and n not in self.answer_tasks]
        self.max_length = int(sora.max_length)
        # A private copy of the tokenizer for counting on the event loop: the model's own one is reconfigured
        # (truncation) on every call from the inference thread, and must not be used from two threads at once.
        self._counter = Tokenizer.from_str(sora.tokenizer.tk.to_str())
        self._counter.no_padding()
        self._counter.enable_truncation(self.max_length)

    @classmethod
    def load(cls, checkpoint: str, backend: str = "auto", device: str = "cpu",
             max_batch_tokens: int = 8192, name: str | None = None, dtype: str = "auto") -> Engine:
        return cls(load_sora(checkpoint, backend, device, dtype), max_batch_tokens, name)

    @property
    def dim(self) -> int:
        return int(self.sora.dim)

    def count_tokens(self, items: list[Any]) -> int:
        """Tokens of the longest text (or pair), truncated as the model will truncate it."""
        if len(items) == 1:
            return len(self._counter.encode(*items[0]) if isinstance(items[0], tuple) else
                       self._counter.encode(items[0]))
        return max(len(e) for e in self._counter.encode_batch(list(items)))

    def card(self) -> dict[str, Any]:
        compression = self.config.get("compression")
        quant = None
        if isinstance(compression, dict):
            method = str(compression.get("method") or "")
            quant = compression.get("quantization") or ("int8" if "int8" in method else None)
        validation = self.metadata.get("validation") or {}
        per_task = self.metadata.get("tasks_validation") or {}  # written by fine-tuning: {task: {metric: value}}
        per_task = per_task if isinstance(per_task, dict) else {}
        info = self.sora.info()
        return {
            "name": self.name, "version": self.version, "backend": self.backend,
            "kind": str(self.config.get("kind", "unknown")), "backbone": str(info.get("backbone", "native")),
            "dim": self.dim, "max_length": self.max_length, "parameters": int(info.get("parameters", 0)),
            "tasks": {n: {"type": s.type, "pair": s.pair, "pair_mode": s.pair_mode, "labels": s.labels,
                          "metric": s.metric, "validation": _finite_metrics(per_task.get(n))}
                      for n, s in self.specs.items()},
            "quantization": str(quant) if quant else None,
            "dtype": self.sora.dtype,
            "compression": compression if isinstance(compression, dict) else None,
            "validation": {k: (float(v) if isinstance(v, int | float) and np.isfinite(v) else None)
                           for k, v in validation.items() if isinstance(v, int | float) or v is None},
            "metadata": self.metadata,
        }

    # ---- the batch runner (executor thread) ----------------------------------------------------------------

    def _batch_size(self, jobs: list[Job]) -> int:
        longest = max(j.tokens for j in jobs)
        return max(1, self.max_batch_tokens // max(1, longest))

    def run(self, key: Hashable, jobs: list[Job]) -> list[Any]:
        if key == TEXT:
            return self._run_texts(jobs)
        if isinstance(key, tuple) and key[0] == "pair":
            return self._run_pairs(key[1], jobs)
        if isinstance(key, tuple) and key[0] == "generate":
            return self._run_generate(key[1], key[2], key[3], jobs)
        if isinstance(key, tuple) and key[0] == "stream":
            return self._run_stream(key[1], key[2], key[3], jobs)
        raise ValueError(f"unknown batch key {key!r}")

    def _run_texts(self, jobs: list[Job]) -> list[Any]:
        texts = [t for j in jobs for t in j.items]
        codes = self.sora.codes(texts, batch_size=self._batch_size(jobs))
        wanted = sorted({t for j in jobs if j.payload[0] == "predict" for t in j.payload[1]})
        predictions: dict[str, list[dict[str, Any]]] = {}
        for name in wanted:  # heads on the pooled code share the pass above; others (entities) run their own
            if self.specs[name].reads == "code":
                predictions[name] = self.sora.head_predictions(name, codes)
            else:
                predictions[name] = [r[name] for r in self.sora.predict(texts, name, self._batch_size(jobs))]
        out: list[Any] = []
        start = 0
        for job in jobs:
            rows = slice(start, start + job.size)
            start += job.size
            try:
                if job.payload[0] == "embed":
                    vec = codes[rows]
                    if job.payload[1]:
                        vec = torch.nn.functional.normalize(vec, dim=-1)
                    out.append(vec.float().cpu().numpy().tolist())
                else:
                    tasks = job.payload[1]
                    out.append([{t: predictions[t][i] for t in tasks} for i in range(rows.start, rows.stop)])
            except Exception as exc:
                out.append(exc)
        return out

    def _run_pairs(self, task: str, jobs: list[Job]) -> list[Any]:
        pairs = [tuple(p) for j in jobs for p in j.items]
        rows = self.sora.predict(pairs, task=task, batch_size=self._batch_size(jobs))
        out, start = [], 0
        for job in jobs:
            out.append([r[task] for r in rows[start : start + job.size]])
            start += job.size
        return out

    def _run_generate(self, task: str, beam: int, max_new_tokens: int, jobs: list[Job]) -> list[Any]:
        # Beam search holds beam hypotheses per source: the token budget counts them.
        texts = [t for j in jobs for t in j.items]
        size = max(1, self._batch_size(jobs) // beam)
        outputs = self.sora.generate(texts, beam=beam, max_length=max_new_tokens, task=task, batch_size=size)
        out, start = [], 0
        for job in jobs:
            out.append(outputs[start : start + job.size])
            start += job.size
        return out

    def _run_stream(self, task: str, max_new_tokens: int, stream: Stream, jobs: list[Job]) -> list[Any]:
        texts = [t for j in jobs for t in j.items]
        outputs = [""] * len(texts)
        with closing(self.sora.stream(texts, max_length=max_new_tokens, task=task,
                                      batch_size=self._batch_size(jobs))) as pieces:
            for index, piece in pieces:
                if stream.cancelled:
                    break
                outputs[index] += piece
                stream.emit(index, piece)
        return [outputs]
