"""Shared fixtures. Tests that need ../shared/data skip without it, unless SORA_REQUIRE_SHARED=1 (CI)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample"
SHARED = Path(os.environ.get("SORA_SHARED_DATA", ROOT.parent / "shared" / "data"))

# Small enough to train in a second or two on one core.
TINY = [
    "--set", "model.dim=32", "--set", "model.ffn_dim=64", "--set", "model.layers=1", "--set", "model.heads=2",
    "--set", "model.code_dim=16", "--set", "model.decoder_layers=1", "--set", "train.warmup_steps=2",
    "--vocab-size", "400", "--batch-size", "8", "--max-length", "32", "--no-progress",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train several times faster on one thread than on two contended ones."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def sample_dir() -> Path:
    return SAMPLE


@pytest.fixture
def shared_data():
    """``shared_data("sst2")`` → the dataset directory, or skip (fail under SORA_REQUIRE_SHARED=1)."""

    def get(name: str) -> Path:
        path = SHARED / name
        if not (path / "train.jsonl").is_file():
            if os.environ.get("SORA_REQUIRE_SHARED") == "1":
                pytest.fail(f"SORA_REQUIRE_SHARED=1 but {path} is missing")
            pytest.skip(f"needs ../shared/data/{name} (not in a fresh clone)")
        return path

    return get


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def slice_jsonl(src: Path, dst: Path, n: int, keys: tuple[str, ...] = ("text",)) -> Path:
    rows = []
    with src.open(encoding="utf-8") as fh:
        for line in fh:
            rows.append({k: v for k, v in json.loads(line).items() if k in keys or not keys})
            if len(rows) == n:
                break
    return write_jsonl(dst, rows)


# A crash, injected from the test side: ``sora`` with ``module.fit``'s ``on_step`` wrapped to SIGKILL the process
# once optimizer step N is done (logged, before that step's checkpoint), as a power loss would.
CRASH = """
import importlib, os, signal, sys
module = importlib.import_module(sys.argv.pop(1))
from sora.cli import main
at, fit = int(sys.argv.pop(1)), module.fit
def crashing_fit(*args, on_step=None, **kwargs):
    def hook(state, model):
        if on_step is not None:
            on_step(state, model)
        if state.step == at:
            os.kill(os.getpid(), signal.SIGKILL)
    return fit(*args, on_step=hook, **kwargs)
module.fit = crashing_fit
sys.argv[0] = "sora"
main()
"""


def crash_command(tmp: Path, step: int, module: str) -> list[str]:
    """The command that runs ``sora ARGS`` but is killed -9 after optimizer step ``step`` of ``module``'s fit."""
    import sys

    script = tmp / "crashing_sora.py"
    script.write_text(CRASH)
    return [sys.executable, str(script), module, str(step)]


def cli(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """``sora ARGS`` in this process (no interpreter start-up): exit code, stdout, stderr."""
    import sys

    from sora import cli as sora_cli

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["sora", *args])
    code = 0
    try:
        sora_cli.main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
