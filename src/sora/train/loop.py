"""The training loop, visible top to bottom. It knows objectives only as weighted callables.

Exact resume: a checkpoint stores the weights, the optimizer and scheduler, the data position
(epoch, batches consumed), which parameters are frozen, and the state of the ``stateful`` callbacks (model
selection: the best weights so far, the patience counter). Randomness (noise, dropout) is re-seeded from
(seed, step, rank) at every step, so a resumed run draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from sora.config import TrainConfig
from sora.errors import CheckpointError, SoraError, SoraWarning
from sora.models.autoencoder import SoraModel
from sora.models.checkpoint import latest_checkpoint, save_checkpoint
from sora.objectives.weighting import Fixed, LossWeighting
from sora.text.tokenizer import SoraTokenizer
from sora.train.distributed import Dist, all_mean, any_true

Batch = dict[str, torch.Tensor]


class Stateful(Protocol):
    """A callback whose state a resumed run needs (e.g. model selection). ``state_dict()`` returns JSON-able
    values (numbers, strings, None, lists, dicts with string keys) and tensors at any depth; checkpoints keep
    the first in ``trainer/state.json`` and the tensors in ``trainer/state.safetensors``."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainUnit(nn.Module):
    """The model plus its objectives and how their losses combine (``weighting``, default Σ α_t L_t with the
    given weights); DDP wraps this so every objective's graph is synced.

    ``keys``: objective name -> the prefix of its batch keys. An objective with one runs only on batches that
    carry a key with that prefix (multi-task: the tasks the sampler drew for this step); one without runs always.
    """

    def __init__(self, model: SoraModel, objectives: dict[str, tuple[float, nn.Module]],
                 weighting: LossWeighting | None = None, keys: dict[str, str] | None = None):
        super().__init__()
        self.model = model
        self.objectives = nn.ModuleDict({name: obj for name, (_, obj) in objectives.items()})
        self.weighting = weighting or Fixed({name: w for name, (w, _) in objectives.items()})
        self.keys = keys or {}

    def applies(self, name: str, batch: Batch) -> bool:
        prefix = self.keys.get(name)
        return prefix is None or any(k.startswith(prefix) for k in batch)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        losses = {name: obj(self.model, batch) for name, obj in self.objectives.items() if self.applies(name, batch)}
        losses["loss"] = self.weighting.combine(losses)
        return losses


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    elapsed_s: float = 0.0
    tokens: int = 0
    best_val: float | None = None
    stop: bool = False  # set by an ``on_step`` hook (early stopping)
    history: list[dict[str, Any]] = field(default_factory=list)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return f


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """fp32 on CPU unless asked: this class of CPU (no native bf16) runs bf16 matmuls ~350x slower."""
    if cfg.precision == "fp32" or (cfg.precision == "auto" and device.type != "cuda"):
        return None
    if cfg.precision in ("bf16", "auto"):
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    return torch.float16


def _optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig, lr_scale: Callable[[str], float] | None,
               named: list[tuple[str, nn.Parameter]], own_lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW without decay on biases and norms; ``lr_scale(name)`` allows layer-wise learning rates."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in named:  # frozen parameters too: gradual unfreezing turns them on later
        decay = cfg.weight_decay if p.ndim >= 2 else 0.0
        scale = lr_scale(name) if lr_scale else 1.0
        if name.startswith("weighting.") and own_lr:  # learned task weights train at their own rate
            scale = own_lr / cfg.lr
        groups.setdefault((decay, scale), []).append(p)
    # fused: one kernel for all parameters instead of a dozen elementwise passes each (CPU and CUDA).
    return torch.optim.AdamW(
        [{"params": ps, "weight_decay": d, "lr": cfg.lr * s} for (d, s), ps in groups.items()], lr=cfg.lr,
        fused=True,
    )


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    sd = opt.state_dict()
    tensors = {f"opt.{idx}.{k}": v for idx, st in sd["state"].items() for k, v in st.items()}
    return {"param_groups": sd["param_groups"]}, tensors


def _unflatten_optimizer(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def fit(
    model: SoraModel,
    tokenizer: SoraTokenizer,
    objectives: dict[str, tuple[float, nn.Module]],
    train_batches: Callable[[int], Iterable[Batch]],
    cfg: TrainConfig,
    out_dir: str | Path,
    dist: Dist,
    *,
    val_batches: list[Batch] | None = None,
    info: dict[str, Any] | None = None,
    resume: bool = False,
    lr_scale: Callable[[str], float] | None = None,
    evaluate: Callable[[SoraModel], dict[str, float]] | None = None,
    on_step: Callable[[TrainState, SoraModel], None] | None = None,
    evaluate_first: bool = False,
    stateful: dict[str, Stateful] | None = None,
    weighting: LossWeighting | None = None,
    objective_keys: dict[str, str] | None = None,
) -> TrainState:
    """Train until ``max_steps`` or ``max_minutes``. ``train_batches(epoch)`` yields this rank's batches.

    ``evaluate(model)`` (optional) adds metrics at each validation; ``on_step`` sees the state after each
    optimizer step (early stopping and gradual unfreezing hook in here). ``evaluate_first`` also validates
    the untrained model (logged as step 0), so model selection can keep the starting point. ``stateful``
    names callbacks whose ``state_dict()`` every checkpoint saves and ``resume`` loads back (``Stateful``).
    ``weighting`` combines the objectives' losses (default: Σ of each objective's weight × its loss; see
    ``sora.objectives.weighting``); its parameters (learned weights) are trained and checkpointed with the rest,
    and its weights are logged per step as ``weight/{objective}`` when there are several. ``objective_keys``: see
    ``TrainUnit``.

    Disk full (a checkpoint, the log): one ``SoraError`` naming what was being written, and no temporary
    checkpoint directory left behind; those a killed process left are removed when the next run starts.
    """
    out = Path(out_dir)
    device = dist.device
    stateful = stateful or {}
    unit = TrainUnit(model, objectives, weighting, objective_keys).to(device)
    if unit.weighting.manual_backward and dist.enabled:
        raise SoraError(f"loss weighting {unit.weighting.name!r} computes gradients itself, which DDP does not "
                        "synchronise: run it in one process, or choose fixed, equal or uncertainty")
    if unit.weighting.state_dict():  # learned task weights (uncertainty) are resumed as they were
        stateful = {**stateful, "weighting": unit.weighting}
    named = list(unit.named_parameters())
    opt = _optimizer(unit.parameters(), cfg, lr_scale, named, unit.weighting.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    state = TrainState()

    if dist.is_main:
        _remove_stale_temp_dirs(out)
    if resume:
        state = _restore(out, unit, opt, sched, device, stateful)
    runner: nn.Module = unit
    if dist.enabled:
        runner = DistributedDataParallel(unit, find_unused_parameters=True)
    amp = autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    log = _Log(out / "train_log.jsonl", state.step, dist.is_main)
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not (dist.is_main and cfg.progress),
               unit="step", dynamic_ncols=True, mininterval=1.0)

    def save(directory: Path) -> None:
        meta, tensors = _flatten_optimizer(opt)
        trainer_state = {**state.__dict__, "optimizer": meta, "scheduler": sched.state_dict(),
                         "seed": cfg.seed, "world_size": dist.world_size,
                         "frozen": [n for n, p in named if not p.requires_grad],  # e.g. gradual unfreezing
                         "stateful": {name: _split_tensors(obj.state_dict(), f"stateful.{name}", tensors)
                                      for name, obj in stateful.items()}}
        try:
            save_checkpoint(directory, model, tokenizer, info, trainer_state, tensors)
        except BaseException as exc:
            # save_checkpoint writes into this sibling (models.checkpoint.atomic_dir) and renames it into place
            # only when complete; after a failure it is half written and would stay behind.
            shutil.rmtree(directory.parent / f".{directory.name}.tmp-{os.getpid()}", ignore_errors=True)
            if _disk_full(exc):
                raise _disk_full_error(directory) from exc
            raise

    t_start = time.perf_counter() - state.elapsed_s
    window_tokens, window_t = 0, time.perf_counter()
    micro, losses_acc = 0, {}
    done = state.step >= cfg.max_steps or state.stop  # a checkpoint written as early stopping ended the run
    def run_validation() -> None:
        """Validation losses and ``evaluate``'s metrics at ``state.step``, into the history and the log."""
        metrics = validate(unit, val_batches or [], cfg.seed, device, amp)
        if evaluate:
            metrics.update(evaluate(model))
            unit.train()
        state.history.append({"step": state.step, **metrics})
        log.write({"step": state.step, **metrics})
        if cfg.progress:
            bar.write(f"step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    validates = dist.is_main and bool(val_batches or evaluate)
    if evaluate_first and state.step == 0 and validates:
        run_validation()
    unit.train()
    while not done:
        produced = False
        for i, batch in enumerate(train_batches(state.epoch)):
            produced = True
            if i < state.batches_in_epoch:
                continue  # resuming: these batches were consumed before the checkpoint
            if micro == 0:
                step_start = time.perf_counter()
            torch.manual_seed(cfg.seed * 1_000_003 + state.step * 997 + micro * 31 + dist.rank)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            sync = micro + 1 == cfg.grad_accum
            ctx = runner.no_sync() if (dist.enabled and not sync) else contextlib.nullcontext()
            unit.weighting.at_step(state.step, micro)
            with ctx, torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                losses = runner(batch)
                if unit.weighting.manual_backward:  # e.g. PCGrad: per-task gradients, projected
                    scale = (scaler.get_scale() if scaler else 1.0) / cfg.grad_accum
                    unit.weighting.backward({k: v for k, v in losses.items() if k != "loss"},
                                            shared_parameters(model), scale)
                else:
                    loss = losses["loss"] / cfg.grad_accum
                    (scaler.scale(loss) if scaler else loss).backward()
            for k, v in losses.items():
                losses_acc[k] = losses_acc.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            ntok = sum(int(v.sum()) for k, v in batch.items() if k.endswith("attention_mask"))
            state.tokens += ntok * dist.world_size
            window_tokens += ntok * dist.world_size
            state.batches_in_epoch = i + 1
            micro += 1
            if micro < cfg.grad_accum:
                continue

            if scaler:
                scaler.unscale_(opt)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(unit.parameters(), cfg.grad_clip))
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state.step += 1
            micro = 0
            state.elapsed_s = time.perf_counter() - t_start
            # step_s: this step's own time (forward, backward, optimizer), without making its batches, validations,
            # checkpoints and hooks between steps, so a throughput read from the log is the training's alone.
            record = {"step": state.step, **{k: all_mean(v, dist) for k, v in losses_acc.items()},
                      "lr": sched.get_last_lr()[0], "grad_norm": grad_norm,
                      "step_s": round(time.perf_counter() - step_start, 4)}
            if len(unit.objectives) > 1:
                record.update({f"weight/{k}": v for k, v in unit.weighting.weights().items()})
            losses_acc = {}
            if not math.isfinite(record["loss"]):
                raise SoraError(f"loss became {record['loss']} at step {state.step}; lower train.lr or use fp32")
            log.write(record)
            if state.step % cfg.log_every == 0 or state.step == 1:
                now = time.perf_counter()
                rate = window_tokens / max(now - window_t, 1e-9)
                window_tokens, window_t = 0, now
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
            bar.update(1)

            last = state.step >= cfg.max_steps
            over_budget = cfg.max_minutes is not None and state.elapsed_s > cfg.max_minutes * 60
            last = last or any_true(over_budget, dist)
            due = bool(cfg.eval_every and state.step % cfg.eval_every == 0) or last
            if due and validates:
                run_validation()
            if on_step is not None:
                on_step(state, model)
            state.stop = any_true(state.stop, dist)  # early stopping is decided on rank 0
            if dist.is_main and ((cfg.save_every and state.step % cfg.save_every == 0) or last):
                save(out / "checkpoints" / f"step-{state.step:07d}")
                _prune(out, cfg.keep_checkpoints)
            if last or state.stop:
                done = True
                break
        else:
            if not produced:
                raise SoraError("the training data yielded no batch (empty data, or fewer batches than processes)")
            state.epoch += 1
            state.batches_in_epoch = 0
    bar.close()
    if dist.is_main:
        final = out / "checkpoints" / f"step-{state.step:07d}"
        if not final.exists():
            save(final)
        save(out / "model")
    return state


def shared_parameters(model: SoraModel) -> list[nn.Parameter]:
    """What every task trains: the encoder (task heads and the decoder are each one objective's own)."""
    return [p for p in model.encoder.parameters() if p.requires_grad]


@torch.no_grad()
def validate(unit: TrainUnit, batches: list[Batch], seed: int, device: torch.device,
             amp: torch.dtype | None) -> dict[str, float]:
    """Mean validation losses with fixed noise (same seed every time), so curves are comparable."""
    if not batches:
        return {}
    unit.eval()
    totals: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                for k, v in unit(batch).items():
                    totals[f"val_{k}"] = totals.get(f"val_{k}", 0.0) + float(v)
    unit.train()
    return {k: v / len(batches) for k, v in totals.items()}


def _restore(out: Path, unit: TrainUnit, opt, sched, device, stateful: dict[str, Stateful]) -> TrainState:
    from safetensors.torch import load_file, load_model

    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise SoraError(f"--resume: no checkpoint under {out / 'checkpoints'}")
    if not (ckpt / "trainer" / "state.json").is_file():
        raise SoraError(f"--resume: {ckpt} has no trainer state")
    load_model(unit.model, str(ckpt / "model.safetensors"), strict=True, device=str(device))
    meta = json.loads((ckpt / "trainer" / "state.json").read_text())
    tensors = load_file(str(ckpt / "trainer" / "state.safetensors"), device=str(device))
    opt.load_state_dict(_unflatten_optimizer(meta["optimizer"], tensors))
    sched.load_state_dict(meta["scheduler"])
    if "frozen" in meta:
        frozen = set(meta["frozen"])
        for name, p in unit.named_parameters():
            p.requires_grad_(name not in frozen)
    saved = meta.get("stateful", {})
    for name, obj in stateful.items():
        if name in saved:
            obj.load_state_dict(_join_tensors(saved[name], tensors))
        else:
            warnings.warn(f"--resume: {ckpt} has no saved {name!r} state (written by an older Sora?); it starts "
                          "afresh, so the resumed run may not end as an uninterrupted one", SoraWarning,
                          stacklevel=3)
    fields = TrainState.__dataclass_fields__
    return TrainState(**{k: v for k, v in meta.items() if k in fields})


def _split_tensors(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` with each tensor replaced by ``{"$tensor": KEY}`` and put in ``tensors[KEY]`` (KEY below ``key``)."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().clone()  # a copy: safetensors refuses tensors that share memory
        return {"$tensor": key}
    if isinstance(value, dict):
        return {k: _split_tensors(v, f"{key}.{i}", tensors) for i, (k, v) in enumerate(value.items())}
    if isinstance(value, list | tuple):
        return [_split_tensors(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    return value


def _join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of ``_split_tensors`` (tuples come back as lists)."""
    if isinstance(value, dict):
        if value.keys() == {"$tensor"}:
            if value["$tensor"] not in tensors:
                raise CheckpointError(f"--resume: trainer state names tensor {value['$tensor']!r}, which is missing")
            return tensors[value["$tensor"]]
        return {k: _join_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_tensors(v, tensors) for v in value]
    return value


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT, as Python raises it (OSError) or as Rust writers do (safetensors, tokenizers: text only)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return any(s in text for s in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT),
                                   f"os error {errno.ENOSPC})", f"os error {errno.EDQUOT})"))


def _disk_full_error(path: Path) -> SoraError:
    return SoraError(f"disk full while writing {path}: free some space (train.keep_checkpoints=1 keeps fewer "
                     "checkpoints) and rerun with --resume to continue from the last complete checkpoint")


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a full disk while writing ``path`` into one clear error."""
    try:
        yield
    except OSError as exc:
        if _disk_full(exc):
            raise _disk_full_error(path) from exc
        raise


# What models.checkpoint.atomic_dir writes beside a checkpoint NAME: .NAME.tmp-PID (the new one, being written)
# and .NAME.old-PID (the one it replaces, for the moment between two renames).
_TEMP_DIR = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)")


def _remove_stale_temp_dirs(out: Path) -> None:
    """Remove the temporary checkpoint directories of processes that died while saving (killed, disk full).
    Those of a live process are left alone (it may be saving now), and an ``.old`` one while NAME is missing
    (a process killed between the two renames: it is the only complete copy)."""
    for parent in (out, out / "checkpoints"):
        if not parent.is_dir():
            continue
        for path in parent.iterdir():
            m = _TEMP_DIR.fullmatch(path.name)
            if m is None or not path.is_dir() or _alive(int(m["pid"])):
                continue
            if m["kind"] == "old" and not (parent / m["name"]).exists():
                continue
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Another process with this id runs (this one is not saving while a run starts)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def _prune(out: Path, keep: int) -> None:
    ckpts = sorted((out / "checkpoints").glob("step-*"), key=lambda d: int(d.name.split("-")[1]))
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


class _Log:
    """``train_log.jsonl``: one line per step and per validation. On resume, lines past the checkpoint
    (written by the killed run after its last save) are dropped so the log reads as one run, and so is a last
    line cut off mid-write (a kill, power loss or a full disk leaves one); a bad line before it is an error."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        with _writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step and path.exists():
            kept = [ln for step, ln in self._read(path) if step <= resume_step]
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with _writing(path):  # into a sibling first: a full disk must not cost the log
            try:
                tmp.write_text("".join(ln + "\n" for ln in kept))
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

    @staticmethod
    def _read(path: Path) -> list[tuple[int, str]]:
        lines = path.read_bytes().split(b"\n")
        rows = []
        for i, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
                step = json.loads(line)["step"]
                if not isinstance(step, int):
                    raise TypeError(step)
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
                if not any(rest.strip() for rest in lines[i:]):
                    break  # the last line, cut off: dropped
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not a log record"
                raise SoraError(f"{path}:{i}: corrupt line ({reason}); delete that line to --resume") from None
            rows.append((step, line))
        return rows

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with _writing(self.path), self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
