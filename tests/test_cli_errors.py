"""Errors a user can fix come out of the CLI as one line, name the file (and line), and write nothing.

The cases run as subprocesses, one per core at a time, from a module fixture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

PRETRAIN = ["pretrain", "--max-steps", "2", "--no-progress"]


def _cases(d: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (argv after ``sora``, strings the error line must contain). Each costs a CLI start-up (torch)."""
    (d / "empty.jsonl").write_bytes(b"")
    (d / "nocol.jsonl").write_text(json.dumps({"text": "hello there"}) + "\n", encoding="utf-8")
    (d / "badutf8.jsonl").write_bytes(b'{"text": "one"}\n{"text": "two"}\n{"text": "bad \xff\xfe here"}\n')
    good = d / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"sentence number {i}"}) + "\n" for i in range(20)), encoding="utf-8")

    def pretrain(name: str, data: Path | str, *extra: str) -> list[str]:
        return [*PRETRAIN, "--train", str(data), "-o", str(d / "out" / name), *extra]

    missing = d / "missing.jsonl"
    return {
        "missing": (pretrain("missing", missing), [str(missing), "not found"]),
        "empty": (pretrain("empty", d / "empty.jsonl"), [str(d / "empty.jsonl"), "no text"]),
        "column": (pretrain("column", d / "nocol.jsonl", "--column", "body"),
                   [f"{d / 'nocol.jsonl'}:1:", "'body'", "text"]),
        "utf8": (pretrain("utf8", d / "badutf8.jsonl"), [f"{d / 'badutf8.jsonl'}:3:", "UTF-8"]),
        "set_unknown": (pretrain("set_unknown", good, "--set", "model.nonexistent=3"), ["model.nonexistent"]),
        "set_no_equals": (pretrain("set_no_equals", good, "--set", "model.dim"), ["model.dim", "key=value"]),
        "embed_missing_checkpoint": (
            ["embed", str(d / "no_ckpt"), str(good), "-o", str(d / "out" / "embed_missing_checkpoint" / "v.npy")],
            [str(d / "no_ckpt")],
        ),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, list[str], Path]]:
    d = tmp_path_factory.mktemp("cli")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "NO_COLOR": "1", "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}

    def run(item):
        name, (argv, expect) = item
        proc = subprocess.run([sys.executable, "-m", "sora.cli", *argv], capture_output=True, text=True, cwd=d,
                              env=env, timeout=120)
        return name, (proc, expect, d)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(pool.map(run, _cases(d).items()))


CASES = ["missing", "empty", "column", "utf8", "set_unknown", "set_no_equals", "embed_missing_checkpoint"]


def test_all_cases_listed(tmp_path: Path):
    assert sorted(CASES) == sorted(_cases(tmp_path))


@pytest.mark.parametrize("name", CASES)
def test_one_line_error(results, name):
    proc, expect, _ = results[name]
    report = f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode != 0, report
    assert "Traceback" not in proc.stdout + proc.stderr, report
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, report
    assert lines[0].startswith("error: "), report
    assert "\x1b[" not in lines[0], report  # no colour codes when not on a terminal
    for piece in expect:
        assert piece in lines[0], report


@pytest.mark.parametrize("name", CASES)
def test_failure_writes_nothing(results, name):
    _, _, d = results[name]
    out = d / "out" / name
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))


def test_no_checkpoints_anywhere(results):
    _, _, d = next(iter(results.values()))
    out = d / "out"
    written = sorted(p.relative_to(out) for p in out.rglob("*")) if out.exists() else []
    assert written == []
    assert not (d / "runs").exists()  # the default output directory was not used either


def test_sora_warnings_print_as_one_line(capsys):
    import warnings

    from sora import cli
    from sora.errors import SoraWarning

    with warnings.catch_warnings():  # restores showwarning and the filters afterwards
        warnings.simplefilter("always")
        warnings.showwarning = cli._show_warning  # as cli.main() installs it
        warnings.warn("data.jsonl: 65% of the tokens are [UNK]", SoraWarning, stacklevel=1)
    assert capsys.readouterr().err == "warning: data.jsonl: 65% of the tokens are [UNK]\n"


def test_usage_errors_are_short_messages_not_tracebacks(tmp_path):
    """A missing option or an unknown command: click's usage message and exit code 2. (typer vendors click
    since 0.26, so catching click's own exception classes let these escape as tracebacks.)"""
    env = {**os.environ, "NO_COLOR": "1", "PYTHONWARNINGS": "ignore"}
    for argv, expect in ((["compress", str(tmp_path), "-o", str(tmp_path / "out")], "Missing option '--method'"),
                         (["nosuch"], "No such command 'nosuch'")):
        proc = subprocess.run([sys.executable, "-m", "sora.cli", *argv], capture_output=True, text=True,
                              env=env, timeout=120)
        report = f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, report
        assert expect in proc.stderr and "Usage: " in proc.stderr, report
    assert not (tmp_path / "out").exists()
