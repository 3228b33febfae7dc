"""Generation through the decoder (issue 15): the cached decoder equals full decoding, greedy and beam search
(against a plain loop and against exhaustive search), their constraints, BLEU/chrF/ROUGE, and the seq2seq kind
trained on a few pairs by its own loss until it reproduces them, in both decoder modes, saved and reloaded."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from conftest import cli, write_jsonl
from torch import nn

import sora
from sora.config import ModelConfig, TaskConfig
from sora.data.seq2seq import Seq2SeqExample, read_seq2seq, target_ids
from sora.data.tasks import TaskData, task_batches
from sora.errors import ConfigError, DataError
from sora.metrics.generation import generation_metrics, rouge
from sora.models.autoencoder import SoraModel
from sora.models.checkpoint import load_checkpoint, save_checkpoint
from sora.models.generate import _beam_search, banned_ngram_tokens, generate, greedy_stream, top_by_index
from sora.models.heads import HeadSpec, add_head
from sora.models.transformer import Decoder, DecoderCache
from sora.tasks import kind_of
from sora.text.tokenizer import train_tokenizer

PAD, BOS, EOS = 0, 2, 3
PAIRS = [("the red cat sleeps", "die rote Katze schläft"), ("a dog runs fast", "ein Hund rennt schnell"),
         ("two men play chess", "zwei Männer spielen Schach"), ("the girl sings", "das Mädchen singt"),
         ("a boy reads a book", "ein Junge liest ein Buch"), ("the sun is hot", "die Sonne ist heiß")]


class TinyLM(nn.Module):
    """A random decoder with an output layer: a step function whose logits spread (no near-ties), and an
    ``eos_bias`` that makes sequences end at various lengths."""

    def __init__(self, vocab: int = 40, eos_bias: float = 0.0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.decoder = Decoder(nn.Embedding(vocab, 32), 32, 2, 2, 64, 64, 0.0).eval()
        self.bias = torch.zeros(vocab)
        self.bias[EOS] = eos_bias

    def forward(self, ids, memory, memory_mask, cache=None):
        mask = None if cache is not None else torch.ones_like(ids, dtype=torch.bool)
        return self.decoder(ids, mask, memory, memory_mask, cache=cache) @ self.decoder.word.weight.T + self.bias


def _memory(lengths=(5, 2, 4), seed=1):
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(len(lengths), max(lengths), 32, generator=g)
    return memory, torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]


def _reference_greedy(step, memory, mask, max_length):
    """Argmax, one source at a time, the whole prefix recomputed each step (bos and pad never generated)."""
    out = []
    for i in range(len(memory)):
        n = int(mask[i].sum())
        ids = [BOS]
        for _ in range(max_length):
            logits = step(torch.tensor([ids]), memory[i:i + 1, :n], None, None)[0, -1]
            logits[[BOS, PAD]] = -math.inf
            ids.append(int(logits.argmax()))
            if ids[-1] == EOS:
                break
        out.append([t for t in ids[1:] if t != EOS])
    return out


# --------------------------------------------------------------------------------------------- the decoder


@pytest.mark.parametrize("mode", ["tokens", "code"])
def test_cached_decoding_equals_decoding_the_whole_sequence(mode):
    torch.manual_seed(0)
    decoder = Decoder(nn.Embedding(50, 32), 32, 2, 2, 64, 16, 0.0).eval()
    ids = torch.randint(4, 50, (3, 9))
    memory, memory_mask = _memory()
    if mode == "code":  # one vector, no mask: the pretraining bottleneck
        memory, memory_mask = memory[:, :1], None
    with torch.no_grad():
        full = decoder(ids, torch.ones_like(ids, dtype=torch.bool), memory, memory_mask)
        cache = DecoderCache()
        steps = [decoder(ids[:, t:t + 1], None, memory, memory_mask, cache=cache) for t in range(9)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
        assert cache.length == 9 and cache.layers[0][0].key.shape == (3, 2, 9, 16)
        chunked = DecoderCache()  # a prefix at once, then one token at a time
        parts = [decoder(ids[:, :4], None, memory, memory_mask, cache=chunked)]
        parts += [decoder(ids[:, t:t + 1], None, None, None, cache=chunked) for t in range(4, 9)]
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
        # Reordering the cache is reordering the batch.
        reordered = DecoderCache()
        decoder(ids[:, :5], None, memory, memory_mask, cache=reordered)
        reordered.reorder(torch.tensor([2, 0, 0]))
        last = decoder(ids[[2, 0, 0], 5:6], None, None, None, cache=reordered)
        torch.testing.assert_close(last, full[[2, 0, 0], 5:6], atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="positions"):
            decoder(ids[:, :8], None, None, None, cache=cache)


def test_top_by_index_breaks_ties_by_lower_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, -math.inf], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    values, index = top_by_index(scores, 3)
    assert index.tolist() == [[1, 2, 4], [0, 1, 2]]
    assert values[0].tolist() == [3.0, 3.0, 3.0]
    assert top_by_index(scores, 5)[1].tolist() == [[1, 2, 4, 3, 0], [0, 1, 2, 3, 4]]
    # Rows tied inside the best k (reordered topk), across the cut (the exact scan) and not at all, together:
    # each row is ranked as sorting it by (score descending, index ascending) ranks it.
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 6, (64, 40), generator=g).float()  # many ties at every score
    rows[::3] = torch.randn(22, 40, generator=g)  # ties nowhere
    rows[1::3, :30] = -math.inf  # ties across the cut at -inf
    for k in (1, 4, 8):
        values, index = top_by_index(rows, k)
        for r in range(len(rows)):
            expected = sorted(range(40), key=lambda i, row=rows[r].tolist(): (-row[i], i))[:k]
            assert index[r].tolist() == expected and values[r].tolist() == rows[r, expected].tolist()


def test_banned_ngram_tokens():
    assert banned_ngram_tokens([5, 6, 5], 2) == [6]  # "5 6" seen: after 5, 6 would repeat it
    assert banned_ngram_tokens([5, 6, 7, 5, 6], 3) == [7]
    assert banned_ngram_tokens([5, 6], 3) == []
    assert sorted(banned_ngram_tokens([5, 6, 5], 1)) == [5, 5, 6]


# ------------------------------------------------------------------------------------------------ decoding


def test_greedy_is_the_plain_argmax_loop_and_beam_one():
    step, (memory, mask) = TinyLM(eos_bias=12.0), _memory()
    got = generate(step, memory, mask, BOS, EOS, PAD, max_length=12)
    assert got == _reference_greedy(step, memory, mask, 12)
    assert len({len(g) for g in got}) > 1  # sources end at different steps (rows leave the batch)
    assert _beam_search(step, memory, mask, BOS, DecoderCache(), 1, 12, 1.0,
                        dict(eos=EOS, never=[PAD, BOS], min_length=0, no_repeat_ngram=0)) == got


def test_greedy_stream_yields_each_steps_tokens_and_adds_up_to_greedy():
    step, (memory, mask) = TinyLM(eos_bias=12.0), _memory()
    settings = dict(max_length=12, no_repeat_ngram=2)
    steps = list(greedy_stream(step, memory, mask, BOS, EOS, PAD, **settings))
    joined: list[list[int]] = [[] for _ in range(len(memory))]
    for added in steps:
        assert added and len({source for source, _ in added}) == len(added)  # one token per source a step
        for source, token in added:
            joined[source].append(token)
    assert joined == generate(step, memory, mask, BOS, EOS, PAD, **settings)
    assert len(steps) == max(len(j) for j in joined) > 1  # it streams: one yield per decoding step
    assert len(steps[-1]) < len(memory)  # sources that ended are no longer in the steps
    assert list(greedy_stream(step, memory[:0], None, BOS, EOS, PAD, max_length=3)) == []


@pytest.mark.parametrize("beam", [1, 3])
def test_with_and_without_cache_and_batched_or_one_by_one_agree(beam):
    step, (memory, mask) = TinyLM(eos_bias=5.0), _memory()
    settings = dict(beam=beam, max_length=10, no_repeat_ngram=2, length_penalty=0.8)
    cached = generate(step, memory, mask, BOS, EOS, PAD, **settings)
    assert cached == generate(step, memory, mask, BOS, EOS, PAD, use_cache=False, **settings)
    alone = [generate(step, memory[i:i + 1, :int(mask[i].sum())], None, BOS, EOS, PAD, **settings)[0]
             for i in range(len(memory))]
    assert cached == alone


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_a_beam_wider_than_every_hypothesis_finds_the_best_scoring_sequence(length_penalty):
    """Vocabulary of 6 (3 real tokens, bos, eos, pad) and 3 steps: 64 beams hold every hypothesis, so beam search
    must return the argmax over all sequences of score / length ** length_penalty, found here by enumeration."""
    step, (memory, mask) = TinyLM(vocab=6, eos_bias=1.0, seed=3), _memory((4,))
    real = [1, 4, 5]

    def score(seq, ended):
        ids = torch.tensor([[BOS, *seq]])
        logp = step(ids, memory, None, None)[0].detach()
        logp[:, [BOS, PAD]] = -math.inf
        logp = logp.log_softmax(-1)
        nxt = [*seq, EOS] if ended else seq
        total = sum(float(logp[t, tok]) for t, tok in enumerate(nxt))
        return total / len(nxt) ** length_penalty

    candidates = [(score(list(s), True), list(s)) for n in range(3) for s in itertools.product(real, repeat=n)]
    candidates += [(score(list(s), False), list(s)) for s in itertools.product(real, repeat=3)]
    best = max(candidates, key=lambda c: c[0])[1]
    got = generate(step, memory, mask, BOS, EOS, PAD, beam=64, max_length=3, length_penalty=length_penalty,
                   stopping="beam")
    assert got == [best]


class Counted:
    """A step function that counts the rows it decodes (sources × beams × steps)."""

    def __init__(self, step):
        self.step, self.rows = step, 0

    def __call__(self, ids, memory, memory_mask, cache):
        self.rows += ids.shape[0]
        return self.step(ids, memory, memory_mask, cache)


def test_stopping_at_the_best_hypothesis_decodes_fewer_steps_than_waiting_for_a_full_beam():
    memory, mask = _memory((5, 3, 7, 4))
    outputs = {}
    rows = {}
    for stopping in ("best", "beam"):
        step = Counted(TinyLM(eos_bias=14.0, seed=0))
        outputs[stopping] = generate(step, memory, mask, BOS, EOS, PAD, beam=4, max_length=16, stopping=stopping)
        rows[stopping] = step.rows
    assert rows["best"] < rows["beam"]
    assert all(outputs.values()) and len({len(o) for o in outputs["best"]}) > 1
    # Both decode the same steps until "best" stops, and the best finished hypothesis is never dropped, so what
    # waiting longer ("beam") returns scores at least as well: it found the same one or a better one.
    lm = TinyLM(eos_bias=14.0, seed=0)

    def score(i: int, seq: list[int]) -> float:
        n = int(mask[i].sum())
        ended = [*seq, EOS] if len(seq) < 16 else seq
        logp = lm(torch.tensor([[BOS, *seq]]), memory[i:i + 1, :n], None)[0].detach()
        logp[:, [BOS, PAD]] = -math.inf
        logp = logp.log_softmax(-1)
        return sum(float(logp[t, tok]) for t, tok in enumerate(ended)) / len(ended)

    for i in range(len(memory)):
        assert score(i, outputs["beam"][i]) >= score(i, outputs["best"][i]) - 1e-5
    with pytest.raises(ValueError, match="stopping"):
        generate(TinyLM(), memory, mask, BOS, EOS, PAD, beam=2, max_length=4, stopping="soon")


def test_constraints_min_length_no_repeat_and_max_length():
    memory, mask = _memory()
    quitter = TinyLM(eos_bias=50.0)  # ends at once unless told not to
    assert generate(quitter, memory, mask, BOS, EOS, PAD, max_length=8) == [[], [], []]
    for beam, length_penalty in ((1, 1.0), (3, 0.0), (3, 1.0)):
        out = generate(quitter, memory, mask, BOS, EOS, PAD, beam=beam, max_length=8, min_length=4,
                       length_penalty=length_penalty)
        # Unnormalised scores end as soon as allowed; per-token averages (length_penalty 1) may go on.
        assert all(len(o) == 4 if length_penalty == 0 or beam == 1 else len(o) >= 4 for o in out)
    looper = TinyLM(vocab=8, eos_bias=-50.0, seed=5)  # never ends, a small vocabulary: repeats soon
    for beam in (1, 3):
        free = generate(looper, memory, mask, BOS, EOS, PAD, beam=beam, max_length=12)
        assert [len(o) for o in free] == [12, 12, 12]  # max_length respected
        assert any(len(set(zip(o, o[1:], strict=False))) < len(o) - 1 for o in free)  # some bigram repeats
        banned = generate(looper, memory, mask, BOS, EOS, PAD, beam=beam, max_length=12, no_repeat_ngram=2)
        for o in banned:
            bigrams = list(zip(o, o[1:], strict=False))
            assert len(bigrams) == len(set(bigrams))
            assert len(o) <= 12
    assert generate(quitter, memory[:0], mask[:0], BOS, EOS, PAD, max_length=3) == []


# ------------------------------------------------------------------------------------------------- metrics


def test_generation_metrics_on_known_strings():
    same = generation_metrics(["Ein Mann steht auf der Leiter.", "the cat sat"],
                              ["Ein Mann steht auf der Leiter.", "the cat sat"])
    assert same["n"] == 2
    for key in ("bleu", "chrf", "rouge1", "rouge2", "rougeL"):
        assert same[key] == pytest.approx(100.0)
    worse = generation_metrics(["Ein Mann steht.", "a dog sat"], ["Ein Mann steht auf der Leiter.", "the cat sat"])
    assert all(worse[k] < 100.0 for k in ("bleu", "chrf", "rouge1", "rouge2", "rougeL"))
    assert generation_metrics(["x y z"], ["a b c"])["bleu"] == pytest.approx(0.0)
    # Several references: each measure takes the best one, then the mean over examples.
    multi = rouge(["the cats sat"], [["a dog ran", "the cat sat"]])
    assert multi["rouge1"] == pytest.approx(100.0)  # stemmed: cats = cat
    assert rouge(["a", "b"], [["a"], ["c"]])["rouge1"] == pytest.approx(50.0)
    assert generation_metrics([], [])["n"] == 0
    with pytest.raises(ValueError, match="references"):
        generation_metrics(["a"], [])


# ------------------------------------------------------------------------------------------- the seq2seq kind


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([a for a, _ in PAIRS] * 3 + [b for _, b in PAIRS] * 3, vocab_size=300, min_frequency=1)


def _model(tokenizer, **over) -> SoraModel:
    torch.manual_seed(0)
    cfg = dict(vocab_size=tokenizer.vocab_size, dim=32, layers=1, heads=2, ffn_dim=64, code_dim=16, decoder_layers=1,
               dropout=0.0)
    return SoraModel(ModelConfig(**{**cfg, **over}))


def _task(**options) -> TaskConfig:
    return TaskConfig(name="t", type="seq2seq", head_dropout=0.0,
                      options={"label_smoothing": 0.0, "max_target_length": 16, "target_vocab_size": 300, **options})


def _with_head(tokenizer, task: TaskConfig, examples, **over) -> SoraModel:
    model = _model(tokenizer, **over)
    add_head(model, "t", kind_of(task).spec(task, TaskData(task, False, None, examples), False))
    return model


@pytest.fixture(scope="module", params=[("tokens", "shared"), ("code", "shared"), ("tokens", "own")],
                ids=lambda p: "-".join(p))
def trained(request, tokenizer):
    """A head trained by the kind's loss alone (torch.optim, no finetune.py) on six pairs."""
    mode, vocab = request.param
    kind, examples = kind_of("seq2seq"), [Seq2SeqExample(a, [b]) for a, b in PAIRS]
    model = _with_head(tokenizer, _task(decoder=mode, target_tokenizer=vocab), examples)
    spec = model.head_specs["t"]
    encoded = kind.encode(examples, spec, tokenizer, 32)
    batch = kind.collate(encoded, tokenizer.pad_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(200):
        loss, logits = kind.loss(model, "t", batch, None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    real = batch["target_mask"].bool()[:, 1:]
    assert logits.shape[0] == int(real.sum()) < real.numel()  # the real target positions only
    # ... and the loss is the one over the padded batch with its padding ignored.
    with torch.no_grad():
        model.eval()
        loss, _ = kind.loss(model, "t", batch, None)
        head, out = model.heads["t"], model.run(batch["input_ids"], batch["attention_mask"])
        ids, mask = batch["target_ids"], batch["target_mask"].bool()
        padded = head(ids[:, :-1], *head.memory(out), mask=mask[:, :-1])
        labels = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        full = torch.nn.functional.cross_entropy(padded.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                 label_smoothing=kind.options(model.head_specs["t"]).label_smoothing)
        torch.testing.assert_close(loss, full)
    return model, examples, encoded


def test_training_batches_group_targets_of_a_length(tokenizer):
    """Seq2seq batches are bucketed by target length first (the decoder computes every padded position)."""
    kind = kind_of("seq2seq")
    sources = [" ".join(["word"] * (1 + i % 7)) for i in range(64)]
    targets = [" ".join(["wort"] * (1 + (i * 5) % 11)) for i in range(64)]  # lengths unrelated to the source's
    examples = [Seq2SeqExample(a, [b]) for a, b in zip(sources, targets, strict=True)]
    model = _with_head(tokenizer, _task(), examples[:2])
    encoded = kind.encode(examples, model.head_specs["t"], tokenizer, 32)
    lengths = sorted(len(row["target"]) for row in encoded)
    least = sum(max(lengths[s:s + 8]) * 8 for s in range(0, 64, 8))  # the padded positions of sorted batches

    def padded(batches) -> int:
        return sum(b["target_ids"].numel() for b in batches)

    mine = list(kind.batches(encoded, None, 8, tokenizer.pad_id, seed=1))
    assert sum(len(b["target_ids"]) for b in mine) == 64 and padded(mine) == least
    by_source = task_batches(encoded, None, 8, tokenizer.pad_id, seed=1, collate_rows=kind.collate)
    assert padded(by_source) > least


def test_a_trained_head_reproduces_its_pairs_greedy_and_beam(trained, tokenizer):
    model, examples, encoded = trained
    kind, spec = kind_of("seq2seq"), model.head_specs["t"]
    targets = [b for _, b in PAIRS]
    for beam in (1, 4):
        spec.options["beam"] = beam
        assert kind.predict(model, tokenizer, "t", encoded, batch_size=4) == targets
    metrics = kind.metrics(spec, targets, examples)
    assert metrics["bleu"] == pytest.approx(100.0) and metrics["rougeL"] == pytest.approx(100.0)
    assert kind.format(spec, targets[0]) == {"text": targets[0]}
    # The head as a step function: with and without the cache, the same tokens.
    target = kind.target_tokenizer(spec, tokenizer)
    batch = kind.collate(encoded, tokenizer.pad_id)
    with torch.no_grad():
        memory, memory_mask = model.heads["t"].memory(model.eval().run(batch["input_ids"], batch["attention_mask"]))
    ids = [generate(model.heads["t"], memory, memory_mask, target.cls_id, target.sep_id, target.pad_id, beam=3,
                    max_length=17, use_cache=cache) for cache in (True, False)]
    assert ids[0] == ids[1] and [target.decode(s).strip() for s in ids[0]] == targets


def test_a_saved_head_reloads_and_predicts_the_same(trained, tokenizer, tmp_path):
    model, _, encoded = trained
    spec = model.head_specs["t"]
    path = save_checkpoint(tmp_path / "model", model, tokenizer)
    config = json.loads((path / "config.json").read_text())
    assert config["heads"]["t"]["module"] == "seq2seq"
    assert (config["heads"]["t"]["options"]["target_vocab"] is not None) == (spec.options["target_tokenizer"] == "own")
    loaded, tk, _ = load_checkpoint(path)
    assert loaded.head_specs["t"] == spec
    kind = kind_of("seq2seq")
    assert kind.predict(loaded, tk, "t", encoded) == kind.predict(model, tokenizer, "t", encoded)
    rows = sora.load(path).predict([PAIRS[0][0], PAIRS[3][0]])  # the Python API, through the kind
    assert [r["t"]["text"] for r in rows] == [PAIRS[0][1], PAIRS[3][1]]


def test_the_head_starts_as_the_pretrained_decoder_where_it_fits(tokenizer):
    examples = [Seq2SeqExample(a, [b]) for a, b in PAIRS]
    model = _with_head(tokenizer, _task(decoder="code"), examples).eval()
    head, spec = model.heads["t"], model.head_specs["t"]
    assert spec.options["init"] == "pretrained" and spec.outputs == tokenizer.vocab_size
    assert head.decoder.word is model.encoder.embeddings.word  # shared vocabulary: tied to the encoder
    ids = torch.tensor([row[:5] for row in tokenizer.encode([PAIRS[0][0], PAIRS[1][0]], 16)])
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        out = model.run(ids, mask)
        mine = head(ids, *head.memory(out))
        states = model.decoder(ids, mask, model.from_code(out.code).unsqueeze(1))
        torch.testing.assert_close(mine, states @ model.encoder.embeddings.word.weight.T)
    for task, over in ((_task(target_tokenizer="own"), {}), (_task(layers=2), {}), (_task(), {"decoder_layers": 0})):
        other = _with_head(tokenizer, task, examples, **over)
        assert other.head_specs["t"].options["init"] == "fresh"
    assert _with_head(tokenizer, _task(), examples, decoder_layers=0).head_specs["t"].options["layers"] == 2


def test_divergence_and_options(tokenizer):
    kind = kind_of("seq2seq")
    logits = torch.randn(4, 10)  # the loss's: one row per real target position
    batch = {"target_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)}
    spec = HeadSpec(type="seq2seq", module="seq2seq", reads="tokens")
    assert float(kind.divergence(spec, logits, logits, batch)) == pytest.approx(0.0, abs=1e-6)
    assert float(kind.divergence(spec, logits, logits.flip(-1), batch)) > 0
    changed = logits.clone()
    changed[3] += 5.0  # adding a constant to a row leaves its distribution as it is
    assert float(kind.divergence(spec, logits, changed, batch)) == pytest.approx(0.0, abs=1e-5)
    data = TaskData(_task(), False, None, [Seq2SeqExample("a", ["b"])])
    with pytest.raises(ConfigError, match="seq2seq options"):
        kind.spec(_task(beams=3), data, False)
    with pytest.raises(ConfigError, match="rougeL"):
        kind.spec(_task().model_copy(update={"metric": "accuracy"}), data, False)
    assert kind.spec(_task().model_copy(update={"metric": "rougeL"}), data, False).metric == "rougeL"
    with pytest.raises(ConfigError, match="positions"):
        _with_head(tokenizer, _task(max_target_length=600), [])
    # A format-1 classification spec still loads as a linear head.
    assert HeadSpec.model_validate({"type": "classification", "labels": ["a", "b"]}).module == "linear"


def test_reading_rows_in_the_usual_layouts(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"source": "a b", "target": "c d"},
                                           {"dialogue": "#P1#: hi", "summary": "they greet", "id": "d1"},
                                           {"source": "x", "references": ["y", "z"]},
                                           {"dialogue": "#P1#: bye", "summary1": "s1", "summary2": "s2",
                                            "summary3": "s3"}])
    rows = read_seq2seq(tmp_path, "train")
    assert [(r.source, r.references, r.target) for r in rows] == [
        ("a b", ["c d"], "c d"), ("#P1#: hi", ["they greet"], "they greet"), ("x", ["y", "z"], "y"),
        ("#P1#: bye", ["s1", "s2", "s3"], "s1")]
    assert rows[1].id == "d1" and rows[0].id == "1" and rows[0].text == "a b"
    (tmp_path / "cols.csv").write_text("en,de\nhello,hallo\n", encoding="utf-8")
    task = TaskConfig(type="seq2seq", text_column="en", label_column="de")
    assert kind_of("seq2seq").read(tmp_path / "cols.csv", task, "train")[0].references == ["hallo"]
    write_jsonl(tmp_path / "bad.jsonl", [{"source": "a", "target": "b"}, {"source": "a"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: no target"):
        read_seq2seq(tmp_path / "bad.jsonl")
    assert read_seq2seq(tmp_path / "bad.jsonl", require_targets=False)[1].references == []
    write_jsonl(tmp_path / "empty.jsonl", [{"source": " ", "target": "b"}])
    with pytest.raises(DataError, match=r"empty.jsonl:1: empty source"):
        read_seq2seq(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="input 1"):
        kind_of("seq2seq").examples_from(["fine", ""], HeadSpec(type="seq2seq"))


def test_the_shared_translation_and_summarisation_data(shared_data):
    multi30k = read_seq2seq(shared_data("multi30k_en_de"), "validation")
    assert len(multi30k) == 1014 and all(len(ex.references) == 1 for ex in multi30k)
    dialogsum = read_seq2seq(shared_data("dialogsum"), "test")
    assert len(dialogsum) == 500 and all(len(ex.references) == 3 for ex in dialogsum)
    assert dialogsum[0].target == dialogsum[0].references[0] and dialogsum[0].source.startswith("#Person1#")
    # An own target BPE (as target_tokenizer: own trains it) writes German back exactly.
    german = [ex.target for ex in multi30k[:200]]
    bpe = train_tokenizer(german, vocab_size=600)
    ids = target_ids(bpe, german[:20], 128)
    assert all(i[0] == bpe.cls_id and i[-1] == bpe.sep_id for i in ids)
    assert [bpe.decode(i).strip() for i in ids] == german[:20]


# ------------------------------------------------------------------- model.generate and `sora generate` (CLI)


def test_model_generate_with_its_overrides_and_errors(trained, tokenizer, tmp_path):
    model, _, _ = trained
    path = save_checkpoint(tmp_path / "model", model, tokenizer)
    loaded = sora.load(path)
    sources, targets = [a for a, _ in PAIRS], [b for _, b in PAIRS]
    assert loaded.generate(sources) == targets  # the head's beam (4) and max_target_length
    assert loaded.generate(sources, beam=1, task="t") == targets
    assert loaded.generate(sources[::-1], batch_size=2) == targets[::-1]  # order kept whatever the batches
    short = loaded.generate(sources, beam=1, max_length=2)
    assert all(full.startswith(s) and len(s) < len(full) for s, full in zip(short, targets, strict=True)), short
    with pytest.raises(TypeError, match="list of texts"):
        loaded.generate(sources[0])
    with pytest.raises(DataError, match="input 1"):
        loaded.generate(["fine", " "])
    with pytest.raises(sora.SoraError, match="text 0 is null"):
        loaded.generate([None])
    with pytest.raises(sora.SoraError, match="no text-generating task 'other'"):
        loaded.generate(sources, task="other")
    with pytest.raises(sora.SoraError, match="at least 1"):
        loaded.generate(sources, beam=0)
    headless = save_checkpoint(tmp_path / "headless", _model(tokenizer), tokenizer)
    with pytest.raises(sora.SoraError, match="--task-type seq2seq"):
        sora.load(headless).generate(sources)


def test_model_stream_adds_up_to_greedy_generate_piece_by_piece(trained, tokenizer, tmp_path):
    model, _, _ = trained
    loaded = sora.load(save_checkpoint(tmp_path / "model", model, tokenizer))
    sources = [a for a, _ in PAIRS][::-1]
    for settings in ({}, {"max_length": 2}):
        pieces = list(loaded.stream(sources, batch_size=4, **settings))
        joined = [""] * len(sources)
        for index, piece in pieces:
            assert piece
            joined[index] += piece
        assert joined == loaded.generate(sources, beam=1, batch_size=4, **settings)
    assert len(pieces) > len(sources)  # more than one piece a text: the text comes as it is decoded
    with pytest.raises(TypeError, match="list of texts"):
        loaded.stream(sources[0])
    with pytest.raises(sora.SoraError, match="no text-generating task 'other'"):
        loaded.stream(sources, task="other")


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    return cli(["generate", *args], capsys, monkeypatch)


def test_cli_generate_writes_source_and_output_rows_in_order(trained, tokenizer, tmp_path, monkeypatch, capsys):
    model, _, _ = trained
    path = save_checkpoint(tmp_path / "model", model, tokenizer)
    write_jsonl(tmp_path / "in.jsonl", [{"source": a, "id": i} for i, (a, _) in enumerate(PAIRS)])
    out = tmp_path / "out.jsonl"
    code, stdout, err = _cli(monkeypatch, capsys, str(path), str(tmp_path / "in.jsonl"), "-o", str(out), "--beam", "2")
    assert code == 0, err
    assert "6 outputs (t)" in stdout
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"source": a, "output": b} for a, b in PAIRS]
    # Other layouts: a CSV with a named column; plain text, one source per line.
    (tmp_path / "in.csv").write_text("en,n\n" + "".join(f"{a},{i}\n" for i, (a, _) in enumerate(PAIRS[:2])))
    code, _, err = _cli(monkeypatch, capsys, str(path), str(tmp_path / "in.csv"), "-o", str(tmp_path / "csv.jsonl"),
                        "--column", "en", "--max-length", "2")
    assert code == 0, err
    got = [json.loads(line)["output"] for line in (tmp_path / "csv.jsonl").read_text().splitlines()]
    assert all(PAIRS[i][1].startswith(g) and len(g) < len(PAIRS[i][1]) for i, g in enumerate(got)), got
    (tmp_path / "in.txt").write_text(PAIRS[3][0] + "\n")
    assert _cli(monkeypatch, capsys, str(path), str(tmp_path / "in.txt"), "-o", str(tmp_path / "txt.jsonl"))[0] == 0
    assert json.loads((tmp_path / "txt.jsonl").read_text())["output"] == PAIRS[3][1]
    # Bad input: one line naming the file and line, exit 2, and the earlier output left as it was.
    before = out.read_text(encoding="utf-8")
    write_jsonl(tmp_path / "bad.jsonl", [{"source": "a dog runs fast"}, {"text": "no source"}])
    write_jsonl(tmp_path / "blank.jsonl", [{"source": "a dog runs fast"}, {"source": "  "}])
    for bad, message in (("bad.jsonl", "bad.jsonl:2: no column 'source'"), ("blank.jsonl", "blank.jsonl:2: empty"),
                         ("missing.jsonl", "missing.jsonl")):
        code, _, err = _cli(monkeypatch, capsys, str(path), str(tmp_path / bad), "-o", str(out))
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], err
        assert out.read_text(encoding="utf-8") == before
    assert _cli(monkeypatch, capsys, str(path), str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o.csv"))[0] == 2
    code, _, err = _cli(monkeypatch, capsys, str(path), str(tmp_path / "in.jsonl"), "-o", str(out), "--task", "x")
    assert code == 2 and "no text-generating task 'x'" in err
