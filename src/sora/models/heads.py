"""Task heads: small modules on the shared encoder, saved beside it.

A head is dropout and one linear layer over what it *reads* from one encoder pass (``EncoderOutput``):

- ``code``: the sentence code (single texts, cross-encoded pairs ``[CLS] a [SEP] b [SEP]``);
- ``siamese``: two codes u, v combined as [u, v, |u - v|, u * v] (Sentence-BERT);
- ``tokens``: every token state (span extraction: start/end logits per token);
- ``entities``: the token states at two marked positions, concatenated (relation extraction, "entity start"
  pooling of Matching-the-Blanks).

A spec with ``module: seq2seq`` is instead a decoder that generates text (``Seq2SeqHead``: translation,
summarisation), cross-attending to the token states or to the code.

What the outputs mean (classes, a value, span ends) is the task kind's business (``sora.tasks``); this module
never looks at a head's kind. Each head's ``HeadSpec`` is stored in the checkpoint's config.json so loading
re-creates the module before the weights.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, model_validator
from torch import nn

from sora.errors import ConfigError
from sora.models.autoencoder import EncoderOutput, SoraModel
from sora.models.transformer import Decoder, DecoderCache

Reads = Literal["code", "siamese", "tokens", "entities"]
Module = Literal["linear", "seq2seq"]


class HeadSpec(BaseModel):
    type: str  # the task kind's name (sora.tasks.KINDS)
    reads: Reads = "code"
    outputs: int = 1
    pair: bool = False
    pair_mode: Literal["cross", "siamese"] = "cross"
    labels: list[str] | None = None
    dropout: float = 0.1
    thresholds: list[float] | None = None  # multilabel, tuned on validation
    metric: str = "accuracy"
    normalize: bool = False  # the head reads L2-normalised codes (siamese: u and v normalised before combining)
    options: dict[str, Any] = {}  # kind-specific settings kept with the head (e.g. span lengths, stride)
    module: Module = "linear"  # what the head is: ``Head`` (dropout + linear), or a ``Seq2SeqHead`` decoder

    @model_validator(mode="before")
    @classmethod
    def _format_1(cls, raw: Any) -> Any:
        """Checkpoints written before heads recorded ``reads``/``outputs`` (format 1): both follow from the
        rest of the spec (a label set gives one output per label; none, one value)."""
        if isinstance(raw, dict) and "outputs" not in raw:
            raw = dict(raw)
            raw["outputs"] = len(raw.get("labels") or []) or 1
            raw.setdefault("reads", "siamese" if raw.get("pair") and raw.get("pair_mode") == "siamese" else "code")
        return raw

    @property
    def siamese(self) -> bool:
        return self.reads == "siamese"


def input_dim(spec: HeadSpec, model: SoraModel) -> int:
    return {"code": model.code_dim, "siamese": 4 * model.code_dim, "tokens": model.cfg.dim,
            "entities": 2 * model.cfg.dim}[spec.reads]


class Head(nn.Module):
    # What compression does to a head (``sora.compress``): "float32" keeps it as it is (a linear layer sitting right
    # on the decision, tiny beside the encoder); "encoder" gives it the encoder's treatment (bf16 weights, int8
    # linear layers), for heads as large as the encoder that run once per generated token.
    precision = "float32"

    def __init__(self, spec: HeadSpec, in_dim: int):
        super().__init__()
        self.drop = nn.Dropout(spec.dropout)
        self.out = nn.Linear(in_dim, spec.outputs)
        self.normalize = spec.normalize and spec.reads == "code"  # siamese: done in head_features

    def inputs(self, features: torch.Tensor) -> torch.Tensor:
        """What the linear layer reads (before dropout)."""
        return F.normalize(features, dim=-1) if self.normalize else features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.inputs(features)))


class Seq2SeqHead(nn.Module):
    """A decoder that generates a target text from one encoder pass: causal self-attention over the target so far,
    cross-attention to a memory, and a softmax through its target embeddings (tied: the output projection is the
    embedding matrix, as in the pretraining decoder). ``spec.options`` says how it is built:

    - ``decoder``: ``tokens`` cross-attends to the encoder's token states under the source mask; ``code`` to the
      one code vector (projected to the model's width by ``from_code``), Sora's pretraining bottleneck;
    - ``target_tokenizer``: ``shared`` decodes into the model's own vocabulary, its embeddings tied to the
      encoder's (as BART's); ``own``: a target vocabulary of ``spec.outputs`` tokens with embeddings of its own;
    - ``layers``, ``heads``, ``ffn_dim``, ``positions``: the decoder's shape (``complete`` fills them in);
    - ``init``: ``pretrained`` when the model's denoising decoder could be copied (shared vocabulary, same shape:
      ``complete`` decides), else ``fresh`` (normal(0, 0.02) weights, as ``SoraModel``'s).

    Initialised from the pretrained decoder, a code-mode head starts as the denoising decoder that rebuilt texts
    from their code; a token-mode head reuses its self-attention, feed-forward and (shape-compatible) cross-attention
    weights. Called as ``head(ids, memory, memory_mask, cache)`` it returns logits (B, T, vocab): a step function
    for ``sora.models.generate.generate``.

    Compression treats it as part of the encoder (``precision = "encoder"``): a shared vocabulary ties its embeddings
    to the encoder's, so the two can only change dtype together, and decoding is where generation spends its time."""

    precision = "encoder"

    def __init__(self, spec: HeadSpec, model: SoraModel):
        super().__init__()
        o = spec.options
        dim, shared = model.cfg.dim, o["target_tokenizer"] == "shared"
        tied = model.encoder.embeddings.word
        word = tied if shared else nn.Embedding(spec.outputs, dim)
        self.decoder = Decoder(word, dim, o["layers"], o["heads"], o["ffn_dim"], o["positions"], spec.dropout)
        self.from_code = nn.Linear(model.code_dim, dim) if o["decoder"] == "code" else None
        for module in self.modules():
            if module is not tied:  # the encoder's embeddings keep their (pretrained) weights
                SoraModel._init(module)
        if o.get("init") == "pretrained" and _fits(self.decoder, model):
            self.decoder.load_state_dict(model.decoder.state_dict())
            if self.from_code is not None and isinstance(model.from_code, nn.Linear):
                self.from_code.load_state_dict(model.from_code.state_dict())

    @staticmethod
    def complete(spec: HeadSpec, model: SoraModel) -> HeadSpec:
        """``spec`` with the decoder's shape filled in where its options leave it unset (None): the pretrained
        decoder's when the model has one, else 2 layers of the encoder's heads and feed-forward width; the model's
        positions; ``outputs`` (the model's vocabulary when shared); and ``init``. Idempotent, so a loaded
        checkpoint's spec comes back unchanged."""
        o, cfg, dec = dict(spec.options), model.cfg, model.decoder
        shared = o.get("target_tokenizer", "shared") == "shared"
        o.setdefault("decoder", "tokens")
        o.setdefault("target_tokenizer", "shared")
        o["layers"] = o.get("layers") or (len(dec.layers) if dec is not None else 2)
        o["heads"] = o.get("heads") or (dec.layers[0].attn.heads if dec is not None else cfg.decoder_heads or cfg.heads)
        o["ffn_dim"] = o.get("ffn_dim") or cfg.ffn_dim
        o["positions"] = o.get("positions") or cfg.max_length
        if cfg.dim % o["heads"]:
            raise ConfigError(f"tasks[].options.heads: the model's width {cfg.dim} is not divisible by {o['heads']}")
        longest = o.get("max_target_length")
        if longest is not None and longest + 1 > o["positions"]:
            raise ConfigError(f"tasks[].options.max_target_length {longest}: the decoder has {o['positions']} "
                              "positions (bos + target must fit)")
        outputs = model.encoder.embeddings.word.num_embeddings if shared else spec.outputs
        if o.get("init") is None:
            fits = shared and dec is not None and (o["layers"], o["heads"], o["ffn_dim"], o["positions"]) == (
                len(dec.layers), dec.layers[0].attn.heads, dec.layers[0].ffn.up.out_features,
                dec.position.num_embeddings)
            o["init"] = "pretrained" if fits else "fresh"
        return spec.model_copy(update={"options": o, "outputs": outputs})

    def memory(self, out: EncoderOutput) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the decoder cross-attends to, and its mask: token states (B, S, dim) under the source mask, or
        the projected code (B, 1, dim) without one; in the head's own dtype (float32, or bfloat16 once compressed)."""
        dtype = self.decoder.word.weight.dtype
        if self.from_code is not None:
            return self.from_code(out.code.to(dtype)).unsqueeze(1), None
        if out.states is None:
            raise ValueError("a seq2seq head decoding from token states needs them (an encoder pass with states)")
        return out.states.to(dtype), out.mask

    def forward(self, ids: torch.Tensor, memory: torch.Tensor | None, memory_mask: torch.Tensor | None,
                cache: DecoderCache | None = None, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits (B, T, vocab) after each of ``ids`` (B, T); ``mask`` (B, T): the target's padding.
        ``positions`` (B, T) bool: only those positions' logits, (N, vocab) in row-major order (training skips
        the padding's, the output layer being most of a small decoder's work)."""
        if mask is None and cache is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        states = self.decoder(ids, mask, memory, memory_mask, cache=cache)
        if positions is not None:
            states = states[positions]
        return states @ self.decoder.word.weight.T


def _fits(decoder: Decoder, model: SoraModel) -> bool:
    """Whether ``model``'s denoising decoder can be copied into ``decoder`` (same heads and tensor shapes)."""
    src = model.decoder
    if src is None or len(src.layers) != len(decoder.layers):
        return False
    if src.layers[0].attn.heads != decoder.layers[0].attn.heads:
        return False
    theirs = src.state_dict()
    return all(k in theirs and theirs[k].shape == v.shape for k, v in decoder.state_dict().items())


def add_head(model: SoraModel, name: str, spec: HeadSpec) -> None:
    if spec.module == "seq2seq":
        spec = Seq2SeqHead.complete(spec, model)
        model.heads[name] = Seq2SeqHead(spec, model)
    else:
        model.heads[name] = Head(spec, input_dim(spec, model))
    model.head_specs[name] = spec


def build_heads(model: SoraModel, config: dict) -> None:
    """Re-create the heads a checkpoint's config lists (used by ``load_checkpoint``)."""
    for name, raw in (config.get("heads") or {}).items():
        add_head(model, name, HeadSpec.model_validate(raw))


def encoder_output(encoder: Any, batch: dict[str, torch.Tensor], states: bool) -> EncoderOutput:
    """One encoder pass over ``batch``. ``encoder`` is a ``SoraModel`` or anything with its ``embed`` (an ONNX
    Runtime encoder): heads that read only the code need nothing more."""
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
    if states or not hasattr(encoder, "embed"):
        return encoder.run(ids, mask, types)
    return EncoderOutput(None, mask, encoder.embed(ids, mask, types))


def head_features(encoder: Any, spec: HeadSpec, batch: dict[str, torch.Tensor],
                  out: EncoderOutput | None = None) -> torch.Tensor:
    """What the head reads. ``out`` lets several heads share one encoder pass."""
    if spec.reads == "siamese":
        u = encoder.embed(batch["input_ids"], batch["attention_mask"])
        v = encoder.embed(batch["b_input_ids"], batch["b_attention_mask"])
        if spec.normalize:
            u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
        return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)
    needs_states = spec.reads in ("tokens", "entities")
    if out is None or (needs_states and out.states is None):
        out = encoder_output(encoder, batch, needs_states)
    if spec.reads == "code":
        return out.code
    states = out.states.float()
    if spec.reads == "tokens":
        return states
    starts = batch["entity_starts"]  # (B, 2): token index of each entity's opening marker
    picked = states.gather(1, starts.unsqueeze(-1).expand(-1, -1, states.shape[-1]))  # (B, 2, dim)
    return picked.flatten(1)


def head_logits(encoder: Any, model: SoraModel, name: str, batch: dict[str, torch.Tensor],
                out: EncoderOutput | None = None) -> torch.Tensor:
    """Head ``name``'s raw outputs: (B, outputs), or (B, T, outputs) for a head reading every token."""
    return model.heads[name](head_features(encoder, model.head_specs[name], batch, out))
