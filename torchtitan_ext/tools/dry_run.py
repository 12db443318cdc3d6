"""Dry run: the per-rank memory of a recipe on a cluster this machine does not have.

For one rank at a time, ``plan_rank`` starts torch's fake process group (``FakeProcessGroup``:
collectives are no-ops, every rank of any world size can be simulated in one process), builds
the job's DeviceMesh, the model on the meta device, and applies the real pipeline split and
``parallelize`` (TP, CP, AC, FSDP). Parameter bytes are then read from the actual DTensor shards
of that rank; gradients are the same size (fp32, sharded like the parameters); AdamW keeps two
fp32 moments per parameter. Activations are estimated, not measured (see
``activation_bytes``).

Used by ``scripts/plan.py``; no GPU and no real process group needed.
"""

import contextlib
import copy
import dataclasses
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.distributed_c10d import GroupName
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.protocols.train_spec import get_train_spec
from torchtitan.tools.utils import set_default_dtype

from torchtitan_ext.models import build_model_on_meta
from torchtitan_ext.parallel import cp_comm, cp_patterns
from torchtitan_ext.parallel.pipeline import pipeline_split, plan_pipeline
from torchtitan_ext.parallel_dims import ParallelDims
from torchtitan_ext.parallelize import parallelize
from torchtitan_ext.validate import resolve_model_args, validate

GIB = 1024**3


def local_numel_bytes(parts: list[nn.Module]) -> tuple[int, int]:
    """Parameter elements and bytes this rank holds of ``parts`` (its DTensor shards)."""
    numel = nbytes = 0
    for part in parts:
        for p in part.parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            numel += local.numel()
            nbytes += local.numel() * local.element_size()
    return numel, nbytes


@dataclass(frozen=True)
class ModelDims:
    """The sizes the estimates need, read off the unsharded (meta) model.

    Attributes:
        dim: hidden size h; kv_dim: n_kv_heads x head_dim; ffn_dim: SwiGLU hidden size f;
        vocab: vocabulary size V; n_layers: transformer blocks L; n_heads: query heads.
    """

    dim: int
    kv_dim: int
    ffn_dim: int
    vocab: int
    n_layers: int
    n_heads: int = 1

    @classmethod
    def of(cls, model: nn.Module) -> "ModelDims":
        """From a TorchTitan Llama-style model (``tok_embeddings``, ``layers[i].attention.wk``,
        ``layers[i].feed_forward.w1``), before it is parallelized."""
        layers = list(model.get_submodule("layers").children())
        block = layers[0]
        vocab, dim = model.get_parameter("tok_embeddings.weight").shape
        return cls(
            dim=dim,
            kv_dim=block.get_parameter("attention.wk.weight").shape[0],
            ffn_dim=block.get_parameter("feed_forward.w1.weight").shape[0],
            vocab=vocab,
            n_layers=len(layers),
            n_heads=cast(int, block.get_submodule("attention").n_heads),
        )


@dataclass(frozen=True)
class Work:
    """The per-microbatch sizes both estimates use.

    Attributes:
        s: tokens per sequence on this rank (seq_len / cp); b: sequences per microbatch (the
        pipeline microbatch size with PP, else the local batch size); microbatches: forward
        passes per optimizer step on this rank (pipeline microbatches with PP, else gradient
        accumulation steps); act_bytes: bytes per activation element (the compute dtype).
    """

    s: int
    b: int
    microbatches: int
    act_bytes: int


def work_of(cfg: Any, dims: ParallelDims, act_dtype: torch.dtype) -> Work:
    """``Work`` for a validated recipe on ``dims``."""
    t = cfg.training
    global_batch = (
        t.global_batch_size if t.global_batch_size != -1 else t.local_batch_size * dims.dp
    )
    accum = global_batch // (t.local_batch_size * dims.dp)
    if dims.pp > 1:
        b = cfg.parallelism.pipeline_parallel_microbatch_size
        micro = accum * t.local_batch_size // b
    else:
        b, micro = t.local_batch_size, accum
    return Work(t.seq_len // dims.cp, b, micro, torch.tensor([], dtype=act_dtype).element_size())


def layer_saved_elements(m: ModelDims, w: Work, tp: int, tiled_mlp: bool = False) -> int:
    """Activation elements one transformer block saves for backward, per microbatch.

    Counted from what autograd keeps in TorchTitan's Llama block under torch TP with sequence
    parallel, and checked against real runs (``scripts/check_dry_run.py``). Each RMSNorm keeps
    its input and its normalized input (s·b·h/tp each, sequence-sharded) and the linear after
    it keeps the all-gathered output (s·b·h); SDPA keeps q, k, v and its output
    (s·b·(2·h + 2·kv)/tp; no attention scores), whose transposed view is wo's input; SwiGLU
    keeps w1's, silu's, w3's and the product's outputs (4·s·b·f/tp). In all
    s·b·(2·h + (6·h + 2·kv + 4·f)/tp); without TP s·b·(8·h + 2·kv + 4·f), 24.5·s·b·h for
    Llama 3 8B, against 17·s·b·h (34 bytes in 16-bit) for GPT in Korthikanti et al. 2022
    (arXiv 2205.05198, Table 2), whose MLP is 4·h wide, which keeps dropout masks and the
    attention scores, and whose LayerNorm keeps less. The s·b·heads/tp softmax statistics
    (SDPA's fp32 logsumexp) are added by ``activation_estimate``. A fused RMSNorm kernel
    (CUDA) keeps one tensor less per norm.
    With a tiled MLP (``training.mlp_tile_tokens``) the SwiGLU keeps only its tiles' inputs,
    the all-gathered ffn input already counted: the 4·f term goes.
    """
    h, kv, f = m.dim, m.kv_dim, m.ffn_dim
    mlp = 0 if tiled_mlp else 4 * f
    return w.s * w.b * (2 * h + (6 * h + 2 * kv + mlp) // tp)


@dataclass(frozen=True)
class Activations:
    """Estimated activation memory of one rank, bytes.

    Attributes:
        saved_per_microbatch: what one microbatch's forward keeps for backward (all of this
            rank's layers; with AC "full" only each block's input plus nothing else).
        peak: the peak during a step: ``saved_per_microbatch`` times the microbatches in
            flight, plus one block recomputed (AC "full") and the logits' gradient.
    """

    saved_per_microbatch: int
    peak: int


def activation_estimate(
    cfg: Any, dims: ParallelDims, m: ModelDims, w: Work, n_layers_here: int,
    stage_index: int, has_output: bool,
) -> Activations:  # fmt: skip
    """Activation memory of one rank (formula per block in ``layer_saved_elements``).

    AC "full" keeps each block's input (s·b·h/tp) and recomputes one block at a time in
    backward; AC "selective" is counted like "none" (an upper bound: it saves a subset). The
    last stage adds the final norm's (s·b·h·(1 + 2/tp)) and the
    fp32 log-softmax of the logits (4·s·b·V/tp bytes; as much again for its gradient at the
    peak). With pipeline parallel, stage k of pp holds min(microbatches, pp - k) microbatches in
    flight (1F1B; interleaved schedules hold more); without, one.

    The long-context features: chunked cross-entropy (``training.loss_chunk_tokens`` = c)
    keeps no logits but the gradients it takes in forward: the hidden states' (s·b·h, in place
    of the hidden states the projection would keep) and the output weight's (V·h/tp); its
    peak is one chunk's fp32 logits, log-softmax and gradient (3 x 4·c·V/tp bytes) plus the
    fp32 accumulator of the weight's gradient (4·V·h/tp bytes) instead of the whole
    sequence's logits; a tiled MLP
    (``training.mlp_tile_tokens`` = t) keeps no SwiGLU intermediates
    (``layer_saved_elements``), and its peak adds one tile's (4·t·b·f/tp elements).
    Activation offload (``activation_checkpoint.enable_cpu_offload``, full AC) keeps the block
    inputs in host memory: none is held on the device, and the recompute adds the one copied
    back. With context parallel each block keeps one more attention-output-sized tensor
    (s·b·h/tp) and fp32 logsumexp than without (measured with saved-tensor hooks,
    ``scripts/check_dry_run.py``: torch's CP dispatch returns its own copies, not views), and
    the peak adds one attention call's buffers
    (``cp_buffer_bytes``: the ring's gathered K/V, Ulysses' all-to-all copies, GQA K/V
    replication), counted as if they coincided with the loss's.
    """
    tp, e = dims.tp, w.act_bytes
    t = cfg.training
    tile, chunk = t.mlp_tile_tokens, t.loss_chunk_tokens
    softmax_stats = w.s * w.b * m.n_heads // tp * 4  # SDPA's fp32 logsumexp, kept per block
    layer = layer_saved_elements(m, w, tp, tiled_mlp=tile > 0) * e + softmax_stats
    if dims.cp > 1:  # measured: one more attention output and logsumexp per block
        layer += w.s * w.b * m.dim // tp * e + softmax_stats
    block_input = w.s * w.b * m.dim // tp * e
    full_ac = cfg.activation_checkpoint.mode == "full"
    offload = full_ac and cfg.activation_checkpoint.enable_cpu_offload
    held = 0 if offload else n_layers_here * (block_input if full_ac else layer)
    logits = 4 * w.s * w.b * m.vocab // tp
    grad_w = m.vocab * m.dim // tp * e  # chunked loss: the output weight's gradient, kept
    final = w.s * w.b * m.dim * (tp + 2) // tp * e + (grad_w if chunk else logits)
    saved = held + (final if has_output else 0)
    in_flight = min(w.microbatches, dims.pp - stage_index) if dims.pp > 1 else 1
    recompute = (layer + (block_input if offload else 0)) if full_ac else 0
    if tile:
        recompute += min(tile, w.s) * w.b * 4 * m.ffn_dim // tp * e
    chunk_peak = (3 * min(chunk, w.s * w.b) + m.dim) * 4 * m.vocab // tp
    loss_peak = chunk_peak if chunk else logits
    transient = (loss_peak if has_output else 0) + cp_buffer_bytes(cfg, dims, m, w)
    return Activations(saved, saved * in_flight + recompute + transient)


def cp_buffer_bytes(cfg: Any, dims: ParallelDims, m: ModelDims, w: Work) -> int:
    """Bytes one attention call under context parallel holds on top of the saved activations
    while it runs (forward or backward, whichever holds more; one call at a time), for the
    recipe's ``context_parallel_pattern``. With q = this rank's query (= output) elements
    (s·b·h/tp), kv = its key (= value) elements (s·b·kv/tp), e = bytes per activation:

    - ring (torch's ``_templated_ring_attention``): the gathered K/V of all cp ranks,
      cp·2·kv·e (``allgather`` rotation; ``alltoall``: the block in hand and the next,
      2·2·kv·e), again in backward, where the fp32 dK/dV travel around the ring (held, sent and
      received: 3·2·kv·4) and dq accumulates in fp32 (q·4); forward merges in fp32 (q·4).
    - ulysses over u ranks (``cp_ulysses._ulysses_*``): K/V replicated to the query heads
      when u does not divide the kv heads (GQA: kv becomes q), and per all-to-all its send
      buffer, receive buffer and the rearranged copies, three of each exchanged tensor: in
      backward q, k, v, out, dout and the fp32 logsumexp in, dq, dk, dv out.
    - hybrid: Ulysses' buffers plus the ring's over the outer cp / u ranks on the head-sharded
      tensors (the same number of elements).
    - double ring: the outer rotation's K/V (held, sent, received: 3·2·kv·e) and in backward
      its fp32 dK/dV (3·2·kv·4) and fp32 dq (q·4), plus the inner ring's buffers.

    Counted from the code, an upper bound (buffers of one step freed before the next are all
    counted at once); ``scripts/check_dry_run.py`` measures the peak they add to.
    """
    if dims.cp == 1:
        return 0
    p = cfg.parallelism
    pattern = cp_patterns.recipe_pattern(p, dims.cp)
    e, tokens = w.act_bytes, w.s * w.b
    q = tokens * m.dim // dims.tp
    kv = tokens * m.kv_dim // dims.tp
    lse = tokens * m.n_heads // dims.tp * 4

    def ring(n: int, kv_elems: int) -> int:
        if n == 1:
            return 0
        held = n if p.context_parallel_rotate_method == "allgather" else 2
        return held * 2 * kv_elems * e + 3 * 2 * kv_elems * 4 + q * 4

    if pattern.name == "ring":
        return ring(dims.cp, kv)
    if pattern.name == "double_ring":
        return 3 * 2 * kv * (e + 4) + q * 4 + ring(pattern.inner, kv)
    u = pattern.inner
    kv_heads = m.kv_dim // (m.dim // m.n_heads) // dims.tp
    if kv_heads % u != 0:
        kv = q  # K/V replicated to the query heads (cp_ulysses._replicate_kv)
    backward_in = (3 * q + 2 * kv) * e + lse
    backward_out = (q + 2 * kv) * e
    return 3 * (backward_in + backward_out) + ring(pattern.outer, kv)


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


@dataclass
class RankPlan:
    """One rank's memory (bytes) and communication (bytes per step) for a recipe and world size.

    Attributes:
        rank: global rank; coords: its index in each mesh dim.
        modules: the top-level modules its pipeline stage(s) hold.
        param_bytes: this rank's parameter shards (training.dtype, fp32 by default).
        grad_bytes: gradients, sharded like the parameters (same dtype).
        optim_bytes: AdamW's two moments (fp32) per local parameter element.
        activations: estimate (see ``activation_estimate``).
        comm_bytes: bytes sent per optimizer step by kind (see ``comm_estimate``).
        comm_calls: collective calls per optimizer step by kind (``collective_counts``).
        cp_inter_node_bytes: CP bytes per step sent to other nodes (``cp_node_split``, for the
            ``ranks_per_node`` given to ``plan_rank``) by the rank of this rank's cp group
            that sends the most across nodes.
    """

    rank: int
    coords: dict[str, int]
    modules: list[str]
    param_bytes: int
    grad_bytes: int
    optim_bytes: int
    activations: Activations
    comm_bytes: dict[str, int]
    cp_inter_node_bytes: int = 0
    comm_calls: dict[str, int] = field(default_factory=dict)

    @property
    def activation_bytes(self) -> int:
        """Estimated peak activation bytes."""
        return self.activations.peak

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optim_bytes + self.activation_bytes


def estimate(
    cfg: Any, dims: ParallelDims, model_dims: ModelDims, parts: list[nn.Module],
    stage_index: int, act_dtype: torch.dtype, cp_index: int | None = None,
) -> tuple[Activations, dict[str, int]]:  # fmt: skip
    """Activation and communication estimates for one rank holding the (parallelized) model
    ``parts`` of pipeline stage row ``stage_index`` at index ``cp_index`` of its cp group
    (None: read from the live cp mesh)."""
    numel, _ = local_numel_bytes(parts)
    last_unit = [
        m
        for part in parts
        for m in (getattr(part, "norm", None), getattr(part, "output", None))
        if m is not None
    ]
    last_numel, _ = local_numel_bytes(last_unit)
    layers = sum(len(list(part.get_submodule("layers").children())) for part in parts)
    stages = [
        (getattr(p, "tok_embeddings", None) is not None, getattr(p, "output", None) is not None)
        for p in parts
    ]
    has_output = any(last for _, last in stages)
    work = work_of(cfg, dims, act_dtype)
    acts = activation_estimate(cfg, dims, model_dims, work, layers, stage_index, has_output)
    if cp_index is None:
        cp_index = dims.get_mesh("cp").get_local_rank() if dims.cp > 1 else 0
    comm = comm_estimate(cfg, dims, model_dims, work, numel, last_numel, layers, stages, cp_index)
    return acts, comm


def plan_rank(
    cfg: Any, world_size: int, rank: int, act_dtype: torch.dtype | None = None,
    ranks_per_node: int = 8,
) -> RankPlan:  # fmt: skip
    """Build ``rank``'s part of the job on a fake process group and measure it.

    Args:
        act_dtype: compute dtype of activations and all-gathered parameters; default
            ``training.mixed_precision_param`` (what a GPU run uses).
        ranks_per_node: consecutive global ranks per node, for the CP traffic's inter-node
            part.

    Raises:
        ConfigError: the recipe does not validate for ``world_size``.
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    cfg = copy.deepcopy(cfg)
    cfg.compile = dataclasses.replace(cfg.compile, enable=False)  # no tracing needed
    dims = validate(cfg, world_size)
    assert dims is not None
    model_args = resolve_model_args(cfg)
    model_args.update_from_config(cfg)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        dims.build_mesh("cpu")
        spec = get_train_spec(cfg.model.name)
        with set_default_dtype(TORCH_DTYPE_MAP[cfg.training.dtype]):
            model = build_model_on_meta(spec.model_cls, model_args)
        model_dims = ModelDims.of(model)
        device = torch.device("cpu")
        stage_index = 0
        if dims.pp_enabled:
            plan = plan_pipeline(cfg, model_args.n_layers)
            pipeline = pipeline_split(
                model, dims.get_mesh("pp"), plan, cfg, device,
                lambda part: parallelize(part, dims, cfg, device),
                lambda pred, labels: pred.sum(),
            )  # fmt: skip
            parts = pipeline.model_parts
            stage_index = dims.get_mesh("pp").get_local_rank()
        else:
            parts = [parallelize(model, dims, cfg, device)]
        coords = {name: dims.get_mesh(name).get_local_rank() for name in dims.order}
        cp_ranks = [int(r) for r in dims.get_mesh("cp").mesh.flatten().tolist()]
    finally:
        dist.destroy_process_group()
        forget_fake_meshes()
    numel, param_bytes = local_numel_bytes(parts)
    modules = [name for part in parts for name, m in part.named_children() if m is not None]
    act_dtype = act_dtype or TORCH_DTYPE_MAP[cfg.training.mixed_precision_param]
    acts, comm = estimate(cfg, dims, model_dims, parts, stage_index, act_dtype, coords["cp"])
    layers = sum(len(list(part.get_submodule("layers").children())) for part in parts)
    work = work_of(cfg, dims, act_dtype)
    cp_inter = max(  # the busiest rank of this rank's cp group (patterns are not uniform)
        cp_node_split(cfg, dims, model_dims, work, layers, i, cp_ranks, ranks_per_node)[1]
        for i in range(dims.cp)
    )
    stages = [
        (getattr(p, "tok_embeddings", None) is not None, getattr(p, "output", None) is not None)
        for p in parts
    ]
    calls = collective_counts(cfg, dims, model_dims, work, layers, stages, coords["cp"])
    return RankPlan(
        rank, coords, modules, param_bytes, param_bytes, numel * 8, acts, comm, cp_inter, calls
    )


def forget_fake_meshes() -> None:
    """Clear torch's DTensor caches after a fake-process-group run, so that a real run in the
    same process never gets a fake mesh back from them.

    DTensor caches sharding propagation (output specs, which hold their DeviceMesh) and
    redistribution plans, keyed by DeviceMesh, whose equality compares layouts, ranks, device
    type and dim names but not the process group or this rank's coordinate. A real mesh of the
    same shape as one built on the fake process group (as rank 0) then hits the fake entries:
    the outputs of DTensor ops (e.g. FSDP2's state dict) carry the fake mesh, every rank
    reports coordinate 0, and DCP's save fails ("Failed to validate global plan ... invalid
    fill") because all ranks claim the first shard (found with ``curriculum.auto_mesh``, which
    plans before training starts). Uses torch's own helper
    ``torch.distributed.tensor.debug._clear_sharding_prop_cache``. Also forgets the fake run's
    CP pattern registrations (``cp_patterns.unregister_all``).
    """
    from torch.distributed.tensor import _redistribute
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    _clear_sharding_prop_cache()
    cp_patterns.unregister_all()  # the fake run's cp groups (their names will be reused)
    transform_infos = getattr(_redistribute, "_gen_transform_infos", None)
    if transform_infos is not None and hasattr(transform_infos, "cache_clear"):
        transform_infos.cache_clear()


def stage_ranks(dims: ParallelDims) -> list[int]:
    """One representative rank per pipeline stage (ranks within a stage hold equal shards
    when the degrees divide the model evenly): the first rank of each pp index."""
    per_stage = dims.world_size // dims.pp
    return [k * per_stage for k in range(dims.pp)]


def format_table(plans: list[RankPlan], budget_gib: float | None) -> str:
    """Per-rank memory in GiB and estimated bytes sent per step (GiB) by kind, and the CP
    traffic's inter-node part, one row per rank."""
    lines = [
        "| rank | mesh coords | params GiB | grads GiB | optimizer GiB | activations GiB (est.) "
        "| total GiB | fits | comm GiB/step: " + " / ".join(COMM_KINDS) + " | cp inter-node "
        "GiB/step |",
        "|---:|---|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for p in plans:
        coords = " ".join(f"{k}{v}" for k, v in p.coords.items())
        fits = "" if budget_gib is None else ("yes" if p.total_bytes / GIB <= budget_gib else "NO")
        lines.append(
            f"| {p.rank} | {coords} | {p.param_bytes / GIB:.2f} | {p.grad_bytes / GIB:.2f} | "
            f"{p.optim_bytes / GIB:.2f} | {p.activation_bytes / GIB:.2f} | "
            f"{p.total_bytes / GIB:.2f} | {fits} | "
            + " / ".join(f"{p.comm_bytes[k] / GIB:.2f}" for k in COMM_KINDS)
            + f" | {p.cp_inter_node_bytes / GIB:.2f} |"
        )
    return "\n".join(lines)


# Measurement, for checking the estimates against real runs (scripts/check_dry_run.py).

_ALL_GATHERS = {"_allgather_base_", "allgather_", "allgather_into_tensor_coalesced_",
                "all_gather_into_tensor", "all_gather_into_tensor_coalesced"}  # fmt: skip
_REDUCE_SCATTERS = {"_reduce_scatter_base_", "reduce_scatter_tensor_coalesced_",
                    "reduce_scatter_tensor", "reduce_scatter_tensor_coalesced"}  # fmt: skip
_ALL_REDUCES = {"allreduce_", "all_reduce", "all_reduce_coalesced", "allreduce_coalesced_"}
_ALL_TO_ALLS = {"alltoall_base_", "all_to_all_single"}
_KNOWN = {"send", *_ALL_GATHERS, *_REDUCE_SCATTERS, *_ALL_REDUCES, *_ALL_TO_ALLS}


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, list | tuple):
        return [t for y in x for t in _tensors(y)]
    return []


def _nbytes(ts: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


class CommCounter(TorchDispatchMode):
    """Counts the bytes each collective of this rank sends, by kind of traffic, the way
    ``comm_estimate`` counts them (ring algorithms: an all-gather sends (n-1) x its input, a
    reduce-scatter (n-1) x its output, an all-reduce 2·(n-1)/n x its tensor, an all-to-all
    its input minus the rank's own split, a send its tensor).

    Sees both c10d ops (FSDP, ``dist.*``) and functional collectives (DTensor, ring
    attention) through torch's dispatcher. A group is labelled by the mesh it belongs to:
    c10d ops prefer ``fsdp`` / ``dp_replicate`` (FSDP's traffic), functional ones ``tp`` /
    ``cp`` (DTensor's), since with dp_shard 1 the fsdp and cp groups are the same. Tensors of
    at most 8 elements (token counts, losses, norms) count as "other".

    Args:
        groups: the global ranks of a process group -> the labels of the meshes with those
            ranks (by ranks, not by group name: DTensor caches redistribution plans by mesh
            layout, so a run may use an equal, earlier mesh's groups).
        ranks_per_node: if > 0, also split the "cp" bytes by destination into ``cp_intra`` /
            ``cp_inter`` (node = global rank // ranks_per_node; an all-gather's bytes spread
            evenly over the group's other ranks, an all-to-all's go where its splits say),
            as ``cp_comm.split_by_node`` models them.
    """

    C10D_ORDER = ("fsdp", "dp_replicate", "pp", "tp", "cp")
    FUNCOL_ORDER = ("tp", "cp", "pp", "dp_replicate", "fsdp")

    def __init__(self, groups: dict[frozenset[int], set[str]], ranks_per_node: int = 0) -> None:
        super().__init__()
        self.groups = groups
        self.ranks_per_node = ranks_per_node
        self.bytes: dict[str, int] = dict.fromkeys((*COMM_KINDS, "other"), 0)
        self.cp_intra = self.cp_inter = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if any(t is DTensor for t in types):
            # Let DTensor run first (as torch's CommDebugMode does): the collectives it issues,
            # ring attention's included, then come back here as plain-tensor ops.
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        if func.namespace in ("c10d", "_c10d_functional"):
            self._count(func, list(args))
        return out

    def _count(self, func: Any, args: list[Any]) -> None:
        name = func._schema.name.split("::")[1]
        if name not in _KNOWN:
            return
        if func.namespace == "c10d":
            pgs = [
                a
                for a in args
                if isinstance(a, torch.ScriptObject) and "ProcessGroup" in str(a._type())
            ]
            if not pgs:
                return
            pg = dist.ProcessGroup.unbox(pgs[0])
            order = self.C10D_ORDER
        else:
            name_arg = next(a for a in reversed(args) if isinstance(a, str))
            pg = dist.distributed_c10d._resolve_process_group(GroupName(name_arg))
            order = self.FUNCOL_ORDER
        size, rank = pg.size(), pg.rank()
        group = frozenset(dist.get_process_group_ranks(pg))
        if name == "send":
            sent = _nbytes(_tensors(args[0]))
        elif name in _ALL_GATHERS:
            inputs = args[1] if func.namespace == "c10d" else args[0]
            sent = (size - 1) * _nbytes(_tensors(inputs))
        elif name in _REDUCE_SCATTERS:
            if func.namespace == "c10d":
                sent = (size - 1) * _nbytes(_tensors(args[0]))
            else:
                sent = (size - 1) * _nbytes(_tensors(args[0])) // size
        elif name in _ALL_REDUCES:
            sent = 2 * (size - 1) * _nbytes(_tensors(args[0])) // size
        elif name in _ALL_TO_ALLS:
            inp = args[1] if func.namespace == "c10d" else args[0]
            splits = args[4] if func.namespace == "c10d" else args[2]
            own = splits[rank] if splits else inp.shape[0] // size
            sent = (inp.shape[0] - own) * _nbytes([inp]) // max(inp.shape[0], 1)
        else:
            return
        tensors = _tensors(args[0])
        small = sum(t.numel() for t in tensors) <= 8
        labels = self.groups.get(group, set())
        label = "other" if small else next((k for k in order if k in labels), "other")
        self.bytes[label] += sent
        if label == "cp" and self.ranks_per_node > 0:
            members = dist.get_process_group_ranks(pg)
            if name in _ALL_TO_ALLS and splits:
                rows = inp.shape[0]
                to = {
                    m: sent_rows * _nbytes([inp]) // rows
                    for m, sent_rows in zip(members, splits, strict=True)
                }
            else:
                others = [m for m in members if m != members[rank]]
                to = dict.fromkeys(others, sent // len(others))
            node = members[rank] // self.ranks_per_node
            inter = sum(b for m, b in to.items() if m // self.ranks_per_node != node)
            self.cp_inter += inter
            self.cp_intra += sent - inter


def group_labels(dims: ParallelDims) -> dict[frozenset[int], set[str]]:
    """Global ranks of a process group -> labels (``COMM_KINDS``) of this rank's meshes with
    those ranks, for ``CommCounter``. Needs ``dims.build_mesh`` to have run."""
    meshes = {
        "fsdp": [dims.get_mesh("fsdp"), dims.get_mesh("hsdp")["hsdp_shard"]],
        "dp_replicate": [dims.get_mesh("dp_replicate"), dims.get_mesh("hsdp")["hsdp_replicate"]],
        "tp": [dims.get_mesh("tp")],
        "cp": [dims.get_mesh("cp")],
        "pp": [dims.get_mesh("pp")],
    }
    out: dict[frozenset[int], set[str]] = {}
    groups = [(label, m.get_group()) for label, ms in meshes.items() for m in ms if m.size() > 1]
    if dims.cp > 1:  # a cp pattern's inner and outer groups
        groups += [("cp", g) for g in cp_patterns.process_groups(dims.get_mesh("cp"))]
    for label, group in groups:
        ranks = frozenset(dist.get_process_group_ranks(group))
        out.setdefault(ranks, set()).add(label)
    return out


@contextlib.contextmanager
def saved_activations() -> Iterator[list[int]]:
    """Inside the block, count the bytes autograd saves for backward (unique storages, not
    parameters: leaf tensors that require grad and views of them are skipped, which covers
    FSDP's unsharded parameters and TP's DTensor parameters). Yields a one-element list holding
    the total, set when the block exits: only tensors some graph still holds then count, so
    what a graph built and freed inside the block saved (the chunked loss's per-chunk
    gradients, taken in forward) is left out, as it is from memory.
    """
    saved: list[tuple[weakref.ref[torch.Tensor], int, int]] = []
    total = [0]

    def is_param(t: torch.Tensor) -> bool:  # a parameter or a view of one (w.t() in mm)
        base = t if t._base is None else t._base
        return base.is_leaf and base.requires_grad

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not is_param(t):
            local = t.to_local() if isinstance(t, DTensor) else t
            if isinstance(local, AsyncCollectiveTensor):  # a collective's (waited) output
                local = local.trigger_wait()
            storage = local.untyped_storage()
            if storage.nbytes() > 0:
                saved.append((weakref.ref(t), storage.data_ptr(), storage.nbytes()))
        return t  # what the graph keeps: alive exactly as long as the graph holds it

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total
    live = {ptr: nbytes for ref, ptr, nbytes in saved if ref() is not None}
    total[0] = sum(live.values())


def measure_peak(trainer: Any) -> int:
    """Run one training step of ``trainer`` (a ``trainer.Trainer``) and return this rank's
    peak of live tensor bytes during it: the parameters, gradients and optimizer state it
    holds plus everything the step allocates (activations, collective buffers, temporaries),
    tracked by torch's ``MemTracker`` (``torch.distributed._tools.mem_tracker``: a dispatch
    mode over every op's outputs' storages, freed by weakref, storage resizes included, as
    FSDP2 frees its unsharded parameters) without its per-module statistics, which refuse a
    module called twice in one step (pipeline microbatches, gradient accumulation). What
    ``RankPlan.total_bytes`` estimates; on CPU, where no allocator statistics exist.
    Collective (one step)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class PeakTracker(MemTracker):
        def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
            pass

        def _post_fw_hook(self, module: nn.Module, inputs: Any, outputs: Any) -> None:
            pass

        def _pre_bw_hook(self, module: nn.Module, args: Any) -> None:
            pass

        def _post_bw_hook(self, module: nn.Module, args: Any) -> None:
            pass

    tracker = PeakTracker()
    tracker.track_external(*trainer.model_parts, *trainer.optimizers.optimizers)
    batch = trainer.dataloader.next_step()
    with tracker:
        trainer.train_step(batch)
    peak = tracker.get_tracker_snapshot("peak")
    return max(snap["Total"] for snap in peak.values())
