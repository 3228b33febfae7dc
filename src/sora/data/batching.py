"""Length-bucketed batches with dynamic padding, from a stream of texts.

The stream is read ``bucket_batches`` batches at a time; each bucket is shuffled, sorted by length
and cut into batches, whose order is shuffled again. Padding is per batch, so short sentences cost
little. Everything is seeded by (seed, epoch, bucket), so a resumed run sees the same batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

import torch

from sora.text.tokenizer import SoraTokenizer


def collate(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs])
    return {"input_ids": ids, "attention_mask": torch.arange(width)[None, :] < lengths[:, None]}


def _buckets(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    bucket: list[str] = []
    for text in texts:
        bucket.append(text)
        if len(bucket) == size:
            yield bucket
            bucket = []
    if bucket:
        yield bucket


def token_batches(
    texts: Iterable[str],
    tokenizer: SoraTokenizer,
    batch_size: int,
    max_length: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    bucket_batches: int = 50,
    shuffle: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield padded batches; with ``world_size`` > 1 each rank gets every world_size-th batch.

    Under DDP only whole groups of ``world_size`` batches are handed out, so every rank takes the
    same number of steps and none waits forever at the last all-reduce.
    """
    group: list[list[list[int]]] = []
    for b, bucket in enumerate(_buckets(texts, batch_size * bucket_batches)):
        rng = random.Random(f"{seed}/{epoch}/{b}")
        seqs = tokenizer.encode(bucket, max_length)
        if shuffle:
            rng.shuffle(seqs)
            seqs.sort(key=len)
        batches = [seqs[i : i + batch_size] for i in range(0, len(seqs), batch_size)]
        if shuffle:
            rng.shuffle(batches)
        for batch in batches:
            group.append(batch)
            if len(group) == world_size:
                yield collate(group[rank], tokenizer.pad_id)
                group = []
