"""Task kinds as plug-ins (issue 12): the registry, extractive QA and relation extraction end to end on a tiny
native model (training, evaluation, the Python API and the server)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import ROOT, SAMPLE, write_jsonl
from test_serve import start_server, wait_ready

import sora
from sora.config import load_finetune_recipe, load_recipe
from sora.errors import ConfigError, SoraError
from sora.evaluate.run import evaluate_checkpoint
from sora.models.heads import HeadSpec
from sora.tasks import KINDS, kind_of
from sora.train.finetune import run_finetune
from sora.train.pretrain import run_pretrain

QA_DATA = ROOT / "examples" / "qa"
TINY_PRETRAIN = {
    "model.dim": 32, "model.ffn_dim": 64, "model.layers": 1, "model.heads": 2, "model.code_dim": 16,
    "model.decoder_layers": 1, "train.warmup_steps": 2, "tokenizer.vocab_size": 400, "data.batch_size": 8,
    "data.max_length": 32, "train.lr": 3e-3, "train.progress": False, "train.device": "cpu", "train.max_steps": 10,
}
FT = {"train.progress": False, "train.device": "cpu", "train.lr": 3e-3, "finetune.epochs": 2}
RELATIONS = [("<e1>{a}</e1> is a city in <e2>{b}</e2>.", "located_in(e1,e2)"),
             ("<e2>{b}</e2> has a city called <e1>{a}</e1>.", "located_in(e1,e2)"),
             ("<e1>{b}</e1> contains the city <e2>{a}</e2>.", "located_in(e2,e1)"),
             ("<e1>{a}</e1> and <e2>{b}</e2> were both mentioned.", "Other")]
PLACES = [("Lyon", "France"), ("Osaka", "Japan"), ("Perth", "Australia"), ("Quito", "Ecuador"), ("Porto", "Portugal"),
          ("Oslo", "Norway"), ("Denver", "Colorado"), ("Seoul", "Korea"), ("Dublin", "Ireland"), ("Tallinn", "Estonia")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tasks") / "pre"
    text = out.parent / "text.jsonl"
    rows = [json.loads(line) for line in (QA_DATA / "train.jsonl").read_text().splitlines()]
    write_jsonl(text, [{"text": r["context"]} for r in rows] + [{"text": r["question"]} for r in rows])
    run_pretrain(load_recipe(None, {**TINY_PRETRAIN, "data.train": str(text), "output": str(out)}))
    return out


@pytest.fixture(scope="module")
def qa_model(tiny) -> Path:
    out = tiny.parent / "qa"
    run_finetune(load_finetune_recipe(None, {**FT, "finetune.init": str(tiny), "output": str(out),
                                             "tasks.0.name": "answers", "tasks.0.type": "qa",
                                             "tasks.0.data": str(QA_DATA), "data.max_length": 48,
                                             "tasks.0.options": {"stride": 16}}))
    return out / "model"


@pytest.fixture(scope="module")
def relation_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("relations")
    rows = [{"text": t.format(a=a, b=b), "label": label} for a, b in PLACES for t, label in RELATIONS]
    write_jsonl(d / "train.jsonl", rows[:32])
    write_jsonl(d / "validation.jsonl", rows[32:])
    return d


@pytest.fixture(scope="module")
def relation_model(tiny, relation_data) -> Path:
    out = tiny.parent / "relation"
    run_finetune(load_finetune_recipe(None, {**FT, "finetune.init": str(tiny), "output": str(out),
                                             "tasks.0.name": "rel", "tasks.0.type": "relation",
                                             "tasks.0.data": str(relation_data), "data.max_length": 32}))
    return out / "model"


# ---- the registry -------------------------------------------------------------------------------------------


def test_every_kind_is_registered_under_its_name_and_unknown_types_are_refused():
    assert set(KINDS) == {"classification", "pair", "multilabel", "regression", "relation", "qa", "seq2seq"}
    assert all(kind.name == name for name, kind in KINDS.items())
    with pytest.raises(ConfigError, match="unknown task type 'ner'.*choose from classification"):
        kind_of("ner")


def test_nothing_outside_tasks_branches_on_a_task_kind_name():
    """A new kind is one module plus one registry line: no other module may test a task's type by name."""
    names = "|".join(KINDS)
    pattern = re.compile(rf"""(type|kind)\w*\)?\s*(==|!=|\bin\b|\bnot in\b)\s*[\(\[{{]?\s*["']({names})["']""")
    offenders = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
                 for p in (ROOT / "src" / "sora").rglob("*.py") if "tasks" not in p.parts
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders


def test_a_format_1_head_spec_still_loads():
    """Checkpoints saved before heads recorded what they read and how many outputs they have."""
    old = HeadSpec.model_validate({"type": "pair", "pair": True, "pair_mode": "siamese", "labels": ["a", "b", "c"]})
    assert (old.reads, old.outputs) == ("siamese", 3)
    value = HeadSpec.model_validate({"type": "regression", "labels": None})
    assert (value.reads, value.outputs) == ("code", 1)


# ---- extractive question answering --------------------------------------------------------------------------


def test_qa_trains_and_its_answers_are_exact_spans_of_the_context(qa_model):
    model = sora.load(qa_model)
    spec = model.model.head_specs["answers"]
    assert (spec.type, spec.reads, spec.outputs, spec.options["stride"]) == ("qa", "tokens", 2, 16)
    assert model.max_length == 48  # what it was trained with, not the kind's 384
    meta = model.config["metadata"]["validation"]
    assert {"val_exact_match", "val_f1"} <= set(meta) and 0 <= meta["val_f1"] <= 100
    rows = [json.loads(line) for line in (QA_DATA / "test.jsonl").read_text().splitlines()][:6]
    answers = model.answer([(r["question"], r["context"]) for r in rows])
    for r, a in zip(rows, answers, strict=True):
        assert a["answer"] == r["context"][a["start"]:a["end"]] and a["answer"]
        assert 0 <= a["score"] <= 1
    # Long contexts are read in windows: a question whose context is five copies still gets an exact span.
    long_context = " ".join([rows[0]["context"]] * 5)
    one = model.answer(rows[0]["question"], long_context)
    assert one["answer"] == long_context[one["start"]:one["end"]]
    assert model.answer([(rows[1]["question"], rows[1]["context"])])[0] == answers[1]  # deterministic


def test_qa_bad_input_gets_one_clear_error(qa_model, tmp_path):
    model = sora.load(qa_model)
    with pytest.raises(SoraError, match="an empty context"):
        model.answer("Who wrote in?", "")
    assert model.answer("Who wrote in?", "   ")["answer"] == ""  # blanks: no span to give
    with pytest.raises(SoraError, match="needs its context"):
        model.answer("Who wrote in?")
    bad = tmp_path / "bad"
    bad.mkdir()
    row = {"id": "x", "question": "Who?", "context": "Ana wrote in.",
           "answers": {"text": ["Ana"], "answer_start": [40]}}
    write_jsonl(bad / "test.jsonl", [row])
    with pytest.raises(SoraError, match=r"test.jsonl:1: .*answer_start 40"):
        evaluate_checkpoint(model, str(bad), "test")


def test_qa_evaluation_writes_exact_match_and_f1(qa_model, tmp_path):
    result = evaluate_checkpoint(sora.load(qa_model), str(QA_DATA), "test", out=tmp_path / "report")
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["n"] == 32 and {"exact_match", "f1"} <= set(metrics) and metrics["f1"] >= metrics["exact_match"]
    assert result["metrics"]["f1"] == metrics["f1"]
    assert "| exact_match |" in (tmp_path / "report" / "report.md").read_text()


def test_qa_loss_prefers_the_labelled_span():
    kind = kind_of("qa")
    t = 6
    good = torch.full((1, t, 2), -5.0)
    good[0, 2, 0], good[0, 3, 1] = 5.0, 5.0

    class Model:
        heads = {"q": lambda features: features}
        head_specs = {"q": HeadSpec(type="qa", reads="tokens", outputs=2)}

        def run(self, ids, mask, types=None):
            from sora.models.autoencoder import EncoderOutput

            return EncoderOutput(self.states, mask, self.states.mean(1))

    batch = {"input_ids": torch.zeros(1, t, dtype=torch.long), "attention_mask": torch.ones(1, t, dtype=torch.bool),
             "start_positions": torch.tensor([2]), "end_positions": torch.tensor([3])}
    model = Model()
    model.states = good
    right = kind.loss(model, "q", batch, None)[0]
    model.states = good.flip(1)
    wrong = kind.loss(model, "q", batch, None)[0]
    assert right < 0.01 < wrong


# ---- relation extraction ------------------------------------------------------------------------------------


def test_relation_head_reads_the_entity_starts_and_predicts_marked_texts(relation_model, relation_data):
    model = sora.load(relation_model)
    spec = model.model.head_specs["rel"]
    assert (spec.reads, spec.labels) == ("entities", ["Other", "located_in(e1,e2)", "located_in(e2,e1)"])
    assert "val_macro_f1" in model.config["metadata"]["validation"]
    texts = ["<e1>Nice</e1> is a city in <e2>France</e2>.", "<e1>Japan</e1> contains the city <e2>Kyoto</e2>."]
    rows = model.predict(texts, task="rel")
    assert all(r["rel"]["label"] in spec.labels and abs(sum(r["rel"]["scores"].values()) - 1) < 1e-4 for r in rows)
    # The head reads the marked entities: moving the markers changes what it sees.
    a = model.predict(["<e1>Nice</e1> is a city in <e2>France</e2>."], task="rel")[0]["rel"]["scores"]
    b = model.predict(["Nice is <e1>a</e1> city in France <e2>.</e2>"], task="rel")[0]["rel"]["scores"]
    assert not np.allclose(list(a.values()), list(b.values()), atol=1e-4)
    with pytest.raises(SoraError, match="no entities"):
        model.predict(["Nice is a city in France."], task="rel")
    result = evaluate_checkpoint(model, str(relation_data), "validation", out=relation_model.parent / "eval")
    assert {"macro_f1", "accuracy", "per_relation"} <= set(result["metrics"])


# ---- serving ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def both(qa_model, relation_model, tiny) -> Path:
    """One checkpoint with the QA head and the relation head (fine-tuned one after the other)."""
    out = tiny.parent / "both"
    run_finetune(load_finetune_recipe(None, {**FT, "finetune.init": str(relation_model), "output": str(out),
                                             "tasks.0.name": "answers", "tasks.0.type": "qa", "finetune.epochs": 1,
                                             "tasks.0.data": str(QA_DATA), "data.max_length": 48,
                                             "tasks.0.options": {"stride": 16}}))
    return out / "model"


def test_answer_and_relation_routes(both, tmp_path):
    local = sora.load(both)
    server = start_server(both, tmp_path / "serve.log", "--max-chars", "400")
    try:
        wait_ready(server)
        rows = [json.loads(line) for line in (QA_DATA / "test.jsonl").read_text().splitlines()][:3]
        body = {"questions": [{"question": r["question"], "context": r["context"]} for r in rows]}
        r = httpx.post(server.url + "/v1/answer", json=body, timeout=60)
        assert r.status_code == 200, r.text
        served = r.json()
        assert served["task"] == "answers"
        expected = local.answer([(r["question"], r["context"]) for r in rows])
        assert [a["answer"] for a in served["answers"]] == [a["answer"] for a in expected]
        assert all(abs(a["score"] - e["score"]) < 1e-4 for a, e in zip(served["answers"], expected, strict=True))
        bad = [({"questions": [{"question": "Who?"}]}, 422), ({"questions": []}, 422),
               ({"questions": [{"question": "Who?", "context": "x" * 401}]}, 413),
               ({"questions": [{"question": "Who?", "context": "Ana."}], "task": "rel"}, 404)]
        for payload, status in bad:
            assert httpx.post(server.url + "/v1/answer", json=payload, timeout=30).status_code == status, payload
        r = httpx.post(server.url + "/v1/predict", json={"texts": ["<e1>Nice</e1> is a city in <e2>France</e2>."]},
                       timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["rel"]["label"] == local.predict(
            ["<e1>Nice</e1> is a city in <e2>France</e2>."], task="rel")[0]["rel"]["label"]
        assert httpx.post(server.url + "/v1/predict", json={"texts": ["no markers"]}, timeout=30).status_code == 422
        r = httpx.post(server.url + "/v1/predict", json={"pairs": [["Who?", "Ana."]], "tasks": ["answers"]}, timeout=30)
        assert r.status_code == 422 and "/v1/answer" in r.text
        cards = httpx.get(server.url + "/v1/models", timeout=30).json()["models"][0]["tasks"]
        assert cards["answers"]["type"] == "qa" and cards["rel"]["type"] == "relation"
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=30)


def test_sample_dir_still_trains_classification(tiny, tmp_path):
    """The classic kinds through the same registry (a smoke check next to the new kinds)."""
    out = tmp_path / "cls"
    summary = run_finetune(load_finetune_recipe(None, {**FT, "finetune.init": str(tiny), "output": str(out),
                                                       "tasks.0.data": str(SAMPLE), "data.max_length": 32,
                                                       "finetune.epochs": 1}))
    assert "val_accuracy" in summary["validation"]


@pytest.mark.parametrize("method", ["onnx", "int8", "prune"])
def test_qa_head_survives_compression_with_its_f1_gate(qa_model, tmp_path, method):
    """The QA head reads every token state: the ONNX graph exports them, int8 and pruning keep the head, and the
    gate measures F1 (percentage points) through the path that is served."""
    from sora.compress import compress

    out = tmp_path / method
    result = compress(qa_model, out, method, warn_only=True, latency_texts=8, latency_repeats=1)
    assert "f1" in str(result["validation_before"]) and result["accuracy_drop_points"] < 100
    rows = [json.loads(line) for line in (QA_DATA / "test.jsonl").read_text().splitlines()][:4]
    small = sora.load(out)
    assert (small.onnx is not None) == (method == "onnx")
    for r, a in zip(rows, small.answer([(r["question"], r["context"]) for r in rows]), strict=True):
        assert a["answer"] == r["context"][a["start"]:a["end"]]
    if method == "onnx":  # fp32 ONNX: the same answers as PyTorch
        torch_answers = sora.load(qa_model).answer([(r["question"], r["context"]) for r in rows])
        assert [a["answer"] for a in small.answer([(r["question"], r["context"]) for r in rows])] == \
            [a["answer"] for a in torch_answers]


def test_sora_predict_answers_a_jsonl_of_questions(qa_model, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "answers.jsonl"
    cmd = [sys.executable, "-m", "sora.cli", "predict", str(qa_model), str(QA_DATA / "test.jsonl"), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 32
    for r in rows:
        a = r["predictions"]["answers"]
        assert a["answer"] == r["context"][a["start"]:a["end"]]
    missing = tmp_path / "q.jsonl"
    write_jsonl(missing, [{"question": "Who wrote in?", "text": "Ana wrote in."}])
    proc = subprocess.run([*cmd[:5], str(missing), "-o", str(tmp_path / "x.jsonl")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "q.jsonl:1: no column 'context'" in proc.stderr, proc.stderr
