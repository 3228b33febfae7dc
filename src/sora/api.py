"""The Python face of Sora: ``sora.load(path).embed(texts)``, ``.predict``, ``.answer``, ``.generate``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sora.data.batching import collate
from sora.errors import SoraError
from sora.models.autoencoder import SoraModel
from sora.models.checkpoint import load_checkpoint, resolve_checkpoint
from sora.tasks import kind_of
from sora.text.tokenizer import SoraTokenizer


class Sora:
    """A loaded checkpoint, ready for inference."""

    def __init__(self, model: SoraModel, tokenizer: SoraTokenizer, config: dict[str, Any], path: Path,
                 device: torch.device):
        self.model, self.tokenizer, self.config, self.path, self.device = model, tokenizer, config, path, device
        self.onnx = None  # sora.compress: an OnnxEncoder that codes() uses instead of the PyTorch encoder
        recipe = config.get("recipe") or {}
        self.max_length = int((recipe.get("data") or {}).get("max_length", 128))

    @property
    def dim(self) -> int:
        return self.model.code_dim

    @property
    def encoder(self) -> Any:
        """What computes codes, for every head: the ``OnnxEncoder`` of an ONNX checkpoint, else the PyTorch model
        (both take ``SoraModel.embed``'s call)."""
        return self.model if self.onnx is None else self.onnx

    @property
    def dtype(self) -> str:
        """What the encoder computes in: float32, or bfloat16 / float16 (int8 and ONNX report float32)."""
        return str(self.model.encoder.embeddings.word.weight.dtype).removeprefix("torch.")

    def _batches(self, texts: Sequence[str], batch_size: int, max_length: int):
        """Longest-first batches (little padding); yields (original indices, batch)."""
        ids = self.tokenizer.encode(list(texts), max_length)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate([ids[i] for i in idx], self.tokenizer.pad_id)
            yield idx, {k: v.to(self.device) for k, v in batch.items()}

    def embed(self, texts: Sequence[str], batch_size: int = 64, max_length: int | None = None,
              normalize: bool = False, progress: bool = False) -> np.ndarray:
        """Sentence vectors (n, dim) as float32, in the order of ``texts``."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a list of texts, not one string")
        vec = self.codes(texts, batch_size, max_length, progress)
        if normalize:
            vec = torch.nn.functional.normalize(vec, dim=-1)
        return vec.cpu().numpy()

    def codes(self, texts: Sequence[str], batch_size: int = 64, max_length: int | None = None,
              progress: bool = False) -> torch.Tensor:
        """Sentence codes (n, dim) as a float tensor on the model's device; longest-first batches."""
        out = torch.zeros(len(texts), self.dim, device=self.device)
        with torch.inference_mode(), tqdm(total=len(texts), disable=not progress, unit="text") as bar:
            for idx, batch in self._batches(texts, batch_size, max_length or self.max_length):
                out[idx] = self.encoder.embed(batch["input_ids"], batch["attention_mask"]).float()
                bar.update(len(idx))
        return out

    def predict(self, texts: Sequence[str] | Sequence[tuple[str, str]], task: str | None = None,
                batch_size: int = 64) -> list[dict[str, Any]]:
        """Predictions of one task head (or of every head when ``task`` is None) for texts or (a, b) pairs.

        All heads that read the pooled code of a single text share one encoder pass. Each row maps task → what
        its kind returns: {"label", "score", "scores"} (classification), {"labels", "scores"} (multilabel),
        {"value"} (regression), ...
        """
        if isinstance(texts, str):
            raise TypeError("predict() takes a list of texts, not one string")
        names = [task] if task else list(self.model.head_specs)
        if not names:
            raise SoraError(f"{self.path}: this checkpoint has no task heads (fine-tune it first)")
        unknown = [n for n in names if n not in self.model.head_specs]
        if unknown:
            raise SoraError(f"no task {unknown[0]!r} in this checkpoint (tasks: {', '.join(self.model.head_specs)})")
        specs = {n: self.model.head_specs[n] for n in names}
        rows: list[dict[str, Any]] = [{} for _ in texts]
        shared = [n for n, sp in specs.items() if not sp.pair and sp.reads == "code"]
        pairs = [n for n, sp in specs.items() if sp.pair]
        others = [n for n in specs if n not in shared and n not in pairs]
        if pairs and not all(isinstance(t, tuple | list) and len(t) == 2 for t in texts):
            raise SoraError(f"task {pairs[0]!r} takes pairs of texts: pass (text_a, text_b) tuples")
        if shared or others:
            bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
            if bad is not None:
                what, first = texts[bad], (shared or others)[0]
                raise SoraError(f"task {first!r} takes single texts, not pairs" if isinstance(what, tuple | list)
                                else f"text {bad} is {'null' if what is None else type(what).__name__}, not a string")
        if shared:
            code = self.codes(list(texts), batch_size)
            for name in shared:
                for i, row in enumerate(self.head_predictions(name, code)):
                    rows[i][name] = row
        for name in pairs + others:
            kind = kind_of(specs[name])
            examples = kind.examples_from(list(texts), specs[name])
            enc = kind.encode(examples, specs[name], self.tokenizer, self.max_length)
            scores = kind.predict(self.model, self.tokenizer, name, enc, batch_size, self.encoder)
            for i, v in enumerate(kind.predictions(specs[name], scores, examples, enc)):
                rows[i][name] = kind.format(specs[name], v)
        return rows

    def answer(self, question: str | Sequence[tuple[str, str]], context: str | None = None, task: str | None = None,
               batch_size: int = 64) -> dict[str, Any] | list[dict[str, Any]]:
        """Answers of a question-answering head: ``answer(question, context)`` → {"answer", "start", "end",
        "score"} (``answer`` is ``context[start:end]``), or ``answer([(question, context), ...])`` → a list."""
        names = [n for n, s in self.model.head_specs.items() if kind_of(s).answers and task in (None, n)]
        if not names:
            have = ", ".join(self.model.head_specs) or "none"
            raise SoraError(f"no question-answering task{f' {task!r}' if task else ''} in this checkpoint "
                            f"(tasks: {have}); fine-tune one with --task-type qa")
        if len(names) > 1:
            raise SoraError(f"several question-answering tasks ({', '.join(names)}): choose one with task=")
        one = isinstance(question, str)
        if one and context is None:
            raise SoraError("answer(question, context): a question needs its context")
        items = [(question, context)] if one else list(question)
        rows = [r[names[0]] for r in self.predict(items, task=names[0], batch_size=batch_size)]
        return rows[0] if one else rows

    def generation_task(self, task: str | None = None) -> str:
        """The head ``generate`` uses: ``task``, or the model's one generating head."""
        names = [n for n, s in self.model.head_specs.items() if kind_of(s).generates and task in (None, n)]
        if not names:
            have = ", ".join(self.model.head_specs) or "none"
            raise SoraError(f"no text-generating task{f' {task!r}' if task else ''} in this checkpoint "
                            f"(tasks: {have}); fine-tune one with --task-type seq2seq")
        if len(names) > 1:
            raise SoraError(f"several text-generating tasks ({', '.join(names)}): choose one with task=")
        return names[0]

    def generate(self, texts: Sequence[str], beam: int | None = None, max_length: int | None = None,
                 task: str | None = None, batch_size: int = 64) -> list[str]:
        """The generated text (translation, summary, ...) of each source text, in order, from a seq2seq head
        (``sora finetune --task-type seq2seq``). ``beam``: beam size (1: greedy; default the head's, 4 unless its
        recipe says otherwise); ``max_length``: the most tokens generated per text (default the head's
        ``max_target_length``, 128). Deterministic: the same texts give the same outputs, alone or batched."""
        name, kind, enc = self._sources(texts, task, "generate")
        return kind.generate(self.model, self.tokenizer, name, enc, batch_size, self.encoder, beam=beam,
                             max_length=max_length)

    def stream(self, texts: Sequence[str], max_length: int | None = None, task: str | None = None,
               batch_size: int = 64) -> Iterator[tuple[int, str]]:
        """Greedy generation, as it happens: (index of the text, text added) pairs, in the order they are decoded.
        A text's pieces joined are its ``generate(texts, beam=1)`` output::

            for i, piece in model.stream(["a man rides a bike"]):
                print(piece, end="", flush=True)
        """
        name, kind, enc = self._sources(texts, task, "stream")
        return kind.stream(self.model, self.tokenizer, name, enc, batch_size, self.encoder, max_length=max_length)

    def _sources(self, texts: Sequence[str], task: str | None, caller: str) -> tuple[str, Any, list[dict[str, Any]]]:
        """(the generating head, its kind, the texts encoded for it), or a clear error for input it cannot take."""
        if isinstance(texts, str):
            raise TypeError(f"{caller}() takes a list of texts, not one string")
        name = self.generation_task(task)
        spec = self.model.head_specs[name]
        kind = kind_of(spec)
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            what = texts[bad]
            raise SoraError(f"text {bad} is {'null' if what is None else type(what).__name__}, not a string")
        examples = kind.examples_from(list(texts), spec)
        return name, kind, kind.encode(examples, spec, self.tokenizer, self.max_length)

    @torch.inference_mode()
    def head_predictions(self, name: str, code: torch.Tensor) -> list[dict[str, Any]]:
        """Head ``name``'s predictions from codes already computed (``codes``): one encoder pass for every head
        that reads the pooled code (``Sora.predict``, the server's batches)."""
        from sora.models.autoencoder import EncoderOutput

        spec = self.model.head_specs[name]
        kind = kind_of(spec)
        batch = {"attention_mask": torch.ones(len(code), 1, dtype=torch.bool, device=code.device)}
        logits = kind.logits(self.model, self.model, name, batch, EncoderOutput(None, batch["attention_mask"], code))
        return [kind.format(spec, v) for v in kind.scores(spec, logits).float().cpu().numpy()]

    def info(self) -> dict[str, Any]:
        cfg = self.model.cfg
        return {
            "path": str(self.path),
            "kind": self.config.get("kind", "unknown"),
            "backbone": cfg.backbone or "native",
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "vocab_size": cfg.vocab_size,
            "dim": cfg.dim, "layers": cfg.layers, "heads": cfg.heads,
            "decoder_layers": cfg.decoder_layers, "pooling": cfg.pooling, "code_dim": self.dim,
            "dtype": self.dtype,
            "tasks": {n: {"type": s.type, "labels": s.labels, "pair": s.pair, "reads": s.reads}
                      for n, s in self.model.head_specs.items()},
            "metadata": self.config.get("metadata", {}),
        }


def format_prediction(spec, s: Any) -> dict[str, Any]:
    """One head's scores as a response row (shared by ``Sora.predict`` and the server): the kind's format."""
    return kind_of(spec).format(spec, s)


def load(path: str | Path, device: str = "cpu", backend: str | None = None, dtype: str | None = None) -> Sora:
    """``path``: a Sora checkpoint or run directory, a local Hugging Face BERT-style encoder directory, or
    ``all-MiniLM-L6-v2`` / ``minilm`` (the names every command takes; see ``models.checkpoint.resolve_checkpoint``).
    An HF encoder loads without task heads: ``embed`` works, ``predict`` asks for fine-tuning first.

    ``backend``: None runs what the checkpoint says (see ``sora compress``), "torch" or "onnx". ``dtype``:
    None runs the checkpoint's (float32 unless compressed to bf16), or "float32" / "bfloat16" / "float16"
    for the encoder (bfloat16 pays on CPUs with AVX-512 BF16 or AMX, and on GPUs)."""
    p = resolve_checkpoint(path)
    dev = torch.device(device)
    model, tokenizer, config = load_checkpoint(path, dev)  # the name as given: an alias stays the model's backbone
    onnx = None
    if config.get("compression") or backend not in (None, "torch") or dtype:  # ---- sora.compress hook ----
        from sora.compress.runtime import prepare

        model, onnx = prepare(model, config, p, dev, backend, dtype)
    loaded = Sora(model, tokenizer, config, p, dev)
    loaded.onnx = onnx
    return loaded


def predict_scores(model: SoraModel, tokenizer: SoraTokenizer, name: str, encoded: list[dict[str, Any]],
                   batch_size: int = 64, encoder: Any = None) -> Any:
    """Scores of head ``name`` for pre-encoded examples (its kind's ``encode``), in order: (n, labels)
    probabilities, (n,) values for regression, ... ``encoder`` computes what the head reads: ``model`` by
    default, or an ``OnnxEncoder``; ``Sora.predict`` and the compression gate both come here, so the gate
    measures what is served."""
    return kind_of(model.head_specs[name]).predict(model, tokenizer, name, encoded, batch_size, encoder)
