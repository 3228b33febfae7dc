"""One model name works everywhere: a Sora checkpoint or run directory, a local Hugging Face encoder directory,
and the all-MiniLM-L6-v2 / minilm alias load the same way in ``sora.load`` and in every command."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli_errors import one_line_error, run_cli

import sora
from sora.errors import CheckpointError, SoraError
from sora.models.hf_import import resolve_backbone

SENTENCES = ["How do I reset my password?", "I forgot my password, how can I change it?",
             "The central bank raised interest rates by half a point."]


@pytest.fixture(scope="module")
def minilm():
    return sora.load("all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def package_dir() -> Path:
    return resolve_backbone("all-MiniLM-L6-v2")


def test_the_alias_embeds_with_sensible_similarities(minilm):
    vectors = minilm.embed(SENTENCES)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32 and np.isfinite(vectors).all()
    assert (np.linalg.norm(vectors, axis=1) > 0.1).all()  # normalisable
    unit = minilm.embed(SENTENCES, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    paraphrase, unrelated = float(unit[0] @ unit[1]), float(unit[0] @ unit[2])
    assert paraphrase > 0.6 and paraphrase > unrelated + 0.4, (paraphrase, unrelated)


def test_the_package_directory_and_every_alias_give_the_same_vectors(minilm, package_dir):
    """``sora.load(<HF model directory>)`` raised a bare KeyError: 'model'; the alias said "checkpoint not found"."""
    expected = minilm.embed(SENTENCES)
    for name in (package_dir, "sentence-transformers/all-MiniLM-L6-v2"):
        np.testing.assert_array_equal(sora.load(name).embed(SENTENCES), expected)


def test_the_alias_embeds_what_fine_tuning_starts_from(minilm):
    """Mean pooling, no code projection: the codes ``sora finetune --init all-MiniLM-L6-v2`` starts from."""
    from sora.config import FinetuneRecipe
    from sora.data.batching import collate
    from sora.train.finetune import init_model

    model, tokenizer, _ = init_model("all-MiniLM-L6-v2", FinetuneRecipe())
    model.eval()
    assert isinstance(minilm.model.to_code, torch.nn.Identity) and minilm.model.cfg.pooling == "mean"
    assert minilm.model.cfg.code_dim is None and minilm.dim == model.code_dim == 384
    batch = collate(tokenizer.encode(SENTENCES, minilm.max_length), tokenizer.pad_id)
    with torch.no_grad():
        start = model.embed(batch["input_ids"], batch["attention_mask"]).numpy()
    np.testing.assert_allclose(minilm.embed(SENTENCES), start, atol=1e-5, rtol=1e-5)


def test_an_hf_encoder_loads_without_heads(minilm):
    info = minilm.info()
    assert info["kind"] == "hf-encoder" and info["backbone"] == "all-MiniLM-L6-v2"
    assert info["tasks"] == {} and info["code_dim"] == 384 and info["decoder_layers"] == 0
    with pytest.raises(SoraError, match="no task heads"):
        minilm.predict(["hello"])


def test_names_that_are_nothing_say_what_was_tried(tmp_path):
    with pytest.raises(CheckpointError) as err:
        sora.load("no-such-model")
    assert "no-such-model" in str(err.value) and "all-MiniLM-L6-v2" in str(err.value)
    with pytest.raises(CheckpointError, match="not a model Sora can load .tried: a Sora checkpoint") as err:
        sora.load(tmp_path)  # an empty directory
    assert "Hugging Face" in str(err.value) and "run directory" in str(err.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        sora.load(tmp_path)


def test_resolution_serves_every_command(package_dir):
    """serve and compress resolve the name first (``resolve_checkpoint``); fine-tuning still tells an HF
    encoder from a Sora checkpoint."""
    from sora.models.checkpoint import is_sora_checkpoint, resolve_checkpoint

    assert resolve_checkpoint("all-MiniLM-L6-v2") == resolve_checkpoint("minilm") == package_dir
    assert resolve_checkpoint(package_dir) == package_dir
    assert not is_sora_checkpoint("minilm") and not is_sora_checkpoint(package_dir)


def test_cli_embed_the_alias_on_a_semicolon_csv(tmp_path, monkeypatch, capsys, minilm):
    data = tmp_path / "texts.csv"
    data.write_text("id;text\n" + "".join(f"{i};{t}\n" for i, t in enumerate(SENTENCES)), encoding="utf-8")
    out = tmp_path / "v.npy"
    code, stdout, err = run_cli(monkeypatch, capsys, "embed", "all-MiniLM-L6-v2", data, "--column", "text", "-o", out)
    assert code == 0, err
    assert "3 vectors of dim 384" in stdout
    np.testing.assert_allclose(np.load(out), minilm.embed(SENTENCES), atol=1e-6)


def test_cli_info_the_alias(monkeypatch, capsys, package_dir):
    code, stdout, err = run_cli(monkeypatch, capsys, "info", "all-MiniLM-L6-v2", "--json")
    assert code == 0, err
    details = json.loads(stdout)
    assert details["kind"] == "hf-encoder" and details["dim"] == 384 and details["path"] == str(package_dir)
    code, stdout, err = run_cli(monkeypatch, capsys, "info", package_dir)
    assert code == 0 and "hf-encoder" in stdout, err


def test_cli_a_bogus_name_is_one_line(tmp_path, monkeypatch, capsys):
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "hi"}\n', encoding="utf-8")
    for argv in (["info", "bogus-model"], ["embed", "bogus-model", data, "-o", tmp_path / "out" / "v.npy"],
                 ["predict", "bogus-model", data, "-o", tmp_path / "out" / "p.jsonl"]):
        line = one_line_error(*run_cli(monkeypatch, capsys, *argv)[::2])
        assert "bogus-model" in line and "all-MiniLM-L6-v2" in line, line
    assert not (tmp_path / "out").exists()


def test_cli_commands_that_need_heads_say_so_about_an_hf_encoder(tmp_path, monkeypatch, capsys):
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "hi", "label": "a"}\n', encoding="utf-8")
    line = one_line_error(*run_cli(monkeypatch, capsys, "predict", "minilm", data, "-o", tmp_path / "p.jsonl")[::2])
    assert "minilm" in line and "no task heads" in line and "sora finetune --init minilm" in line, line
    line = one_line_error(*run_cli(monkeypatch, capsys, "evaluate", "minilm", "--data", data,
                                   "-o", tmp_path / "report")[::2])
    assert "no task heads" in line, line
    line = one_line_error(*run_cli(monkeypatch, capsys, "compress", "minilm", "-o", tmp_path / "small",
                                   "--method", "int8", "--data", data)[::2])
    assert "no task heads" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


def test_serve_takes_the_alias(monkeypatch, minilm):
    from fastapi.testclient import TestClient

    from sora.serve import ServeSettings, create_app

    monkeypatch.delenv("SORA_API_KEY", raising=False)
    with TestClient(create_app(ServeSettings(checkpoint="all-MiniLM-L6-v2"))) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = client.post("/v1/embed", json={"texts": SENTENCES})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()["embeddings"]), minilm.embed(SENTENCES), atol=1e-5)
