"""Packed documents under context parallel: where each document starts, how a sequence's tokens
are dealt to the cp ranks (the load balancers), and the ``DocumentMask`` the attention reads.

Documents are delimited by the tokenizer's EOS, as TorchTitan 0.2.2's ``get_document_mask_mod``
does (``document_starts``). A sequence of ``S`` tokens is dealt to ``cp`` ranks by a permutation
of its positions (``layout``), the same one for the inputs, the labels, the RoPE positions and
the document starts, so the boundaries travel with the tokens; rank ``c`` keeps the ``c``-th of
``cp`` equal slices of the permuted sequence, as torch's ``_context_parallel_shard`` does.

Load balancers (``parallelism.context_parallel_load_balancer``), torch's own orderings and one
of ours:

- ``"headtail"``: torch's ``_HeadTailLoadBalancer`` (rank c: chunks c and 2cp-1-c of 2cp),
  which balances a causal mask; blind to documents.
- ``None``: contiguous slices.
- ``"per_document_headtail"``: torch's ``_PerDocumentHeadTailLoadBalancer`` (head-tail inside
  each document). torch needs every document's length to be a multiple of 2cp; here the
  balancer runs on the document boundaries rounded to multiples of 2cp x
  ``PER_DOCUMENT_GRANULE`` tokens (short documents travel with a neighbour; the mask itself
  stays exact: only which rank holds a token changes).
- ``"ptrr"``: torch's processing-time round-robin (``_PTRRLoadBalancer.ptrr_scheduling``) over
  equal blocks of the sequence, each weighted by the mask's work in it (the pairs its queries
  attend): balances the masked work, whatever the documents. torch's own PTRR balancer needs a
  FlexAttention ``BlockMask``; only its scheduling is used here.
- ``"per_document_lpt"`` (ours): head-tail inside a document only over as many ranks as its
  work needs, short documents whole on one rank, dealt longest first to the least-loaded ranks
  (LPT, longest processing time first: Graham 1969), then equal token counts swapped between
  the busiest and the idlest rank until the work is even. It balances the work as
  ``per_document_headtail`` does with a few long pieces per rank instead of 2 cp short chunks
  of every document (``_per_document_lpt``), so with short documents it makes far fewer and
  larger kernel calls (docs/context_parallel.md: the time it buys). It is no torch ordering:
  the permutation travels as every other does.

The attention needs, for a (query block, key block) pair, the global positions of both and the
document starts of the queries (``block_causal``); each rank keeps them for every cp rank
(``DocumentMask``: 2 x B x S int64, 16 MiB for 1M tokens), so a key block that arrives by the
ring is described without sending anything.
"""

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.distributed.tensor.experimental._attention import (
    _HeadTailLoadBalancer,
)
from torch.distributed.tensor.experimental._context_parallel._load_balancer import (
    _PerDocumentHeadTailLoadBalancer,
    _PTRRLoadBalancer,
)

ATTN_MASK_TYPES = ("causal", "block_causal")
"""Values of ``model.attn_mask_type`` ("" keeps the flavor's)."""

BALANCERS = ("headtail", "per_document_headtail", "per_document_lpt", "ptrr", None)
"""Values of ``parallelism.context_parallel_load_balancer`` with ``block_causal``."""

PER_DOCUMENT_GRANULE = 1
"""``per_document_headtail`` cuts documents into chunks of a multiple of this many tokens
(rounding the boundaries it balances on; the mask stays exact): shorter chunks cost more
kernel calls than the balance they buy."""

PTRR_BLOCKS_PER_RANK = 16
"""Blocks each rank gets from ``ptrr`` at most (fewer when the sequence does not divide)."""


class DocumentMask(NamedTuple):
    """The document layout of one microbatch over its cp ranks, passed to the model as
    ``attention_masks`` (a NamedTuple of (B, ...) tensors: pipeline parallel splits it into
    pipeline microbatches along dim 0, as it splits the inputs).

    Attributes:
        positions: (B, cp, S / cp) int64: the global positions held by each cp rank, in the
            order that rank holds them (ascending within each rank).
        starts: (B, cp, S / cp) int64: the first position of each of those tokens' document.
    """

    positions: torch.Tensor
    starts: torch.Tensor

    @classmethod
    def of(cls, starts: torch.Tensor, perm: torch.Tensor, cp: int) -> "DocumentMask":
        """The mask of a layout: ``starts`` (B, S) from ``document_starts``, ``perm`` (B, S)
        from ``layout`` over ``cp`` ranks."""
        b, s = perm.shape
        return cls(perm.reshape(b, cp, s // cp), starts.gather(1, perm).reshape(b, cp, s // cp))


def document_starts(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, S) int64: the first position of each token's document; a document ends with its
    EOS token (``get_document_mask_mod``'s convention: the EOS belongs to the document it
    closes).

    Args:
        inputs: (B, S) int64 token ids.
        eos_id: the tokenizer's EOS id.
    """
    s = inputs.shape[1]
    idx = torch.arange(s, device=inputs.device).expand(inputs.shape)
    last_eos = torch.where(inputs == eos_id, idx, -1).cummax(dim=1).values
    starts = torch.zeros_like(idx)
    starts[:, 1:] = last_eos[:, :-1] + 1
    return starts


def _work(starts: torch.Tensor) -> torch.Tensor:
    """(B, S) int64: keys each query attends (position - document start + 1)."""
    return torch.arange(starts.shape[1], device=starts.device) - starts + 1


def layout(starts: torch.Tensor, cp: int, balancer: str | None) -> torch.Tensor:
    """(B, S) int64 permutation of the positions: rank c keeps slice c of ``cp``.

    Args:
        starts: (B, S) from ``document_starts``.
        cp: the cp degree (S must be a multiple of 2 cp).
        balancer: one of ``BALANCERS``.

    Raises:
        ValueError: an unknown balancer.
    """
    b, s = starts.shape
    device = starts.device
    if balancer is None or cp == 1:
        return torch.arange(s, device=device).expand(b, s)
    if balancer == "headtail":
        idx: Any = _HeadTailLoadBalancer(s, cp, device)._generate_indices()
        return idx.expand(b, s)
    if balancer == "per_document_headtail":
        return torch.stack([_per_document(row, cp) for row in starts])
    if balancer == "ptrr":
        return torch.stack([_ptrr(row, cp) for row in starts])
    if balancer == "per_document_lpt":
        return torch.stack([_per_document_lpt(row, cp) for row in starts])
    raise ValueError(f"unknown context-parallel load balancer {balancer!r}")


def _per_document(starts: torch.Tensor, cp: int) -> torch.Tensor:
    """torch's per-document head-tail on one row, documents rounded to multiples of 2 cp,
    rank by rank.

    torch 2.13's ``_PerDocumentHeadTailLoadBalancer._generate_indices`` lists each document's
    chunks rank by rank inside the document (doc 0: rank 0's head and tail, rank 1's, ...;
    then doc 1), while ``_context_parallel_shard`` gives rank r the r-th contiguous slice of the
    rearranged sequence: rank 0 would get all of the first documents, not its head and tail of
    each (e.g. documents [4, 8, 4] on 2 ranks: rank 0 gets positions 0 3 1 2 4 5 10 11, not
    the documented 0 3 4 5 10 11 12 15). The chunks are regrouped here by rank, each rank's in
    torch's order.
    """
    s = starts.shape[0]
    unit = 2 * cp * max(1, min(PER_DOCUMENT_GRANULE, s // (2 * cp)))
    bounds = sorted({round(int(x) / unit) * unit for x in starts.unique().tolist()} | {s})
    lengths = [b - a for a, b in zip([0, *bounds], bounds, strict=False) if b > a]
    balancer: Any = _PerDocumentHeadTailLoadBalancer([lengths], cp, starts.device)
    idx = balancer._generate_indices()[0]
    # Each document's segment of torch's list is its 2 cp chunks, two per rank, rank by rank.
    rank = torch.cat([torch.arange(n, device=starts.device) // (n // cp) for n in lengths])
    return idx[torch.sort(rank, stable=True).indices]


def _ptrr(starts: torch.Tensor, cp: int) -> torch.Tensor:
    """torch's PTRR scheduling of equal blocks of one row, weighted by their masked work."""
    s = starts.shape[0]
    per_rank = next(m for m in range(PTRR_BLOCKS_PER_RANK, 0, -1) if s % (cp * m) == 0)
    blocks = cp * per_rank
    work = _work(starts[None])[0].reshape(blocks, s // blocks).sum(dim=1)
    groups = _PTRRLoadBalancer.ptrr_scheduling(work.double(), cp)  # (cp, per_rank), sorted
    block_pos = torch.arange(s, device=starts.device).reshape(blocks, s // blocks)
    return block_pos[groups.flatten()].flatten()


LPT_SHARE = 0.5
"""``per_document_lpt`` spreads a document over the fewest ranks that keep each rank's part of
its work within this fraction of a rank's even share of the sequence's work (first try; halved
while the work does not even out within ``LPT_BALANCE``). Measured with the kernels
scripts/bench_doc_mask.py times, measured / ideal at 16K tokens, cp 8, documents of mean S/32
(the hardest cell), three sweeps: 0.5: 1.26-1.29; 2: 1.25-1.45; 1: 1.35-1.43; 0.25:
1.38-1.43; 0.125: 1.60. At 16K and 32K, cp 4 and 8, S/8 and S/32 elsewhere the shares were
within the noise (about 0.05) of each other, 0.125 the slowest."""

LPT_BALANCE = 1.02
"""``per_document_lpt``'s aim for the work's max/min over the cp ranks."""

LPT_CANDIDATES = 128
"""Pieces a side ``per_document_lpt`` weighs per swap when it evens the work out."""


def _tri(a: int, b: int) -> int:
    """Sum of (i + 1) for i in [a, b): the keys the queries at document offsets [a, b) attend."""
    return (b * (b + 1) - a * (a + 1)) // 2


Piece = tuple[int, int, int]
"""(first position of the document, first offset in it, end offset): a run of one document's
consecutive tokens that one rank holds."""


def _lpt_pieces(
    docs: list[tuple[int, int]], cp: int, n: int, share: float
) -> tuple[list[list[Piece]], list[int]]:
    """The pieces of each rank and its work for one ``share`` (``_per_document_lpt``)."""
    pieces: list[list[Piece]] = [[] for _ in range(cp)]
    work = [0] * cp
    room = [n] * cp
    even = sum(_tri(0, length) for _, length in docs) / cp

    def put(r: int, a: int, o0: int, o1: int) -> None:
        pieces[r].append((a, o0, o1))
        work[r] += _tri(o0, o1)
        room[r] -= o1 - o0

    for a, length in sorted(docs, key=lambda d: (-d[1], d[0])):
        k = min(cp, max(1, math.ceil(_tri(0, length) / (share * even))), length // 2 or 1)
        cut = [length * i // (2 * k) for i in range(2 * k + 1)]
        need = max(cut[i + 1] - cut[i] + cut[2 * k - i] - cut[2 * k - 1 - i] for i in range(k))
        fit = [r for r in sorted(range(cp), key=lambda r: (work[r], r)) if room[r] >= need][:k]
        if len(fit) == k:
            for j, r in enumerate(fit):
                for i in (j, 2 * k - 1 - j):
                    put(r, a, cut[i], cut[i + 1])
            continue
        done = 0  # no room for it whole: cut in order into the least-loaded ranks with room
        while done < length:
            r = min((r for r in range(cp) if room[r] > 0), key=lambda r: (work[r], r))
            take = min(room[r], length - done)
            put(r, a, done, done + take)
            done += take
    _even_out(pieces, work)
    return pieces, work


def _even_out(pieces: list[list[Piece]], work: list[int], rounds: int = 64) -> None:
    """Swaps equal token counts between the most and the least loaded ranks until their work
    is within ``LPT_BALANCE``: the end of a piece of the loaded rank (late in its document: much
    work per token) for the start of a piece of the other (less work per token), the pair and
    the count chosen to move half the difference (among ``LPT_CANDIDATES`` pieces a side).
    Token counts per rank are kept."""
    cp = len(work)
    for _ in range(rounds):
        h = max(range(cp), key=lambda r: (work[r], -r))
        lo = min(range(cp), key=lambda r: (work[r], r))
        gap = work[h] - work[lo]
        if work[h] <= LPT_BALANCE * work[lo]:
            return
        xs = _spread_pick(sorted(range(len(pieces[h])), key=lambda i: pieces[h][i][2]))
        ys = _spread_pick(sorted(range(len(pieces[lo])), key=lambda j: pieces[lo][j][1]))
        px, py = np.array([pieces[h][i] for i in xs]), np.array([pieces[lo][j] for j in ys])
        e = px[:, 2, None] - py[None, :, 1]  # moving t tokens moves t (e - t) pairs to lo
        root = np.sqrt(np.maximum(e * e - 2.0 * gap, 0.0))
        t = np.floor((e - root) / 2)
        cap = np.minimum((px[:, 2] - px[:, 1])[:, None], (py[:, 2] - py[:, 1])[None, :])
        t = np.clip(t, 1, cap).astype(np.int64)
        moved = t * (e - t)
        score = np.where((moved > 0) & (moved < gap), np.abs(moved - gap / 2), np.inf)
        i, j = np.unravel_index(int(np.argmin(score)), score.shape)
        if not np.isfinite(score[i, j]):
            return
        size, xi, yj = int(t[i, j]), xs[i], ys[j]
        (ax, ox, ex), (ay, oy, ey) = pieces[h][xi], pieces[lo][yj]
        pieces[h][xi], pieces[lo][yj] = (ax, ox, ex - size), (ay, oy + size, ey)
        pieces[h].append((ay, oy, oy + size))
        pieces[lo].append((ax, ex - size, ex))
        pieces[h] = [p for p in pieces[h] if p[2] > p[1]]
        pieces[lo] = [p for p in pieces[lo] if p[2] > p[1]]
        work[h] -= int(moved[i, j])
        work[lo] += int(moved[i, j])


def _spread_pick(order: list[int]) -> list[int]:
    """At most ``LPT_CANDIDATES`` of ``order``, evenly spaced (its ends included)."""
    if len(order) <= LPT_CANDIDATES:
        return order
    return [order[i] for i in np.linspace(0, len(order) - 1, LPT_CANDIDATES).round().astype(int)]


def _per_document_lpt(starts: torch.Tensor, cp: int) -> torch.Tensor:
    """``per_document_lpt`` on one row: (S,) int64 permutation, rank c's positions in slice c,
    ascending.

    1. Each document, longest first, goes head-tail (2k chunks, rank j of k holding chunks j
       and 2k-1-j, as torch's head-tail does for the whole sequence) over the k least-loaded
       ranks with room for it, k the fewest that keep each rank's part of its work within
       ``LPT_SHARE`` of a rank's even share: short documents stay whole (k = 1). A document
       with no k ranks of room is cut in order into the least-loaded ranks that have room, so
       every rank ends with S / cp tokens.
    2. ``_even_out`` swaps equal token counts between the busiest and the idlest rank.
    3. If the work is still uneven beyond ``LPT_BALANCE``, the share halves (more ranks per
       document, nearer ``per_document_headtail``); the most even layout tried is kept.

    Deterministic (ties go to the lower rank), so every cp rank computes the same layout.

    Args:
        starts: (S,) int64, ``document_starts`` of one row.
        cp: the cp degree (S a multiple of cp).
    """
    s = starts.shape[0]
    n = s // cp
    firsts = starts.unique().tolist()
    docs = [(a, b - a) for a, b in zip(firsts, [*firsts[1:], s], strict=True)]
    best: tuple[float, list[list[Piece]]] | None = None
    share = LPT_SHARE
    for _ in range(6):
        pieces, work = _lpt_pieces(docs, cp, n, share)
        spread = max(work) / max(1, min(work))
        if best is None or spread < best[0]:
            best = (spread, pieces)
        if spread <= LPT_BALANCE:
            break
        share /= 2
    assert best is not None
    ranks = [torch.cat([torch.arange(a + o0, a + o1) for a, o0, o1 in sorted(p)]) for p in best[1]]
    return torch.cat(ranks).to(starts.device)


def shard_documents(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    eos_id: int,
    cp: int,
    rank: int,
    balancer: str | None,
    restart_positions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DocumentMask]:
    """This cp rank's part of a microbatch of packed documents.

    Args:
        inputs, labels: (B, S) int64, the same on every cp rank.
        eos_id: the tokenizer's EOS id.
        cp, rank: the cp degree and this rank's index in the cp group (cp 1: no CP).
        balancer: one of ``BALANCERS``.
        restart_positions: RoPE positions restart at 0 at each document start (the mask uses
            the global positions either way).

    Returns:
        (inputs, labels, RoPE positions, each (B, S / cp); the ``DocumentMask``).
    """
    s = inputs.shape[1]
    starts = document_starts(inputs, eos_id)
    perm = layout(starts, cp, balancer)
    n = s // cp
    mine = perm[:, rank * n : (rank + 1) * n]
    mask = DocumentMask.of(starts, perm, cp)
    rope = mine - starts.gather(1, mine) if restart_positions else mine
    return inputs.gather(1, mine), labels.gather(1, mine), rope.to(torch.int32), mask


def work_per_rank(mask: DocumentMask) -> torch.Tensor:
    """(cp,) int64: the (query, key) pairs each cp rank's queries attend under the mask,
    summed over the batch (the masked attention work, per head)."""
    return (mask.positions - mask.starts + 1).sum(dim=(0, 2))


def masked_fraction(offsets: np.ndarray, seq_len: int, windows: int = 1024, seed: int = 0) -> float:
    """The share of the causal mask's (query, key) pairs that block_causal keeps, for windows
    of ``seq_len`` tokens of a stream of documents: sum over the document pieces of a window of
    l (l + 1) / 2, over S (S + 1) / 2, averaged over ``windows`` windows at random starts (all
    of them when the stream has fewer). What the attention's FLOPs shrink by (the dry run and
    the planner's estimate; the ring's bytes do not shrink).

    Args:
        offsets: (n_docs + 1,) int64 document offsets of the token stream (ascending, from 0).
        seq_len: tokens per window.
        windows, seed: the sample.

    Returns:
        A fraction in (0, 1]; 1.0 for a stream shorter than one window.
    """
    total = int(offsets[-1])
    if total <= seq_len:
        return 1.0
    rng = np.random.default_rng(seed)
    n = min(windows, total - seq_len)
    starts = rng.choice(total - seq_len, size=n, replace=False)
    causal = seq_len * (seq_len + 1) / 2
    kept = 0.0
    for a in starts.tolist():
        b = a + seq_len
        first = int(np.searchsorted(offsets, a, side="right"))
        last = int(np.searchsorted(offsets, b, side="left"))
        cuts = np.concatenate([[a], np.asarray(offsets[first:last], np.int64), [b]])
        lengths = np.diff(cuts)
        kept += float((lengths * (lengths + 1) / 2).sum())
    return kept / (n * causal)
