"""``sora compress``: prune / quantize / export a fine-tuned checkpoint behind an accuracy gate.

1. Load the checkpoint (PyTorch fp32) and its tasks' validation splits (from the recipe, or ``data``).
2. Optionally prune heads and layers (``prune_heads`` / ``prune_layers``; ``method="prune"`` alone
   defaults to 30 % of the heads), with importance measured on the task's training split.
3. Apply the method: nothing more (prune), PyTorch dynamic int8, ONNX export, ONNX Runtime int8, or the
   encoder in bfloat16 (bf16: weights stored in bfloat16, half the size; fast where the CPU has AVX-512 BF16
   or AMX, or on a GPU).
4. Measure the validation metric of the original and the compressed model (through ``api.predict_scores``, the
   path ``sora.load(out).predict`` serves, ONNX Runtime codes for pairs too), and the latency of both
   (batch 32, interleaved repeats in this process); refuse when the metric drops by more than
   ``max_drop`` points unless ``warn_only``. Nothing is written before the gate has passed.
5. Write a normal checkpoint (config.json, model.safetensors, tokenizer.json; plus model[.int8].onnx)
   whose config says how to run it (``"compression"``) and what was measured (``"metadata"``).

The decoder (only needed to keep pretraining) is left out of compressed checkpoints unless
``keep_decoder``; task heads and the tokenizer stay. A seq2seq head is a task head with a decoder of its own, so
it always stays: it is compressed with the encoder (int8 linear layers, bf16 weights: its ``precision`` is the
encoder's), and with ``onnx`` / ``onnx-int8`` the exported graph is the encoder (codes and token states) while the
head decodes in PyTorch from it. The gate is the kind's own metric on what the head predicts (BLEU, chrF or ROUGE
for a generated text), and latency is then that of generating (``latency_of: generate``, 64 texts), not encoding.
"""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sora.compress import METHODS
from sora.compress.prune import apply_pruning, head_importance, plan_pruning
from sora.compress.quantize import DEFAULT_KEEP_FP32, inference_size_mb, int8_settings, quantize_int8
from sora.compress.runtime import native, set_dtype
from sora.config import TaskConfig
from sora.data.tasks import make_batch
from sora.errors import ConfigError, SoraError
from sora.models.autoencoder import SoraModel
from sora.models.checkpoint import atomic_dir, is_sora_checkpoint, resolve_checkpoint, save_checkpoint
from sora.models.heads import HeadSpec
from sora.tasks import kind_of, scalar_metrics

Embed = Callable[..., torch.Tensor]  # (ids, mask, type_ids=None) -> codes, as SoraModel.embed
DEFAULT_PRUNE_HEADS = 0.3
ONNX_TOLERANCE = 1e-3  # fp32 export vs PyTorch, max |Δ| on the validation texts (measured ~1e-6)
GENERATION_TEXTS = 64  # texts timed for a head that generates (a beam-search pass costs ~100x an encoder pass)


@dataclass
class TaskSet:
    name: str
    spec: HeadSpec
    examples: list[Any]
    encoded: list[dict[str, Any]]


# ---- data -------------------------------------------------------------------------------------------------

def _task_config(config: dict[str, Any], name: str, spec: HeadSpec) -> TaskConfig:
    for raw in (config.get("recipe") or {}).get("tasks") or []:
        if raw.get("name") == name:
            return TaskConfig.model_validate(raw)
    return TaskConfig(name=name, type=spec.type, pair_mode=spec.pair_mode)


def _validation_source(cfg: TaskConfig, data: str | None) -> str | None:
    if data:
        return data
    if cfg.validation:
        return cfg.validation
    if cfg.data and Path(cfg.data).is_dir():
        return cfg.data
    return None


def _subsample(examples: list[Any], n: int | None, seed: int = 13) -> list[Any]:
    if n is None or len(examples) <= n:
        return examples
    return random.Random(seed).sample(examples, n)


def validation_sets(model: SoraModel, tokenizer, config: dict[str, Any], max_length: int, data: str | None,
                    task: str | None, max_examples: int | None) -> list[TaskSet]:
    names = list(model.head_specs)
    if not names:
        raise ConfigError("this checkpoint has no task heads: the accuracy gate needs one (fine-tune it first)")
    if task is not None:
        if task not in names:
            raise ConfigError(f"no task {task!r} in this checkpoint (tasks: {', '.join(names)})")
        names = [task]
    elif data and len(names) > 1:
        raise ConfigError(f"--data with several tasks ({', '.join(names)}): choose one with --task")
    sets = []
    for name in names:
        spec = model.head_specs[name]
        cfg = _task_config(config, name, spec)
        source = _validation_source(cfg, data)
        if source is None:
            raise ConfigError(f"task {name!r}: no validation split in the checkpoint's recipe; pass --data PATH")
        kind = kind_of(spec)
        examples = kind.read(source, cfg, "validation", pair=spec.pair)
        kind.check_labels(examples, spec.labels, str(source))
        examples = _subsample(examples, max_examples)
        sets.append(TaskSet(name, spec, examples, kind.encode(examples, spec, tokenizer, max_length)))
    return sets


def importance_batches(model: SoraModel, tokenizer, config: dict[str, Any], sets: list[TaskSet], max_length: int,
                       n_examples: int, batch_size: int = 16) -> tuple[list[tuple[str, dict]], str]:
    """Labelled batches for head importance: the task's training split (so the gate's validation data is
    not also the data the pruning was chosen on), else the validation examples."""
    out, used = [], "validation"
    for ts in sets:
        cfg = _task_config(config, ts.name, ts.spec)
        kind = kind_of(ts.spec)
        examples = None
        if cfg.data:
            try:
                examples = kind.read(cfg.data, cfg, "train", pair=ts.spec.pair)
                kind.check_labels(examples, ts.spec.labels, str(cfg.data))
                used = "train"
            except SoraError:
                examples = None
        examples = _subsample(examples or ts.examples, n_examples)
        enc = kind.encode(examples, ts.spec, tokenizer, max_length)
        y = kind.training_targets(examples, enc, ts.spec.labels)
        out += [(ts.name, batch) for batch in kind.batches(enc, y, batch_size, tokenizer.pad_id, shuffle=False)]
    return out, used


# ---- measuring --------------------------------------------------------------------------------------------

def _batches(encoded: list[dict[str, Any]], pad_id: int, batch_size: int):
    """Longest-first batches, as ``Sora.codes``; yields (indices, batch)."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]["ids"]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, make_batch([encoded[i] for i in idx], pad_id)


@torch.inference_mode()
def task_codes(embed: Embed, ts: TaskSet, pad_id: int, batch_size: int = 64) -> np.ndarray:
    """Codes of each example's (first) text from ``embed`` (a PyTorch model's or ONNX Runtime's), in example
    order; batches of 64, longest first, as ``Sora.predict``."""
    parts = [(idx, embed(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")))
             for idx, batch in _batches(ts.encoded, pad_id, batch_size)]
    out = np.zeros((len(ts.encoded), parts[0][1].shape[1]), dtype=np.float32)
    for idx, c in parts:
        out[idx] = c.float().cpu().numpy()
    return out


def evaluate(heads_model: SoraModel, encoder: Any, sets: list[TaskSet], tokenizer) -> dict[str, dict[str, float]]:
    """task → its selection metrics (accuracy / micro_f1 / pearson and the rest ``task_metrics`` gives), with
    codes from ``encoder`` (a model, or an ``OnnxEncoder``) through ``api.predict_scores``: the very path
    ``Sora.predict`` serves, single texts and pairs alike."""
    from sora.api import predict_scores

    result = {}
    for ts in sets:
        kind = kind_of(ts.spec)
        s = predict_scores(heads_model, tokenizer, ts.name, ts.encoded, encoder=encoder)
        predictions = kind.predictions(ts.spec, s, ts.examples, ts.encoded)
        result[ts.name] = scalar_metrics(kind.metrics(ts.spec, predictions, ts.examples))
    return result


def primary(metrics: dict[str, float], spec: HeadSpec) -> tuple[str, float]:
    name = spec.metric if spec.metric in metrics else kind_of(spec).default_metric
    return name, float(metrics[name])


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float(np.mean(num / den))


@torch.inference_mode()
def latency(embeds: dict[str, Embed], encoded: list[dict[str, Any]], pad_id: int, batch_size: int = 32,
            repeats: int = 3) -> dict[str, dict[str, float]]:
    """Per system: median ms per text over batches of ``batch_size`` (longest-first, as ``Sora.codes``) and
    texts/s of whole passes (median). Systems alternate within each repeat (order flipped every repeat), so a
    slower or busier stretch of the machine hits them alike; one warm-up pass each first."""
    batches = [b for _, b in _batches(encoded, pad_id, batch_size)]
    n = len(encoded)
    names = list(embeds)

    def one_pass(embed: Embed) -> list[float]:
        times = []
        for b in batches:
            t0 = time.perf_counter()
            embed(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
            times.append(time.perf_counter() - t0)
        return times

    for name in names:
        one_pass(embeds[name])
    per_batch: dict[str, list[float]] = {k: [] for k in names}
    per_pass: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            times = one_pass(embeds[name])
            per_batch[name] += [t / len(b["input_ids"]) for t, b in zip(times, batches, strict=True)]
            per_pass[name].append(sum(times))
    return {k: {"ms_per_text": 1000 * statistics.median(per_batch[k]),
                "texts_per_s": n / statistics.median(per_pass[k])} for k in names}


def generation_latency(systems: dict[str, tuple[SoraModel, Any]], ts: TaskSet, tokenizer, n_texts: int,
                       batch_size: int = 32, repeats: int = 3) -> dict[str, dict[str, float]]:
    """As ``latency`` for a head that generates: whole ``predict_scores`` passes (encoder, then decoding with the
    head's own beam and lengths) over ``n_texts`` seeded validation rows in batches of ``batch_size``; per system
    (heads model, encoder), interleaved, one warm-up pass each."""
    from sora.api import predict_scores

    rows = _subsample(ts.encoded, n_texts)
    names = list(systems)

    def one_pass(name: str) -> float:
        heads_model, encoder = systems[name]
        t0 = time.perf_counter()
        predict_scores(heads_model, tokenizer, ts.name, rows, batch_size, encoder=encoder)
        return time.perf_counter() - t0

    for name in names:
        one_pass(name)
    per_pass: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            per_pass[name].append(one_pass(name))
    return {k: {"ms_per_text": 1000 * statistics.median(v) / len(rows), "texts_per_s": len(rows) / statistics.median(v)}
            for k, v in per_pass.items()}


# ---- the pipeline -----------------------------------------------------------------------------------------

def _check_output(out: Path, source: Path) -> None:
    if out.resolve() == source.resolve():
        raise ConfigError(f"-o {out}: write the compressed model somewhere else than its source")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_sora_checkpoint(out))):
        raise ConfigError(f"-o {out}: exists and is not a Sora checkpoint; choose a new directory")


def compress(checkpoint: str | Path, out: str | Path, method: str, *, prune_heads: float | None = None,
             prune_layers: int = 0, layer_order: str = "importance", max_drop: float = 1.0, warn_only: bool = False,
             data: str | None = None, task: str | None = None, max_examples: int | None = None,
             importance_examples: int = 512, keep_decoder: bool = False, per_channel: bool = True,
             keep_fp32: tuple[str, ...] = DEFAULT_KEEP_FP32, latency_repeats: int = 3,
             latency_texts: int | None = 512, batch_size: int = 32) -> dict[str, Any]:
    """Compress ``checkpoint`` into the checkpoint directory ``out``; returns what was measured.

    method: prune | int8 (PyTorch dynamic) | onnx | onnx-int8 (ONNX Runtime dynamic) | bf16. ``prune_heads``
    (fraction) and ``prune_layers`` (count) combine with any method. Raises ``SoraError`` (and writes
    nothing) when the validation metric drops by more than ``max_drop`` points, unless ``warn_only``.
    """
    from sora.api import load

    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    if prune_heads is None:
        prune_heads = DEFAULT_PRUNE_HEADS if method == "prune" and not prune_layers else 0.0
    if not 0.0 <= prune_heads < 1.0:
        raise ConfigError(f"--prune-heads {prune_heads}: a fraction in [0, 1)")
    if prune_layers < 0:
        raise ConfigError(f"--prune-layers {prune_layers}: a count of layers, 0 or more")
    if latency_repeats < 1 or batch_size < 1:
        raise ConfigError("latency_repeats and batch_size must be 1 or more")
    if layer_order not in ("importance", "top"):
        raise ConfigError(f"--layer-order {layer_order!r}: use importance or top")
    if method == "prune" and not prune_heads and not prune_layers:
        raise ConfigError("--method prune with nothing to prune: give --prune-heads and/or --prune-layers")
    if method == "bf16" and not native("bfloat16", torch.device("cpu")):
        raise ConfigError("--method bf16: this CPU has no native bfloat16 (AVX-512 BF16 or AMX), so bfloat16 "
                          "would run slower than float32 here and the speed measured would mean nothing; "
                          "compress on a machine like the one you deploy to")
    source = resolve_checkpoint(checkpoint)
    out = Path(out)
    _check_output(out, source)
    original = load(source, backend="torch")
    if original.config.get("compression"):
        done = original.config["compression"].get("method")
        raise ConfigError(f"{source} is already compressed ({done}); compress the checkpoint it came from")
    if prune_layers >= original.model.cfg.layers:
        raise ConfigError(f"--prune-layers {prune_layers}: the model has {original.model.cfg.layers} layers "
                          "and at least one must stay")
    model, tokenizer, config = original.model, original.tokenizer, original.config
    pad = tokenizer.pad_id
    sets = validation_sets(model, tokenizer, config, original.max_length, data, task, max_examples)

    params: dict[str, Any] = {"prune_heads": prune_heads, "prune_layers": prune_layers}
    result: dict[str, Any] = {"method": method}
    # -- structure
    plan = None
    if prune_heads or prune_layers:
        batches, used = importance_batches(model, tokenizer, config, sets, original.max_length, importance_examples)
        importance = head_importance(model, batches)
        plan = plan_pruning(importance, prune_heads, prune_layers, layer_order)
        params.update(layer_order=layer_order, importance="michel2019-gate-gradient", importance_data=used,
                      importance_examples=min(importance_examples, sum(len(b[1]["input_ids"]) for b in batches)))
        result["pruning"] = {k: plan[k] for k in ("dropped_layers", "heads_before", "heads_after")}
        result["pruning"]["layer_heads"] = [len(h) for h in plan["heads"]]
    compact = apply_pruning(model, plan, keep_decoder=keep_decoder)
    params["keep_decoder"] = keep_decoder

    with tempfile.TemporaryDirectory(prefix="sora-compress-") as tmp:
        extra: dict[str, Path] = {}
        settings: dict[str, Any] | None = None
        heads_model: SoraModel = compact
        if method == "int8":
            settings = int8_settings(per_channel, keep_fp32)
            heads_model = quantize_int8(compact, per_channel, keep_fp32)
            encoder: Any = heads_model  # what computes the codes: a model, or an OnnxEncoder
            size = inference_size_mb(heads_model)
            params.update(per_channel=per_channel, keep_fp32=list(keep_fp32))
        elif method in ("onnx", "onnx-int8"):
            from sora.compress.onnx_export import OPSET, OnnxEncoder, export_onnx, quantize_onnx

            fp32 = Path(tmp) / "model.onnx"
            sample = next(_batches(sets[0].encoded, pad, 4))[1]
            attention = export_onnx(compact, fp32, sample)
            check = TaskSet(sets[0].name, sets[0].spec, sets[0].examples[:64], sets[0].encoded[:64])
            ref = task_codes(compact.embed, check, pad)
            diff = float(np.abs(task_codes(OnnxEncoder(fp32).embed, check, pad) - ref).max())
            if not diff <= ONNX_TOLERANCE:
                raise SoraError(f"ONNX export does not match PyTorch (max |Δ| {diff:.2e} > {ONNX_TOLERANCE}); "
                                "nothing written")
            result["onnx_max_abs_diff"] = diff
            file = fp32
            params.update(opset=OPSET, attention=attention)
            settings = {"method": method, "backend": "onnx", "file": "model.onnx", "opset": OPSET}
            if method == "onnx-int8":
                file = Path(tmp) / "model.int8.onnx"
                excluded = quantize_onnx(fp32, file, per_channel, keep_fp32)
                settings.update(file=file.name, quantization="int8-dynamic-ort", per_channel=per_channel,
                                keep_fp32=list(keep_fp32))
                params.update(per_channel=per_channel, keep_fp32=list(keep_fp32), fp32_nodes=len(excluded))
            encoder = OnnxEncoder(file)
            extra[file.name] = file
            in_graph = {id(p) for p in compact.encoder.parameters()}  # a tied head embedding is in the graph
            size = file.stat().st_size / 1e6 + sum(p.numel() * p.element_size() for p in compact.heads.parameters()
                                                   if id(p) not in in_graph) / 1e6
        elif method == "bf16":
            heads_model = set_dtype(compact, "bfloat16", torch.device("cpu"))  # saved as it runs: bf16 weights
            encoder = heads_model
            size = inference_size_mb(heads_model)
            settings = {"method": method, "backend": "torch", "dtype": "bfloat16"}
        else:
            encoder = compact
            size = inference_size_mb(compact)

        # -- the gate
        result["code_cosine"] = mean_cosine(task_codes(model.embed, sets[0], pad),
                                            task_codes(encoder.embed, sets[0], pad))
        before, after = evaluate(model, model, sets, tokenizer), evaluate(heads_model, encoder, sets, tokenizer)
        drops = {ts.name: kind_of(ts.spec).points * (primary(before[ts.name], ts.spec)[1]
                                                     - primary(after[ts.name], ts.spec)[1]) for ts in sets}
        drop = max(drops.values())
        if kind_of(sets[0].spec).generates:  # what is served is decoding: time it, not the encoder alone
            texts_timed = min(latency_texts or GENERATION_TEXTS, GENERATION_TEXTS)
            timed = generation_latency({"before": (model, model), "after": (heads_model, encoder)}, sets[0],
                                       tokenizer, texts_timed, batch_size, latency_repeats)
            result["latency_of"] = "generate"
        else:
            timing_set = _subsample(sets[0].encoded, latency_texts)
            timed = latency({"before": model.embed, "after": encoder.embed}, timing_set, pad, batch_size,
                            latency_repeats)
            result["latency_of"] = "encode"
        flat = _flatten(before, sets)
        result.update(
            validation_before=flat, validation_after=_flatten(after, sets), accuracy_drop_points=round(drop, 4),
            size_mb=round(size, 3), size_mb_before=round(inference_size_mb(model), 3),
            latency_ms_per_text=round(timed["after"]["ms_per_text"], 4),
            latency_ms_per_text_before=round(timed["before"]["ms_per_text"], 4),
            texts_per_s=round(timed["after"]["texts_per_s"], 1),
            texts_per_s_before=round(timed["before"]["texts_per_s"], 1),
            speedup=round(timed["before"]["ms_per_text"] / timed["after"]["ms_per_text"], 3),
            params=params, max_drop=max_drop)
        warning = None
        if drop > max_drop:
            worst = max(drops, key=drops.get)
            metric = primary(before[worst], next(ts.spec for ts in sets if ts.name == worst))[0]
            msg = f"validation {metric} of {worst!r} dropped by {drop:.2f} points > max {max_drop:g}"
            if not warn_only:
                raise SoraError(f"{msg}; use --warn-only to keep it")
            warning = f"{msg}; kept (--warn-only)"
            warnings.warn(warning, stacklevel=2)
        result["warning"] = warning

        # -- write
        metadata = {k: v for k, v in (config.get("metadata") or {}).items()
                    if k not in ("onnx_max_abs_diff", "code_cosine", "compression_warning")}
        metadata.update(
            compression={"method": method, "params": params, "source": str(source),
                         **({"previous": metadata["compression"]} if metadata.get("compression") else {})},
            validation={f"val_{k}": v for k, v in after[sets[0].name].items()} if len(sets) == 1 else
            {f"val_{n}_{k}": v for n, m in after.items() for k, v in m.items()},
            **{k: result[k] for k in ("validation_before", "validation_after", "accuracy_drop_points", "size_mb",
                                      "size_mb_before", "latency_ms_per_text", "latency_ms_per_text_before",
                                      "speedup")})
        for k in ("onnx_max_abs_diff", "code_cosine", "pruning", "warning"):
            if result.get(k) is not None:
                metadata[k if k != "warning" else "compression_warning"] = result[k]
        info = {k: v for k, v in config.items() if k not in ("format_version", "model", "heads", "compression")}
        info["metadata"] = metadata
        if settings is not None:
            info["compression"] = settings

        def write(tmp_dir: Path) -> None:
            save_checkpoint(tmp_dir, compact, tokenizer, info)
            for name, file in extra.items():
                shutil.move(str(file), tmp_dir / name)

        atomic_dir(out, write)
    result["output"] = str(out)
    return result


def _flatten(metrics: dict[str, dict[str, float]], sets: list[TaskSet]) -> dict[str, float]:
    """{metric: value} for one task, {task/metric: value} for several; the selection metric of each only."""
    out = {}
    for ts in sets:
        name, value = primary(metrics[ts.name], ts.spec)
        out[name if len(sets) == 1 else f"{ts.name}/{name}"] = round(value, 6)
    return out

