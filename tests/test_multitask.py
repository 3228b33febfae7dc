"""Multi-task fine-tuning end to end: sampled steps train only the drawn tasks, learned task weights, exact
resume of the draws and losses, model selection on one task, PCGrad in the loop, a new head on a frozen encoder
that leaves the old heads' predictions as they were, and one checkpoint with six heads of five kinds answering in
one call and one HTTP request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SAMPLE, crash_command, write_jsonl
from fastapi.testclient import TestClient
from safetensors.torch import load_file

import sora
from sora.config import load_finetune_recipe, load_recipe
from sora.errors import ConfigError
from sora.evaluate.report import training_curves_plot
from sora.serve import ServeSettings, create_app
from sora.train.finetune import run_finetune, selection_weights
from sora.train.multitask import TaskMixer, TaskStream, steps_per_epoch
from sora.train.pretrain import run_pretrain
from sora.train.samplers import build_sampler

SORA = [sys.executable, "-m", "sora.cli"]
TINY_PRETRAIN = {
    "model.dim": 32, "model.ffn_dim": 64, "model.layers": 1, "model.heads": 2, "model.code_dim": 16,
    "model.decoder_layers": 1, "train.warmup_steps": 2, "tokenizer.vocab_size": 400, "data.batch_size": 8,
    "data.max_length": 32, "train.lr": 3e-3, "train.progress": False, "train.device": "cpu",
}
FT_BASE = {"data.max_length": 40, "train.progress": False, "train.device": "cpu", "train.lr": 1e-3}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "run"
    run_pretrain(load_recipe(None, {**TINY_PRETRAIN, "data.train": str(SAMPLE / "train.jsonl"), "output": str(out),
                                    "train.max_steps": 30}))
    return out


def read_log(run_dir: Path) -> list[dict]:
    """The log without its wall-clock figure (``step_s``), which no two runs share."""
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    assert all(r["step_s"] > 0 for r in rows if "grad_norm" in r)  # each step's own time
    return [{k: v for k, v in r.items() if k != "step_s"} for r in rows]


def run(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def two_tasks(init: Path, out: Path, **multitask) -> dict:
    """Task a: the whole sample (360); task b: 5 per class (20), so the two differ 18× in size."""
    return {"output": str(out), "finetune": {"init": str(init), "patience": 0, "max_steps": 14},
            "data": {"max_length": 40}, "train": {"progress": False, "device": "cpu", "lr": 1e-3, "eval_every": 0,
                                                 "save_every": 10},
            "tasks": [{"name": "a", "data": str(SAMPLE)},
                      {"name": "b", "data": str(SAMPLE), "labels_per_class": 5}],
            "multitask": multitask}


def test_steps_per_epoch_counts_every_tasks_batches_once():
    assert steps_per_epoch([23, 2], tasks_per_step=1) == 25  # one task a step: the batches of both
    assert steps_per_epoch([23, 2], tasks_per_step=2) == 23  # every task every step: the largest
    assert steps_per_epoch([23, 2], tasks_per_step=1, world_size=2) == 12


def test_the_mixer_gives_each_drawn_task_the_next_batch_of_its_own_epochs():
    """Task b (3 examples, batch 2: 2 batches an epoch) drawn at steps s1 < s2 < ... gets batches 0, 1 of its epoch
    0, then 0, 1 of epoch 1 (reshuffled); a second process reads the other batch of the same draws."""
    from sora.tasks import kind_of

    kind = kind_of("classification")
    rows = [{"ids": [5 + i, 6]} for i in range(3)]
    streams = {"a": TaskStream(kind, [{"ids": [9, 9, 9]}] * 40, torch.zeros(40, dtype=torch.long), "a/"),
               "b": TaskStream(kind, rows, torch.tensor([0, 1, 2]), "b/")}
    sampler = build_sampler("proportional", {"a": 40, "b": 3}, seed=3, total_steps=400)
    mixer = TaskMixer(streams, sampler, 2, 0, seed=1)
    b_steps = [s for s in range(400) if sampler.tasks_at(s) == ["b"]]
    assert len(b_steps) >= 6
    firsts = [mixer.batch(s) for s in b_steps[:4]]
    assert all(set(b) == {"b/input_ids", "b/attention_mask", "b/labels"} for b in firsts)
    epoch0 = sorted(int(x) for b in firsts[:2] for x in b["b/labels"])
    epoch1 = sorted(int(x) for b in firsts[2:4] for x in b["b/labels"])
    assert epoch0 == epoch1 == [0, 1, 2]  # each epoch shows every example once
    ranks = [TaskMixer(streams, sampler, 2, 0, seed=1, world_size=2, rank=r) for r in (0, 1)]
    assert all(m.tasks_at(b_steps[0]) == ["b"] for m in ranks)  # both processes draw the same task...
    shares = [{int(x) for x in m.batch(b_steps[0])["b/labels"]} for m in ranks]
    assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == {0, 1, 2}  # ...and read its two batches
    assert mixer.epochs_seen(400)["b"] == pytest.approx(len(b_steps) / 2)


def test_sampled_steps_train_the_drawn_task_and_a_killed_run_resumes_exactly(pretrained, tmp_path):
    """Proportional sampling, one task a step, uncertainty weighting: each step's log has the loss of exactly the
    task the sampler draws for it, the learned weights move and are logged, and a run killed -9 after step 12 and
    resumed from step 10 logs the same draws, losses and weights as the uninterrupted run."""
    recipe = two_tasks(pretrained, tmp_path / "full", sampler="proportional", weighting="uncertainty")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    printed = run([*SORA, "finetune", str(path), "-o", str(tmp_path / "full")]).stdout
    assert "multi-task (proportional sampling, uncertainty weighting): a " in printed, printed
    killed = run([*crash_command(tmp_path, 12, "sora.train.finetune"), "finetune", str(path), "-o",
                  str(tmp_path / "broken")], check=False)
    assert killed.returncode == -9, killed.stderr
    run([*SORA, "finetune", str(path), "-o", str(tmp_path / "broken"), "--resume"])
    full = read_log(tmp_path / "full")
    assert read_log(tmp_path / "broken") == full

    sampler = build_sampler("proportional", {"a": 360, "b": 20}, seed=13, total_steps=14)
    steps = [r for r in full if "grad_norm" in r]
    assert [r["step"] for r in steps] == list(range(1, 15))
    for r in steps:
        (drawn,) = sampler.tasks_at(r["step"] - 1)
        assert drawn in r and ({"a", "b"} - {drawn}).isdisjoint(r), r
        assert {"weight/a", "weight/b"} <= set(r)
    assert sum("b" in r for r in steps) == 1  # b, 20 of 380 examples, is drawn once in 14 steps (seed 13)
    assert steps[-1]["weight/a"] != pytest.approx(1.0, abs=1e-3)  # learned at its own rate (0.01)
    state = json.loads((tmp_path / "full" / "checkpoints" / "step-0000014" / "trainer" / "state.json").read_text())
    assert state["stateful"]["sampler"]["sampler"] == "proportional"
    assert "log_vars" in state["stateful"]["weighting"]


def test_resuming_with_another_sampler_is_refused(pretrained, tmp_path):
    out = tmp_path / "run"
    recipe = two_tasks(pretrained, out, sampler="temperature")
    recipe["finetune"]["max_steps"] = 10
    run_finetune(load_finetune_recipe(None, _flat(recipe)))
    other = {**recipe, "multitask": {"sampler": "round_robin"}}
    with pytest.raises(ConfigError, match="different task sampler"):
        run_finetune(load_finetune_recipe(None, _flat(other)), resume=True)


def _flat(recipe: dict) -> dict:
    """A nested recipe as dotted overrides (lists of tasks stay whole)."""
    out = {}
    for section, value in recipe.items():
        if isinstance(value, dict) and section != "multitask":
            out.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            out[section] = value
    return out


def test_selection_weights():
    assert selection_weights("mean", ["a", "b"]) == {"a": 0.5, "b": 0.5}
    assert selection_weights("b", ["a", "b"]) == {"a": 0.0, "b": 1.0}
    assert selection_weights({"a": 3, "b": 1}, ["a", "b"]) == {"a": 0.75, "b": 0.25}
    with pytest.raises(ConfigError, match="'c', which is not a task"):
        selection_weights("c", ["a", "b"])


def test_pcgrad_with_accumulation_and_selection_on_one_task(pretrained, tmp_path):
    recipe = two_tasks(pretrained, tmp_path / "run", sampler="all", weighting="pcgrad", select_on="b")
    recipe["finetune"]["max_steps"] = 4
    recipe["train"]["grad_accum"] = 2
    summary = run_finetune(load_finetune_recipe(None, _flat(recipe)))
    assert summary["steps"] == 4 and summary["multitask"]["weighting"] == "pcgrad"
    rows = [r for r in read_log(tmp_path / "run") if "grad_norm" in r]
    assert all({"a", "b"} <= set(r) and r["grad_norm"] > 0 for r in rows)
    assert summary["multitask"]["epochs_seen"]["b"] > summary["multitask"]["epochs_seen"]["a"]
    assert all(r["weight/a"] == r["weight/b"] == 1.0 for r in rows)
    png = training_curves_plot(tmp_path / "run" / "train_log.jsonl", tmp_path / "curves.png")
    assert png is not None and png.stat().st_size > 2000  # with the task weights' panel


def test_a_new_head_on_a_frozen_encoder_leaves_the_old_heads_as_they_were(pretrained, tmp_path):
    first = tmp_path / "first"
    recipe = two_tasks(pretrained, first, sampler="round_robin")
    recipe["finetune"]["max_steps"] = 6
    run_finetune(load_finetune_recipe(None, _flat(recipe)))
    texts = [json.loads(line)["text"] for line in (SAMPLE / "test.jsonl").read_text().splitlines()[:12]]
    before = sora.load(first).predict(texts)

    second = tmp_path / "second"
    run_finetune(load_finetune_recipe(None, {**FT_BASE, "finetune.init": str(first / "model"), "output": str(second),
                                             "finetune.freeze_encoder": True, "finetune.max_steps": 5,
                                             "tasks": [{"name": "c", "data": str(SAMPLE), "labels_per_class": 8}]}))
    old, new = load_file(str(first / "model" / "model.safetensors")), load_file(str(second / "model" /
                                                                                    "model.safetensors"))
    assert all(torch.equal(old[k], new[k]) for k in old if not k.startswith("heads.c."))
    assert any(k.startswith("heads.c.") for k in new)
    after = sora.load(second).predict(texts)
    for b, a in zip(before, after, strict=True):
        assert set(a) == {"a", "b", "c"}
        assert {k: b[k] for k in ("a", "b")} == {k: a[k] for k in ("a", "b")}
    meta = json.loads((second / "model" / "config.json").read_text())["metadata"]
    assert set(meta["tasks_validation"]) == {"a", "b", "c"}
    assert meta["tasks_validation"]["a"] == json.loads((first / "model" / "config.json").read_text())[
        "metadata"]["tasks_validation"]["a"]


def six_task_data(tmp: Path) -> Path:
    """The sample's texts with two marked entities each, labelled six ways (five kinds of head)."""
    tmp.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        rows = []
        for line in (SAMPLE / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            words = row["text"].split()
            if len(words) < 4:
                continue
            words[1], words[-2] = f"<e1>{words[1]}</e1>", f"<e2>{words[-2]}</e2>"
            n = len(words)
            rows.append({"text": " ".join(words), "topic": row["label"], "length": "long" if n > 14 else "short",
                         "tags": ",".join(t for t, hit in (("money", "$" in row["text"] or "price" in row["text"]),
                                                           ("order", "order" in row["text"]), ("many", n > 12))
                                          if hit) or "none",
                         "words": n / 10, "relation": "near" if n < 12 else "far",
                         "first": row["text"][0].lower() in "aeiou" and "vowel" or "consonant"})
        write_jsonl(tmp / f"{split}.jsonl", rows)
        if split == "validation":
            write_jsonl(tmp / "test.jsonl", rows)
    return tmp


def test_one_checkpoint_with_six_heads_answers_them_all_in_one_call_and_one_request(pretrained, tmp_path):
    data = six_task_data(tmp_path / "data")
    tasks = [{"name": "topic", "data": str(data), "label_column": "topic"},
             {"name": "length", "data": str(data), "label_column": "length"},
             {"name": "first", "data": str(data), "label_column": "first", "labels_per_class": 20},
             {"name": "tags", "type": "multilabel", "data": str(data), "label_column": "tags"},
             {"name": "words", "type": "regression", "data": str(data), "label_column": "words"},
             {"name": "relation", "type": "relation", "data": str(data), "label_column": "relation"}]
    out = tmp_path / "run"
    summary = run_finetune(load_finetune_recipe(None, {**FT_BASE, "finetune.init": str(pretrained), "output": str(out),
                                                       "finetune.max_steps": 6, "tasks": tasks,
                                                       "multitask": {"sampler": "temperature"}}))
    assert summary["steps"] == 6
    meta = json.loads((out / "model" / "config.json").read_text())["metadata"]
    assert set(meta["tasks_validation"]) == {t["name"] for t in tasks}
    texts = ["the <e1>invoice</e1> shows a double <e2>charge</e2>", "my <e1>parcel</e1> never <e2>arrived</e2>"]
    rows = sora.load(out).predict(texts)
    assert all(set(r) == {t["name"] for t in tasks} for r in rows)
    topics = {json.loads(line)["label"] for line in (SAMPLE / "train.jsonl").read_text().splitlines()}
    assert {r["topic"]["label"] for r in rows} <= topics and all(isinstance(r["words"]["value"], float) for r in rows)

    evaluated = run([*SORA, "evaluate", str(out), "--attack", "none"]).stdout  # every head on its test split
    for t in tasks:
        assert f"{t['name']} on {data} (36 examples)" in evaluated, evaluated
    assert evaluated.count("report: ") == len(tasks)

    with TestClient(create_app(ServeSettings(checkpoint=str(out / "model")))) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").json()
            time.sleep(0.05)
        resp = client.post("/v1/predict", json={"texts": texts})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert sorted(body["tasks"]) == sorted(t["name"] for t in tasks)
        assert [set(r) for r in body["predictions"]] == [{t["name"] for t in tasks}] * 2
        assert body["predictions"][0]["words"]["value"] == pytest.approx(rows[0]["words"]["value"], abs=1e-4)


TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_two_processes_draw_the_same_tasks_and_pcgrad_is_refused_there(pretrained, tmp_path):
    """Under DDP every process trains the task the sampler draws for the step (so their graphs and logged keys
    agree) on its own batch of it; PCGrad, which writes gradients DDP does not see, stops with one clear line."""
    recipe = two_tasks(pretrained, tmp_path / "ddp", sampler="temperature", weighting="uncertainty")
    recipe["finetune"]["max_steps"] = 6
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    launch = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "sora.cli", "finetune", str(path)]
    run([*launch, "-o", str(tmp_path / "ddp")])
    sampler = build_sampler("temperature", {"a": 360, "b": 20}, seed=13, total_steps=6)
    steps = [r for r in read_log(tmp_path / "ddp") if "grad_norm" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert [[t for t in ("a", "b") if t in r] for r in steps] == [sampler.tasks_at(s) for s in range(6)]

    recipe["multitask"] = {"sampler": "temperature", "weighting": "pcgrad"}
    path.write_text(yaml.safe_dump(recipe))
    refused = run([*launch, "-o", str(tmp_path / "pcgrad")], check=False)
    assert refused.returncode != 0 and "computes gradients itself, which DDP does not" in refused.stderr


def test_the_default_schedule_gives_each_task_of_a_mix_about_its_own_steps():
    """At 64 labels per class one task alone trains 3 epochs within 30-90 steps; six tasks drawn one a step share
    the steps, so the bounds scale by 6 (180-540) and 3 epochs of their 144 batches (432) fit."""
    from sora.config import FinetuneConfig
    from sora.train.finetune import plan_steps

    assert plan_steps(FinetuneConfig(), 144, 64)[0] == 90
    steps, every, schedule = plan_steps(FinetuneConfig(), 144, 64, shares=6)
    assert schedule == "some-label" and steps == 432 and steps % every == 0
    assert plan_steps(FinetuneConfig(), 10, 64, shares=6)[0] == 180


def test_a_tasks_report_plots_its_own_validation_series_of_a_multi_task_log(tmp_path, monkeypatch):
    """Six tasks' dozen validation metrics each do not fit one legend: a task's report keeps its own series."""
    import warnings

    from sora.evaluate import report

    log = tmp_path / "train_log.jsonl"
    rows = [{"step": s, "loss": 3.0 - s / 10, "weight/a": 1.0, "weight/b": 1.0} for s in range(1, 11)]
    rows += [{"step": s, **{f"val_{t}_{m}": 0.5 + s / 100 for t in "abcdef" for m in ("accuracy", "macro_f1",
                                                                                       "mcc", "ece")}}
             for s in (0, 5, 10)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from matplotlib.axes import Axes

    plotted: list[str] = []
    real_plot = Axes.plot

    def spy(ax, *args, label=None, **kwargs):
        if label:
            plotted.append(label)
        return real_plot(ax, *args, label=label, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert report.training_curves_plot(log, tmp_path / "curves.png", task="b") is not None
    val = [p for p in plotted if p.startswith("val_")]
    assert sorted(val) == ["val_b_accuracy", "val_b_ece", "val_b_macro_f1", "val_b_mcc"]
    assert {"a", "b"} <= set(plotted)  # the task weights' panel
