"""Pretraining end to end: loss goes down, checkpoints reload, SIGKILL + --resume is exact, DDP runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, slice_jsonl

import sora

SORA = [sys.executable, "-m", "sora.cli"]


def run(args: list[str], env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(args, capture_output=True, text=True, env=e, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(ln) for ln in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def val_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(ln) for ln in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r]


def test_pretrain_on_sst2_lowers_loss_and_reloads(tmp_path, shared_data):
    sst2 = shared_data("sst2")
    train = slice_jsonl(sst2 / "train.jsonl", tmp_path / "train.jsonl", 3000)
    val = slice_jsonl(sst2 / "validation.jsonl", tmp_path / "val.jsonl", 200)
    out = tmp_path / "run"
    run([*SORA, "pretrain", "--train", str(train), "--validation", str(val), "-o", str(out),
         "--max-steps", "120", "--lr", "3e-3", "--set", "train.eval_every=40", *TINY,
         "--set", "model.dim=64", "--set", "model.ffn_dim=128", "--batch-size", "32"])
    vals = val_losses(out)
    first = np.mean([x for _, x in losses(out)[:5]])
    assert len(vals) == 3
    assert vals[0] > vals[1] > vals[2], vals  # validation reconstruction loss falls at every evaluation
    assert vals[-1] < first - 1.0, (first, vals)  # and far below where training started
    model = sora.load(out)  # by run directory
    vecs = model.embed(["a gripping , funny film", "dull and lifeless"])
    assert vecs.shape == (2, 16) and np.isfinite(vecs).all()
    again = sora.load(out / "model").embed(["a gripping , funny film", "dull and lifeless"])
    np.testing.assert_allclose(vecs, again, rtol=0, atol=1e-6)


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, sample_dir):
    args = ["pretrain", "--train", str(sample_dir / "train.jsonl"), "--max-steps", "24", "--save-every", "6",
            *TINY, "--set", "data.bucket_batches=4"]
    full, broken = tmp_path / "full", tmp_path / "broken"
    run([*SORA, *args, "-o", str(full)])
    killed = run([*SORA, *args, "-o", str(broken)], env={"SORA_FAULT_KILL_AT_STEP": "15"}, check=False)
    assert killed.returncode == -9  # SIGKILL, mid-training, three steps past the step-12 checkpoint
    assert [s for s, _ in losses(broken)][-1] == 15
    assert not (broken / "model").exists()
    run([*SORA, *args, "-o", str(broken), "--resume"])
    a, b = losses(full), losses(broken)
    assert [s for s, _ in b] == list(range(1, 25))  # the log reads as one run
    np.testing.assert_allclose([x for _, x in a], [x for _, x in b], rtol=0, atol=1e-5)
    wa = sora.load(full).embed(["refund my card payment"])
    wb = sora.load(broken).embed(["refund my card payment"])
    np.testing.assert_allclose(wa, wb, atol=1e-5)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, sample_dir):
    proc = run([*SORA, "pretrain", "--train", str(sample_dir / "train.jsonl"), "-o", str(tmp_path / "none"),
                "--max-steps", "2", *TINY, "--resume"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --resume: no checkpoint")


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_ddp_two_cpu_processes(tmp_path, sample_dir):
    out = tmp_path / "ddp"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "sora.cli", "pretrain",
         "--train", str(sample_dir / "train.jsonl"), "--validation", str(sample_dir / "validation.jsonl"),
         "-o", str(out), "--max-steps", "20", "--set", "train.eval_every=10", "--device", "cpu", *TINY])
    steps = [s for s, _ in losses(out)]
    assert steps == list(range(1, 21))
    vals = val_losses(out)
    assert len(vals) == 2 and vals[1] < vals[0]
    assert sora.load(out).embed(["hello"]).shape == (1, 16)


def test_contrastive_objective_adds_to_reconstruction_and_learns(tmp_path, sample_dir):
    from sora.config import load_recipe
    from sora.train.pretrain import run_pretrain

    out = tmp_path / "run"
    recipe = load_recipe(None, {
        "data.train": str(sample_dir / "train.jsonl"), "output": str(out), "train.max_steps": 60,
        "model.dim": 32, "model.ffn_dim": 64, "model.layers": 1, "model.heads": 2, "model.code_dim": 16,
        "model.decoder_layers": 1, "train.warmup_steps": 2, "tokenizer.vocab_size": 400, "data.batch_size": 16,
        "data.max_length": 32, "train.lr": 3e-3, "train.progress": False, "train.device": "cpu",
        "objectives": [{"name": "reconstruct", "noise": "delete", "ratio": 0.6},
                       {"name": "contrastive", "noise": "delete", "ratio": 0.3, "weight": 0.5}]})
    run_pretrain(recipe)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert {"reconstruct_delete", "contrastive"} <= rows[0].keys()
    for r in rows:  # L = Σ α_t L_t
        assert r["loss"] == pytest.approx(r["reconstruct_delete"] + 0.5 * r["contrastive"], rel=1e-5)
    first = np.mean([r["contrastive"] for r in rows[:10]])
    last = np.mean([r["contrastive"] for r in rows[-10:]])
    assert last < first - 0.5, (first, last)  # it tells the sentences of a batch apart better and better
