"""Context-parallel patterns beyond torch's single ring: Ulysses, double ring, and their hybrid.

torch's ``context_parallel()`` turns q/k/v into DTensors sharded on the sequence dim and
dispatches SDPA (the CUDA flash / efficient / cuDNN ops, and through
``cpu_ring_attention`` the CPU flash op) to ``_templated_ring_attention`` and
``_templated_ring_attention_backward``: one flat ring over the cp group. This module plugs the
other patterns into that same dispatch. ``register(cp_mesh, pattern)`` records the pattern of a
cp group; the two ring functions are wrapped (``install``) so that a call on a registered group
runs the pattern, and any other call runs torch's ring unchanged. Callers keep using torch's
``context_parallel()`` or the ``_ContextParallel`` module style as before.

The patterns (``cp = outer x inner``, inner = adjacent ranks, i.e. the same node when cp is
the innermost mesh dim):

- ``ring`` (torch's): K/V blocks rotate over all cp ranks (Ring Attention, arXiv 2310.01889).
- ``ulysses`` (DeepSpeed-Ulysses, arXiv 2309.14509): an all-to-all turns each rank's
  (all heads, local sequence) q/k/v into (heads / cp, whole sequence); any attention kernel
  runs locally; an all-to-all turns the output back. Needs heads (after TP) divisible by cp.
- ``hybrid`` (USP, arXiv 2405.07719): Ulysses over the inner ``ulysses_degree`` ranks, then
  torch's ring over the ``cp / ulysses_degree`` groups, on heads / ulysses_degree.
- ``double_ring`` (LoongTrain, arXiv 2406.18485): torch's ring over the inner
  ``inner_ring_degree`` ranks, nested in an outer ring that passes each rank's K/V block to the
  next group once per inner cycle, overlapped with it: the slow link carries outer - 1 larger
  transfers per step instead of one per ring step.

Causal load balancing: every pattern keeps torch's head-tail layout over all cp ranks (rank c
holds chunks c and 2cp-1-c of 2cp), so inputs are sharded as for the ring (torch's
``_HeadTailLoadBalancer``, or ``context_parallel()``'s default). For Ulysses and hybrid the
inner group of ring rank j (ranks j*u .. j*u+u-1) then holds chunks j*u .. j*u+u-1 and their
mirror images: after the all-to-all (first halves in rank order, second halves in reverse
rank order) ring rank j holds super-chunks j and 2r-1-j of 2r, torch's head-tail layout over
the r = cp / u ring ranks. Without load balancing every pattern shards contiguously.

Block results are merged with torch's ``_SDPAMerger`` and K/V move with torch's rotaters; only
the schedule of the double ring's outer loop, its inner rings' backward (torch's schedule,
returning fp32 accumulators where torch casts to the input dtype) and the Ulysses all-to-alls
are ours. Every kernel's logsumexp layout is handled (``LseLayout``).

These wrap private torch functions, so they are installed only on a torch series in
``cpu_ring_attention.SUPPORTED_TORCH`` (``require``); ``ring`` needs none of this.
"""

import math
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as ft_c
from torch.distributed.device_mesh import DeviceMesh

from torchtitan_ext.errors import ConfigError
from torchtitan_ext.parallel import cpu_ring_attention

PATTERNS = ("ring", "ulysses", "double_ring", "hybrid")
"""Values of ``parallelism.context_parallel_pattern``."""


@dataclass(frozen=True)
class CPPattern:
    """A context-parallel pattern over ``cp`` ranks, factored as ``outer x inner``.

    Attributes:
        name: one of ``PATTERNS``.
        cp: the context-parallel degree.
        inner: size of the inner group (adjacent ranks): the Ulysses degree of ``ulysses``
            (= cp) and ``hybrid``, the inner ring of ``double_ring``; 1 for ``ring``.
    """

    name: str
    cp: int
    inner: int = 1

    @property
    def outer(self) -> int:
        """Number of inner groups: the ring size of ``hybrid``, the outer ring of
        ``double_ring``, 1 for ``ulysses``, cp for ``ring``."""
        return self.cp // self.inner

    def __str__(self) -> str:
        """E.g. "hybrid (ulysses 2 x ring 4)", "double_ring (inner ring 4 x outer ring 2)"."""
        if self.name == "hybrid":
            return f"hybrid (ulysses {self.inner} x ring {self.outer})"
        if self.name == "double_ring":
            return f"double_ring (inner ring {self.inner} x outer ring {self.outer})"
        return f"{self.name} ({self.cp})"

    @property
    def ulysses_degree(self) -> int:
        """Ranks each all-to-all spans (1: no all-to-all)."""
        return self.inner if self.name in ("ulysses", "hybrid") else 1

    @property
    def ring_degree(self) -> int:
        """Ranks a K/V block visits in ring steps (1: no ring)."""
        return self.outer if self.name in ("ulysses", "hybrid") else self.cp


def pattern_choices(cp: int) -> list[tuple[str, int, int]]:
    """Every (pattern, Ulysses degree, inner-ring degree) a cp group of ``cp`` ranks can run:
    the ring alone for cp 1; else the ring, Ulysses, and the hybrid and the double ring with
    each inner degree 2 .. cp / 2 that divides cp (0 where a degree is unused). What the
    planner (``auto_mesh``), the parity matrix and the ablation sweep enumerate."""
    if cp == 1:
        return [("ring", 0, 0)]
    inner = [d for d in range(2, cp // 2 + 1) if cp % d == 0]
    return [
        ("ring", 0, 0),
        ("ulysses", 0, 0),
        *(("hybrid", d, 0) for d in inner),
        *(("double_ring", 0, d) for d in inner),
    ]


RANKS_PER_NODE = 8
"""Ranks of one node for ``default_inner_ring_degree``: the 8 GPUs of an H100 / H200 HGX node
(the planner's ``curriculum.auto_mesh_ranks_per_node`` default too)."""


def default_inner_ring_degree(cp: int) -> int:
    """The inner ring of a double ring whose ``context_parallel_inner_ring_degree`` is 0
    (unset): the largest divisor of ``cp`` in 2 .. min(cp / 2, ``RANKS_PER_NODE``).

    The largest so that the outer ring, the one that crosses the slow links, has as few
    hops as can be (LoongTrain, arXiv 2406.18485, puts the inner ring inside a node); at most
    cp / 2 so that there are two rings to nest; at most a node's 8 ranks so that with cp
    innermost in the mesh an inner ring never spans nodes. cp 4 -> 2, 6 -> 3, 8 -> 4,
    16 -> 8, 64 -> 8, 12 -> 6. 0 when there is none (cp 1, 2 or a prime): the double ring
    needs another degree then.
    """
    cap = min(cp // 2, RANKS_PER_NODE)
    return next((d for d in range(cap, 1, -1) if cp % d == 0), 0)


def make_pattern(name: str, cp: int, ulysses_degree: int, inner_ring_degree: int) -> CPPattern:
    """The ``CPPattern`` of the recipe keys (validated by ``validate``, which names the
    keys; this raises ``ValueError`` for what slipped through). A double ring with
    ``inner_ring_degree`` 0 gets ``default_inner_ring_degree(cp)``."""
    if name == "ring" or cp == 1:
        return CPPattern("ring", cp, 1)
    if name == "ulysses":
        return CPPattern(name, cp, cp)
    inner = ulysses_degree if name == "hybrid" else inner_ring_degree
    if name == "double_ring" and inner == 0:
        inner = default_inner_ring_degree(cp)
    if name not in PATTERNS or inner < 2 or cp % inner != 0 or inner == cp:
        raise ValueError(f"invalid context-parallel pattern {name!r} with cp {cp}, inner {inner}")
    return CPPattern(name, cp, inner)


def recipe_pattern(parallelism: Any, cp: int) -> CPPattern:
    """The ``CPPattern`` of a recipe's ``parallelism`` section at CP degree ``cp``."""
    return make_pattern(
        parallelism.context_parallel_pattern, cp, parallelism.context_parallel_ulysses_degree,
        parallelism.context_parallel_inner_ring_degree,
    )  # fmt: skip


@dataclass
class _Groups:
    pattern: CPPattern
    outer: dist.ProcessGroup
    inner: dist.ProcessGroup
    cp: dist.ProcessGroup | None = None  # the group registered (names repeat across PGs)


_registry: dict[str, _Groups] = {}
_installed = False
calls: Counter[str] = Counter()
"""Attention forwards / backwards run per pattern in this process ("ulysses",
"ulysses_backward", ...): how tests and benchmarks see that a pattern, not torch's ring, ran.
Counted when the attention executes, also inside a graph compiled with aot_eager (``_count``),
not when torch.compile traces it; inductor's code does not count (the same trace decides
whether the pattern runs, so an aot_eager count shows it)."""


@torch.library.custom_op("torchtitan_ext::cp_pattern_ran", mutates_args=())
def _count(x: torch.Tensor, name: str) -> None:
    """Add one to ``calls[name]`` (``x``: a tensor of the call, for the dispatcher). An op,
    registered as ordered-effectful, not Python: torch.compile's trace keeps it in the graph,
    and aot_eager runs it with each execution (inductor's generated code leaves it out)."""
    calls[name] += 1


@_count.register_fake
def _count_fake(x: torch.Tensor, name: str) -> None:
    return None


_count.register_effect(torch.library.EffectType.ORDERED)


def register(cp_mesh: DeviceMesh, pattern: CPPattern) -> None:
    """Run ``pattern`` for every SDPA that context parallel dispatches on ``cp_mesh``.

    Collective over the world (creates the inner and outer process groups once per layout).
    ``ring`` unregisters (torch's ring). Raises ``RuntimeError`` (``require``) on a torch
    series the wrappers were not checked against.
    """
    group = cp_mesh.get_group()
    name = group.group_name
    if pattern.name == "ring":
        _registry.pop(name, None)
        return
    if _entry(group) is not None and _registry[name].pattern == pattern:
        return  # e.g. each pipeline stage of this rank applies CP to its own module
    require()
    if pattern.cp != cp_mesh.size():
        raise ValueError(f"pattern for cp {pattern.cp} on a cp mesh of {cp_mesh.size()} ranks")
    names = (
        f"cp_outer_{pattern.outer}x{pattern.inner}",
        f"cp_inner_{pattern.outer}x{pattern.inner}",
    )
    mesh2d = cp_mesh._unflatten(0, (pattern.outer, pattern.inner), names)
    _registry[name] = _Groups(
        pattern, mesh2d[names[0]].get_group(), mesh2d[names[1]].get_group(), group
    )


def _entry(group: dist.ProcessGroup) -> _Groups | None:
    """The registration of ``group`` itself: group names are counters that a later process
    group (a real run after a dry run on the fake one) reuses, so a name alone could route a
    group to another's pattern and dead sub-groups."""
    entry = _registry.get(group.group_name)
    return entry if entry is not None and entry.cp is group else None


def unregister_all() -> None:
    """Forget every registration (after the process group they were made on is destroyed)."""
    _registry.clear()


def process_groups(cp_mesh: DeviceMesh) -> list[dist.ProcessGroup]:
    """The outer and inner process groups ``register`` made for ``cp_mesh`` ([]: the ring)."""
    entry = _entry(cp_mesh.get_group())
    return [] if entry is None else [entry.outer, entry.inner]


def require() -> None:
    """Install the pattern dispatch, or raise ``RuntimeError`` naming the supported torch
    series when it wraps torch internals it was not checked against."""
    reason = cpu_ring_attention.unsupported_reason()
    if reason is not None:
        raise RuntimeError(
            "context-parallel patterns other than 'ring' wrap torch's private ring attention "
            f"and were checked only on torch {', '.join(cpu_ring_attention.SUPPORTED_TORCH)}.x; "
            f"found torch {torch.__version__}"
        )
    _install()


def _install() -> None:
    global _installed
    if _installed:
        return
    from torch.distributed.tensor.experimental._context_parallel import _attention

    torch_forward = _attention._templated_ring_attention
    torch_backward = _attention._templated_ring_attention_backward

    def forward(
        group: dist.ProcessGroup, seq_dim: int, op: Any, query: torch.Tensor,
        key: torch.Tensor, value: torch.Tensor, is_causal: bool = False, **kwargs: Any,
    ) -> tuple[torch.Tensor, ...]:  # fmt: skip
        entry = _entry(group)
        if entry is None:
            return torch_forward(group, seq_dim, op, query, key, value, is_causal, **kwargs)
        run = _double_ring_forward if entry.pattern.name == "double_ring" else _ulysses_forward
        _count(query, entry.pattern.name)
        return run(entry, torch_forward, seq_dim, op, query, key, value, is_causal, kwargs)

    def backward(
        group: dist.ProcessGroup, seq_dim: int, op: Any, grad_out: torch.Tensor,
        grad_out_name: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        out: torch.Tensor, logsumexp: torch.Tensor, is_causal: bool, **kwargs: Any,
    ) -> tuple[torch.Tensor, ...]:  # fmt: skip
        entry = _entry(group)
        if entry is None:
            return torch_backward(
                group, seq_dim, op, grad_out, grad_out_name, query, key, value, out,
                logsumexp, is_causal, **kwargs,
            )  # fmt: skip
        _count(query, entry.pattern.name + "_backward")
        tensors = _Bwd(grad_out, grad_out_name, query, key, value, out, logsumexp)
        if entry.pattern.name == "double_ring":
            return _double_ring_backward(entry, seq_dim, op, tensors, is_causal, kwargs)
        return _ulysses_backward(entry, torch_backward, seq_dim, op, tensors, is_causal, kwargs)

    _attention._templated_ring_attention = forward
    _attention._templated_ring_attention_backward = backward
    _installed = True


@dataclass
class _Bwd:
    """The tensors of one attention backward (torch's argument order)."""

    grad_out: torch.Tensor
    grad_out_name: str
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    out: torch.Tensor
    logsumexp: torch.Tensor


def _options() -> Any:
    from torch.distributed.tensor.experimental._context_parallel import _attention

    return _attention._cp_options


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


# ---- Ulysses and hybrid ------------------------------------------------------------------


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


LSE_ALIGN = 32
"""torch's memory-efficient kernel on CUDA (``kAlignLSE``) returns its logsumexp with the
sequence dim padded to a multiple of this, +inf in the padding (which its backward may read)."""


@dataclass(frozen=True)
class LseLayout:
    """How an attention kernel lays out the fp32 logsumexp of its ``T`` queries, as torch's CP
    dispatch hands it over (the shapes of torch's meta registrations,
    ``torch/_meta_registrations.py``):

    - plain (B, H, T): the CPU flash op (strided as (B, T, H) transposed) and CUDA flash;
    - ``unit_dim`` (B, H, T, 1): cuDNN;
    - ``padded`` (B, H, ceil(T / 32) x 32), +inf past T: memory-efficient on CUDA (plain on
      ROCm). A T that is a multiple of 32 reads as plain, which is the same tensor.

    A kernel's backward takes the layout its forward returned, so the patterns hand each kernel
    (and torch's ring) that layout and return it for the local shard.
    """

    unit_dim: bool = False
    padded: bool = False

    @classmethod
    def of(cls, lse: torch.Tensor, q_len: int) -> "LseLayout":
        """The layout of ``lse``, a kernel's logsumexp for ``q_len`` queries.

        Raises:
            RuntimeError: a shape none of torch's CP kernels returns (naming it).
        """
        shape = tuple(lse.shape)
        if len(shape) == 4 and shape[2:] == (q_len, 1):
            return cls(unit_dim=True)
        if len(shape) == 3 and shape[2] == q_len:
            return cls()
        if len(shape) == 3 and shape[2] == -(-q_len // LSE_ALIGN) * LSE_ALIGN:
            return cls(padded=True)
        raise RuntimeError(
            f"context-parallel pattern: unknown logsumexp layout {shape} for {q_len} queries "
            f"(known: (B, H, S), (B, H, S, 1), (B, H, S padded to a multiple of {LSE_ALIGN}))"
        )

    def plain(self, lse: torch.Tensor, q_len: int) -> torch.Tensor:
        """``lse`` in this layout -> (B, H, q_len)."""
        if self.unit_dim:
            return lse.squeeze(3)
        return lse.narrow(2, 0, q_len) if self.padded else lse

    def apply(self, lse: torch.Tensor) -> torch.Tensor:
        """(B, H, T) -> this layout for T queries (contiguous where the kernel reads it)."""
        if self.unit_dim:
            return lse.unsqueeze(3)
        if self.padded:
            pad = -lse.shape[2] % LSE_ALIGN
            return torch.nn.functional.pad(lse, (0, pad), value=float("inf"))
        return lse.contiguous()


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


# ---- double ring -------------------------------------------------------------------------


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
            q, out, dout, lse = (
                (_halve(x, seq_dim, True) for x in (t.query, t.out, t.grad_out, t.logsumexp))
                if block.q_half
                else (t.query, t.out, t.grad_out, t.logsumexp)
            )
            k, v = (_halve(x, seq_dim, False) if block.kv_half else x for x in (key, value))
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
            q, out, dout, lse = (
                (_halve(x, seq_dim, True) for x in (t.query, t.out, t.grad_out, t.logsumexp))
                if block.q_half
                else (t.query, t.out, t.grad_out, t.logsumexp)
            )
            k, v = (_halve(x, seq_dim, False) if block.kv_half else x for x in (key, value))
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


# ---- communication model -----------------------------------------------------------------


@dataclass(frozen=True)
class Transfer:
    """Bytes one rank sends in one kind of collective during one attention call.

    Attributes:
        group: "cp" (all cp ranks), "inner" (this rank's group of ``pattern.inner`` adjacent
            ranks) or "outer" (the ranks with this rank's inner index, one per group).
        kind: "gather" (all-gather: the bytes go evenly to the group's other ranks),
            "all_to_all" (evenly to the others) or "next" (all to the next rank of the group).
        nbytes: bytes sent by this rank.
    """

    group: str
    kind: str
    nbytes: int


def _ring(
    group: str, n: int, kv_bytes: int, kv_elems: int, rotate: str
) -> tuple[list[Transfer], list[Transfer]]:
    """torch's ring over ``n`` ranks (``_templated_ring_attention`` and its backward): the
    K/V block goes to the n-1 others in forward and again in backward (one all-gather, or
    n-1 rotations with "alltoall"); its fp32 gradient makes n hops in backward."""
    if n == 1 or kv_elems == 0:
        return [], []
    kind = "gather" if rotate == "allgather" else "next"
    kv = Transfer(group, kind, (n - 1) * kv_bytes)
    return [kv], [kv, Transfer(group, "next", n * kv_elems * 4)]


def attention_comm(
    pattern: CPPattern, cp_index: int, q_elems: int, kv_elems: int, lse_elems: int,
    act_bytes: int, rotate: str, is_causal: bool = True, balanced: bool = True,
    kv_heads: int = 0,
) -> tuple[list[Transfer], list[Transfer]]:  # fmt: skip
    """What one rank sends for one attention forward and one backward under ``pattern``.

    Args:
        pattern: the cp pattern; cp_index: this rank's index in the cp group.
        q_elems: elements of this rank's query (= output) tensor, B x H x S/cp x D;
            kv_elems: of its key (= value) tensor as SDPA sees it (with TorchTitan's
            enable_gqa, kv heads); lse_elems: of its logsumexp, B x H x S/cp (fp32).
        act_bytes: bytes per element of q/k/v/out (the compute dtype).
        rotate: torch's rotate method ("allgather" or "alltoall").
        is_causal, balanced: causal attention; head-tail load balancing.
        kv_heads: heads of K on this rank (after TP): Ulysses replicates K/V to the query
            heads when its degree does not divide them (0: never).

    Returns:
        (forward transfers, backward transfers); activation checkpointing that recomputes
        attention repeats the forward ones.
    """
    e = act_bytes
    if pattern.name == "ring" or pattern.cp == 1:
        return _ring("cp", pattern.cp, 2 * kv_elems * e, 2 * kv_elems, rotate)
    if pattern.name in ("ulysses", "hybrid"):
        u = pattern.inner
        if kv_heads and kv_heads % u != 0:
            kv_elems = q_elems  # K/V replicated to the query heads (_replicate_kv)
        share = lambda nbytes: (u - 1) * nbytes // u  # noqa: E731  (a2a: all but own part)
        qkv = (q_elems + 2 * kv_elems) * e
        fwd = [Transfer("inner", "all_to_all", share(qkv)),
               Transfer("inner", "all_to_all", share(q_elems * e + lse_elems * 4))]  # fmt: skip
        bwd = [Transfer("inner", "all_to_all", share(qkv + 2 * q_elems * e + lse_elems * 4)),
               Transfer("inner", "all_to_all", share(qkv))]  # fmt: skip
        ring_fwd, ring_bwd = _ring("outer", pattern.outer, 2 * kv_elems * e, 2 * kv_elems, rotate)
        return fwd + ring_fwd, bwd + ring_bwd
    # double ring
    n_groups, g = pattern.outer, cp_index // pattern.inner
    kv = 2 * kv_elems
    fwd = [Transfer("outer", "next", (n_groups - 1) * kv * e)]
    bwd = [
        Transfer("outer", "next", (n_groups - 1) * kv * e),
        Transfer("outer", "next", n_groups * kv * 4),
    ]
    for o in range(n_groups):
        block = _outer_block(o, g, n_groups, is_causal, balanced)
        if block.skip:
            continue
        elems = kv // 2 if block.kv_half else kv
        f, b = _ring("inner", pattern.inner, elems * e, elems, rotate)
        fwd, bwd = fwd + f, bwd + b
    return fwd, bwd


def group_members(pattern: CPPattern, group: str, cp_index: int) -> list[int]:
    """The cp indices of ``group`` ("cp", "inner", "outer") for the rank at ``cp_index``,
    in group-rank order."""
    if group == "cp":
        return list(range(pattern.cp))
    base, offset = divmod(cp_index, pattern.inner)
    if group == "inner":
        return [base * pattern.inner + j for j in range(pattern.inner)]
    return [j * pattern.inner + offset for j in range(pattern.outer)]


def split_by_node(
    transfers: list[Transfer], pattern: CPPattern, cp_index: int, cp_ranks: list[int],
    ranks_per_node: int,
) -> tuple[int, int]:  # fmt: skip
    """(intra-node, inter-node) bytes of ``transfers`` for the rank at ``cp_index``, whose cp
    group holds the global ranks ``cp_ranks`` (in cp order); node = global rank //
    ranks_per_node. Gathers and all-to-alls spread evenly over the group's other ranks, "next"
    goes to the next one."""
    intra = inter = 0
    node = cp_ranks[cp_index] // ranks_per_node
    for t in transfers:
        members = group_members(pattern, t.group, cp_index)
        me = members.index(cp_index)
        if t.kind == "next":
            dests = [members[(me + 1) % len(members)]]
        else:
            dests = [m for m in members if m != cp_index]
        far = sum(cp_ranks[d] // ranks_per_node != node for d in dests)
        inter_bytes = t.nbytes * far // len(dests) if dests else 0
        inter += inter_bytes
        intra += t.nbytes - inter_bytes
    return intra, inter


def check_recipe_pattern(cfg: Any, model_args: Any, tp: int, cp: int) -> None:
    """The recipe's ``parallelism.context_parallel_pattern`` and the degree it needs: a known
    pattern; a Ulysses / hybrid degree that divides cp and the heads per TP rank; an inner ring
    degree that divides cp (0: ``default_inner_ring_degree``, which needs cp to have one); no
    degree set that the pattern does not use; torch 2.13 for any
    pattern but the ring (a rule of ``validate.RULES``).

    Raises:
        ConfigError: naming the key and the value.
    """
    import difflib

    p = cfg.parallelism
    key = "parallelism.context_parallel_pattern"
    name = p.context_parallel_pattern
    if name not in PATTERNS:
        close = difflib.get_close_matches(str(name), PATTERNS, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(key, name, f"must be one of {', '.join(PATTERNS)}{hint}")
    uses = {"hybrid": "ulysses_degree", "double_ring": "inner_ring_degree"}
    for degree in ("ulysses_degree", "inner_ring_degree"):
        value = getattr(p, f"context_parallel_{degree}")
        if value != 0 and uses.get(name) != degree:
            user = next(k for k, v in uses.items() if v == degree)
            raise ConfigError(
                f"parallelism.context_parallel_{degree}",
                value,
                f"only context_parallel_pattern = {user!r} uses it (the pattern is {name!r}); "
                "leave it 0",
            )
    if cp == 1 or name == "ring":
        return
    if name in uses:
        degree_key = f"parallelism.context_parallel_{uses[name]}"
        inner = getattr(p, f"context_parallel_{uses[name]}")
        if name == "double_ring" and inner == 0:
            inner = default_inner_ring_degree(cp)
            if inner == 0:
                raise ConfigError(
                    "parallelism.context_parallel_degree",
                    cp,
                    "double_ring nests an inner ring of 2 .. cp / 2 ranks (a divisor of cp) in "
                    f"an outer ring: cp {cp} has none; use 'ring'",
                )
        if inner < 2 or cp % inner != 0 or inner == cp:
            raise ConfigError(
                degree_key,
                inner,
                f"{name} needs a divisor of context_parallel_degree ({cp}) in 2 .. {cp // 2}",
            )
    else:
        degree_key, inner = "parallelism.context_parallel_degree", cp
    heads = model_args.n_heads // tp
    if name in ("ulysses", "hybrid") and heads % inner != 0:
        raise ConfigError(
            degree_key,
            inner,
            f"{name} splits the {heads} attention heads per TP rank (n_heads {model_args.n_heads}"
            f" / tp {tp}) over it: must divide {heads}",
        )
    if cpu_ring_attention.unsupported_reason() is not None:
        raise ConfigError(
            key,
            name,
            f"needs torch {', '.join(cpu_ring_attention.SUPPORTED_TORCH)}.x (it wraps torch's "
            f"private ring attention); found torch {__import__('torch').__version__}. Use 'ring'",
        )
