"""The Python face of Sora: ``sora.load(path).embed(texts)``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sora.data.batching import collate
from sora.errors import SoraError
from sora.models.autoencoder import SoraModel
from sora.models.checkpoint import load_checkpoint, resolve_checkpoint
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

        All single-text heads share one encoder pass. Each row maps task → {"label", "score", "scores"}
        (classification), {"labels", "scores"} (multilabel) or {"value"} (regression).
        """
        from sora.data.tasks import Example, encode_examples
        from sora.models.heads import scores as head_scores

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
        single = [n for n, sp in specs.items() if not sp.pair]
        pairs = [n for n, sp in specs.items() if sp.pair]
        if pairs and not all(isinstance(t, tuple | list) and len(t) == 2 for t in texts):
            raise SoraError(f"task {pairs[0]!r} takes pairs of texts: pass (text_a, text_b) tuples")
        if single:
            bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
            if bad is not None:
                what = texts[bad]
                raise SoraError(f"task {single[0]!r} takes single texts, not pairs" if isinstance(what, tuple | list)
                                else f"text {bad} is {'null' if what is None else type(what).__name__}, not a string")
            code = self.codes(list(texts), batch_size)
            with torch.inference_mode():
                for name in single:
                    logits = self.model.heads[name](code)
                    s = head_scores(specs[name], logits.squeeze(-1) if specs[name].type == "regression" else logits)
                    for i, v in enumerate(s.float().cpu().numpy()):
                        rows[i][name] = format_prediction(specs[name], v)
        for name in pairs:
            examples = [Example(t[0], None, t[1]) for t in texts]
            enc = encode_examples(examples, True, specs[name].pair_mode, self.tokenizer, self.max_length)
            for i, v in enumerate(predict_scores(self.model, self.tokenizer, name, enc, batch_size, self.encoder)):
                rows[i][name] = format_prediction(specs[name], v)
        return rows

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
            "tasks": {n: {"type": s.type, "labels": s.labels, "pair": s.pair}
                      for n, s in self.model.head_specs.items()},
            "metadata": self.config.get("metadata", {}),
        }


def format_prediction(spec, s: np.ndarray) -> dict[str, Any]:
    """One head's scores as a response row (shared by ``Sora.predict`` and the server)."""
    if spec.type == "regression":
        return {"value": float(s)}
    labels = spec.labels or []
    scores = {lb: round(float(p), 6) for lb, p in zip(labels, s, strict=True)}
    if spec.type == "multilabel":
        th = spec.thresholds or [0.5] * len(labels)
        return {"labels": [lb for lb, p, t in zip(labels, s, th, strict=True) if p >= t], "scores": scores}
    best = int(np.argmax(s))
    return {"label": labels[best], "score": float(s[best]), "scores": scores}


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


@torch.inference_mode()
def predict_scores(model: SoraModel, tokenizer: SoraTokenizer, name: str, encoded: list[dict[str, Any]],
                   batch_size: int = 64, encoder: Any = None) -> np.ndarray:
    """Scores of head ``name`` for pre-encoded examples (see ``data.tasks.encode_examples``), in order:
    (n, labels) probabilities, or (n,) values for regression. ``encoder`` computes the codes the head reads:
    ``model`` by default, or an ``OnnxEncoder``; ``Sora.predict`` and the compression gate both come here, so
    the gate measures what is served."""
    from sora.data.tasks import make_batch
    from sora.models.heads import head_features, scores

    spec, encoder = model.head_specs[name], model if encoder is None else encoder
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]["ids"]))
    out: np.ndarray | None = None
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in make_batch([encoded[i] for i in idx], tokenizer.pad_id).items()}
        logits = model.heads[name](head_features(encoder, spec, batch))  # reads only encoder.embed
        s = scores(spec, logits.squeeze(-1) if spec.type == "regression" else logits).float().cpu().numpy()
        if out is None:
            out = np.zeros((len(encoded), *s.shape[1:]), dtype=np.float32)
        out[idx] = s
    model.train(was_training)
    return out if out is not None else np.zeros((0,), dtype=np.float32)
