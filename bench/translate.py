"""Translation, Multi30k en→de (issue 15): Sora's seq2seq heads against OpenNMT (eole), the same budget for all.

Systems (every one trained for the same optimizer steps at the same batch size, in sentence pairs):

  sora             a small native Sora encoder from scratch + a seq2seq head cross-attending to its token states
                   (``decoder: tokens``); the tokenizer is a byte-level BPE Sora trains on the English and German
                   training text (``sora pretrain`` with ``train.max_steps=1``: it only builds the tokenizer and the
                   initial model; no pretraining budget is spent), shared by source and target
  sora_minilm      all-MiniLM-L6-v2's encoder + the same head; the target side in a German BPE Sora trains on the
                   training targets (``target_tokenizer: own``: MiniLM's uncased English WordPiece reads German badly)
  sora_bottleneck  the ``sora`` recipe with ``decoder: code``: the decoder sees only the one code vector (what a
                   TSDAE-style model can do)
  opennmt          eole (OpenNMT-py's successor) in its own virtual environment under bench/.envs/eole (pip from
                   the package index, torch taken from this venv), a Transformer of the ``sora`` system's size with
                   OpenNMT's Transformer recipe (adam β2 0.998, noam schedule with lr 2, label smoothing 0.1, dropout
                   0.1, xavier init, shared embeddings), warm-up 10% of the steps (Sora's warm-up ratio), on the
                   same BPE pieces as ``sora`` (the text pre-split into them; outputs joined back by the same BPE)

Sora runs as a user runs it: a recipe file and ``sora finetune RECIPE -o OUT`` (defaults but for the budget:
model size, steps, batch size, decoder shape and target length, patience 0 so every step is taken); decoding is
``sora.load(OUT).generate(sources, beam=...)``. Reported per system: test BLEU and chrF (sacreBLEU on the detokenised
outputs, beam 4), training tokens/s (source + target pieces of the shared BPE per training pair × pairs seen, over
the steady-state training seconds: Sora's per-step times from its training log after the first tenth of the
steps, eole's step log from its first report to its last), decoding sentences/s greedy and beam 4 (test
sources, batches of 32, in-process for Sora; eole's predict from its log timestamps, without its start-up; each
the median of 3 decodings, 1 in --quick), output length in pieces and decoded pieces/s, and steps.

    python bench/translate.py --quick              # -> bench/results/translate.quick.json (under 2 minutes;
                                                   #    the Sora systems: add opennmt with --systems)
    python bench/translate.py                      # CPU: the full-size model, 1,500 steps of 64 (hours on 2 cores)
    python bench/translate.py --device cuda        # 3-layer 256-d models, ~10 epochs: minutes on a GPU
    python bench/translate.py --steps 300 --max-test 200 --systems sora,opennmt   # a CPU slice
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from common import (
    REPO,
    SHARED_DATA,
    add_common_args,
    command_line,
    load_average,
    log,
    machine_info,
    minilm_path,
    offline,
    resolve_device,
    run_sora,
    seeded_sample,
    set_threads,
    write_result,
)

import sora
from sora.metrics.generation import generation_metrics
from sora.text.tokenizer import SoraTokenizer

DATA = SHARED_DATA / "multi30k_en_de"
WORK = REPO / "runs" / "translate"
ENVS = REPO / "bench" / ".envs"
SYSTEMS = ("sora", "sora_minilm", "sora_bottleneck", "opennmt")
# --quick leaves the peer out unless --systems names it: eole's own start-up (about 40 s before its first training
# step, 20-30 s before each predict) alone is over the quick mode's two minutes.
QUICK_SYSTEMS = ("sora", "sora_minilm", "sora_bottleneck")
# From the package index, into bench/.envs/eole. eole 0.6.4's command line imports aiohttp (its load-test tool)
# without declaring it, so a venv without it cannot run `eole` at all.
EOLE_SPEC = ["eole==0.6.4", "aiohttp"]

# Budgets: model size and training length, the same for every system (MiniLM's encoder is its own: 6 × 384).
BUDGETS = {
    "quick": {"dim": 64, "layers": 1, "heads": 2, "ffn_dim": 128, "vocab": 1000, "steps": 20, "batch_size": 16,
              "train": 1000, "validation": 8, "test": 32, "max_target_length": 32, "decode_repeats": 1},
    "cpu": {"dim": 256, "layers": 3, "heads": 4, "ffn_dim": 1024, "vocab": 8000, "steps": 1500, "batch_size": 64,
            "train": None, "validation": 200, "test": None, "max_target_length": 64, "decode_repeats": 3},
    "cuda": {"dim": 256, "layers": 3, "heads": 4, "ffn_dim": 1024, "vocab": 8000, "steps": 2300, "batch_size": 128,
             "train": None, "validation": None, "test": None, "max_target_length": 64, "decode_repeats": 3},
}
DECODE_BATCH = 32


# ---- data -----------------------------------------------------------------------------------------------------

def read(split: str) -> list[dict[str, str]]:
    with (DATA / f"{split}.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def prepare_data(root: Path, budget: dict[str, Any], seed: int) -> dict[str, list[dict[str, str]]]:
    """train/validation/test JSONL under ``root/data`` (seeded subsamples where the budget caps them) and the
    English + German training text ``sora pretrain`` trains the shared BPE on."""
    splits = {s: seeded_sample(read(s), budget[s], seed) for s in ("train", "validation", "test")}
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"source": r["source"], "target": r["target"]},
                                                                ensure_ascii=False) + "\n" for r in rows),
                                             encoding="utf-8")
    (root / "corpus.txt").write_text("".join(f"{r[k]}\n" for r in splits["train"] for k in ("source", "target")),
                                     encoding="utf-8")
    return splits


# ---- Sora -----------------------------------------------------------------------------------------------------

PRETRAIN = "sora pretrain {recipe} -o {out}"
FINETUNE = "sora finetune {recipe} -o {out}"


def write_yaml(path: Path, payload: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(payload, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def scratch_encoder(root: Path, budget: dict[str, Any], device: torch.device, threads: int,
                    commands: dict[str, str]) -> Path:
    """The from-scratch starting point: Sora's BPE on the training text and an initial model of the budget's size
    (one pretraining step: what ``sora pretrain`` needs to write a checkpoint)."""
    out = root / "scratch"
    if (out / "model" / "config.json").is_file():
        return out
    recipe = write_yaml(root / "pretrain.yaml", {
        "data": {"train": str(root / "corpus.txt"), "max_length": 128, "batch_size": budget["batch_size"]},
        "tokenizer": {"vocab_size": budget["vocab"]},
        "model": {"dim": budget["dim"], "layers": budget["layers"], "heads": budget["heads"],
                  "ffn_dim": budget["ffn_dim"], "code_dim": budget["dim"], "decoder_layers": budget["layers"],
                  "max_length": 160},
        "train": {"max_steps": 1, "warmup_steps": 0, "save_every": 0, "eval_every": 0, "progress": False},
    })
    _, _, argv = run_sora(PRETRAIN, device, threads, recipe=recipe, out=out)
    commands["scratch_encoder"] = shlex.join(argv)
    return out


def sora_recipe(root: Path, system: str, init: str, budget: dict[str, Any]) -> Path:
    options: dict[str, Any] = {"layers": budget["layers"], "heads": budget["heads"], "ffn_dim": budget["ffn_dim"],
                               "max_target_length": budget["max_target_length"]}
    if system == "sora_bottleneck":
        options["decoder"] = "code"
    if system == "sora_minilm":
        options.update(target_tokenizer="own", target_vocab_size=budget["vocab"])
    return write_yaml(root / f"{system}.yaml", {
        "data": {"batch_size": budget["batch_size"]},
        "finetune": {"init": init, "max_steps": budget["steps"], "patience": 0},
        "tasks": [{"name": "translate", "type": "seq2seq", "data": str(root / "data"), "options": options}],
        "train": {"progress": False},
    })


def time_generate(model: Any, sources: list[str], beam: int, repeats: int) -> tuple[list[str], float]:
    """The outputs and the median seconds of ``repeats`` decodings (each must give the same outputs)."""
    times, outputs = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.generate(sources, beam=beam, batch_size=DECODE_BATCH)
        times.append(time.perf_counter() - t0)
        if outputs is not None and out != outputs:
            raise RuntimeError(f"beam {beam}: two decodings of the same sources differ")
        outputs = out
    return outputs, statistics.median(times)


def run_sora_system(root: Path, system: str, budget: dict[str, Any], device: torch.device, threads: int,
                    splits: dict[str, list[dict[str, str]]], tokenizer: SoraTokenizer, pieces: float,
                    commands: dict[str, str]) -> dict[str, Any]:
    init = str(minilm_path()) if system == "sora_minilm" else str(scratch_encoder(root, budget, device, threads,
                                                                                  commands) / "model")
    out = root / system
    if out.exists():
        shutil.rmtree(out)
    recipe = sora_recipe(root, system, init, budget)
    stdout, wall, argv = run_sora(FINETUNE, device, threads, recipe=recipe, out=out)
    commands[system] = shlex.join(argv)
    m = re.search(r"\((\d+) steps, ([\d.]+) s\)", stdout)
    steps, seconds = (int(m.group(1)), float(m.group(2))) if m else (budget["steps"], wall)
    # Steady state, as eole's is measured (its first report, a tenth of the steps, to the last): the log's own
    # time of each step after the first tenth, without the validations' BLEU decoding and the checkpoints.
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    timed = [r["step_s"] for r in rows if "step_s" in r and r["step"] > max(1, budget["steps"] // 10)]
    timed_steps = len(timed)
    model = sora.load(out, device=str(device))
    sources = [r["source"] for r in splits["test"]]
    greedy, t_greedy = time_generate(model, sources, 1, budget["decode_repeats"])
    beam4, t_beam = time_generate(model, sources, 4, budget["decode_repeats"])
    return {**scores(beam4, splits["test"]), "greedy_bleu": round(scores(greedy, splits["test"])["bleu"], 2),
            "train_tokens_per_s": round(timed_steps * budget["batch_size"] * pieces / max(sum(timed), 1e-9), 1)
            if timed else round(steps * budget["batch_size"] * pieces / seconds, 1),
            "timed_steps": timed_steps, "greedy_sents_per_s": round(len(sources) / t_greedy, 2),
            "beam4_sents_per_s": round(len(sources) / t_beam, 2),
            **decoded({"greedy": greedy, "beam4": beam4}, {"greedy": t_greedy, "beam4": t_beam}, tokenizer),
            "steps": steps, "train_seconds": round(seconds, 1), "finetune_wall_s": round(wall, 1),
            "examples": [{"source": s, "output": o, "reference": r["target"]}
                         for s, o, r in list(zip(sources, beam4, splits["test"], strict=True))[:3]]}


def decoded(outputs: dict[str, list[str]], seconds: dict[str, float | None],
            tokenizer: SoraTokenizer) -> dict[str, Any]:
    """Per decoding mode the mean output length in the shared BPE's pieces and the pieces decoded per second:
    sentences/s alone rewards a system whose outputs are short."""
    out: dict[str, Any] = {}
    for key, texts in outputs.items():
        n = sum(len(e.ids) for e in tokenizer.tk.encode_batch(texts, add_special_tokens=False))
        out[f"{key}_output_pieces"] = round(n / max(len(texts), 1), 2)
        out[f"{key}_pieces_per_s"] = round(n / seconds[key], 1) if seconds.get(key) else None
    return out


def scores(outputs: list[str], rows: list[dict[str, str]]) -> dict[str, float]:
    m = generation_metrics(outputs, [[r["target"]] for r in rows])
    return {"bleu": round(m["bleu"], 2), "chrf": round(m["chrf"], 2)}


def stamp(text: str) -> float:
    """Seconds of an eole log timestamp (``2026-12-02 17:24:26,372``)."""
    return time.mktime(time.strptime(text[:19], "%Y-%m-%d %H:%M:%S")) + int(text[20:23]) / 1000


# ---- OpenNMT (eole) ---------------------------------------------------------------------------------------------

def eole_env(meta: dict[str, Any]) -> Path | None:
    """bench/.envs/eole: a venv that sees this venv's packages (torch 2.13) through a .pth file, with eole installed
    from the package index. None (and meta['opennmt_skipped'] says why) when that fails."""
    env = ENVS / "eole"
    exe = env / "bin" / "eole"
    if not exe.is_file():
        ENVS.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        site = next((env / "lib").glob("python*/site-packages"))
        base = next(Path(sys.executable).parent.parent.glob("lib/python*/site-packages"))
        (site / "_sora_base.pth").write_text(f"{base}\n")
        proc = subprocess.run([str(env / "bin" / "pip"), "install", "-q", *EOLE_SPEC], capture_output=True, text=True)
        if proc.returncode != 0:
            meta["opennmt_skipped"] = f"pip install {' '.join(EOLE_SPEC)} failed: {(proc.stderr or proc.stdout)[-600:]}"
            return None
    proc = subprocess.run([str(env / "bin" / "python"), "-c",
                           "import importlib.metadata as m, torch; print(m.version('eole'), torch.__version__)"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        meta["opennmt_skipped"] = f"eole does not import: {proc.stderr[-600:]}"
        return None
    meta["peer_version"] = {"eole": proc.stdout.split()[0], "torch": proc.stdout.split()[1]}
    return env


def run_eole(env: Path, root: Path, budget: dict[str, Any], device: torch.device, threads: int,
             splits: dict[str, list[dict[str, str]]], tokenizer: SoraTokenizer, pieces: float,
             commands: dict[str, str]) -> dict[str, Any]:
    work = root / "opennmt"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)

    def pieces_of(texts: list[str]) -> list[str]:
        return [" ".join(e.tokens) for e in tokenizer.tk.encode_batch(texts, add_special_tokens=False)]

    files = {}
    for split, rows in splits.items():
        for side, lang in (("source", "src"), ("target", "tgt")):
            f = work / f"{split}.{lang}"
            f.write_text("\n".join(pieces_of([r[side] for r in rows])) + "\n", encoding="utf-8")
            files[f"{split}.{lang}"] = str(f)
    gpu = device.type == "cuda"
    config = {
        "save_data": str(work / "data"), "overwrite": True, "seed": 13, "report_every": max(1, budget["steps"] // 10),
        "src_vocab": str(work / "vocab.shared"), "tgt_vocab": str(work / "vocab.shared"), "share_vocab": True,
        "src_vocab_size": budget["vocab"] + 16, "tgt_vocab_size": budget["vocab"] + 16,
        "data": {"corpus_1": {"path_src": files["train.src"], "path_tgt": files["train.tgt"]},
                 "valid": {"path_src": files["validation.src"], "path_tgt": files["validation.tgt"]}},
        "training": {
            "model_path": str(work / "model"), "save_checkpoint_steps": budget["steps"], "keep_checkpoint": 1,
            "train_steps": budget["steps"], "valid_steps": budget["steps"], "batch_type": "sents",
            "batch_size": budget["batch_size"], "valid_batch_size": 32, "num_workers": 0,
            "world_size": 1, "gpu_ranks": [0] if gpu else [], "accum_count": [1], "accum_steps": [0],
            "dropout": [0.1], "attention_dropout": [0.1], "dropout_steps": [0], "optim": "adam", "learning_rate": 2.0,
            "warmup_steps": max(1, budget["steps"] // 10), "decay_method": "noam", "adam_beta2": 0.998,
            "max_grad_norm": 0, "label_smoothing": 0.1, "param_init_method": "xavier_uniform",
            "normalization": "tokens", **({"compute_dtype": "fp16"} if gpu else {}),
        },
        "model": {"architecture": "transformer", "hidden_size": budget["dim"], "layers": budget["layers"],
                  "heads": budget["heads"], "transformer_ff": budget["ffn_dim"], "share_decoder_embeddings": True,
                  "share_embeddings": True, "embeddings": {"word_vec_size": budget["dim"]}},
    }
    cfg = write_yaml(work / "train.yaml", config)
    exe = str(env / "bin" / "eole")
    envv = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}

    def call(name: str, argv: list[str]) -> str:
        log(f"  $ {shlex.join(argv)}")
        commands[f"opennmt_{name}"] = shlex.join(argv)
        proc = subprocess.run(argv, capture_output=True, text=True, env=envv, cwd=work)
        text = proc.stdout + proc.stderr
        (work / f"{name}.log").write_text(text)
        if proc.returncode != 0:
            raise RuntimeError(f"eole {name} exited {proc.returncode}: {text.strip()[-800:]}")
        return text

    call("build_vocab", [exe, "build_vocab", "-config", str(cfg), "-n_sample", "-1"])
    t0 = time.perf_counter()
    train_log = call("train", [exe, "train", "-config", str(cfg)])
    wall = time.perf_counter() - t0
    # Steady state, from the step log's timestamps: the first report (start-up, the first batches) to the last.
    marks = [(stamp(t), int(s)) for t, s in re.findall(r"^\[([\d\- :,]+) INFO\] Step\s+(\d+)/", train_log, re.M)]
    steps_seen = [s for _, s in marks]
    if len(marks) >= 2:
        seconds, timed_steps = marks[-1][0] - marks[0][0], marks[-1][1] - marks[0][1]
    else:
        seconds, timed_steps = wall, budget["steps"]
    if not (work / "model" / "config.json").is_file():
        raise RuntimeError(f"eole train wrote no model under {work}")
    model_path = str(work / "model")
    sources = [r["source"] for r in splits["test"]]
    out: dict[str, Any] = {}
    for beam in (1, 4):
        pred = work / f"pred.beam{beam}.txt"
        seconds_each: list[float] = []
        for _ in range(budget["decode_repeats"]):  # the median of repeated predicts, as Sora's decoding is timed
            text = call(f"predict_beam{beam}", [exe, "predict", "-model_path", model_path, "-src",
                                                 files["test.src"], "-output", str(pred), "-beam_size", str(beam),
                                                 "-batch_size", str(DECODE_BATCH), "-batch_type", "sents",
                                                 "-max_length", str(budget["max_target_length"]), "-seed", "13",
                                                 *(["-gpu_ranks", "0", "-world_size", "1"] if gpu else [])])
            start = re.search(r"^\[([\d\- :,]+) INFO\] Build and loading model took", text, re.M)
            end = re.search(r"^\[([\d\- :,]+) INFO\] PRED SCORE", text, re.M)
            if start and end:
                seconds_each.append(stamp(end.group(1)) - stamp(start.group(1)))
        outputs = [tokenizer.tk.decoder.decode(line.split()).strip()
                   for line in pred.read_text(encoding="utf-8").splitlines()]
        key = "greedy" if beam == 1 else "beam4"
        out[key] = outputs
        out[f"{key}_seconds"] = statistics.median(seconds_each) if seconds_each else None
    return {**scores(out["beam4"], splits["test"]),
            "greedy_bleu": round(scores(out["greedy"], splits["test"])["bleu"], 2),
            "train_tokens_per_s": round(timed_steps * budget["batch_size"] * pieces / max(seconds, 1e-3), 1),
            "eole_reported_tok_per_s": re.findall(r"(\d+)/\s*(\d+) tok/s", train_log)[-1:],
            "greedy_sents_per_s": round(len(sources) / out["greedy_seconds"], 2) if out["greedy_seconds"] else None,
            "beam4_sents_per_s": round(len(sources) / out["beam4_seconds"], 2) if out["beam4_seconds"] else None,
            **decoded({k: out[k] for k in ("greedy", "beam4")},
                      {k: out[f"{k}_seconds"] for k in ("greedy", "beam4")}, tokenizer),
            "steps": steps_seen[-1] if steps_seen else budget["steps"], "train_seconds": round(seconds, 1),
            "train_wall_s": round(wall, 1), "timed_steps": timed_steps,
            "examples": [{"source": s, "output": o, "reference": r["target"]}
                         for s, o, r in list(zip(sources, out["beam4"], splits["test"], strict=True))[:3]]}


# ---- main -------------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--systems", default=None, help=f"default: {','.join(SYSTEMS)} "
                                                         f"(--quick: {','.join(QUICK_SYSTEMS)})")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the budget's)")
    parser.add_argument("--batch-size", type=int, help="sentence pairs per step (default: the budget's)")
    parser.add_argument("--max-test", type=int, help="test sentences (seeded sample; default: the budget's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    offline()
    device = resolve_device(args.device)
    threads = args.threads or set_threads()
    torch.set_num_threads(threads)
    name = "quick" if args.quick else ("cuda" if device.type == "cuda" else "cpu")
    budget = dict(BUDGETS[name])
    for key, value in (("steps", args.steps), ("batch_size", args.batch_size), ("test", args.max_test)):
        if value is not None:
            budget[key] = value
    chosen = args.systems or ",".join(QUICK_SYSTEMS if args.quick else SYSTEMS)
    systems = [s.strip() for s in chosen.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"--systems: unknown {sorted(unknown)} (choose from {', '.join(SYSTEMS)})")
    t_start = time.perf_counter()
    root = WORK / f"{name}-{budget['steps']}x{budget['batch_size']}"
    if root.exists():
        shutil.rmtree(root)
    splits = prepare_data(root, budget, args.seed)
    commands: dict[str, str] = {}
    meta: dict[str, Any] = {}
    # The shared BPE every token count is in (and the pieces eole reads): the from-scratch model's tokenizer.
    tokenizer = SoraTokenizer.load(scratch_encoder(root, budget, device, threads, commands) / "model")
    enc = tokenizer.tk.encode_batch([r[k] for r in splits["train"] for k in ("source", "target")],
                                    add_special_tokens=False)
    pieces = 2 * statistics.fmean(len(e.ids) for e in enc)  # source + target pieces per training pair
    results: dict[str, Any] = {}
    for system in systems:
        log(f"{system}: {budget['steps']} steps × {budget['batch_size']} pairs")
        try:
            if system == "opennmt":
                env = eole_env(meta)
                if env is None:
                    results[system] = {"skipped": meta["opennmt_skipped"]}
                    continue
                results[system] = run_eole(env, root, budget, device, threads, splits, tokenizer, pieces, commands)
            else:
                results[system] = run_sora_system(root, system, budget, device, threads, splits, tokenizer, pieces,
                                                  commands)
        except Exception as exc:  # one system failing is reported, the others still run
            results[system] = {"skipped": f"{type(exc).__name__}: {str(exc)[-800:]}"}
            if system == "opennmt":
                meta["opennmt_skipped"] = results[system]["skipped"]
        r = results[system]
        log(f"  {system}: " + ", ".join(f"{k} {r[k]}" for k in ("bleu", "chrf", "train_tokens_per_s",
                                                               "greedy_sents_per_s", "beam4_sents_per_s") if k in r)
            + (f" skipped: {r['skipped'][:200]}" if "skipped" in r else ""))
    payload = {**results, "meta": {
        **meta, "commands": {**commands, "bench": command_line()}, "quick": args.quick, "budget": {
            **budget, "unit": "optimizer steps of batch_size sentence pairs, the same for every system",
            "train_pairs": len(splits["train"]), "validation_pairs": len(splits["validation"]),
            "test_pairs": len(splits["test"])},
        "bleu": "sacreBLEU 13a on detokenised beam-4 outputs against the one Multi30k reference (chrF: sacreBLEU chrF)",
        "tokens": f"source + target pieces of the shared BPE per training pair ({pieces:.2f}) × pairs seen / "
                  "steady-state training s (Sora: its log's per-step times after the first tenth of the steps; "
                  "eole: its step log, first report to last)",
        "train_seconds": "Sora: the fit loop's seconds as `sora finetune` prints them (all steps, its start-up and "
                         "validation BLEU decoding included); eole: steady state, from its first step log line to its "
                         "last (start-up and first report window excluded)",
        "decoding": f"test sources, batches of {DECODE_BATCH}; Sora in-process (sora.load().generate), eole from its "
                    "log timestamps between 'loading model took' and 'PRED SCORE' (start-up excluded); each the "
                    f"median of {budget['decode_repeats']} decodings",
        "device": machine_info(device), "threads": threads, "load_average": load_average(),
        "elapsed_s": round(time.perf_counter() - t_start, 1)}}
    write_result("translate", args.quick, payload)
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
