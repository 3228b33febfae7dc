"""Denoising pretraining speed: Sora's recipe (recipes/adapt-minilm.yaml) vs sentence-transformers' TSDAE loss.

Both start from the same local all-MiniLM-L6-v2, see the same real sentences (SST-2 train, 10+ words)
in the same batches, and run forward + backward + AdamW step (lr 3e-5) in fp32 with the same thread
count. Systems are interleaved (A B A B ...) over repeats so background load hits both alike; the
median per system is reported.

    python bench/pretrain_speed.py            # full run  -> bench/results/pretrain_speed.json
    python bench/pretrain_speed.py --quick    # smoke run -> bench/results/pretrain_speed.quick.json

tokens/s counts the tokens of the original (clean) sentences under MiniLM's WordPiece tokenizer,
which Sora uses too. FLOPs per step come from ``torch.utils.flop_counter.FlopCounterMode`` (forward
+ backward; matmuls and attention, not the optimizer's elementwise work); achieved FLOP/s is compared
with an fp32 ``torch.mm`` peak measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from common import (
    REPO,
    SHARED_DATA,
    add_common_args,
    command_line,
    load_average,
    machine_info,
    matmul_peak_gflops,
    median,
    minilm_path,
    offline,
    resolve_device,
    set_threads,
    skip,
    sync,
    write_result,
)

NAME = "pretrain_speed"
RECIPE = REPO / "recipes" / "adapt-minilm.yaml"
DATA = SHARED_DATA / "sst2" / "train.jsonl"
LR = 3e-5
DELETE_RATIO = 0.6
MIN_WORDS = 10
WARMUP_STEPS = 2
SEED = 13


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- data


def load_sentences(n: int, seed: int) -> list[str]:
    """``n`` distinct SST-2 training sentences of 10+ words, in a seeded random order."""
    seen: set[str] = set()
    texts: list[str] = []
    with DATA.open(encoding="utf-8") as fh:
        for line in fh:
            text = json.loads(line).get("text", "").strip()
            if len(text.split()) >= MIN_WORDS and text not in seen:
                seen.add(text)
                texts.append(text)
    random.Random(seed).shuffle(texts)
    if len(texts) < n:
        raise SystemExit(f"{DATA} has only {len(texts)} sentences of {MIN_WORDS}+ words, {n} needed")
    return texts[:n]


def delete_words(text: str, rng: random.Random, ratio: float = DELETE_RATIO) -> str:
    """The peer's deletion noise without NLTK: whitespace words, each deleted with p=ratio, one kept at least.
    (DenoisingAutoEncoderDataset.delete uses NLTK's word_tokenize/detokenizer; punkt cannot be downloaded.)"""
    words = text.split()
    if not words:
        return text
    kept = [w for w in words if rng.random() >= ratio]
    return " ".join(kept or [rng.choice(words)])


# ------------------------------------------------------------------------------------------- systems


class System:
    """One trainer: ``step(i)`` runs forward + backward + optimizer step on prepared batch ``i``."""

    name: str
    batches: list[Any]
    tokens: list[int]  # clean-sentence tokens per batch
    opt: torch.optim.Optimizer

    def loss(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def step(self, i: int) -> None:
        self.loss(i).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class SoraSystem(System):
    name = "sora"

    def __init__(self, texts: list[list[str]], max_length: int, device: torch.device):
        from sora.config import load_recipe
        from sora.data.batching import collate
        from sora.objectives import build_objective
        from sora.text.tokenizer import SoraTokenizer
        from sora.train.loop import TrainUnit, _optimizer
        from sora.train.pretrain import build_model

        recipe = load_recipe(RECIPE)
        self.recipe = recipe
        tokenizer = SoraTokenizer.load(minilm_path())
        self.model = build_model(recipe.model, tokenizer)
        objective = build_objective(recipe.objectives[0])
        self.unit = TrainUnit(self.model, {"rec": (1.0, objective)}).to(device)
        self.unit.train()
        train_cfg = recipe.train.model_copy(update={"lr": LR})  # the recipe's lr is 3e-5 already
        self.opt = _optimizer(self.unit.parameters(), train_cfg, None, list(self.unit.named_parameters()))
        self.batches = [collate(tokenizer.encode(b, max_length), tokenizer.pad_id) for b in texts]
        self.batches = [{k: v.to(device) for k, v in b.items()} for b in self.batches]
        self.tokens = [int(b["attention_mask"].sum()) for b in self.batches]
        self.candidates = [len(torch.unique(b["input_ids"][:, 1:][b["attention_mask"][:, 1:]])) for b in self.batches]

    def loss(self, i: int) -> torch.Tensor:
        return self.unit(self.batches[i])["loss"]


class PeerSystem(System):
    name = "peer"

    def __init__(self, texts: list[list[str]], max_length: int, device: torch.device, seed: int):
        from sentence_transformers import SentenceTransformer

        try:
            from sentence_transformers.losses import DenoisingAutoEncoderLoss
        except ImportError:  # 6.x keeps the losses under sentence_transformer/
            from sentence_transformers.sentence_transformer.losses import DenoisingAutoEncoderLoss

        path = str(minilm_path())
        self.model = SentenceTransformer(path, device=str(device))
        self.model.max_seq_length = max_length
        self.loss_fn = DenoisingAutoEncoderLoss(self.model, decoder_name_or_path=path, tie_encoder_decoder=True)
        self.loss_fn.to(device)
        self.loss_fn.train()
        # What its trainer builds by default: transformers' optim "adamw_torch_fused" (torch >= 2.8), no decay.
        try:
            self.opt = torch.optim.AdamW(self.loss_fn.parameters(), lr=LR, weight_decay=0.0, fused=True)
        except (RuntimeError, TypeError):  # fused unsupported on this device/torch
            self.opt = torch.optim.AdamW(self.loss_fn.parameters(), lr=LR, weight_decay=0.0)
        rng = random.Random(seed)
        tokenize = getattr(self.model, "preprocess", None) or self.model.tokenize  # tokenize: before 6.x
        self.batches = []
        for batch in texts:
            noisy = [delete_words(t, rng) for t in batch]
            feats = [tokenize(noisy), tokenize(batch)]  # (damaged, original), as the trainer's collator feeds it
            feats = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in f.items()} for f in feats]
            self.batches.append(feats)
        self.tokens = [int(f[1]["attention_mask"].sum()) for f in self.batches]

    def loss(self, i: int) -> torch.Tensor:
        # The installed loss: forward(sentence_features: Iterable[dict], labels: Tensor); labels are unused.
        return self.loss_fn(self.batches[i], None)


def _describe(opt: torch.optim.Optimizer) -> str:
    impl = "fused" if opt.defaults.get("fused") else "foreach" if opt.defaults.get("foreach") else "torch default"
    return f"{type(opt).__name__} ({impl})"


def unique_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


# ---------------------------------------------------------------------------------------- measuring


def _flop_mapping() -> dict[Any, Callable[..., int]]:
    """FlopCounterMode has no formula for the CPU fused attention kernels; count them like the others."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    mapping: dict[Any, Callable[..., int]] = {}
    fwd_count = getattr(flop_counter, "sdpa_flop_count", None)
    bwd_count = getattr(flop_counter, "sdpa_backward_flop_count", None)
    fwd_op = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd_op = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd_count and fwd_op is not None:
        mapping[fwd_op] = lambda q, k, v, *a, out_shape=None, **kw: fwd_count(q, k, v)
    if bwd_count and bwd_op is not None:
        mapping[bwd_op] = lambda g, q, k, v, *a, out_shape=None, **kw: bwd_count(g, q, k, v)
    return mapping


def warm_up_and_count_flops(system: System, warmup: int) -> list[int]:
    """Warm up (allocator, kernels, optimizer state) with one real step per prepared batch, at least
    ``warmup`` steps, counting each batch's FLOPs on the way: forward + backward, since the optimizer
    step adds only elementwise work, which the counter ignores anyway."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = _flop_mapping()
    out = []
    for i in range(len(system.batches)):
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            system.step(i)
        out.append(int(counter.get_total_flops()))
    for k in range(len(system.batches), warmup):
        system.step(k % len(system.batches))
    return out


def time_steps(system: System, device: torch.device, threads: int) -> tuple[float, float]:
    """Seconds for one pass over the prepared batches (one optimizer step each), and the share of
    ``threads`` cores the process got meanwhile (well under 1.0 on CPU: other processes took cores)."""
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(len(system.batches)):
        system.step(i)
    sync(device)
    wall = time.perf_counter() - t0
    return wall, (time.process_time() - c0) / (wall * threads)


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats per system (5; --quick: 3)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per repeat (2; --quick: 1)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.steps = args.steps or (1 if args.quick else 2)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    offline()
    if not DATA.is_file():
        skip(NAME, f"SST-2 training data not found at {DATA} (needs ../shared/data/sst2/train.jsonl)")
    device = resolve_device(args.device)
    threads = set_threads()
    torch.manual_seed(SEED)
    machine = machine_info(device)
    log(f"machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), torch {machine['torch']}, "
        f"{threads} threads, device {device}" + (f" ({machine['gpu']})" if "gpu" in machine else ""))
    load_before = load_average()

    sentences = load_sentences(args.steps * args.batch_size, SEED)
    texts = [sentences[i : i + args.batch_size] for i in range(0, len(sentences), args.batch_size)]

    t0 = time.perf_counter()
    sora = SoraSystem(texts, args.max_length, device)
    peer = PeerSystem(texts, args.max_length, device, SEED)
    load_s = time.perf_counter() - t0
    log(f"loaded both systems in {load_s:.1f}s; {len(texts)} batches of {args.batch_size}, "
        f"max_length {args.max_length}, {sum(sora.tokens)} tokens per pass")
    if sora.tokens != peer.tokens:
        log(f"warning: token counts differ between tokenizations: sora {sora.tokens} vs peer {peer.tokens}")

    peak, peak_samples = matmul_peak_gflops(device, reps=5 if args.quick else 10)
    log(f"fp32 matmul peak (2048^3 torch.mm, median of {len(peak_samples)}): {peak:.1f} GFLOP/s")

    systems = [sora, peer]
    flops = {s.name: warm_up_and_count_flops(s, WARMUP_STEPS) for s in systems}
    sync(device)

    times: dict[str, list[float]] = {s.name: [] for s in systems}
    cpu_share: dict[str, list[float]] = {s.name: [] for s in systems}
    for r in range(args.repeats):
        for s in systems:  # A B A B ...: background load falls on both
            wall, share = time_steps(s, device, threads)
            times[s.name].append(wall)
            cpu_share[s.name].append(round(share, 2))
        peak_samples += matmul_peak_gflops(device, reps=2)[1]  # the peak under this repeat's conditions too
        log(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{n} {t[-1] / args.steps:.3f} s/step (cpu share {cpu_share[n][-1]:.2f})" for n, t in times.items()))
    peak = median(peak_samples)

    load_after = load_average()
    out: dict[str, Any] = {}
    for s in systems:
        med = median(times[s.name])
        tok = sum(s.tokens)
        fl = sum(flops[s.name])
        out[s.name] = {
            "tokens_per_s": tok / med,
            "step_s": med / args.steps,
            "flops_per_step": fl / args.steps,
            "achieved_gflops": fl / med / 1e9,
            "best_tokens_per_s": tok / min(times[s.name]),
            "samples_s": [round(t, 4) for t in times[s.name]],
        }
    ratio = out["sora"]["tokens_per_s"] / out["peer"]["tokens_per_s"]
    paired = median([p / s for s, p in zip(times["sora"], times["peer"], strict=True)])  # same repeat, same load

    dec = sora.model.decoder
    notes = {
        "sora_architecture": (
            f"recipe adapt-minilm: MiniLM-L6 encoder (6 post-LN BERT layers, dim 384, 12 heads, ffn 1536, "
            f"Sora's own modules with fused SDPA), mean-pooled 384-d code (code_dim null); decoder = "
            f"{len(dec.layers)} pre-LN layers (causal self-attention + cross-attention to ONE memory vector "
            f"from_code(code), ffn 1536), word embedding tied to the encoder's; output softmax over the batch's "
            f"distinct target tokens only (output_vocab=batch: {median(sora.candidates):.0f} candidates per batch "
            f"here, median) instead of 30,522; padding positions are dropped before the output projection."
        ),
        "peer_architecture": (
            "sentence-transformers DenoisingAutoEncoderLoss(tie_encoder_decoder=True): SentenceTransformer "
            "(BertModel MiniLM-L6, mean pooling, Normalize) encoder; decoder = BertLMHeadModel with all 6 layers "
            "(is_decoder, add_cross_attention: each layer self-attention + cross-attention to the one sentence "
            "vector + ffn), its self-attention/ffn/embedding weights tied to the encoder's, cross-attention "
            "fresh; LM head (dense+LayerNorm transform, then the full 30,522-word vocabulary) over every "
            "position, padding included (ignored only in the loss)."
        ),
        "params": {"sora_unique": unique_params(sora.unit), "peer_unique": unique_params(peer.loss_fn)},
        "noise": (
            "Sora: token-level deletion (p=0.6) of WordPiece ids inside the objective, i.e. inside the timed step. "
            "Peer: word-level deletion (whitespace split, p=0.6, at least one word kept, joined with spaces) on "
            "the strings before tokenization, outside the timed step, as its data pipeline does (NLTK punkt, "
            "which DenoisingAutoEncoderDataset.delete uses, is unavailable offline). Tokenization and padding "
            "are outside the timed step for both."
        ),
        "step": (
            "forward + backward + AdamW.step + zero_grad(set_to_none) on every batch; fp32, no autocast, "
            "no gradient clipping (both real trainers clip at 1.0 by default), dropout 0.1 active in both. "
            "Each side gets the optimizer its own trainer builds, lr 3e-5: Sora's is sora.train.loop._optimizer "
            f"({_describe(sora.opt)}, weight decay 0.01 on matrices, none on biases and norms); "
            f"the peer's is {_describe(peer.opt)} over loss.parameters(), the default of the HF Trainer under "
            "SentenceTransformerTrainer (optim adamw_torch_fused for torch >= 2.8, weight_decay 0)."
        ),
        "tokens": "clean-sentence tokens ([CLS]/[SEP] included, padding excluded) under MiniLM's WordPiece, "
                  "truncated to max_length; identical for both systems",
        "flops": "torch.utils.flop_counter.FlopCounterMode over a warm-up step on each batch (matmul, "
                 "attention; CPU fused SDPA counted with the library's own SDPA formula; elementwise ops and "
                 "the optimizer are not counted). achieved = FLOPs per pass / median pass time.",
        "timing": f"warm-up: {max(WARMUP_STEPS, len(texts))} steps each (one per batch, at least "
                  f"{WARMUP_STEPS}; FLOPs counted there), then {args.repeats} interleaved repeats (sora, peer, "
                  f"sora, peer, ...) of {args.steps} steps over the same {len(texts)} batches; medians reported "
                  f"(ratio = median sora tokens/s / median peer tokens/s; ratio_paired_median = median over repeats "
                  f"of the same-repeat ratio; *_best = fastest repeat). cpu_share = process CPU time / (wall x "
                  f"threads) per repeat: well below 1 means other processes took the cores, which slows Sora's "
                  f"step (many small ops) more than the peer's (dominated by the large 30,522-vocabulary GEMM). "
                  f"matmul peak = median of samples before and between repeats. "
                  f"Load average before/after: {load_before} / {load_after}.",
    }

    result = {
        "sora_tokens_per_s": round(out["sora"]["tokens_per_s"], 1),
        "peer_tokens_per_s": round(out["peer"]["tokens_per_s"], 1),
        "ratio": round(ratio, 3),
        "ratio_paired_median": round(paired, 3),
        "ratio_best": round(out["sora"]["best_tokens_per_s"] / out["peer"]["best_tokens_per_s"], 3),
        "sora_best_tokens_per_s": round(out["sora"]["best_tokens_per_s"], 1),
        "peer_best_tokens_per_s": round(out["peer"]["best_tokens_per_s"], 1),
        "sora_step_s": round(out["sora"]["step_s"], 4),
        "peer_step_s": round(out["peer"]["step_s"], 4),
        "sora_flops_per_step": round(out["sora"]["flops_per_step"]),
        "peer_flops_per_step": round(out["peer"]["flops_per_step"]),
        "sora_achieved_gflops": round(out["sora"]["achieved_gflops"], 2),
        "peer_achieved_gflops": round(out["peer"]["achieved_gflops"], 2),
        "matmul_peak_gflops": round(peak, 2),
        "matmul_peak_samples": peak_samples,
        "sora_peak_fraction": round(out["sora"]["achieved_gflops"] / peak, 4),
        "peer_peak_fraction": round(out["peer"]["achieved_gflops"] / peak, 4),
        "sora_samples_s": out["sora"]["samples_s"],
        "peer_samples_s": out["peer"]["samples_s"],
        "sora_cpu_share": cpu_share["sora"],
        "peer_cpu_share": cpu_share["peer"],
        "tokens_per_pass": sum(sora.tokens),
        "mean_tokens_per_sentence": round(sum(sora.tokens) / len(sentences), 2),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "repeats": args.repeats,
        "steps": args.steps,
        "warmup_steps": max(WARMUP_STEPS, len(texts)),
        "quick": args.quick,
        "data": str(DATA.relative_to(REPO.parent)) if DATA.is_relative_to(REPO.parent) else str(DATA),
        "command": command_line(),
        "device": machine,
        "load_average": {"before": load_before, "after": load_after},
        "wall_s": round(time.perf_counter() - t_start, 1),
        "notes": notes,
    }
    log(f"sora {result['sora_tokens_per_s']:,.0f} tok/s, peer {result['peer_tokens_per_s']:,.0f} tok/s, "
        f"ratio {result['ratio']:.2f}; peak fractions sora {result['sora_peak_fraction']:.1%}, "
        f"peer {result['peer_peak_fraction']:.1%}; wall {result['wall_s']}s")
    write_result(NAME, args.quick, result)


if __name__ == "__main__":
    main()
