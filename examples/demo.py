"""`make demo`: the main job end to end on the bundled sample, offline, in a few minutes on 2 cores.

1. `sora pretrain` trains a tokenizer and a small denoising autoencoder from scratch (about a minute);
2. `sora info` describes the checkpoint, `sora embed` writes the vectors;
3. the Python API finds the nearest neighbours of a few queries;
4. `sora finetune` trains a topic classifier on the labeled sample from all-MiniLM-L6-v2 with the default
   recipe, `sora evaluate` writes its report (test accuracy beside a TF-IDF baseline), `sora predict` scores
   new texts;
5. `sora serve` puts the classifier behind HTTP; the client calls each route once, then the server is
   stopped with SIGTERM (it drains in-flight requests first);
6. a seq2seq head (English → German, examples/translate) is fine-tuned on the pretrained model, generates with
   `model.generate`, and is served: `POST /v1/generate`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import sora

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample"
RUN = ROOT / "runs" / "demo"


QUESTIONS = [("Where did the parcel leave from?", "Ticket 7: Ana wrote in about a parcel. The parcel left our "
              "warehouse in Lyon on Monday. Support agent Tom promised an update within two hours."),
             ("Who wrote in?", "Ticket 8: Kofi wrote in about a refund. The refund left our warehouse in Perth on "
              "Friday. Support agent Mei promised an update within 24 hours.")]


def sora_cli(*args: str, env: dict[str, str] | None = None) -> None:
    print(f"\n$ {' '.join(f'{k}={v}' for k, v in (env or {}).items())}{' ' if env else ''}sora {' '.join(args)}",
          flush=True)
    subprocess.run([sys.executable, "-m", "sora.cli", *args], check=True, cwd=ROOT,
                   env={**os.environ, **env} if env else None)


def serve_once(checkpoint: Path, queries: list[str]) -> None:
    """Start `sora serve` on a free loopback port, call every route once, stop it with SIGTERM."""
    import signal
    import socket

    import httpx

    from sora.client import SoraClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"\n$ sora serve {checkpoint.relative_to(ROOT)} --port {port}", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "sora.cli", "serve", str(checkpoint), "--port", str(port)],
                              cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise SystemExit("the server exited before it was ready")
            time.sleep(0.2)
        with SoraClient(url) as client:
            print("  GET  /healthz   ", client.health())
            info = client.models()
            print("  GET  /v1/models  tasks:", list(info.get("tasks", info)))
            print("  POST /v1/embed   shape:", client.embed(queries[:2]).shape)
            tasks = info.get("tasks", {})
            if "task" in tasks:
                for q, p in zip(queries, client.predict(queries), strict=True):
                    print(f"  POST /v1/predict {p['task']['label']:>15}  {q}")
            if any(t["type"] == "seq2seq" for t in tasks.values()):
                for q, out in zip(queries, client.generate(queries, beam=4), strict=True):
                    print(f"  POST /v1/generate {q!r} -> {out!r}")
                pieces = [piece for _, piece in client.stream(queries[:1])]  # server-sent events, greedy
                print(f"  POST /v1/generate stream {queries[0]!r} -> {len(pieces)} pieces: {''.join(pieces)!r}")
            if "answers" in tasks:
                for (q, _c), a in zip(QUESTIONS, client.answer(QUESTIONS), strict=True):
                    print(f"  POST /v1/answer  {a['answer']!r:>12}  {q}")
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
        print("  GET  /metrics    ", sum(ln.startswith("sora_requests_total") for ln in metrics.splitlines()),
              "request-count series")
    finally:
        server.send_signal(signal.SIGTERM)
        print("  SIGTERM -> server exit code", server.wait(timeout=60))


def tfidf_baseline() -> float:
    """Test accuracy of TF-IDF word 1-2 grams + logistic regression (C picked on validation)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    def read(split: str) -> tuple[list[str], list[str]]:
        rows = [json.loads(ln) for ln in (SAMPLE / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        return [r["text"] for r in rows], [r["label"] for r in rows]

    (xtr, ytr), (xva, yva), (xte, yte) = read("train"), read("validation"), read("test")
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(xtr)
    fits = [LogisticRegression(C=c, max_iter=2000).fit(vec.transform(xtr), ytr) for c in (0.1, 1.0, 10.0, 100.0)]
    best = max(fits, key=lambda clf: clf.score(vec.transform(xva), yva))
    return float(best.score(vec.transform(xte), yte))


def main() -> None:
    t0 = time.time()
    sora_cli("pretrain", "recipes/pretrain-scratch.yaml", "-o", str(RUN.relative_to(ROOT)),
             "--minutes", "1", "--max-steps", "3000", "--vocab-size", "2000",
             "--set", "model.dim=128", "--set", "model.ffn_dim=512", "--set", "model.layers=3",
             "--set", "model.code_dim=128", "--set", "train.warmup_steps=30", "--set", "train.eval_every=100",
             "--set", "train.schedule=constant", "--batch-size", "16")
    sora_cli("info", str(RUN.relative_to(ROOT)))
    sora_cli("embed", str(RUN.relative_to(ROOT)), "examples/sample/train.jsonl", "-o",
             str((RUN / "train_vectors.npy").relative_to(ROOT)))

    model = sora.load(RUN)
    rows = [json.loads(line) for line in (SAMPLE / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    corpus = np.load(RUN / "train_vectors.npy")
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = [q for q in (SAMPLE / "queries.txt").read_text(encoding="utf-8").splitlines() if q.strip()]
    qv = model.embed(queries, normalize=True)
    print("\nNearest neighbours (cosine) of each query:")
    for query, vec in zip(queries, qv, strict=True):
        top = np.argsort(-corpus @ vec)[:3]
        print(f"\n  {query}")
        for i in top:
            print(f"    {float(corpus[i] @ vec):.3f}  [{labels[i]}] {texts[i]}")

    # Does the geometry know the topics? Share of each sentence's 5 neighbours with its label.
    sims = corpus @ corpus.T
    np.fill_diagonal(sims, -np.inf)
    nn = np.argsort(-sims, axis=1)[:, :5]
    agree = np.mean([[labels[j] == labels[i] for j in row] for i, row in enumerate(nn)])
    chance = sum((labels.count(lb) / len(labels)) ** 2 for lb in set(labels))
    print(f"\nlabel agreement of 5 nearest neighbours: {agree:.2f} (chance {chance:.2f}); no labels were used")

    # Fine-tuning as the README recommends: from all-MiniLM-L6-v2 with Sora's defaults (the benchmarked recipe).
    clf = RUN.parent / "demo-classifier"
    sora_cli("finetune", "--init", "all-MiniLM-L6-v2", "--data", "examples/sample", "-o",
             str(clf.relative_to(ROOT)), "--no-progress")
    sora_cli("evaluate", str(clf.relative_to(ROOT)))
    sora_cli("predict", str(clf.relative_to(ROOT)), "examples/sample/test.jsonl", "-o",
             str((clf / "predictions.jsonl").relative_to(ROOT)))
    classifier = sora.load(clf)
    for query, pred in zip(queries, classifier.predict(queries), strict=True):
        print(f"  {pred['task']['label']:>15} ({pred['task']['score']:.2f})  {query}")
    report = json.loads((clf / "eval-task-test" / "metrics.json").read_text())
    print(f"\ntest accuracy {report['accuracy']:.3f}; the classic baseline, TF-IDF + logistic regression on the same "
          f"labels: {tfidf_baseline():.3f}")

    # Extractive question answering on a tiny support-ticket set (examples/qa), added as a second head.
    both = RUN.parent / "demo-tickets"
    sora_cli("finetune", "--init", str(clf.relative_to(ROOT)), "--data", "examples/qa", "--task-type", "qa",
             "--set", "tasks.0.name=answers", "-o", str(both.relative_to(ROOT)), "--no-progress")
    sora_cli("evaluate", str(both.relative_to(ROOT)), "--task", "answers")
    for (q, _c), a in zip(QUESTIONS, sora.load(both).answer(QUESTIONS), strict=True):
        print(f"  {a['answer']!r:>12} ({a['score']:.2f})  {q}")
    serve_once(both, queries)

    # Generation: a seq2seq head on the from-scratch model, trained on 40 English→German pairs of our own writing
    # (examples/translate; the decoder attends to the encoder's token states), then served: POST /v1/generate.
    # One thread: a model this small trains several times faster on one than on two contended ones.
    translator = RUN.parent / "demo-translate"
    sora_cli("finetune", "--init", str(RUN.relative_to(ROOT)), "--data", "examples/translate", "--task-type", "seq2seq",
             "--set", "tasks.0.name=translate", "--set", "tasks.0.metric=chrf", "--set", "finetune.max_steps=250",
             "--lr", "3e-3", "--batch-size", "8", "--set", "finetune.patience=0",
             "--set", "finetune.head_lr_multiplier=1", "--set", "finetune.layer_lr_decay=1",
             "--set", "train.eval_every=125",
             "--set", 'tasks.0.options={"max_target_length": 24, "label_smoothing": 0.0}',
             "-o", str(translator.relative_to(ROOT)), "--no-progress", env={"OMP_NUM_THREADS": "1"})
    rows = [json.loads(ln) for ln in (ROOT / "examples" / "translate" / "test.jsonl").read_text().splitlines()]
    outputs = sora.load(translator).generate([r["source"] for r in rows], beam=4)
    print("\nmodel.generate on sentences it was not trained on (40 pairs are far too few to learn German):")
    for r, out in zip(rows, outputs, strict=True):
        print(f"  {r['source']!r:>32} -> {out!r}  (reference {r['target']!r})")
    serve_once(translator, ["my parcel has not arrived", "the phone is broken", "please call me tomorrow"])
    print(f"demo finished in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
