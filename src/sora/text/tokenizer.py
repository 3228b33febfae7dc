"""Subword tokenizers: trained on the user's corpus, or taken from a local pretrained model directory.

Sora trains a byte-level BPE: every string, Chinese included, maps to known pieces, so nothing
collapses into [UNK]. NFKC normalisation folds full-width forms common in CJK text.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from sora.errors import DataError, SoraWarning

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Above this share of [UNK] tokens a model reads its data half blind (MiniLM on Chinese hotel reviews: 65%).
UNKNOWN_WARN_SHARE = 0.05


class SoraTokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` that knows Sora's special tokens."""

    def __init__(self, tokenizer: Tokenizer):
        self.tk = tokenizer
        self.tk.no_padding()
        self.tk.no_truncation()
        vocab = tokenizer.get_vocab()

        def find(*names: str) -> int:
            for name in names:
                if name in vocab:
                    return vocab[name]
            raise DataError(f"tokenizer has none of the special tokens {names}")

        self.pad_id = find("[PAD]", "<pad>")
        self.cls_id = find("[CLS]", "<s>")
        self.sep_id = find("[SEP]", "</s>")
        self.mask_id = find("[MASK]", "<mask>")
        self.unk_id = find("[UNK]", "<unk>")

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    @property
    def special_ids(self) -> list[int]:
        return [self.pad_id, self.cls_id, self.sep_id, self.mask_id, self.unk_id]

    def encode(self, texts: list[str], max_length: int) -> list[list[int]]:
        """Token ids with [CLS] … [SEP], truncated to ``max_length`` (the [SEP] is kept)."""
        self.tk.enable_truncation(max_length)
        return [enc.ids for enc in self.tk.encode_batch(texts)]

    def encode_pairs(self, pairs: list[tuple[str, str]], max_length: int) -> list[tuple[list[int], list[int]]]:
        """Cross-encoded pairs: ids and segment ids of ``[CLS] a [SEP] b [SEP]``."""
        self.tk.enable_truncation(max_length)
        return [(enc.ids, enc.type_ids) for enc in self.tk.encode_batch(pairs)]

    def unknown_share(self, texts: Sequence[str], sample: int = 2000) -> float:
        """The share of the text tokens (specials aside) of the first ``sample`` texts that are [UNK]."""
        self.tk.no_truncation()  # whole texts, whatever max_length the last encode() set
        ids = [i for enc in self.tk.encode_batch(list(texts[:sample]), add_special_tokens=False) for i in enc.ids]
        return sum(i == self.unk_id for i in ids) / max(1, len(ids))

    def warn_unknown(self, texts: Sequence[str], where: str) -> float:
        """Warn (``SoraWarning``) when this tokenizer cannot read much of ``texts``; returns the share."""
        share = self.unknown_share(texts)
        if share > UNKNOWN_WARN_SHARE:
            warnings.warn(f"{where}: {share:.0%} of the tokens are [UNK] for this tokenizer, so the model cannot "
                          "read them (a backbone whose vocabulary lacks this script?); pretrain with Sora's own "
                          "tokenizer on this text (recipes/pretrain-scratch.yaml) or pick a backbone that covers it",
                          SoraWarning, stacklevel=2)
        return share

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        self.tk.save(str(Path(directory) / "tokenizer.json"))

    @classmethod
    def load(cls, path: str | Path) -> SoraTokenizer:
        """Load ``tokenizer.json`` from a file or a directory (a Sora checkpoint or an HF model dir)."""
        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise DataError(f"no tokenizer.json at {p}")
        try:
            return cls(Tokenizer.from_file(str(file)))
        except Exception as exc:  # tokenizers raises a bare Exception for a truncated or foreign file
            raise DataError(f"{file}: not a readable tokenizer ({' '.join(str(exc).split())[:160]})") from None


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2, lowercase: bool = False
) -> SoraTokenizer:
    """Train a byte-level BPE on an iterator of texts (streamed, never held in memory whole)."""
    norm = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    tk = Tokenizer(models.BPE(unk_token="[UNK]"))
    tk.normalizer = normalizers.Sequence(norm)
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(_nonempty(texts), trainer=trainer)
    cls_id, sep_id = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return SoraTokenizer(tk)


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if text.strip():
            yield text
