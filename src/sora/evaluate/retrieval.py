"""Embedding-only evaluation: retrieval on a BEIR folder, and similarity correlation on scored pairs.

Neither needs a task head, so any model ``sora.load`` takes works: a Sora run or checkpoint, a Hugging Face
encoder directory, the ``all-MiniLM-L6-v2`` alias.

**Retrieval** (``evaluate_retrieval``) reads a folder in BEIR layout::

    corpus.jsonl        {"_id", "title", "text"}   ("id" is read too)
    queries.jsonl       {"_id", "text"}
    qrels/SPLIT.tsv     header "query-id  corpus-id  score", tab-separated

and runs an exact cosine search: normalised embeddings, the corpus embedded in chunks, queries × corpus scored
in blocks with only the running top-k kept (``torch.topk``), so memory stays bounded by the block sizes plus
the corpus embeddings themselves. A document is embedded as ``(title + " " + text).strip()``, as BEIR's
``DenseRetrievalExactSearch`` and sentence-transformers/MTEB do. Only queries with a relevant document
(qrels score > 0) in the split are scored.

Metrics follow BEIR, i.e. pytrec_eval (trec_eval) for nDCG, recall and MAP and BEIR's own MRR:

- nDCG@k: DCG = Σ_{i=1..k} rel_i / log2(i + 1) with the qrels score as the gain (linear, trec_eval's
  ``ndcg_cut``; not the exponential 2^rel − 1), over the ideal DCG of the query's judged documents;
- recall@k: relevant documents in the top k / all relevant documents of the query;
- MAP@k (``map_cut``): Σ precision@i over the ranks i ≤ k holding a relevant document / all relevant documents;
- MRR@k: 1 / the rank of the first relevant document in the top k (0 if none).

A qrels score of 0 (or less) means "judged not relevant". A relevant document missing from the corpus still
counts in the denominators (as pytrec_eval counts it: it simply cannot be retrieved) and is warned about.

**Similarity** (``similarity_correlation``) reads pairs with a numeric score (e.g. SICK: ``text_a``,
``text_b``, ``relatedness``) and reports the Spearman and Pearson correlation between the score and the cosine
similarity of the two texts' embeddings (the STS protocol of sentence-transformers and MTEB).
"""

from __future__ import annotations

import csv
import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sora.data.readers import _decoded_lines, detect_layout, read_records, resolve_split, text_value
from sora.errors import DataError, SoraWarning
from sora.evaluate.report import _fmt, _table

if TYPE_CHECKING:
    import torch

    from sora.api import Sora

K_VALUES = (10, 100)
# What the report and the CLI lead with; the rest of the metrics follow in metrics.json.
HEADLINE = ("ndcg_at_10", "recall_at_100", "mrr_at_10", "recall_at_10", "map_at_100")
NAMES = {"ndcg": "nDCG", "recall": "recall", "mrr": "MRR", "map": "MAP"}
SPLIT_ALIASES = {"dev": ("dev", "validation"), "validation": ("validation", "dev"), "valid": ("valid", "validation",
                                                                                               "dev")}
SCORE_COLUMNS = ("relatedness", "score", "similarity", "label")  # tried in this order when none is given
CORPUS_CHUNK = 8192  # texts embedded per call: longest-first batching inside a chunk, bounded token lists
QUERY_BLOCK = 512
CORPUS_BLOCK = 65536


# --- metrics on rankings ------------------------------------------------------------------------------------


def query_metrics(ranked: Sequence[str], qrels: Mapping[str, int | float],
                  k_values: Sequence[int] = K_VALUES) -> dict[str, float]:
    """nDCG@k, recall@k, MAP@k and MRR@k of one query: ``ranked`` document ids, best first; ``qrels`` maps
    document id → graded relevance (> 0 relevant). Keys are ``ndcg_at_10`` etc.; see the module docstring."""
    relevant = {d: g for d, g in qrels.items() if g > 0}
    if not relevant:
        raise ValueError("query_metrics needs at least one relevant document (qrels score > 0)")
    gains = [relevant.get(d, 0) for d in ranked]
    ideal = sorted(relevant.values(), reverse=True)
    out: dict[str, float] = {}
    for k in k_values:
        # pytrec_eval's ndcg_cut: the gain is the qrels score itself (rank i discounted by log2(i + 1)).
        dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:k]))
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:k]))
        hits = [i for i, g in enumerate(gains[:k]) if g > 0]  # 0-based ranks of the relevant documents
        out[f"ndcg_at_{k}"] = dcg / idcg
        out[f"recall_at_{k}"] = len(hits) / len(relevant)
        out[f"map_at_{k}"] = sum((n + 1) / (i + 1) for n, i in enumerate(hits)) / len(relevant)
        out[f"mrr_at_{k}"] = 1.0 / (hits[0] + 1) if hits else 0.0
    return out


def retrieval_metrics(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int | float]],
                      k_values: Sequence[int] = K_VALUES) -> dict[str, Any]:
    """Mean of ``query_metrics`` over the queries of ``qrels`` that have a relevant document; a query missing
    from ``run`` counts as an empty ranking. Adds ``n`` (queries scored)."""
    scored = [q for q, rels in qrels.items() if any(g > 0 for g in rels.values())]
    if not scored:
        raise DataError("no query has a relevant document (qrels score > 0): nothing to score")
    per_query = [query_metrics(run.get(q, []), qrels[q], k_values) for q in scored]
    keys = [f"{m}_at_{k}" for m in ("ndcg", "recall", "mrr", "map") for k in k_values]
    return {**{key: float(np.mean([p[key] for p in per_query])) for key in keys}, "n": len(scored)}


def metric_label(key: str) -> str:
    """``ndcg_at_10`` → ``nDCG@10``."""
    name, _, k = key.partition("_at_")
    return f"{NAMES.get(name, name)}@{k}" if k else key


# --- exact search -------------------------------------------------------------------------------------------


def exact_search(queries: torch.Tensor, corpus: torch.Tensor, k: int, query_block: int = QUERY_BLOCK,
                 corpus_block: int = CORPUS_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices), each (n_queries, min(k, n_corpus)), best first: the top k of ``queries @ corpus.T``
    (cosine when both are normalised), scored in (query_block × corpus_block) blocks, keeping a running top k
    per query, so no full (n_queries × n_corpus) matrix is ever built."""
    import torch

    k = min(k, corpus.shape[0])
    all_scores, all_idx = [], []
    for qs in range(0, queries.shape[0], query_block):
        q = queries[qs : qs + query_block]
        best_s = best_i = None
        for cs in range(0, corpus.shape[0], corpus_block):
            s = q @ corpus[cs : cs + corpus_block].T
            top_s, top_i = torch.topk(s, min(k, s.shape[1]), dim=1)
            top_i = top_i + cs
            if best_s is None:
                best_s, best_i = top_s, top_i
            else:
                merged_s, merged_i = torch.cat([best_s, top_s], 1), torch.cat([best_i, top_i], 1)
                best_s, pos = torch.topk(merged_s, k, dim=1)
                best_i = torch.gather(merged_i, 1, pos)
        all_scores.append(best_s)
        all_idx.append(best_i)
    return torch.cat(all_scores).cpu(), torch.cat(all_idx).cpu()


def _embed(model: Sora, texts: Sequence[str], batch_size: int, max_length: int | None, progress: bool,
           chunk: int = CORPUS_CHUNK) -> torch.Tensor:
    """Normalised embeddings (n, dim) on the model's device, ``chunk`` texts per encoder call."""
    import torch

    out = torch.empty(len(texts), model.dim, device=model.device)
    for start in range(0, len(texts), chunk):
        codes = model.codes(list(texts[start : start + chunk]), batch_size, max_length, progress)
        out[start : start + len(codes)] = torch.nn.functional.normalize(codes.float(), dim=-1)
    return out


# --- reading a BEIR folder ----------------------------------------------------------------------------------


@dataclass
class BeirData:
    """A BEIR folder read for one split: the corpus, the queries that have qrels, and the qrels."""

    path: Path
    split: str
    qrels_path: Path
    corpus_ids: list[str]
    corpus_texts: list[str]  # title + " " + text
    queries: dict[str, str]  # query id → text, only queries with a relevant document in the split
    qrels: dict[str, dict[str, int]]  # query id → document id → score, for those queries
    counts: dict[str, int] = field(default_factory=dict)  # qrels pairs, unknown documents/queries, ...


def is_beir_dir(path: str | Path | None) -> bool:
    """A folder holding any piece of the BEIR layout (corpus.jsonl, queries.jsonl, qrels/)."""
    if path is None:
        return False
    p = Path(path)
    return p.is_dir() and any((p / n).exists() for n in ("corpus.jsonl", "queries.jsonl", "qrels"))


def qrels_file(path: Path, split: str) -> Path:
    folder = path / "qrels"
    if not folder.is_dir():
        raise DataError(f"{path}: no qrels/ folder (a BEIR folder holds corpus.jsonl, queries.jsonl and "
                        f"qrels/{split}.tsv)")
    for name in SPLIT_ALIASES.get(split, (split,)):
        if (folder / f"{name}.tsv").is_file():
            return folder / f"{name}.tsv"
    have = ", ".join(sorted(p.stem for p in folder.glob("*.tsv"))) or "none"
    raise DataError(f"{folder}: no {split}.tsv for --split {split} (splits here: {have})")


def _id(path: Path, line: int, record: dict[str, Any]) -> str:
    value = record.get("_id", record.get("id"))
    if isinstance(value, bool) or not isinstance(value, str | int):
        what = "no '_id'" if value is None else f"'_id' is a {type(value).__name__}, not a string"
        raise DataError(f"{path}:{line}: {what} (BEIR rows are {{\"_id\", \"title\", \"text\"}})")
    return str(value)


def _read_jsonl(path: Path, title: bool) -> tuple[list[str], list[str], list[int]]:
    """(ids, texts, lines) of a BEIR corpus or queries file; a corpus text is ``(title + " " + text).strip()``."""
    layout = detect_layout(path, "jsonl")
    ids, texts, lines = [], [], []
    seen: dict[str, int] = {}
    for line, record in read_records(path, layout=layout):
        doc_id = _id(path, line, record)
        if doc_id in seen:
            raise DataError(f"{path}:{line}: duplicate _id {doc_id!r} (first on line {seen[doc_id]})")
        seen[doc_id] = line
        if "text" not in record:
            raise DataError(f"{path}:{line}: no column 'text' ({layout.describe(record)})")
        text = text_value(layout, line, record, "text")
        if title and record.get("title") is not None:
            text = (text_value(layout, line, record, "title") + " " + text).strip()
        ids.append(doc_id)
        texts.append(text)
        lines.append(line)
    if not ids:
        raise DataError(f"{path}: no rows (empty data)")
    return ids, texts, lines


def _score(text: str) -> int | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if math.isfinite(value) and value == int(value) else None


def read_qrels(path: Path) -> tuple[dict[str, dict[str, int]], dict[tuple[str, str], int]]:
    """``{query id: {document id: score}}`` and the line of each pair, from a BEIR qrels TSV (header optional)."""
    qrels: dict[str, dict[str, int]] = {}
    where: dict[tuple[str, str], int] = {}
    first = True
    for line, raw in _decoded_lines(path):
        text = raw.rstrip("\r\n")
        if not text.strip():
            continue
        fields = next(csv.reader([text], delimiter="\t"))
        if len(fields) == 1:
            fields = text.split()
        if first and len(fields) >= 3 and _score(fields[2].strip()) is None:
            first = False
            continue  # the header: query-id, corpus-id, score
        first = False
        if len(fields) != 3:
            raise DataError(f"{path}:{line}: expected 3 tab-separated fields (query-id, corpus-id, score), got "
                            f"{len(fields)}")
        qid, did, score = (f.strip() for f in fields)
        value = _score(score)
        if value is None:
            raise DataError(f"{path}:{line}: the score {score!r} is not a whole number")
        if not qid or not did:
            raise DataError(f"{path}:{line}: empty {'query-id' if not qid else 'corpus-id'}")
        qrels.setdefault(qid, {})[did] = value
        where[(qid, did)] = line
    return qrels, where


def _examples(ids: list[str], limit: int = 3) -> str:
    return ", ".join(repr(i) for i in ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def read_beir(data_dir: str | Path, split: str = "test") -> BeirData:
    """Read a BEIR folder for ``split`` (``dev`` and ``validation`` stand for each other). Missing files, bad
    rows and an empty split are ``DataError``s naming the file (and line); qrels naming documents or queries
    that are not there are warned about (``SoraWarning``) and counted."""
    path = Path(data_dir)
    if not path.is_dir():
        raise DataError(f"{path}: not a folder (a BEIR folder holds corpus.jsonl, queries.jsonl and "
                        "qrels/SPLIT.tsv)" if path.exists() else f"folder not found: {path}")
    qpath = qrels_file(path, split)
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not (path / name).is_file():
            raise DataError(f"{path}: no {name} (a BEIR folder holds corpus.jsonl, queries.jsonl and "
                            f"qrels/{split}.tsv)")
    qrels, where = read_qrels(qpath)
    pairs = sum(len(v) for v in qrels.values())
    if not pairs:
        raise DataError(f"{qpath}: no qrels (the {split} split is empty)")
    judged = {q: rels for q, rels in qrels.items() if any(g > 0 for g in rels.values())}
    if not judged:
        raise DataError(f"{qpath}: no relevant pair (every score is 0 or less): nothing to evaluate")

    query_ids, query_texts, _ = _read_jsonl(path / "queries.jsonl", title=False)
    known_queries = dict(zip(query_ids, query_texts, strict=True))
    absent_q = [q for q in judged if q not in known_queries]
    if absent_q:
        if len(absent_q) == len(judged):
            raise DataError(f"{qpath}: none of its {len(judged)} query ids is in {path / 'queries.jsonl'} "
                            f"(e.g. line {where[(absent_q[0], next(iter(qrels[absent_q[0]])))]}: {absent_q[0]!r})")
        line = where[(absent_q[0], next(iter(qrels[absent_q[0]])))]
        warnings.warn(f"{qpath}: {len(absent_q)} of {len(judged)} queries are not in queries.jsonl and are skipped "
                      f"(e.g. line {line}: {_examples(absent_q)})", SoraWarning, stacklevel=2)
    queries = {q: known_queries[q] for q in judged if q in known_queries}

    corpus_ids, corpus_texts, _ = _read_jsonl(path / "corpus.jsonl", title=True)
    known_docs = set(corpus_ids)
    unknown = [(q, d) for q in queries for d, g in qrels[q].items() if d not in known_docs]
    unknown_relevant = [(q, d) for q, d in unknown if qrels[q][d] > 0]
    if unknown:
        q, d = unknown[0]
        warnings.warn(f"{qpath}: {len(unknown)} of {pairs} qrels pairs name documents not in corpus.jsonl "
                      f"(e.g. line {where[(q, d)]}: {d!r}); {len(unknown_relevant)} of them relevant, which count "
                      "as relevant but cannot be retrieved (as in BEIR), lowering recall and nDCG",
                      SoraWarning, stacklevel=2)
    counts = {"qrels_pairs": pairs, "qrels_queries": len(qrels), "qrels_unknown_documents": len(unknown),
              "qrels_unknown_relevant_documents": len(unknown_relevant), "qrels_unknown_queries": len(absent_q),
              "queries_without_relevant": len(qrels) - len(judged)}
    return BeirData(path, split, qpath, corpus_ids, corpus_texts, queries,
                    {q: qrels[q] for q in queries}, counts)


# --- the two evaluations ------------------------------------------------------------------------------------


def _load(model: Sora | str | Path, device: str) -> Sora:
    if isinstance(model, str | Path):
        import sora

        return sora.load(model, device=device)
    return model


def default_output(model: Sora, dataset: str, split: str) -> Path:
    """Beside a Sora run (``RUN/eval-DATASET-SPLIT``, as ``sora evaluate`` writes task reports); for a Hugging
    Face encoder (the MiniLM alias too), ``./eval-MODEL-DATASET-SPLIT``."""
    if model.config.get("kind") == "hf-encoder":
        name = model.path.parent.name if model.path.name == "model" else model.path.name
        return Path.cwd() / f"eval-{name}-{dataset}-{split}"
    return model.path.parent / f"eval-{dataset}-{split}"


def _write(out_dir: Path, metrics: dict[str, Any], markdown: str) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"metrics": out_dir / "metrics.json", "report": out_dir / "report.md"}
    files["metrics"].write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    files["report"].write_text(markdown, encoding="utf-8")
    return {k: str(v) for k, v in files.items()}


def _snippet(text: str, width: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _retrieval_markdown(data: BeirData, metrics: dict[str, Any], examples: list[dict[str, Any]],
                        model_path: str) -> str:
    lines = [f"# Retrieval: {data.path.name} ({data.split})", "",
             f"Model: `{model_path}` · queries: {metrics['n']} · corpus: {metrics['corpus']} documents · "
             f"max length: {metrics['max_length']} tokens · exact cosine search", "", "## Headline", ""]
    keys = [*HEADLINE, *(k for k in metrics if "_at_" in k and k not in HEADLINE)]
    lines += _table(["metric", "value"], [(metric_label(k), metrics[k]) for k in keys if k in metrics])
    lines += ["", "Documents are embedded as title + \" \" + text (BEIR, sentence-transformers). nDCG takes the "
              "qrels score as the gain (pytrec_eval's ndcg_cut, as BEIR reports); a score of 0 is not relevant. "
              "Only queries with a relevant document in the split are scored."]
    notes = [f"- {k.replace('_', ' ')}: {v}" for k, v in metrics.items()
             if k.startswith(("qrels_unknown", "queries_without")) and v]
    if notes:
        lines += ["", *notes]
    if examples:
        lines += ["", "## Examples", "", "The top 3 documents of the first queries (✓: relevant, with its qrels "
                  "score).", ""]
        for ex in examples:
            lines += [f"**{ex['query_id']}**: {_snippet(ex['query'], 200)} "
                      f"(relevant: {', '.join(ex['relevant']) or 'none'})", ""]
            lines += _table(["rank", "document", "cosine", "relevant", "text"],
                            [(h["rank"], h["id"], h["score"], f"✓ {h['relevance']}" if h["relevance"] > 0 else "✗",
                              _snippet(h["text"])) for h in ex["hits"]])
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def evaluate_retrieval(model: Sora | str | Path, data_dir: str | Path, split: str = "test", *,
                       batch_size: int = 64, max_length: int | None = None, k_values: Sequence[int] = K_VALUES,
                       out: str | Path | None = None, examples: int = 5, progress: bool = False,
                       device: str = "cpu") -> dict[str, Any]:
    """Retrieval metrics of ``model`` on the BEIR folder ``data_dir`` (exact cosine search; see the module
    docstring), with ``metrics.json`` and ``report.md`` written to ``out`` (default: ``default_output``).

    Returns ``{"mode": "retrieval", "data", "split", "metrics": {"ndcg_at_10", "recall_at_100", "mrr_at_10",
    …, "n", "corpus", "seconds", …}, "files"}``. ``max_length``: tokens per text (default: the model's)."""
    data = read_beir(data_dir, split)  # bad input fails before a model is loaded
    model = _load(model, device)
    length = int(max_length or model.max_length)
    k = max(max(k_values), 3)

    started = time.perf_counter()
    corpus = _embed(model, data.corpus_texts, batch_size, length, progress)
    corpus_s = time.perf_counter() - started
    qids = list(data.queries)
    q_emb = _embed(model, [data.queries[q] for q in qids], batch_size, length, progress)
    queries_s = time.perf_counter() - started - corpus_s
    scores, idx = exact_search(q_emb, corpus, k)
    search_s = time.perf_counter() - started - corpus_s - queries_s
    ranked = {q: [data.corpus_ids[i] for i in row] for q, row in zip(qids, idx.tolist(), strict=True)}

    metrics: dict[str, Any] = retrieval_metrics(ranked, data.qrels, k_values)
    metrics.update({"corpus": len(data.corpus_ids), "split": split, "qrels": str(data.qrels_path),
                    "max_length": length, "search": "exact cosine (normalised embeddings)",
                    "document_text": "title + ' ' + text", **data.counts,
                    "seconds": {"corpus": round(corpus_s, 2), "queries": round(queries_s, 2),
                                "search": round(search_s, 2), "total": round(time.perf_counter() - started, 2)}})
    text = dict(zip(data.corpus_ids, data.corpus_texts, strict=True))
    shown = []
    for q, row_s, row_i in list(zip(qids, scores.tolist(), idx.tolist(), strict=True))[:examples]:
        rels = data.qrels[q]
        shown.append({"query_id": q, "query": data.queries[q],
                      "relevant": [d for d, g in rels.items() if g > 0],
                      "hits": [{"rank": r + 1, "id": data.corpus_ids[i], "score": round(float(s), 4),
                                "relevance": rels.get(data.corpus_ids[i], 0), "text": text[data.corpus_ids[i]]}
                               for r, (s, i) in enumerate(zip(row_s[:3], row_i[:3], strict=True))]})
    out_dir = Path(out) if out else default_output(model, data.path.resolve().name, split)
    files = _write(out_dir, metrics, _retrieval_markdown(data, metrics, shown, str(model.path)))
    return {"mode": "retrieval", "data": str(data.path), "dataset": data.path.resolve().name, "split": split,
            "metrics": metrics, "examples": shown, "files": files}


def _number(value: Any) -> float | None:
    """A finite number (a numeric string too, as CSV gives), else None; booleans are not scores."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def find_score_column(data: str | Path, split: str = "test", delimiter: str | None = None) -> str | None:
    """The first of ``SCORE_COLUMNS`` whose value in the first row is a number (SICK: ``relatedness``, as its
    ``label`` is a class name), or None."""
    path = resolve_split(data, split)
    layout = detect_layout(path, None, delimiter, ["text_a", "text_b", *SCORE_COLUMNS])
    first = next(iter(read_records(path, layout=layout)), None)
    if first is None:
        return None
    return next((c for c in SCORE_COLUMNS if _number(first[1].get(c)) is not None), None)


def similarity_correlation(model: Sora | str | Path, data: str | Path, split: str = "test", *,
                           score_column: str | None = None, text_a_column: str = "text_a",
                           text_b_column: str = "text_b", batch_size: int = 64, max_length: int | None = None,
                           out: str | Path | None = None, delimiter: str | None = None, progress: bool = False,
                           device: str = "cpu") -> dict[str, Any]:
    """Spearman and Pearson correlation between a pair file's numeric score and the cosine similarity of the
    two texts' embeddings. ``data``: a file, or a folder with ``SPLIT.*``; ``score_column``: default the first
    numeric one of relatedness, score, similarity, label. Writes ``metrics.json`` and ``report.md`` to ``out``.

    Returns ``{"mode": "similarity", "data", "split", "metrics": {"spearman", "pearson", "n", …}, "files"}``."""
    from sora.metrics.labels import regression_metrics

    path = resolve_split(data, split)
    wanted = [text_a_column, text_b_column, *([score_column] if score_column else SCORE_COLUMNS)]
    layout = detect_layout(path, None, delimiter, wanted)
    rows = list(read_records(path, layout=layout))
    if not rows:
        raise DataError(f"{path}: no rows (empty data)")
    column = score_column
    if column is None:
        column = next((c for c in SCORE_COLUMNS if _number(rows[0][1].get(c)) is not None), None)
        if column is None:
            raise DataError(f"{path}:{rows[0][0]}: no numeric score column (looked for "
                            f"{', '.join(SCORE_COLUMNS)}; {layout.describe(rows[0][1])}); name it with --score-column")
    model = _load(model, device)
    a, b, y = [], [], []
    for line, record in rows:
        absent = [c for c in (text_a_column, text_b_column, column) if c not in record]
        if absent:
            raise DataError(f"{path}:{line}: no column {absent[0]!r} ({layout.describe(record)})")
        value = _number(record[column])
        if value is None:
            raise DataError(f"{path}:{line}: the score in column {column!r} is {record[column]!r:.40}, not a number")
        a.append(text_value(layout, line, record, text_a_column))
        b.append(text_value(layout, line, record, text_b_column))
        y.append(value)
    length = int(max_length or model.max_length)
    started = time.perf_counter()
    unique = list(dict.fromkeys(a + b))
    index = {t: i for i, t in enumerate(unique)}
    emb = _embed(model, unique, batch_size, length, progress)
    ea, eb = emb[[index[t] for t in a]], emb[[index[t] for t in b]]
    cosine = (ea * eb).sum(-1).cpu().numpy().astype(np.float64)
    metrics = regression_metrics(y, cosine.tolist())
    for key in ("mse", "mae"):  # cosine and the score live on different scales: only correlations mean anything
        metrics.pop(key, None)
    metrics.update({"score_column": column, "similarity": "cosine of normalised embeddings", "max_length": length,
                    "data": str(path), "seconds": round(time.perf_counter() - started, 2)})
    folder = Path(data).is_dir()
    dataset = path.parent.resolve().name if folder else path.stem
    out_dir = Path(out) if out else default_output(model, dataset, split)
    lines = [f"# Similarity: {dataset} ({split})", "",
             f"Model: `{model.path}` · pairs: {metrics['n']} · score column: `{column}` · max length: {length} tokens",
             "", "Correlation between the score and the cosine similarity of the two texts' embeddings.", ""]
    lines += _table(["metric", "value"], [(k, metrics.get(k)) for k in ("spearman", "pearson", "n")])
    if metrics.get("spearman") is not None and metrics.get("pearson") is not None:
        lines += ["", f"× 100, as STS results are usually reported: Spearman ρ {100 * metrics['spearman']:.2f}, "
                  f"Pearson r {100 * metrics['pearson']:.2f}."]
    if metrics.get("correlation_note"):
        lines += ["", f"- {metrics['correlation_note']}"]
    files = _write(out_dir, metrics, "\n".join(lines) + "\n")
    return {"mode": "similarity", "data": str(path), "dataset": dataset, "split": split, "metrics": metrics,
            "files": files, "label": f"{dataset} {split}" if folder else path.name}


def summary_line(result: dict[str, Any]) -> str:
    """One line for the CLI: the dataset, its size and the headline metrics."""
    m = result["metrics"]
    name = result.get("dataset") or Path(result["data"]).name
    if result["mode"] == "retrieval":
        heads = ", ".join(f"{metric_label(k)} {m[k]:.4f}" for k in HEADLINE if isinstance(m.get(k), float))
        return (f"{name} {result['split']} ({m['n']} queries, {m['corpus']} documents): {heads} "
                f"({m['seconds']['total']:.0f} s)")
    heads = ", ".join(f"{k} {_fmt(m.get(k))}" for k in ("spearman", "pearson"))
    return (f"{result.get('label', name)} ({m['n']} pairs, cosine vs {m['score_column']}): {heads} "
            f"({m['seconds']:.0f} s)")
