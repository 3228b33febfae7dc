"""Pretraining end to end: loss goes down, checkpoints reload, SIGKILL + --resume is exact, DDP runs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, crash_command, slice_jsonl
from safetensors.torch import load_file

import sora
from sora.errors import SoraError

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


def crashing_sora(tmp: Path, step: int) -> list[str]:
    return crash_command(tmp, step, "sora.train.pretrain")


def tiny_pretrain(sample_dir: Path, out: Path, resume: bool = False, **overrides) -> dict:
    """``run_pretrain`` in this process with conftest.TINY's model: a couple of seconds."""
    from sora.config import load_recipe
    from sora.train.pretrain import run_pretrain

    recipe = load_recipe(None, {
        "data.train": str(sample_dir / "train.jsonl"), "output": str(out), "train.max_steps": 8,
        "train.save_every": 4, "train.keep_checkpoints": 3, "model.dim": 32, "model.ffn_dim": 64,
        "model.layers": 1, "model.heads": 2, "model.code_dim": 16, "model.decoder_layers": 1,
        "train.warmup_steps": 2, "tokenizer.vocab_size": 400, "data.batch_size": 8, "data.max_length": 32,
        "train.progress": False, "train.device": "cpu", **overrides})
    return run_pretrain(recipe, resume=resume)


def as_if_killed_after(out: Path, step: int) -> None:
    """Make a finished run look killed after checkpoint ``step``: later checkpoints and model/ never written."""
    for ckpt in (out / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    shutil.rmtree(out / "model")


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
    killed = run([*crashing_sora(tmp_path, 15), *args, "-o", str(broken)], check=False)
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


class Recorder:
    """A stateful callback for ``fit``: JSON values and a tensor; it freezes ``to_code`` after step 2."""

    def __init__(self):
        self.steps, self.trace, self.extra = 0, torch.zeros(3), {"best": float("-inf"), "names": ["a", None]}

    def on_step(self, state, model) -> None:
        self.steps += 1
        self.trace = self.trace + state.step
        if state.step == 2:
            model.to_code.requires_grad_(False)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "trace": self.trace, "extra": self.extra}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.trace, self.extra = state["steps"], state["trace"], state["extra"]


def test_stateful_callbacks_and_frozen_parameters_survive_resume(tmp_path, sample_dir, monkeypatch):
    """``fit(stateful={name: obj})``: each checkpoint's trainer/ holds ``obj.state_dict()`` (JSON in state.json,
    tensors in state.safetensors) and --resume hands it back through ``load_state_dict``; parameters a callback
    froze stay frozen. A run resumed from step 4 ends where the uninterrupted run ended."""
    import sora.train.pretrain as pretrain
    from sora.errors import SoraWarning
    from sora.models.checkpoint import load_checkpoint

    fit, recorders = pretrain.fit, []

    def fit_with(names):
        def wrapped(*args, **kwargs):
            recorders.append(Recorder())
            return fit(*args, on_step=recorders[-1].on_step, stateful=dict.fromkeys(names, recorders[-1]), **kwargs)
        return wrapped

    out = tmp_path / "run"
    monkeypatch.setattr(pretrain, "fit", fit_with(["recorder"]))
    tiny_pretrain(sample_dir, out)
    done = recorders[-1]
    assert done.steps == 8 and torch.equal(done.trace, torch.full((3,), 36.0))
    final = {k: v.clone() for k, v in load_checkpoint(out / "model")[0].state_dict().items()}

    trainer = out / "checkpoints" / "step-0000004" / "trainer"
    saved = json.loads((trainer / "state.json").read_text())
    assert saved["stateful"]["recorder"]["steps"] == 4
    assert saved["stateful"]["recorder"]["extra"] == {"best": float("-inf"), "names": ["a", None]}
    assert "model.to_code.weight" in saved["frozen"] and "model.to_code.bias" in saved["frozen"]
    ref = saved["stateful"]["recorder"]["trace"]["$tensor"]
    assert torch.equal(load_file(str(trainer / "state.safetensors"))[ref], torch.full((3,), 10.0))  # 1+2+3+4

    as_if_killed_after(out, 4)
    tiny_pretrain(sample_dir, out, resume=True)
    resumed = recorders[-1]
    assert resumed.steps == 8 and torch.equal(resumed.trace, done.trace) and resumed.extra == done.extra
    again = load_checkpoint(out / "model")[0].state_dict()
    for key, value in final.items():
        assert torch.equal(again[key], value), key  # to_code included: frozen from step 2 on in both runs
    step4 = load_file(str(out / "checkpoints" / "step-0000004" / "model.safetensors"))
    assert torch.equal(again["to_code.weight"], step4["to_code.weight"])

    # A checkpoint without a callback's state (an older Sora's): resuming says so.
    monkeypatch.setattr(pretrain, "fit", fit_with(["recorder", "newcomer"]))
    with pytest.warns(SoraWarning, match="no saved 'newcomer' state"):
        tiny_pretrain(sample_dir, out, resume=True)


def test_resume_drops_a_cut_off_last_log_line_and_names_a_corrupt_one(tmp_path, sample_dir):
    """A kill, a power loss or a full disk can leave the last line of train_log.jsonl half written: --resume drops
    it. A damaged line before the end is not guessed at: one clear error with the file and line."""
    out = tmp_path / "run"
    tiny_pretrain(sample_dir, out)
    as_if_killed_after(out, 4)
    log = out / "train_log.jsonl"
    lines = log.read_text().splitlines()

    log.write_text("\n".join([lines[0], '{"step": 2, "lo\x00\x00', *lines[2:]]) + "\n")
    with pytest.raises(SoraError) as err:
        tiny_pretrain(sample_dir, out, resume=True)
    assert str(err.value).startswith(f"{log}:2: corrupt line (") and "\n" not in str(err.value)
    assert log.read_text().splitlines()[1] == '{"step": 2, "lo\x00\x00'  # refused before anything was written

    with log.open("wb") as fh:  # the original lines, then one cut off mid-write (and bytes that are not UTF-8)
        fh.write("".join(ln + "\n" for ln in lines).encode() + b'{"step": 9, "loss": 5.3\xe2\x82')
    tiny_pretrain(sample_dir, out, resume=True)
    rows = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))


def full_disk(*args, **kwargs):
    """What safetensors raises when the disk fills up while it writes."""
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_full_disk_while_saving_is_one_line_and_leaves_no_temp_dir(tmp_path, sample_dir, monkeypatch):
    import sora.models.checkpoint as checkpoint

    out = tmp_path / "run"
    save_model, calls = checkpoint.save_model, []

    def fills_up(model, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 1:
            return save_model(model, filename, *args, **kwargs)
        Path(filename).write_bytes(b"\0" * 1000)  # part of the file, then the disk is full
        full_disk()

    monkeypatch.setattr(checkpoint, "save_model", fills_up)
    with pytest.raises(SoraError) as err:
        tiny_pretrain(sample_dir, out)
    message = str(err.value)
    assert message.startswith(f"disk full while writing {out / 'checkpoints' / 'step-0000008'}: ")
    assert "--resume" in message and "\n" not in message
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000004"]  # no .step-0000008.tmp-PID
    assert not list(out.rglob("*.tmp-*"))
    monkeypatch.setattr(checkpoint, "save_model", save_model)  # space freed: resuming finishes the run
    assert tiny_pretrain(sample_dir, out, resume=True)["steps"] == 8
    assert sora.load(out).embed(["hello"]).shape == (1, 16)


def test_full_disk_while_logging_is_one_line(tmp_path, monkeypatch):
    from sora.train.loop import _Log

    log = _Log(tmp_path / "train_log.jsonl", 0, True)
    log.write({"step": 1, "loss": 1.0})

    class FullFile:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: FullFile())
    with pytest.raises(SoraError, match=f"^disk full while writing {tmp_path / 'train_log.jsonl'}: "):
        log.write({"step": 2, "loss": 0.9})


def test_a_run_removes_temp_dirs_that_dead_processes_left(tmp_path, sample_dir):
    """Killed (or out of space) while saving, a process leaves checkpoints/.step-N.tmp-PID/ behind; the next run or
    resume deletes those of dead processes, and leaves a live process's (it may be saving right now) alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "run"
        stale = [out / "checkpoints" / f".step-0000004.tmp-{dead.pid}", out / f".model.tmp-{dead.pid}"]
        kept = [out / "checkpoints" / f".step-0000004.tmp-{live.pid}", out / "checkpoints" / ".notes",
                out / f".model.old-{dead.pid}"]  # model/ is missing: this may be its only complete copy
        for d in stale + kept:
            d.mkdir(parents=True)
            (d / "model.safetensors").write_bytes(b"\0" * 100)
        tiny_pretrain(sample_dir, out, **{"train.max_steps": 2})
        assert not any(d.exists() for d in stale)
        assert all(d.exists() for d in kept)
    finally:
        live.kill()
        live.wait()


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


@pytest.mark.parametrize("name", ["mlm", "reconstruct", "contrastive"])
def test_objectives_read_the_keys_their_prefix_names(name):
    """Fine-tuning's auxiliary loss is ``build_objective(..., prefix="aux_")`` on a batch that holds the unlabeled
    text under ``aux_`` and the labelled one under ``task/`` (several tasks). MaskedLM ignored the prefix: it
    trained on the labelled text, or, as here, failed with a KeyError. Every objective must read ``aux_`` only."""
    import torch

    from sora.config import ModelConfig, ObjectiveConfig
    from sora.data.batching import collate
    from sora.models.autoencoder import SoraModel
    from sora.objectives import build_objective
    from sora.text.tokenizer import train_tokenizer

    unlabeled = ["the parcel never arrived", "refund please, it came broken", "where is my order?", "thanks!"]
    labelled = ["a gripping, funny film", "dull and far too long", "a quiet triumph", "I want my money back"]
    tokenizer = train_tokenizer(unlabeled + labelled, vocab_size=300)
    torch.manual_seed(0)
    model = SoraModel(ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, layers=1, heads=2, ffn_dim=64,
                                  code_dim=16, decoder_layers=1, dropout=0.0))
    aux, task = (collate(tokenizer.encode(t, 32), tokenizer.pad_id) for t in (unlabeled, labelled))
    batch = {**{f"aux_{k}": v for k, v in aux.items()}, **{f"task/{k}": v for k, v in task.items()}}
    cfg = ObjectiveConfig(name=name, ratio=0.5)

    def loss(objective, b):
        torch.manual_seed(1)  # the same noise for both calls
        return objective(model, b)

    expected = loss(build_objective(cfg), aux)
    assert torch.equal(loss(build_objective(cfg, prefix="aux_"), batch), expected)
    assert not torch.equal(loss(build_objective(cfg), task), expected)  # the two texts give different losses
