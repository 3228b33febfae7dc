"""Decoding a decoder into token ids: greedy, or beam search, batched over sources, deterministic.

Whatever is decoded is a *step function* ``step(ids, memory, memory_mask, cache) -> logits (B, t, vocab)``:
with a ``DecoderCache`` (``use_cache=True``) ``ids`` are the tokens after those already in the cache (one per
call here), without one the whole prefix. A seq2seq head (``sora.models.heads.Seq2SeqHead``) is one.

Beam search keeps ``beam`` hypotheses per source (Hugging Face's ``BeamSearchScorer``): each step the 2 × beam
best continuations of a source's beams are ranked; an end of sequence among the best ``beam`` of them finishes
a hypothesis scored ``sum of log-probabilities / length ** length_penalty`` (GNMT / HF; length counts the
generated tokens, the end of sequence included), the others continue. When a source is done is ``stopping``'s:

- ``best`` (the default): its best finished hypothesis scores at least what its best running beam scores at
  its current length. Only the best hypothesis is returned, and a running beam that cannot (by this estimate)
  overtake it is not worth extending; this is in effect OpenNMT's rule (a source ends when its top candidate is
  an end of sequence), which decodes far fewer steps than waiting for ``beam`` finished hypotheses;
- ``beam``: it has ``beam`` finished hypotheses and its best running beam, at its current length, scores no
  better than the worst of them (HF's ``early_stopping=False``): a wide beam then searches more, e.g. every
  hypothesis when the beam holds them all.

Decoding stops when every source is done, or at ``max_length``, where the running beams are finished as they
are. Done sources leave the batch. Nothing is sampled; equal scores are ranked by index (lower beam, then lower
token id), so results are reproducible and beam=1 is greedy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from sora.models.transformer import DecoderCache

StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, DecoderCache | None], torch.Tensor]
NEG = float("-inf")
STOPPING = ("best", "beam")  # when a source's beam search ends (module docstring)


def banned_ngram_tokens(seq: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram of ``seq`` if they came next (``no_repeat_ngram``)."""
    if n <= 0 or len(seq) < n - 1:
        return []
    prefix = seq[len(seq) - n + 1 :] if n > 1 else []
    return [seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i : i + n - 1] == prefix]


def top_by_index(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best entries of each row of ``scores`` (R, N), best first, equal scores by lower index
    (``torch.topk`` leaves the order of ties, and which of them make the cut, unspecified).

    A row whose k-th best score is strictly above its (k+1)-th has one set of k best whatever the ties: its
    ``topk`` is only reordered. Rows tied across the cut (a tiny vocabulary's dead beams at -inf) take the
    exact path, which scans the whole row; beam search over a real vocabulary almost never needs it, and that
    scan (a cumulative sum over beam × vocab entries) was half of a beam step's time."""
    m = min(k + 1, scores.shape[-1])
    values, index = scores.topk(m, dim=-1)
    clear = values[:, k - 1] > values[:, k] if m > k else torch.ones_like(values[:, 0], dtype=torch.bool)
    index, by_index = index[:, :k].sort(dim=-1)
    values = values[:, :k].gather(1, by_index)
    order = values.argsort(dim=-1, descending=True, stable=True)
    values, index = values.gather(1, order), index.gather(1, order)
    if not bool(clear.all()):
        rows = (~clear).nonzero().squeeze(1)
        values[rows], index[rows] = _top_by_index_exact(scores[rows], k)
    return values, index


def _top_by_index_exact(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, _ = scores.topk(k, dim=-1)
    kth = values[:, -1:]
    above, tied = scores > kth, scores == kth
    room = k - above.sum(-1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(-1) <= room))  # the lowest-index ties fill what is left
    index = chosen.nonzero()[:, 1].view(-1, k)  # ascending per row
    values = scores.gather(1, index)
    order = values.argsort(dim=-1, descending=True, stable=True)
    return values.gather(1, order), index.gather(1, order)


def _log_probs(step: StepFn, prefix: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None,
               cache: DecoderCache | None, generated: list[list[int]], *, eos: int, never: list[int],
               min_length: int, no_repeat_ngram: int, normalize: bool = True) -> torch.Tensor:
    """Next-token log-probabilities (R, vocab) of each row, with the tokens it may not take at -inf;
    ``normalize=False``: the logits instead (greedy's argmax is the same, without a softmax over the vocabulary)."""
    ids = prefix[:, -1:] if cache is not None else prefix
    logp = step(ids, memory, memory_mask, cache)[:, -1].float()
    if normalize:
        logp = logp.log_softmax(-1)
    if never:
        logp[:, never] = NEG
    if len(generated[0]) < min_length:  # every row has generated as many tokens
        logp[:, eos] = NEG
    if no_repeat_ngram:
        rows = [(r, t) for r, seq in enumerate(generated) for t in banned_ngram_tokens(seq, no_repeat_ngram)]
        if rows:
            r, t = zip(*rows, strict=True)
            logp[list(r), list(t)] = NEG
    return logp


@torch.inference_mode()
def generate(step: StepFn, memory: torch.Tensor, memory_mask: torch.Tensor | None, bos: int, eos: int, pad: int, *,
             beam: int = 1, max_length: int, min_length: int = 0, length_penalty: float = 1.0,
             no_repeat_ngram: int = 0, use_cache: bool = True, stopping: str = "best") -> list[list[int]]:
    """Token ids decoded for each source (``memory`` (B, S, dim), ``memory_mask`` (B, S) or None), without
    ``bos`` and ``eos``: greedy when ``beam`` is 1, beam search otherwise (module docstring).

    ``max_length``: the most tokens generated per source, the end of sequence included (so an output has at most
    that many tokens). ``min_length``: no end of sequence before that many tokens. ``no_repeat_ngram`` n > 0: no
    n-gram occurs twice in an output. ``bos`` and ``pad`` are never generated. ``use_cache=False`` recomputes the
    whole prefix every step (the same result, slower: what the cache is tested against). ``stopping``: when a
    source's beam search ends, ``best`` or ``beam`` (module docstring)."""
    if beam < 1 or max_length < 1:
        raise ValueError(f"beam {beam} and max_length {max_length} must be at least 1")
    if stopping not in STOPPING:
        raise ValueError(f"stopping {stopping!r}: choose {' or '.join(STOPPING)}")
    if memory.shape[0] == 0:
        return []
    never = sorted({bos, pad} - {eos})
    common = dict(eos=eos, never=never, min_length=min_length, no_repeat_ngram=no_repeat_ngram)
    cache = DecoderCache() if use_cache else None
    if beam == 1:
        return _greedy(step, memory, memory_mask, bos, cache, max_length, common)
    return _beam_search(step, memory, memory_mask, bos, cache, beam, max_length, length_penalty, common, stopping)


def _greedy(step: StepFn, memory: torch.Tensor, memory_mask: torch.Tensor | None, bos: int,
            cache: DecoderCache | None, max_length: int, common: dict) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(memory.shape[0])]
    for added in _greedy_steps(step, memory, memory_mask, bos, cache, max_length, common):
        for source, token in added:
            out[source].append(token)
    return out


@torch.inference_mode()
def greedy_stream(step: StepFn, memory: torch.Tensor, memory_mask: torch.Tensor | None, bos: int, eos: int,
                  pad: int, *, max_length: int, min_length: int = 0, no_repeat_ngram: int = 0,
                  use_cache: bool = True) -> Iterator[list[tuple[int, int]]]:
    """Greedy decoding one step at a time, for streaming: each step yields the (source, token) pairs it added
    (sources that ended are not in it). A source's tokens in order are its ``generate(beam=1)`` output."""
    if max_length < 1:
        raise ValueError(f"max_length {max_length} must be at least 1")
    if memory.shape[0] == 0:
        return
    never = sorted({bos, pad} - {eos})
    common = dict(eos=eos, never=never, min_length=min_length, no_repeat_ngram=no_repeat_ngram)
    yield from _greedy_steps(step, memory, memory_mask, bos, DecoderCache() if use_cache else None, max_length,
                             common)


def _greedy_steps(step: StepFn, memory: torch.Tensor, memory_mask: torch.Tensor | None, bos: int,
                  cache: DecoderCache | None, max_length: int, common: dict) -> Iterator[list[tuple[int, int]]]:
    eos = common["eos"]
    out: list[list[int]] = [[] for _ in range(memory.shape[0])]  # what each source has so far (no-repeat n-grams)
    rows = list(range(memory.shape[0]))  # the sources still decoding, in batch order
    prefix = torch.full((len(rows), 1), bos, dtype=torch.long, device=memory.device)
    for _ in range(max_length):
        logits = _log_probs(step, prefix, memory, memory_mask, cache, [out[r] for r in rows], **common,
                            normalize=False)
        best = logits.argmax(-1)  # the first of equal maxima
        tokens = best.tolist()
        going = [i for i, t in enumerate(tokens) if t != eos]
        for i in going:
            out[rows[i]].append(tokens[i])
        if going:
            yield [(rows[i], tokens[i]) for i in going]
        if not going:
            break
        if len(going) < len(rows):
            index = torch.tensor(going, device=memory.device)
            rows = [rows[i] for i in going]
            prefix, best, memory = prefix[index], best[index], memory[index]
            memory_mask = None if memory_mask is None else memory_mask[index]
            if cache is not None:
                cache.reorder(index)
        prefix = torch.cat([prefix, best[:, None]], dim=1)


class _Finished:
    """A source's best ``beam`` finished hypotheses."""

    def __init__(self, beam: int, length_penalty: float):
        self.beam, self.length_penalty = beam, length_penalty
        self.hyps: list[tuple[float, list[int]]] = []

    def add(self, tokens: list[int], score: float, length: int) -> None:
        scored = score / length**self.length_penalty
        if score != NEG and (len(self.hyps) < self.beam or scored > self.worst):
            self.hyps.append((scored, tokens))
            self.hyps.sort(key=lambda h: -h[0])  # stable: of equal scores the first found stays ahead
            del self.hyps[self.beam :]

    @property
    def worst(self) -> float:
        return self.hyps[-1][0] if self.hyps else NEG

    def done(self, best_running: float, length: int, stopping: str) -> bool:
        reach = best_running / length**self.length_penalty
        if stopping == "best":
            return bool(self.hyps) and self.hyps[0][0] >= reach
        return len(self.hyps) >= self.beam and self.worst >= reach


def _beam_search(step: StepFn, memory: torch.Tensor, memory_mask: torch.Tensor | None, bos: int,
                 cache: DecoderCache | None, beam: int, max_length: int, length_penalty: float,
                 common: dict, stopping: str = "best") -> list[list[int]]:
    eos, device = common["eos"], memory.device
    finished = [_Finished(beam, length_penalty) for _ in range(memory.shape[0])]
    sources = list(range(memory.shape[0]))  # still decoding; row s * beam + k of the batch is beam k of source s
    memory = memory.repeat_interleave(beam, dim=0)
    memory_mask = None if memory_mask is None else memory_mask.repeat_interleave(beam, dim=0)
    # All beams start as the same bos: only the first may be extended at the first step.
    scores = torch.full((len(sources), beam), NEG, device=device)
    scores[:, 0] = 0.0
    prefix = torch.full((len(sources) * beam, 1), bos, dtype=torch.long, device=device)
    generated: list[list[int]] = [[] for _ in range(len(sources) * beam)]
    for length in range(1, max_length + 1):  # tokens generated once this step is done
        logp = _log_probs(step, prefix, memory, memory_mask, cache, generated, **common)
        vocab = logp.shape[-1]
        total = (logp + scores.view(-1, 1)).view(len(sources), beam * vocab)
        top, index = top_by_index(total, 2 * beam)
        going: dict[int, list[tuple[int, int, float]]] = {}  # source -> its beams' (parent row, token, score)
        for a, (values, flats) in enumerate(zip(top.tolist(), index.tolist(), strict=True)):
            source, chosen = sources[a], []
            for rank, (value, flat) in enumerate(zip(values, flats, strict=True)):
                if value == NEG:
                    break
                row, token = a * beam + flat // vocab, flat % vocab
                if token != eos:
                    chosen.append((row, token, value))
                elif rank < beam:  # an end of sequence outside the best ``beam`` finishes nothing
                    finished[source].add(generated[row], value, length)
                if len(chosen) == beam:
                    break
            if chosen and not finished[source].done(chosen[0][2], length, stopping):
                # Fewer possible continuations than beams (a tiny vocabulary): dead beams fill up.
                going[source] = chosen + [(a * beam, eos, NEG)] * (beam - len(chosen))
        if length == max_length or not going:
            for source, chosen in going.items():  # the running beams end as they are
                for row, token, value in chosen:
                    finished[source].add(generated[row] + [token], value, length)
            break
        picked = [c for chosen in going.values() for c in chosen]
        index_t = torch.tensor([row for row, _, _ in picked], device=device)
        dropped = len(going) < len(sources)
        generated = [generated[row] + [token] for row, token, _ in picked]
        prefix = torch.cat([prefix[index_t], torch.tensor([t for _, t, _ in picked], device=device)[:, None]], 1)
        if dropped:
            memory = memory[index_t]
            memory_mask = None if memory_mask is None else memory_mask[index_t]
        if cache is not None:
            cache.reorder(index_t, memory=dropped)  # beams move only among copies of their source's memory
        sources = list(going)
        scores = torch.tensor([v for _, _, v in picked], device=device).view(len(sources), beam)
    return [f.hyps[0][1] if f.hyps else [] for f in finished]

