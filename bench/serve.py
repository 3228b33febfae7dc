"""Serving throughput: in-process batched ``Sora.predict`` vs ``sora serve`` over HTTP vs a naive server.

- in-process: ``Sora.predict`` on batches of 32 texts, in this process (texts/s): the ceiling; and on one
  text at a time, which bounds what batching can gain on this machine (HTTP / baseline ≤ batch 32 / batch 1).
- HTTP: ``sora serve`` (micro-batching) at 1, 8, 32 and 64 concurrent clients, one text per request.
- baseline: ``bench/baseline_server.py`` (plain FastAPI, one forward pass per request), same load.
- HTTP int8 (unless --no-int8): ``sora serve`` of the same model after ``sora compress --method onnx-int8``
  (ONNX Runtime backend), same load: what a user deploys after compressing. The headline ``http_per_s`` is
  the uncompressed PyTorch model, the same one the baseline runs.
- HTTP bf16 (where the CPU computes bfloat16 natively, AVX-512 BF16 / AMX, or on a GPU; unless --no-bf16):
  ``sora serve --dtype bfloat16`` of the same model, and the baseline with the model in bfloat16 too, so the
  batching gain and the precision gain show apart; in-process batch 32 / batch 1 in bfloat16 as well.
- soak: 10,000 requests (1,000 with --quick) at 32 clients against ``sora serve``; the server's RSS at the
  start, after every 1,000 requests and at the end.

The load generator is this process: one asyncio event loop, one ``httpx.AsyncClient`` (one keep-alive
connection) per client, each client sending its next request when the previous answer arrives (closed loop),
loopback only, each level bounded by a duration and a request count. It shares the machine's cores with the
server, as a sidecar or a client on the same host would. Model: all-MiniLM-L6-v2 with a classification head
fine-tuned for a few steps on examples/sample (accuracy is beside the point here). Texts: examples/sample.

    .venv/bin/python bench/serve.py            # ~8 min; bench/results/serve.json
    .venv/bin/python bench/serve.py --quick    # < 2 min; bench/results/serve.quick.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from common import (
    REPO,
    add_common_args,
    command_line,
    load_average,
    machine_info,
    offline,
    resolve_device,
    write_result,
)

SAMPLE = REPO / "examples" / "sample"
MODEL_DIR = REPO / "runs" / "bench-serve" / "minilm-sample"
LEVELS = (1, 8, 32, 64)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sample_texts() -> list[str]:
    texts = []
    for split in ("train", "validation", "test"):
        texts += [json.loads(line)["text"] for line in (SAMPLE / f"{split}.jsonl").read_text().splitlines()]
    return texts


def prepare_int8(model_dir: Path) -> Path:
    """``sora compress --method onnx-int8`` of the bench model (cached). The 5-step model's accuracy means
    nothing, so the accuracy gate only warns."""
    out = model_dir.parent / "minilm-sample-onnx-int8"
    if (out / "config.json").is_file() or (out / "model" / "config.json").is_file():
        return out
    log(f"compressing to ONNX int8 -> {out}")
    subprocess.run([sys.executable, "-m", "sora.cli", "compress", str(model_dir), "-o", str(out), "--method",
                    "onnx-int8", "--warn-only", "--data", str(SAMPLE)], check=True, cwd=REPO)
    return out


def prepare_model() -> Path:
    """MiniLM + a 4-label head, fine-tuned for 5 steps on examples/sample (cached under runs/)."""
    if (MODEL_DIR / "model" / "config.json").is_file():
        return MODEL_DIR
    from sora.config import load_finetune_recipe
    from sora.train.finetune import run_finetune

    log(f"fine-tuning all-MiniLM-L6-v2 for 5 steps -> {MODEL_DIR}")
    run_finetune(load_finetune_recipe(None, {
        "finetune.init": "all-MiniLM-L6-v2", "tasks.0.data": str(SAMPLE), "finetune.max_steps": 5,
        "output": str(MODEL_DIR), "train.progress": False, "train.device": "cpu", "train.warmup_steps": 0,
        "train.eval_every": 0, "train.save_every": 0, "data.batch_size": 16, "data.max_length": 128}))
    return MODEL_DIR


class InProcess:
    """``Sora.predict`` on batches of 32 texts in this process: the ceiling for the same work over HTTP."""

    def __init__(self, model_dir: Path, texts: list[str], device: str = "cpu", dtype: str | None = None):
        import sora

        self.model = sora.load(model_dir, device=device, dtype=dtype)
        self.batches = [texts[i : i + 32] for i in range(0, len(texts) - 31, 32)]
        self.model.predict(self.batches[0])
        self.i = 0

    def run(self, seconds: float, batch: int = 32) -> dict[str, Any]:
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            texts = self.batches[self.i % len(self.batches)][:batch]
            self.model.predict(texts, batch_size=batch)
            done += len(texts)
            self.i += 1
        return {"ok": done, "seconds": time.perf_counter() - t0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, log_path: Path, timeout: float = 180) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "SORA_API_KEY"}
    with log_path.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{log_path.name}: server exited {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{cmd} not ready after {timeout} s")


def stop(proc: subprocess.Popen) -> int:
    proc.terminate()
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return -9


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


async def drive(url: str, clients: int, seconds: float, max_requests: int, texts: list[str],
                on_done=None) -> dict[str, Any]:
    """Closed-loop load: ``clients`` connections, each sending one text per request until the time or the
    request budget runs out. One ``httpx.AsyncClient`` per connection: a shared pool costs the generator
    twice the CPU per request at 64 connections (its pool bookkeeping), which this machine cannot spare."""
    latencies: list[float] = []
    errors: Counter = Counter()
    sent = 0
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    pool = [httpx.AsyncClient(base_url=url, timeout=120, limits=limits) for _ in range(clients)]
    stop_at = time.perf_counter() + seconds

    async def one_client(k: int, client: httpx.AsyncClient) -> None:
        nonlocal sent
        i = k
        while time.perf_counter() < stop_at and sent < max_requests:
            sent += 1
            body = {"texts": [texts[i % len(texts)]]}
            i += clients
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/predict", json=body)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[str(r.status_code)] += 1
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] += 1
            if on_done is not None:
                on_done(len(latencies) + sum(errors.values()))

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*[one_client(k, c) for k, c in enumerate(pool)])
    finally:
        elapsed = time.perf_counter() - t0
        for c in pool:
            await c.aclose()
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {"clients": clients, "requests": sent, "ok": len(latencies), "errors": dict(errors),
            "seconds": elapsed, "per_s": round(len(latencies) / elapsed, 1), "latencies": latencies,
            "p99_ms": round(float(np.percentile(lat, 99)), 2)}


def batch_stats(url: str) -> tuple[float, float]:
    """(forward passes, texts) so far, from the server's /metrics."""
    count = total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("sora_batch_size_count"):
            count = float(line.split()[-1])
        elif line.startswith("sora_batch_size_sum"):
            total = float(line.split()[-1])
    return count, total


class Tally:
    """One configuration measured over several rounds: totals, pooled latencies."""

    def __init__(self) -> None:
        self.ok = 0
        self.seconds = 0.0
        self.errors: Counter = Counter()
        self.latencies: list[float] = []
        self.rounds: list[float] = []
        self.passes = self.texts = 0.0

    def add(self, r: dict[str, Any]) -> None:
        self.ok += r["ok"]
        self.seconds += r["seconds"]
        self.errors.update(r.get("errors", {}))
        self.latencies += r.get("latencies", [])
        self.rounds.append(round(r["ok"] / r["seconds"], 1))

    def summary(self) -> dict[str, Any]:
        lat = np.array(self.latencies) * 1000 if self.latencies else np.array([float("nan")])
        out = {"per_s": round(self.ok / self.seconds, 1), "ok": self.ok, "seconds": round(self.seconds, 1),
               "errors": dict(self.errors), "per_round_per_s": self.rounds}
        if self.latencies:
            out.update({f"p{q}_ms": round(float(np.percentile(lat, q)), 2) for q in (50, 95, 99)})
        if self.passes:
            out["mean_batch"] = round(self.texts / self.passes, 2)
        return out


def measure(url: str, clients: int, seconds: float, max_requests: int, texts: list[str], tally: Tally,
            sora_metrics: bool) -> None:
    before = batch_stats(url) if sora_metrics else None
    tally.add(asyncio.run(drive(url, clients, seconds, max_requests, texts)))
    if before is not None:
        after = batch_stats(url)
        tally.passes += after[0] - before[0]
        tally.texts += after[1] - before[1]


def soak(url: str, pid: int, texts: list[str], requests: int, clients: int, max_seconds: float) -> dict[str, Any]:
    samples = [{"requests": 0, "rss_mb": rss_mb(pid)}]

    def on_done(n: int) -> None:
        if n % 1000 == 0 and n > samples[-1]["requests"]:
            samples.append({"requests": n, "rss_mb": rss_mb(pid)})

    r = asyncio.run(drive(url, clients, max_seconds, requests, texts, on_done))
    time.sleep(0.5)
    samples.append({"requests": r["ok"] + sum(r["errors"].values()), "rss_mb": rss_mb(pid), "end": True})
    rss = [s["rss_mb"] for s in samples]
    after_first = [s["rss_mb"] for s in samples if s["requests"] >= 1000] or rss
    log(f"soak: {r['ok']} ok, errors {r['errors'] or 0}, RSS {rss[0]} -> {rss[-1]} MB "
        f"(after the first 1000: {min(after_first)}..{max(after_first)} MB)")
    return {"requests": r["requests"], "ok": r["ok"], "errors": r["errors"], "clients": clients,
            "per_s": r["per_s"], "p99_ms": r["p99_ms"], "rss_mb": samples,
            "rss_growth_mb": round(rss[-1] - rss[0], 1),
            "rss_growth_after_first_1000_mb": round(max(after_first) - min(after_first), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--rounds", type=int, default=None, help="measurement rounds (default 6; quick 1)")
    parser.add_argument("--seconds", type=float, default=None, help="per configuration and round (default 5; quick 3)")
    parser.add_argument("--soak-requests", type=int, default=None, help="default 10000; quick 1000")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="sora serve --max-wait-ms")
    parser.add_argument("--threads", type=int, default=None, help="torch threads everywhere (default: cores)")
    parser.add_argument("--no-int8", dest="int8", action="store_false", help="skip the ONNX int8 server")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the bfloat16 servers")
    args = parser.parse_args()
    offline()
    rounds = args.rounds or (1 if args.quick else 6)
    seconds = args.seconds or (3.0 if args.quick else 5.0)
    soak_n = args.soak_requests or (1000 if args.quick else 10000)
    device = resolve_device(args.device)  # cuda: every server and the in-process runs on the GPU
    if device.type == "cuda":
        args.int8 = False  # ONNX int8 is a CPU deployment
    from sora.compress.runtime import native

    if args.bf16 and not native("bfloat16", device):
        log("bfloat16 is not native on this machine: no bf16 servers")
        args.bf16 = False
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the servers' torch threads
    max_requests = 50_000
    t_start = time.perf_counter()
    load_before = load_average()

    model_dir = prepare_model()
    texts = sample_texts()
    logs = REPO / "runs" / "bench-serve"
    py = sys.executable

    def launch(name: str, cmd: list[str]) -> tuple[subprocess.Popen, str]:
        url = f"http://127.0.0.1:{free_port()}"
        return start([*cmd, "--port", url.rsplit(":", 1)[1]], url, logs / f"{name.replace('_', '-')}.log"), url

    def sora_serve(checkpoint: Path, *extra: str) -> list[str]:
        return [py, "-m", "sora.cli", "serve", str(checkpoint), "--max-wait-ms", str(args.max_wait_ms), "--threads",
                str(threads), "--device", str(device), *extra]

    def baseline_server(*extra: str) -> list[str]:
        return [py, str(REPO / "bench" / "baseline_server.py"), str(model_dir), "--device", str(device), *extra]

    server, url = launch("sora_serve", sora_serve(model_dir))
    baseline, base_url = launch("baseline", baseline_server())
    servers = [("sora", url), ("baseline", base_url)]
    int8 = None
    if args.int8:
        int8, int8_url = launch("sora_serve_int8", sora_serve(prepare_int8(model_dir), "--backend", "onnx"))
        servers.append(("sora_int8", int8_url))
    bf16_procs: list[subprocess.Popen] = []
    if args.bf16:
        bf16, bf16_url = launch("sora_serve_bf16", sora_serve(model_dir, "--dtype", "bfloat16"))
        base_bf16, base_bf16_url = launch("baseline_bf16", baseline_server("--dtype", "bfloat16"))
        bf16_procs += [bf16, base_bf16]
        servers += [("sora_bf16", bf16_url), ("baseline_bf16", base_bf16_url)]
    inproc = InProcess(model_dir, texts, str(device))
    inproc_bf16 = InProcess(model_dir, texts, str(device), "bfloat16") if args.bf16 else None
    tallies = {"inproc": Tally(), "inproc_batch1": Tally(), "inproc_bf16": Tally(), "inproc_bf16_batch1": Tally(),
               **{f"{name}/{c}": Tally() for name, _ in servers for c in LEVELS}}
    try:
        for _, u in servers:  # warm-up: connections, allocator, caches
            asyncio.run(drive(u, 8, 2.0, 200, texts))
        # Rounds interleave every configuration, so that what else runs on the machine weighs on all alike.
        for r in range(rounds):
            tallies["inproc"].add(inproc.run(seconds))
            tallies["inproc_batch1"].add(inproc.run(seconds / 2, batch=1))
            if inproc_bf16 is not None:
                tallies["inproc_bf16"].add(inproc_bf16.run(seconds))
                tallies["inproc_bf16_batch1"].add(inproc_bf16.run(seconds / 2, batch=1))
            for c in LEVELS:
                for name, u in servers if r % 2 == 0 else servers[::-1]:
                    measure(u, c, seconds, max_requests, texts, tallies[f"{name}/{c}"],
                            not name.startswith("baseline"))
            log(f"round {r + 1}/{rounds}: in-process {tallies['inproc'].rounds[-1]}/s "
                f"(batch 1: {tallies['inproc_batch1'].rounds[-1]}/s); " + "; ".join(
                f"{c}: sora {tallies[f'sora/{c}'].rounds[-1]}/s, baseline {tallies[f'baseline/{c}'].rounds[-1]}/s"
                for c in LEVELS))
        stop(baseline)
        for proc in [int8, *bf16_procs]:
            if proc is not None:
                stop(proc)
        soak_result = soak(url, server.pid, texts, soak_n, 32, 900.0)
    finally:
        sora_exit = stop(server)
        for proc in (baseline, int8, *bf16_procs):
            if proc is not None and proc.poll() is None:
                stop(proc)

    summary = {k: t.summary() for k, t in tallies.items() if t.seconds}

    def ratio(a: str, b: str) -> dict[str, float | None]:
        return {str(c): round(summary[f"{a}/{c}"]["per_s"] / summary[f"{b}/{c}"]["per_s"], 2)
                if summary[f"{b}/{c}"]["per_s"] else None for c in LEVELS}
    inproc_per_s = summary["inproc"]["per_s"]
    http_per_s = {str(c): summary[f"sora/{c}"]["per_s"] for c in LEVELS}
    base_per_s = {str(c): summary[f"baseline/{c}"]["per_s"] for c in LEVELS}
    for c in LEVELS:
        s_ = summary[f"sora/{c}"]
        log(f"{c:>3} clients: sora {s_['per_s']:>6.1f}/s (p50 {s_['p50_ms']} ms, p99 {s_['p99_ms']} ms, "
            f"mean batch {s_.get('mean_batch')}), baseline {base_per_s[str(c)]:>6.1f}/s; in-process {inproc_per_s}/s")
    payload = {
        "inproc_per_s": inproc_per_s,
        # One text per forward pass in-process: batching can gain at most inproc_per_s / this, here.
        "inproc_batch1_per_s": summary["inproc_batch1"]["per_s"],
        "http_per_s": http_per_s,
        "baseline_per_s": base_per_s,
        "p99_ms": {str(c): summary[f"sora/{c}"]["p99_ms"] for c in LEVELS},
        "baseline_p99_ms": {str(c): summary[f"baseline/{c}"]["p99_ms"] for c in LEVELS},
        "http_int8_per_s": {str(c): summary[f"sora_int8/{c}"]["per_s"] for c in LEVELS} if int8 else None,
        "http_bf16_per_s": {str(c): summary[f"sora_bf16/{c}"]["per_s"] for c in LEVELS} if args.bf16 else None,
        "baseline_bf16_per_s": {str(c): summary[f"baseline_bf16/{c}"]["per_s"] for c in LEVELS}
        if args.bf16 else None,
        "inproc_bf16_per_s": summary["inproc_bf16"]["per_s"] if args.bf16 else None,
        "inproc_bf16_batch1_per_s": summary["inproc_bf16_batch1"]["per_s"] if args.bf16 else None,
        "errors": sum(sum(v["errors"].values()) for k, v in summary.items() if not k.startswith("inproc")),
        "ratios": {"http_vs_inproc": {k: round(v / inproc_per_s, 3) for k, v in http_per_s.items()},
                   "http_vs_baseline": ratio("sora", "baseline"),
                   "http_int8_vs_baseline": ratio("sora_int8", "baseline") if int8 else None,
                   "batching_ceiling_inproc32_vs_inproc1": round(inproc_per_s / summary["inproc_batch1"]["per_s"], 2),
                   **({"http_bf16_vs_baseline": ratio("sora_bf16", "baseline"),
                       "http_bf16_vs_baseline_bf16": ratio("sora_bf16", "baseline_bf16"),
                       "batching_ceiling_bf16_inproc32_vs_inproc1": round(
                           summary["inproc_bf16"]["per_s"] / summary["inproc_bf16_batch1"]["per_s"], 2)}
                      if args.bf16 else {})},
        "targets": {"http_32_ge_70pct_inproc": http_per_s["32"] >= 0.7 * inproc_per_s,
                    "http_32_ge_3x_baseline": http_per_s["32"] >= 3 * base_per_s["32"],
                    "http_int8_32_ge_3x_baseline": (summary["sora_int8/32"]["per_s"] >= 3 * base_per_s["32"])
                    if int8 else None,
                    "http_bf16_32_ge_3x_baseline": (summary["sora_bf16/32"]["per_s"] >= 3 * base_per_s["32"])
                    if args.bf16 else None},
        "soak": soak_result,
        "detail": summary,
        "meta": {
            **machine_info(device),
            "command": command_line(), "quick": args.quick, "rounds": rounds, "seconds_per_config_round": seconds,
            "load_average_before": load_before, "load_average_after": load_average(),
            "elapsed_s": round(time.perf_counter() - t_start, 1),
            "model": "all-MiniLM-L6-v2 + classification head (5 fine-tuning steps on examples/sample)",
            "texts": f"examples/sample train+validation+test ({len(texts)} texts), one per request",
            "sora_serve": f"sora serve --max-wait-ms {args.max_wait_ms} --threads {threads} (otherwise defaults: "
                          "--max-batch-tokens 8192, 1 worker)",
            "sora_serve_exit_code_after_sigterm": sora_exit,
            "sora_serve_int8": "the same model after sora compress --method onnx-int8, sora serve --backend onnx"
                               if int8 else None,
            "sora_serve_bf16": "the same model, sora serve --dtype bfloat16; baseline_bf16: the baseline server "
                               "with the model loaded in bfloat16 (sora.load(dtype=...))" if args.bf16 else None,
            "baseline": "bench/baseline_server.py: FastAPI, sync endpoint, one Sora.predict per request (locked)",
            "load_generator": "this process: one asyncio loop, one httpx.AsyncClient (one keep-alive connection) "
                              "per client, closed loop, loopback, POST /v1/predict with 1 text; configurations "
                              "interleaved in rounds",
        },
    }
    write_result("serve", args.quick, payload)


if __name__ == "__main__":
    main()
