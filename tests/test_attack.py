"""The offline attack suite (issue 13): the word attack flips a deliberately brittle model within its budget and
its semantic constraint; the character attack is seeded; budgets hold; relation entities and a pair's first text
are never edited; kinds without a label to flip get one clear error; ``sora evaluate`` always reports robustness
(unless ``--attack none``) and ``sora attack`` writes its outcomes.

Models are built by hand, with no training. The brittle one reads nothing but two words: its encoder is the
embedding lookup and a LayerNorm (no layers), the code is the mean of the token states, "great" and "awful" own
two directions of the embedding space each, and the head says positive / negative along them and neutral
otherwise. A lexicon of our own offers synonyms the model has never been told about — so replacing the one word
it keys on turns its answer to neutral, while the sentence's code moves very little.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from conftest import cli, write_jsonl
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

import sora
from sora.attack import ATTACKS, Victim, parse_methods
from sora.attack.char import CharAttack
from sora.attack.text import WORD, Segments, apply
from sora.config import ModelConfig
from sora.errors import SoraError
from sora.evaluate.run import evaluate_checkpoint
from sora.models.autoencoder import SoraModel
from sora.models.checkpoint import save_checkpoint
from sora.models.heads import HeadSpec, add_head
from sora.text.tokenizer import SPECIALS, SoraTokenizer, train_tokenizer

NOUNS = ["movie", "film", "show", "meal", "trip", "hotel", "book", "game", "concert", "dinner"]
TEMPLATES = ["the {n} was {a}", "honestly the {n} felt {a} to me", "our {n} last night was {a} overall",
             "I think this {n} is {a}"]
LEXICON = {"great": ["superb", "fine"], "awful": ["dreadful", "poor"], "movie": ["film"], "honestly": ["frankly"]}
VOCAB = sorted({w for t in TEMPLATES for w in re.findall(r"\w+", t.replace("{n}", "").replace("{a}", "").lower())}
               | set(NOUNS) | {w for k, v in LEXICON.items() for w in [k, *v]} | {"okay", "and"})
LABEL = {"great": "positive", "awful": "negative", "okay": "neutral"}
RELATION_TEXTS = ["<e1>Lyon</e1> is a lovely city in the south of <e2>France</e2> .",
                  "the old harbour town <e2>Porto</e2> lies in northern <e1>Portugal</e1> today .",
                  "many visitors say <e1>Quito</e1> and <e2>Ecuador</e2> were both mentioned in the guide ."]
CHINESE = "这部电影的故事很精彩但是结局不好"


def rows(adjectives=("great", "awful")) -> list[dict]:
    return [{"text": t.format(n=n, a=a), "label": LABEL[a]} for t in TEMPLATES for n in NOUNS for a in adjectives]


def word_tokenizer(words: list[str]) -> SoraTokenizer:
    """One token per word (lower-cased), so that the brittle model's two words are two tokens."""
    vocab = {t: i for i, t in enumerate(SPECIALS + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return SoraTokenizer(tk)


@pytest.fixture(scope="module")
def brittle(tmp_path_factory) -> Path:
    tok = word_tokenizer(VOCAB)
    dim, ids = 16, tok.tk.get_vocab()
    model = SoraModel(ModelConfig(vocab_size=tok.vocab_size, dim=dim, layers=0, heads=2, ffn_dim=32, max_length=32,
                                  code_dim=None, decoder_layers=0, dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb = torch.randn(dim, generator=g) + 0.5 * torch.randn(tok.vocab_size, dim, generator=g)
        emb[:, :4] = 0  # dims 0-3 belong to the two words (in ± pairs: the LayerNorm's mean never sees them)
        emb[ids["great"], 0], emb[ids["great"], 1] = 3.0, -3.0
        emb[ids["awful"], 2], emb[ids["awful"], 3] = 3.0, -3.0
        model.encoder.embeddings.word.weight.copy_(emb)
        model.encoder.embeddings.position.weight.zero_()
        add_head(model, "sentiment", HeadSpec(type="classification", labels=["negative", "neutral", "positive"],
                                              outputs=3, dropout=0.0))
        head = model.heads["sentiment"].out
        head.weight.zero_()
        head.weight[2, 0], head.weight[2, 1], head.weight[0, 2], head.weight[0, 3] = 12.0, -12.0, 12.0, -12.0
        head.bias.copy_(torch.tensor([0.0, 2.0, 0.0]))
    out = tmp_path_factory.mktemp("attack") / "brittle"
    save_checkpoint(out, model.eval(), tok, {"kind": "finetuned", "recipe": {"data": {"max_length": 32}}})
    write_jsonl(out.parent / "test.jsonl", rows(("great", "awful", "okay")))
    (out.parent / "lexicon.json").write_text(json.dumps(LEXICON))
    return out


@pytest.fixture(scope="module")
def many_heads(tmp_path_factory) -> Path:
    """A random one-layer model on a byte-level BPE with a head of every kind: what the attacks may edit, and
    which kinds they refuse, does not depend on what the model learned."""
    corpus = [r["text"] for r in rows()] + [re.sub("</?e[12]>", "", t) for t in RELATION_TEXTS] + [CHINESE] * 5
    tok = train_tokenizer(corpus * 3, vocab_size=400)
    torch.manual_seed(0)
    model = SoraModel(ModelConfig(vocab_size=tok.vocab_size, dim=32, layers=1, heads=2, ffn_dim=64, max_length=48,
                                  code_dim=16, decoder_layers=0, dropout=0.0))
    three = ["a", "b", "c"]
    for name, spec in {
        "topic": HeadSpec(type="classification", labels=three, outputs=3),
        "nli": HeadSpec(type="pair", pair=True, labels=three, outputs=3),
        "rel": HeadSpec(type="relation", reads="entities", labels=three, outputs=3),
        "score": HeadSpec(type="regression", labels=None, outputs=1),
        "tags": HeadSpec(type="multilabel", labels=three, outputs=3),
        "answers": HeadSpec(type="qa", reads="tokens", labels=None, outputs=2),
    }.items():
        add_head(model, name, spec)
    with torch.no_grad():  # sharp heads: their predictions move with the words
        for head in model.heads.values():
            head.out.weight.mul_(40)
    out = tmp_path_factory.mktemp("attack") / "heads"
    save_checkpoint(out, model.eval(), tok, {"kind": "finetuned", "recipe": {"data": {"max_length": 48}}})
    return out


def predicted(model, inputs: list, task: str) -> list[str]:
    """The model's own answers, as gold labels: every example is then attacked (none skipped)."""
    return [p[task]["label"] for p in model.predict(inputs, task=task)]


def recording(monkeypatch) -> list:
    """Every example the attacks ask the model about, from now on."""
    seen: list = []
    probs = Victim.probs

    def record(self, examples):
        seen.extend(examples)
        return probs(self, examples)

    monkeypatch.setattr(Victim, "probs", record)
    return seen


def changed_words(a: str, b: str) -> int:
    wa, wb = WORD.findall(a), WORD.findall(b)
    assert len(wa) == len(wb), (a, b)
    return sum(x != y for x, y in zip(wa, wb, strict=True))


# ---- the word attack ------------------------------------------------------------------------------------------


def test_the_word_attack_flips_a_brittle_model_within_its_budget_and_constraint(brittle):
    model = sora.load(brittle)
    data = rows()
    texts, labels = [r["text"] for r in data], [r["label"] for r in data]
    assert [p["sentiment"]["label"] for p in model.predict(texts)] == labels  # right on every clean example
    outcomes, summary = sora.attack(model, texts, labels, method="word", lexicon=brittle.parent / "lexicon.json")
    assert summary["clean_accuracy"] == 1.0 and summary["success_rate"] >= 0.9 and summary["attacked_accuracy"] <= 0.1
    won = [o for o in outcomes if o.success]
    codes = torch.nn.functional.normalize(model.codes([o.original for o in won] + [o.perturbed for o in won]), dim=-1)
    cosine = (codes[: len(won)] * codes[len(won):]).sum(-1)
    assert bool((cosine >= 0.8).all()), cosine.min()  # the constraint, recomputed here
    after = model.predict([o.perturbed for o in won])
    for o, p in zip(won, after, strict=True):
        n = len(WORD.findall(o.original))
        assert 1 <= changed_words(o.original, o.perturbed) <= int(0.3 * n) and o.words_changed <= 0.3
        assert p["sentiment"]["label"] == o.perturbed_label == "neutral" != o.label  # really flipped
        swapped = {y for x, y in zip(WORD.findall(o.original), WORD.findall(o.perturbed), strict=True) if x != y}
        assert swapped <= {w for v in LEXICON.values() for w in v}  # only the lexicon's substitutes
        assert o.queries <= 500 and o.input == o.perturbed
    # The constraint is real: demand codes nearly identical and no substitution passes.
    strict = sora.attack(model, texts[:8], labels[:8], method="word", lexicon=LEXICON, min_similarity=0.9999)
    assert strict.summary["success_rate"] == 0.0
    assert all(o.perturbed == o.original for o in strict.outcomes)


def test_without_a_lexicon_the_word_attack_uses_the_models_embedding_neighbours(brittle):
    model = sora.load(brittle)
    data = rows()[:8]
    result = sora.attack(model, [r["text"] for r in data], [r["label"] for r in data], method="word", lexicon=None)
    assert result.summary["success_rate"] >= 0.75
    vocab = set(VOCAB)
    for o in result.outcomes:
        assert set(WORD.findall(o.perturbed.lower())) <= vocab  # substitutes are whole-word tokens of the model


# ---- the character attack and the budget ------------------------------------------------------------------------


def test_the_char_attack_is_deterministic_given_its_seed(brittle):
    model = sora.load(brittle)
    data = rows()[:12]
    texts, labels = [r["text"] for r in data], [r["label"] for r in data]
    first = sora.attack(model, texts, labels, method="char", seed=7)
    again = sora.attack(model, list(reversed(texts)), list(reversed(labels)), method="char", seed=7)
    assert [o.as_dict() for o in first.outcomes] == [o.as_dict() for o in reversed(again.outcomes)]  # order-free
    other = sora.attack(model, texts, labels, method="char", seed=8)
    assert [o.perturbed for o in other.outcomes] != [o.perturbed for o in first.outcomes]
    assert first.summary["success_rate"] >= 0.9
    for o in first.outcomes:  # typos: one edit (two letters swapped at most) in one word of a short sentence
        a, b = WORD.findall(o.original), WORD.findall(o.perturbed)
        diff = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
        assert len(diff) == 1 and abs(len(diff[0][0]) - len(diff[0][1])) <= 1 and diff[0][0] in ("great", "awful")


def test_budgets_hold(brittle):
    model = sora.load(brittle)
    three = "the great show was great and great"  # one "great" left still says positive: all three must go
    assert model.predict(["the superb show was superb and great"])[0]["sentiment"]["label"] == "positive"
    tight = sora.attack(model, [three], ["positive"], method="word", lexicon=LEXICON)  # 0.3 × 7 words: 2 changes
    assert not tight.outcomes[0].success and changed_words(three, tight.outcomes[0].perturbed) == 2
    loose = sora.attack(model, [three], ["positive"], method="word", lexicon=LEXICON, max_words=0.5)
    assert loose.outcomes[0].success and changed_words(three, loose.outcomes[0].perturbed) == 3
    short = sora.attack(model, ["the movie was great"], ["positive"], method="char", max_words=0.2)
    assert short.outcomes[0].perturbed == "the movie was great" and short.outcomes[0].queries == 1  # 0 words allowed
    data = rows()[:10]
    capped = sora.attack(model, [r["text"] for r in data], [r["label"] for r in data], method="word", lexicon=LEXICON,
                         max_queries=3)
    assert all(o.queries <= 3 for o in capped.outcomes)
    with pytest.raises(SoraError, match="max_words 1.5"):
        sora.attack(model, [three], ["positive"], method="char", max_words=1.5)


# ---- what each kind lets the attacks edit ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["char", "word"])
def test_relation_entities_and_their_markers_are_never_edited(many_heads, monkeypatch, method):
    loose = {"lexicon": None, "neighbour_similarity": -1.0, "min_similarity": -1.0} if method == "word" else {}
    model = sora.load(many_heads)
    labels = predicted(model, RELATION_TEXTS, "rel")
    seen = recording(monkeypatch)
    result = sora.attack(model, RELATION_TEXTS, labels, method=method, task="rel", max_words=0.5, **loose)
    entities = [re.findall(r"<e([12])>(.*?)</e\1>", t) for t in RELATION_TEXTS]
    assert len(seen) > 3 * len(RELATION_TEXTS)
    for ex in seen:
        head, tail = ex.text[ex.head[0]:ex.head[1]], ex.text[ex.tail[0]:ex.tail[1]]
        assert any(dict(e) == {"1": head, "2": tail} for e in entities), (ex.text, head, tail)
    assert any(ex.text not in [re.sub("</?e[12]>", "", t) for t in RELATION_TEXTS] for ex in seen)  # edits tried
    for o, original, e in zip(result.outcomes, RELATION_TEXTS, entities, strict=True):
        assert o.original == original and all(f"<e{n}>{w}</e{n}>" in o.perturbed for n, w in e)


def test_a_pair_attack_edits_the_second_text_only(many_heads, monkeypatch):
    model = sora.load(many_heads)
    pairs = [("the film was long", "honestly the movie felt great to me"), ("our trip", "the hotel was awful")]
    labels = predicted(model, pairs, "nli")
    seen = recording(monkeypatch)
    result = sora.attack(model, pairs, labels, method="char", task="nli")
    assert {ex.text for ex in seen} == {a for a, _ in pairs} and len({ex.text_b for ex in seen}) > 2
    for o, (a, b) in zip(result.outcomes, pairs, strict=True):
        assert o.original == b and o.input == (a, o.perturbed)


def test_chinese_text_gets_deletions_and_swaps_and_keeps_its_negation(many_heads, monkeypatch):
    seg = Segments.of(CHINESE)
    assert seg.n_words == len(CHINESE)  # a character is a word
    model = sora.load(many_heads)
    i = seg.words[CHINESE.index("精")]
    edits = CharAttack(Victim(model, "topic")).candidates(seg, seg.parts, i, random.Random(0))
    # 精 is deleted or swapped with 彩; not with 很 before it, a stop word (an adverb of degree)
    assert sorted("".join(apply(seg.parts, e)) for e in edits) == sorted([CHINESE.replace("精", ""),
                                                                          CHINESE.replace("精彩", "彩精")])
    labels = predicted(model, [CHINESE], "topic")
    seen = recording(monkeypatch)
    result = sora.attack(model, [CHINESE], labels, method="char", task="topic", max_words=0.3)
    assert len(seen) > 5
    for ex in seen[1:]:
        assert "不" in ex.text  # 不好 must not become 好
        if len(ex.text) == len(CHINESE):  # else a deletion: one character gone
            diff = [i for i, (x, y) in enumerate(zip(CHINESE, ex.text, strict=True)) if x != y]
            assert len(diff) == 2 and diff[1] == diff[0] + 1  # adjacent characters swapped
        else:
            assert len(ex.text) == len(CHINESE) - 1
    assert result.outcomes[0].words_changed <= 0.3


def test_kinds_without_a_label_to_flip_get_one_clear_error(many_heads, tmp_path):
    model = sora.load(many_heads)
    for task, kind in (("score", "regression"), ("tags", "multilabel"), ("answers", "qa")):
        with pytest.raises(SoraError, match=rf"task '{task}' is a {kind} head.*classification, pair, relation"):
            sora.attack(model, ["the movie was great"], ["1"], method="char", task=task)
    with pytest.raises(SoraError, match="several tasks"):
        sora.attack(model, ["the movie was great"], ["a"])
    with pytest.raises(SoraError, match=r"unknown attack 'synonyms' \(choose from char, word\)"):
        sora.attack(model, ["the movie was great"], ["a"], method="synonyms", task="topic")
    with pytest.raises(SoraError, match="the char attack takes no option 'lexicon'"):
        sora.attack(model, ["the movie was great"], ["a"], method="char", task="topic", lexicon=None)
    with pytest.raises(SoraError, match="label 'z' of text 0 is not one of"):
        sora.attack(model, ["the movie was great"], ["z"], method="char", task="topic")
    assert parse_methods("none") == () and parse_methods("Char, word") == ("char", "word") and set(ATTACKS) == {
        "char", "word"}
    data = write_jsonl(tmp_path / "scores.jsonl", [{"text": "the movie was great", "label": 0.5}] * 3)
    note = evaluate_checkpoint(model, str(data), task="score", out=tmp_path / "r", attacks=None)["metrics"]
    assert "robustness" not in note and "regression" in note["robustness_note"]
    with pytest.raises(SoraError, match="is a regression head"):
        evaluate_checkpoint(model, str(data), task="score", out=tmp_path / "r", attacks=("char",))


# ---- the command line -------------------------------------------------------------------------------------------


def test_sora_evaluate_reports_robustness_by_default_and_not_with_attack_none(brittle, capsys, monkeypatch):
    data, out = brittle.parent / "test.jsonl", brittle.parent / "eval"
    code, stdout, err = cli(["evaluate", str(brittle), "--data", str(data), "-o", str(out)], capsys, monkeypatch)
    assert code == 0, err
    assert "robustness, char attack on 100 examples: accuracy 1.0000 -> " in stdout
    robustness = json.loads((out / "metrics.json").read_text())["robustness"]
    char = robustness["char"]
    assert list(robustness) == ["char"] and char["n"] == 100 and char["clean_accuracy"] == 1.0
    assert {"attacked_accuracy", "success_rate", "words_perturbed", "queries", "max_words", "seed"} <= set(char)
    assert len(char["examples"]) == 5 and all(e["success"] for e in char["examples"])
    assert char["attacked_accuracy"] == pytest.approx(1.0 - char["success_rate"])
    report = (out / "report.md").read_text()
    assert "## Robustness" in report and "| char | 100 | 1.0000 |" in report
    assert "### Example perturbations" in report and "![Robustness](robustness.png)" in report
    assert (out / "robustness.png").read_bytes()[:4] == b"\x89PNG"

    code, stdout, err = cli(["evaluate", str(brittle), "--data", str(data), "-o", str(out), "--attack", "none"],
                            capsys, monkeypatch)
    assert code == 0, err
    assert "robustness" not in stdout and "robustness" not in json.loads((out / "metrics.json").read_text())
    assert "Robustness" not in (out / "report.md").read_text()

    code, stdout, err = cli(["evaluate", str(brittle), "--data", str(data), "-o", str(out), "--attack", "char,word",
                             "--attack-examples", "20", "--lexicon", str(brittle.parent / "lexicon.json")],
                            capsys, monkeypatch)
    assert code == 0, err
    both = json.loads((out / "metrics.json").read_text())["robustness"]
    assert list(both) == ["char", "word"] and both["word"]["n"] == 20 and both["word"]["lexicon"].endswith("json")
    code, _, err = cli(["evaluate", str(brittle), "--data", str(data), "--attack", "typo"], capsys, monkeypatch)
    assert code == 2 and err.strip() == "error: --attack 'typo': unknown attack (choose from char, word, or none)"


def test_sora_attack_writes_one_outcome_per_example(brittle, capsys, monkeypatch):
    out = brittle.parent / "attacked.jsonl"
    code, stdout, err = cli(["attack", str(brittle), str(brittle.parent / "test.jsonl"), "--method", "word",
                             "--lexicon", str(brittle.parent / "lexicon.json"), "--out", str(out)], capsys,
                            monkeypatch)
    assert code == 0, err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 120 and f"120 outcomes -> {out}" in stdout
    assert {"original", "perturbed", "input", "label", "original_label", "perturbed_label", "success", "status",
            "words_changed", "queries"} <= set(lines[0])
    assert sum(r["success"] for r in lines) == 80  # every positive and negative text; no neutral one can flip
    code, _, err = cli(["attack", str(brittle), str(brittle.parent / "test.jsonl"), "--method", "char",
                        "--min-similarity", "0.9", "-o", str(out)], capsys, monkeypatch)
    assert code == 2 and "the char attack takes no option 'min_similarity'" in err
