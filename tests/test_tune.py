"""``sora tune`` and ``sora label-curve`` on a tiny native model pretrained once on the bundled sample."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from sora.cli import app
from sora.config import load_finetune_recipe, load_recipe
from sora.errors import ConfigError, SoraError
from sora.train.label_curve import parse_sizes, run_label_curve
from sora.train.tune import Objective, run_tune

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    from sora.train.pretrain import run_pretrain

    out = tmp_path_factory.mktemp("tiny") / "pre"
    run_pretrain(load_recipe(None, {
        "output": str(out), "data.train": str(SAMPLE / "train.jsonl"), "data.batch_size": 8, "data.max_length": 32,
        "tokenizer.vocab_size": 400, "model.dim": 32, "model.ffn_dim": 64, "model.layers": 1, "model.heads": 2,
        "model.code_dim": 16, "model.decoder_layers": 1, "train.warmup_steps": 2, "train.max_steps": 8,
        "train.device": "cpu", "train.progress": False}))
    return out


def write_recipe(path: Path, init: Path | None, **finetune) -> Path:
    """A fine-tuning recipe on the sample's four topics, 4 labels per class (16 training rows, 2 steps/epoch)."""
    raw = {"output": str(path.parent / "ft"), "data": {"batch_size": 8, "max_length": 32},
           "finetune": {"init": str(init) if init else None, "epochs": 1, **finetune},
           "tasks": [{"name": "topic", "data": str(SAMPLE), "labels_per_class": 4}]}
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def test_tune_three_trials_writes_study_and_best_recipe(tmp_path, pretrained):
    recipe = write_recipe(tmp_path / "ft.yaml", pretrained)
    out = tmp_path / "study"
    summary = run_tune(recipe, {"finetune.patience": 0, "train.device": "cpu"}, trials=3, timeout=None, out_dir=out,
                       seed=7)

    rows = read_rows(out / "trials.csv")
    assert [r["number"] for r in rows] == ["0", "1", "2"]
    assert {r["state"] for r in rows} <= {"complete", "pruned"} and rows[0]["state"] == "complete"
    assert set(summary["space"]) == {"train.lr", "finetune.epochs", "tasks.0.head_dropout",
                                     "finetune.aux_denoise_weight"}  # the tiny model has a decoder
    for r in rows:
        assert 1e-5 <= float(r["train.lr"]) <= 1e-3 and r["finetune.epochs"] in ("1", "2")
        assert 0 <= float(r["tasks.0.head_dropout"]) <= 0.5 and 0.0 <= float(r["best_validation"]) <= 1.0
        # the starting point, then one per epoch
        assert int(r["evaluations"]) >= 1 and int(r["evaluations"]) <= int(r["finetune.epochs"]) + 1
        assert (Path(r["output"]) / "model").is_dir() or r["state"] == "pruned"
        assert not (Path(r["output"]) / "checkpoints").exists()

    best = summary["best"]
    assert best["value"] == max(float(r["best_validation"]) for r in rows if r["state"] == "complete")
    tuned = load_finetune_recipe(out / "best_recipe.yaml")
    assert tuned.train.lr == pytest.approx(best["params"]["train.lr"])
    assert tuned.train.lr == pytest.approx(float(rows[best["number"]]["train.lr"]))
    assert tuned.finetune.epochs == best["params"]["finetune.epochs"]
    assert tuned.finetune.patience == 0  # --set overrides carry into the best recipe
    assert tuned.output == str(tmp_path / "ft")  # not a trial directory
    assert tuned.train.device == "cpu" and tuned.train.progress  # trials ran without a bar; the recipe keeps it
    # the fine-tuning defaults of the train section survive `train.lr` / `--set train.*`
    assert (tuned.train.eval_every, tuned.train.warmup_steps) == (0, 0)
    assert tuned.data.batch_size == 8

    study = json.loads((out / "study.json").read_text())
    assert study["best"]["number"] == best["number"] and study["metric"] == "accuracy"
    assert study["n_trials"] == 3 and sum(study["states"].values()) == 3
    md = (out / "trials.md").read_text()
    assert md.count("\n| ") == 4 and "best val accuracy" in md  # header and three rows


def scripted_runner(script: list[list[float] | BaseException]):
    """A stand-in for run_finetune: call i reports script[i]'s scores (or raises it)."""
    calls: list[str] = []

    def run(recipe, report=None):
        step = script[len(calls)]
        calls.append(recipe.output)
        if isinstance(step, BaseException):
            raise step
        for i, score in enumerate(step, 1):
            report(i, score)
        return {"output": recipe.output, "validation": {"val_accuracy": max(step)}}

    return run, calls


def test_median_pruner_prunes_and_failures_are_recorded(tmp_path):
    recipe = write_recipe(tmp_path / "ft.yaml", None)
    run, calls = scripted_runner([[0.5, 0.8, 0.9], [0.1, 0.2, 0.3], SoraError("loss became nan at step 3"),
                                  [0.6, 0.85, 0.95]])
    summary = run_tune(recipe, None, trials=4, timeout=None, out_dir=tmp_path / "s", seed=1, runner=run,
                       pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    rows = read_rows(tmp_path / "s" / "trials.csv")
    assert [r["state"] for r in rows] == ["complete", "pruned", "failed", "complete"]
    assert rows[1]["evaluations"] == "1" and float(rows[1]["best_validation"]) == pytest.approx(0.1)
    assert "loss became nan" in rows[2]["error"]
    assert calls == [str(tmp_path / "s" / f"trial-{i:03d}") for i in range(4)]
    assert summary["best"]["number"] == 3 and summary["best"]["value"] == pytest.approx(0.95)
    assert summary["states"] == {"complete": 2, "pruned": 1, "failed": 1}


def test_objective_raises_pruned_on_a_fake_trial(tmp_path):
    class FakeTrial:
        number, params, reports = 5, {}, []

        def suggest_float(self, name, low, high, log=False):
            return low

        def suggest_int(self, name, low, high):
            return high

        def set_user_attr(self, key, value):
            pass

        def report(self, value, step):
            self.reports.append((step, value))

        def should_prune(self):
            return len(self.reports) >= 2

    run, calls = scripted_runner([[0.4, 0.3, 0.9]])
    recipe = load_finetune_recipe(write_recipe(tmp_path / "ft.yaml", None))
    objective = Objective(recipe.model_dump(), {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-3}},
                          tmp_path, run)
    trial = FakeTrial()
    with pytest.raises(optuna.TrialPruned):
        objective(trial)
    assert trial.reports == [(1, 0.4), (2, 0.3)]  # stopped at the second evaluation, the third never ran
    assert calls == [str(tmp_path / "trial-005")]


def test_recipe_errors_stop_the_study(tmp_path):
    recipe = write_recipe(tmp_path / "ft.yaml", None)
    run, calls = scripted_runner([ConfigError("task 'topic': no data"), [0.9]])
    with pytest.raises(ConfigError, match="no data"):
        run_tune(recipe, None, trials=2, timeout=None, out_dir=tmp_path / "s", runner=run)
    assert len(calls) == 1
    run, _ = scripted_runner([SoraError("loss became nan")] * 2)
    with pytest.raises(SoraError, match="no trial completed.*loss became nan"):
        run_tune(recipe, None, trials=2, timeout=None, out_dir=tmp_path / "s2", runner=run)
    assert len(read_rows(tmp_path / "s2" / "trials.csv")) == 2


def test_ctrl_c_ends_the_study_and_keeps_finished_trials(tmp_path):
    recipe = write_recipe(tmp_path / "ft.yaml", None)
    run, _ = scripted_runner([[0.5, 0.6], KeyboardInterrupt(), [0.9]])
    summary = run_tune(recipe, None, trials=3, timeout=None, out_dir=tmp_path / "s", runner=run)
    assert summary["interrupted"] and summary["n_trials"] == 1 and summary["best"]["value"] == pytest.approx(0.6)
    assert len(read_rows(tmp_path / "s" / "trials.csv")) == 1 and (tmp_path / "s" / "best_recipe.yaml").is_file()


def test_label_curve_two_sizes(tmp_path, pretrained):
    recipe = write_recipe(tmp_path / "ft.yaml", pretrained, patience=0)
    out = tmp_path / "curve"
    result = run_label_curve(recipe, {"train.device": "cpu"}, sizes=[2, 4], seeds=1, out_dir=out)

    data = json.loads((out / "label_curve.json").read_text())
    assert data == json.loads(json.dumps(result))
    assert [s["size"] for s in data["summary"]] == ["2", "4"]
    assert [s["train_examples"] for s in data["summary"]] == [8, 16]  # four classes
    assert all(0.0 <= s["mean"] <= 1.0 and s["std"] == 0.0 and s["n"] == 1 for s in data["summary"])
    assert len(data["points"]) == 2 and data["metric"] == "accuracy"
    png = (out / "label_curve.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE and len(png) > 2000
    assert "| 2 | 8 |" in (out / "label_curve.md").read_text()


def test_parse_sizes():
    assert parse_sizes("8, 16,full,16") == [8, 16, None]
    with pytest.raises(ConfigError, match="'x'"):
        parse_sizes("8,x")


@pytest.mark.parametrize("command", ["tune", "label-curve"])
def test_cli_help(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "--set" in result.output
