"""The plain install (``pip install sora``) serves models without the training stack; ``sora[train]`` adds
it, and a feature that needs it says so in one line instead of an ImportError.

Each case runs in a subprocess whose import system refuses the ``train`` extra's packages, as a serving image
(deploy/Dockerfile, no SORA_EXTRAS) would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sora.config import ModelConfig
from sora.errors import OPTIONAL
from sora.models.autoencoder import SoraModel
from sora.models.checkpoint import save_checkpoint
from sora.models.heads import HeadSpec, add_head
from sora.text.tokenizer import train_tokenizer

WITHOUT_TRAIN = textwrap.dedent(f"""
    import importlib.abc, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in {sorted(OPTIONAL)!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

    sys.meta_path.insert(0, Refuse())
""")


def run_without_train(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", WITHOUT_TRAIN + textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    texts = ["the parcel arrived broken", "my invoice is wrong", "shares fell after the report"] * 10
    torch.manual_seed(0)
    tokenizer = train_tokenizer(texts, vocab_size=200)
    model = SoraModel(ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, layers=1, heads=2, ffn_dim=64,
                                  code_dim=16, decoder_layers=1))
    add_head(model, "topic", HeadSpec(type="classification", labels=["delivery", "billing", "finance"]))
    return save_checkpoint(tmp_path_factory.mktemp("extras") / "model", model, tokenizer)


def test_models_run_and_serve_without_the_training_stack(checkpoint, tmp_path):
    proc = run_without_train(f"""
        import time
        import sora
        from fastapi.testclient import TestClient
        from sora.serve import ServeSettings, create_app

        model = sora.load({str(checkpoint)!r})
        assert model.predict(["my invoice is wrong"])[0]["topic"]["label"] in ("delivery", "billing", "finance")
        assert model.embed(["a", "b"]).shape == (2, 16)
        with TestClient(create_app(ServeSettings(checkpoint={str(checkpoint)!r}, api_key_env=None))) as client:
            deadline = time.monotonic() + 60
            while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            r = client.post("/v1/predict", json={{"texts": ["the parcel arrived broken"]}})
            assert r.status_code == 200, r.text
            assert client.get("/metrics").status_code == 200
        assert not {{m.split(".")[0] for m in sys.modules}} & set({sorted(OPTIONAL)!r})
        print("ok")
    """, tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


@pytest.mark.parametrize(("argv", "needs"), [
    (["evaluate", "CKPT", "--data", "missing.jsonl"], "evaluation metrics needs scipy"),
    (["finetune", "--init", "CKPT"], "fine-tuning needs scipy"),
    (["embed", "CKPT", "texts.jsonl", "-o", "out.parquet"], "--output out.parquet needs pyarrow"),
])
def test_training_features_name_the_extra_to_install(checkpoint, tmp_path, argv, needs):
    (tmp_path / "texts.jsonl").write_text('{"text": "hello"}\n')
    argv = [str(checkpoint) if a == "CKPT" else a for a in argv]
    proc = run_without_train(f"""
        sys.argv = ["sora", *{argv!r}]
        from sora.cli import main
        main()
    """, tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert lines[0] == f"error: {needs}, which is not installed: pip install 'sora[train]'"
    assert not (tmp_path / "out.parquet").exists()
