"""Dialogue summarisation, DialogSum (issue 15): Sora against a lead baseline and HF transformers' EncoderDecoderModel.

Systems, the neural ones trained for the same optimizer steps at the same batch size (dialogue/summary pairs):

  sora                 ``sora finetune RECIPE -o OUT``: all-MiniLM-L6-v2 + a seq2seq head over its token states,
                       Sora's defaults (the budget fixes steps, batch size, target length and patience 0)
  hf_encoder_decoder   ``transformers.EncoderDecoderModel``: the same local all-MiniLM-L6-v2 encoder and a BERT-style
                       decoder (cross-attention, MiniLM's vocabulary) of the Sora head's shape (layers, heads, width,
                       feed-forward, read from the trained Sora checkpoint), trained here by a plain loop as the
                       transformers docs show (AdamW at the Trainer's default lr 5e-5, linear decay, teacher forcing),
                       decoded by ``generate`` with 4 beams; no hub download
  lead                 the dialogue's first two turns, speaker tags kept (the "first sentences" baseline)

ROUGE-1/2/L F1 (``rouge-score`` with stemming, via ``sora.metrics.generation``) on test, **max over DialogSum's three
references per dialogue, then the mean** (the data carries all three: ``references``).

    python bench/summarize.py --quick          # -> bench/results/summarize.quick.json (under 2 minutes)
    python bench/summarize.py                  # CPU: 1,000 steps of 16 (hours on 2 cores)
    python bench/summarize.py --device cuda    # ~3 epochs at batch 32: minutes on a GPU
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
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

DATA = SHARED_DATA / "dialogsum"
WORK = REPO / "runs" / "summarize"
SYSTEMS = ("sora", "hf_encoder_decoder", "lead")
BUDGETS = {
    "quick": {"steps": 10, "batch_size": 4, "train": 200, "validation": 4, "test": 12, "max_target_length": 32,
              "max_source_length": 128},
    "cpu": {"steps": 1000, "batch_size": 16, "train": None, "validation": 100, "test": None, "max_target_length": 96,
            "max_source_length": 256},
    "cuda": {"steps": 1200, "batch_size": 32, "train": None, "validation": None, "test": None,
             "max_target_length": 96, "max_source_length": 256},
}
FINETUNE = "sora finetune {recipe} -o {out}"
LEAD_TURNS = 2


def read(split: str) -> list[dict[str, Any]]:
    with (DATA / f"{split}.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def references(row: dict[str, Any]) -> list[str]:
    return list(row.get("references") or [row["target"]])


def rouge_of(outputs: list[str], rows: list[dict[str, Any]]) -> dict[str, float]:
    m = generation_metrics(outputs, [references(r) for r in rows])
    return {k: round(m[k], 2) for k in ("rouge1", "rouge2", "rougeL")}


def lead(row: dict[str, Any]) -> str:
    return " ".join([t.strip() for t in row["source"].splitlines() if t.strip()][:LEAD_TURNS])


def run_sora_system(root: Path, budget: dict[str, Any], device: torch.device, threads: int,
                    test: list[dict[str, Any]], commands: dict[str, str]) -> tuple[dict[str, Any], Path]:
    out = root / "sora"
    recipe = root / "sora.yaml"
    recipe.write_text(yaml.safe_dump({
        "data": {"batch_size": budget["batch_size"], "max_length": budget["max_source_length"]},
        "finetune": {"init": str(minilm_path()), "max_steps": budget["steps"], "patience": 0},
        "tasks": [{"name": "summary", "type": "seq2seq", "data": str(root / "data"), "metric": "rougeL",
                   "options": {"max_target_length": budget["max_target_length"]}}],
        "train": {"progress": False},
    }, sort_keys=False), encoding="utf-8")
    stdout, wall, argv = run_sora(FINETUNE, device, threads, recipe=recipe, out=out)
    commands["sora"] = shlex.join(argv)
    m = re.search(r"\((\d+) steps, ([\d.]+) s\)", stdout)
    model = sora.load(out, device=str(device))
    t0 = time.perf_counter()
    outputs = model.generate([r["source"] for r in test], beam=4, batch_size=16)
    seconds = time.perf_counter() - t0
    return ({**rouge_of(outputs, test), "steps": int(m.group(1)) if m else budget["steps"],
             "train_seconds": float(m.group(2)) if m else round(wall, 1),
             "beam4_sents_per_s": round(len(test) / seconds, 2), "example": outputs[0]}, out / "model")


def run_hf(sora_model: Path, budget: dict[str, Any], device: torch.device, train: list[dict[str, Any]],
           test: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    from transformers import AutoTokenizer, BertConfig, BertLMHeadModel, BertModel, EncoderDecoderModel
    from transformers import get_linear_schedule_with_warmup as linear

    head = json.loads((sora_model / "config.json").read_text())["heads"]["summary"]["options"]
    path = str(minilm_path())
    tok = AutoTokenizer.from_pretrained(path)
    encoder = BertModel.from_pretrained(path, add_pooling_layer=False)
    enc_cfg = encoder.config
    dec_cfg = BertConfig(vocab_size=enc_cfg.vocab_size, hidden_size=enc_cfg.hidden_size,
                         num_hidden_layers=head["layers"], num_attention_heads=head["heads"],
                         intermediate_size=head["ffn_dim"], max_position_embeddings=enc_cfg.max_position_embeddings,
                         is_decoder=True, add_cross_attention=True)
    torch.manual_seed(seed)
    model = EncoderDecoderModel(encoder=encoder, decoder=BertLMHeadModel(dec_cfg)).to(device)
    model.config.decoder_start_token_id = tok.cls_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.sep_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    sched = linear(opt, 0, budget["steps"])
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(budget["steps"]):
        idx = torch.randint(len(train), (budget["batch_size"],), generator=g).tolist()
        src = tok([train[i]["source"] for i in idx], truncation=True, max_length=budget["max_source_length"],
                  padding=True, return_tensors="pt").to(device)
        tgt = tok([train[i]["target"] for i in idx], truncation=True, max_length=budget["max_target_length"] + 1,
                  padding=True, return_tensors="pt").to(device)
        labels = tgt.input_ids.masked_fill(tgt.attention_mask == 0, -100)
        loss = model(input_ids=src.input_ids, attention_mask=src.attention_mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % max(1, budget["steps"] // 5) == 0:
            log(f"  hf step {step}: loss {float(loss):.3f}")
    train_s = time.perf_counter() - t0
    model.eval()
    outputs: list[str] = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(test), 16):
            src = tok([r["source"] for r in test[i:i + 16]], truncation=True, max_length=budget["max_source_length"],
                      padding=True, return_tensors="pt").to(device)
            ids = model.generate(input_ids=src.input_ids, attention_mask=src.attention_mask, num_beams=4,
                                 max_new_tokens=budget["max_target_length"], decoder_start_token_id=tok.cls_token_id,
                                 eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
            outputs += tok.batch_decode(ids, skip_special_tokens=True)
    seconds = time.perf_counter() - t0
    return {**rouge_of(outputs, test), "steps": budget["steps"], "train_seconds": round(train_s, 1),
            "beam4_sents_per_s": round(len(test) / seconds, 2), "example": outputs[0],
            "decoder": {"layers": head["layers"], "heads": head["heads"], "ffn_dim": head["ffn_dim"],
                        "hidden": enc_cfg.hidden_size, "lr": 5e-5}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--max-test", type=int)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    offline()
    device = resolve_device(args.device)
    threads = args.threads or set_threads()
    torch.set_num_threads(threads)
    name = "quick" if args.quick else ("cuda" if device.type == "cuda" else "cpu")
    budget = dict(BUDGETS[name])
    if args.steps:
        budget["steps"] = args.steps
    if args.max_test:
        budget["test"] = args.max_test
    t_start = time.perf_counter()
    root = WORK / f"{name}-{budget['steps']}x{budget['batch_size']}"
    if root.exists():
        shutil.rmtree(root)
    (root / "data").mkdir(parents=True)
    splits = {s: seeded_sample(read(s), budget[s], args.seed) for s in ("train", "validation", "test")}
    for split, rows in splits.items():
        (root / "data" / f"{split}.jsonl").write_text(
            "".join(json.dumps({"source": r["source"], "target": r["target"],
                                **({"references": references(r)} if split == "test" else {})},
                               ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    test = splits["test"]
    commands: dict[str, str] = {"bench": command_line()}
    results: dict[str, Any] = {"lead": rouge_of([lead(r) for r in test], test)}
    log(f"lead: {results['lead']}")
    results["sora"], sora_model = run_sora_system(root, budget, device, threads, test, commands)
    log(f"sora: {results['sora']}")
    try:
        results["hf_encoder_decoder"] = run_hf(sora_model, budget, device, splits["train"], test, args.seed)
    except ImportError as exc:
        results["hf_encoder_decoder"] = {"skipped": f"transformers is not installed: {exc}"}
    log(f"hf_encoder_decoder: {results['hf_encoder_decoder']}")
    refs = sum(len(references(r)) for r in test) / max(1, len(test))
    payload = {**results, "meta": {
        "commands": commands, "quick": args.quick,
        "budget": {**budget, "unit": "optimizer steps of batch_size dialogue/summary pairs, the same for both models",
                   "train_pairs": len(splits["train"]), "test_dialogues": len(test)},
        "rouge": f"rouge-score F1 with stemming; per dialogue the max over its references ({refs:.1f} on average), "
                 "then the mean over dialogues",
        "lead": f"the first {LEAD_TURNS} turns of the dialogue", "decoding": "beam 4 for both models",
        "device": machine_info(device), "threads": threads, "load_average": load_average(),
        "elapsed_s": round(time.perf_counter() - t_start, 1)}}
    write_result("summarize", args.quick, payload)
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
