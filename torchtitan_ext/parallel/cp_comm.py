"""The communication model of the context-parallel patterns: the bytes one rank sends per
attention forward and backward (``attention_comm``, as ``Transfer`` records), and how many of
them cross nodes (``split_by_node``).

It counts the collectives of torch's ring (``_templated_ring_attention`` and its backward,
with the ``allgather`` or ``alltoall`` rotate method) and of ``cp_ulysses`` (DeepSpeed-Ulysses,
arXiv 2309.14509; USP, arXiv 2405.07719) and ``cp_double_ring`` (LoongTrain, arXiv
2406.18485) as implemented here. Used by the dry run's traffic estimate (``tools.dry_run``),
hence the planner (``tools.auto_mesh``), and checked against measured bytes by
``scripts/bench_cp_patterns.py``.
"""

from dataclasses import dataclass

from torchtitan_ext.parallel.cp_double_ring import _outer_block
from torchtitan_ext.parallel.cp_groups import CPPattern


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
