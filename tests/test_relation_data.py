"""Relation extraction data and metric: marker/span parsing with file:line errors, entity marking, entity-start
token indices for WordPiece (MiniLM) and byte-level BPE, cropping long texts, batches, and the official
SemEval-2010 Task 8 score."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

from sora.data.relation import (
    RelationExample,
    encode_relations,
    make_relation_batch,
    mark,
    read_relations,
    relation_batches,
    split_direction,
)
from sora.errors import DataError
from sora.metrics.semeval import semeval_scores
from sora.models.hf_import import resolve_backbone
from sora.text.tokenizer import SoraTokenizer, train_tokenizer

ROW = {
    "id": "1",
    "text": "The system has its greatest application in an arrayed <e1>configuration</e1> of antenna "
    "<e2>elements</e2>.",
    "label": "Component-Whole(e2,e1)",
    "head": "configuration",
    "tail": "elements",
}
FILLER = ["the", "antidisestablishmentarian", "committee", "reconsidered", "unrecognizable", "proposals", "yesterday"]


@pytest.fixture(scope="module")
def minilm() -> SoraTokenizer:
    return SoraTokenizer.load(resolve_backbone("all-MiniLM-L6-v2"))


@pytest.fixture(scope="module")
def bpe() -> SoraTokenizer:
    texts = [ROW["text"], " ".join(FILLER), "mail me @ noon about # tags, the tea and its cup"] * 3
    return train_tokenizer(texts, vocab_size=300, min_frequency=1)


def read_one(tmp_path: Path, row: dict, **kwargs) -> RelationExample:
    (example,) = read_relations(write_jsonl(tmp_path / "train.jsonl", [row]), **kwargs)
    return example


def entity(ex: RelationExample, which: str) -> str:
    start, end = getattr(ex, which)
    return ex.text[start:end]


# --- parsing -------------------------------------------------------------------------------------------------


def test_markers_are_removed_and_give_the_entity_spans(tmp_path):
    ex = read_one(tmp_path, ROW)
    assert ex.text == "The system has its greatest application in an arrayed configuration of antenna elements."
    assert (entity(ex, "head"), entity(ex, "tail")) == ("configuration", "elements")
    assert ex.label == "Component-Whole(e2,e1)" and ex.line == 1


def test_the_tail_may_come_first_and_spaces_inside_markers_are_not_the_entity(tmp_path):
    row = {"text": "The <e2> cup </e2> holds the <e1>tea</e1>.", "label": "Content-Container(e1,e2)", "head": "tea"}
    ex = read_one(tmp_path, row)
    assert ex.text == "The  cup  holds the tea."
    assert (entity(ex, "head"), entity(ex, "tail")) == ("tea", "cup") and ex.tail[0] < ex.head[0]


def test_character_spans_on_plain_text(tmp_path):
    text = "A misty ridge uprises from the surge."
    ex = read_one(
        tmp_path,
        {"text": text, "label": "Other", "head_span": [8, 13], "tail_span": [31, 36], "head": "ridge", "tail": "surge"},
    )
    assert ex.text == text and ex.head == (8, 13) and (entity(ex, "head"), entity(ex, "tail")) == ("ridge", "surge")
    csv = tmp_path / "rows.csv"  # a CSV cell holds the span as text
    csv.write_text('text,label,head_span,tail_span\n"A misty ridge uprises.",Other,"[8, 13]","[14, 21]"\n')
    (ex,) = read_relations(csv)
    assert (entity(ex, "head"), entity(ex, "tail")) == ("ridge", "uprises")


def test_unlabeled_rows_when_labels_are_not_required(tmp_path):
    ex = read_one(tmp_path, {"text": "<e1>a</e1> b <e2>c</e2>"}, require_labels=False)
    assert ex.label is None


TEXT = "x <e1>a</e1> y <e2>b</e2> z"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"text": "no entities here", "label": "Other"}, "no entities"),
        ({"text": "x <e1>a</e1> y <e2>b z", "label": "Other"}, "no </e2>"),
        ({"text": "x </e1>a<e1> y <e2>b</e2>", "label": "Other"}, "</e1> comes before <e1>"),
        ({"text": "<e1>a <e2>b</e2> c</e1>", "label": "Other"}, "nested entity markers"),
        ({"text": "<e1>a <e2>b</e1> c</e2>", "label": "Other"}, "overlapping entity markers"),
        ({"text": "<e1>a</e1> <e1>b</e1> <e2>c</e2>", "label": "Other"}, "<e1> appears twice"),
        ({"text": "<e1>a</e1> <e3>b</e3> <e2>c</e2>", "label": "Other"}, "unknown entity marker <e3>"),
        ({"text": "x <e1> </e1> y <e2>b</e2>", "label": "Other"}, "empty entity <e1></e1>"),
        ({"text": "abc def", "label": "Other", "head_span": [0, 3], "tail_span": [4, 9]}, "outside the text"),
        ({"text": "abc def", "label": "Other", "head_span": [2, 2], "tail_span": [4, 7]}, "is empty"),
        ({"text": "abc def", "label": "Other", "head_span": [3, 4], "tail_span": [4, 7]}, "only whitespace"),
        ({"text": "abc def", "label": "Other", "head_span": [0, 5], "tail_span": [4, 7]}, "overlap"),
        ({"text": "abc def", "label": "Other", "head_span": [0, 3]}, "tail_span is missing"),
        ({"text": "abc def", "label": "Other", "head_span": "0-3", "tail_span": [4, 7]}, "not a [start, end]"),
        ({"text": TEXT, "label": "Other", "head_span": [0, 1], "tail_span": [2, 3]}, "both entity markers"),
        ({"text": TEXT, "label": "Other", "head": "q"}, "head 'q' does not match the marked text 'a'"),
        (
            {"text": "abc def", "label": "Other", "head_span": [0, 3], "tail_span": [4, 7], "tail": "de"},
            "tail 'de' does not match",
        ),
        ({"text": TEXT}, "missing label in column 'label'"),
        ({"text": TEXT, "label": ""}, "empty label"),
        ({"text": "   ", "label": "Other"}, "empty text"),
        ({"label": "Other"}, "no text in column 'text'"),
    ],
)
def test_each_bad_row_is_one_line_naming_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "<e1>ok</e1> <e2>fine</e2>", "label": "Other"}, row])
    with pytest.raises(DataError) as info:
        read_relations(path)
    text = str(info.value)
    assert text.startswith(f"{path}:2: ") and message in text and "\n" not in text, text


def test_an_empty_file_and_a_missing_split(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no examples"):
        read_relations(tmp_path)
    with pytest.raises(DataError, match="no validation file"):
        read_relations(tmp_path, "validation")


def test_split_direction():
    assert split_direction("Cause-Effect(e2,e1)") == ("Cause-Effect", "(e2,e1)")
    assert split_direction("Cause-Effect (e1, e2)") == ("Cause-Effect", "(e1,e2)")
    assert split_direction("Other") == ("Other", "")
    assert split_direction("per:city_of_birth") == ("per:city_of_birth", "")


# --- marking and encoding ------------------------------------------------------------------------------------


def example(text: str, label: str = "Other") -> RelationExample:
    from sora.data.relation import parse_relation

    return parse_relation({"text": text, "label": label}, "test:1", 1)


def test_marked_text_and_marker_positions():
    text, h, t = mark(example("an arrayed <e1>configuration</e1> of antenna <e2>elements</e2>."))
    assert text == "an arrayed @ configuration @ of antenna # elements # ."
    assert (text[h], text[t]) == ("@", "#") and text[h:].startswith("@ configuration @")
    text, h, t = mark(example("(<e2>cup</e2>) holds <e1>tea</e1>"))
    assert text == "( # cup # ) holds @ tea @" and (text[h], text[t]) == ("@", "#") and t < h


def test_typed_markers_where_rows_give_entity_types():
    ex = RelationExample("Bill was born in Seattle.", "per:city_of_birth", (0, 4), (17, 24), 1, "person", "city")
    text, h, t = mark(ex)
    assert text == "@ * person * Bill @ was born in # ^ city ^ Seattle # ."
    assert (h, text[t]) == (0, "#")


# A marker-like "@" and "#" before the entities: an id search would pick these, not the entity starts.
DECOYS = [
    "mail me @ noon about # tags: an arrayed <e1>configuration</e1> of antenna <e2>elements</e2>.",
    "mail me @ noon about # tags: the <e2>cup</e2> holds the <e1>tea</e1>",
]


@pytest.mark.parametrize("name", ["minilm", "bpe"])
def test_entity_starts_are_the_opening_marker_tokens(request, name):
    tokenizer: SoraTokenizer = request.getfixturevalue(name)
    examples = [example(t) for t in DECOYS]
    encoded = encode_relations(tokenizer, examples, 64)
    for ex, enc in zip(examples, encoded, strict=True):
        ids, e1, e2 = enc["ids"], enc["e1"], enc["e2"]
        assert ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.sep_id
        assert tokenizer.decode([ids[e1]]).strip() == "@" and tokenizer.decode([ids[e2]]).strip() == "#"
        decoy_at = next(i for i, x in enumerate(ids) if tokenizer.decode([x]).strip() == "@")
        assert decoy_at < e1  # the first "@" in the ids is the decoy
        # the token after the opening marker begins the entity
        assert tokenizer.decode(ids[e1 + 1 :]).replace(" ", "").startswith(entity(ex, "head"))
        assert tokenizer.decode(ids[e2 + 1 :]).replace(" ", "").startswith(entity(ex, "tail"))
        assert (e1 < e2) == (ex.head[0] < ex.tail[0])


def filler(n: int) -> str:
    return " ".join(itertools.islice(itertools.cycle(FILLER), n))


@pytest.mark.parametrize("name", ["minilm", "bpe"])
def test_a_long_text_is_cropped_around_both_entities(request, name):
    tokenizer: SoraTokenizer = request.getfixturevalue(name)
    text = f"{filler(120)} the <e1>configuration</e1> of antenna <e2>elements</e2> {filler(120)}"
    ex = example(text)
    truncated = tokenizer.encode([mark(ex)[0]], 32)[0]
    assert "@" not in tokenizer.decode(truncated)  # plain truncation loses both entities
    (enc,) = encode_relations(tokenizer, [ex], 32)
    ids = enc["ids"]
    assert 28 <= len(ids) <= 32  # the budget is spent on context around the entities, not left empty
    assert ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.sep_id
    assert tokenizer.decode([ids[enc["e1"]]]).strip() == "@" and tokenizer.decode([ids[enc["e2"]]]).strip() == "#"
    kept = tokenizer.decode(ids)
    assert "@configuration@ofantenna#elements#" in kept.replace(" ", "")
    # cut at word boundaries: every word kept is a whole word of the text (no "antidis" fragment at either end)
    assert set(kept.split()) <= set(mark(ex)[0].split()), kept


@pytest.mark.parametrize("name", ["minilm", "bpe"])
@pytest.mark.parametrize("tail_first", [False, True])
def test_entities_too_far_apart_keep_the_head_and_the_start_of_the_tail(request, name, tail_first):
    tokenizer: SoraTokenizer = request.getfixturevalue(name)
    a, b = (
        ("<e2>elements</e2>", "<e1>configuration</e1>")
        if tail_first
        else ("<e1>configuration</e1>", "<e2>elements</e2>")
    )
    ex = example(f"{filler(10)} {a} {filler(200)} {b} {filler(10)}")
    (enc,) = encode_relations(tokenizer, [ex], 24)
    ids = enc["ids"]
    assert len(ids) == 24  # the budget left after both entities goes to context between them
    assert tokenizer.decode([ids[enc["e1"]]]).strip() == "@" and tokenizer.decode([ids[enc["e2"]]]).strip() == "#"
    decoded = tokenizer.decode(ids).replace(" ", "")
    assert "@configuration@" in decoded and "#elements#" in decoded
    assert (enc["e1"] < enc["e2"]) != tail_first


def test_a_huge_head_keeps_its_start_and_the_tails_marker(minilm):
    ex = example(f"<e1>{filler(100)}</e1> and <e2>elements</e2>")
    (enc,) = encode_relations(minilm, [ex], 16)
    ids = enc["ids"]
    assert len(ids) == 16 and (enc["e1"], enc["e2"]) == (1, 14)
    assert minilm.decode([ids[1]]) == "@" and minilm.decode([ids[14]]) == "#"


def test_batches_carry_the_entity_starts(minilm):
    examples = [example(t) for t in DECOYS] + [example("<e1>a</e1> b <e2>c</e2>")]
    encoded = encode_relations(minilm, examples, 64)
    batch = make_relation_batch(encoded, minilm.pad_id)
    assert batch["input_ids"].shape == (3, max(len(e["ids"]) for e in encoded))
    assert batch["entity_starts"].dtype == torch.long and batch["entity_starts"].shape == (3, 2)
    rows = torch.arange(3)
    assert (batch["input_ids"][rows, batch["entity_starts"][:, 0]] == minilm.tk.token_to_id("@")).all()
    assert (batch["input_ids"][rows, batch["entity_starts"][:, 1]] == minilm.tk.token_to_id("#")).all()
    assert batch["attention_mask"][2].sum() == len(encoded[2]["ids"])
    targets = torch.tensor([0, 1, 2])
    seen = [b for b in relation_batches(encoded, targets, 2, minilm.pad_id, seed=3, prefix="rel.")]
    assert sorted(int(x) for b in seen for x in b["rel.labels"]) == [0, 1, 2]
    assert {"rel.input_ids", "rel.attention_mask", "rel.entity_starts", "rel.labels"} == set(seen[0])
    again = [b for b in relation_batches(encoded, targets, 2, minilm.pad_id, seed=3, prefix="rel.")]
    assert all(torch.equal(x["rel.labels"], y["rel.labels"]) for x, y in zip(seen, again, strict=True))


# --- the SemEval score ---------------------------------------------------------------------------------------

CE, CW = "Cause-Effect", "Component-Whole"
CONFUSION = [  # (gold, predicted)
    (f"{CE}(e1,e2)", f"{CE}(e1,e2)"),
    (f"{CE}(e1,e2)", f"{CE}(e1,e2)"),
    (f"{CE}(e2,e1)", f"{CE}(e1,e2)"),  # right relation, wrong direction: wrong, and a CE prediction
    (f"{CE}(e1,e2)", "Other"),
    (f"{CW}(e1,e2)", f"{CW}(e1,e2)"),
    (f"{CW}(e2,e1)", f"{CE}(e2,e1)"),
    (f"{CW}(e1,e2)", f"{CW}(e1,e2)"),
    ("Other", f"{CW}(e1,e2)"),
    ("Other", f"{CW}(e2,e1)"),
    ("Other", "Other"),
    ("Other", "Message-Topic(e1,e2)"),  # a relation absent from the gold labels
]


def test_the_official_score_on_a_hand_built_confusion():
    # CE: 4 gold, 4 predicted as CE in any direction (rows 1, 2, 3, 6), 2 right → P = R = 50, F1 = 50.
    # CW: 3 gold, 4 predicted (5, 7, 8, 9), 2 right → P = 50, R = 200/3, F1 = 400/7.
    # Macro over the gold relations (Other and the never-gold Message-Topic left out): (50 + 400/7) / 2 = 375/7.
    y_true, y_pred = (list(x) for x in zip(*CONFUSION, strict=True))
    scores = semeval_scores(y_true, y_pred)
    assert scores["macro_f1"] == pytest.approx(375 / 7)  # 53.57
    assert scores["accuracy"] == pytest.approx(100 * 5 / 11)
    assert scores["micro_f1"] == pytest.approx(100 * 8 / 15)  # P = 4/8, R = 4/7
    assert scores["n"] == 11 and set(scores["per_relation"]) == {CE, CW}
    ce, cw = scores["per_relation"][CE], scores["per_relation"][CW]
    assert (ce["precision"], ce["recall"], ce["f1"], ce["support"]) == pytest.approx((50, 50, 50, 4))
    assert (cw["precision"], cw["recall"], cw["f1"], cw["support"]) == pytest.approx((50, 200 / 3, 400 / 7, 3))


def test_perfect_predictions_score_100_and_every_miss_costs():
    labels = [f"{r}({d})" for r in (CE, CW, "Entity-Origin") for d in ("e1,e2", "e2,e1")] + ["Other"]
    y_true = labels * 3
    perfect = semeval_scores(y_true, y_true)
    assert perfect["macro_f1"] == 100.0 and perfect["accuracy"] == 100.0 and perfect["micro_f1"] == 100.0
    flipped = [f"{CE}(e2,e1)" if y == f"{CE}(e1,e2)" else y for y in y_true]
    assert semeval_scores(y_true, flipped)["macro_f1"] < 100.0  # a wrong direction is an error
    missed = ["Other" if y == f"{CW}(e1,e2)" else y for y in y_true]
    assert semeval_scores(y_true, missed)["per_relation"][CW]["recall"] == 50.0


def test_plain_labels_fall_back_to_macro_f1_without_the_negative_label():
    y_true = ["founded_by", "founded_by", "employee_of", "no_relation", "no_relation"]
    y_pred = ["founded_by", "employee_of", "employee_of", "no_relation", "founded_by"]
    scores = semeval_scores(y_true, y_pred)
    # founded_by: P = 1/2, R = 1/2 → 50; employee_of: P = 1/2, R = 1 → 200/3
    assert set(scores["per_relation"]) == {"founded_by", "employee_of"}
    assert scores["macro_f1"] == pytest.approx((50 + 200 / 3) / 2)
    assert semeval_scores(["no_relation"], ["no_relation"])["macro_f1"] == 0.0  # nothing to average
    with pytest.raises(DataError, match="2 true labels but 1 predictions"):
        semeval_scores(["a", "b"], ["a"])


# --- the shared SemEval data ---------------------------------------------------------------------------------


def test_the_first_semeval_rows_parse_and_fit(shared_data, minilm, tmp_path):
    source = shared_data("semeval2010_task8") / "train.jsonl"
    with source.open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in itertools.islice(fh, 200)]
    examples = read_relations(write_jsonl(tmp_path / "train.jsonl", rows))
    assert len(examples) == 200
    labels = set(json.loads((source.parent / "meta.json").read_text())["labels"])
    assert {ex.label for ex in examples} <= labels
    for ex, row in zip(examples, rows, strict=True):
        assert (entity(ex, "head"), entity(ex, "tail")) == (row["head"], row["tail"])
    for enc in encode_relations(minilm, examples, 128):
        assert len(enc["ids"]) <= 128 and 0 < enc["e1"] < 128 and 0 < enc["e2"] < 128
        assert enc["ids"][enc["e1"]] == minilm.tk.token_to_id("@")
        assert enc["ids"][enc["e2"]] == minilm.tk.token_to_id("#")
