"""Ulysses and hybrid: the all-to-all between sequence- and head-sharded tensors, and the
patterns' attention forward and backward.

DeepSpeed-Ulysses (arXiv 2309.14509; DeepSpeed's ``deepspeed/sequence/layer.py``): an all-to-all
over the ``u`` ranks of the inner group turns each rank's (all heads, local sequence) q/k/v
into (heads / u, u x local sequence) (``_seq_to_heads``, one all-to-all for several tensors), any
attention kernel runs locally, and an all-to-all turns the output back (``_heads_to_seq``).
The hybrid (USP, arXiv 2405.07719) runs torch's ring (``_templated_ring_attention``) over the
outer group in between. GQA K/V whose head count u does not divide are replicated to the query
heads, as DeepSpeed does (``_replicate_kv``). The logsumexp travels in the layout its kernel
returned (``_lse_to_heads`` / ``_lse_to_seq`` with ``cp_lse.LseLayout``); ``check_kernel_lse``
runs that exchange on one device against a real kernel, with threads playing the ranks
(``_InMemoryRank``). ``cp_patterns``' dispatch calls ``_ulysses_forward`` / ``_ulysses_backward``.

Causal load balancing: torch's head-tail layout over all cp ranks (rank c holds chunks c and
2cp-1-c of 2cp) puts in the inner group of ring rank j (ranks j*u .. j*u+u-1) chunks j*u ..
j*u+u-1 and their mirror images: after the all-to-all (first halves in rank order, second
halves in reverse rank order) ring rank j holds super-chunks j and 2r-1-j of 2r, torch's
head-tail layout over the r = cp / u ring ranks.
"""

import math
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as ft_c

from torchtitan_ext.parallel.cp_groups import _Bwd, _Groups, _options
from torchtitan_ext.parallel.cp_lse import LseLayout


class _InMemoryRank:
    """One of ``size`` ranks played by threads of one process: the all-to-all goes through
    shared memory (``check_kernel_lse`` runs the Ulysses layout code on one device)."""

    def __init__(self, rank: int, slots: list[torch.Tensor | None], barrier: threading.Barrier):
        self.rank, self.slots, self.barrier = rank, slots, barrier

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        self.slots[self.rank] = x
        self.barrier.wait()
        out = torch.stack([s[self.rank] for s in self.slots if s is not None])
        self.barrier.wait()  # every rank has read the slots before any writes again
        return out


_Group = dist.ProcessGroup | _InMemoryRank


def _all_to_all(x: torch.Tensor, group: _Group) -> torch.Tensor:
    """All-to-all over dim 0 (size = group size): piece i goes to rank i."""
    if isinstance(group, _InMemoryRank):
        return group.all_to_all(x.contiguous())
    out = ft_c.all_to_all_single(x.contiguous(), None, None, group)
    return out.wait() if isinstance(out, ft_c.AsyncCollectiveTensor) else out


def _pack_seq(xs: list[torch.Tensor], u: int) -> torch.Tensor:
    """Send buffer of ``_seq_to_heads``: (B, H_i, S, D) tensors -> (u, B, sum(H_i) / u, S, D),
    piece j holding head group j of every tensor."""
    b, _, s, d = xs[0].shape
    return torch.cat([x.reshape(b, u, x.shape[1] // u, s, d).transpose(0, 1) for x in xs], dim=2)


def _unpack_heads(recv: torch.Tensor, heads: list[int], halves: bool) -> list[torch.Tensor]:
    """Receive buffer of ``_seq_to_heads`` (u source ranks, B, sum(h_i), S, D) -> (B, h_i,
    u x S, D): the sequence in rank order, or with ``halves`` the first halves in rank order,
    then the second halves in reverse rank order (module doc)."""
    u, b, _, s, d = recv.shape
    outs = []
    for part in recv.split(heads, dim=2):
        h = part.shape[2]
        if halves:
            pieces = part.reshape(u, b, h, 2, s // 2, d).unbind(3)
            part = torch.stack([pieces[0], pieces[1].flip(0)])  # (2, u, B, h, S/2, D)
            part = part.permute(2, 3, 0, 1, 4, 5)
        else:
            part = part.permute(1, 2, 0, 3, 4)
        outs.append(part.reshape(b, h, u * s, d))
    return outs


def _pack_heads(xs: list[torch.Tensor], u: int, halves: bool) -> torch.Tensor:
    """Send buffer of ``_heads_to_seq``: (B, h_i, u x S, D) -> (u, B, sum(h_i), S, D), piece j
    holding rank j's sequence shard (inverse of ``_unpack_heads``)."""
    b, _, t, d = xs[0].shape
    s = t // u
    parts = []
    for x in xs:
        h = x.shape[1]
        if halves:
            first, second = x.reshape(b, h, 2, u, s // 2, d).unbind(2)
            x = torch.stack([first, second.flip(2)], dim=3).permute(2, 0, 1, 3, 4, 5)
        else:
            x = x.reshape(b, h, u, s, d).permute(2, 0, 1, 3, 4)
        parts.append(x.reshape(u, b, h, s, d))
    return torch.cat(parts, dim=2)


def _unpack_seq(recv: torch.Tensor, heads: list[int]) -> list[torch.Tensor]:
    """Receive buffer of ``_heads_to_seq`` (u head groups, B, sum(h_i), S, D) -> (B, u x h_i,
    S, D) (inverse of ``_pack_seq``)."""
    u, b, _, s, d = recv.shape
    return [p.transpose(0, 1).reshape(b, u * p.shape[2], s, d) for p in recv.split(heads, dim=2)]


def _seq_to_heads(
    xs: list[torch.Tensor], group: _Group, u: int, halves: bool
) -> list[torch.Tensor]:
    """(B, H_i, S, D) tensors of one dtype, sequence-sharded -> (B, H_i / u, u x S, D),
    head-sharded, in one all-to-all. With ``halves`` (head-tail layout) each rank's S is two
    pieces; the gathered sequence is the first pieces in rank order, then the second pieces in
    reverse rank order (module doc)."""
    heads = [x.shape[1] // u for x in xs]
    return _unpack_heads(_all_to_all(_pack_seq(xs, u), group), heads, halves)


def _heads_to_seq(
    xs: list[torch.Tensor], group: _Group, u: int, halves: bool
) -> list[torch.Tensor]:
    """Inverse of ``_seq_to_heads``: (B, H_i / u, u x S, D) -> (B, H_i, S, D)."""
    recv = _all_to_all(_pack_heads(xs, u, halves), group)
    return _unpack_seq(recv, [x.shape[1] for x in xs])


def _lse_to_heads(
    lse: torch.Tensor, q_len: int, group: _Group, u: int, halves: bool
) -> torch.Tensor:
    """Logsumexp of the local ``q_len`` queries, in a kernel's layout -> (B, H / u, u x
    q_len) in the same layout for u x q_len queries, as ``_seq_to_heads``."""
    layout = LseLayout.of(lse, q_len)
    (out,) = _seq_to_heads([layout.plain(lse, q_len).unsqueeze(-1)], group, u, halves)
    return layout.apply(out.squeeze(-1))


def _lse_to_seq(
    lse: torch.Tensor, layout: LseLayout, t: int, group: _Group, u: int, halves: bool
) -> torch.Tensor:
    """Inverse of ``_lse_to_heads``: the logsumexp of ``t`` head-sharded queries in ``layout``
    -> the local t / u queries' in the same layout."""
    (out,) = _heads_to_seq([layout.plain(lse, t).unsqueeze(-1)], group, u, halves)
    return layout.apply(out.squeeze(-1))


def check_kernel_lse(
    op: Callable[..., Any], query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    ulysses_degree: int = 2, is_causal: bool = True, **kwargs: Any,
) -> float:  # fmt: skip
    """Check a real attention kernel's logsumexp layout through the Ulysses code, on one device
    (for a GPU check script: no process group needed).

    Runs ``op(query, key, value, is_causal=is_causal, **kwargs)`` as torch's CP dispatch does
    (e.g. ``torch.ops.aten._scaled_dot_product_cudnn_attention`` with ``attn_bias=None,
    compute_log_sumexp=True``; ``..._efficient_attention`` likewise; ``..._flash_attention``),
    reads its logsumexp with ``LseLayout`` and compares it with the fp32 logsumexp of the
    scores. Then ``ulysses_degree`` ranks, played by threads exchanging in memory, run the
    patterns' own ``_lse_to_seq`` (head-sharded kernel output -> each rank's sequence shard,
    head-tail ordered when causal, as in training) and ``_lse_to_heads`` (the way back, what
    the backward hands the kernel): every shard must match the reference's, in the kernel's
    layout kind, and the way back must give the kernel's own tensor bit for bit (padding too).

    Args:
        op: the attention op (forward); query/key/value: (B, H, T, D) on the kernel's device,
            H divisible by ``ulysses_degree``, T by 2 x ``ulysses_degree``.
        kwargs: further arguments of ``op`` (``scale`` is honoured by the reference).

    Returns:
        The largest absolute difference (nats) between the kernel's logsumexp, read through the
        layout code (whole and per shard), and the fp32 reference; the caller bounds it
        (about 1e-5 for fp32 inputs; bf16 kernels a few 1e-3).

    Raises:
        ValueError: shapes the degree does not divide.
        RuntimeError: a layout ``LseLayout`` does not know, or the layout code does not
            reproduce the kernel's tensor.
    """
    from torch.distributed.tensor.experimental._attention import _HeadTailLoadBalancer

    _, h, t, d = query.shape
    u = ulysses_degree
    if u < 1 or h % u or t % (2 * u):
        raise ValueError(f"check_kernel_lse: ulysses_degree {u} must divide heads {h} and "
                         f"tokens {t} / 2")  # fmt: skip
    lse = op(query, key, value, is_causal=is_causal, **kwargs)[1]
    layout = LseLayout.of(lse, t)
    scale = kwargs.get("scale") or 1 / math.sqrt(d)
    scores = query.float() @ key.float().transpose(-1, -2) * scale
    if is_causal:
        mask = torch.ones(t, t, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(mask, -math.inf)
    ref = scores.logsumexp(-1)
    errs = [float((layout.plain(lse, t) - ref).abs().max())]
    order = (
        _HeadTailLoadBalancer(t, u, ref.device)._generate_indices()[0]
        if is_causal
        else torch.arange(t, device=ref.device)
    )
    want = ref.index_select(2, order).chunk(u, dim=2)
    slots: list[torch.Tensor | None] = [None] * u
    barrier = threading.Barrier(u, timeout=120)
    results: list[tuple[torch.Tensor, torch.Tensor] | BaseException | None] = [None] * u

    def rank(r: int) -> None:
        try:
            group = _InMemoryRank(r, slots, barrier)
            mine = lse.narrow(1, r * (h // u), h // u)  # the heads rank r's kernel computes
            local = _lse_to_seq(mine, layout, t, group, u, is_causal)
            results[r] = (local, _lse_to_heads(local, t // u, group, u, is_causal))
        except BaseException as e:  # reported below, after every thread ended
            barrier.abort()
            results[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(u)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for r, res in enumerate(results):
        if not isinstance(res, tuple):
            raise RuntimeError(f"check_kernel_lse: rank {r} of {u} failed: {res!r}")
        local, back = res
        local_layout = LseLayout.of(local, t // u)
        if local_layout.unit_dim != layout.unit_dim:
            raise RuntimeError(f"check_kernel_lse: shard {tuple(local.shape)} of rank {r} "
                               f"lost the kernel's layout {layout}")  # fmt: skip
        errs.append(float((local_layout.plain(local, t // u) - want[r]).abs().max()))
        if not torch.equal(back, lse.narrow(1, r * (h // u), h // u)):
            raise RuntimeError(f"check_kernel_lse: rank {r}'s logsumexp back in heads differs "
                               f"from the kernel's {tuple(lse.shape)} ({layout})")  # fmt: skip
    return max(errs)


def _replicate_kv(kv: torch.Tensor, n_heads: int, u: int) -> torch.Tensor:
    """GQA K/V whose head count u does not divide: repeat each kv head to ``n_heads`` (as
    DeepSpeed-Ulysses does), so every rank gets the kv heads of its query heads."""
    if kv.shape[1] % u == 0:
        return kv
    return kv.repeat_interleave(n_heads // kv.shape[1], dim=1)


def _unreplicate_grad(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    if grad.shape[1] == kv_heads:
        return grad
    b, h, s, d = grad.shape
    return grad.reshape(b, kv_heads, h // kv_heads, s, d).sum(dim=2)


def _ulysses_forward(
    entry: _Groups, ring: Callable[..., Any], seq_dim: int, op: Any, query: torch.Tensor,
    key: torch.Tensor, value: torch.Tensor, is_causal: bool, kwargs: dict[str, Any],
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Ulysses (ring_degree 1) or hybrid: all-to-all to heads over the inner group, then the
    local op or torch's ring over the outer group, then all-to-all back. The logsumexp goes
    back in the layout the kernel (or torch's ring) returned (``LseLayout``)."""
    u, halves = entry.pattern.inner, bool(_options().enable_load_balance)
    n_heads = query.shape[1]
    key, value = (_replicate_kv(t, n_heads, u) for t in (key, value))
    q, k, v = _seq_to_heads([query, key, value], entry.inner, u, halves)
    if entry.pattern.outer == 1:
        out, lse, *rest = op(q, k, v, is_causal=is_causal, **kwargs)
    else:
        out, lse, *rest = ring(entry.outer, seq_dim, op, q, k, v, is_causal, **kwargs)
    t = q.shape[2]
    layout = LseLayout.of(lse, t)
    (out,) = _heads_to_seq([out], entry.inner, u, halves)
    return (out, _lse_to_seq(lse, layout, t, entry.inner, u, halves), *rest)


def _ulysses_backward(
    entry: _Groups, ring_backward: Callable[..., Any], seq_dim: int, op: Any, t: _Bwd,
    is_causal: bool, kwargs: dict[str, Any],
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Backward of ``_ulysses_forward``. The forward's head-sharded tensors are not kept (the
    DTensor op boundary saves the sequence-sharded ones), so q, k, v, out and grad_out are
    exchanged again: one all-to-all of 5 tensors in, one of 3 gradients out."""
    u, halves = entry.pattern.inner, bool(_options().enable_load_balance)
    n_heads, kv_heads = t.query.shape[1], t.key.shape[1]
    key, value = (_replicate_kv(x, n_heads, u) for x in (t.key, t.value))
    q, k, v, out, dout = _seq_to_heads(
        [t.query, key, value, t.out, t.grad_out], entry.inner, u, halves
    )
    lse = _lse_to_heads(t.logsumexp, t.query.shape[2], entry.inner, u, halves)
    if entry.pattern.outer == 1:
        kwargs = {**kwargs, t.grad_out_name: dout}
        dq, dk, dv, *rest = op(
            query=q, key=k, value=v, out=out, logsumexp=lse, is_causal=is_causal, **kwargs
        )
    else:
        dq, dk, dv, *rest = ring_backward(
            entry.outer, seq_dim, op, dout, t.grad_out_name, q, k, v, out, lse, is_causal, **kwargs
        )
    dq, dk, dv = _heads_to_seq([dq, dk, dv], entry.inner, u, halves)
    return (dq, _unreplicate_grad(dk, kv_heads), _unreplicate_grad(dv, kv_heads), *rest)
