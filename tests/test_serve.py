"""``sora serve`` end to end, against real server processes on free loopback ports.

One tiny fine-tuned model (a pair head and two single-text heads) is built once; five servers start in
parallel: "open" (no key, small limits), "auth" (SORA_API_KEY set), "slow" (--max-queue 1, a long
--max-wait-ms: 429s and the SIGTERM drain), "workers" (--workers 2, multi-process metrics) and "limits" (a
small body size and time limit: raw sockets that send too much, too slowly, or leave). Also: the batcher on
its own, readiness before the model has loaded (in-process), the Python client and ``sora predict --url``,
schemathesis against /openapi.json, and that the deploy/ manifests parse.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from conftest import write_jsonl
from prometheus_client.parser import text_string_to_metric_families

import sora
from sora.client import SoraClient, SoraClientError
from sora.config import TaskConfig, load_finetune_recipe, load_recipe
from sora.serve.batcher import BatcherClosed, MicroBatcher, QueueFull
from sora.serve.settings import BODY_TIMEOUT_ENV, MAX_BODY_ENV
from sora.train.finetune import run_finetune
from sora.train.pretrain import run_pretrain

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample"
QA = ROOT / "examples" / "qa"
TRANSLATE = ROOT / "examples" / "translate"
SORA = [sys.executable, "-m", "sora.cli"]
LABELS = ["billing", "delivery", "finance_news", "product_review"]
KEY = "test-key-0123456789"
TINY_PRETRAIN = {
    "model.dim": 32, "model.ffn_dim": 64, "model.layers": 1, "model.heads": 2, "model.code_dim": 16,
    "model.decoder_layers": 1, "train.warmup_steps": 2, "tokenizer.vocab_size": 400, "data.batch_size": 8,
    "data.max_length": 32, "train.lr": 3e-3, "train.progress": False, "train.device": "cpu",
}
FT_BASE = {
    "train.warmup_steps": 0, "train.eval_every": 0, "train.save_every": 0, "data.batch_size": 16,
    "data.max_length": 32, "train.progress": False, "train.device": "cpu", "train.lr": 3e-3,
    "finetune.max_steps": 10,
}
METRIC_NAMES = ["sora_requests_total", "sora_request_duration_seconds", "sora_queue_duration_seconds",
                "sora_inference_duration_seconds", "sora_batch_size", "sora_queue_depth", "sora_inflight_requests",
                "sora_model_info"]
TEXTS = ["my parcel has not arrived yet", "the bank raised its dividend", "I was charged twice for one order"]
LIMITS_ENV = {MAX_BODY_ENV: "16384", BODY_TIMEOUT_ENV: "1.5"}  # the "limits" server's, set the way operators do


# ---- the model and the servers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """Pretrain the tiny native model, then fine-tune a pair head and two single-text heads on examples/sample,
    and a question-answering head on examples/qa."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("serve-model")
    pairs = tmp / "pairs"
    pairs.mkdir()
    for split in ("train", "validation"):
        rows = [json.loads(line) for line in (SAMPLE / f"{split}.jsonl").read_text().splitlines()]
        write_jsonl(pairs / f"{split}.jsonl",
                    [{"text": r["text"], "text_b": o["text"], "label": "same" if r["label"] == o["label"] else "other"}
                     for r, o in zip(rows, rows[7:] + rows[:7], strict=True)])
    run_pretrain(load_recipe(None, {**TINY_PRETRAIN, "data.train": str(SAMPLE / "train.jsonl"),
                                    "output": str(tmp / "pre"), "train.max_steps": 30}))
    init = tmp / "pre"
    qa = {"data.max_length": 48, "tasks.0.options": {"stride": 16}, "finetune.epochs": 1}  # a QA head: /v1/answer
    heads = [("answers", QA, "qa", qa), ("same_topic", pairs, "pair", {}), ("topic", SAMPLE, "classification", {}),
             ("topic_copy", SAMPLE, "classification", {})]
    for name, data, kind, extra in heads:
        out = tmp / name
        run_finetune(load_finetune_recipe(None, {**FT_BASE, "finetune.init": str(init), "output": str(out),
                                                 "tasks.0.name": name, "tasks.0.data": str(data),
                                                 "tasks.0.type": kind, **extra}))
        init = out
    torch.set_num_threads(before)
    return init


GEN_VALIDATION = {"chrf": 12.5, "bleu": 3.25, "broken": float("nan"), "note": "not a number"}


@pytest.fixture(scope="module")
def gen_dir(model_dir) -> Path:
    """A seq2seq head (examples/translate, en→de) on the same tiny pretrained model; its checkpoint's
    metadata.tasks_validation set by hand (what fine-tuning writes: {task: {metric: value}})."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = model_dir.parent / "translate"
    run_finetune(load_finetune_recipe(None, {
        **FT_BASE, "finetune.init": str(model_dir.parent / "pre"), "output": str(out), "tasks.0.name": "translate",
        "tasks.0.data": str(TRANSLATE), "tasks.0.type": "seq2seq", "tasks.0.metric": "chrf", "finetune.max_steps": 200,
        "data.batch_size": 8, "finetune.patience": 0, "finetune.head_lr_multiplier": 1.0,
        "finetune.layer_lr_decay": 1.0, "tasks.0.options": {"max_target_length": 16, "label_smoothing": 0.0}}))
    torch.set_num_threads(before)
    config_path = out / "model" / "config.json"
    config = json.loads(config_path.read_text())
    config["metadata"]["tasks_validation"] = {"translate": GEN_VALIDATION}
    config_path.write_text(json.dumps(config))
    return out


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A free loopback port not handed out before in this session: the kernel may offer a port again once the
    probe socket closes, before the server given it has bound it (seen: two servers on one port)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


def start_server(model: Path, log: Path, *args: str, key: str | None = None, multiproc: Path | None = None,
                 extra_env: dict[str, str] | None = None) -> Server:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SORA_API_KEY", "PROMETHEUS_MULTIPROC_DIR", MAX_BODY_ENV, BODY_TIMEOUT_ENV)}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra_env or {})
    if key:
        env["SORA_API_KEY"] = key
    if multiproc:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc)
    port = free_port()
    fh = log.open("w")
    proc = subprocess.Popen([*SORA, "serve", str(model), "--port", str(port), "--threads", "1", *args],
                            stdout=fh, stderr=subprocess.STDOUT, env=env)
    fh.close()
    return Server(proc, f"http://127.0.0.1:{port}", log)


def wait_ready(server: Server, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"server exited with {server.proc.returncode}:\n{server.output()}")
        try:
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"server not ready after {timeout} s:\n{server.output()}")


@pytest.fixture(scope="module")
def servers(model_dir, gen_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve-logs")
    broken = logs / "broken-checkpoint"  # config and tokenizer fine, weights truncated: fails while loading
    shutil.copytree(model_dir / "model", broken)
    (broken / "model.safetensors").write_bytes((model_dir / "model" / "model.safetensors").read_bytes()[:1000])
    started = {
        "open": start_server(model_dir, logs / "open.log", "--max-texts", "8", "--max-chars", "200"),
        "auth": start_server(model_dir, logs / "auth.log", "--model-name", "tickets-v2", "--dtype", "bfloat16",
                             key=KEY),
        "slow": start_server(model_dir, logs / "slow.log", "--max-queue", "1", "--max-wait-ms", "3000"),
        "workers": start_server(model_dir, logs / "workers.log", "--workers", "2", multiproc=logs / "prometheus"),
        "broken": start_server(broken, logs / "broken.log"),
        "limits": start_server(model_dir, logs / "limits.log", extra_env=LIMITS_ENV),
        "gen": start_server(gen_dir, logs / "gen.log", "--max-texts", "4", "--max-chars", "100",
                            "--max-new-tokens", "12", "--max-beam", "3"),
    }
    try:
        for name, server in started.items():
            if name != "broken":
                wait_ready(server)
        yield started
    finally:
        running = [s.proc for s in started.values() if s.proc.poll() is None]
        for proc in running:
            proc.terminate()
        for proc in running:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def url(servers) -> str:
    return servers["open"].url


@pytest.fixture(scope="module")
def local(model_dir):
    return sora.load(model_dir)


def post(url: str, path: str, body, **kw) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=30, **kw)


def metric_values(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def wait_for_metric(url: str, name: str, at_least: float, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while metric_values(httpx.get(url + "/metrics").text).get((name, ()), 0) < at_least:
        assert time.monotonic() < deadline, f"{name} never reached {at_least}"
        time.sleep(0.02)


def requests_counted(url: str, route: str, status: int) -> float:
    return metric_values(httpx.get(url + "/metrics").text).get(
        ("sora_requests_total", (("route", route), ("status", str(status)))), 0.0)


# ---- raw HTTP/1.1 over a socket: what httpx hides (stalls, partial bodies, chunking, the connection's fate) ------


def connect(url: str, timeout: float = 20.0) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def request_head(path: str, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: sora.test", "Content-Type: application/json", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def send_json(sock: socket.socket, path: str, body: bytes) -> None:
    sock.sendall(request_head(path, f"Content-Length: {len(body)}") + body)


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response (uvicorn frames these with Content-Length): status, headers (lower-case names), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        if not got:
            raise ConnectionError(f"connection closed; received {data!r}")
        data += got
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        got = sock.recv(65536)
        if not got:
            break
        body += got
    return int(status_line.split()[1]), headers, body


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# ---- routes -----------------------------------------------------------------------------------------------


def test_health_ready_docs_openapi(url):
    assert httpx.get(url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(url + "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert "swagger" in httpx.get(url + "/docs").text.lower()
    schema = httpx.get(url + "/openapi.json").json()
    assert {"/v1/embed", "/v1/predict", "/v1/models", "/healthz", "/readyz"} <= set(schema["paths"])
    assert "securitySchemes" not in schema.get("components", {})  # no key configured: no auth in the schema


def test_probes_answer_head(url):
    """Load balancers probe with HEAD: same status as GET, no body."""
    for path in ("/healthz", "/readyz"):
        r = httpx.head(url + path)
        assert r.status_code == 200 and r.content == b"", (path, r.status_code)
    schema = httpx.get(url + "/openapi.json").json()
    assert set(schema["paths"]["/healthz"]) == {"get"}  # HEAD is not repeated in the schema


def test_embed_matches_in_process_and_sets_timing_headers(url, local):
    r = post(url, "/v1/embed", {"texts": TEXTS, "normalize": True}, headers={"X-Request-ID": "req-42"})
    assert r.status_code == 200, r.text
    body = r.json()
    vectors = np.array(body["embeddings"])
    assert vectors.shape == (3, local.dim) and body["dim"] == local.dim
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, local.embed(TEXTS, normalize=True), atol=1e-5)
    assert r.headers["X-Request-ID"] == "req-42"
    timing = r.headers["Server-Timing"]
    for part in ("queue;dur=", "inference;dur=", "total;dur="):
        assert part in timing, timing
    assert len(post(url, "/v1/embed", {"texts": ["x"]}).headers["X-Request-ID"]) == 32  # generated when absent


def test_predict_all_heads_subset_and_pairs(url, local):
    r = post(url, "/v1/predict", {"texts": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tasks"] == ["topic", "topic_copy"]  # every single-text head, from one encoder pass
    expected = local.predict(TEXTS, task="topic")
    for row, want in zip(body["predictions"], expected, strict=True):
        assert set(row) == {"topic", "topic_copy"}
        assert row["topic"]["label"] == want["topic"]["label"]
        assert row["topic"]["scores"] == pytest.approx(want["topic"]["scores"], abs=1e-5)
        assert set(row["topic"]["scores"]) == set(LABELS)

    subset = post(url, "/v1/predict", {"texts": TEXTS, "tasks": ["topic_copy"]}).json()
    assert subset["tasks"] == ["topic_copy"] and all(set(p) == {"topic_copy"} for p in subset["predictions"])

    pairs = [[TEXTS[0], TEXTS[1]], [TEXTS[2], TEXTS[2]]]
    r = post(url, "/v1/predict", {"pairs": pairs})
    assert r.status_code == 200, r.text
    want = local.predict([tuple(p) for p in pairs], task="same_topic")
    got = r.json()["predictions"]
    assert [p["same_topic"]["label"] for p in got] == [w["same_topic"]["label"] for w in want]
    assert got[0]["same_topic"]["scores"] == pytest.approx(want[0]["same_topic"]["scores"], abs=1e-5)


def test_predict_errors_are_4xx_with_a_message(url):
    r = post(url, "/v1/predict", {"texts": TEXTS, "tasks": ["sentiment"]})
    assert r.status_code == 404 and "no task 'sentiment'" in r.json()["detail"] and "topic" in r.json()["detail"]
    r = post(url, "/v1/predict", {"texts": TEXTS, "tasks": ["same_topic"]})
    assert r.status_code == 422 and "takes pairs" in r.json()["detail"]
    r = post(url, "/v1/predict", {"pairs": [["a", "b"]], "tasks": ["topic"]})
    assert r.status_code == 422 and "takes texts" in r.json()["detail"]
    assert httpx.get(url + "/v1/nothing-here").status_code == 404


def test_models_card(url, model_dir):
    card = httpx.get(url + "/v1/models").json()["models"][0]
    config = json.loads((model_dir / "model" / "config.json").read_text())
    assert card["name"] == model_dir.name and card["backend"] == "torch"
    assert card["version"].startswith("sha256:") and card["sora_version"] == sora.__version__
    default_pair_mode = TaskConfig.model_fields["pair_mode"].default  # what the fixture's recipes leave it at
    saved = (config["metadata"].get("tasks_validation") or {}).get("topic")  # absent in older checkpoints: None
    assert card["tasks"]["topic"] == {"type": "classification", "pair": False, "pair_mode": default_pair_mode,
                                      "labels": LABELS, "metric": "accuracy",
                                      "validation": pytest.approx(saved) if saved else None}
    assert card["tasks"]["same_topic"]["pair"] is True
    assert card["validation"] == pytest.approx(config["metadata"]["validation"])  # measured accuracy
    assert card["quantization"] is None and card["compression"] is None and card["dtype"] == "float32"
    assert card["limits"]["max_texts"] == 8 and card["limits"]["max_chars"] == 200
    assert card["limits"]["max_new_tokens"] == 128 and card["limits"]["max_beam"] == 8  # the defaults


# ---- /v1/generate (the "gen" server: a seq2seq head, --max-texts 4 --max-chars 100 --max-new-tokens 12
# --max-beam 3) ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_gen(gen_dir):
    return sora.load(gen_dir)


SOURCES = ["my parcel has not arrived", "the phone is broken", "please call me tomorrow", "the shop is open today"]


def test_generate_matches_in_process_with_the_servers_limits_as_defaults(servers, local_gen):
    url = servers["gen"].url
    r = post(url, "/v1/generate", {"texts": SOURCES})
    assert r.status_code == 200, r.text
    body = r.json()
    # Defaults: the head's beam 4 and 16 tokens, held to the server's --max-beam 3 and --max-new-tokens 12.
    assert (body["task"], body["beam"], body["max_new_tokens"], body["model"]) == ("translate", 3, 12, "translate")
    outputs = [o["text"] for o in body["outputs"]]
    assert outputs == local_gen.generate(SOURCES, beam=3, max_length=12)
    assert len(set(outputs)) > 1  # the head reads its source: different sources, different outputs
    r = post(url, "/v1/generate", {"texts": SOURCES[:2], "beam": 1, "max_new_tokens": 3, "task": "translate"})
    assert r.status_code == 200 and r.json()["beam"] == 1, r.text
    short = [o["text"] for o in r.json()["outputs"]]
    assert short == local_gen.generate(SOURCES[:2], beam=1, max_length=3)
    greedy = local_gen.generate(SOURCES[:2], beam=1, max_length=12)
    assert all(len(a) < len(b) for a, b in zip(short, greedy, strict=True)), (short, greedy)  # cut at 3 tokens
    # A generating head answers /v1/predict when named (the head's own decoding), not by default.
    r = post(url, "/v1/predict", {"texts": SOURCES[:2], "tasks": ["translate"]})
    assert r.status_code == 200, r.text
    assert [p["translate"]["text"] for p in r.json()["predictions"]] == local_gen.generate(SOURCES[:2])
    assert post(url, "/v1/predict", {"texts": SOURCES[:2]}).status_code == 404
    with SoraClient(url) as client:
        assert client.generate(SOURCES * 2, beam=3, max_new_tokens=12) == outputs * 2  # 2 requests of max_texts 4
    r = post(url, "/v1/generate", {"texts": [" ", SOURCES[1], ""]})  # blank sources: empty outputs, the rest as usual
    assert r.status_code == 200 and [o["text"] for o in r.json()["outputs"]] == ["", outputs[1], ""], r.text


def _events(lines) -> list[tuple[str, dict]]:
    """(event name, JSON data) of a server-sent event stream ("message" when unnamed)."""
    out, event = [], "message"
    for line in lines:
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            out.append((event, json.loads(line[5:])))
        elif not line:
            event = "message"
    return out


def test_generate_streams_server_sent_events_that_add_up_to_greedy(servers, local_gen):
    url = servers["gen"].url
    texts = [SOURCES[0], " ", SOURCES[1]]
    with httpx.stream("POST", url + "/v1/generate", json={"texts": texts, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r.iter_lines())
    greedy = local_gen.generate(SOURCES[:2], beam=1, max_length=12)  # stream decodes greedily, to --max-new-tokens
    joined = ["", "", ""]
    for event, data in events[:-1]:
        assert event == "message" and data["text"]
        joined[data["index"]] += data["text"]
    assert joined == [greedy[0], "", greedy[1]]
    assert len(events) - 1 > 2  # the outputs came in pieces
    event, done = events[-1]
    assert event == "done" and [o["text"] for o in done["outputs"]] == joined
    assert (done["beam"], done["max_new_tokens"], done["task"]) == (1, 12, "translate")
    with SoraClient(url) as client:
        pieces = list(client.stream(SOURCES * 2, max_new_tokens=5))  # 2 requests of max_texts 4
    short = local_gen.generate(SOURCES * 2, beam=1, max_length=5)
    assert ["".join(p for i, p in pieces if i == k) for k in range(8)] == short
    r = post(url, "/v1/generate", {"texts": ["a"], "stream": True, "beam": 3})
    assert r.status_code == 422 and "beam must be 1" in r.json()["detail"], r.text
    with SoraClient(url) as client, pytest.raises(SoraClientError, match="413"):
        list(client._events("/v1/generate", {"texts": ["a"] * 5, "stream": True}))


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"texts": ["a"] * 5}, 413, "max_texts 4"),
    ({"texts": ["ok", "x" * 101]}, 413, "text 1 is too long"),
    ({"texts": ["a"], "beam": 4}, 422, "max_beam 3"),
    ({"texts": ["a"], "max_new_tokens": 13}, 422, "max_new_tokens 12"),
    ({"texts": ["a"], "task": "summary"}, 404, "no text-generating task 'summary'"),
    ({"texts": ["a"], "beam": 0}, 422, None), ({"texts": ["a"], "beam": None}, 422, None),
    ({"texts": []}, 422, None), ({"texts": ["a"], "extra": 1}, 422, None), ({"texts": "a"}, 422, None),
])
def test_generate_limits_and_errors(servers, body, status, message):
    r = post(servers["gen"].url, "/v1/generate", body)
    assert r.status_code == status, (body, r.status_code, r.text)
    if message:
        assert message in r.json()["detail"], r.text


def test_generate_on_a_model_without_a_generating_head_is_404(url):
    r = post(url, "/v1/generate", {"texts": ["a"]})
    assert r.status_code == 404 and "--task-type seq2seq" in r.json()["detail"]


def test_generate_card_metrics_and_schema(servers):
    url = servers["gen"].url
    card = httpx.get(url + "/v1/models").json()["models"][0]
    assert card["tasks"]["translate"]["type"] == "seq2seq" and card["tasks"]["translate"]["metric"] == "chrf"
    assert card["tasks"]["translate"]["validation"] == {"chrf": 12.5, "bleu": 3.25}  # finite numbers only
    assert card["limits"]["max_new_tokens"] == 12 and card["limits"]["max_beam"] == 3
    post(url, "/v1/generate", {"texts": ["a"] * 5})
    values = metric_values(httpx.get(url + "/metrics").text)
    assert values[("sora_requests_total", (("route", "/v1/generate"), ("status", "200")))] >= 1
    assert values[("sora_requests_total", (("route", "/v1/generate"), ("status", "413")))] >= 1
    assert ("sora_requests_total", (("route", "/v1/generate"), ("status", "429"))) in values
    assert values[("sora_request_duration_seconds_count", (("route", "/v1/generate"),))] >= 1
    request = httpx.get(url + "/openapi.json").json()["components"]["schemas"]["GenerateRequest"]["properties"]
    assert request["beam"]["maximum"] == 3 and request["max_new_tokens"]["maximum"] == 12
    assert request["texts"]["maxItems"] == 4 and request["texts"]["items"]["maxLength"] == 100


async def _generate_at_once(url: str, n: int) -> list[httpx.Response]:
    return await simultaneous(url, "/v1/generate", [{"texts": [SOURCES[i % 4]]} for i in range(n)])


def test_concurrent_generate_requests_share_a_pass(servers, local_gen):
    url = servers["gen"].url
    before = metric_values(httpx.get(url + "/metrics").text)
    responses = asyncio.run(_generate_at_once(url, 8))
    assert [r.status_code for r in responses] == [200] * 8
    alone = local_gen.generate(SOURCES, beam=3, max_length=12)
    assert [r.json()["outputs"][0]["text"] for r in responses] == [alone[i % 4] for i in range(8)]
    after = metric_values(httpx.get(url + "/metrics").text)
    passes = after[("sora_batch_size_count", ())] - before[("sora_batch_size_count", ())]
    assert passes < 8, passes


def test_limits_413(url):
    r = post(url, "/v1/embed", {"texts": ["short"] * 9})
    assert r.status_code == 413 and "max_texts 8" in r.json()["detail"]
    r = post(url, "/v1/predict", {"texts": ["ok", "x" * 201]})
    assert r.status_code == 413 and "text 1 is too long" in r.json()["detail"]
    r = post(url, "/v1/predict", {"pairs": [["ok", "y" * 201]]})
    assert r.status_code == 413


@pytest.mark.parametrize("body", [{}, {"texts": []}, {"texts": "one string"}, {"texts": [1, 2]}, {"texts": None},
                                  {"texts": ["a"], "normalize": "yes"}, {"texts": ["a"], "extra": 1},
                                  {"texts": ["a"], "pairs": [["a", "b"]]}, {"pairs": [["only one"]]},
                                  {"texts": ["a"], "tasks": []}, [1, 2, 3]])
def test_schema_errors_422(url, body):
    path = "/v1/embed" if isinstance(body, dict) and ("normalize" in body or body == {"texts": []}) else "/v1/predict"
    r = post(url, path, body)
    assert r.status_code == 422, (body, r.status_code, r.text)


def test_malformed_json_and_surrogates_422(url):
    r = httpx.post(url + "/v1/embed", content=b'{"texts": ["a"', headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    r = httpx.post(url + "/v1/embed", content=b'{"texts": ["\\ud800"]}', headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text


NON_FINITE_BODIES = [("/v1/embed", b'{"texts": [1e400]}'), ("/v1/embed", b'{"texts": [NaN]}'),
                     ("/v1/embed", b'{"texts": ["a"], "normalize": Infinity}'),
                     ("/v1/embed", b'{"texts": ["a"], "extra": {"deep": [-Infinity]}}'),
                     ("/v1/predict", b'{"pairs": [["a", NaN]]}'), ("/v1/predict", b'[1e400, NaN]'),
                     ("/v1/predict", b'{"texts": ["a"], "pairs": [["a", "b"]], "x": -1e999}')]


def test_non_finite_numbers_get_a_clean_422_on_a_kept_connection(url):
    """json.loads reads NaN, Infinity and 1e400: the 422 must not echo them (JSON cannot carry them; echoing them
    was a 500 that dropped the keep-alive connection)."""
    server_errors = sum(requests_counted(url, r, 500) for r in ("/v1/embed", "/v1/predict"))
    invalid = sum(requests_counted(url, r, 422) for r in ("/v1/embed", "/v1/predict"))

    def strict(constant: str):
        raise AssertionError(f"the answer holds {constant}")

    with connect(url) as sock:
        for path, body in NON_FINITE_BODIES:
            send_json(sock, path, body)
            status, headers, answer = read_response(sock)
            assert status == 422, (body, status, answer)
            detail = json.loads(answer, parse_constant=strict)["detail"]
            assert detail and all({"type", "loc", "msg"} <= set(e) for e in detail), detail
            assert headers.get("connection") != "close"
        send_json(sock, "/v1/embed", b'{"texts": ["still here"]}')  # the same connection still serves
        assert read_response(sock)[0] == 200
    assert sum(requests_counted(url, r, 500) for r in ("/v1/embed", "/v1/predict")) == server_errors
    assert sum(requests_counted(url, r, 422) for r in ("/v1/embed", "/v1/predict")) == invalid + len(NON_FINITE_BODIES)


def test_auth(servers):
    url = servers["auth"].url
    for bad in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        r = post(url, "/v1/embed", {"texts": ["a"]}, headers=bad)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", bad
        assert httpx.get(url + "/v1/models", headers=bad).status_code == 401
    ok = {"Authorization": f"Bearer {KEY}"}
    assert post(url, "/v1/embed", {"texts": ["a"]}, headers=ok).status_code == 200
    assert post(url, "/v1/predict", {"texts": ["a"]}, headers=ok).status_code == 200
    card = httpx.get(url + "/v1/models", headers=ok).json()["models"][0]
    assert card["name"] == "tickets-v2" and card["dtype"] == "bfloat16"  # --model-name, --dtype
    assert 'sora_model_info{backend="torch",model="tickets-v2"' in httpx.get(url + "/metrics").text
    for open_path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):  # stay open for probes and scrapers
        assert httpx.get(url + open_path).status_code == 200, open_path
    assert "HTTPBearer" in httpx.get(url + "/openapi.json").json()["components"]["securitySchemes"]
    assert KEY not in servers["auth"].output()
    with SoraClient(url, api_key=KEY) as client:
        assert client.predict(["a"])[0]["topic"]["label"] in LABELS
    with SoraClient(url) as client, pytest.raises(SoraClientError) as err:
        client.embed(["a"])
    assert err.value.status == 401


async def simultaneous(url: str, path: str, bodies: list) -> list[httpx.Response]:
    """One request per connection, all sent at once on connections opened (and used) beforehand."""
    clients = [httpx.AsyncClient(base_url=url, timeout=30) for _ in bodies]
    try:
        await asyncio.gather(*[c.get("/healthz") for c in clients])
        return await asyncio.gather(*[c.post(path, json=b) for c, b in zip(clients, bodies, strict=True)])
    finally:
        await asyncio.gather(*[c.aclose() for c in clients])


def test_concurrent_requests_share_forward_passes(url):
    before = metric_values(httpx.get(url + "/metrics").text)
    responses = asyncio.run(simultaneous(url, "/v1/predict", [{"texts": [f"text number {i}"]} for i in range(24)]))
    assert [r.status_code for r in responses] == [200] * 24
    after = metric_values(httpx.get(url + "/metrics").text)
    passes = after[("sora_batch_size_count", ())] - before[("sora_batch_size_count", ())]
    texts = after[("sora_batch_size_sum", ())] - before[("sora_batch_size_sum", ())]
    assert texts == 24 and passes < 24, (texts, passes)


def test_metrics(url):
    post(url, "/v1/embed", {"texts": ["a"]})
    post(url, "/v1/embed", {"texts": ["a"] * 9})
    text = httpx.get(url + "/metrics").text
    for name in METRIC_NAMES:
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    values = metric_values(text)
    assert values[("sora_requests_total", (("route", "/v1/embed"), ("status", "200")))] >= 1
    assert values[("sora_requests_total", (("route", "/v1/embed"), ("status", "413")))] >= 1
    assert ("sora_requests_total", (("route", "/v1/predict"), ("status", "429"))) in values  # pre-created at 0
    assert values[("sora_request_duration_seconds_count", (("route", "/v1/embed"),))] >= 2
    for name in ("sora_queue_duration_seconds_count", "sora_inference_duration_seconds_count", "sora_batch_size_count"):
        assert values[(name, ())] > 0, name
    info = [k for k in values if k[0] == "sora_model_info"]
    assert len(info) == 1 and ("tasks", "answers,same_topic,topic,topic_copy") in info[0][1]
    assert values[("sora_inflight_requests", ())] >= 1  # this scrape itself
    assert values[("sora_queue_depth", ())] == 0


# ---- the Python client and `sora predict --url` -----------------------------------------------------------


def test_client(url, local):
    texts = [f"{t} ({i})" for i, t in enumerate(TEXTS * 7)]  # 21 texts: 3 requests of at most max_texts 8
    with SoraClient(url) as client:
        assert client.health() == {"live": True, "ready": True, "status": "ready", "model": local.path.parent.name}
        assert client.models()["limits"]["max_texts"] == 8
        vectors = client.embed(texts)
        assert vectors.shape == (21, local.dim) and vectors.dtype == np.float32
        np.testing.assert_allclose(vectors, local.embed(texts), atol=1e-5)
        rows = client.predict(texts, tasks="topic")
        assert [r["topic"]["label"] for r in rows] == [r["topic"]["label"] for r in local.predict(texts, "topic")]
        assert set(client.predict([("a", "b")])[0]) == {"same_topic"}
        assert client.predict([]) == []
        with pytest.raises(SoraClientError) as err:
            client.predict(texts, tasks=["nope"])
        assert err.value.status == 404 and "no task 'nope'" in str(err.value)
        with pytest.raises(SoraClientError, match="too long"):
            client.embed(["z" * 300])
    with SoraClient("http://127.0.0.1:9") as client, pytest.raises(SoraClientError, match="cannot reach"):
        client.models()


def test_client_retries_429_honoring_retry_after():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        if len(calls) < 3:
            return httpx.Response(429, headers={"Retry-After": "0.2"}, json={"detail": "busy"})
        return httpx.Response(200, json={"predictions": [{"t": {"value": 1.0}}], "model": "m", "tasks": ["t"]})

    client = SoraClient("http://sora.test", transport=httpx.MockTransport(handler), batch_size=8)
    client._card = {"limits": {"max_texts": 8}}
    assert client.predict(["a"]) == [{"t": {"value": 1.0}}]
    assert len(calls) == 3 and calls[2] - calls[0] >= 0.38

    always = SoraClient("http://sora.test", max_retries=2, transport=httpx.MockTransport(
        lambda r: httpx.Response(429, headers={"Retry-After": "0"}, json={"detail": "busy"})))
    always._card = {"limits": {"max_texts": 8}}
    with pytest.raises(SoraClientError) as err:
        always.embed(["a"])
    assert err.value.status == 429 and "busy" in str(err.value)


def test_cli_predict_url(url, local, tmp_path, capsys, monkeypatch):
    from sora import cli as sora_cli

    out = tmp_path / "preds.jsonl"
    monkeypatch.setattr(sys, "argv", ["sora", "predict", "ignored", str(SAMPLE / "test.jsonl"), "-o", str(out),
                                      "--url", url, "--batch-size", "16", "--task", "topic"])
    try:
        sora_cli.main()
    except SystemExit as exc:
        pytest.fail(f"exit {exc.code}: {capsys.readouterr().err}")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    texts = [r["text"] for r in rows]
    assert len(rows) == 40 and all(set(r["predictions"]) == {"topic"} for r in rows)
    want = local.predict(texts, task="topic")
    assert [r["predictions"]["topic"]["label"] for r in rows] == [w["topic"]["label"] for w in want]
    assert "40 predictions" in capsys.readouterr().out


# ---- schemathesis -------------------------------------------------------------------------------------------


# Schemathesis (through requests) never writes NaN or Infinity; this hook sends them. Every other negative case
# with a JSON object body gets one of its values replaced by a non-finite number and goes out as raw bytes.
NON_FINITE_HOOK = """
import json
import schemathesis

TOKENS = ["NaN", "Infinity", "-Infinity", "1e400"]
seen = 0


@schemathesis.hook
def map_case(context, case):
    global seen
    body = case.body
    if not (case.meta and case.meta.generation.mode.is_negative and isinstance(body, dict) and body):
        return case
    seen += 1
    if seen % 2:
        return case
    key = sorted(body)[seen // 2 % len(body)]
    text = json.dumps({**body, key: "@non-finite@"}).replace('"@non-finite@"', TOKENS[seen // 2 % len(TOKENS)])
    case.body = text.encode()
    with open("non-finite.log", "a") as log:
        log.write(text + "\\n")
    return case
"""


def test_schemathesis_finds_no_server_errors(url, servers, tmp_path):
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if st is None:
        pytest.fail("schemathesis is not installed (pip install -c constraints.txt -e '.[dev]')")
    # The request schemas carry this server's limits (maxItems = max_texts, maxLength = max_chars); going past
    # them is answered 413, which schemathesis's default list of rejections lacks.
    config = tmp_path / "schemathesis.toml"
    config.write_text("[checks.negative_data_rejection]\n"
                      "expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]\n")
    (tmp_path / "non_finite_hook.py").write_text(NON_FINITE_HOOK)
    # The "open" model generates nothing (/v1/generate: always 404, which schemathesis warns of): the "gen" server's
    # schema is run for that route below.
    proc = subprocess.run([st, "--config-file", str(config), "run", f"{url}/openapi.json", "--max-examples", "20",
                           "--exclude-path", "/v1/generate", "--workers", "1", "--seed", "7", "--checks", "all",
                           "--generation-database", "none", "--no-color"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "SCHEMATHESIS_HOOKS": str(tmp_path / "non_finite_hook.py")})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "No issues found" in proc.stdout, proc.stdout[-4000:]
    # /v1/generate against a model that generates (the "open" model has no such head: only its 404s there).
    gen = subprocess.run([st, "--config-file", str(config), "run", f"{servers['gen'].url}/openapi.json",
                          "--include-path", "/v1/generate", "--max-examples", "20", "--workers", "1", "--seed", "7",
                          "--checks", "all", "--generation-database", "none", "--no-color"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert gen.returncode == 0 and "No issues found" in gen.stdout, gen.stdout[-4000:] + gen.stderr[-2000:]
    sent = (tmp_path / "non-finite.log").read_text().splitlines()
    assert len(sent) >= 5 and all(any(token in line for line in sent) for token in ("NaN", "Infinity", "1e400")), sent


# ---- back-pressure and shutdown (the "slow" server: --max-queue 1 --max-wait-ms 3000) -------------------------


def test_full_queue_answers_429_with_retry_after(servers):
    responses = asyncio.run(simultaneous(servers["slow"].url, "/v1/embed", [{"texts": [f"t{i}"]} for i in range(32)]))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and codes.count(200) >= 1 and codes.count(429) >= 1, codes
    busy = next(r for r in responses if r.status_code == 429)
    assert int(busy.headers["Retry-After"]) >= 1 and "retry after" in busy.json()["detail"]


def test_a_full_queue_refuses_before_parsing_the_body(servers):
    """With the queue full, a request gets its 429 before its body is parsed (or its texts tokenised): a body
    that does not even parse is answered 429, not 422."""
    server = servers["slow"]
    held = connect(server.url)  # a batched request still uploading: the batcher waits for it (--max-wait-ms)
    held.sendall(request_head("/v1/embed", "Content-Length: 100") + b'{"tex')
    wait_for_metric(server.url, "sora_inflight_requests", 2)
    result: dict = {}
    first = threading.Thread(target=lambda: result.update(r=post(server.url, "/v1/embed", {"texts": ["first"]})))
    first.start()
    try:
        wait_for_metric(server.url, "sora_queue_depth", 1)  # the only place (--max-queue 1) is taken
        for body in (b'{"texts": [', b'{"texts": 5}', b'{"texts": ["fine"]}'):
            r = httpx.post(server.url + "/v1/embed", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 429, (body, r.status_code, r.text)
            assert int(r.headers["Retry-After"]) >= 1 and "retry after" in r.json()["detail"]
    finally:
        held.close()  # the batcher stops waiting for it
        first.join(30)
    assert result["r"].status_code == 200


def test_sigterm_drains_in_flight_requests_and_exits_0(servers):
    server = servers["slow"]
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"texts": ["held back"]}).encode()
    # A request whose body is still arriving: the server holds it, so the batcher waits (up to --max-wait-ms)
    # for it before running the first request's pass. SIGTERM lands while both are in flight.
    slow = socket.create_connection((host, int(port)))
    slow.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:5])
    wait_for_metric(server.url, "sora_inflight_requests", 2)  # the held request and this scrape
    result: dict = {}
    first = threading.Thread(target=lambda: result.update(r=post(server.url, "/v1/embed", {"texts": ["first"]})))
    first.start()
    wait_for_metric(server.url, "sora_queue_depth", 1)  # the first request waits in the batcher
    assert first.is_alive()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    slow.sendall(body[5:])
    reply = b""
    slow.settimeout(20)
    while b"}" not in reply.split(b"\r\n\r\n", 1)[-1]:
        chunk = slow.recv(65536)
        if not chunk:
            break
        reply += chunk
    slow.close()
    first.join(20)
    # The held request is answered too (429 here: with --max-queue 1 the first request holds the only place).
    assert reply.startswith((b"HTTP/1.1 200", b"HTTP/1.1 429")), reply[:200]
    assert result["r"].status_code == 200 and result["r"].json()["embeddings"]
    assert server.proc.wait(30) == 0, server.output()
    assert "Application shutdown complete" in server.output()


# ---- request bodies: size and time limits (the "limits" server: 16 KiB, 1.5 s, from the environment) ------------


def test_body_limits_come_from_the_environment(servers):
    limits = httpx.get(servers["limits"].url + "/v1/models").json()["models"][0]["limits"]
    assert limits["max_body_bytes"] == 16384 and limits["body_timeout_s"] == 1.5


def test_a_body_over_the_limit_by_content_length_is_refused_before_it_is_sent(servers):
    url = servers["limits"].url
    with connect(url, timeout=5) as sock:
        sock.sendall(request_head("/v1/embed", "Content-Length: 100000000"))  # the head only, not a byte more
        status, headers, body = read_response(sock)  # 413, not 408: refused without waiting for the body
        assert status == 413 and "Content-Length 100000000 > max_body_bytes 16384" in json.loads(body)["detail"]
        assert headers["connection"] == "close" and closed_by_server(sock)  # the rest is never read


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(servers):
    url = servers["limits"].url
    with connect(url, timeout=5) as sock:  # under the limit, in chunks: accepted
        text = json.dumps({"texts": ["chunked but small"]}).encode()
        sock.sendall(request_head("/v1/embed", "Transfer-Encoding: chunked") + chunk(text[:9]) + chunk(text[9:])
                     + b"0\r\n\r\n")
        assert read_response(sock)[0] == 200
    with connect(url, timeout=5) as sock:  # 20 KiB so far, no end in sight: refused without waiting for more
        sock.sendall(request_head("/v1/embed", "Transfer-Encoding: chunked") + chunk(b'{"texts": ["')
                     + chunk(b"x" * 4096) * 5)
        status, headers, body = read_response(sock)
        assert status == 413 and "over max_body_bytes 16384" in json.loads(body)["detail"]
        assert headers["connection"] == "close" and closed_by_server(sock)


def test_a_stalled_body_gets_408_and_leaves_the_inflight_gauge(servers):
    url = servers["limits"].url
    timeouts = requests_counted(url, "/v1/embed", 408)
    with connect(url) as sock:
        t0 = time.monotonic()
        sock.sendall(request_head("/v1/embed", "Content-Length: 100") + b'{"texts": ')
        wait_for_metric(url, "sora_inflight_requests", 2)  # the stalled upload and this scrape
        status, headers, body = read_response(sock)
        assert 1.4 < time.monotonic() - t0 < 10.0  # body_timeout_s is 1.5 s, counted from the request's head
        assert status == 408 and "body_timeout_s 1.5" in json.loads(body)["detail"]
        assert headers["connection"] == "close" and closed_by_server(sock)
    values = metric_values(httpx.get(url + "/metrics").text)
    assert values[("sora_inflight_requests", ())] == 1  # only this scrape
    assert requests_counted(url, "/v1/embed", 408) == timeouts + 1


def test_a_client_that_leaves_mid_body_counts_as_499_not_400(servers):
    url = servers["limits"].url
    before = {code: requests_counted(url, "/v1/embed", code) for code in (400, 499)}
    with connect(url) as sock:
        sock.sendall(request_head("/v1/embed", "Content-Length: 100") + b'{"texts": ')
        wait_for_metric(url, "sora_inflight_requests", 2)
    deadline = time.monotonic() + 10
    while requests_counted(url, "/v1/embed", 499) == before[499]:
        assert time.monotonic() < deadline, "the disconnect was never counted as 499"
        time.sleep(0.05)
    assert requests_counted(url, "/v1/embed", 499) == before[499] + 1
    assert requests_counted(url, "/v1/embed", 400) == before[400]


def test_a_stalled_upload_does_not_hold_the_sigterm_drain(servers):
    """SIGTERM with an upload stalled mid-body: the process exits 0 once body_timeout_s (1.5 s) has cut it, not
    after --graceful-timeout (30 s); the stalled client is told 408."""
    server = servers["limits"]
    with connect(server.url) as sock:
        sock.sendall(request_head("/v1/embed", "Content-Length: 100") + b'{"texts": ')
        wait_for_metric(server.url, "sora_inflight_requests", 2)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        # Well under --graceful-timeout's 30 s (a loaded 2-core CI machine took 9 s for what takes 2 s idle).
        assert server.proc.wait(25) == 0, server.output()
        assert time.monotonic() - t0 < 25.0
        assert read_response(sock)[0] == 408


def test_two_workers_share_metrics_and_stop_cleanly(servers):
    """--workers 2 with PROMETHEUS_MULTIPROC_DIR: /metrics (either worker) counts every worker's requests."""
    server = servers["workers"]
    with httpx.Client(base_url=server.url, timeout=30) as client:  # one connection: one worker, most likely
        for _ in range(6):
            assert client.post("/v1/embed", json={"texts": ["a"]}).status_code == 200
    for _ in range(6):  # a new connection each time: the kernel spreads them over the workers
        assert post(server.url, "/v1/embed", {"texts": ["b"]}).status_code == 200
    for _ in range(3):
        values = metric_values(httpx.get(server.url + "/metrics").text)
        assert values[("sora_requests_total", (("route", "/v1/embed"), ("status", "200")))] == 12
        assert values[("sora_batch_size_count", ())] == 12 + 2  # sequential requests + a warm-up per worker
        assert len([k for k in values if k[0] == "sora_model_info"]) == 1
    assert len(list((Path(server.log).parent / "prometheus").glob("counter_*.db"))) == 2
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0, server.output()
    assert server.output().count("ready; auth off") == 2


def test_a_checkpoint_that_cannot_load_stops_the_server_with_one_line(servers):
    server = servers["broken"]
    assert server.proc.wait(60) == 2, server.output()
    lines = server.output().strip().splitlines()
    assert lines[-1].startswith("error: the model could not be served: ") and "Traceback" not in server.output()


def test_cli_serve_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from sora import cli as sora_cli

    cases = [([str(tmp_path / "nowhere")], "checkpoint not found"),
             ([str(tmp_path), "--max-texts", "0"], "--max-texts"),
             ([str(tmp_path), "--backend", "tpu"], "--backend")]
    for args, fragment in cases:
        monkeypatch.setattr(sys, "argv", ["sora", "serve", *args])
        with pytest.raises(SystemExit) as exit_:
            sora_cli.main()
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and err.startswith("error: ") and fragment in err, err
        assert len(err.splitlines()) == 1


# ---- in-process: readiness before load, the batcher, deploy files --------------------------------------------


def test_readyz_is_503_until_the_model_is_loaded(model_dir, monkeypatch):
    from fastapi.testclient import TestClient

    from sora.serve import ServeSettings, create_app
    from sora.serve import state as state_module

    release = threading.Event()
    real_load = state_module.Engine.load

    def held_load(*args, **kwargs):
        release.wait(30)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(state_module.Engine, "load", held_load)
    monkeypatch.delenv("SORA_API_KEY", raising=False)
    with TestClient(create_app(ServeSettings(checkpoint=str(model_dir)))) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert client.head("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
        r = client.post("/v1/embed", json={"texts": ["a"]})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        release.set()
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.post("/v1/embed", json={"texts": ["a"]}).status_code == 200


def test_the_routes_open_without_a_key_are_the_documented_ones(model_dir, monkeypatch):
    """With a key set, every route that answers without it is one meant to be open (probes, metrics, the docs)
    and docs/deploy.md says so."""
    from fastapi.testclient import TestClient

    from sora.serve import ServeSettings, create_app

    monkeypatch.setenv("SORA_API_KEY", KEY)
    app = create_app(ServeSettings(checkpoint=str(model_dir)))
    client = TestClient(app)  # no lifespan: the model is not loaded, and need not be
    open_paths = {route.path for route in app.routes for method in getattr(route, "methods", None) or ()
                  if client.request(method, route.path).status_code != 401}
    assert open_paths == {"/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json"}
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    auth = deploy[deploy.index("**Auth.**"):].split("\n\n", 1)[0]
    assert all(f"`{path}`" in auth for path in open_paths), auth


def _batcher(record: list, **kw) -> MicroBatcher:
    def runner(key, jobs):
        record.append((key, [j.size for j in jobs]))
        return [ValueError("bad") if j.items[0] == "bad" else [f"{key}:{t}" for t in j.items] for j in jobs]

    return MicroBatcher(runner, **kw)


def test_batcher_groups_by_key_and_token_budget():
    async def main():
        record: list = []
        b = _batcher(record, max_batch_tokens=30, max_wait_s=0.2)
        b.start()
        jobs = [b(("text",), [f"a{i}"], 10) for i in range(5)] + [b(("pair", "t"), ["p"], 4)]
        done = await asyncio.gather(*jobs)
        assert [j.future.result() for j in done[:2]] == [["('text',):a0"], ["('text',):a1"]]
        await b.close()
        return record

    record = asyncio.run(main())
    assert record == [(("text",), [1, 1, 1]), (("text",), [1, 1]), (("pair", "t"), [1])]  # 3 × 10 tokens ≤ 30


def test_batcher_bounded_queue_errors_and_drain():
    async def main():
        record: list = []
        b = _batcher(record, max_wait_s=5.0, max_queue=2)
        b.start()
        first = b.submit(("text",), ["x"], 3)
        second = b.submit(("text",), ["bad"], 3)
        with pytest.raises(QueueFull) as full:
            b.submit(("text",), ["y"], 3)
        assert full.value.retry_after >= 1
        t0 = time.perf_counter()
        await b.close()  # drains: no waiting for max_wait once closing
        assert time.perf_counter() - t0 < 2.0
        assert first.future.result() == ["('text',):x"]
        with pytest.raises(ValueError):
            second.future.result()  # a failure stays with its own job
        with pytest.raises(BatcherClosed):
            b.submit(("text",), ["z"], 3)

    asyncio.run(main())


def test_batcher_does_not_wait_when_no_one_else_is_coming():
    async def main():
        b = _batcher([], max_wait_s=10.0, expected=lambda: 1)
        b.start()
        t0 = time.perf_counter()
        job = await b(("text",), ["solo"], 2)
        elapsed = time.perf_counter() - t0
        await b.close()
        return job, elapsed

    job, elapsed = asyncio.run(main())
    assert elapsed < 1.0 and job.queue_s < 1.0


def test_deploy_manifests_parse():
    deploy = ROOT / "deploy"
    docs = []
    for path in sorted((deploy / "k8s").glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d and "kind" in d]
    kinds = {d["kind"] for _, d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ScaledObject"} <= kinds, kinds
    deployment = next(d for _, d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    hpa = next(d for _, d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "sora_inflight_requests"
    assert "sora_inflight_requests" in (deploy / "k8s" / "prometheus-adapter-values.yaml").read_text()
    alerts = yaml.safe_load((deploy / "prometheus" / "alerts.yml").read_text())
    rules = [r for g in alerts["groups"] for r in g["rules"]]
    names = {r.get("alert") for r in rules}
    assert {"SoraErrorBudgetBurnFast", "SoraErrorBudgetBurnSlow", "SoraLatencyBudgetBurn", "SoraQueueSaturated",
            "SoraThrottling", "SoraTargetDown"} <= names, names
    assert all("expr" in r for r in rules)
    dashboard = json.loads((deploy / "grafana" / "sora.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for name in ("sora_requests_total", "sora_request_duration_seconds_bucket", "sora_queue_depth",
                 "sora_batch_size_bucket", "sora_inflight_requests"):
        assert name in exprs, name
    dockerfile = (deploy / "Dockerfile").read_text()
    assert "python:3.11-slim" in dockerfile and "constraints.txt" in dockerfile and "/readyz" in dockerfile


# Custom resources: their schemas come with their operators (prometheus-operator, KEDA), not with Kubernetes.
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}


def test_k8s_manifests_validate_against_the_kubernetes_schema():
    """Strict validation (no unknown fields: a misspelt readinessProbe would be silently ignored by kubectl
    apply) against the API schema of a current Kubernetes release, offline."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    checked = []
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        if path.name == "prometheus-adapter-values.yaml":  # Helm values, not a manifest
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if (doc["apiVersion"], doc["kind"]) in CRDS:
                continue
            kubernetes_validate.validate(doc, version, strict=True)
            checked.append(doc["kind"])
    assert sorted(checked) == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    broken = next(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text()))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinessProb"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessProb"):
        kubernetes_validate.validate(broken, version, strict=True)


def test_alert_rules_load_and_fire_as_their_unit_tests_say():
    """``promtool check rules`` and ``promtool test rules deploy/prometheus/alerts_test.yml``: each alert fires
    on the synthetic series it is meant for (error and latency burn, queue saturation, 429s, target down,
    absent) and stays quiet inside the budget. promtool is Debian's ``prometheus`` package; .ci/run installs
    it, and in CI its absence is a failure, not a skip."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool not found: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    rules = ROOT / "deploy" / "prometheus"
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        done = subprocess.run([promtool, *args], cwd=rules, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SUCCESS" in done.stdout + done.stderr
