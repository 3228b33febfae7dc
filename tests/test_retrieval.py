"""Embedding-only evaluation: retrieval metrics against hand-computed values, exact search, a tiny BEIR run with
the MiniLM alias (API and CLI), similarity correlation on scored pairs, and bad input as one clear line."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import sora
from sora.errors import DataError, SoraError, SoraWarning
from sora.evaluate.retrieval import (
    evaluate_retrieval,
    exact_search,
    query_metrics,
    read_beir,
    retrieval_metrics,
    similarity_correlation,
    summary_line,
)

L2, L3, L4, L5 = math.log2(2), math.log2(3), math.log2(4), math.log2(5)  # discounts of ranks 1-4: log2(rank + 1)


# --- metrics by hand ----------------------------------------------------------------------------------------


def test_binary_relevance_by_hand():
    # Relevant at ranks 2 and 4.
    m = query_metrics(["d1", "d2", "d3", "d4"], {"d2": 1, "d4": 1}, k_values=(2, 10))
    assert m["ndcg_at_10"] == pytest.approx((1 / L3 + 1 / L5) / (1 / L2 + 1 / L3))  # 1.0616 / 1.6309 = 0.6509
    assert m["ndcg_at_10"] == pytest.approx(0.650921, abs=1e-6)
    assert m["ndcg_at_2"] == pytest.approx((1 / L3) / (1 + 1 / L3))
    assert m["mrr_at_10"] == pytest.approx(1 / 2) and m["mrr_at_2"] == pytest.approx(1 / 2)
    assert m["recall_at_2"] == pytest.approx(1 / 2) and m["recall_at_10"] == pytest.approx(1.0)
    assert m["map_at_10"] == pytest.approx((1 / 2 + 2 / 4) / 2)  # precision at ranks 2 and 4, over 2 relevant
    assert m["map_at_2"] == pytest.approx((1 / 2) / 2)


def test_graded_relevance_uses_the_score_as_gain():
    # a: 1 at rank 1, b: judged not relevant (0) at rank 2, c: 2 at rank 3; z: relevant (1) but never retrieved.
    m = query_metrics(["a", "b", "c"], {"a": 1, "b": 0, "c": 2, "z": 1}, k_values=(10,))
    dcg = 1 / L2 + 0 / L3 + 2 / L4  # = 2.0: linear gain (pytrec_eval / BEIR), not 2^rel - 1
    idcg = 2 / L2 + 1 / L3 + 1 / L4  # ideal order 2, 1, 1 = 3.1309
    assert m["ndcg_at_10"] == pytest.approx(dcg / idcg) and m["ndcg_at_10"] == pytest.approx(0.638788, abs=1e-6)
    exponential = (1 + 3 / L4) / (3 + 1 / L3 + 1 / L4)
    assert abs(m["ndcg_at_10"] - exponential) > 0.03  # the 2^rel - 1 convention would give 0.6052
    assert m["mrr_at_10"] == pytest.approx(1.0)
    assert m["recall_at_10"] == pytest.approx(2 / 3)  # a and c of a, c, z; b (score 0) is not relevant
    assert m["map_at_10"] == pytest.approx((1 / 1 + 2 / 3) / 3)


def test_relevant_document_below_the_cut_scores_zero():
    m = query_metrics(["x", "y", "r"], {"r": 1}, k_values=(2, 10))
    assert m["ndcg_at_2"] == 0.0 and m["mrr_at_2"] == 0.0 and m["recall_at_2"] == 0.0 and m["map_at_2"] == 0.0
    assert m["ndcg_at_10"] == pytest.approx(1 / L4) == 0.5
    assert m["mrr_at_10"] == pytest.approx(1 / 3) and m["recall_at_10"] == 1.0
    assert m["map_at_10"] == pytest.approx(1 / 3)


def test_retrieval_metrics_average_over_queries_with_a_relevant_document():
    qrels = {"q1": {"d1": 1}, "q2": {"d9": 1}, "q3": {"d1": 0}, "q4": {"d2": 1}}
    run = {"q1": ["d1", "d2"], "q2": ["d1", "d2"], "q3": ["d1"]}  # q2 misses; q4 has no ranking at all
    m = retrieval_metrics(run, qrels, k_values=(10,))
    assert m["n"] == 3  # q3 only has a score-0 judgement: not scored
    assert m["ndcg_at_10"] == pytest.approx(1 / 3) and m["mrr_at_10"] == pytest.approx(1 / 3)
    assert m["recall_at_10"] == pytest.approx(1 / 3)
    with pytest.raises(DataError, match="no query has a relevant document"):
        retrieval_metrics(run, {"q3": {"d1": 0}})


def test_exact_search_in_blocks_equals_a_full_sort():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(7, 5, generator=g), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(23, 5, generator=g), dim=-1)
    scores, idx = exact_search(q, c, k=6, query_block=3, corpus_block=4)
    full = q @ c.T
    expected_s, expected_i = torch.topk(full, 6, dim=1)
    assert idx.shape == (7, 6)
    torch.testing.assert_close(scores, expected_s)
    assert torch.equal(idx, expected_i)
    assert exact_search(q, c[:4], k=10)[1].shape == (7, 4)  # k larger than the corpus


# --- a tiny BEIR folder ---------------------------------------------------------------------------------------

DOCS = {
    "d1": ("Volcanoes", "A volcano erupts when molten rock called magma rises to the surface of the earth."),
    "d2": ("Photosynthesis", "Plants turn sunlight, water and carbon dioxide into sugar and oxygen."),
    "d3": ("Football", "The striker scored two goals in the second half and his team won the match."),
    "d4": ("Baking bread", "Knead the dough, let it rise for an hour, then bake it in a hot oven."),
    "d5": ("Black holes", "A black hole is a region of space where gravity is so strong that light cannot escape."),
    "d6": ("Vaccines", "Vaccines train the immune system to recognise a virus before an infection happens."),
    "d7": ("Stock market", "Share prices fell sharply after the central bank raised interest rates."),
    "d8": ("Coffee", "Coffee beans are roasted, ground and brewed with hot water to make the drink."),
}
QUERIES = {
    "q1": "how does magma coming up cause an eruption",
    "q2": "how do plants make sugar from light",
    "q3": "the forward netted twice after half time and they won",
    "q4": "how to make a loaf: knead, proof and bake the dough",
    "q5": "gravity so strong not even light escapes",
    "q6": "how a vaccine prepares the body's defences against a virus",
    "q7": "stocks dropped when rates went up",
    "q8": "unused query without qrels",
}
QRELS = [("q1", "d1", 1), ("q2", "d2", 1), ("q3", "d3", 2), ("q4", "d4", 1), ("q5", "d5", 1), ("q6", "d6", 1),
         ("q7", "d7", 1), ("q7", "d8", 0)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_qrels(path: Path, rows, header: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["query-id\tcorpus-id\tscore"] if header else []) + ["\t".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_beir(root: Path, qrels=QRELS, split: str = "test") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "corpus.jsonl", [{"_id": k, "title": t, "text": x} for k, (t, x) in DOCS.items()])
    write_jsonl(root / "queries.jsonl", [{"_id": k, "text": x} for k, x in QUERIES.items()])
    write_qrels(root / "qrels" / f"{split}.tsv", qrels)
    return root


@pytest.fixture(scope="module")
def minilm():
    return sora.load("all-MiniLM-L6-v2")


def test_read_beir_joins_title_and_text_and_keeps_queries_with_qrels(tmp_path):
    data = read_beir(make_beir(tmp_path / "tiny"), "test")
    assert data.corpus_ids[0] == "d1" and data.corpus_texts[0] == "Volcanoes " + DOCS["d1"][1]
    assert list(data.queries) == [f"q{i}" for i in range(1, 8)]  # q8 has no qrels
    assert data.qrels["q7"] == {"d7": 1, "d8": 0} and data.counts["qrels_pairs"] == 8


def test_tiny_beir_end_to_end(tmp_path, minilm):
    out = tmp_path / "report"
    result = evaluate_retrieval(minilm, make_beir(tmp_path / "tiny"), out=out, batch_size=4)
    m = result["metrics"]
    assert result["mode"] == "retrieval" and m["n"] == 7 and m["corpus"] == 8
    assert m["ndcg_at_10"] > 0.8 and m["mrr_at_10"] > 0.8 and m["recall_at_100"] == 1.0
    assert 0 <= m["map_at_100"] <= 1 and m["max_length"] == minilm.max_length
    saved = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert saved["ndcg_at_10"] == pytest.approx(m["ndcg_at_10"])
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| nDCG@10 |" in report and "## Examples" in report and "✓ 1" in report and "title + \" \" + text" in report
    assert result["examples"][0]["hits"][0]["id"] == "d1"


def test_cli_retrieval_writes_metrics(tmp_path, monkeypatch, capsys):
    data = make_beir(tmp_path / "tiny", split="validation")
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", "all-MiniLM-L6-v2", "--data", data, "--split", "dev",
                             "--max-length", "64", "--batch-size", "3", "-o", tmp_path / "eval")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("tiny dev (7 queries, 8 documents): nDCG@10 ") and "recall@100 1.0000" in lines[0]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["ndcg_at_10"] > 0.8 and metrics["max_length"] == 64 and metrics["split"] == "dev"
    assert lines[1] == f"report: {tmp_path / 'eval' / 'report.md'}"


# --- similarity correlation -----------------------------------------------------------------------------------

PAIRS = [
    ("A man is playing a guitar.", "A man plays the guitar.", 4.9),
    ("A woman is slicing an onion.", "A woman is cutting an onion.", 4.6),
    ("A dog runs across the park.", "A dog is running on the grass.", 3.9),
    ("Children are playing football.", "Kids play soccer outside.", 3.6),
    ("A man is cooking pasta.", "A woman is reading a book.", 1.4),
    ("A cat sleeps on the sofa.", "The stock market crashed today.", 1.0),
]


def write_pairs(path: Path, score_key: str = "relatedness", label: str = "neutral") -> Path:
    return write_jsonl(path, [{"text_a": a, "text_b": b, "label": label, score_key: s} for a, b, s in PAIRS])


def test_similarity_correlation_auto_detects_the_score(tmp_path, minilm):
    folder = tmp_path / "pairs"
    folder.mkdir()
    write_pairs(folder / "test.jsonl")
    result = similarity_correlation(minilm, folder, out=tmp_path / "sim")
    m = result["metrics"]
    assert m["score_column"] == "relatedness" and m["n"] == 6  # label is a class name, so not the score
    assert m["spearman"] > 0.8 and -1 <= m["pearson"] <= 1 and "mse" not in m
    assert json.loads((tmp_path / "sim" / "metrics.json").read_text())["spearman"] == pytest.approx(m["spearman"])
    assert "Spearman ρ" in (tmp_path / "sim" / "report.md").read_text(encoding="utf-8")
    assert summary_line(result).startswith("pairs test (6 pairs, cosine vs relatedness): spearman 0.")


def test_cli_similarity_with_score_column(tmp_path, monkeypatch, capsys):
    path = write_pairs(tmp_path / "pairs.jsonl", score_key="gold")
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", "minilm", "--data", path, "--score-column", "gold",
                             "-o", tmp_path / "sim")
    assert code == 0, err
    assert out.startswith("pairs.jsonl (6 pairs, cosine vs gold): spearman 0.")
    assert json.loads((tmp_path / "sim" / "metrics.json").read_text())["score_column"] == "gold"


# --- bad input: one line naming the file (and line) -----------------------------------------------------------


def run_cli(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
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
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(("breakage", "message"), [
    (lambda d: (d / "corpus.jsonl").unlink(), r"tiny: no corpus\.jsonl"),
    (lambda d: (d / "queries.jsonl").unlink(), r"tiny: no queries\.jsonl"),
    (lambda d: (d / "qrels" / "test.tsv").unlink(), r"qrels: no test\.tsv for --split test \(splits here: none\)"),
    (lambda d: write_qrels(d / "qrels" / "test.tsv", []), r"test\.tsv: no qrels \(the test split is empty\)"),
    (lambda d: write_qrels(d / "qrels" / "test.tsv", [("q1", "d1", "high")]), r"test\.tsv:2: the score 'high'"),
    (lambda d: write_qrels(d / "qrels" / "test.tsv", [("q1", "d1")]), r"test\.tsv:2: expected 3 tab-separated"),
    (lambda d: write_qrels(d / "qrels" / "test.tsv", [("nope", "d1", 1)]), r"none of its 1 query ids"),
    (lambda d: (d / "corpus.jsonl").write_text('{"_id": "d1", "title": "x"}\n'), r"corpus\.jsonl:1: no column 'text'"),
    (lambda d: (d / "corpus.jsonl").write_text('{"_id": "d1", "text": "a"}\n{"text": "b"}\n'),
     r"corpus\.jsonl:2: no '_id'"),
    (lambda d: (d / "corpus.jsonl").write_text('{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n'),
     r"corpus\.jsonl:2: duplicate _id 'd1' \(first on line 1\)"),
])
def test_bad_beir_folders_are_one_line(tmp_path, breakage, message):
    data = make_beir(tmp_path / "tiny")
    breakage(data)
    with pytest.raises(DataError, match=message):
        read_beir(data, "test")


def test_qrels_naming_unknown_documents_warn_and_count(tmp_path):
    data = make_beir(tmp_path / "tiny", qrels=[*QRELS, ("q1", "gone", 1)])
    with pytest.warns(SoraWarning, match=r"test\.tsv: 1 of 9 qrels pairs name documents not in corpus\.jsonl "
                                         r"\(e\.g\. line 10: 'gone'\)"):
        read = read_beir(data, "test")
    assert read.counts["qrels_unknown_documents"] == 1 and read.qrels["q1"] == {"d1": 1, "gone": 1}
    # It stays relevant (pytrec_eval counts it): q1 can reach recall 1/2 at best.
    assert retrieval_metrics({"q1": ["d1"]}, {"q1": read.qrels["q1"]})["recall_at_10"] == 0.5


def test_cli_bad_input_is_one_line(tmp_path, monkeypatch, capsys):
    data = make_beir(tmp_path / "tiny")
    (data / "corpus.jsonl").unlink()
    line = one_line_error(*run_cli(monkeypatch, capsys, "evaluate", "minilm", "--data", data,
                                   "-o", tmp_path / "eval")[::2])
    assert f"{data}: no corpus.jsonl" in line, line
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"text_a": "a", "text_b": "b", "gold": 1.0},
                                               {"text_a": "c", "text_b": "d", "gold": "n/a"}])
    line = one_line_error(*run_cli(monkeypatch, capsys, "evaluate", "minilm", "--data", pairs,
                                   "--score-column", "gold", "-o", tmp_path / "eval")[::2])
    assert f"{pairs}:2: the score in column 'gold' is 'n/a', not a number" in line, line
    labeled = write_jsonl(tmp_path / "t.jsonl", [{"text": "hi", "label": "a"}])
    line = one_line_error(*run_cli(monkeypatch, capsys, "evaluate", "minilm", "--data", labeled,
                                   "-o", tmp_path / "eval")[::2])
    assert "no task heads" in line and "BEIR" in line and "--score-column" in line, line
    assert not (tmp_path / "eval").exists()
    with pytest.raises(SoraError):
        similarity_correlation("minilm", write_jsonl(tmp_path / "e.jsonl", [{"text_a": "a", "text_b": "b"}]))
