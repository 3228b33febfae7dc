"""Readers (every format, errors with path:line) and length-bucketed batching."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SAMPLE, write_jsonl

from sora.config import TaskConfig
from sora.data import TextSource, collate, read_records, read_texts, resolve_split, token_batches
from sora.errors import DataError
from sora.text.tokenizer import train_tokenizer

TEXTS = ["first text", "second, with a comma", "third one here"]


# --------------------------------------------------------------------------------------------- formats


def test_jsonl(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    # A blank line in the middle is skipped; line numbers still count it.
    path.write_text(json.dumps({"text": TEXTS[0], "label": 1}) + "\n\n"
                    + "".join(json.dumps({"text": t}) + "\n" for t in TEXTS[1:]), encoding="utf-8")
    assert list(read_texts(path)) == TEXTS
    assert [n for n, _ in read_records(path)] == [1, 3, 4]
    assert next(read_records(path))[1] == {"text": TEXTS[0], "label": 1}


def test_jsonl_other_column_and_bom(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"body": t}) + "\n" for t in TEXTS).encode())
    assert list(read_texts(path, column="body")) == TEXTS


def test_csv_quoted_newline_and_comma(tmp_path: Path):
    path = tmp_path / "d.csv"
    path.write_text('id,text\n1,plain\n2,"a comma, and a\nnewline inside"\n\n3,after\n', encoding="utf-8")
    assert list(read_texts(path)) == ["plain", "a comma, and a\nnewline inside", "after"]
    records = list(read_records(path))
    # Each record is numbered by the line it starts on; the empty line 5 is skipped.
    assert [n for n, _ in records] == [2, 3, 6]
    assert records[0][1] == {"id": "1", "text": "plain"}


def test_csv_crlf(tmp_path: Path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'text,n\r\n"x, y",1\r\nz,2\r\n')
    assert list(read_texts(path)) == ["x, y", "z"]


def test_tsv(tmp_path: Path):
    path = tmp_path / "d.tsv"
    path.write_text('label\ttext\na\tone, two\nb\t"multi\nline"\nc\tlast\n', encoding="utf-8")
    assert list(read_texts(path)) == ["one, two", "multi\nline", "last"]
    assert [n for n, _ in read_records(path)] == [2, 3, 5]


def test_txt(tmp_path: Path):
    path = tmp_path / "d.txt"
    path.write_text("alpha beta\r\n\n   \ngamma\n", encoding="utf-8")
    assert list(read_texts(path)) == ["alpha beta", "gamma"]
    assert [n for n, _ in read_records(path)] == [1, 4]
    # The column does not matter for plain text.
    assert list(read_texts(path, column="whatever")) == ["alpha beta", "gamma"]


def test_parquet(tmp_path: Path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": TEXTS + [None, "   "], "label": [1, 2, 3, 4, 5]}), path)
    assert list(read_texts(path)) == TEXTS
    records = list(read_records(path))
    assert [n for n, _ in records] == [1, 2, 3, 4, 5]
    assert records[1][1] == {"text": TEXTS[1], "label": 2}


def test_explicit_format_overrides_extension(tmp_path: Path):
    path = tmp_path / "data.dat"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    assert list(read_texts(path, fmt="jsonl")) == TEXTS


# --------------------------------------------------------------------------------------------- directories


def test_directory_splits(tmp_path: Path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "t1"}, {"text": "t2"}])
    write_jsonl(tmp_path / "validation.jsonl", [{"text": "v1"}])
    assert resolve_split(tmp_path) == tmp_path / "train.jsonl"
    assert resolve_split(tmp_path, "validation") == tmp_path / "validation.jsonl"
    assert list(TextSource(tmp_path)) == ["t1", "t2"]
    assert list(TextSource(tmp_path, split="validation")) == ["v1"]
    assert list(read_texts(tmp_path)) == ["t1", "t2"]
    with pytest.raises(DataError, match="no test file") as err:
        resolve_split(tmp_path, "test")
    assert str(tmp_path) in str(err.value)


def test_sample_directory():
    texts = list(TextSource(SAMPLE, split="validation"))
    assert len(texts) == 40 and all(isinstance(t, str) and t.strip() for t in texts)


# --------------------------------------------------------------------------------------------- streaming


def test_textsource_reiterates_and_limits(tmp_path: Path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"text {i}"} for i in range(20)])
    src = TextSource(path)
    first, second = list(src), list(src)
    assert first == second == [f"text {i}" for i in range(20)]
    assert list(TextSource(path, limit=5)) == [f"text {i}" for i in range(5)]
    assert list(TextSource(path, limit=100)) == first
    src.check()  # no error on good data


def test_reading_is_lazy(tmp_path: Path):
    path = tmp_path / "big.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
        fh.write("{not json\n")
        for i in range(20_000):
            fh.write(json.dumps({"text": f"filler {i}"}) + "\n")
    it = read_texts(path)
    assert next(it) == "one"
    assert next(it) == "two"
    with pytest.raises(DataError, match=r":3:"):
        next(it)
    # A limit stops before the bad record; check() reads only the first one.
    assert list(TextSource(path, limit=2)) == ["one", "two"]
    TextSource(path).check()
    with pytest.raises(DataError, match=r":3: not valid JSON"):
        list(TextSource(path))


# --------------------------------------------------------------------------------------------- errors


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        result = fn(*args, **kwargs)
        if not isinstance(result, Path):
            list(result)
    return str(err.value)


def test_missing_file(tmp_path: Path):
    path = tmp_path / "nope.jsonl"
    msg = _error(read_texts, path)
    assert str(path) in msg and "not found" in msg
    assert str(path) in _error(TextSource, path)
    assert str(path) in _error(resolve_split, path)


def test_empty_and_blank_files(tmp_path: Path):
    for name, content in [("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n"), ("blank.txt", "\n \n"),
                          ("header.csv", "text\n"), ("nulls.jsonl", '{"text": null}\n{"text": "  "}\n')]:
        path = tmp_path / name
        path.write_text(content, encoding="utf-8")
        msg = _error(read_texts, path)
        assert str(path) in msg and "no text" in msg, msg
        with pytest.raises(DataError):
            TextSource(path).check()


def test_missing_column_lists_available(tmp_path: Path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"sentence": "a", "label": 1}])
    msg = _error(read_texts, path, column="text")
    assert msg.startswith(f"{path}:1:") and "'text'" in msg and "sentence" in msg and "label" in msg

    csv_path = tmp_path / "d.csv"
    csv_path.write_text("body,label\nhi,1\n", encoding="utf-8")
    msg = _error(read_texts, csv_path)
    assert msg.startswith(f"{csv_path}:2:") and "body" in msg and "label" in msg

    pq_path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["x"], "label": [1]}), pq_path)
    msg = _error(read_texts, pq_path)
    assert str(pq_path) in msg and "'text'" in msg and "body" in msg and "label" in msg


def test_invalid_utf8_names_line(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "bad \xff\xfe byte"}\n{"text": "later"}\n')
    msg = _error(read_texts, path)
    assert msg.startswith(f"{path}:2:") and "UTF-8" in msg
    txt = tmp_path / "d.txt"
    txt.write_bytes(b"fine\nalso fine\n\xc3\x28 broken\n")
    assert _error(read_texts, txt).startswith(f"{txt}:3:")
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(b"text\nok\n\xe9t\xe9\n")
    assert _error(read_texts, csv_path).startswith(f"{csv_path}:3:")


def test_invalid_json(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "unterminated\n', encoding="utf-8")
    msg = _error(read_texts, path)
    assert msg.startswith(f"{path}:2:") and "JSON" in msg
    arr = tmp_path / "a.jsonl"
    arr.write_text('["not", "an", "object"]\n', encoding="utf-8")
    msg = _error(read_texts, arr)
    assert msg.startswith(f"{arr}:1:") and "object" in msg


def test_non_string_text(tmp_path: Path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, {"text": 42}])
    msg = _error(read_texts, path)
    assert msg.startswith(f"{path}:2:") and "int" in msg
    pq_path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [1.5, 2.5]}), pq_path)
    msg = _error(read_texts, pq_path)
    assert msg.startswith(f"{pq_path}:1:") and "float" in msg


def test_unknown_extension(tmp_path: Path):
    path = tmp_path / "d.xlsx"
    path.write_text("text\nhello\n", encoding="utf-8")
    msg = _error(read_texts, path)
    assert str(path) in msg and ".xlsx" in msg and "--format" in msg
    with pytest.raises(DataError, match="unknown format"):
        TextSource(path)


def test_corrupt_parquet(tmp_path: Path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"this is not parquet at all")
    msg = _error(read_texts, path)
    assert str(path) in msg and "Parquet" in msg


# --------------------------------------------------------------------------------------------- batching

MAX = 256  # no truncation in these tests
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu",
         "xi", "omicron", "pi", "rho", "sigma", "tau"]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """Unique texts of very different lengths (1 to 40 words), each starting with its own number."""
    rng = random.Random(0)
    return [" ".join([f"n{i}"] + [rng.choice(WORDS) for _ in range(rng.randint(0, 39))]) for i in range(480)]


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus, vocab_size=1000, min_frequency=1)


def _batch_key(batches) -> list[list[tuple[int, ...]]]:
    """Each batch as its unpadded rows."""
    return [[tuple(ids[m].tolist()) for ids, m in zip(b["input_ids"], b["attention_mask"], strict=True)]
            for b in batches]


def _rows(batches) -> list[tuple[int, ...]]:
    return [row for batch in _batch_key(batches) for row in batch]


def test_every_text_once_per_epoch(corpus, tok):
    batches = list(token_batches(corpus, tok, batch_size=16, max_length=MAX, seed=1, epoch=0, bucket_batches=5))
    assert sum(len(b["input_ids"]) for b in batches) == len(corpus)
    assert all(len(b["input_ids"]) <= 16 for b in batches)
    expected = Counter(tuple(s) for s in tok.encode(corpus, MAX))
    assert Counter(_rows(batches)) == expected
    decoded = sorted(tok.decode(list(r)).strip() for r in _rows(batches))
    assert decoded == sorted(corpus)


def test_batches_are_length_bucketed(corpus, tok):
    def padded_fraction(batches) -> float:
        masks = [b["attention_mask"] for b in batches]
        return 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)

    bucketed = list(token_batches(corpus, tok, batch_size=16, max_length=MAX, seed=3, bucket_batches=10))
    shuffled = corpus[:]
    random.Random(3).shuffle(shuffled)
    baseline = list(token_batches(shuffled, tok, batch_size=16, max_length=MAX, shuffle=False))
    assert padded_fraction(baseline) > 0.3
    assert padded_fraction(bucketed) < padded_fraction(baseline) / 3
    # Within each batch lengths differ little.
    spread = [int(b["attention_mask"].sum(1).max() - b["attention_mask"].sum(1).min()) for b in bucketed]
    assert sum(spread) / len(spread) <= 8


def test_batches_are_deterministic(corpus, tok):
    def run(seed, epoch):
        return _batch_key(token_batches(corpus, tok, 16, MAX, seed=seed, epoch=epoch, bucket_batches=5))

    assert run(7, 0) == run(7, 0)
    assert run(7, 0) != run(7, 1)
    assert run(7, 0) != run(8, 0)
    # A different epoch reorders, but still covers the same texts.
    assert Counter(r for b in run(7, 1) for r in b) == Counter(r for b in run(7, 0) for r in b)


def test_no_shuffle_keeps_order(corpus, tok):
    batches = list(token_batches(corpus[:40], tok, 16, MAX, shuffle=False))
    assert [len(b["input_ids"]) for b in batches] == [16, 16, 8]
    assert [tok.decode(list(r)).strip() for r in _rows(batches)] == corpus[:40]


def test_distributed_ranks_split_batches(corpus, tok):
    texts = corpus[:460]  # buckets of 4 batches of 16: 7 * 4 + 1 = 29 batches, so one is left over
    kwargs = dict(batch_size=16, max_length=MAX, seed=5, epoch=2, bucket_batches=4)
    single = _batch_key(token_batches(texts, tok, **kwargs))
    assert len(single) == 29
    ranks = [_batch_key(token_batches(texts, tok, rank=r, world_size=2, **kwargs)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 14
    rows = [{row for batch in batches for row in batch} for batches in ranks]
    assert not rows[0] & rows[1]
    # Together they are exactly the complete groups of the single-process order, interleaved.
    assert ranks[0] == single[0:28:2]
    assert ranks[1] == single[1:28:2]
    assert rows[0] | rows[1] == {row for batch in single[:28] for row in batch}


def test_distributed_odd_batch_count_is_even_per_rank(tok):
    texts = [f"t{i} alpha" for i in range(5 * 4)]  # exactly 5 batches of 4
    ranks = [list(token_batches(texts, tok, 4, 32, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2


def test_collate():
    batch = collate([[2, 10, 11, 3], [2, 12, 3], [2, 3]], pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 10, 11, 3], [2, 12, 3, 0], [2, 3, 0, 0]]
    assert batch["attention_mask"].tolist() == [[True] * 4, [True, True, True, False], [True, True, False, False]]
    assert batch["input_ids"].dtype == torch.long
    other = collate([[5, 6], [7]], pad_id=99)
    assert other["input_ids"].tolist() == [[5, 6], [7, 99]]
    assert other["attention_mask"].sum(1).tolist() == [2, 1]


def test_token_batches_streams_a_source(tmp_path: Path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"n{i} beta gamma"} for i in range(50)])
    src = TextSource(path)
    a = list(itertools.chain.from_iterable(_batch_key(token_batches(src, tok, 8, 32, seed=0))))
    b = list(itertools.chain.from_iterable(_batch_key(token_batches(src, tok, 8, 32, seed=0))))
    assert a == b and len(a) == 50


# --------------------------------------------------------------------------------------------- delimiters

LABELED = "text;label_name\ngreat movie, really;positive\nawful film;negative\n"


def test_csv_delimiter_is_detected(tmp_path: Path):
    """A ';' CSV said "no column 'text' (columns: text;label_name)"."""
    for delimiter in (";", "\t", "|"):
        path = tmp_path / "d.csv"
        path.write_text(LABELED.replace(";", delimiter), encoding="utf-8")
        assert list(read_texts(path)) == ["great movie, really", "awful film"], repr(delimiter)
        assert next(read_records(path))[1] == {"text": "great movie, really", "label_name": "positive"}


def test_the_format_default_stays_when_its_header_has_the_columns(tmp_path: Path):
    path = tmp_path / "d.csv"  # one column, texts full of semicolons: nothing to split
    path.write_text("text\nfirst; second; third\nfoo; bar; baz\nx; y; z\n", encoding="utf-8")
    assert list(read_texts(path)) == ["first; second; third", "foo; bar; baz", "x; y; z"]
    tsv = tmp_path / "d.tsv"
    tsv.write_text("text\tn\na, b, c\t1\nd, e, f\t2\n", encoding="utf-8")
    assert list(read_texts(tsv)) == ["a, b, c", "d, e, f"]


def test_txt_with_a_delimited_header_is_read_by_column(tmp_path: Path):
    """As .txt, `text;label_name` lines were one text each, header included."""
    path = tmp_path / "d.txt"
    path.write_text(LABELED, encoding="utf-8")
    assert list(read_texts(path)) == ["great movie, really", "awful film"]
    assert list(read_texts(path, column="label_name")) == ["positive", "negative"]
    # Plain text stays plain: a first line that is a sentence, or a header without the column asked for.
    plain = tmp_path / "p.txt"
    plain.write_text("text, and more words\nsecond; line\n", encoding="utf-8")
    assert list(read_texts(plain)) == ["text, and more words", "second; line"]
    assert list(read_texts(path, column="body")) == LABELED.splitlines()


def test_explicit_delimiter(tmp_path: Path):
    from sora.data.readers import parse_delimiter

    path = tmp_path / "d.csv"
    path.write_text("text|n\na, b; c|1\n", encoding="utf-8")
    assert list(read_texts(path, delimiter="|")) == ["a, b; c"]
    tsv = tmp_path / "d.txt"
    tsv.write_text("text\tn\na\t1\n", encoding="utf-8")
    assert list(read_texts(tsv, delimiter="tab")) == ["a"]
    assert [parse_delimiter(x) for x in ("tab", "\\t", "\t", ";", "pipe", None)] == ["\t"] * 3 + [";", "|", None]
    with pytest.raises(DataError, match="one character"):
        parse_delimiter(";;")


def test_column_errors_say_which_delimiter_and_columns(tmp_path: Path):
    path = tmp_path / "d.csv"
    path.write_text(LABELED, encoding="utf-8")
    msg = _error(read_texts, path, column="body")
    assert msg.startswith(f"{path}:2: no column 'body'") and "columns: text, label_name" in msg, msg
    assert "delimiter ';' detected" in msg, msg
    comma = tmp_path / "c.csv"
    comma.write_text("body,label\nhi,1\n", encoding="utf-8")
    assert "delimiter ',', the .csv default" in _error(read_texts, comma)


def test_labeled_text_with_a_delimited_header(tmp_path: Path):
    from sora.data.tasks import read_examples
    from sora.tasks import kind_of

    rules = kind_of("classification")

    for name in ("d.txt", "d.csv"):
        path = tmp_path / name
        path.write_text(LABELED, encoding="utf-8")
        examples, _ = read_examples(path, TaskConfig(label_column="label_name"), rules=rules)
        assert [(e.text, e.label, e.line) for e in examples] == [("great movie, really", "positive", 2),
                                                                  ("awful film", "negative", 3)]
        # The default label column: the error names the header's columns and the delimiter, not a missing label.
        msg = _error(rules.read, path, TaskConfig(), "train")
        assert msg.startswith(f"{path}:2: no column 'label'") and "label_name" in msg and "';'" in msg, msg
    piped = tmp_path / "p.txt"
    piped.write_text("text|label\na|x\n", encoding="utf-8")
    assert read_examples(piped, TaskConfig(), delimiter="|", rules=rules)[0][0].label == "x"


def test_labels_in_plain_text_name_the_cause(tmp_path: Path):
    from sora.tasks import kind_of

    rules = kind_of("classification")

    path = tmp_path / "d.txt"  # no header: one text per line, so there is no label column at all
    path.write_text("great movie;positive\nawful film;negative\n", encoding="utf-8")
    msg = _error(rules.read, path, TaskConfig(), "train")
    assert msg.startswith(f"{path}:1:") and "plain text" in msg and "header" in msg, msg


@pytest.mark.skipif("delimiter" not in TaskConfig.model_fields,
                    reason="config.py has no tasks[].delimiter / data.delimiter yet")
def test_delimiter_flag_reaches_the_recipe():
    from sora.cli import _delimiter
    from sora.config import load_finetune_recipe, load_recipe

    for flag, char in (("|", "|"), ("tab", "\t"), (";", ";")):
        assert load_finetune_recipe(None, {"tasks.0.delimiter": _delimiter(flag)}).tasks[0].delimiter == char
        assert load_recipe(None, {"data.delimiter": _delimiter(flag)}).data.delimiter == char


# --------------------------------------------------------------------------------------------- every row


def test_read_column_keeps_every_row(tmp_path: Path):
    from sora.data.readers import read_column

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": ""}, {"text": "  "}, {"text": "b"}])
    assert list(read_column(path)) == [(1, "a"), (2, ""), (3, "  "), (4, "b")]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('text,n\n"",1\nx,2\n', encoding="utf-8")
    assert list(read_column(csv_path)) == [(2, ""), (3, "x")]
    nulls = write_jsonl(tmp_path / "n.jsonl", [{"text": "a"}, {"text": None}])
    msg = _error(read_column, nulls)
    assert msg.startswith(f"{nulls}:2:") and "null" in msg
    short = tmp_path / "short.csv"
    short.write_text("n,text\n1,a\n2\n", encoding="utf-8")
    assert _error(read_column, short).startswith(f"{short}:3:")
    empty = tmp_path / "e.jsonl"
    empty.write_text("", encoding="utf-8")
    assert "no records" in _error(read_column, empty)


def test_every_record_is_checked_for_its_columns(tmp_path: Path):
    """Only the first record was checked: a later one without the column was a KeyError downstream."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}, {"body": "c"}])
    msg = _error(read_records, path, columns=["text"])
    assert msg.startswith(f"{path}:3: no column 'text'") and "body" in msg
