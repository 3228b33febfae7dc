"""Fine-tuning speed: Sora's training step (as run_finetune runs it) vs the Hugging Face Trainer's, on MiniLM.

Both fine-tune the same local all-MiniLM-L6-v2 with a 2-class head on the same real SST-2 sentences, batch
size 32, max_length 64, fp32 (CPU), lr 5e-5, weight decay 0.01, gradient clipping 1.0, linear schedule, dropout
0.1, fused AdamW (Sora: sora.train.loop._optimizer; the Trainer: its default adamw_torch_fused).

  sora  built from Sora's own pieces as run_finetune builds it: init_model("all-MiniLM-L6-v2") + add_head +
        TaskLoss in a TrainUnit, _optimizer + LambdaLR(lr_lambda); each timed step is the body of
        sora.train.loop.fit: collate the batch (sora.data.tasks.make_batch), re-seed, forward, backward,
        loss readout, clip_grad_norm_, optimizer step, scheduler step, zero_grad(set_to_none)
  peer  transformers AutoModelForSequenceClassification + Trainer: the REAL Trainer.train() loop (data loader
        and collator included). A callback stamps the clock at step ends; setup (model wrapping, optimizer
        creation, first epoch = warm-up) is outside the timed windows. Sora's repeats run inside that callback,
        between the Trainer's timed windows, so the two alternate (A B A B ...) under the same background load.

Batchings, each one Trainer run with Sora interleaved (repeat = one epoch over the same sentences):
  same_batches     both take the identical batches in the same order (a seeded shuffle, sequential sampler):
                   the step itself, like for like. This is the headline ``ratio``.
  default          each as it runs out of the box: Sora's task_batches (length-bucketed batches, as
                   run_finetune feeds them) vs the Trainer's default RandomSampler.
  group_by_length  (only with --variants) Sora's task_batches vs the Trainer with
                   train_sampling_strategy="group_by_length". Not run by default: the Trainer sorts within
                   megabatches of min(50, n / (4 x batch)) batches, so on an epoch of a few batches (all this CPU
                   allows per repeat) it degenerates to random batches; from 6,400 examples on it sorts within 50
                   batches, as Sora's task_batches does, and the same_batches ratio is the one that applies.

    python bench/finetune_speed.py            # -> bench/results/finetune_speed.json
    python bench/finetune_speed.py --quick    # -> bench/results/finetune_speed.quick.json
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from typing import Any

import torch
from common import (
    REPO,
    SHARED_DATA,
    add_common_args,
    command_line,
    load_average,
    machine_info,
    median,
    minilm_path,
    offline,
    resolve_device,
    set_threads,
    skip,
    sst2_examples,
    sync,
    write_result,
)

sys.path.insert(0, str(REPO / "src"))

NAME = "finetune_speed"
LR = 5e-5
SEED = 13
LABELS = ["negative", "positive"]
VARIANTS = {"same_batches": "sequential", "default": "random", "group_by_length": "group_by_length"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class SoraStepper:
    """run_finetune's model, objective and optimizer, stepped exactly as sora.train.loop.fit steps them."""

    def __init__(self, rows: list[tuple[str, str]], max_length: int, batch_size: int, device: torch.device):
        from sora.config import FinetuneRecipe, TrainConfig
        from sora.data.tasks import Example, encode_examples
        from sora.models.heads import HeadSpec, add_head
        from sora.objectives import TaskLoss
        from sora.tasks import kind_of
        from sora.train.finetune import init_model, layer_lr_scale
        from sora.train.loop import TrainUnit, _optimizer, lr_lambda

        recipe = FinetuneRecipe()
        torch.manual_seed(SEED)
        self.model, self.tokenizer, _ = init_model("all-MiniLM-L6-v2", recipe)
        add_head(self.model, "task", HeadSpec(type="classification", labels=LABELS, dropout=0.1))
        objectives = {"task": (1.0, TaskLoss("task", "classification"))}
        self.unit = TrainUnit(self.model, objectives).to(device)
        self.unit.train()
        self.cfg = TrainConfig(lr=LR, warmup_steps=0, max_steps=10_000, grad_clip=1.0, weight_decay=0.01,
                               schedule="linear", seed=SEED)
        named = list(self.unit.named_parameters())
        self.opt = _optimizer(self.unit.parameters(), self.cfg, layer_lr_scale(self.model, 1.0, 1.0), named)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(self.cfg))
        examples = [Example(t, lb) for t, lb in rows]
        self.encoded = encode_examples(examples, False, "cross", self.tokenizer, max_length)
        self.targets = kind_of("classification").targets(examples, LABELS)
        self.batch_size, self.device, self.step_no = batch_size, device, 0

    def batches(self, order: list[list[int]] | None, epoch: int):
        """Raw batches as fit receives them: the given index chunks, or run_finetune's task_batches."""
        from sora.data.tasks import make_batch, task_batches

        if order is None:
            yield from task_batches(self.encoded, self.targets, self.batch_size, self.tokenizer.pad_id, seed=SEED,
                                    epoch=epoch)
            return
        for idx in order:
            batch = make_batch([self.encoded[i] for i in idx], self.tokenizer.pad_id)
            batch["labels"] = self.targets[idx]
            yield batch

    def run_epoch(self, order: list[list[int]] | None, epoch: int) -> tuple[int, int]:
        """One pass; returns (examples, tokens). Everything here is inside the timed window."""
        n = tokens = 0
        for batch in self.batches(order, epoch):
            torch.manual_seed(self.cfg.seed * 1_000_003 + self.step_no * 997)
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            losses = self.unit(batch)
            losses["loss"].backward()
            _ = {k: float(v.detach()) for k, v in losses.items()}
            torch.nn.utils.clip_grad_norm_(self.unit.parameters(), self.cfg.grad_clip)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            self.step_no += 1
            n += int(batch["labels"].numel())
            tokens += int(batch["attention_mask"].sum())
        return n, tokens


def run_variant(variant: str, rows: list[tuple[str, str]], args: argparse.Namespace, device: torch.device,
                threads: int, sora: SoraStepper) -> dict[str, Any]:
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    path = str(minilm_path())
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok([t for t, _ in rows], truncation=True, max_length=args.max_length)
    index = {lb: i for i, lb in enumerate(LABELS)}
    data = [{**{k: enc[k][i] for k in enc}, "labels": index[lb]} for i, (_, lb) in enumerate(rows)]
    per_epoch = len(rows) // args.batch_size
    # same_batches: consecutive chunks in the dataset's (already seeded-shuffled) order, for both systems.
    order = [list(range(s, s + args.batch_size)) for s in range(0, len(rows), args.batch_size)]
    sora_order = order if variant == "same_batches" else None
    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, id2label=dict(enumerate(LABELS)), label2id=index)
    out = tempfile.mkdtemp(prefix="finetune_speed-")
    targs = TrainingArguments(
        output_dir=out, per_device_train_batch_size=args.batch_size, learning_rate=LR, weight_decay=0.01,
        max_grad_norm=1.0, lr_scheduler_type="linear", warmup_steps=0, max_steps=per_epoch * (1 + args.repeats),
        train_sampling_strategy=VARIANTS[variant], logging_strategy="no", save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, seed=SEED, use_cpu=device.type == "cpu", bf16=False, fp16=False,
        dataloader_num_workers=0, dataloader_pin_memory=False)
    times: dict[str, list[float]] = {"sora": [], "peer": []}
    shares: dict[str, list[float]] = {"sora": [], "peer": []}
    counts: dict[str, list[tuple[int, int]]] = {"sora": [], "peer": []}
    peer_tokens = [0]

    class Clock(TrainerCallback):
        """At each epoch boundary: close the Trainer's window, run one Sora epoch, open the next window."""

        t0 = c0 = 0.0

        def on_step_end(self, a, state, control, **kw):
            if state.global_step % per_epoch:
                return control
            k = state.global_step // per_epoch  # epochs done; the first is the Trainer's warm-up
            sync(device)
            if k >= 2:
                wall = time.perf_counter() - self.t0
                times["peer"].append(wall)
                shares["peer"].append(round((time.process_time() - self.c0) / (wall * threads), 2))
                counts["peer"].append((per_epoch * args.batch_size, peer_tokens[0]))
            if k <= args.repeats:
                c0, t0 = time.process_time(), time.perf_counter()
                n, tokens = sora.run_epoch(sora_order, epoch=k)
                sync(device)
                wall = time.perf_counter() - t0
                times["sora"].append(wall)
                shares["sora"].append(round((time.process_time() - c0) / (wall * threads), 2))
                counts["sora"].append((n, tokens))
                peer = f"peer {counts['peer'][-1][0] / times['peer'][-1]:.1f} ex/s" if times["peer"] else "peer warm-up"
                log(f"  {variant} repeat {k}/{args.repeats}: sora {n / wall:.1f} ex/s; previous window: {peer}")
            peer_tokens[0] = 0
            sync(device)
            self.c0, self.t0 = time.process_time(), time.perf_counter()
            return control

    class CountingCollator(DataCollatorWithPadding):
        def __call__(self, features):
            batch = super().__call__(features)
            peer_tokens[0] += int(batch["attention_mask"].sum())
            return batch

    trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=CountingCollator(tok),
                      callbacks=[Clock()])
    log(f"{variant}: Trainer optimizer {targs.optim}, sampler {VARIANTS[variant]}, {per_epoch} steps per repeat")
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    res: dict[str, Any] = {"peer_sampler": VARIANTS[variant], "peer_optimizer": str(targs.optim),
                           "sora_batching": "same index chunks as the peer" if sora_order else
                           "sora.data.tasks.task_batches (length-bucketed, shuffled)"}
    for name in ("sora", "peer"):
        med = median(times[name])
        ex = counts[name][0][0]
        res[name] = {"examples_per_s": round(ex / med, 2), "best_examples_per_s": round(ex / min(times[name]), 2),
                     "tokens_per_s": round(median([c[1] / t for c, t in zip(counts[name], times[name], strict=True)]),
                                           1),
                     "tokens_per_epoch": [c[1] for c in counts[name]],
                     "samples_s": [round(t, 3) for t in times[name]], "cpu_share": shares[name]}
    res["ratio"] = round(res["sora"]["examples_per_s"] / res["peer"]["examples_per_s"], 3)
    res["ratio_paired_median"] = round(median([p / s for s, p in zip(times["sora"], times["peer"], strict=True)]), 3)
    del trainer, model
    return res


def profile_steps(sora: SoraStepper, rows, args, device) -> dict[str, Any]:
    """Top operators (self CPU time) of a few identical-batch steps of each system, for --profile."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(minilm_path())
    tok = AutoTokenizer.from_pretrained(path)
    texts = [t for t, _ in rows[: args.batch_size * 3]]
    labels = torch.tensor([LABELS.index(lb) for _, lb in rows[: args.batch_size * 3]])
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, fused=True)
    batches = [tok(texts[i:i + args.batch_size], truncation=True, max_length=args.max_length, padding=True,
                   return_tensors="pt") for i in range(0, len(texts), args.batch_size)]
    order = [list(range(s, s + args.batch_size)) for s in range(0, len(texts), args.batch_size)]

    def hf_steps():
        for i, b in enumerate(batches):
            out = model(**b, labels=labels[i * args.batch_size:(i + 1) * args.batch_size])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    result = {}
    for name, fn in (("sora", lambda: sora.run_epoch(order, 0)), ("peer_manual_step", hf_steps)):
        fn()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        log(f"--- profile {name} ---\n{table}")
        result[name] = [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 1), "calls": e.count}
                        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]]
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per repeat (one epoch) (6; --quick: 2)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats per variant (5; --quick: 2)")
    p.add_argument("--variants", default=None, help=f"comma list of {', '.join(VARIANTS)} (--quick: same_batches)")
    p.add_argument("--min-words", type=int, default=10,
                   help="only SST-2 sentences of this many words (10, as pretrain_speed; 0: all, phrases included)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: all cores; on an oversubscribed CPU 1 can be much faster)")
    p.add_argument("--profile", action="store_true", help="also profile a few steps of each (operator table)")
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 6)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.variants = (args.variants or ("same_batches" if args.quick else "same_batches,default")).split(",")
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant {bad}; known: {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    offline()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if not (SHARED_DATA / "sst2" / "train.jsonl").is_file():
        skip(NAME, "SST-2 training data not found (needs ../shared/data/sst2/train.jsonl)")
    device = resolve_device(args.device)
    threads = set_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
        threads = args.threads
    machine = machine_info(device)
    load_before = load_average()
    rows = sst2_examples(args.steps * args.batch_size, SEED, args.min_words)
    sora = SoraStepper(rows, args.max_length, args.batch_size, device)
    log(f"{len(rows)} SST-2 sentences, batch {args.batch_size}, max_length {args.max_length}, {threads} threads, "
        f"device {device}; sora warm-up epoch")
    sora.run_epoch(None, 0)  # warm-up (the Trainer's is its first epoch)
    variants = {v: run_variant(v, rows, args, device, threads, sora) for v in args.variants}
    head = variants.get("same_batches") or next(iter(variants.values()))
    result: dict[str, Any] = {
        "sora_examples_per_s": head["sora"]["examples_per_s"],
        "peer_examples_per_s": head["peer"]["examples_per_s"],
        "ratio": head["ratio"],
        "ratio_paired_median": head["ratio_paired_median"],
        "headline_variant": "same_batches" if "same_batches" in variants else args.variants[0],
        **{f"ratio_{v}": r["ratio"] for v, r in variants.items()},
        "variants": variants,
        "batch_size": args.batch_size, "max_length": args.max_length, "steps_per_repeat": args.steps,
        "repeats": args.repeats, "sentences": len(rows), "min_words": args.min_words, "quick": args.quick,
        "peer_measurement": "the real Trainer.train() loop, timed between step-end callbacks (one epoch per "
                            "window, after a warm-up epoch), so data loading/collation, Trainer bookkeeping, "
                            "clipping, optimizer and scheduler steps are all inside, setup is not",
        "sora_measurement": "sora.train.loop.fit's step body on run_finetune's objects (collate, re-seed, forward, "
                            "backward, loss readout, clip, fused AdamW step, LambdaLR step, zero_grad); "
                            "fit's logging/bookkeeping per step (a JSON line and tqdm) is not included",
        "command": command_line(), "device": machine,
        "load_average": {"before": load_before, "after": load_average()},
    }
    if args.profile:
        result["profile"] = profile_steps(sora, rows, args, device)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    log(f"sora {result['sora_examples_per_s']} ex/s, peer {result['peer_examples_per_s']} ex/s, ratio "
        f"{result['ratio']} (" + ", ".join(f"{v} {r['ratio']}" for v, r in variants.items()) + ")")
    write_result(NAME, args.quick, result)


if __name__ == "__main__":
    main()
