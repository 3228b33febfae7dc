"""Extractive QA data and metrics: SQuAD/CMRC scoring on hand-computed examples, read_qa's one-line errors,
windows whose offsets map back exactly (WordPiece and byte-level BPE, Chinese included), answer decoding."""

from __future__ import annotations

import json
import math
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import slice_jsonl, write_jsonl

from sora.data.qa import NO_ANSWER_SCORE, QAExample, best_answers, qa_batches, qa_features, read_qa
from sora.errors import DataError
from sora.metrics.squad import (
    cmrc_em,
    cmrc_f1,
    cmrc_metrics,
    detect_language,
    exact_match_score,
    f1_score,
    metric_max_over_ground_truths,
    mixed_segmentation,
    normalize_answer,
    qa_metrics,
    squad_metrics,
)
from sora.models.hf_import import resolve_backbone
from sora.text.tokenizer import SoraTokenizer, train_tokenizer

CONTEXT = " ".join(f"Sentence {i} tells about topic {i}." for i in range(30))
ZH = [
    "范廷颂枢机，圣名保禄·若瑟，是越南罗马天主教枢机。",
    "１９６３年被任为主教；1990年被擢升为天主教河内总教区宗座署理。",
    "范廷颂于1919年6月15日在越南宁平省天主教发艳教区出生。",
]


@pytest.fixture(scope="module")
def minilm() -> SoraTokenizer:
    return SoraTokenizer.load(resolve_backbone("all-MiniLM-L6-v2"))


@pytest.fixture(scope="module")
def bpe() -> SoraTokenizer:
    return train_tokenizer(ZH * 2 + ["NBA 球星 world 在 1990年代"] * 2, vocab_size=300, min_frequency=1)


def _topics(question: str = "What is the sentence about?") -> list[QAExample]:
    """One example per "topic k" of CONTEXT: the answers fall everywhere, some across window boundaries."""
    out = []
    for k in range(30):
        answer = f"topic {k}"
        start = CONTEXT.index(f"about {answer}.") + len("about ")
        out.append(QAExample(f"t{k}", question, CONTEXT, [answer], [start], k + 1))
    return out


# ---------------------------------------------------------------------------------------------------- SQuAD


def test_normalize_answer_follows_the_official_order():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("Theatre of the Absurd") == "theatre of absurd"  # articles only as whole words
    assert normalize_answer("U.S.") == normalize_answer("US") == "us"
    assert normalize_answer("the") == ""


def test_squad_em_and_f1_on_hand_examples():
    assert exact_match_score("the Denver Broncos!", "Denver Broncos") == 1.0
    assert exact_match_score("Denver", "Denver Broncos") == 0.0
    # "cat sat on mat" vs "cat on mat": 3 shared, P = 3/4, R = 1.
    assert f1_score("the cat sat on the mat", "cat on mat") == pytest.approx(6 / 7)
    # Tokens count with multiplicity: "x x y" vs "x y" shares 2, P = 2/3, R = 1.
    assert f1_score("x x y", "x y") == pytest.approx(0.8)
    assert f1_score("x x y", "x x z") == pytest.approx(2 / 3)  # x shared twice (a set would share once)
    assert f1_score("nothing shared", "cat") == 0.0
    golds = ["Broncos", "Denver Broncos", "the team"]
    assert metric_max_over_ground_truths(exact_match_score, "denver broncos", golds) == 1.0
    assert metric_max_over_ground_truths(f1_score, "Denver", golds) == pytest.approx(2 / 3)  # P 1, R 1/2


def test_squad_metrics_count_unanswered_questions_as_zero():
    references = {"1": ["Denver Broncos"], "2": ["cat on mat"], "3": ["x"]}
    predictions = {"1": "the Denver Broncos!", "2": "the cat sat on the mat", "extra": "ignored"}
    result = squad_metrics(predictions, references)
    assert result["n"] == 3
    assert result["exact_match"] == pytest.approx(100 / 3)
    assert result["f1"] == pytest.approx(100 * (1 + 6 / 7) / 3)
    assert squad_metrics({}, {}) == {"exact_match": 0.0, "f1": 0.0, "n": 0}


# ----------------------------------------------------------------------------------------------------- CMRC


def test_cmrc_mixed_segmentation_and_longest_common_substring_f1():
    assert mixed_segmentation("2009年2月，Hello World") == ["2009", "年", "2", "月", "hello", "world"]
    assert mixed_segmentation("3.5亿", remove_punctuation=False) == ["3.5", "亿"]
    assert mixed_segmentation("《红楼梦》", remove_punctuation=False) == ["《", "红", "楼", "梦", "》"]
    # [在 北 京 大 学] vs [北 京 大 学] (。 removed): LCS 4, P = 4/5, R = 1.
    assert cmrc_f1("在北京大学。", ["北京大学"]) == pytest.approx(8 / 9)
    # A substring, not a subsequence: [北 大 学] vs [北 京 大 学] share "大学" (2), P = 2/3, R = 1/2.
    assert cmrc_f1("北大学", ["北京大学"]) == pytest.approx(4 / 7)
    assert cmrc_f1("2009年", ["2009年2月"]) == pytest.approx(2 / 3)  # P 1, R 2/4
    assert cmrc_f1("上海", ["北京"]) == 0.0
    assert cmrc_em("《红楼梦》", ["红楼梦"]) == 1.0
    assert cmrc_em("在北京大学。", ["北京大学"]) == 0.0
    assert cmrc_em("ＮＢＡ", ["nba", "美职篮"]) == 0.0  # no NFKC in the official script
    assert cmrc_em("NBA ", ["nba"]) == 1.0


def test_cmrc_metrics_and_the_automatic_choice():
    references = {"a": ["北京大学", "北大"], "b": ["2009年2月"]}
    result = cmrc_metrics({"a": "北大", "b": "2009年"}, references)
    assert result == {"exact_match": pytest.approx(50.0), "f1": pytest.approx(100 * (1 + 2 / 3) / 2), "n": 2}
    assert detect_language(references) == "zh" and detect_language({"q": ["Denver Broncos"]}) == "en"
    zh = {"q": ["北京大学"]}
    assert qa_metrics({"q": "在北京大学。"}, zh)["f1"] == pytest.approx(100 * 8 / 9)  # CMRC
    assert qa_metrics({"q": "在北京大学。"}, zh, language="en")["f1"] == 0.0  # SQuAD: one token each, no match
    assert qa_metrics({"q": "the cat sat on the mat"}, {"q": ["cat on mat"]})["f1"] == pytest.approx(600 / 7)
    with pytest.raises(ValueError, match="language"):
        qa_metrics({}, {}, language="fr")


# -------------------------------------------------------------------------------------------------- read_qa

GOOD = {
    "id": "q0",
    "context": "Paris is the capital of France.",
    "question": "What is the capital?",
    "answers": {"text": ["Paris"], "answer_start": [0]},
}


def _row(**changes) -> dict:
    row = json.loads(json.dumps(GOOD)) | {"id": "q1"}
    for key, value in changes.items():
        if value is ...:
            row.pop(key)
        else:
            row[key] = value
    return row


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (_row(question=...), "no question"),
        (_row(question="  "), "empty question"),
        (_row(question=3), "question is a int"),
        (_row(context=...), "no context"),
        (_row(context=""), "empty context"),
        (_row(answers=...), "no answers"),
        (_row(answers={"text": [], "answer_start": []}), "no answers"),
        (_row(answers={"text": ["Paris"], "answer_start": [99]}), "answer_start 99 lies outside the context (31"),
        (_row(answers={"text": ["Paris"], "answer_start": [-1]}), "outside the context"),
        (
            _row(answers={"text": ["France"], "answer_start": [23]}),
            "does not match the context at answer_start 23: context[23:29] is ' Franc'; the text occurs at 24",
        ),
        (_row(answers={"text": ["Lyon"], "answer_start": [0]}), "is 'Pari'; the text is not in the context"),
        (_row(answers={"text": ["Paris", "France"], "answer_start": [0]}), "2 text(s) but 1 answer_start(s)"),
        (_row(answers={"text": ["Paris"], "answer_start": ["0"]}), "answer_start '0' is not an integer"),
        (_row(answers={"text": [""], "answer_start": [0]}), "answer text '' is not a non-empty string"),
        (_row(answers={"text": ["Paris"]}), "answers must be"),
        (_row(id="q0"), "id 'q0' repeats line 1"),
    ],
)
def test_read_qa_names_the_file_and_line_of_a_bad_row(tmp_path, row, message):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, row])
    with pytest.raises(DataError) as err:
        read_qa(path)
    text = str(err.value)
    assert text.startswith(f"{path}:2: ") and message in text and "\n" not in text, text


def test_read_qa_reads_splits_inference_rows_and_the_list_form(tmp_path):
    assert "no examples (empty data)" in _error(lambda: read_qa(write_jsonl(tmp_path / "empty.jsonl", [])))
    rows = [
        GOOD,
        {"context": "Le chat dort.", "question": "Qui dort ?"},
        _row(id="q2", answers=[{"text": "France", "answer_start": 24}]),
    ]
    directory = tmp_path / "data"
    directory.mkdir()
    write_jsonl(directory / "validation.jsonl", rows)
    examples = read_qa(directory, "validation", require_answers=False)
    assert [(e.id, e.answers, e.starts, e.line) for e in examples] == [
        ("q0", ["Paris"], [0], 1),
        ("2", [], [], 2),
        ("q2", ["France"], [24], 3),
    ]
    assert "validation.jsonl:2: no answers" in _error(lambda: read_qa(directory, "validation"))
    assert "no train file" in _error(lambda: read_qa(directory))


def _error(call) -> str:
    with pytest.raises(DataError) as err:
        call()
    return str(err.value)


# -------------------------------------------------------------------------------------------------- windows


def _answer_inside(feature, start: int, end: int) -> bool:
    spans = feature.offsets[feature.context_start : feature.context_end]
    return spans[0][0] <= start and end <= spans[-1][1]


def test_windows_cover_the_context_overlap_by_stride_and_label_exactly(minilm):
    examples = _topics()
    max_length, stride = 48, 12
    features = qa_features(minilm, examples, max_length, stride, train=True)
    q = minilm.tk.encode(examples[0].question, add_special_tokens=False).ids
    head = [minilm.cls_id, *q, minilm.sep_id]
    context_ids = minilm.tk.encode(CONTEXT, add_special_tokens=False).ids
    for index, ex in enumerate(examples):
        windows = [f for f in features if f.example == index]
        assert len(windows) > 3
        pieces = []
        for f in windows:
            assert len(f.ids) <= max_length and f.ids[: len(head)] == head and f.ids[-1] == minilm.sep_id
            assert f.types == [0] * len(head) + [1] * (len(f.ids) - len(head))
            assert f.context_start == len(head) and f.context_end == len(f.ids) - 1
            assert all(o is None for o in f.offsets[: len(head)] + f.offsets[-1:])
            pieces.append(f.ids[f.context_start : f.context_end])
        for a, b in zip(pieces, pieces[1:], strict=False):
            assert a[-stride:] == b[:stride]  # consecutive windows share exactly `stride` tokens
        assert sum(len(p) for p in pieces) - stride * (len(pieces) - 1) == len(context_ids)
        covered = {i for f in windows for s, e in f.offsets[f.context_start : f.context_end] for i in range(s, e)}
        assert covered == {i for i, ch in enumerate(CONTEXT) if not ch.isspace()}
        start, end = ex.starts[0], ex.starts[0] + len(ex.answers[0])
        for f in windows:
            if _answer_inside(f, start, end):
                assert f.start > 0 and CONTEXT[f.offsets[f.start][0] : f.offsets[f.end][1]] == ex.answers[0]
            else:
                assert (f.start, f.end) == (0, 0)
        assert any(f.start for f in windows)
    # Some answers straddle a window boundary: those windows are labelled 0/0, the answer lives in the next.
    straddling = [
        f
        for f in features
        if f.start == 0
        and any(
            s < examples[f.example].starts[0] + 8 and e > examples[f.example].starts[0]
            for s, e in f.offsets[f.context_start : f.context_end]
        )
        and not _answer_inside(f, examples[f.example].starts[0], examples[f.example].starts[0] + 8)
    ]
    assert straddling
    inference = qa_features(minilm, examples[:1], max_length, stride, train=False)
    assert [f.ids for f in inference] == [f.ids for f in features if f.example == 0]
    assert all(f.start is None and f.end is None for f in inference)


def test_a_long_question_is_cut_so_the_context_keeps_room(minilm):
    question = " ".join(["why"] * 200) + "?"
    ex = QAExample("long", question, CONTEXT, ["topic 29"], [CONTEXT.index("topic 29")])
    features = qa_features(minilm, [ex], max_length=64, stride=16, train=True, max_question_length=64)
    assert len(features) > 1
    for f in features:
        assert len(f.ids) <= 64 and f.context_start - 2 == 64 - 3 - 16 - 1  # the cap left stride + 1
        assert f.context_end - f.context_start >= 1
    assert (
        CONTEXT[features[-1].offsets[features[-1].start][0] : features[-1].offsets[features[-1].end][1]] == "topic 29"
    )
    short = qa_features(minilm, [ex], max_length=384, stride=128, train=True, max_question_length=10)
    assert short[0].context_start == 1 + 10 + 1
    with pytest.raises(ValueError, match="no room"):
        qa_features(minilm, [ex], max_length=20, stride=16, train=True)


def _zh_examples() -> list[QAExample]:
    context = "".join(ZH).replace("。", "。 ", 1) + "  NBA 球星 ｗorld 在 1990年代"
    words = [
        "越南罗马",
        "枢机",
        "１９６３年",
        "河内总教区",
        "1919年6月15日",
        "宁平省",
        "NBA",
        "球星",
        "ｗorld",
        "1990年代",
    ]
    return [QAExample(f"z{i}", "谁是枢机？", context, [w], [context.index(w)], i + 1) for i, w in enumerate(words)]


def test_chinese_offsets_round_trip_with_byte_level_bpe(bpe):
    examples = _zh_examples()
    context = examples[0].context
    tk = bpe.tk
    for f in qa_features(bpe, examples[:1], max_length=1000, stride=0, train=False):
        spans = f.offsets[f.context_start : f.context_end]
        ids = f.ids[f.context_start : f.context_end]
        assert tk.decode(ids).strip() == unicodedata.normalize("NFKC", context)
        assert all(0 <= s <= e <= len(context) for s, e in spans)
        # Spans are trimmed: byte-level tokens carry the space before a word ("ĠNBA"), the span does not.
        assert all(context[s:e] == context[s:e].strip() for s, e in spans)
        raw = tk.encode(context, add_special_tokens=False).offsets
        assert any(context[s].isspace() and context[s:e].strip() for s, e in raw)  # "ĠNBA" was trimmed
        assert sum(s == e for s, e in spans) == sum(not context[s:e].strip() for s, e in raw) > 0  # "Ġ" alone
        assert [s for s, _ in spans] == sorted(s for s, _ in spans)
        for token_id, (s, e) in zip(ids, spans, strict=True):
            piece = tk.decode([token_id])
            if piece.strip() and "\ufffd" not in piece:  # a token holding whole characters
                assert piece.strip() == unicodedata.normalize("NFKC", context[s:e]), (piece, context[s:e])
    # A byte-level token may hold the end of one character and the start of the next ("年被"): an answer
    # ending inside it cannot be cut exactly, and the label covers it (as run_qa), extending by that character.
    starts_at, ends_at = {s for s, _ in spans}, {e for _, e in spans}
    features = qa_features(bpe, examples, max_length=48, stride=8, train=True)
    assert len([f for f in features if f.example == 0]) > 3
    exact = 0
    for index, ex in enumerate(examples):
        start, end = ex.starts[0], ex.starts[0] + len(ex.answers[0])
        labelled = [f for f in features if f.example == index and f.start]
        assert labelled, ex.answers[0]
        for f in labelled:
            s, e = f.offsets[f.start][0], f.offsets[f.end][1]
            if start in starts_at and end in ends_at:
                assert context[s:e] == ex.answers[0]
                before, after = f.offsets[f.start - 1], f.offsets[f.end + 1]  # the first and last piece:
                assert before is None or before[0] < s or before[0] == before[1]  # (or a lone space before)
                assert after is None or after[1] > e
                exact += 1
            else:
                assert s <= start and end <= e and e - s <= len(ex.answers[0]) + 2, (context[s:e], ex.answers)
    assert exact >= len(examples) // 2 and {"NBA", "球星", "ｗorld"} <= {
        ex.answers[0] for ex in examples if ex.starts[0] in starts_at
    }


def test_chinese_offsets_with_wordpiece(minilm):
    ex = _zh_examples()[0]
    (f,) = qa_features(minilm, [ex], max_length=384, stride=128, train=True)
    for token_id, (s, e) in zip(
        f.ids[f.context_start : f.context_end], f.offsets[f.context_start : f.context_end], strict=True
    ):
        token = minilm.tk.id_to_token(token_id)
        if token != "[UNK]":
            assert token.removeprefix("##") == context_piece(ex.context, s, e)
    assert ex.context[f.offsets[f.start][0] : f.offsets[f.end][1]] == "越南罗马"


def context_piece(context: str, s: int, e: int) -> str:
    return context[s:e].lower()  # BERT's normaliser lower-cases (no NFKC)


# ------------------------------------------------------------------------------------------------- decoding


def _token_at(feature, char: int, side: int) -> int:
    """The feature position of the context token starting (side 0) or ending (side 1) at ``char``."""
    for i in range(feature.context_start, feature.context_end):
        if feature.offsets[i][side] == char:
            return i
    raise AssertionError(char)


def _planted(minilm, max_answer_length: int = 30, other: float = 11.0):
    ex = _topics()[17]
    start, end = ex.starts[0], ex.starts[0] + len(ex.answers[0])
    features = qa_features(minilm, [ex], max_length=48, stride=16, train=False)
    holding = [f for f in features if _answer_inside(f, start, end)]
    assert len(holding) == 2  # the answer is in the overlap of two windows
    starts = [np.full(len(f.ids), -30.0) for f in features]
    ends = [np.full(len(f.ids), -30.0) for f in features]
    (a, fa), (b, fb) = [(features.index(f), f) for f in holding]
    assert 0 not in (a, b)
    starts[a][_token_at(fa, start, 0)], ends[a][_token_at(fa, end, 1)] = 4.0, 4.0
    answer_start, answer_end = _token_at(fb, start, 0), _token_at(fb, end, 1)
    starts[b][answer_start], ends[b][answer_end] = 6.0, 6.0
    starts[b][1], ends[b][2] = 100.0, 100.0  # question tokens: never an answer
    # End (20) before start (20), away from the answer: every valid pair through either scores -10.
    assert fb.context_start < answer_start and answer_end < fb.context_end - 1
    starts[b][fb.context_end - 1], ends[b][fb.context_start] = 20.0, 20.0
    # Another answer in the first window, "topic 3", scoring `other`.
    o_start = CONTEXT.index("topic 3.")
    starts[0][_token_at(features[0], o_start, 0)] = other / 2
    ends[0][_token_at(features[0], o_start + 7, 1)] = other / 2
    # A 12-token span scoring 60, valid only when max_answer_length allows it.
    long_start = features[0].context_start + 2
    starts[0][long_start], ends[0][long_start + 11] = 30.0, 30.0
    (result,) = best_answers([ex], features, starts, ends, n_best=20, max_answer_length=max_answer_length)
    return ex, features, starts, ends, result


def test_best_answers_recovers_a_planted_answer_across_windows(minilm):
    ex, features, starts, ends, result = _planted(minilm, max_answer_length=11)
    start = CONTEXT.index("topic 17.")
    assert result["answer"] == "topic 17" == CONTEXT[result["start"] : result["end"]]
    assert (result["start"], result["end"]) == (start, start + 8) and result["id"] == "t17"
    assert result["score"] == pytest.approx(12.0) and 0.5 < result["probability"] <= 1.0
    # The same logits as one padded array (and as tensors) decode the same.
    width = max(len(f.ids) for f in features)
    padded = [np.pad(r, (0, width - len(r)), constant_values=99.0) for r in starts]
    padded_end = [np.pad(r, (0, width - len(r)), constant_values=99.0) for r in ends]
    assert best_answers([ex], features, np.stack(padded), torch.tensor(np.stack(padded_end)), max_answer_length=11) == [
        result
    ]
    # A better answer in another window wins.
    assert _planted(minilm, max_answer_length=11, other=13.0)[-1]["answer"] == "topic 3"


def test_best_answers_respects_max_answer_length(minilm):
    ex, features, starts, ends, result = _planted(minilm, max_answer_length=12)
    first = features[0]
    s, e = first.offsets[first.context_start + 2][0], first.offsets[first.context_start + 13][1]
    assert result["score"] == pytest.approx(60.0) and result["answer"] == CONTEXT[s:e]
    assert len(minilm.tk.encode(result["answer"], add_special_tokens=False).ids) == 12
    (none,) = best_answers([ex], features, starts, ends, max_answer_length=0)
    assert none["answer"] == "" and none["score"] == NO_ANSWER_SCORE and math.isinf(none["score"])
    assert none["probability"] == 0.0 and (none["start"], none["end"]) == (0, 0)
    with pytest.raises(ValueError, match="rows for"):
        best_answers([ex], features, starts[:1], ends)


def test_best_answers_scores_and_probability_by_hand(minilm):
    ex = QAExample("abc", "Which?", "alpha beta gamma", [], [])
    (f,) = qa_features(minilm, [ex], train=False)
    assert f.context_end - f.context_start == 3  # alpha, beta, gamma
    start, end = np.full(len(f.ids), -100.0), np.full(len(f.ids), -100.0)
    start[f.context_start : f.context_end], end[f.context_start : f.context_end] = [3, 1, 0], [0, 1.5, 3]
    # Spans (start <= end): alpha-gamma 6, alpha-beta 4.5, beta-gamma 4, alpha 3, gamma 3, beta 2.5.
    (best,) = best_answers([ex], [f], [start], [end])
    assert (best["answer"], best["start"], best["end"], best["score"]) == ("alpha beta gamma", 0, 16, 6.0)
    assert best["probability"] == pytest.approx(
        1 / (1 + math.exp(-1.5) + math.exp(-2) + 2 * math.exp(-3) + math.exp(-3.5))
    )
    # n_best=2: starts {alpha, beta} x ends {gamma, beta}; the 2 best candidates are 6 and 4.5.
    (two,) = best_answers([ex], [f], [start], [end], n_best=2)
    assert two["score"] == 6.0 and two["probability"] == pytest.approx(1 / (1 + math.exp(-1.5)))
    (short,) = best_answers([ex], [f], [start], [end], max_answer_length=2)
    assert (short["answer"], short["start"], short["end"], short["score"]) == ("alpha beta", 0, 10, 4.5)


def test_qa_batches_pad_and_carry_positions(minilm):
    features = qa_features(minilm, _topics()[:2], max_length=48, stride=12, train=True)
    batches = list(qa_batches(features, 4, minilm.pad_id, with_positions=True))
    assert sum(len(b["input_ids"]) for b in batches) == len(features)
    first, chunk = batches[0], features[:4]
    width = max(len(f.ids) for f in chunk)
    assert first["input_ids"].shape == first["token_type_ids"].shape == (4, width)
    for row, f in enumerate(chunk):
        n = len(f.ids)
        assert first["input_ids"][row, :n].tolist() == f.ids and (first["input_ids"][row, n:] == minilm.pad_id).all()
        assert first["token_type_ids"][row].tolist() == f.types + [0] * (width - n)
        assert first["attention_mask"][row].tolist() == [True] * n + [False] * (width - n)
    assert first["start_positions"].tolist() == [f.start for f in chunk]
    assert first["end_positions"].dtype == torch.long
    inference = qa_features(minilm, _topics()[:1], max_length=48, stride=12, train=False)
    assert "start_positions" not in next(qa_batches(inference, 4, minilm.pad_id, with_positions=False))
    with pytest.raises(ValueError, match="labelled"):
        next(qa_batches(inference, 4, minilm.pad_id, with_positions=True))


# ---------------------------------------------------------------------------------------------- shared data


@pytest.mark.parametrize(("name", "max_length", "stride"), [("squad_v1", 128, 32), ("cmrc2018", 384, 128)])
def test_real_answers_survive_windowing(minilm, shared_data, tmp_path, name, max_length, stride):
    """CMRC answers run to 80 characters (tokens, for MiniLM), so it is windowed at the usual 384."""
    path = slice_jsonl(shared_data(name) / "train.jsonl", tmp_path / "train.jsonl", 50, keys=())
    examples = read_qa(Path(path))
    features = qa_features(minilm, examples, max_length=max_length, stride=stride, train=True)
    assert len(features) > len(examples)  # some contexts need several windows
    found = {
        f.example
        for f in features
        if f.start
        and examples[f.example].context[f.offsets[f.start][0] : f.offsets[f.end][1]] == examples[f.example].answers[0]
    }
    assert len(found) >= 0.98 * len(examples), len(found)
