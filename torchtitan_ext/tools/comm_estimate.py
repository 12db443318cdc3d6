"""Communication model of the dry run: bytes sent and collective calls per optimizer step, per
kind of traffic (``COMM_KINDS``: FSDP, dp_replicate, TP, CP, PP), for one rank.

Volumes are counted as bandwidth-optimal ring algorithms move them (an all-gather or
reduce-scatter of X bytes over n ranks sends (n-1)/n·X per rank, an all-reduce 2·(n-1)/n·X):
FSDP2's all-gathers and reduce-scatters (torch's ``fully_shard``; ZeRO-3, Rajbhandari et al.
2020), the HSDP all-reduce, TP with sequence parallel (Korthikanti et al. 2022, arXiv
2205.05198), the recipe's CP pattern (``parallel.cp_comm.attention_comm``, its
``split_by_node`` for the inter-node part) and the pipeline's point-to-point sends
(``torch.distributed.pipelining`` schedules). ``collective_counts`` counts the calls the same
way, for ``auto_mesh``'s per-call latency term.

Estimates, not measurements: ``scripts/check_dry_run.py`` checks them against the traffic of
real gloo runs (``tools.measure.CommCounter``).
"""

from typing import Any

from torchtitan.config import TORCH_DTYPE_MAP

from torchtitan_ext.parallel import cp_comm, cp_patterns
from torchtitan_ext.parallel_dims import ParallelDims
from torchtitan_ext.tools.memory_estimate import ModelDims, Work

COMM_KINDS = ("fsdp", "dp_replicate", "tp", "cp", "pp")
"""Keys of the communication estimate: FSDP all-gathers and reduce-scatters over dp_shard x cp,
the HSDP all-reduce over dp_replicate, TP, CP ring and PP point-to-point traffic."""


def comm_estimate(
    cfg: Any, dims: ParallelDims, m: ModelDims, w: Work, local_numel: int,
    last_unit_numel: int, n_layers_here: int, stages: list[tuple[bool, bool]],
    cp_index: int = 0,
) -> dict[str, int]:  # fmt: skip
    """Bytes this rank sends per optimizer step, per kind of traffic (``COMM_KINDS``).

    Counted as a bandwidth-optimal (ring) algorithm moves them: an all-gather or reduce-scatter
    of a full tensor of X bytes over n ranks sends (n-1)/n·X per rank, an all-reduce 2·(n-1)/n·X,
    a point-to-point send its size.

    - FSDP (n = dp_shard·cp; ZeRO-3, Rajbhandari et al. 2020): per forward, all-gather of the
      rank's unsharded parameters in the compute dtype; again in backward for units resharded
      after forward (all but [norm, output]); reduce-scatter of the gradients in
      ``mixed_precision_reduce`` per backward. Without PP this happens per gradient-accumulation
      microbatch; with PP once per step (torch's schedules keep parameters unsharded and defer
      the reduction to the last microbatch).
    - dp_replicate (HSDP): all-reduce of the gradient shard (reduce dtype) per reduction.
    - TP with sequence parallel (n = tp; Korthikanti et al. 2022): per block and microbatch
      two all-gathers and two reduce-scatters of s·b·h activations forward, the same backward,
      plus the embedding's reduce-scatter and the output's all-gather (each with its backward);
      AC "full" repeats the forward ones.
    - CP (``cp_attention_transfers``): per block and microbatch, what the recipe's
      ``context_parallel_pattern`` sends (``cp_comm.attention_comm``; the ring: the rank's
      K and V, 2·s·b·kv/tp elements, go to every other rank in forward and again in backward,
      and their fp32 gradient makes cp hops); AC "full" repeats the forward.
    - PP: per microbatch, each stage that is not the last sends its output (s·b·h/tp
      elements: sequence-sharded under TP) and each that is not the first the gradient of its
      input.

    Args:
        local_numel: parameter elements this rank holds (its shards);
        last_unit_numel: those in the [norm, output] FSDP unit (kept unsharded after forward);
        n_layers_here: transformer blocks on this rank; stages: (is first, is last) for each
        of its pipeline stages ([(True, True)] without PP); cp_index: the rank's index in its
        cp group.

    Scalar reductions (token counts, loss, grad norm, loss-parallel statistics) are left out.
    """
    e, s, b, micro = w.act_bytes, w.s, w.b, w.microbatches
    full_ac = cfg.activation_checkpoint.mode == "full"
    out: dict[str, int] = dict.fromkeys(COMM_KINDS, 0)
    reduce_bytes = TORCH_DTYPE_MAP[cfg.training.mixed_precision_reduce].itemsize
    n = dims.dp_shard * dims.cp
    if n > 1 or dims.dp_replicate > 1:
        per_step = 1 if dims.pp > 1 else micro
        policy = cfg.parallelism.fsdp_reshard_after_forward
        if policy == "always":
            regathered = local_numel
        elif policy == "never" or dims.pp > 1:
            regathered = 0
        else:  # "default": every unit but [norm, output]
            regathered = local_numel - last_unit_numel
        gathered = per_step * (local_numel + regathered) * e
        reduced = per_step * local_numel * reduce_bytes
        out["fsdp"] = (n - 1) * (gathered + reduced)
        r = dims.dp_replicate
        out["dp_replicate"] = 2 * (r - 1) * per_step * local_numel * reduce_bytes // r
    if dims.tp > 1:
        per_block = 8 + (4 if full_ac else 0)
        collectives = n_layers_here * per_block
        collectives += 2 * sum(first for first, _ in stages)  # embedding
        collectives += 2 * sum(last for _, last in stages)  # output
        out["tp"] = int((dims.tp - 1) / dims.tp * collectives * micro * s * b * m.dim * e)
    if dims.cp > 1:
        fwd, bwd = cp_attention_transfers(cfg, dims, m, w, cp_index)
        calls = n_layers_here * micro
        out["cp"] = calls * (
            sum(t.nbytes for t in fwd) * (2 if full_ac else 1) + sum(t.nbytes for t in bwd)
        )
    if dims.pp > 1:
        sends = sum((not first) + (not last) for first, last in stages)
        out["pp"] = sends * micro * s * b * m.dim // dims.tp * e
    return out


def collective_counts(
    cfg: Any, dims: ParallelDims, m: ModelDims, w: Work, n_layers_here: int,
    stages: list[tuple[bool, bool]], cp_index: int = 0,
) -> dict[str, int]:  # fmt: skip
    """Collective calls this rank issues per optimizer step, per kind (``COMM_KINDS``): what
    a per-call latency multiplies (``auto_mesh``'s step-time estimate), counted as
    ``comm_estimate`` counts bytes.

    - FSDP: per reduction (microbatch, or step with PP), one all-gather per unit (each block,
      the embedding, [norm, output]: ``parallel/fsdp.py``), again in backward for the units
      resharded after forward, and one reduce-scatter per unit; dp_replicate: one all-reduce
      per unit and reduction.
    - TP: the all-gathers and reduce-scatters of ``comm_estimate``, per microbatch.
    - CP: per block and microbatch, one call per transfer of the pattern
      (``cp_attention_transfers``; forward again under full AC).
    - PP: one send or receive per stage boundary and microbatch, each way.
    """
    out: dict[str, int] = dict.fromkeys(COMM_KINDS, 0)
    micro = w.microbatches
    full_ac = cfg.activation_checkpoint.mode == "full"
    units = n_layers_here + sum(first for first, _ in stages) + sum(last for _, last in stages)
    per_step = 1 if dims.pp > 1 else micro
    if dims.dp_shard * dims.cp > 1:
        policy = cfg.parallelism.fsdp_reshard_after_forward
        last_units = sum(last for _, last in stages)  # [norm, output]: kept after forward
        regathered = 0 if policy == "never" or dims.pp > 1 else units - last_units
        if policy == "always":
            regathered = units
        out["fsdp"] = per_step * (2 * units + regathered)
    if dims.dp_replicate > 1:
        out["dp_replicate"] = per_step * units
    if dims.tp > 1:
        per_block = 8 + (4 if full_ac else 0)
        calls = n_layers_here * per_block + 2 * len(stages)
        out["tp"] = calls * micro
    if dims.cp > 1:
        fwd, bwd = cp_attention_transfers(cfg, dims, m, w, cp_index)
        out["cp"] = n_layers_here * micro * (len(fwd) * (2 if full_ac else 1) + len(bwd))
    if dims.pp > 1:
        out["pp"] = 2 * micro * sum((not first) + (not last) for first, last in stages)
    return out


def cp_attention_transfers(
    cfg: Any, dims: ParallelDims, m: ModelDims, w: Work, cp_index: int
) -> tuple[list[cp_comm.Transfer], list[cp_comm.Transfer]]:
    """One attention forward's and backward's CP traffic for the rank at ``cp_index``
    (``cp_comm.attention_comm`` with this recipe's pattern, sizes and dtype)."""
    p = cfg.parallelism
    pattern = cp_patterns.recipe_pattern(p, dims.cp)
    head_dim = m.dim // m.n_heads
    tokens = w.s * w.b
    return cp_comm.attention_comm(
        pattern, cp_index,
        q_elems=tokens * m.dim // dims.tp,
        kv_elems=tokens * m.kv_dim // dims.tp,
        lse_elems=tokens * m.n_heads // dims.tp,
        act_bytes=w.act_bytes,
        rotate=p.context_parallel_rotate_method,
        balanced=bool(p.context_parallel_load_balancer),
        kv_heads=m.kv_dim // head_dim // dims.tp,
    )  # fmt: skip


def cp_node_split(
    cfg: Any, dims: ParallelDims, m: ModelDims, w: Work, n_layers_here: int, cp_index: int,
    cp_ranks: list[int], ranks_per_node: int,
) -> tuple[int, int]:  # fmt: skip
    """(intra-node, inter-node) bytes of the CP traffic per optimizer step (``comm_estimate``'s
    "cp") for the rank at ``cp_index`` of the cp group holding global ranks ``cp_ranks``, with
    ``ranks_per_node`` consecutive global ranks per node (``cp_comm.split_by_node``)."""
    if dims.cp == 1:
        return 0, 0
    p = cfg.parallelism
    pattern = cp_patterns.recipe_pattern(p, dims.cp)
    fwd, bwd = cp_attention_transfers(cfg, dims, m, w, cp_index)
    full_ac = cfg.activation_checkpoint.mode == "full"
    transfers = fwd * (2 if full_ac else 1) + bwd
    intra, inter = cp_comm.split_by_node(transfers, pattern, cp_index, cp_ranks, ranks_per_node)
    calls = n_layers_here * w.microbatches
    return calls * intra, calls * inter
