"""Build deploy/Dockerfile, run the image on real checkpoints, and check it as an operator would.

For each ``--model`` checkpoint: ``docker run`` with the checkpoint mounted read-only, a read-only root
filesystem (as deploy/k8s/deployment.yaml runs it), an API key and a loopback-only port; then

- Docker's own HEALTHCHECK (on /readyz) turns ``healthy``;
- /healthz, /readyz, /v1/models, /v1/embed, /v1/predict, /metrics and /docs answer, /v1/* needs the key (401
  without it), the process runs as uid 10001;
- ``docker stop`` (SIGTERM) while a burst of requests is in flight: every request is answered 200 and the
  container exits 0 after "Application shutdown complete".

Writes bench/results/docker.json (image size, build and start times, each check). Needs a Docker engine.
Where Docker Hub or PyTorch's index cannot be reached, build a base image with deploy/debian_base.sh and pass
``--base-image``, ``--torch-wheel`` and (behind a TLS-intercepting proxy) ``--pip-ca``:

    python deploy/docker_smoke.py --model runs/demo-classifier/model
    python deploy/docker_smoke.py --base-image sora-base:bookworm \\
        --torch-wheel /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl \\
        --pip-ca /etc/ssl/certs/ca-certificates.crt --model runs/demo-classifier/model
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
KEY = "smoke-test-key"
DOCKER = "docker"  # --docker: e.g. Debian's 20.10 client, whose `docker build` has BuildKit built in


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def docker(*args: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run([DOCKER, *args], check=check, text=True, capture_output=True, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(args: argparse.Namespace) -> float:
    cmd = [DOCKER, "build", "-f", "deploy/Dockerfile", "-t", args.image, "--progress", "plain"]
    if args.base_image:
        cmd += ["--build-arg", f"BASE_IMAGE={args.base_image}"]
    if args.torch_wheel:
        wheels = REPO / "deploy" / "wheels"
        for old in wheels.glob("*.whl"):
            old.unlink()
        shutil.copy(args.torch_wheel, wheels)
        cmd += ["--build-arg", "TORCH_PIP_ARGS=--find-links /wheels"]
    if args.pip_ca:
        cmd += ["--secret", f"id=pip_ca,src={args.pip_ca}"]
    if args.network:
        cmd += ["--network", args.network]
    if args.no_cache:
        cmd += ["--no-cache"]
    log("$ " + " ".join(cmd + ["."]))
    start = time.perf_counter()
    subprocess.run([*cmd, "."], check=True, cwd=REPO, env={**os.environ, "DOCKER_BUILDKIT": "1"})
    return time.perf_counter() - start


def wait_healthy(name: str, timeout: float) -> tuple[str, float]:
    start = time.perf_counter()
    status = "starting"
    while time.perf_counter() - start < timeout:
        status = docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip()
        running = docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip()
        if status in ("healthy", "unhealthy") or running != "true":
            break
        time.sleep(1)
    return status, time.perf_counter() - start


def check(results: dict[str, Any], name: str, ok: bool, detail: Any = None) -> None:
    results[name] = {"ok": bool(ok), **({"detail": detail} if detail is not None else {})}
    log(f"  {'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail is not None and not ok else ""))


def smoke_model(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    label = model.parent.name if model.name == "model" else model.name
    name = f"sora-smoke-{os.getpid()}-{label}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {KEY}"}
    docker("rm", "-f", name, check=False)
    run = ["run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000",
           "-v", f"{model.resolve()}:/models/model:ro", "-e", f"SORA_API_KEY={KEY}", "-e", f"SORA_MODEL_NAME={label}",
           "--read-only", "--tmpfs", "/tmp", "--cpus", str(args.cpus), args.image]
    log(f"{model}: docker {' '.join(run)}")
    docker(*run)
    checks: dict[str, Any] = {}
    out: dict[str, Any] = {"model": str(model), "checks": checks}
    try:
        status, waited = wait_healthy(name, args.start_timeout)
        out["healthy_after_s"] = round(waited, 1)
        check(checks, "docker HEALTHCHECK healthy", status == "healthy", status)
        uid = docker("exec", name, "id", "-u", check=False).stdout.strip()
        check(checks, "runs as uid 10001", uid == "10001", uid)
        with httpx.Client(base_url=url, timeout=60) as http:
            check(checks, "GET /healthz", http.get("/healthz").status_code == 200)
            check(checks, "GET /readyz", http.get("/readyz").json().get("status") == "ready")
            check(checks, "401 without the key", http.get("/v1/models").status_code == 401)
            card = http.get("/v1/models", headers=auth).json()["models"][0]
            check(checks, "GET /v1/models", bool(card["tasks"]) and card["name"] == label, card)
            out["card"] = {k: card.get(k) for k in ("name", "version", "backend", "quantization", "dim")}
            emb = http.post("/v1/embed", json={"texts": ["the parcel arrived broken", "great service"]},
                            headers=auth).json()
            check(checks, "POST /v1/embed", len(emb["embeddings"]) == 2 and len(emb["embeddings"][0]) == emb["dim"])
            single = [t for t, spec in card["tasks"].items() if not spec["pair"]]
            if single:
                pred = http.post("/v1/predict", json={"texts": ["the parcel arrived broken"]}, headers=auth)
                row = pred.json()["predictions"][0] if pred.status_code == 200 else {}
                check(checks, "POST /v1/predict", set(row) == set(single), pred.text[:200])
            check(checks, "413 over the limits", http.post("/v1/embed", json={"texts": ["x"] * 100_000},
                                                           headers=auth).status_code == 413)
            metrics = http.get("/metrics").text
            check(checks, "GET /metrics", 'sora_requests_total{route="/v1/embed",status="200"}' in metrics)
            check(checks, "GET /docs", http.get("/docs").status_code == 200)
        checks_drain(args, name, url, auth, checks, out)
    finally:
        out["logs_tail"] = docker("logs", "--tail", "15", name, check=False).stderr.splitlines()
        docker("rm", "-f", name, check=False)
    return out


def checks_drain(args: argparse.Namespace, name: str, url: str, auth: dict[str, str], checks: dict[str, Any],
                 out: dict[str, Any]) -> None:
    """``docker stop`` once the first of ``args.burst`` requests (64 texts each) is answered: the rest are
    then still queued or running."""
    texts = [f"order {i} has not arrived, the tracking page has said 'in transit' for a week and nobody answers "
             f"my emails or my calls; I want a refund or a replacement sent today" for i in range(64)]

    def one(_: int) -> int:
        with httpx.Client(base_url=url, timeout=120) as http:
            return http.post("/v1/embed", json={"texts": texts}, headers=auth).status_code

    with ThreadPoolExecutor(args.burst) as pool:
        futures = [pool.submit(one, i) for i in range(args.burst)]
        wait(futures, return_when=FIRST_COMPLETED)
        in_flight = sum(not f.done() for f in futures)
        start = time.perf_counter()
        stop = subprocess.Popen([DOCKER, "stop", "-t", "60", name], stdout=subprocess.DEVNULL)
        codes = [f.result() for f in futures]
        stop.wait(90)
    stopped_after = time.perf_counter() - start
    exit_code = docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
    logs = docker("logs", name, check=False)
    out["drain"] = {"requests": args.burst, "in_flight_at_stop": in_flight, "statuses": dict(
        (str(c), codes.count(c)) for c in sorted(set(codes))), "stopped_after_s": round(stopped_after, 1)}
    check(checks, "SIGTERM with requests in flight", in_flight > 0, in_flight)
    check(checks, "every in-flight request answered 200", all(c == 200 for c in codes), out["drain"]["statuses"])
    check(checks, "exit code 0", exit_code == "0", exit_code)
    check(checks, "Application shutdown complete", "Application shutdown complete" in logs.stdout + logs.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", type=Path, help="checkpoint to serve (repeatable)")
    parser.add_argument("--docker", default="docker", help="the docker client (needs BuildKit: buildx, or 20.10)")
    parser.add_argument("--image", default="sora-serve:smoke")
    parser.add_argument("--no-build", action="store_true", help="use --image as it is")
    parser.add_argument("--no-cache", action="store_true", help="build every layer again (a true build time)")
    parser.add_argument("--base-image", help="BASE_IMAGE build argument (default: the Dockerfile's)")
    parser.add_argument("--torch-wheel", type=Path, help="a local torch wheel (deploy/wheels/)")
    parser.add_argument("--pip-ca", type=Path, help="CA bundle for pip during the build")
    parser.add_argument("--network", default="host", help="build network ('' for Docker's default)")
    parser.add_argument("--cpus", type=float, default=2.0, help="docker run --cpus")
    parser.add_argument("--burst", type=int, default=24, help="requests in flight at docker stop")
    parser.add_argument("--start-timeout", type=float, default=240.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "docker.json")
    args = parser.parse_args()
    global DOCKER
    DOCKER = args.docker
    models = args.model or [REPO / "runs" / "demo-classifier" / "model"]
    for m in models:
        if not (m / "config.json").is_file():
            parser.error(f"{m} is not a Sora checkpoint (no config.json); run `make demo` first for the default")
    if shutil.which(DOCKER) is None or docker("info", check=False).returncode != 0:
        parser.error("no Docker engine answers `docker info`")
    result: dict[str, Any] = {"image": args.image, "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}
    if not args.no_build:
        result["build_s"] = round(build(args), 1)
        result["build_cached"] = not args.no_cache
    result["image_mb"] = round(int(docker("image", "inspect", "-f", "{{.Size}}", args.image).stdout) / 1e6, 1)
    result["engine"] = docker("version", "-f", "{{.Server.Version}}").stdout.strip()
    result["models"] = [smoke_model(args, m) for m in models]
    result["ok"] = all(c["ok"] for m in result["models"] for c in m["checks"].values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"{'all checks passed' if result['ok'] else 'SOME CHECKS FAILED'}; wrote {args.out}")
    print(json.dumps({k: result[k] for k in ("ok", "image_mb", "build_s") if k in result}))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
