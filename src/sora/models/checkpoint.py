"""Checkpoint directories: the one thing every stage hands on.

    config.json         model config, recipe, heads, metadata (metrics, size, ...)
    model.safetensors   weights (never pickled)
    tokenizer.json
    trainer/            state.json + state.safetensors: optimizer, RNG, data position (resume only)

Writes go to a temporary sibling directory that is renamed into place, so a crash never leaves a
half-written checkpoint where a loader would find it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from sora.config import ModelConfig
from sora.errors import CheckpointError
from sora.models.autoencoder import SoraModel
from sora.models.heads import build_heads
from sora.text.tokenizer import SoraTokenizer

FORMAT_VERSION = 1


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _usual_permissions(root: Path) -> None:
    """Give every file the mode a plain ``open()`` would (0644 under umask 022). safetensors writes its files
    0600, which a server running as another user (a container's non-root uid, a k8s volume) cannot read."""
    mask = _umask()
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_dir(target: Path, write) -> None:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` to ``target`` (replacing it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    _usual_permissions(tmp)
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def save_checkpoint(directory: str | Path, model: SoraModel, tokenizer: SoraTokenizer,
                    info: dict[str, Any] | None = None,
                    trainer_state: dict[str, Any] | None = None,
                    trainer_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """``info`` holds JSON-able extras (recipe, heads, metadata) stored beside the model config."""
    directory = Path(directory)

    def write(tmp: Path) -> None:
        config = {"format_version": FORMAT_VERSION, "model": model.cfg.model_dump(), **(info or {}),
                  "heads": {name: spec.model_dump() for name, spec in model.head_specs.items()}}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save(tmp)
        if trainer_state is not None:
            from safetensors.torch import save_file

            (tmp / "trainer").mkdir()
            (tmp / "trainer" / "state.json").write_text(json.dumps(trainer_state, indent=2))
            save_file({k: v.contiguous() for k, v in (trainer_tensors or {}).items()},
                      str(tmp / "trainer" / "state.safetensors"))

    atomic_dir(directory, write)
    return directory


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir itself, or a run dir: its ``model/``, else its newest ``checkpoints/step-*``."""
    p = Path(path)
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return p
    if (p / "model" / "config.json").is_file():
        return p / "model"
    steps = latest_checkpoint(p)
    if steps is not None:
        return steps
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    raise CheckpointError(f"{p}: not a Sora checkpoint (no config.json + model.safetensors)")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = sorted(Path(run_dir).glob("checkpoints/step-*"), key=lambda d: int(d.name.split("-")[1]))
    complete = [c for c in ckpts if (c / "model.safetensors").is_file()]
    return complete[-1] if complete else None


def is_sora_checkpoint(path: str | Path) -> bool:
    """True for a Sora checkpoint or run dir; False for anything else (e.g. an HF model directory)."""
    try:
        return "format_version" in read_config(path)
    except CheckpointError:
        return False


def read_config(path: str | Path) -> dict[str, Any]:
    p = resolve_checkpoint(path)
    try:
        return json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{p / 'config.json'}: corrupt ({exc.msg})") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[SoraModel, SoraTokenizer, dict]:
    """Rebuild the model and its task heads from the config, then load the weights."""
    p = resolve_checkpoint(path)
    config = read_config(p)
    model = SoraModel(ModelConfig.model_validate(config["model"]))
    build_heads(model, config)
    weights = p / "model.safetensors"
    if not os.access(weights, os.R_OK):  # safetensors would report a permission problem as "No such file"
        st = weights.stat()
        raise CheckpointError(f"{weights}: not readable by this user (uid {os.getuid()}; the file is mode "
                              f"{st.st_mode & 0o777:o}, owner uid {st.st_uid}); e.g. chmod a+r it")
    missing, unexpected = load_model(model, str(p / "model.safetensors"), strict=False, device=str(device))
    if missing or unexpected:
        raise CheckpointError(f"{p}: weights do not match the config (missing {list(missing)[:3]}, "
                              f"unexpected {list(unexpected)[:3]})")
    model.to(device).eval()
    return model, SoraTokenizer.load(p), config
