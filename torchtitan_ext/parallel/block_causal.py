"""Block-causal (document-masked) attention between any query rows and key rows of one packed
sequence: the kernel every context-parallel pattern calls for a (query block, key block) pair.

Packed documents: a sequence of ``S`` tokens holds several documents, each ended by the
tokenizer's EOS (TorchTitan 0.2.2's ``get_document_mask_mod`` convention: a token belongs to the
document its EOS closes; the last token closes one too). Query position ``i`` attends key
position ``j`` iff ``start(i) <= j <= i``, ``start(i)`` being the first position of ``i``'s
document: causal attention inside each document (Llama 3, arXiv 2407.21783, section 3.2;
ProLong, arXiv 2410.02660). Only the query side's document start is needed, so a key block is
described by its positions alone.

A pair's work is cut into tiles (``tiles``). Query rows are first cut into segments of
consecutive positions in one document; neighbouring segments both shorter than ``min_rows``
(tiny documents, or the small chunks a per-document layout deals) are joined into one tile,
and a tile has at most ``max_rows`` rows. A tile's rows need only the keys in ``[start of its
first row, position of its last row]``; with key positions sorted, that is one slice of the
key block (a bisection), often empty (no document in common, or all keys in the future):
skipped, no kernel call. A slice whose positions jump (a per-document layout holds a
document's chunk ``i`` and chunk ``2cp - 1 - i``) is cut into its runs when each has at least
``min_keys`` keys. Each call then runs unmasked where every key is visible, with the kernel's
own causal mask (which skips the upper triangle) where its keys end on its rows' diagonal,
and with the exact mask otherwise. So the work is the mask's own at tile granularity: per
document, not per (query block, key block). Each tile costs a kernel call and a merge: at
chunks of a few dozen tokens that fixed cost, not the FLOPs, sets the time (docs: the
per-document LPT balancer keeps short documents whole and is the faster balancer there).

Kernels (the fastest exact op torch has that returns the logsumexp and takes a mask):
CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` with a float mask (supports GQA);
CUDA: ``aten._scaled_dot_product_efficient_attention`` with an additive bias (K/V heads
repeated for GQA). Results of several pairs merge by logsumexp (``merge``), as torch's
``_SDPAMerger`` does, with rows a pair does not reach (logsumexp -inf) left as they were.
"""

import bisect
import itertools
from dataclasses import dataclass

import torch

from torchtitan_ext.parallel.cp_ulysses import _replicate_kv, _unreplicate_grad

aten = torch.ops.aten

MAX_ROWS = 2048
"""Query rows per kernel call at most (the mask of one call is ``MAX_ROWS`` x key-slice fp32)."""
MIN_ROWS = 32
"""Neighbouring query segments (consecutive positions of one document) both shorter than this
share one tile (tiny documents, or the small chunks a per-document layout deals: one call and
its mask instead of several)."""
MIN_KEYS = 64
"""A key slice with position jumps is cut into its runs of consecutive positions (each then
runs unmasked or causal where it can) only when every run has this many keys; fewer: one
masked call is cheaper than several small ones."""


@dataclass(frozen=True)
class Tile:
    """Query rows ``[q0, q1)`` of batch row ``b`` and the key rows ``[k0, k1)`` they may see,
    and how the kernel runs them: ``"full"`` (every pair visible: no mask), ``"causal"``
    (the same positions on both sides, one document: the kernel's own causal mask, which
    skips the upper triangle) or ``"mask"`` (an explicit mask)."""

    b: int
    q0: int
    q1: int
    k0: int
    k1: int
    mode: str

    @property
    def full(self) -> bool:
        return self.mode == "full"


def tiles(
    q_pos: torch.Tensor,
    q_start: torch.Tensor,
    kv_pos: torch.Tensor,
    max_rows: int = MAX_ROWS,
    min_rows: int = MIN_ROWS,
    min_keys: int = MIN_KEYS,
) -> list[Tile]:
    """The kernel calls of a (query block, key block) pair, empty ones left out.

    Args:
        q_pos: (B, Sq) int64 global positions of the query rows (any order; each ascending
            run is tiled on its own).
        q_start: (B, Sq) int64 first position of each query row's document.
        kv_pos: (B, Sk) int64 global positions of the key rows, ascending within each of
            its runs of ascending positions (each is searched on its own).
        max_rows, min_rows, min_keys: tile sizes (module doc).

    Returns:
        The tiles, in row order; a tile with a key slice from each ascending run of
        ``kv_pos`` it reaches.
    """
    out: list[Tile] = []
    for b in range(q_pos.shape[0]):
        qp, qs, kp = q_pos[b].tolist(), q_start[b].tolist(), kv_pos[b].tolist()
        segs = _ascending_runs(kv_pos[b])
        for q0, q1 in _row_tiles(q_pos[b], q_start[b], max_rows, min_rows):
            lo, hi = qs[q0], qp[q1 - 1]
            for s0, s1 in segs:
                k0 = bisect.bisect_left(kp, lo, s0, s1)
                k1 = bisect.bisect_right(kp, hi, s0, s1)
                if k1 > k0:
                    out.extend(_calls(b, q0, q1, k0, k1, qp, qs, kp, min_keys))
    return out


def _calls(
    b: int,
    q0: int,
    q1: int,
    k0: int,
    k1: int,
    qp: list[int],
    qs: list[int],
    kp: list[int],
    min_keys: int,
) -> list[Tile]:
    """The kernel calls of one tile's rows over the key slice ``[k0, k1)`` (in ``tiles``)."""
    # Fully visible: every key is at or before the first row and at or after the last row's
    # document start (starts ascend within a run of rows).
    if kp[k1 - 1] <= qp[q0] and kp[k0] >= qs[q1 - 1]:
        return [Tile(b, q0, q1, k0, k1, "full")]
    rows = q1 - q0
    if qs[q0] == qs[q1 - 1] and qp[q1 - 1] - qp[q0] == rows - 1:
        # One document, consecutive positions: cut the keys at their position jumps (a
        # per-document layout deals a document's chunks apart), if the runs are not tiny.
        jumps = [i for i in range(k0 + 1, k1) if kp[i] != kp[i - 1] + 1]
        cuts = [k0, *jumps, k1]
        runs = list(itertools.pairwise(cuts))
        if len(runs) > 1 and min(e - s for s, e in runs) >= min_keys:
            return [t for s, e in runs for t in _calls(b, q0, q1, s, e, qp, qs, kp, min_keys)]
        # The rows' own positions end a run of consecutive keys: the keys before them are
        # visible, the last ``rows`` keys are the causal diagonal.
        if len(runs) == 1 and kp[k1 - 1] == qp[q1 - 1] and k1 - k0 >= rows:
            kd = k1 - rows
            before = [Tile(b, q0, q1, k0, kd, "full")] if kd > k0 else []
            return [*before, Tile(b, q0, q1, kd, k1, "causal")]
    return [Tile(b, q0, q1, k0, k1, "mask")]


def _ascending_runs(x: torch.Tensor) -> list[tuple[int, int]]:
    """``[start, end)`` of the ascending runs of ``x`` (1-D int64): split where it descends."""
    cuts = (torch.nonzero(x[1:] < x[:-1]).flatten() + 1).tolist()
    return list(itertools.pairwise([0, *cuts, x.numel()]))


def _row_tiles(
    qp: torch.Tensor, qs: torch.Tensor, max_rows: int, min_rows: int
) -> list[tuple[int, int]]:
    """Split query rows (1-D int64 positions ``qp`` and document starts ``qs``) into segments
    of consecutive positions in one document, join neighbouring segments that are both
    shorter than ``min_rows`` (tiny documents, a per-document layout's small chunks; never
    where positions descend, and never a short segment onto a long one, which keeps its
    unmasked or causal calls), and cut every ``max_rows``."""
    n = qp.numel()
    if n == 0:
        return []
    descend = set((torch.nonzero(qp[1:] < qp[:-1]).flatten() + 1).tolist())
    soft = (qp[1:] != qp[:-1] + 1) | (qs[1:] != qs[:-1])
    cuts = sorted(descend | set((torch.nonzero(soft).flatten() + 1).tolist()))
    joined: list[tuple[int, int]] = []
    for a, e in itertools.pairwise([0, *cuts, n]):
        if joined and a not in descend and max(joined[-1][1] - joined[-1][0], e - a) < min_rows:
            joined[-1] = (joined[-1][0], e)
        else:
            joined.append((a, e))
    return [(i, min(i + max_rows, e)) for a, e in joined for i in range(a, e, max_rows)]


def _mask(
    tile: Tile, q_pos: torch.Tensor, q_start: torch.Tensor, kv_pos: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(additive mask (1, 1, rows, keys) of 0 / -inf, or None for a full or causal tile; bool
    (rows,) true for rows that see no key of the tile, or None for a full or causal tile)."""
    if tile.mode != "mask":
        return None, None
    qp = q_pos[tile.b, tile.q0 : tile.q1, None]
    qs = q_start[tile.b, tile.q0 : tile.q1, None]
    kp = kv_pos[tile.b, None, tile.k0 : tile.k1]
    visible = (kp <= qp) & (kp >= qs)
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    bias.masked_fill_(~visible, float("-inf"))
    return bias[None, None], ~visible.any(dim=1)


def _gqa(kv: torch.Tensor, heads: int) -> torch.Tensor:
    """K/V repeated to the query heads (the efficient kernel has no GQA)."""
    return _replicate_kv(kv, heads, heads)


def _tile_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (1, H, rows, D) in q's dtype, logsumexp (1, H, rows) fp32) of one tile."""
    if q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=bias, scale=scale
        )
        return out, lse
    heads = q.shape[1]
    out, lse, _, _ = aten._scaled_dot_product_efficient_attention(
        q, _gqa(k, heads), _gqa(v, heads), _cuda_bias(bias, q, k), True, 0.0, causal, scale=scale
    )
    return out, lse[..., : q.shape[2]]


def _cuda_bias(bias: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    if bias is None:
        return None
    return bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _tile_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of one tile, against the attention's final ``out`` and ``lse``."""
    if q.device.type == "cpu":
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, attn_mask=bias, scale=scale
        )
        return dq, dk, dv
    heads, kv_heads = q.shape[1], k.shape[1]
    ke, ve = _gqa(k, heads), _gqa(v, heads)
    pad = (-q.shape[2]) % 32  # the efficient kernel's logsumexp is padded to 32 rows
    lse_p = torch.nn.functional.pad(lse, (0, pad), value=float("inf")) if pad else lse
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        dout, q, ke, ve, _cuda_bias(bias, q, k), out, lse_p, seed, seed, 0.0,
        [True, True, True, False], causal, scale=scale,
    )  # fmt: skip
    return dq, _unreplicate_grad(dk, kv_heads), _unreplicate_grad(dv, kv_heads)


def merge(
    acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> None:
    """Fold a partial result into the accumulators, in place (online softmax, as torch's
    ``_SDPAMerger``; rows whose logsumexp is -inf on both sides stay as they are).

    The new result's weight is ``sigmoid(lse - acc_lse)`` = exp(lse) / (exp(acc_lse) +
    exp(lse)), and the output moves toward it by that weight (``lerp``): five small ops.

    Args:
        acc_out: (..., rows, D) fp32; acc_lse: (..., rows) fp32, -inf where nothing yet.
        out: (..., rows, D); lse: (..., rows) fp32, -inf for rows the part does not reach.
    """
    weight = torch.sigmoid(lse - acc_lse).nan_to_num_(0.0)  # nan: -inf on both sides
    acc_out.lerp_(out.float(), weight.unsqueeze(-1))
    torch.logaddexp(acc_lse, lse, out=acc_lse)


def attend(
    acc_out: torch.Tensor,
    acc_lse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    q_start: torch.Tensor,
    kv_pos: torch.Tensor,
    scale: float,
    calls: list[Tile] | None = None,
) -> int:
    """Block-causal attention of the query rows over one key block, merged into the
    accumulators.

    Args:
        acc_out: (B, H, Sq, D) fp32 accumulator; acc_lse: (B, H, Sq) fp32 (-inf: nothing yet).
        q: (B, H, Sq, D); k, v: (B, H_kv, Sk, D), H a multiple of H_kv (GQA), any float dtype.
        q_pos, q_start: (B, Sq) int64 positions and document starts of the query rows.
        kv_pos: (B, Sk) int64 positions of the key rows (ascending runs).
        scale: the softmax scale (1 / sqrt(D) by default in SDPA).
        calls: ``tiles(q_pos, q_start, kv_pos)`` when the caller has them (the backward
            reuses the forward's); computed here otherwise.

    Returns:
        The (query, key) pairs the kernel calls compute (per head): the work done.
    """
    work = 0
    for t in tiles(q_pos, q_start, kv_pos) if calls is None else calls:
        bias, empty = _mask(t, q_pos, q_start, kv_pos, q.dtype)
        b, rows, keys = slice(t.b, t.b + 1), slice(t.q0, t.q1), slice(t.k0, t.k1)
        causal = t.mode == "causal"
        out, lse = _tile_forward(q[b, :, rows], k[b, :, keys], v[b, :, keys], bias, causal, scale)
        lse = lse.float()
        if empty is not None:
            lse = lse.masked_fill(empty, float("-inf"))
        merge(acc_out[b, :, rows], acc_lse[b, :, rows], out, lse)
        area = (t.q1 - t.q0) * (t.k1 - t.k0)
        work += (area + (t.q1 - t.q0)) // 2 if causal else area
    return work


def attend_backward(
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    q_pos: torch.Tensor,
    q_start: torch.Tensor,
    kv_pos: torch.Tensor,
    scale: float,
    calls: list[Tile] | None = None,
) -> None:
    """Gradients of ``attend`` for one key block, added in place.

    Args:
        dq: (B, H, Sq, D) fp32; dk, dv: (B, H_kv, Sk, D) fp32 accumulators.
        dout: (B, H, Sq, D) gradient of the attention's final output ``out`` (same shape, q's
            dtype); lse: (B, H, Sq) fp32 its final logsumexp (over every key block).
        q, k, v, q_pos, q_start, kv_pos, scale, calls: as ``attend``.
    """
    for t in tiles(q_pos, q_start, kv_pos) if calls is None else calls:
        bias, _ = _mask(t, q_pos, q_start, kv_pos, q.dtype)
        b, rows, keys = slice(t.b, t.b + 1), slice(t.q0, t.q1), slice(t.k0, t.k1)
        g = _tile_backward(
            dout[b, :, rows], q[b, :, rows], k[b, :, keys], v[b, :, keys],
            out[b, :, rows], lse[b, :, rows], bias, t.mode == "causal", scale,
        )  # fmt: skip
        dq[b, :, rows] += g[0]
        dk[b, :, keys] += g[1]
        dv[b, :, keys] += g[2]
