"""Decoding speed with and without the key/value cache (issue 15): ``sora.models.generate.generate`` on a seq2seq
head, greedy and beam 4, the cache on (each step feeds one token; keys and values of the prefix are kept) and off
(each step recomputes the whole prefix).

The model is a Multi30k-sized translation model (encoder and decoder 3 layers, width 256, 4 heads, feed-forward
1024; an 8000-token BPE trained on Multi30k's English and German training text), with its initial weights: speed
does not depend on what the weights say, only on how many tokens are decoded, so every output is made exactly
``length`` tokens long (``min_length``) and both modes decode the same tokens (checked: their outputs are equal).
Sources: the first Multi30k validation sentences (English), batches of 32. Cache and no-cache runs are interleaved
over the repeats, so background load hits both alike; the median is reported.

    python bench/generate_speed.py            # -> bench/results/generate_speed.json
    python bench/generate_speed.py --quick    # -> bench/results/generate_speed.quick.json (under 2 minutes)
    python bench/generate_speed.py --device cuda
    python bench/generate_speed.py --quick --threads 1   # a shared, loaded CPU: one thread is not held up by others
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from common import (
    SHARED_DATA,
    add_common_args,
    command_line,
    load_average,
    machine_info,
    median,
    offline,
    resolve_device,
    set_threads,
    sync,
    write_result,
)

from sora.config import ModelConfig, TaskConfig
from sora.data.seq2seq import Seq2SeqExample
from sora.data.tasks import TaskData
from sora.models.autoencoder import SoraModel
from sora.models.generate import generate
from sora.models.heads import add_head
from sora.tasks import kind_of
from sora.text.tokenizer import train_tokenizer

DATA = SHARED_DATA / "multi30k_en_de"
FALLBACK = ["a man in a blue shirt is standing on a ladder cleaning windows",
            "two young children are playing with a ball in the park",
            "a woman with a large purse is walking by a gate",
            "a group of people are sitting at a table outside a restaurant"]


def read_rows(split: str, n: int) -> list[dict[str, str]]:
    path = DATA / f"{split}.jsonl"
    if not path.is_file():
        return [{"source": s, "target": s} for s in (FALLBACK * (n // len(FALLBACK) + 1))[:n]]
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def build(device: torch.device) -> tuple[SoraModel, Any]:
    rows = read_rows("train", 3000)
    tokenizer = train_tokenizer([r["source"] for r in rows] + [r["target"] for r in rows], vocab_size=8000)
    torch.manual_seed(0)
    model = SoraModel(ModelConfig(vocab_size=tokenizer.vocab_size, dim=256, layers=3, heads=4, ffn_dim=1024,
                                  code_dim=256, decoder_layers=3, max_length=160, dropout=0.0))
    task = TaskConfig(name="translate", type="seq2seq", options={"max_target_length": 150})
    examples = [Seq2SeqExample(r["source"], [r["target"]]) for r in rows[:10]]
    add_head(model, "translate", kind_of(task).spec(task, TaskData(task, False, None, examples), False))
    return model.to(device).eval(), tokenizer


def time_decoding(model: SoraModel, tokenizer: Any, sources: list[str], device: torch.device, beam: int,
                  length: int, cache: bool) -> tuple[float, list[list[int]]]:
    head = model.heads["translate"]
    batch = tokenizer.encode(sources, 128)
    width = max(len(b) for b in batch)
    ids = torch.tensor([b + [tokenizer.pad_id] * (width - len(b)) for b in batch], device=device)
    mask = ids != tokenizer.pad_id
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        memory, memory_mask = head.memory(model.run(ids, mask))
        out = generate(head, memory, memory_mask, tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, beam=beam,
                       max_length=length, min_length=length, use_cache=cache)
    sync(device)
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--batch", type=int, default=32, help="sources per generate() call")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    args = parser.parse_args()
    offline()
    device = resolve_device(args.device)
    threads = set_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
        threads = args.threads
    lengths = [32] if args.quick else [16, 32, 64]
    repeats = 3 if args.quick else 5
    t_start = time.perf_counter()
    model, tokenizer = build(device)
    sources = [r["source"] for r in read_rows("validation", args.batch)]
    results: dict[str, Any] = {}
    for beam in (1, 4):
        for length in lengths:
            time_decoding(model, tokenizer, sources[:4], device, beam, 4, True)  # warm-up
            samples: dict[bool, list[float]] = {True: [], False: []}
            outputs: dict[bool, list[list[int]]] = {}
            for _ in range(repeats):
                for cache in (True, False):
                    seconds, outputs[cache] = time_decoding(model, tokenizer, sources, device, beam, length, cache)
                    samples[cache].append(seconds)
            if outputs[True] != outputs[False]:
                raise SystemExit(f"beam {beam}, length {length}: cached and uncached decoding differ")
            assert all(len(o) == length for o in outputs[True])
            with_cache, without = median(samples[True]), median(samples[False])
            results[f"{'greedy' if beam == 1 else f'beam{beam}'}_len{length}"] = {
                "beam": beam, "tokens_per_sentence": length, "sentences": len(sources),
                "cache_sents_per_s": round(len(sources) / with_cache, 2),
                "no_cache_sents_per_s": round(len(sources) / without, 2),
                "cache_tokens_per_s": round(len(sources) * length / with_cache, 1),
                "no_cache_tokens_per_s": round(len(sources) * length / without, 1),
                "speedup": round(without / with_cache, 2),
                "cache_s": [round(s, 4) for s in samples[True]], "no_cache_s": [round(s, 4) for s in samples[False]],
            }
            print(f"beam {beam} len {length}: cache {len(sources) / with_cache:.1f} sents/s, "
                  f"no cache {len(sources) / without:.1f} sents/s ({without / with_cache:.2f}x)", flush=True)
    payload = {
        "results": results,
        "meta": {
            "command": command_line(), "quick": args.quick, "device": machine_info(device), "threads": threads,
            "model": {"dim": 256, "encoder_layers": 3, "decoder_layers": 3, "heads": 4, "ffn_dim": 1024,
                      "vocab": tokenizer.vocab_size, "weights": "initial (speed only)"},
            "sources": f"first {len(sources)} Multi30k validation sentences" if DATA.is_dir() else "fallback texts",
            "repeats": repeats, "statistic": "median", "load_average": load_average(),
            "elapsed_s": round(time.perf_counter() - t_start, 1),
        },
    }
    write_result("generate_speed", args.quick, payload)


if __name__ == "__main__":
    main()
