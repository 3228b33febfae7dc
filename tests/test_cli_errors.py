"""Errors a user can fix come out of the CLI as one line, name the file (and line), and write nothing.

The cases run as subprocesses, one per core at a time, from a module fixture.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
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


# ---- in process: commands that take a model and a file (no second torch start-up per case) ------------------


def run_cli(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    """``sora ARGV`` in this process: (exit code, stdout, stderr)."""
    import warnings

    from sora import cli

    monkeypatch.setattr(sys, "argv", ["sora", *map(str, argv)])
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code: int, err: str) -> str:
    """The one error line of a failed command (exit 2, no traceback; a progress bar before it is fine)."""
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and "text/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


ROWS = ["a fine day for a walk", "", "   ", "the parcel never arrived", "last one"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """An untrained tiny checkpoint with one classification head: enough to load, embed and predict."""
    import torch

    from sora.config import ModelConfig
    from sora.models.autoencoder import SoraModel
    from sora.models.checkpoint import save_checkpoint
    from sora.models.heads import HeadSpec, add_head
    from sora.text.tokenizer import train_tokenizer

    tok = train_tokenizer([t for t in ROWS if t.strip()] * 5, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = SoraModel(ModelConfig(vocab_size=tok.vocab_size, dim=16, layers=1, heads=2, ffn_dim=32, code_dim=8,
                                  decoder_layers=0, pad_id=tok.pad_id, cls_id=tok.cls_id, sep_id=tok.sep_id,
                                  mask_id=tok.mask_id))
    add_head(model, "sentiment", HeadSpec(type="classification", labels=["neg", "pos"]))
    return save_checkpoint(tmp_path_factory.mktemp("tiny") / "model", model.eval(), tok, {"kind": "finetune"})


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_embed_keeps_every_row_in_order(tiny, tmp_path, monkeypatch, capsys):
    """Empty and blank texts were dropped (5 rows, 3 vectors, exit 0): rows no longer lined up with the input."""
    import pyarrow.parquet as pq

    import sora

    data = _jsonl(tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(ROWS)])
    code, out, err = run_cli(monkeypatch, capsys, "embed", tiny, data, "-o", tmp_path / "v.npy")
    assert code == 0 and "5 vectors" in out, err
    vectors = np.load(tmp_path / "v.npy")
    model = sora.load(tiny)
    np.testing.assert_allclose(vectors, np.concatenate([model.embed([t]) for t in ROWS]), atol=1e-5)
    code, _, err = run_cli(monkeypatch, capsys, "embed", tiny, data, "-o", tmp_path / "v.parquet")
    assert code == 0, err
    table = pq.read_table(tmp_path / "v.parquet").to_pydict()
    assert table["row"] == [0, 1, 2, 3, 4] and table["line"] == [1, 2, 3, 4, 5] and table["text"] == ROWS
    np.testing.assert_allclose(np.array(table["embedding"]), vectors, atol=1e-6)


def test_embed_refuses_a_null_text_with_its_line(tiny, tmp_path, monkeypatch, capsys):
    data = _jsonl(tmp_path / "in.jsonl", [{"text": "fine"}, {"text": "also fine"}, {"text": None}])
    line = one_line_error(*run_cli(monkeypatch, capsys, "embed", tiny, data, "-o", tmp_path / "out" / "v.npy")[::2])
    assert f"{data}:3:" in line and "null" in line, line
    assert not (tmp_path / "out").exists()


def _broken(tiny: Path, root: Path, name: str) -> tuple[Path, Path]:
    """A copy of ``tiny`` broken one way: (the checkpoint, the file the error must name)."""
    ckpt = root / name
    shutil.copytree(tiny, ckpt)
    weights, config = ckpt / "model.safetensors", ckpt / "config.json"
    if name == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[:200])
        return ckpt, weights
    if name == "empty-weights":
        weights.write_bytes(b"")
        return ckpt, weights
    if name == "config-list":
        config.write_text("[]")
        return ckpt, config
    if name == "config-without-model":
        config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "model"}))
        return ckpt, config
    if name == "config-not-sora":
        config.write_text(json.dumps({"hello": 1}))
        return ckpt, config
    raise AssertionError(name)


BROKEN = ["truncated-weights", "empty-weights", "config-list", "config-without-model", "config-not-sora"]


@pytest.mark.parametrize("name", BROKEN)
def test_a_broken_checkpoint_is_one_line_naming_the_file(tiny, tmp_path, monkeypatch, capsys, name):
    """A truncated or empty model.safetensors was a 51-line SafetensorError; a config.json that is [] or has no
    model section a TypeError / KeyError."""
    ckpt, culprit = _broken(tiny, tmp_path, name)
    data = _jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    for argv in (["info", ckpt], ["embed", ckpt, data, "-o", tmp_path / "out" / "v.npy"],
                 ["predict", ckpt, data, "-o", tmp_path / "out" / "p.jsonl"]):
        line = one_line_error(*run_cli(monkeypatch, capsys, *argv)[::2])
        assert str(culprit) in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["embed", "predict"])
def test_an_output_that_cannot_be_written_is_one_line(tiny, tmp_path, monkeypatch, capsys, command):
    data = _jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    (tmp_path / "afile").write_text("not a directory")
    out = tmp_path / "afile" / ("v.npy" if command == "embed" else "p.jsonl")
    line = one_line_error(*run_cli(monkeypatch, capsys, command, tiny, data, "-o", out)[::2])
    assert str(out) in line and "cannot write" in line, line
    # a directory this user may not write (root may write anywhere, so the check is what is simulated)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real_access(p, mode, **kw))
    line = one_line_error(*run_cli(monkeypatch, capsys, command, tiny, data, "-o", locked / out.name)[::2])
    assert str(locked / out.name) in line and "permission" in line, line
    assert list(locked.iterdir()) == []


def _full() -> OSError:
    import errno

    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _npy_disk_full(file, arr, *args, **kwargs):  # np.save: part of the file, then a full disk
    if hasattr(file, "write"):
        file.write(b"\x93NUMPY half a file")
    else:
        Path(file).write_bytes(b"\x93NUMPY half a file")
    raise _full()


def _parquet_disk_full(table, where, *args, **kwargs):  # pq.write_table
    Path(where).write_bytes(b"PAR1 half a file")
    raise _full()


def _csv_disk_full(self, rows):  # csv.DictWriter.writerows, after the header
    self.writer.writerow(["half a row"])
    raise _full()


@pytest.mark.parametrize("suffix", [".npy", ".parquet", ".csv"])
def test_a_full_disk_leaves_nothing_behind(tiny, tmp_path, monkeypatch, capsys, suffix):
    import csv

    import pyarrow.parquet as pq

    data = _jsonl(tmp_path / "in.jsonl", [{"text": t} for t in ROWS])
    if suffix == ".npy":
        monkeypatch.setattr(np, "save", _npy_disk_full)
    elif suffix == ".parquet":
        monkeypatch.setattr(pq, "write_table", _parquet_disk_full)
    else:
        monkeypatch.setattr(csv.DictWriter, "writerows", _csv_disk_full)
    out = tmp_path / "out" / "sub" / f"result{suffix}"
    command = "predict" if suffix == ".csv" else "embed"
    line = one_line_error(*run_cli(monkeypatch, capsys, command, tiny, data, "-o", out)[::2])
    assert str(out) in line and "No space left on device" in line, line
    assert not (tmp_path / "out").exists()  # neither the half-written file nor the directories made for it


def test_predict_on_an_empty_file_is_one_line(tiny, tmp_path, monkeypatch, capsys):
    """It was a StopIteration traceback (with --text-column: an IndexError for .csv, "0 predictions" for .jsonl)."""
    data = tmp_path / "empty.jsonl"
    data.write_text("\n", encoding="utf-8")
    for extra in ([], ["--text-column", "text"]):
        for out in (tmp_path / "p.jsonl", tmp_path / "p.csv"):
            line = one_line_error(*run_cli(monkeypatch, capsys, "predict", tiny, data, "-o", out, *extra)[::2])
            assert str(data) in line and "no rows" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]


def test_predict_names_the_line_of_a_row_without_its_column(tiny, tmp_path, monkeypatch, capsys):
    """A KeyError traceback: only the first record's columns were checked."""
    data = _jsonl(tmp_path / "in.jsonl", [{"text": "fine"}, {"text": "fine too"}, {"body": "no text here"}])
    line = one_line_error(*run_cli(monkeypatch, capsys, "predict", tiny, data, "-o", tmp_path / "p.jsonl")[::2])
    assert f"{data}:3:" in line and "no column 'text'" in line and "body" in line, line
    assert not (tmp_path / "p.jsonl").exists()


@pytest.mark.parametrize("value, says", [(None, "is null"), (42, "is a int"), (["a", "b"], "is a list")])
def test_predict_names_a_text_that_is_not_a_string(tiny, tmp_path, monkeypatch, capsys, value, says):
    """It said "task 'sentiment' takes single texts, not pairs": the wrong diagnosis, and no line."""
    data = _jsonl(tmp_path / "in.jsonl", [{"text": "fine"}, {"text": value}])
    line = one_line_error(*run_cli(monkeypatch, capsys, "predict", tiny, data, "-o", tmp_path / "p.jsonl")[::2])
    assert f"{data}:2:" in line and "column 'text'" in line and says in line and "pairs" not in line, line
    assert not (tmp_path / "p.jsonl").exists()


def test_predict_keeps_rows_and_every_column_in_csv(tiny, tmp_path, monkeypatch, capsys):
    """Rows of a JSONL input may have different keys: the CSV header had only the first row's (a ValueError)."""
    import csv

    data = _jsonl(tmp_path / "in.jsonl", [{"text": "fine"}, {"text": "", "id": 7}, {"text": "   ", "extra": "x"}])
    code, out, err = run_cli(monkeypatch, capsys, "predict", tiny, data, "-o", tmp_path / "p.csv")
    assert code == 0 and "3 predictions" in out, err
    with (tmp_path / "p.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["text"] for r in rows] == ["fine", "", "   "] and rows[1]["id"] == "7" and rows[2]["extra"] == "x"
    assert all(r["sentiment.label"] in ("neg", "pos") for r in rows)


def test_predict_reads_a_semicolon_file_and_takes_delimiter(tiny, tmp_path, monkeypatch, capsys):
    data = tmp_path / "in.txt"
    data.write_text("text;label_name\ngreat movie, really;pos\nawful;neg\n", encoding="utf-8")
    code, out, err = run_cli(monkeypatch, capsys, "predict", tiny, data, "-o", tmp_path / "p.jsonl")
    assert code == 0 and "2 predictions" in out, err
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["great movie, really", "awful"] and rows[0]["label_name"] == "pos"
    piped = tmp_path / "in.csv"
    piped.write_text("text|n\na, b; c|1\n", encoding="utf-8")
    code, out, err = run_cli(monkeypatch, capsys, "embed", tiny, piped, "--delimiter", "|", "-o", tmp_path / "v.npy")
    assert code == 0 and "1 vectors" in out, err
    line = one_line_error(*run_cli(monkeypatch, capsys, "embed", tiny, piped, "--delimiter", "ab",
                                   "-o", tmp_path / "w.npy")[::2])
    assert "'ab'" in line and "one character" in line, line
