"""The double ring (LoongTrain, arXiv 2406.18485): torch's ring inside each inner group of
adjacent ranks, nested in an outer ring over the groups.

Forward (``_double_ring_forward``): the outer ring passes each rank's K/V block to the next
group by an all-to-all rotation that overlaps the inner ring, torch's
``_templated_ring_attention`` runs in the group, and torch's ``_SDPAMerger`` merges across
outer steps. Backward (``_double_ring_backward``): each outer step runs ``_ring_backward``,
torch's ``_templated_ring_attention_backward`` schedule returning fp32 accumulators, and the
K/V gradient travels with its block around the outer ring. ``_outer_block`` is the outer
step's part of the causal schedule (torch's ring note, per group; ``cp_comm`` counts by it
too). K/V move with torch's rotaters (``_create_rotater``) and partial results are added with
torch's ``_partial_update``, all in
``torch/distributed/tensor/experimental/_context_parallel/_attention.py``.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from torchtitan_ext.parallel.cp_groups import _Bwd, _Groups, _options


@contextmanager
def _load_balance(on: bool) -> Iterator[None]:
    """Set torch's process-wide ring option for one nested ring call (the double ring's outer
    steps are non-causal full-block rings even when the sequence is head-tail balanced)."""
    opts = _options()
    old = opts.enable_load_balance
    opts.enable_load_balance = on
    try:
        yield
    finally:
        opts.enable_load_balance = old


@dataclass
class _Block:
    """What one outer step of the double ring computes: ``q_half`` (the second half of the
    local queries against whole K/V blocks), ``kv_half`` (all queries against the first half
    of each K/V block), ``skip``, or neither (all against all); ``causal`` for the own group."""

    causal: bool
    q_half: bool = False
    kv_half: bool = False
    skip: bool = False


def _outer_block(o: int, group_rank: int, n_groups: int, is_causal: bool, balanced: bool) -> _Block:
    """Outer step ``o``: this rank's group ``g`` holds the K/V of group ``g - o``. Under the
    head-tail layout every block of an earlier group is attended by all queries on its first
    half, every block of a later group by the second half of the queries on all of it (torch's
    ring note, with "earlier rank" read as "earlier group"); without balancing, later groups
    are skipped."""
    if o == 0:
        return _Block(causal=is_causal)
    if not is_causal:
        return _Block(causal=False)
    earlier = group_rank - o >= 0
    if earlier:
        return _Block(causal=False, kv_half=balanced)
    return _Block(causal=False, q_half=True) if balanced else _Block(causal=False, skip=True)


def _halve(x: torch.Tensor, seq_dim: int, second: bool) -> torch.Tensor:
    return x.chunk(2, dim=seq_dim)[1 if second else 0]


def _outer_steps(
    rotater: Any, key: torch.Tensor, value: torch.Tensor, n_groups: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (o, K, V) for each outer step o, the block of group g - o, after sending it on to
    the next group (torch's rotater: the transfer overlaps the caller's work on the block)."""
    for o in range(n_groups):
        if o > 0:
            key, value = _split_kv(rotater.next_buffer(), key, value)
        if o < n_groups - 1:
            rotater.exchange_buffers(torch.cat([key.flatten(), value.flatten()]))
        yield o, key, value


def _split_kv(
    buf: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return buf[: key.numel()].reshape(key.shape), buf[key.numel() :].reshape(value.shape)


def _fp32_out(op: Callable[..., Any]) -> Callable[..., Any]:
    """``op`` returning its output in fp32 (exact: an upcast). torch's merger records the
    dtype of the blocks it merges and casts its result to it, so torch's inner ring then hands
    the outer ring an unrounded output."""

    def run(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        out, *rest = op(*args, **kwargs)
        return (out.float(), *rest)

    return run


def _double_ring_forward(
    entry: _Groups, ring: Callable[..., Any], seq_dim: int, op: Any, query: torch.Tensor,
    key: torch.Tensor, value: torch.Tensor, is_causal: bool, kwargs: dict[str, Any],
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Outer ring over groups (K/V passed to the next group by an all-to-all rotation that
    overlaps the inner ring), torch's ring inside each group, torch's merger across. With
    torch's ``convert_to_f32`` (its default) the inner rings' outputs reach the outer merger
    in fp32 and the output is rounded to the input dtype once, as in torch's ring."""
    from torch.distributed.tensor.experimental._context_parallel._attention import (
        _create_rotater,
        _RotateMethod,
        _SDPAMerger,
    )

    opts = _options()
    balanced = bool(opts.enable_load_balance)
    n_groups, g = entry.pattern.outer, dist.get_rank(entry.outer)
    merger = _SDPAMerger(opts.convert_to_f32, seq_dim=seq_dim)
    block_op = _fp32_out(op) if opts.convert_to_f32 else op
    rotater = _create_rotater(entry.outer, seq_dim, _RotateMethod.ALL_TO_ALL)
    rest: list[Any] = []
    blocks = _outer_steps(rotater, key.contiguous(), value.contiguous(), n_groups)
    for o, key_o, value_o in blocks:
        block = _outer_block(o, g, n_groups, is_causal, balanced)
        if block.skip:
            continue
        q = _halve(query, seq_dim, True) if block.q_half else query
        k, v = (_halve(t, seq_dim, False) if block.kv_half else t for t in (key_o, value_o))
        with _load_balance(balanced and o == 0):
            out, lse, *rest = ring(entry.inner, seq_dim, block_op, q, k, v, block.causal, **kwargs)
        merger.step(out, lse, block.q_half)
    out, lse = merger.results()
    return (out.to(query.dtype), lse, *rest)


def _add(total: torch.Tensor, part: torch.Tensor, seq_dim: int, half: int | None) -> torch.Tensor:
    """``total + part``, or with ``half`` (0 first, 1 second) ``part`` added to that half of
    ``total`` along ``seq_dim`` (torch's ``_partial_update``), in ``total``'s dtype."""
    from torch.distributed.tensor.experimental._context_parallel._attention import (
        _partial_update,
    )

    part = part.to(total.dtype)
    if half is None:
        return total + part
    return _partial_update(total, part, seq_dim, 2, half, add=True)


def _backward_inputs(
    t: _Bwd, key: torch.Tensor, value: torch.Tensor, block: "_Block", seq_dim: int
) -> tuple[torch.Tensor, ...]:
    """What one block's backward sees: query, out, grad_out and logsumexp (their second halves
    when ``block.q_half``), and the held key and value (their first halves when
    ``block.kv_half``): ``(q, out, grad_out, lse, k, v)``."""
    q, out, dout, lse = (
        (_halve(x, seq_dim, True) for x in (t.query, t.out, t.grad_out, t.logsumexp))
        if block.q_half
        else (t.query, t.out, t.grad_out, t.logsumexp)
    )
    k, v = (_halve(x, seq_dim, False) if block.kv_half else x for x in (key, value))
    return q, out, dout, lse, k, v


def _ring_backward(
    group: dist.ProcessGroup, seq_dim: int, op: Any, t: _Bwd, is_causal: bool, balanced: bool,
    accum: torch.dtype, kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[Any]]:  # fmt: skip
    """torch's ring backward (``_templated_ring_attention_backward``) over ``group``: the same
    steps, causal behaviour and head-tail halves (``_outer_block`` is its
    ``_is_causal_behavior`` and half selection), torch's rotaters (K/V by the recipe's method in
    their own dtype, their gradient by all-to-all in ``accum``) and ``_partial_update``; but dq
    and this rank's dK/dV come back in ``accum`` where torch casts them to the input dtype, so
    the double ring adds its outer steps' partials unrounded."""
    from torch.distributed.tensor.experimental._context_parallel._attention import (
        _create_rotater,
        _RotateMethod,
    )

    rank, size = dist.get_rank(group), dist.get_world_size(group)
    kv_rotater = _create_rotater(group, seq_dim)
    dkv_rotater = _create_rotater(group, seq_dim, _RotateMethod.ALL_TO_ALL)
    grad_q = torch.zeros_like(t.query, dtype=accum)
    grad_k = torch.zeros_like(t.key, dtype=accum)
    grad_v = torch.zeros_like(t.value, dtype=accum)
    rest: list[Any] = []
    for i, key, value in _outer_steps(kv_rotater, t.key.contiguous(), t.value.contiguous(), size):
        if i > 0:  # the gradient of the block now held, accumulated by the ranks before
            grad_k, grad_v = _split_kv(dkv_rotater.next_buffer(), grad_k, grad_v)
        block = _outer_block(i, rank, size, is_causal, balanced)
        if not block.skip:
            q, out, dout, lse, k, v = _backward_inputs(t, key, value, block, seq_dim)
            dq, dk, dv, *rest = op(
                query=q, key=k, value=v, out=out, logsumexp=lse.contiguous(),
                is_causal=block.causal,
                **{**kwargs, t.grad_out_name: dout},
            )  # fmt: skip
            grad_q = _add(grad_q, dq, seq_dim, 1 if block.q_half else None)
            grad_k = _add(grad_k, dk, seq_dim, 0 if block.kv_half else None)
            grad_v = _add(grad_v, dv, seq_dim, 0 if block.kv_half else None)
        dkv_rotater.exchange_buffers(torch.cat([grad_k.flatten(), grad_v.flatten()]))
    grad_k, grad_v = _split_kv(dkv_rotater.next_buffer(), grad_k, grad_v)
    return grad_q, grad_k, grad_v, rest


def _double_ring_backward(
    entry: _Groups, seq_dim: int, op: Any, t: _Bwd, is_causal: bool, kwargs: dict[str, Any]
) -> tuple[torch.Tensor, ...]:
    """Backward of ``_double_ring_forward``: each outer step runs the ring backward in the
    group (``_ring_backward``); the K/V gradient of a block travels with it around the outer
    ring, accumulating each group's contribution, and arrives back at its owner after the last
    step. Accumulation is in fp32 with torch's ``convert_to_f32`` (its default), else in the
    input dtype, as torch's ring: gradients are rounded once, at the end."""
    from torch.distributed.tensor.experimental._context_parallel._attention import (
        _create_rotater,
        _RotateMethod,
    )

    opts = _options()
    balanced = bool(opts.enable_load_balance)
    accum = torch.float32 if opts.convert_to_f32 else t.query.dtype
    n_groups, g = entry.pattern.outer, dist.get_rank(entry.outer)
    kv_rotater = _create_rotater(entry.outer, seq_dim, _RotateMethod.ALL_TO_ALL)
    dkv_rotater = _create_rotater(entry.outer, seq_dim, _RotateMethod.ALL_TO_ALL)
    grad_q = torch.zeros_like(t.query, dtype=accum)
    grad_k = torch.zeros_like(t.key, dtype=accum)
    grad_v = torch.zeros_like(t.value, dtype=accum)
    rest: list[Any] = []
    blocks = _outer_steps(kv_rotater, t.key.contiguous(), t.value.contiguous(), n_groups)
    for o, key, value in blocks:
        if o > 0:
            grad_k, grad_v = _split_kv(dkv_rotater.next_buffer(), grad_k, grad_v)
        block = _outer_block(o, g, n_groups, is_causal, balanced)
        if not block.skip:
            q, out, dout, lse, k, v = _backward_inputs(t, key, value, block, seq_dim)
            inner = _Bwd(dout, t.grad_out_name, q, k, v, out, lse.contiguous())
            dq, dk, dv, rest = _ring_backward(
                entry.inner, seq_dim, op, inner, block.causal, balanced and o == 0, accum, kwargs
            )
            grad_q = _add(grad_q, dq, seq_dim, 1 if block.q_half else None)
            grad_k = _add(grad_k, dk, seq_dim, 0 if block.kv_half else None)
            grad_v = _add(grad_v, dv, seq_dim, 0 if block.kv_half else None)
        dkv_rotater.exchange_buffers(torch.cat([grad_k.flatten(), grad_v.flatten()]))
    grad_k, grad_v = _split_kv(dkv_rotater.next_buffer(), grad_k, grad_v)
    return (grad_q.to(t.query.dtype), grad_k.to(t.key.dtype), grad_v.to(t.value.dtype), *rest)
