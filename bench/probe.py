"""Representation quality: logistic regression on frozen embeddings (sst2, trec, ag_news).

Systems, on the same labeled examples and the same test set (two read-outs: a logistic-regression probe, and
the cosine kNN label precision@10 of each test text against the probe-train texts, which no classifier can
correct: a geometry that adaptation broke shows there, not in the probe):
  (a) random   a randomly initialised Sora encoder (same tokenizer and size as (b))
  (b) scratch  Sora pretrained from scratch on the dataset's unlabeled train text, for a fixed CPU budget
  (c) minilm   all-MiniLM-L6-v2 as it is (mean pooling)
  (d) adapted  all-MiniLM-L6-v2 after Sora domain adaptation on that text, same budget as (b)
  (e) tfidf    TF-IDF word 1-2 grams

The probe's C is chosen on the validation split; accuracy is reported on test.

    python bench/probe.py                 # full: 15-minute pretraining budget per run
    python bench/probe.py --quick         # < 2 minutes: tiny budget, small slices
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import sora  # noqa: E402
from sora.config import load_recipe  # noqa: E402
from sora.models.checkpoint import save_checkpoint  # noqa: E402
from sora.models.hf_import import resolve_backbone  # noqa: E402
from sora.text.tokenizer import SoraTokenizer  # noqa: E402
from sora.train.pretrain import build_model, run_pretrain  # noqa: E402

SHARED = Path(os.environ.get("SORA_SHARED_DATA", ROOT.parent / "shared" / "data"))


def read(path: Path, limit: int | None = None) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            texts.append(row["text"])
            labels.append(row["label"])
            if limit and len(texts) == limit:
                break
    return texts, labels


def stratified(texts, labels, n, seed=13):
    """At most ``n`` examples, classes in proportion, with a fixed seed."""
    if n >= len(texts):
        return texts, labels
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(texts))[:n]
    return [texts[i] for i in idx], [labels[i] for i in idx]


def probe(xtr, ytr, xva, yva, xte, yte) -> dict:
    scaler = StandardScaler().fit(xtr)
    xtr, xva, xte = scaler.transform(xtr), scaler.transform(xva), scaler.transform(xte)
    best = None
    for c in (0.01, 0.1, 1.0):
        clf = LogisticRegression(C=c, max_iter=3000).fit(xtr, ytr)
        acc = clf.score(xva, yva)
        if best is None or acc > best[0]:
            best = (acc, c, clf)
    val_acc, c, clf = best
    return {"accuracy": round(float(clf.score(xte, yte)), 4), "val_accuracy": round(float(val_acc), 4), "C": c}


def knn_precision(xtr, ytr, xte, yte, k: int = 10) -> float:
    """Cosine kNN label precision@k: the share of each test text's ``k`` nearest probe-train texts (cosine of
    the embeddings) that carry its label, averaged. No classifier is fitted, so a geometry that a logistic
    regression would undo (issue 11: adaptation that hurt retrieval but not the probe) shows here."""
    a = np.asarray(xtr, dtype=np.float32)
    b = np.asarray(xte, dtype=np.float32)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    ytr, yte = np.asarray(ytr), np.asarray(yte)
    k = min(k, len(a))
    hits = []
    for start in range(0, len(b), 512):
        sim = b[start : start + 512] @ a.T
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        hits.append((ytr[top] == yte[start : start + 512, None]).mean(1))
    return round(float(np.concatenate(hits).mean()), 4)


def tfidf_probe(tr, va, te) -> dict:
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    xtr = vec.fit_transform(tr[0])
    best = None
    for c in (1.0, 10.0, 100.0):
        clf = LogisticRegression(C=c, max_iter=3000).fit(xtr, tr[1])
        acc = clf.score(vec.transform(va[0]), va[1])
        if best is None or acc > best[0]:
            best = (acc, c, clf)
    val_acc, c, clf = best
    xte = vec.transform(te[0])
    sim = (xte @ xtr.T).toarray()  # rows are L2-normalised already: cosine
    k = min(10, sim.shape[1])
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    knn = float((np.asarray(tr[1])[top] == np.asarray(te[1])[:, None]).mean())
    return {"accuracy": round(float(clf.score(xte, te[1])), 4), "val_accuracy": round(val_acc, 4), "C": c,
            "knn_p10": round(knn, 4)}


def pretrain(recipe_file: str, out: Path, train_file: Path, minutes: float, overrides: dict) -> dict:
    """Pretrain once; a finished run under ``out`` (its summary.json) is reused, so an interrupted bench
    continues where it stopped."""
    done = out / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    recipe = load_recipe(ROOT / "recipes" / recipe_file, {
        "output": str(out), "data.train": str(train_file), "data.validation": None,
        "train.max_minutes": minutes, "train.progress": False, **overrides})
    t0 = time.time()
    summary = run_pretrain(recipe)
    result = {"steps": summary["steps"], "tokens": summary["tokens"], "seconds": round(time.time() - t0, 1)}
    done.write_text(json.dumps(result))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="sst2,trec,ag_news")
    ap.add_argument("--minutes", type=float, default=15.0, help="pretraining budget per run (b, d)")
    ap.add_argument("--scratch-steps", type=int, default=None, help="a step budget for (b) instead of minutes")
    ap.add_argument("--adapt-steps", type=int, default=None, help="a step budget for (d) instead of minutes")
    ap.add_argument("--probe-train", type=int, default=5000, help="labeled examples for the probe")
    ap.add_argument("--max-test", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep datasets already in the results file")
    ap.add_argument("--out", default=str(ROOT / "runs" / "probe"))
    args = ap.parse_args()
    if args.quick:
        args.minutes, args.probe_train, args.max_test, args.datasets = 0.15, 300, 200, "trec"
        if args.out == str(ROOT / "runs" / "probe"):  # never reuse (or overwrite) a full run's pretraining
            args.out = str(ROOT / "runs" / "probe-quick")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    out_root = Path(args.out)
    results: dict = {"datasets": {}, "minutes_per_pretraining": args.minutes, "probe_train": args.probe_train,
                     "scratch_steps": args.scratch_steps, "adapt_steps": args.adapt_steps,
                     "command": "python bench/probe.py " + " ".join(sys.argv[1:]),
                     "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                f"torch {torch.__version__}"}
    out_file = ROOT / "bench" / "results" / ("probe.quick.json" if args.quick else "probe.json")
    if args.keep and out_file.is_file():  # add to the datasets already measured
        previous = json.loads(out_file.read_text())
        results["datasets"] = previous.get("datasets", {})
        results["command"] = previous.get("command", "") + " ; " + results["command"]
    for name in args.datasets.split(","):
        if name in results["datasets"]:
            continue
        d = SHARED / name
        if not (d / "train.jsonl").is_file():
            sys.exit(f"error: {d} missing (needs ../shared/data)")
        t0 = time.time()
        train_all = read(d / "train.jsonl")
        tr = stratified(*train_all, args.probe_train)
        va = stratified(*read(d / "validation.jsonl"), 1000)
        te = read(d / "test.jsonl", args.max_test)
        row: dict = {"tfidf": tfidf_probe(tr, va, te)}
        unlabeled = out_root / name / "unlabeled.txt"
        unlabeled.parent.mkdir(parents=True, exist_ok=True)
        unlabeled.write_text("".join(t.replace("\n", " ") + "\n" for t in train_all[0]), encoding="utf-8")

        scratch = out_root / name / "scratch"
        budget_b = {"train.max_steps": args.scratch_steps} if args.scratch_steps else {"train.max_steps": 10**6}
        budget_d = {"train.max_steps": args.adapt_steps} if args.adapt_steps else {"train.max_steps": 10**6}
        minutes_b = None if args.scratch_steps else args.minutes
        minutes_d = None if args.adapt_steps else args.minutes
        row["scratch"] = {"pretraining": pretrain("pretrain-scratch.yaml", scratch, unlabeled, minutes_b, budget_b)}
        # (a): the same tokenizer and architecture as (b), with the weights as initialised.
        rnd = initial("pretrain-scratch.yaml", out_root / name / "random", {"tokenizer.path": str(scratch)})
        row["random"] = score(rnd, tr, va, te)
        row["scratch"].update(score(scratch, tr, va, te))
        row["minilm"] = score(initial("adapt-minilm.yaml", out_root / name / "minilm", {}), tr, va, te)
        adapted = out_root / name / "adapted"
        row["adapted"] = {"pretraining": pretrain("adapt-minilm.yaml", adapted, unlabeled, minutes_d, budget_d)}
        row["adapted"].update(score(adapted, tr, va, te))
        row["seconds"] = round(time.time() - t0, 1)
        results["datasets"][name] = row
        scores = {k: v["accuracy"] for k, v in row.items() if isinstance(v, dict) and "accuracy" in v}
        print(f"{name}: " + ", ".join(f"{k} {a:.4f}" for k, a in scores.items()), file=sys.stderr, flush=True)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(results, indent=2))  # after each dataset: an interrupted run keeps them
    print(markdown(results), file=sys.stderr)
    print(json.dumps(results))


def initial(recipe_file: str, out: Path, overrides: dict) -> Path:
    """A checkpoint of the model as built by the recipe, before any training."""
    recipe = load_recipe(ROOT / "recipes" / recipe_file, overrides)
    torch.manual_seed(recipe.train.seed)
    tokenizer = (SoraTokenizer.load(recipe.tokenizer.path) if recipe.tokenizer.path
                 else SoraTokenizer.load(resolve_backbone(recipe.model.backbone)))
    save_checkpoint(out, build_model(recipe.model, tokenizer), tokenizer, {"recipe": recipe.model_dump()})
    return out


def score(model_dir: Path, tr, va, te) -> dict:
    m = sora.load(model_dir)
    xtr, xva, xte = (m.embed(x[0], batch_size=128) for x in (tr, va, te))
    return {**probe(xtr, tr[1], xva, va[1], xte, te[1]), "knn_p10": knn_precision(xtr, tr[1], xte, te[1])}


def markdown(results: dict) -> str:
    systems = [("random", "(a) Sora, random init"), ("scratch", "(b) Sora from scratch"),
               ("minilm", "(c) all-MiniLM-L6-v2"), ("adapted", "(d) MiniLM + Sora adaptation"), ("tfidf", "(e) TF-IDF")]
    names = list(results["datasets"])
    # kNN: cosine kNN label precision@10 against the probe-train texts (no classifier; TF-IDF has none here).
    head = " | ".join(names) + " | " + " | ".join(f"{n} kNN@10" for n in names)
    lines = ["| system | " + head + " |", "|---|" + "---:|" * (2 * len(names))]
    for key, label in systems:
        rows = [results["datasets"][n].get(key, {}) for n in names]
        cells = [f"{r['accuracy'] * 100:.1f}" if "accuracy" in r else "n/a" for r in rows]
        cells += [f"{r['knn_p10'] * 100:.1f}" if "knn_p10" in r else "n/a" for r in rows]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
