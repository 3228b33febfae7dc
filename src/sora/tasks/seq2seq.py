"""Sequence to sequence (translation: Multi30k en→de; summarisation: DialogSum): the head generates the target.

The encoder reads the source; the head (``sora.models.heads.Seq2SeqHead``) is a decoder that cross-attends to
the encoder's token states (``decoder: tokens``) or to the one code vector (``decoder: code``, the pretraining
bottleneck), trained by teacher forcing with label-smoothed cross-entropy and decoded by beam search
(``sora.models.generate``). Metrics are sacreBLEU BLEU and chrF and ROUGE-1/2/L (``sora.metrics.generation``;
points, as papers print them); selection uses BLEU unless the task sets ``metric`` (e.g. ``rougeL``).

The target side is written in the model's own vocabulary (``target_tokenizer: shared``; the head's embeddings are
the encoder's, and it starts as the pretrained denoising decoder when that has its shape), or in a byte-level BPE
trained on the training targets (``own``: for a target language the model's tokenizer reads badly, e.g. German
with an uncased English WordPiece). The own tokenizer is kept in the head's spec (``options.target_vocab``, its
JSON), so a checkpoint's config.json carries it and loading needs nothing else.

Task options (``tasks[].options``): ``decoder`` (tokens), ``layers`` / ``heads`` / ``ffn_dim`` (default: the
pretrained decoder's, else 2 layers of the encoder's heads and width), ``target_tokenizer`` (shared),
``target_vocab_size`` (8000, own only), ``label_smoothing`` (0.1), ``beam`` (4), ``max_target_length`` (128 tokens),
``min_target_length`` (0), ``length_penalty`` (1.0), ``stopping`` (``best``: a source's beam search ends once
its best finished hypothesis cannot be overtaken; ``beam``: once ``beam`` are finished), ``no_repeat_ngram``
(0: off), ``max_source_length`` (default: ``data.max_length``), ``bleu_tokenize`` (sacreBLEU's ``13a``; ``zh``,
``intl``, ...).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer

from sora.config import TaskConfig
from sora.data.seq2seq import Seq2SeqExample, encode_seq2seq, parse_seq2seq, read_seq2seq, seq2seq_batch
from sora.data.tasks import TaskData
from sora.errors import ConfigError, DataError
from sora.models.autoencoder import SoraModel
from sora.models.generate import generate, greedy_stream
from sora.models.heads import HeadSpec, encoder_output
from sora.models.losses import token_cross_entropy
from sora.tasks.base import TaskKind
from sora.text.tokenizer import SoraTokenizer, train_tokenizer

METRICS = ("bleu", "chrf", "rouge1", "rouge2", "rougeL")


class Seq2SeqOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decoder: Literal["tokens", "code"] = "tokens"  # cross-attend to the token states, or to the code only
    layers: int | None = Field(None, ge=1)
    heads: int | None = Field(None, ge=1)
    ffn_dim: int | None = Field(None, ge=1)
    target_tokenizer: Literal["shared", "own"] = "shared"
    target_vocab_size: int = Field(8000, ge=300)  # own: the BPE's vocabulary
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    beam: int = Field(4, ge=1)
    max_target_length: int = Field(128, ge=1)  # tokens of a target (training) and of an output (decoding)
    min_target_length: int = Field(0, ge=0)
    length_penalty: float = 1.0  # beam score = sum of log-probabilities / length ** length_penalty
    stopping: Literal["best", "beam"] = "best"  # when a source's beam search ends (sora.models.generate)
    no_repeat_ngram: int = Field(0, ge=0)
    max_source_length: int | None = Field(None, ge=4)  # default: data.max_length
    bleu_tokenize: str = "13a"
    # Filled in, kept with the head: the own tokenizer's JSON; the decoder's positions and how it started.
    target_vocab: str | None = None
    positions: int | None = Field(None, ge=2)
    init: Literal["pretrained", "fresh"] | None = None


@lru_cache(maxsize=8)
def _own_tokenizer(json_text: str) -> SoraTokenizer:
    return SoraTokenizer(Tokenizer.from_str(json_text))


def _added(target: SoraTokenizer, tokens: list[int], sent: list[str], row: int, final: bool = False) -> str:
    """The text ``tokens`` add to ``sent[row]`` (which becomes their text); nothing while the text ends in a
    partial character (unless ``final``) or does not extend what was sent."""
    text = target.decode(tokens).strip()
    if (not final and text.endswith("\ufffd")) or not text.startswith(sent[row]):
        return ""
    piece, sent[row] = text[len(sent[row]):], text
    return piece


class Seq2Seq(TaskKind):
    name = "seq2seq"
    default_metric = "bleu"
    classes = False
    probe_init = False
    report = "seq2seq"
    headline = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "n")
    input_columns = ("source",)
    points = 1.0  # BLEU, chrF and ROUGE are points already
    max_length = 256  # source tokens: a DialogSum dialogue is ~190 words
    # A decoder learns a language from the task's targets alone (Multi30k: 29k sentences), which takes more than
    # the classification schedules' one epoch; 10 epochs is where small Multi30k transformers level off.
    epochs = 10.0
    attack = None
    generates: ClassVar[bool] = True  # predictions are generated texts, not scores

    # ---- rows ---------------------------------------------------------------------------------------------

    def read_split(self, path: str | Path, task: TaskConfig, split: str, pair: bool | None,
                   require_labels: bool = True) -> tuple[list[Seq2SeqExample], bool]:
        source = task.text_column if task.text_column != "text" else None  # "text" is one of the usual names
        target = task.label_column if task.label_column != "label" else None
        return read_seq2seq(path, split, require_labels, source, target), False

    def texts(self, examples: list[Seq2SeqExample]) -> list[str]:
        return [ex.source for ex in examples]

    def per_class(self, data: TaskData) -> float:
        return float(len(data.train))

    def examples_from(self, inputs: list[Any], spec: HeadSpec) -> list[Seq2SeqExample]:
        """Source texts, or rows with a source column (``source``, ``dialogue``, ...)."""
        out = []
        for i, item in enumerate(inputs):
            if isinstance(item, dict):
                out.append(parse_seq2seq(item, f"input {i}", i, require_target=False))
            elif isinstance(item, str) and item.strip():
                out.append(Seq2SeqExample(item, [], str(i), i))
            else:
                raise DataError(f"input {i}: {'an empty' if isinstance(item, str) else 'a non-text'} source")
        return out

    # ---- the head -----------------------------------------------------------------------------------------

    @staticmethod
    def options(spec_or_task: HeadSpec | TaskConfig) -> Seq2SeqOptions:
        return TaskKind.parse_options(Seq2SeqOptions, spec_or_task, "seq2seq")

    def spec(self, task: TaskConfig, data: TaskData, normalize: bool) -> HeadSpec:
        """The head's spec; with ``target_tokenizer: own`` the BPE is trained here on the training targets."""
        opt = self.options(task)
        metric = task.metric or self.default_metric
        if metric not in METRICS:
            raise ConfigError(f"tasks[].metric {metric!r}: a seq2seq task is selected on one of {', '.join(METRICS)}")
        outputs = 1  # shared: the model's vocabulary, filled in by the head (Seq2SeqHead.complete)
        if opt.target_tokenizer == "own":
            if opt.target_vocab is None:
                targets = [ex.target for ex in data.train if ex.target]
                opt.target_vocab = train_tokenizer(targets, vocab_size=opt.target_vocab_size).tk.to_str()
            outputs = _own_tokenizer(opt.target_vocab).vocab_size
        return HeadSpec(type=self.name, reads="tokens", module="seq2seq", outputs=outputs, dropout=task.head_dropout,
                        metric=metric, options=opt.model_dump())

    def target_tokenizer(self, spec: HeadSpec, tokenizer: SoraTokenizer) -> SoraTokenizer:
        """What targets are written in: the model's ``tokenizer``, or the head's own."""
        vocab = spec.options.get("target_vocab")
        return _own_tokenizer(vocab) if spec.options.get("target_tokenizer") == "own" and vocab else tokenizer

    # ---- model inputs -------------------------------------------------------------------------------------

    def encode(self, examples: list[Seq2SeqExample], spec: HeadSpec, tokenizer: SoraTokenizer,
               max_length: int) -> list[dict[str, Any]]:
        opt = self.options(spec)
        return encode_seq2seq(examples, tokenizer, self.target_tokenizer(spec, tokenizer),
                              opt.max_source_length or max_length, opt.max_target_length)

    def collate(self, rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        return seq2seq_batch(rows, pad_id)

    def length(self, row: dict[str, Any]) -> Any:
        """Batches group targets of a length first (the decoder and its output layer compute every padded
        target position; the encoder skips its padding), then sources: on Multi30k's training pairs in
        batches of 64, 3% of target and 22% of source positions are padding, against 32% and 3% by source
        length alone (MiniLM's tokenizer)."""
        return len(row.get("target", ())), len(row["ids"])

    def training_targets(self, examples: list[Seq2SeqExample], encoded: list[dict[str, Any]],
                         labels: list[str] | None) -> None:
        return None  # the target ids travel with each row (collate)

    # ---- forward ------------------------------------------------------------------------------------------

    def loss(self, model: SoraModel, name: str, batch: dict[str, torch.Tensor],
             objective: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: label-smoothed cross-entropy of each real target token given the ones before it
        and the source; logits (N, vocab) of the N real target positions, row-major (the output projection and
        the softmax, the costliest part of a step, skip the padding)."""
        head, opt = model.heads[name], self.options(model.head_specs[name])
        out = model.run(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        memory, memory_mask = head.memory(out)
        ids, mask = batch["target_ids"], batch["target_mask"].bool()
        real = mask[:, 1:]
        logits = head(ids[:, :-1], memory, memory_mask, mask=mask[:, :-1], positions=real).float()
        loss = token_cross_entropy(logits, ids[:, 1:][real], opt.label_smoothing)
        return loss, logits

    def divergence(self, spec: HeadSpec, target: torch.Tensor, logits: torch.Tensor,
                   batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """KL(target ‖ logits) of the next-token distributions (N, vocab each: ``loss``'s), mean over the real
        target tokens."""
        t, q = target.float().log_softmax(-1), logits.float().log_softmax(-1)
        return (t.exp() * (t - q)).sum(-1).mean()

    def predict(self, model: SoraModel, tokenizer: SoraTokenizer, name: str, encoded: list[dict[str, Any]],
                batch_size: int = 64, encoder: Any = None) -> list[str]:
        """The generated text of each encoded row, in order (beam search with the head's options)."""
        return self.generate(model, tokenizer, name, encoded, batch_size, encoder)

    def _decoding(self, model: SoraModel, tokenizer: SoraTokenizer, name: str, beam: int | None,
                  max_length: int | None) -> tuple[Seq2SeqOptions, SoraTokenizer, int, int]:
        """(the head's options, its target tokenizer, beam, tokens generated at most, end of sequence excluded)."""
        opt, target = self.options(model.head_specs[name]), self.target_tokenizer(model.head_specs[name], tokenizer)
        beam = opt.beam if beam is None else beam
        longest = opt.max_target_length if max_length is None else max_length
        if beam < 1 or longest < 1:
            raise ConfigError(f"generate: beam ({beam}) and max_length ({longest}) must be at least 1")
        return opt, target, beam, min(longest, (opt.positions or longest + 1) - 1)  # bos + output fit the positions

    def _memories(self, model: SoraModel, tokenizer: SoraTokenizer, name: str, encoded: list[dict[str, Any]],
                  batch_size: int, encoder: Any) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
        """(rows, decoder memory, its mask) per batch of sources (``eval_batches``)."""
        head, opt = model.heads[name], self.options(model.head_specs[name])
        encoder = model if encoder is None else encoder
        for idx, batch in self.eval_batches(model, tokenizer, encoded, batch_size):
            yield (idx, *head.memory(encoder_output(encoder, batch, opt.decoder == "tokens")))

    @torch.inference_mode()
    def generate(self, model: SoraModel, tokenizer: SoraTokenizer, name: str, encoded: list[dict[str, Any]],
                 batch_size: int = 64, encoder: Any = None, *, beam: int | None = None,
                 max_length: int | None = None) -> list[str]:
        """``predict`` with the head's ``beam`` and ``max_target_length`` (tokens generated, end of sequence
        excluded) replaced where given (``Sora.generate``, ``sora generate``, ``POST /v1/generate``). Its own loop
        rather than ``batched``: outputs are token lists of any length decoded by the target tokenizer, not
        score arrays."""
        opt, target, beam, longest = self._decoding(model, tokenizer, name, beam, max_length)
        texts = [""] * len(encoded)
        for idx, memory, memory_mask in self._memories(model, tokenizer, name, encoded, batch_size, encoder):
            ids = generate(model.heads[name], memory, memory_mask, target.cls_id, target.sep_id, target.pad_id,
                           beam=beam, max_length=longest + 1, min_length=min(opt.min_target_length, longest),
                           length_penalty=opt.length_penalty, no_repeat_ngram=opt.no_repeat_ngram,
                           stopping=opt.stopping)
            for i, seq in zip(idx, ids, strict=True):
                texts[i] = target.decode(seq).strip()
        return texts

    @torch.inference_mode()
    def stream(self, model: SoraModel, tokenizer: SoraTokenizer, name: str, encoded: list[dict[str, Any]],
               batch_size: int = 64, encoder: Any = None, *,
               max_length: int | None = None) -> Iterator[tuple[int, str]]:
        """Greedy ``generate``, yielding (row, text added) as the tokens are decoded (``Sora.stream``, ``POST
        /v1/generate`` with ``stream``). A row's text is decoded anew at each token and what it adds is sent, held
        back while it ends in a partial character or does not extend what was sent (a tokenizer that rewrites
        earlier text): so a row's pieces joined are its greedy ``generate`` text."""
        opt, target, _, longest = self._decoding(model, tokenizer, name, 1, max_length)
        head = model.heads[name]
        for idx, memory, memory_mask in self._memories(model, tokenizer, name, encoded, batch_size, encoder):
            tokens: list[list[int]] = [[] for _ in idx]
            sent = [""] * len(idx)
            for step in greedy_stream(head, memory, memory_mask, target.cls_id, target.sep_id, target.pad_id,
                                      max_length=longest + 1, min_length=min(opt.min_target_length, longest),
                                      no_repeat_ngram=opt.no_repeat_ngram):
                for row, token in step:
                    tokens[row].append(token)
                    if piece := _added(target, tokens[row], sent, row):
                        yield idx[row], piece
            for row in range(len(idx)):
                if piece := _added(target, tokens[row], sent, row, final=True):
                    yield idx[row], piece

    def format(self, spec: HeadSpec, s: str) -> dict[str, Any]:
        return {"text": s}

    def metrics(self, spec: HeadSpec, scores: list[str], examples: list[Seq2SeqExample]) -> dict[str, Any]:
        from sora.metrics.generation import generation_metrics  # the training extra (sacrebleu, rouge-score)

        return generation_metrics(scores, [ex.references for ex in examples], self.options(spec).bleu_tokenize)
