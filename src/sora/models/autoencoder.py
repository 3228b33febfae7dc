"""The Sora denoising autoencoder: encoder → pool → code (the sentence vector) → decoder.

The decoder rebuilds the original tokens while cross-attending only to the code, so everything it
needs must pass through that one compact vector (TSDAE, Wang et al. 2021). Task heads (added by
fine-tuning) live in ``heads`` and read the same code or the encoder states.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sora.config import ModelConfig
from sora.models.transformer import Decoder, Encoder


class EncoderOutput(NamedTuple):
    """One encoder pass: what every head reads from (token states, their mask, the pooled code)."""

    states: torch.Tensor | None  # (B, T, dim); None where only the code was computed (an ONNX encoder)
    mask: torch.Tensor  # (B, T) bool
    code: torch.Tensor  # (B, code_dim)


class SoraModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.vocab_size, cfg.dim, cfg.layers, cfg.heads, cfg.ffn_dim, cfg.max_length,
                               cfg.type_vocab_size, cfg.dropout, cfg.norm, cfg.layer_norm_eps, cfg.pad_id,
                               cfg.layer_heads)
        code_dim = cfg.code_dim or cfg.dim
        self.to_code = nn.Linear(cfg.dim, code_dim) if cfg.code_dim else nn.Identity()
        self.decoder: Decoder | None = None
        if cfg.decoder_layers:
            self.from_code = nn.Linear(code_dim, cfg.dim)
            self.decoder = Decoder(self.encoder.embeddings.word, cfg.dim, cfg.decoder_layers,
                                   cfg.decoder_heads or cfg.heads, cfg.ffn_dim, cfg.max_length, cfg.dropout)
        self.heads = nn.ModuleDict()
        self.head_specs: dict = {}  # name -> models.heads.HeadSpec, kept in config.json
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def code_dim(self) -> int:
        return self.cfg.code_dim or self.cfg.dim

    def encoder_precision_heads(self) -> dict[str, nn.Module]:
        """The heads compressed as the encoder is (``precision = "encoder"``: a seq2seq head's decoder), by name."""
        return {name: head for name, head in self.heads.items() if getattr(head, "precision", "float32") == "encoder"}

    def encode(self, ids: torch.Tensor, mask: torch.Tensor, type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token states (B, T, dim)."""
        return self.encoder(ids, mask, type_ids)

    def pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        states = states.float()  # an encoder run in bfloat16 (sora compress --method bf16): sum in float32
        if self.cfg.pooling == "cls":
            return states[:, 0]
        m = mask.unsqueeze(-1).to(states.dtype)
        return (states * m).sum(1) / m.sum(1).clamp(min=1.0)

    def run(self, ids: torch.Tensor, mask: torch.Tensor, type_ids: torch.Tensor | None = None) -> EncoderOutput:
        """The one encoder pass heads read from: token states and the code together."""
        states = self.encode(ids, mask, type_ids)
        return EncoderOutput(states, mask, self.to_code(self.pool(states, mask)))

    @contextmanager
    def perturbed(self, delta: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """Inside the block, encoder pass ``i`` (0, 1, ... in call order: a siamese pair makes two) adds
        ``delta(i, words, mask)`` to its word embeddings ``words`` (B, T, dim) — after the lookup, before
        positions, token types and the embedding LayerNorm, and before ``Unpad`` — at real tokens only (``mask``
        (B, T); padding is left as it is whatever ``delta`` returns). The one seam of adversarial training
        (``sora.objectives.adversarial``): ids, heads and task kinds are untouched, so every kind works."""
        calls = itertools.count()

        def perturb(words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            d = delta(next(calls), words, mask)
            return words + d.to(words.dtype) * mask.unsqueeze(-1).to(words.dtype)

        if self.encoder.perturb is not None:
            raise RuntimeError("SoraModel.perturbed blocks do not nest")
        self.encoder.perturb = perturb
        try:
            yield
        finally:
            self.encoder.perturb = None

    def embed(self, ids: torch.Tensor, mask: torch.Tensor, type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The sentence code (B, code_dim): the representation Sora is trained to produce."""
        return self.run(ids, mask, type_ids).code

    def reconstruction_loss(self, code: torch.Tensor, target: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of rebuilding ``target`` token by token from ``code`` alone (teacher forcing)."""
        if self.decoder is None:
            raise ValueError("this model has no decoder (decoder_layers = 0)")
        memory = self.from_code(code).unsqueeze(1)
        states = self.decoder(target[:, :-1], target_mask[:, :-1], memory)
        labels = target[:, 1:].masked_fill(~target_mask[:, 1:], -100)
        return self.token_loss(states, labels)

    def token_loss(self, states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Token cross-entropy through the tied output embedding; ``output_vocab="batch"`` restricts the
        softmax to the tokens present in this batch's targets, which removes most of the output cost
        when the vocabulary is large (30k for MiniLM) and the batch small."""
        keep = labels.ne(-100)
        states, labels = states[keep], labels[keep]
        weight = self.encoder.embeddings.word.weight
        if self.cfg.output_vocab == "batch":
            candidates = torch.unique(labels)  # sorted
            logits = states @ weight[candidates].T
            labels = torch.searchsorted(candidates, labels)
        else:
            logits = states @ weight.T
        return F.cross_entropy(logits.float(), labels)

    def mlm_loss(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Masked-language-model loss on the encoder states (labels: -100 where not masked)."""
        return self.token_loss(self.encode(ids, mask), labels)
