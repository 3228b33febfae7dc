"""Noise functions for denoising objectives, on padded id tensors.

Each takes ``(ids, mask, ratio, specials, mask_id)`` and returns a corrupted ``(ids, mask)``;
special tokens ([CLS], [SEP]) are never touched. They draw from torch's global RNG, which the
trainer saves in every checkpoint, so a resumed run corrupts exactly as the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NoiseFn = Callable[[torch.Tensor, torch.Tensor, float, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def _content(ids: torch.Tensor, mask: torch.Tensor, specials: torch.Tensor) -> torch.Tensor:
    return mask & ~torch.isin(ids, specials)


def _compact(ids: torch.Tensor, keep: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the positions where ``keep`` is False, shifting the rest left (vectorised)."""
    lengths = keep.sum(1)
    width = int(lengths.max().clamp(min=1))
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
    out = torch.gather(ids, 1, order)
    new_mask = torch.arange(width, device=ids.device)[None, :] < lengths[:, None]
    return out.masked_fill(~new_mask, pad_id), new_mask


def delete(ids, mask, ratio, specials, mask_id):
    """Delete each content token with probability ``ratio`` (TSDAE); at least one always survives."""
    content = _content(ids, mask, specials)
    drop = (torch.rand(ids.shape, device=ids.device) < ratio) & content
    # A row that would lose every content token keeps its first one.
    lost_all = (content & ~drop).sum(1) == 0
    first = torch.argmax(content.to(torch.int8), dim=1)
    drop[lost_all, first[lost_all]] = False
    pad_id = int(ids[~mask][0]) if (~mask).any() else 0
    return _compact(ids, mask & ~drop, pad_id)


def mask_tokens(ids, mask, ratio, specials, mask_id):
    """Replace each content token with [MASK] with probability ``ratio``."""
    hit = (torch.rand(ids.shape, device=ids.device) < ratio) & _content(ids, mask, specials)
    return ids.masked_fill(hit, mask_id), mask


def span_infill(ids, mask, ratio, specials, mask_id, mean_span: float = 3.0):
    """Replace spans (mean length 3) covering about ``ratio`` of the tokens with one [MASK] each (BART)."""
    content = _content(ids, mask, specials)
    start = (torch.rand(ids.shape, device=ids.device) < ratio / mean_span) & content
    # Span lengths are geometric: each following token continues the span with prob 1 - 1/mean_span.
    covered = start.clone()
    cont = torch.rand(ids.shape, device=ids.device) < (1 - 1 / mean_span)
    for t in range(1, ids.shape[1]):
        covered[:, t] |= covered[:, t - 1] & cont[:, t] & content[:, t]
    out = ids.masked_fill(covered, mask_id)
    # Keep the first [MASK] of each covered run, delete the rest.
    run_head = covered & ~torch.cat([torch.zeros_like(covered[:, :1]), covered[:, :-1]], dim=1)
    keep = mask & (~covered | run_head)
    pad_id = int(ids[~mask][0]) if (~mask).any() else 0
    return _compact(out, keep, pad_id)


def local_shuffle(ids, mask, ratio, specials, mask_id, window: int = 3):
    """Move each content token by fewer than ``window`` positions (Lample et al., 2018; ``ratio`` unused)."""
    content = _content(ids, mask, specials)
    pos = torch.arange(ids.shape[1], device=ids.device, dtype=torch.float)[None, :].expand(ids.shape)
    jitter = torch.rand(ids.shape, device=ids.device) * window
    key = torch.where(content, pos + jitter, pos)
    # [CLS] stays first, later specials ([SEP]) stay behind the content before them, padding stays last.
    key = torch.where(mask & ~content, torch.where(pos == 0, pos - 1, pos + window), key)
    key = torch.where(mask, key, pos + 1e6)
    order = torch.argsort(key, dim=1, stable=True)
    return torch.gather(ids, 1, order), mask


def crop(ids, mask, ratio, specials, mask_id):
    """Keep one random contiguous span of each row's content, its length a uniform share of the content between
    ``ratio`` and ``min(1, 5 * ratio)`` (Contriever's independent cropping, 10-50% at ratio 0.1; Izacard et al.
    2022): two crops of one document are a query-like and a passage-like view of it, which is what retrieval
    matches. Specials stay; at least one content token is kept."""
    content = _content(ids, mask, specials)
    n = content.sum(1)
    share = ratio + torch.rand(n.shape, device=ids.device) * (min(1.0, 5 * ratio) - ratio)
    length = (share * n).round().long().clamp(min=1).minimum(n.clamp(min=1))
    start = (torch.rand(n.shape, device=ids.device) * (n - length + 1)).long().minimum(n - length).clamp(min=0)
    index = content.long().cumsum(1) - 1  # each content token's place among its row's content
    inside = (index >= start[:, None]) & (index < (start + length)[:, None])
    pad_id = int(ids[~mask][0]) if (~mask).any() else 0
    return _compact(ids, mask & (~content | inside), pad_id)


def none(ids, mask, ratio, specials, mask_id):
    return ids, mask


NOISE: dict[str, NoiseFn] = {
    "none": none,
    "delete": delete,
    "mask": mask_tokens,
    "span": span_infill,
    "shuffle": local_shuffle,
    "crop": crop,
}
