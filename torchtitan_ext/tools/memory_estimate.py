"""Memory model of the dry run: a rank's activation bytes, and the sizes both estimates read.

- ``ModelDims`` (the unsharded model's sizes), ``Work`` / ``work_of`` (one microbatch's sizes on
  a mesh) and ``local_numel_bytes`` (the parameter shards a rank holds): the inputs of these
  formulas and of ``comm_estimate``'s.
- ``layer_saved_elements`` and ``activation_estimate``: what autograd saves for backward per
  transformer block, counted from TorchTitan's Llama block under torch TP with sequence
  parallel (set against GPT's in Korthikanti et al. 2022, arXiv 2205.05198, Table 2), and the
  activation peak of a step under AC, pipeline schedules (1F1B in-flight microbatches), the
  chunked loss, the tiled MLP and activation offload.
- ``cp_buffer_bytes``: the transient buffers of one context-parallel attention call, counted
  from torch's ``_templated_ring_attention`` and ``parallel.cp_patterns`` (Ulysses, hybrid,
  double ring).

Estimates, not measurements: ``scripts/check_dry_run.py`` checks them against real runs
(``tools.measure``). Parameter, gradient and optimizer bytes are read off the real shards by
``dry_run.plan_rank``.
"""

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from torchtitan_ext.parallel import cp_patterns
from torchtitan_ext.parallel_dims import ParallelDims


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
