"""Domain adaptation that keeps what the starting encoder knows: all-MiniLM-L6-v2 adapted on a domain's text.

Issue 11: denoising alone (Sora's earlier recipe, sentence-transformers' TSDAE) rewrote MiniLM's geometry, and
retrieval fell (SciFact nDCG@10 64.5 → 38.6 for Sora, 8.4 for TSDAE) while linear probes saw nothing. Systems,
each adapted on the same sentences for the same steps, batch and lr:

  minilm       all-MiniLM-L6-v2 as it is (no adaptation)
  sora         ``recipes/adapt-minilm.yaml`` as it is now (the default: reconstruction + distillation)
  sora_reconstruct_distill  the previous default: reconstruction + distillation, no cropped views
  sora_before  the earlier recipe: reconstruction only (deletion 0.6)
  st_tsdae     sentence-transformers' DenoisingAutoEncoderLoss, tied decoder, its documented example setup

Metrics (``--metrics``): ``scifact`` test nDCG@10 (adapting on the SciFact corpus split into sentences), ``sick``
test relatedness Spearman of cosine similarities (adapting on SICK's train sentences), ``probe``: the linear
probes of bench/probe.py (sst2, trec, ag_news; adapting on each dataset's train text) with their cosine-kNN
column, and pretraining tokens/s per system (measured while adapting on the SciFact sentences).

    python bench/adapt.py                  # full run -> bench/results/adapt.json
    python bench/adapt.py --quick          # < 2 minutes -> bench/results/adapt.quick.json
    python bench/adapt.py --metrics scifact,sick --steps 300 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO,
    SHARED_DATA,
    command_line,
    load_average,
    machine_info,
    minilm_path,
    offline,
    resolve_device,
    result_path,
    write_json,
    write_result,
)

sys.path.insert(0, str(REPO / "src"))

NAME = "adapt"
SYSTEMS = ("minilm", "sora", "sora_reconstruct_distill", "sora_before", "st_tsdae")
# The recipe's objectives replaced, for the systems that are earlier versions of it.
EARLIER_OBJECTIVES: dict[str, list[dict[str, Any]]] = {
    "sora_reconstruct_distill": [{"name": "reconstruct", "noise": "delete", "ratio": 0.6},
                                 {"name": "distill", "match": "cosine", "weight": 1.0}],
    "sora_before": [{"name": "reconstruct", "noise": "delete", "ratio": 0.6}],
}
METRICS = ("scifact", "sick", "probe", "speed")
RECIPE = REPO / "recipes" / "adapt-minilm.yaml"
SEED = 13

# A sentence ends at . ! ? followed by a space and a capital/digit/bracket, or (SciFact's abstracts were joined
# without spaces: "disabilities.A line scan") directly by a capitalised word.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])|(?<=[a-z0-9)\]][.!?])(?=[A-Z])")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- data


def sentences(texts: list[str], min_words: int = 4) -> list[str]:
    """The distinct sentences of ``texts`` with ``min_words``+ words, in first-seen order."""
    seen: dict[str, None] = {}
    for text in texts:
        for s in _SENTENCE_END.split(text):
            s = " ".join(s.split())
            if len(s.split()) >= min_words:
                seen.setdefault(s)
    return list(seen)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def sample(items: list, n: int | None, seed: int = SEED) -> list:
    if n is None or n >= len(items):
        return list(items)
    return random.Random(seed).sample(items, n)


class SciFact:
    """BEIR SciFact (corpus, test queries, qrels); ``max_corpus`` keeps every document relevant to a test query
    plus seeded distractors (a slice for quick runs; None: the whole corpus, as BEIR scores it)."""

    def __init__(self, root: Path, max_corpus: int | None = None, max_queries: int | None = None):
        corpus = read_jsonl(root / "corpus.jsonl")
        self.all_texts = [d["text"] for d in corpus]
        qrels: dict[str, dict[str, int]] = {}
        with (root / "qrels" / "test.tsv").open(encoding="utf-8") as fh:
            next(fh)
            for line in fh:
                q, d, s = line.rstrip("\n").split("\t")
                if int(s) > 0:
                    qrels.setdefault(q, {})[d] = int(s)
        queries = {q["id"]: q["text"] for q in read_jsonl(root / "queries.jsonl") if q["id"] in qrels}
        qids = sample(sorted(queries), max_queries)
        self.queries = {q: queries[q] for q in qids}
        self.qrels = {q: qrels[q] for q in qids}
        if max_corpus is not None and max_corpus < len(corpus):
            relevant = {d for rel in self.qrels.values() for d in rel}
            rest = [d for d in corpus if d["id"] not in relevant]
            corpus = [d for d in corpus if d["id"] in relevant] + sample(rest, max(0, max_corpus - len(relevant)))
        self.doc_ids = [d["id"] for d in corpus]
        self.docs = [(d.get("title", "") + " " + d["text"]).strip() for d in corpus]

    def train_sentences(self, n: int | None, seed: int = SEED) -> list[str]:
        """The corpus abstracts split into sentences: the unlabeled domain text to adapt on."""
        return sample(sentences(self.all_texts), n, seed)


def ndcg_at_k(scores: np.ndarray, doc_ids: list[str], qrels: list[dict[str, int]], k: int = 10) -> float:
    """Mean nDCG@k (BEIR's, graded gains 2^rel - 1 as pytrec_eval with binary qrels) over queries."""
    top = np.argsort(-scores, axis=1)[:, :k]
    values = []
    for row, rel in zip(top, qrels, strict=True):
        dcg = sum((2 ** rel.get(doc_ids[j], 0) - 1) / math.log2(r + 2) for r, j in enumerate(row))
        ideal = sorted(rel.values(), reverse=True)[:k]
        idcg = sum((2 ** g - 1) / math.log2(r + 2) for r, g in enumerate(ideal))
        values.append(dcg / idcg if idcg > 0 else 0.0)
    return float(np.mean(values))


def _embed(embed, texts: list[str], max_length: int) -> np.ndarray:
    vec = np.asarray(embed(texts, max_length), dtype=np.float32)
    return vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)


def scifact_ndcg(embed, data: SciFact, max_length: int = 256) -> float:
    """Test nDCG@10 of cosine retrieval; ``embed(texts, max_length)`` → (n, dim). Uses
    ``sora.evaluate.retrieval`` when the whole corpus is scored and that module is there."""
    q = _embed(embed, list(data.queries.values()), max_length)
    d = _embed(embed, data.docs, max_length)
    return ndcg_at_k(q @ d.T, data.doc_ids, list(data.qrels.values()))


def sick_pairs(root: Path, split: str, n: int | None = None) -> tuple[list[str], list[str], np.ndarray]:
    rows = sample(read_jsonl(root / f"{split}.jsonl"), n)
    return [r["text_a"] for r in rows], [r["text_b"] for r in rows], np.array([r["relatedness"] for r in rows])


def sick_spearman(embed, pairs: tuple[list[str], list[str], np.ndarray], max_length: int = 128) -> float:
    from scipy.stats import spearmanr

    a, b, gold = pairs
    u, v = _embed(embed, a, max_length), _embed(embed, b, max_length)
    return float(spearmanr((u * v).sum(1), gold).statistic)


def sick_train_sentences(root: Path, n: int | None = None) -> list[str]:
    rows = read_jsonl(root / "train.jsonl")
    return sample(list(dict.fromkeys(t for r in rows for t in (r["text_a"], r["text_b"]))), n)


def sora_embedder(path: Path | str, device: str = "cpu"):
    import sora

    model = sora.load(str(path), device=device)
    return lambda texts, max_length: model.embed(texts, batch_size=64, max_length=max_length)


# -------------------------------------------------------------------------------------------- adapting


def adapt_sora(system: str, train_file: Path, out: Path, a: argparse.Namespace) -> dict[str, Any]:
    """``sora``: the recipe as it is; the others: the recipe with their earlier objectives (``EARLIER_OBJECTIVES``;
    ``sora_before`` also without the drift guard, which it did not have). A finished run (its summary.json) is
    reused."""
    from sora.config import load_recipe
    from sora.train.pretrain import run_pretrain

    done = out / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    overrides: dict[str, Any] = {
        "output": str(out), "data.train": str(train_file), "data.validation": None, "data.batch_size": a.batch_size,
        "train.max_steps": a.steps, "train.lr": a.lr, "train.device": a.device, "train.progress": False,
        "train.save_every": 0, "train.keep_checkpoints": 1}
    if a.quick:
        overrides.update({"train.warmup_steps": 1, "guard.texts": 50})
    if system in EARLIER_OBJECTIVES:
        overrides["objectives"] = EARLIER_OBJECTIVES[system]
    if system == "sora_before":
        overrides["guard.enabled"] = False
    recipe = load_recipe(RECIPE, overrides)
    t0 = time.perf_counter()
    summary = run_pretrain(recipe)
    wall = time.perf_counter() - t0
    train_s = summary["elapsed_s"] - summary.get("guard_s", 0.0)
    result = {"model": str(out / "model"), "steps": summary["steps"], "tokens": summary["tokens"],
              "train_s": round(train_s, 1), "wall_s": round(wall, 1),
              "tokens_per_s": round(summary["tokens"] / max(train_s, 1e-9), 1),
              "objectives": [o.model_dump(include={"name", "weight", "noise", "ratio", "match"})
                             for o in recipe.objectives],
              "selected_step": summary.get("selected_step"),
              "drift": {k: round(v, 4) for k, v in (summary["history"][-1] if summary["history"] else {}).items()
                        if k.startswith("val_")}}
    write_json(done, result)
    return result


def delete_words(text: str, rng: random.Random, ratio: float = 0.6) -> str:
    """TSDAE's deletion noise on whitespace words (DenoisingAutoEncoderDataset.delete uses NLTK's tokenizer,
    whose punkt data cannot be downloaded here), each deleted with p = ratio, one kept at least."""
    words = text.split()
    if not words:
        return text
    kept = [w for w in words if rng.random() >= ratio]
    return " ".join(kept or [rng.choice(words)])


def adapt_st_tsdae(sentences_: list[str], out: Path, a: argparse.Namespace) -> dict[str, Any]:
    """sentence-transformers' TSDAE as its documentation sets it up (DenoisingAutoEncoderLoss with
    ``tie_encoder_decoder=True``, the decoder a copy of the encoder's architecture, deletion 0.6, AdamW with
    constant lr and no weight decay, gradient clipping at 1), starting from the same all-MiniLM-L6-v2, with the
    same sentences, steps, batch size, lr and max length as Sora. Saved as a sentence-transformers directory,
    which ``sora.load`` reads as a Hugging Face encoder (mean pooling), so every system is scored by one code."""
    done = out / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.losses import DenoisingAutoEncoderLoss
    except ImportError:  # 6.x keeps the losses under sentence_transformer/
        from sentence_transformers.sentence_transformer.losses import DenoisingAutoEncoderLoss

    path = str(minilm_path())
    torch.manual_seed(SEED)
    model = SentenceTransformer(path, device=a.device)
    model.max_seq_length = a.max_length
    loss_fn = DenoisingAutoEncoderLoss(model, decoder_name_or_path=path, tie_encoder_decoder=True).to(a.device)
    loss_fn.train()
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    tokenize = getattr(model, "preprocess", None) or model.tokenize  # tokenize: before 6.x
    rng = random.Random(SEED)
    order: list[str] = []
    tokens, t0 = 0, time.perf_counter()
    for _ in range(a.steps):
        if len(order) < a.batch_size:  # a new epoch: reshuffle, as DataLoader(shuffle=True, drop_last=True)
            order = sample(sentences_, len(sentences_), rng.randrange(2**31))
        batch, order = order[: a.batch_size], order[a.batch_size:]
        feats = [tokenize([delete_words(t, rng) for t in batch]), tokenize(batch)]  # (damaged, original)
        feats = [{k: v.to(a.device) if isinstance(v, torch.Tensor) else v for k, v in f.items()} for f in feats]
        tokens += int(feats[1]["attention_mask"].sum())
        loss = loss_fn(feats, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    model.save(str(out / "model"))
    result = {"model": str(out / "model"), "steps": a.steps, "tokens": tokens, "train_s": round(train_s, 1),
              "tokens_per_s": round(tokens / max(train_s, 1e-9), 1), "last_loss": round(loss.item(), 4)}
    write_json(done, result)
    return result


def adapt(system: str, domain: str, sentences_: list[str], a: argparse.Namespace) -> dict[str, Any]:
    """Adapt ``system`` on ``sentences_`` (the domain's text); minilm is the starting encoder as it is."""
    if system == "minilm":
        return {"model": "all-MiniLM-L6-v2"}
    out = Path(a.out) / domain / system
    out.mkdir(parents=True, exist_ok=True)
    train_file = Path(a.out) / domain / "sentences.txt"
    if not train_file.is_file():
        train_file.write_text("".join(s + "\n" for s in sentences_), encoding="utf-8")
    log(f"adapting {system} on {domain} ({len(sentences_)} sentences, {a.steps} steps)")
    if system == "st_tsdae":
        return adapt_st_tsdae(sentences_, out, a)
    return adapt_sora(system, train_file, out, a)


# ------------------------------------------------------------------------------------------------ speed


class _SoraSteps:
    """One Sora system's training step as ``fit`` runs it (TrainUnit over the recipe's objectives, AdamW,
    clipping), on prepared batches: for timing only."""

    def __init__(self, system: str, texts: list[list[str]], a: argparse.Namespace):
        from sora.config import load_recipe
        from sora.data.batching import collate
        from sora.objectives import build_objective
        from sora.text.tokenizer import SoraTokenizer
        from sora.train.loop import TrainUnit, _optimizer
        from sora.train.pretrain import build_model

        overrides = {"train.lr": a.lr}
        if system in EARLIER_OBJECTIVES:
            overrides["objectives"] = EARLIER_OBJECTIVES[system]
        recipe = load_recipe(RECIPE, overrides)
        tokenizer = SoraTokenizer.load(minilm_path())
        torch.manual_seed(SEED)
        model = build_model(recipe.model, tokenizer)
        objectives = {f"{o.name}_{i}": (o.weight, build_objective(o, model=model))
                      for i, o in enumerate(recipe.objectives)}
        self.unit = TrainUnit(model, objectives).to(a.device).train()
        self.opt = _optimizer(self.unit.parameters(), recipe.train, None, list(self.unit.named_parameters()))
        self.batches = [{k: v.to(a.device) for k, v in collate(tokenizer.encode(b, a.max_length),
                                                                 tokenizer.pad_id).items()} for b in texts]
        self.tokens = [int(b["attention_mask"].sum()) for b in self.batches]

    def step(self, i: int) -> None:
        self.unit(self.batches[i])["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.unit.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def measure_speed(systems: list[str], sentences_: list[str], a: argparse.Namespace) -> dict[str, Any]:
    """Training tokens/s of each system on the same batches (clean-sentence WordPiece tokens), interleaved
    (A B C, A B C, ...) so that background load hits every system alike; the median over rounds."""
    import pretrain_speed

    n_batches, rounds = (1, 2) if a.quick else (3, 5)
    texts = [sentences_[i * a.batch_size:(i + 1) * a.batch_size] for i in range(n_batches)]
    runners: dict[str, Any] = {}
    for system in systems:
        if system == "st_tsdae":
            runners[system] = pretrain_speed.PeerSystem(texts, a.max_length, torch.device(a.device), SEED)
        elif system != "minilm":
            runners[system] = _SoraSteps(system, texts, a)
    for r in runners.values():  # warm-up: allocator, kernels, optimizer state
        for i in range(n_batches):
            r.step(i)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, r in runners.items():
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(n_batches):
                r.step(i)
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            samples[name].append(sum(r.tokens) / (time.perf_counter() - t0))
    return {name: {"median": round(float(np.median(v)), 1), "samples": [round(x, 1) for x in v]}
            for name, v in samples.items()}


# ------------------------------------------------------------------------------------------- measuring


def beir_slice(data: SciFact, root: Path, out: Path) -> Path:
    """A BEIR folder holding ``data``'s (possibly sliced) corpus, queries and test qrels."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "qrels").mkdir(exist_ok=True)
    (out / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": "", "text": t}) + "\n"
                                              for i, t in zip(data.doc_ids, data.docs, strict=True)))
    (out / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n"
                                               for q, t in data.queries.items()))
    (out / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{s}\n" for q, rel in data.qrels.items() for d, s in rel.items()))
    return out


def _cached(out: Path) -> dict[str, Any] | None:
    """An evaluation this run directory already holds (an interrupted or partial bench continues)."""
    f = out / "metrics.json"
    return json.loads(f.read_text()) if f.is_file() else None


def score_scifact(system: str, model_path: str, beir_dir: Path, a: argparse.Namespace) -> float:
    from sora.evaluate.retrieval import evaluate_retrieval

    out = Path(a.out) / "eval" / "scifact" / system
    metrics = _cached(out) or evaluate_retrieval(model_path, beir_dir, split="test", max_length=a.eval_max_length,
                                                 out=out, device=a.device, examples=0)["metrics"]
    return metrics["ndcg_at_10"]


def score_sick(system: str, model_path: str, pairs_file: Path, a: argparse.Namespace) -> float:
    from sora.evaluate.retrieval import similarity_correlation

    out = Path(a.out) / "eval" / "sick" / system
    metrics = _cached(out) or similarity_correlation(model_path, pairs_file, split="test", score_column="relatedness",
                                                     max_length=128, out=out, device=a.device)["metrics"]
    return metrics["spearman"]


def score_probe(model_path: str, splits: dict[str, tuple[list[str], list[str]]], device: str) -> dict[str, float]:
    """bench/probe.py's logistic-regression probe and its cosine-kNN precision@10, on one model's embeddings."""
    import probe as P

    import sora

    m = sora.load(model_path, device=device)
    x = {name: m.embed(texts, batch_size=128) for name, (texts, _) in splits.items()}
    lr = P.probe(x["train"], splits["train"][1], x["validation"], splits["validation"][1], x["test"], splits["test"][1])
    knn = P.knn_precision(x["train"], splits["train"][1], x["test"], splits["test"][1])
    return {"accuracy": lr["accuracy"], "knn_p10": knn}


# ------------------------------------------------------------------------------------------------ main


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run (< 2 minutes) -> bench/results/adapt.quick.json")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps of every adaptation")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--max-length", type=int, default=64, help="tokens per training sentence (every system)")
    ap.add_argument("--eval-max-length", type=int, default=256, help="tokens per SciFact document when scoring")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--metrics", default="scifact,sick,speed", help=f"any of {','.join(METRICS)}")
    ap.add_argument("--sentences", type=int, default=10000, help="SciFact corpus sentences to adapt on (seeded)")
    ap.add_argument("--max-corpus", type=int, default=None, help="SciFact documents scored (default: all 5,183)")
    ap.add_argument("--probe-datasets", default="sst2,trec,ag_news")
    ap.add_argument("--probe-train", type=int, default=3000, help="labelled examples for the probe")
    ap.add_argument("--max-test", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--out", default=None, help="run directory (default runs/adapt, runs/adapt-quick)")
    ap.add_argument("--json", default=None, help="result file (default bench/results/adapt[.quick].json)")
    ap.add_argument("--merge", action="store_true", help="add to the result file instead of replacing it")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.batch_size, a.sentences, a.max_corpus, a.eval_max_length = 3, 8, 200, 60, 128
        a.probe_datasets, a.probe_train, a.max_test = "trec", 200, 100
    a.out = a.out or str(REPO / "runs" / ("adapt-quick" if a.quick else "adapt"))
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    offline()
    device = resolve_device(a.device)
    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    systems = [s for s in a.systems.split(",") if s]
    metrics = [m for m in a.metrics.split(",") if m]
    for name in systems:
        if name not in SYSTEMS:
            raise SystemExit(f"unknown system {name!r} (choose from {', '.join(SYSTEMS)})")
    for name in metrics:
        if name not in METRICS:
            raise SystemExit(f"unknown metric {name!r} (choose from {', '.join(METRICS)})")
    if "st_tsdae" in systems:
        try:
            import sentence_transformers  # noqa: F401
        except ImportError:
            raise SystemExit("st_tsdae needs sentence-transformers: make bench-deps") from None
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    # Adaptations and scores found under --out are reused (a partial or interrupted run continues): only with the
    # settings they were made with.
    settings = {k: getattr(a, k) for k in ("steps", "batch_size", "lr", "max_length", "eval_max_length", "sentences",
                                           "max_corpus", "probe_train", "max_test", "quick")}
    made = root / "settings.json"
    if made.is_file() and json.loads(made.read_text()) != settings:
        raise SystemExit(f"{root} holds a run with other settings ({made}): pass another --out or delete it")
    write_json(made, settings)
    quick = {"sick_pairs": 150, "sick_sentences": 200} if a.quick else {"sick_pairs": None, "sick_sentences": None}
    t_start = time.time()
    result: dict[str, Any] = {"scifact_ndcg10": {}, "sick_spearman": {}, "probe": {}, "tokens_per_s": {},
                              "adaptations": {}}
    load_before = load_average()

    if "scifact" in metrics:
        sf_root = SHARED_DATA / "scifact"
        if not (sf_root / "corpus.jsonl").is_file():
            raise SystemExit(f"{sf_root} missing (needs ../shared/data)")
        data = SciFact(sf_root, a.max_corpus, 40 if a.quick else None)
        beir_dir = beir_slice(data, sf_root, root / "scifact" / "beir") if a.max_corpus else sf_root
        train = data.train_sentences(a.sentences)
        for system in systems:
            info = adapt(system, "scifact", train, a)
            result["adaptations"].setdefault("scifact", {})[system] = info
            result["scifact_ndcg10"][system] = round(100 * score_scifact(system, info["model"], beir_dir, a), 2)
            log(f"scifact {system}: nDCG@10 {result['scifact_ndcg10'][system]}")
        result["scifact_sentences"] = len(train)
        result["scifact_corpus"] = len(data.docs)

    if "sick" in metrics:
        sick = SHARED_DATA / "sick"
        if not (sick / "train.jsonl").is_file():
            raise SystemExit(f"{sick} missing (needs ../shared/data)")
        pairs_file = sick
        if quick["sick_pairs"]:
            pairs_file = root / "sick" / "test.jsonl"
            pairs_file.parent.mkdir(parents=True, exist_ok=True)
            rows = sample(read_jsonl(sick / "test.jsonl"), quick["sick_pairs"])
            pairs_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        train = sick_train_sentences(sick, quick["sick_sentences"])
        for system in systems:
            info = adapt(system, "sick", train, a)
            result["adaptations"].setdefault("sick", {})[system] = info
            result["sick_spearman"][system] = round(100 * score_sick(system, info["model"], pairs_file, a), 2)
            log(f"sick {system}: Spearman {result['sick_spearman'][system]}")

    if "speed" in metrics:
        sf_root = SHARED_DATA / "scifact"
        if not (sf_root / "corpus.jsonl").is_file():
            raise SystemExit(f"{sf_root} missing (needs ../shared/data)")
        speed = measure_speed(systems, SciFact(sf_root, 10, 1).train_sentences(10 * a.batch_size), a)
        result["tokens_per_s"] = {name: v["median"] for name, v in speed.items()}
        result["speed_samples"] = speed
        log(f"tokens/s: {result['tokens_per_s']}")

    if "probe" in metrics:
        import probe as P

        for name in a.probe_datasets.split(","):
            d = SHARED_DATA / name
            if not (d / "train.jsonl").is_file():
                raise SystemExit(f"{d} missing (needs ../shared/data)")
            train_all = P.read(d / "train.jsonl")
            splits = {"train": P.stratified(*train_all, a.probe_train),
                      "validation": P.stratified(*P.read(d / "validation.jsonl"), 200 if a.quick else 1000),
                      "test": P.read(d / "test.jsonl", a.max_test)}
            unlabeled = sample([t.replace("\n", " ") for t in train_all[0]], a.sentences)
            for system in systems:
                info = adapt(system, f"probe-{name}", unlabeled, a)
                result["adaptations"].setdefault(f"probe-{name}", {})[system] = info
                result["probe"].setdefault(name, {})[system] = score_probe(info["model"], splits, a.device)
                log(f"probe {name} {system}: {result['probe'][name][system]}")

    result["meta"] = {
        "command": command_line(), "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr,
        "max_length": a.max_length, "eval_max_length": a.eval_max_length, "systems": systems, "metrics": metrics,
        "sentences": a.sentences, "max_corpus": a.max_corpus, "quick": a.quick, "seed": SEED,
        "recipe": str(RECIPE.relative_to(REPO)), "device": machine_info(device),
        "load_average": {"before": load_before, "after": load_average()}, "wall_s": round(time.time() - t_start, 1),
        "notes": ("tokens_per_s: clean-sentence WordPiece tokens per second of a training step (forward, "
                  "backward, optimizer), every system on the same SciFact batches, interleaved, median of rounds "
                  "(speed_samples); adaptations.*.tokens_per_s are the adaptation runs' own (fit's time less the "
                  "drift guard's; not comparable across systems when the machine's load changed between them). "
                  "SciFact: test nDCG@10 over the corpus (BEIR protocol via sora.evaluate.retrieval, documents "
                  "title + text at eval_max_length tokens). SICK: test Spearman of cosine vs relatedness. Probe: "
                  "bench/probe.py's logistic regression (accuracy) and cosine kNN label precision@10 (knn_p10). "
                  "st_tsdae: DenoisingAutoEncoderLoss(tie_encoder_decoder=True) from the sentence-transformers "
                  "TSDAE example (constant lr, weight decay 0, deletion 0.6 on whitespace words, clipping 1), "
                  "started from all-MiniLM-L6-v2 with its mean pooling, at this run's batch size, lr and steps."),
        "versions": {"torch": torch.__version__, "sentence_transformers": _version("sentence_transformers")},
    }
    target = Path(a.json) if a.json else result_path(NAME, a.quick)
    if a.merge and target.is_file():  # parts run separately (metrics, systems) add up in one file
        result = merge(json.loads(target.read_text()), result)
    else:
        result["meta"]["commands"] = [result["meta"]["command"]]
    if a.json:  # elsewhere than bench/results (the tests use it)
        write_json(target, result)
        print(json.dumps(result), flush=True)
    else:
        write_result(NAME, a.quick, result)
    return result


def merge(previous: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new``'s figures over ``previous``'s, per metric and system (and dataset for the probe); meta keeps
    every command that contributed."""
    out = dict(previous)
    for key in ("scifact_ndcg10", "sick_spearman", "tokens_per_s"):
        out[key] = {**previous.get(key, {}), **new.get(key, {})}
    out["probe"] = {d: {**previous.get("probe", {}).get(d, {}), **new.get("probe", {}).get(d, {})}
                    for d in {*previous.get("probe", {}), *new.get("probe", {})}}
    out["adaptations"] = {d: {**previous.get("adaptations", {}).get(d, {}), **new.get("adaptations", {}).get(d, {})}
                          for d in {*previous.get("adaptations", {}), *new.get("adaptations", {})}}
    for key in ("scifact_sentences", "scifact_corpus", "speed_samples"):
        if key in new or key in previous:
            out[key] = new.get(key, previous.get(key))
    meta = {**previous.get("meta", {}), **new["meta"]}
    meta["commands"] = [*previous.get("meta", {}).get("commands", [previous.get("meta", {}).get("command")]),
                        new["meta"]["command"]]
    meta["systems"] = sorted({*previous.get("meta", {}).get("systems", []), *new["meta"]["systems"]})
    meta["metrics"] = sorted({*previous.get("meta", {}).get("metrics", []), *new["meta"]["metrics"]})
    out["meta"] = meta
    return out


if __name__ == "__main__":
    main()
