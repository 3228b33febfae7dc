"""Transformer blocks in plain PyTorch: one attention, one block, used by the encoder and the decoder.

``norm="pre"`` is Sora's own encoder (stable from scratch); ``norm="post"`` reproduces BERT so the
weights of a local BERT-style model (all-MiniLM-L6-v2) load into the same code.
Attention goes through ``F.scaled_dot_product_attention``, which picks a fused kernel where it can.
The decoder decodes incrementally with a ``DecoderCache`` (generation: ``sora.models.generate``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def bucket_rows(n: int) -> int:
    """``n`` rounded up to one of a few heights: exact up to 64, multiples of 16 up to 512, of 64 beyond.
    oneDNN builds and caches kernels for every matrix height it meets; an encoder that met every height (a
    server's batches) grew to 0.53 GB (float32) and 1.13 GB (bfloat16) of memory within 600 batches, toward
    a plateau set by the cache's capacity (1024 kernels); with these heights (212 at most), 0.42 and 0.51 GB,
    at the same speed (measured here: MiniLM, 600 random batches of 1-32 short texts, 1 thread). A single
    text without padding keeps the plain path: its T rows are bounded by the model's max length."""
    if n <= 64:
        return n
    step = 16 if n <= 512 else 64
    return -(-n // step) * step


@dataclass
class Unpad:
    """Where a padded (B, T) batch's real tokens sit. The encoder keeps only those rows (N, dim) through
    LayerNorms, projections and feed-forwards, which is most of its work; attention alone needs the padded
    layout, so it scatters queries, keys and values back in and gathers its output out again. ``rows`` ≥ N
    is the height of the packed matrix: at inference N is rounded up (``bucket_rows``) with zero rows that
    attention never sees."""

    index: torch.Tensor  # (N,) flat positions in B * T
    batch: int
    length: int
    rows: int

    @classmethod
    def of(cls, mask: torch.Tensor, bucket: bool = False) -> Unpad:
        index = mask.reshape(-1).nonzero().squeeze(1)
        n = index.numel()
        return cls(index, mask.shape[0], mask.shape[1], bucket_rows(n) if bucket else n)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, d) → (B, T, d), zeros at padding."""
        real = x if self.rows == self.index.numel() else x[: self.index.numel()]
        out = x.new_zeros(self.batch * self.length, x.shape[-1]).index_copy(0, self.index, real)
        return out.view(self.batch, self.length, -1)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) → (rows, d)."""
        y = x.reshape(self.batch * self.length, -1).index_select(0, self.index)
        extra = self.rows - y.shape[0]
        return torch.cat([y, y.new_zeros(extra, y.shape[1])]) if extra else y


@dataclass
class KV:
    """One attention's keys and values, (B, heads, length, head_dim) each, kept between decoding steps: a
    self-attention's grow by the tokens of every call, a cross-attention's are computed once from the memory."""

    key: torch.Tensor | None = None
    value: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> None:
        if self.key is not None and self.value is not None:
            self.key, self.value = self.key.index_select(0, index), self.value.index_select(0, index)


class DecoderCache:
    """What incremental decoding keeps between calls of ``Decoder.forward(..., cache=)``, so that decoding token
    t costs attention over t keys instead of recomputing the t-token prefix: per layer the self-attention's keys
    and values (appended each call) and the cross-attention's (computed from the memory on the first call); the
    tokens decoded so far (``length``: where the next positions start); the key mask of the decoded tokens when
    any call passed one (None: no padding); the memory mask. Empty when made: the decoder fills it."""

    def __init__(self) -> None:
        self.layers: list[tuple[KV, KV]] = []
        self.length = 0
        self.mask: torch.Tensor | None = None  # (B, length) bool
        self.memory_mask: torch.Tensor | None = None  # (B, 1, 1, S) bool

    def reorder(self, index: torch.Tensor, memory: bool = True) -> None:
        """Keep rows ``index`` (B',) of the batch, in that order (beam search: the beams chosen at a step).
        ``memory=False`` leaves the cross-attention keys as they are, right when ``index`` only moves rows among
        copies of the same memory (the beams of one source)."""
        for own, cross in self.layers:
            own.select(index)
            if memory:
                cross.select(index)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index)
        if memory and self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, index)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                   causal: bool = False) -> torch.Tensor:
    """SDPA written with plain ops, for inference only (no dropout): ONNX export's fallback, should the exporter
    ever stop writing SDPA out."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal and mask is None:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) @ v


class Dropout(nn.Module):
    """``nn.Dropout``, with a cheaper mask on CPUs: torch's CPU dropout draws one Bernoulli variable per element,
    which took 2.5 ms forward and backward for a (1024, 256) activation here (2 threads) — 26 dropouts a step of a
    3-layer translation model, 8% of its time. Here one 64-bit random integer gives four 16-bit uniforms, each kept
    when above ``round(p × 65536)`` of the 65,536 values (1.0–1.4 ms); the rate is p to within 1/65,536 and the kept
    values are scaled by exactly 1 / (the keep probability), so the expectation is unchanged. Other devices use
    ``F.dropout`` (fused there). Deterministic under ``torch.manual_seed``, as torch's."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout {p} must be in [0, 1)")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        n, cut = x.numel(), round(self.p * 65536)
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), 2**63 - 1)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= cut - 32768
        return x * (keep.to(x.dtype) * (65536 / (65536 - cut)))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, cross: bool = False, head_dim: int | None = None):
        """``head_dim`` defaults to dim // heads; pruning keeps it and lowers ``heads`` (inner = heads × head_dim)."""
        super().__init__()
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim {dim} is not divisible by heads {heads}")
            head_dim = dim // heads
        self.heads, self.head_dim, self.dropout, self.cross = heads, head_dim, dropout, cross
        self.sdpa = True  # False: math_attention (ONNX export sets it on its own copy of the model)
        inner = heads * head_dim
        if cross:
            self.q = nn.Linear(dim, inner)
            self.kv = nn.Linear(dim, 2 * inner)
        else:
            self.qkv = nn.Linear(dim, 3 * inner)
        self.out = nn.Linear(inner, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                causal: bool = False, unpad: Unpad | None = None, cache: KV | None = None) -> torch.Tensor:
        """``mask``: bool (B, 1, 1 or T, S), True where attention is allowed. With ``unpad``, ``x`` and the
        result are the real tokens only (N, dim). With ``cache`` (incremental decoding) a self-attention attends
        to the cached keys and values plus those of ``x``, and keeps them all; a cross-attention computes the
        memory's once and reuses them (``memory`` is then unused)."""
        if self.cross:
            q = self._split(self.q(x))
            if cache is not None and cache.key is not None:
                k, v = cache.key, cache.value
            else:
                k, v = self.kv(memory).chunk(2, dim=-1)
                k, v = self._split(k), self._split(v)
                if cache is not None:
                    cache.key, cache.value = k, v
        else:
            qkv = self.qkv(x)
            q, k, v = (unpad.pad(qkv) if unpad is not None else qkv).chunk(3, dim=-1)
            q, k, v = self._split(q), self._split(k), self._split(v)
            if cache is not None:
                if cache.key is not None:
                    k, v = torch.cat([cache.key, k], dim=2), torch.cat([cache.value, v], dim=2)
                cache.key, cache.value = k, v
        if self.sdpa:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                is_causal=causal and mask is None,
            )
        else:
            y = math_attention(q, k, v, mask, causal)
        b, h, t, hd = y.shape
        y = y.transpose(1, 2).reshape(b, t, h * hd)
        return self.out(unpad.unpad(y) if unpad is not None else y)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Self-attention, optional cross-attention, feed-forward; residuals with pre- or post-LayerNorm."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, norm: str = "pre",
                 cross: bool = False, eps: float = 1e-5, head_dim: int | None = None):
        super().__init__()
        self.pre = norm == "pre"
        self.attn = Attention(dim, heads, dropout, head_dim=head_dim)
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.cross = Attention(dim, heads, dropout, cross=True) if cross else None
        self.cross_norm = nn.LayerNorm(dim, eps=eps) if cross else None
        self.ffn = FeedForward(dim, ffn_dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.drop = Dropout(dropout)

    def _residual(self, x, norm, fn):
        if self.pre:
            return x + self.drop(fn(norm(x)))
        return norm(x + self.drop(fn(x)))

    def forward(self, x, mask=None, memory=None, memory_mask=None, causal=False, unpad=None,
                cache: tuple[KV, KV] | None = None):
        """``cache``: this layer's (self-attention, cross-attention) keys and values (``DecoderCache``)."""
        own, cross = cache if cache is not None else (None, None)
        x = self._residual(x, self.attn_norm, lambda h: self.attn(h, mask, causal=causal, unpad=unpad, cache=own))
        if self.cross is not None:
            x = self._residual(x, self.cross_norm, lambda h: self.cross(h, memory_mask, memory=memory, cache=cross))
        return self._residual(x, self.ffn_norm, self.ffn)


class Embeddings(nn.Module):
    def __init__(self, vocab: int, dim: int, max_length: int, type_vocab: int, dropout: float,
                 norm: bool, eps: float, pad_id: int = 0):
        super().__init__()
        self.word = nn.Embedding(vocab, dim, padding_idx=pad_id)
        self.position = nn.Embedding(max_length, dim)
        self.token_type = nn.Embedding(type_vocab, dim) if type_vocab else None
        self.norm = nn.LayerNorm(dim, eps=eps) if norm else None
        self.drop = Dropout(dropout)

    def forward(self, ids: torch.Tensor, type_ids: torch.Tensor | None = None,
                perturb: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """``perturb`` maps the word embeddings (B, T, dim) before positions and types are added (adversarial
        training: ``SoraModel.perturbed``)."""
        t = ids.shape[1]
        if t > self.position.num_embeddings:
            raise ValueError(f"sequence of {t} tokens is longer than the model's {self.position.num_embeddings}")
        x = self.word(ids)
        if perturb is not None:
            x = perturb(x)
        x = x + self.position.weight[:t][None]
        if self.token_type is not None:
            x = x + (self.token_type(type_ids) if type_ids is not None else self.token_type.weight[0])
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(x)


class Encoder(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, ffn_dim: int, max_length: int,
                 type_vocab: int, dropout: float, norm: str, eps: float, pad_id: int,
                 layer_heads: list[int] | None = None):
        """``layer_heads``: heads kept per layer after pruning (each of width dim // heads)."""
        super().__init__()
        post = norm == "post"
        self.embeddings = Embeddings(vocab, dim, max_length, type_vocab, dropout, post, eps, pad_id)
        counts = layer_heads or [heads] * layers
        if len(counts) != layers:
            raise ValueError(f"layer_heads has {len(counts)} entries for {layers} layers")
        self.layers = nn.ModuleList(Block(dim, h, ffn_dim, dropout, norm, eps=eps, head_dim=dim // heads)
                                    for h in counts)
        self.final_norm = None if post else nn.LayerNorm(dim, eps=eps)
        # Off on ONNX export's copy of the model: a traced graph must not depend on the sample's padding.
        self.unpad = True
        # (word embeddings (B, T, dim), mask (B, T)) -> word embeddings: set only inside SoraModel.perturbed.
        self.perturb: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def forward(self, ids, mask, type_ids=None):
        """Token states (B, T, dim); zeros at padding when the batch was unpadded."""
        perturb = self.perturb
        x = self.embeddings(ids, type_ids, None if perturb is None else lambda words: perturb(words, mask))
        attn_mask = mask[:, None, None, :]
        # Training: skip padding when there is enough of it to pay for the gather / scatter around attention.
        # Inference: always, with the row count rounded to a few heights (see bucket_rows), except for one
        # text without padding, whose T rows are already few heights.
        unpad = None
        if self.unpad and mask.numel():
            if self.training:
                if mask.sum() < 0.9 * mask.numel():
                    unpad = Unpad.of(mask)
            elif not (mask.shape[0] == 1 and bool(mask.all())):
                unpad = Unpad.of(mask, bucket=True)
        if unpad is not None:
            x = unpad.unpad(x)
        for layer in self.layers:
            x = layer(x, attn_mask, unpad=unpad)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return unpad.pad(x) if unpad is not None else x


class Decoder(nn.Module):
    """A causal pre-LN decoder that cross-attends to a memory, in one of two modes: the one code vector (memory of
    length 1, no mask: Sora's pretraining bottleneck), or the encoder's token states with the source padding
    mask (``memory_mask``). Decodes a whole sequence at once (teacher forcing) or incrementally (``cache``)."""

    def __init__(self, word: nn.Embedding, dim: int, layers: int, heads: int, ffn_dim: int, max_length: int,
                 dropout: float, eps: float = 1e-5):
        super().__init__()
        self.word = word  # tied to the encoder's embedding (and so to the output layer)
        self.position = nn.Embedding(max_length, dim)
        self.layers = nn.ModuleList(
            Block(dim, heads, ffn_dim, dropout, "pre", cross=True, eps=eps) for _ in range(layers)
        )
        self.final_norm = nn.LayerNorm(dim, eps=eps)
        self.drop = Dropout(dropout)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None, memory: torch.Tensor | None,
                memory_mask: torch.Tensor | None = None, cache: DecoderCache | None = None) -> torch.Tensor:
        """States (B, T, dim) of ``ids`` (B, T). ``memory``: (B, S, dim); ``memory_mask``: bool (B, S), True at real
        positions, so that a padded memory (e.g. encoder states) is not attended at its padding. None attends to
        all of it (Sora's one code vector).

        With ``cache`` ``ids`` are the tokens after those already decoded into it (one per step when generating):
        their positions start at ``cache.length``, they attend to the cached tokens and themselves, and the
        memory (and its mask) is read on the first call only. ``mask`` may then be None (no padding). The states
        equal those of decoding the whole sequence at once."""
        if cache is not None:
            return self._incremental(ids, mask, memory, memory_mask, cache)
        t = ids.shape[1]
        x = self.drop(self.word(ids) + self.position.weight[:t][None])
        causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
        attn_mask = causal[None, None] & mask[:, None, None, :]
        cross_mask = None if memory_mask is None else memory_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, attn_mask, memory=memory, memory_mask=cross_mask)
        return self.final_norm(x)

    def _incremental(self, ids: torch.Tensor, mask: torch.Tensor | None, memory: torch.Tensor | None,
                     memory_mask: torch.Tensor | None, cache: DecoderCache) -> torch.Tensor:
        b, t = ids.shape
        past = cache.length
        if past + t > self.position.num_embeddings:
            raise ValueError(f"decoding past the decoder's {self.position.num_embeddings} positions")
        if not cache.layers:
            if memory is None:
                raise ValueError("the first call with an empty cache needs the memory")
            cache.layers = [(KV(), KV()) for _ in self.layers]
            cache.memory_mask = None if memory_mask is None else memory_mask.bool()[:, None, None, :]
        x = self.drop(self.word(ids) + self.position.weight[past : past + t][None])
        if mask is not None or cache.mask is not None:
            new = mask.bool() if mask is not None else ids.new_ones(b, t, dtype=torch.bool)
            old = cache.mask if cache.mask is not None else ids.new_ones(b, past, dtype=torch.bool)
            cache.mask = torch.cat([old, new], dim=1)
        attn_mask = None  # one new token and no padding: it attends to every cached key
        if t > 1 or cache.mask is not None:
            # Query i (position past + i) sees keys 0 … past + i.
            attn_mask = torch.ones(t, past + t, dtype=torch.bool, device=ids.device).tril(past)[None, None]
            if cache.mask is not None:
                attn_mask = attn_mask & cache.mask[:, None, None, :]
        for layer, kv in zip(self.layers, cache.layers, strict=True):
            x = layer(x, attn_mask, memory=memory, memory_mask=cache.memory_mask, cache=kv)
        cache.length = past + t
        return self.final_norm(x)
