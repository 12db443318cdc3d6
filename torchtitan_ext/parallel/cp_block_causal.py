"""Block-causal (document-masked) attention under every context-parallel pattern, and without CP.

torch's SDPA context parallel has no masks (its ring refuses ``attn_mask``), and TorchTitan 0.2.2
masks documents only through FlexAttention, under CP as an all-gather of K/V. Here the patterns
of ``cp_patterns`` run with the document mask, on the sequence shards the trainer deals out
(``cp_documents``): the same schedules, with a kernel that knows which positions each block
holds (``block_causal``):

- ``ring``: K/V blocks rotate over the cp ranks (Ring Attention, arXiv 2310.01889); at step s
  a rank holds the block of rank (r - s) mod cp.
- ``double_ring`` (LoongTrain, arXiv 2406.18485): the ring nested in an outer ring that hands
  each group's blocks to the next group once per inner cycle (overlapped with it).
- ``ulysses`` (arXiv 2309.14509): all-to-all to (heads / cp, whole sequence), one local masked
  attention, all-to-all back (``cp_ulysses``' exchange, in rank order).
- ``hybrid`` (USP, arXiv 2405.07719): Ulysses over the inner group, the ring over the outer.

One engine runs all four: a ring nested in a ring (``_rings_forward``), either possibly of one
rank, after an optional all-to-all. A (query block, key block) pair with no document in common
costs no kernel call (``block_causal.tiles``); the K/V block still travels, because a ring
step's transfer is what carries it to the ranks after it (skipping sends would need a schedule
per batch, and the transfer overlaps the next block's compute). The backward sends each
block's dK/dV on with it and home after a full cycle, as torch's ring backward does.

The mask reaches the attention as the model's ``attention_masks`` argument (a
``cp_documents.DocumentMask``), which TorchTitan's Llama passes to every block, through
activation checkpointing's recompute and pipeline parallel's microbatch split; a forward
pre-hook on each ``attention`` module hands it to ``BlockCausalAttention`` (which replaces
``attention.inner_attention``, keeping the causal module inside for batches without a mask)
and gives TorchTitan's SDPA path the ``None`` it expects. The model's code is unchanged.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from torchtitan_ext.errors import ConfigError
from torchtitan_ext.parallel import block_causal, cp_patterns
from torchtitan_ext.parallel.cp_documents import DocumentMask
from torchtitan_ext.parallel.cp_groups import CPPattern
from torchtitan_ext.parallel.cp_ulysses import (
    _heads_to_seq,
    _replicate_kv,
    _seq_to_heads,
    _unreplicate_grad,
)
from torchtitan_ext.rules import RecipeCheck, Rule


@dataclass(frozen=True)
class _Link:
    """One level of the nested ring: a process group of ``size`` ranks (None: one rank), this
    rank's ``index`` in it."""

    group: dist.ProcessGroup | None
    size: int
    index: int

    @staticmethod
    def of(group: dist.ProcessGroup | None) -> "_Link":
        if group is None or group.size() == 1:
            return _Link(None, 1, 0)
        return _Link(group, group.size(), group.rank())


class _Transfer:
    """Send ``x`` to the next rank of ``link`` and receive the previous rank's (asynchronous)."""

    def __init__(self, link: _Link, x: torch.Tensor, tag: int):
        assert link.group is not None
        self.recv = torch.empty_like(x)
        nxt = dist.get_global_rank(link.group, (link.index + 1) % link.size)
        prv = dist.get_global_rank(link.group, (link.index - 1) % link.size)
        ops = [
            dist.P2POp(dist.isend, x.contiguous(), nxt, link.group, tag),
            dist.P2POp(dist.irecv, self.recv, prv, link.group, tag),
        ]
        self.works = dist.batch_isend_irecv(ops)

    def wait(self) -> torch.Tensor:
        for w in self.works:
            w.wait()
        return self.recv


@dataclass(frozen=True)
class Plan:
    """How one attention runs: the pattern and its links (built by ``BlockCausalAttention``).

    Attributes:
        ulysses: the all-to-all group (None: none) and its size.
        outer, inner: the nested ring's levels (the plain ring: inner = the cp group).
        members: cp ranks whose shards one ring member holds (its all-to-all group, in order),
            indexed [outer index][inner index] -> list of cp ranks.
    """

    ulysses: Any
    u: int
    outer: _Link
    inner: _Link
    members: tuple[tuple[tuple[int, ...], ...], ...]
    name: str = "ring"
    id: int = -1
    """Its index in ``_PLANS``: how the compiled path's custom op (which takes no Python
    objects) finds it."""


_PLANS: list[Plan] = []
"""Every ``Plan`` made in this process, by ``Plan.id``."""


def make_plan(cp_mesh: DeviceMesh | None, pattern: CPPattern) -> Plan:
    """The ``Plan`` of ``pattern`` on ``cp_mesh`` (None: no CP). Uses the process groups
    ``cp_patterns.register`` made (call it first for patterns other than the ring)."""
    plan = dataclasses.replace(_make_plan(cp_mesh, pattern), id=len(_PLANS))
    _PLANS.append(plan)
    return plan


def _make_plan(cp_mesh: DeviceMesh | None, pattern: CPPattern) -> Plan:
    if cp_mesh is None or pattern.cp == 1:
        one = _Link(None, 1, 0)
        return Plan(None, 1, one, one, (((0,),),), "ring")
    cp = pattern.cp
    groups = cp_patterns.process_groups(cp_mesh)
    if pattern.name == "ring" or not groups:
        link = _Link.of(cp_mesh.get_group())
        return Plan(None, 1, _Link(None, 1, 0), link, (tuple((c,) for c in range(cp)),), "ring")
    outer_group, inner_group = groups
    inner, outer = pattern.inner, pattern.outer
    if pattern.name == "double_ring":
        members: tuple[tuple[tuple[int, ...], ...], ...] = tuple(
            tuple((o * inner + i,) for i in range(inner)) for o in range(outer)
        )
        return Plan(None, 1, _Link.of(outer_group), _Link.of(inner_group), members, pattern.name)
    # ulysses (outer 1) and hybrid: the all-to-all over the inner group, the ring over the outer
    members = tuple((tuple(o * inner + i for i in range(inner)),) for o in range(outer))
    return Plan(inner_group, inner, _Link.of(outer_group), _Link(None, 1, 0), members, pattern.name)


def _meta(mask: DocumentMask, ranks: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, starts), each (B, len(ranks) x S / cp): the shards of ``ranks``, in order."""
    idx = list(ranks)
    b = mask.positions.shape[0]
    return mask.positions[:, idx].reshape(b, -1), mask.starts[:, idx].reshape(b, -1)


def _pack(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.cat([k.reshape(-1), v.reshape(-1)])


def _unpack(kv: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    n = shape.numel()
    return kv[:n].view(shape), kv[n:].view(shape)


def _my_member(plan: Plan) -> tuple[int, ...]:
    return plan.members[plan.outer.index][plan.inner.index]


def _source(plan: Plan, j: int, s: int) -> tuple[int, ...]:
    """The cp ranks whose K/V shards this rank holds at outer step ``j``, inner step ``s``."""
    outer, inner = plan.outer, plan.inner
    return plan.members[(outer.index - j) % outer.size][(inner.index - s) % inner.size]


def _rings_forward(
    plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask, scale: float
) -> tuple[torch.Tensor, torch.Tensor, list[list[block_causal.Tile]]]:
    """The nested ring's forward: (out (B, H, Sq, D) fp32, logsumexp (B, H, Sq) fp32, the
    kernel calls of each ring step, in order, for the backward)."""
    outer, inner = plan.outer, plan.inner
    q_pos, q_start = _meta(mask, _my_member(plan))
    acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    held_outer = _pack(k, v)
    steps: list[list[block_causal.Tile]] = []
    for j in range(outer.size):
        outer_next = _Transfer(outer, held_outer, 1) if j < outer.size - 1 else None
        held = held_outer
        for s in range(inner.size):
            inner_next = _Transfer(inner, held, 2) if s < inner.size - 1 else None
            src = _source(plan, j, s)
            kb, vb = _unpack(held, k.shape)
            kv_pos, _ = _meta(mask, src)
            steps.append(block_causal.tiles(q_pos, q_start, kv_pos))
            block_causal.attend(acc, lse, q, kb, vb, q_pos, q_start, kv_pos, scale, steps[-1])
            if inner_next is not None:
                held = inner_next.wait()
        if outer_next is not None:
            held_outer = outer_next.wait()
    return acc, lse, steps


def _rings_backward(
    plan: Plan,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: DocumentMask,
    scale: float,
    steps: list[list[block_causal.Tile]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The nested ring's backward: (dq, dk, dv) fp32 of this rank's q, k, v. Each block's dK/dV
    travel with it and return to its owner after the full cycle; ``steps`` are the forward's
    kernel calls per ring step."""
    outer, inner = plan.outer, plan.inner
    q_pos, q_start = _meta(mask, _my_member(plan))
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    held_outer = _pack(k, v)
    grad_outer = torch.zeros(held_outer.shape, dtype=torch.float32, device=q.device)
    for j in range(outer.size):
        outer_next = _Transfer(outer, held_outer, 1) if j < outer.size - 1 else None
        held, grad = held_outer, grad_outer
        for s in range(inner.size):
            inner_next = _Transfer(inner, held, 2) if s < inner.size - 1 else None
            src = _source(plan, j, s)
            kb, vb = _unpack(held, k.shape)
            dk, dv = _unpack(grad, k.shape)
            kv_pos, _ = _meta(mask, src)
            block_causal.attend_backward(
                dq, dk, dv, dout, q, kb, vb, out, lse, q_pos, q_start, kv_pos, scale,
                steps[j * inner.size + s],
            )  # fmt: skip
            if inner.size > 1:  # dK/dV go on with the block (home after a full inner cycle)
                grad = _Transfer(inner, grad, 3).wait()
            if inner_next is not None:
                held = inner_next.wait()
        grad_outer = _Transfer(outer, grad, 4).wait() if outer.size > 1 else grad
        if outer_next is not None:
            held_outer = outer_next.wait()
    dk, dv = _unpack(grad_outer, k.shape)
    return dq, dk, dv


def _to_heads(plan: Plan, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return xs if plan.u == 1 else _seq_to_heads(xs, plan.ulysses, plan.u, False)


def _to_seq(plan: Plan, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return xs if plan.u == 1 else _heads_to_seq(xs, plan.ulysses, plan.u, False)


def _heads_of(
    plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v shards -> the ring's (B, H / u, u x S, D) each, K/V replicated to the query
    heads the all-to-all needs (GQA)."""
    heads = q.shape[1]
    ke, ve = _replicate_kv(k, heads, plan.u), _replicate_kv(v, heads, plan.u)
    (qh,) = _to_heads(plan, [q])
    kh, vh = _to_heads(plan, [ke, ve])
    return qh, kh, vh


def _backward(
    plan: Plan,
    dout: torch.Tensor,
    saved: tuple[torch.Tensor, ...],
    mask: DocumentMask,
    scale: float,
    steps: list[list[block_causal.Tile]],
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of this rank's shards from ``dout`` (B, H, S / cp, D) and the forward's
    ``saved`` (qh, kh, vh, out_h, lse)."""
    qh, kh, vh, out_h, lse = saved
    cp_patterns.calls[f"block_causal_{plan.name}_backward"] += 1
    (dout_h,) = _to_heads(plan, [dout.contiguous()])
    dq, dk, dv = _rings_backward(plan, dout_h, qh, kh, vh, out_h, lse, mask, scale, steps)
    (dq,) = _to_seq(plan, [dq.to(qh.dtype)])
    dk, dv = _to_seq(plan, [dk.to(kh.dtype), dv.to(vh.dtype)])
    return dq, _unreplicate_grad(dk, kv_heads), _unreplicate_grad(dv, kv_heads)


class _BlockCausal(torch.autograd.Function):
    """Block-causal attention of this rank's q, k, v shards under ``plan`` (module doc); the
    eager path, which keeps the ring's layout and the tiles for the backward."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        starts: torch.Tensor,
        plan: Plan,
        scale: float,
    ) -> torch.Tensor:
        mask = DocumentMask(positions, starts)
        cp_patterns.calls[f"block_causal_{plan.name}"] += 1
        qh, kh, vh = _heads_of(plan, q, k, v)
        acc, lse, steps = _rings_forward(plan, qh, kh, vh, mask, scale)
        out_h = acc.to(q.dtype)
        ctx.save_for_backward(qh, kh, vh, out_h, lse, positions, starts)
        ctx.plan, ctx.scale, ctx.kv_heads, ctx.steps = plan, scale, k.shape[1], steps
        (out,) = _to_seq(plan, [out_h])
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[Any, ...]:
        *saved, positions, starts = ctx.saved_tensors
        mask = DocumentMask(positions, starts)
        dq, dk, dv = _backward(
            ctx.plan, dout, tuple(saved), mask, ctx.scale, ctx.steps, ctx.kv_heads
        )
        return dq, dk, dv, None, None, None, None


# The compiled path. TorchTitan compiles each block whole (fullgraph=True); the attention's
# tiling depends on the data and its ring sends point to point, so the compiler sees it as one
# opaque op with its own backward (torch.library.custom_op). The backward op recomputes what
# the eager path keeps (the all-to-all of q, k, v and out for Ulysses and hybrid, the tiles).


@torch.library.custom_op("torchtitan_ext::block_causal_attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    starts: torch.Tensor,
    plan_id: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, S / cp, D) in q's dtype, contiguous; logsumexp (B, H / u, u x S / cp) fp32)."""
    plan = _PLANS[plan_id]
    cp_patterns.calls[f"block_causal_{plan.name}"] += 1
    qh, kh, vh = _heads_of(plan, q, k, v)
    acc, lse, _ = _rings_forward(plan, qh, kh, vh, DocumentMask(positions, starts), scale)
    (out,) = _to_seq(plan, [acc.to(q.dtype)])
    return out.contiguous(), lse


@_attention_op.register_fake
def _(q: torch.Tensor, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, s, _ = q.shape
    u = _PLANS[args[4]].u  # args: k, v, positions, starts, plan_id, scale
    return q.new_empty(q.shape), q.new_empty((b, h // u, u * s), dtype=torch.float32)


@torch.library.custom_op("torchtitan_ext::block_causal_attention_backward", mutates_args=())
def _attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    positions: torch.Tensor,
    starts: torch.Tensor,
    plan_id: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``_attention_op``, shaped and typed as q, k, v."""
    plan = _PLANS[plan_id]
    mask = DocumentMask(positions, starts)
    qh, kh, vh = _heads_of(plan, q, k, v)
    (out_h,) = _to_heads(plan, [out])
    steps = _steps(plan, mask)
    dq, dk, dv = _backward(plan, dout, (qh, kh, vh, out_h, lse), mask, scale, steps, k.shape[1])
    # Contiguous, as the fake says; dK and dV may not stay views of one buffer (outputs of a
    # custom op do not alias).
    return (
        dq.contiguous(),
        dk.clone(memory_format=torch.contiguous_format),
        dv.clone(memory_format=torch.contiguous_format),
    )


@_attention_backward_op.register_fake
def _(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, positions, starts, plan_id, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], positions, starts)
    ctx.plan_id, ctx.scale = plan_id, scale


def _op_backward(ctx: Any, dout: torch.Tensor, _dlse: torch.Tensor) -> tuple[Any, ...]:
    q, k, v, out, lse, positions, starts = ctx.saved_tensors
    grads = _attention_backward_op(
        dout.contiguous(), q, k, v, out, lse, positions, starts, ctx.plan_id, ctx.scale
    )
    return *grads, None, None, None, None


_attention_op.register_autograd(_op_backward, setup_context=_save)


def _steps(plan: Plan, mask: DocumentMask) -> list[list[block_causal.Tile]]:
    """The kernel calls of each ring step, in ``_rings_forward``'s order."""
    q_pos, q_start = _meta(mask, _my_member(plan))
    return [
        block_causal.tiles(q_pos, q_start, _meta(mask, _source(plan, j, s))[0])
        for j in range(plan.outer.size)
        for s in range(plan.inner.size)
    ]


def block_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: DocumentMask,
    plan: Plan,
    scale: float | None = None,
) -> torch.Tensor:
    """Document-masked causal attention of this rank's sequence shard.

    Args:
        q: (B, H, S / cp, D); k, v: (B, H_kv, S / cp, D), H a multiple of H_kv (GQA); the shard
            ``cp_documents.shard_documents`` dealt this rank.
        mask: the microbatch's ``DocumentMask`` (every cp rank's positions and starts).
        plan: the pattern (``make_plan``).
        scale: softmax scale (None: 1 / sqrt(D)).

    Returns:
        (B, H, S / cp, D) in q's dtype, differentiable in q, k, v.
    """
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if torch.compiler.is_compiling():
        compiled, _ = _attention_op(q, k, v, mask.positions, mask.starts, plan.id, s)
        return compiled
    out: torch.Tensor = _BlockCausal.apply(q, k, v, mask.positions, mask.starts, plan, s)
    return out


class BlockCausalAttention(nn.Module):
    """Replaces a TorchTitan ``attention.inner_attention``: with a ``DocumentMask`` handed over
    by ``_hand_over`` it runs ``block_causal_attention``; without one, the causal module it
    wraps (torch's context parallel, or plain SDPA)."""

    def __init__(self, causal: nn.Module, plan: Plan):
        super().__init__()
        self.causal = causal
        self.plan = plan
        self.mask: DocumentMask | None = None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        enable_gqa: bool = False,
        is_causal: bool = True,
    ) -> torch.Tensor:
        """(B, H, S, D) attention of (B, H, S, D) q and (B, H_kv, S, D) k, v."""
        if self.mask is None:
            out: torch.Tensor = self.causal(q, k, v, scale=scale, enable_gqa=enable_gqa)
            return out
        return block_causal_attention(q, k, v, self.mask, self.plan, scale)


def _hand_over(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Forward pre-hook of ``attention``: (x, freqs_cis, attention_masks, positions) -> the
    mask to ``inner_attention``, None to TorchTitan's SDPA path."""
    inner = module.get_submodule("inner_attention")
    assert isinstance(inner, BlockCausalAttention)
    masks = args[2] if len(args) > 2 else kwargs.get("attention_masks")
    inner.mask = masks if isinstance(masks, DocumentMask) else None
    if len(args) > 2:
        args = (*args[:2], None, *args[3:])
    elif "attention_masks" in kwargs:
        kwargs = {**kwargs, "attention_masks": None}
    return args, kwargs


def _release(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
    inner = module.get_submodule("inner_attention")
    assert isinstance(inner, BlockCausalAttention)
    inner.mask = None


def apply_block_causal(model: nn.Module, cp_mesh: DeviceMesh | None, pattern: CPPattern) -> None:
    """Let every attention of the TorchTitan Llama-style ``model`` take a ``DocumentMask`` as
    its ``attention_masks`` (module doc), in place; after ``apply_cp`` (which registers the
    pattern's process groups) and before activation checkpointing.

    Args:
        model: a model (or pipeline stage) with ``layers[i].attention.inner_attention``.
        cp_mesh: the 1-D cp mesh (None: no CP).
        pattern: the cp group's pattern (``CPPattern("ring", 1)`` without CP).
    """
    plan = make_plan(cp_mesh, pattern)
    layers: nn.Module = model.get_submodule("layers")
    for block in layers.children():
        attention = block.get_submodule("attention")
        inner = attention.get_submodule("inner_attention")
        if isinstance(inner, BlockCausalAttention):
            inner.plan = plan
            continue
        attention.register_module("inner_attention", BlockCausalAttention(inner, plan))
        attention.register_forward_pre_hook(_hand_over, with_kwargs=True)
        attention.register_forward_hook(_release, with_kwargs=True)


def uses_block_causal(model_args: Any) -> bool:
    """Whether the model runs ``block_causal_attention``: an SDPA flavor with
    ``attn_mask_type = "block_causal"`` (flex and varlen flavors use TorchTitan's own masks)."""
    return (
        getattr(model_args, "attn_type", "sdpa") == "sdpa"
        and getattr(model_args, "attn_mask_type", "causal") == "block_causal"
    )


def needs_block_causal(cfg: Any, model_args: Any) -> bool:
    """Whether ``apply_block_causal`` must run on the model of ``cfg``: an SDPA flavor whose
    recipe or any curriculum stage sets ``attn_mask_type = "block_causal"`` (a stage switch on
    the same mesh keeps the model, so the attention is ready for every stage)."""
    if model_args is None or getattr(model_args, "attn_type", "sdpa") != "sdpa":
        return False
    types = {getattr(model_args, "attn_mask_type", "causal"), cfg.model.attn_mask_type}
    types |= {str(s.get("attn_mask_type", "")) for s in cfg.curriculum.stages}
    return "block_causal" in types


def _mask_type(c: RecipeCheck) -> None:
    """varlen attention is block-causal only (TorchTitan's ``get_attention_masks``)."""
    args = c.model_args
    if getattr(args, "attn_type", "sdpa") == "varlen" and args.attn_mask_type != "block_causal":
        raise ConfigError(
            "model.attn_mask_type",
            args.attn_mask_type,
            f"flavor {c.cfg.model.flavor!r} has varlen attention, which is block_causal only",
        )


def _device(c: RecipeCheck) -> None:
    """TorchTitan's flex and varlen attention cannot train on CPU."""
    assert c.device is not None
    attn_type = getattr(c.model_args, "attn_type", "sdpa")
    if c.device.type == "cpu" and attn_type in ("flex", "varlen"):
        why = {
            "flex": "FlexAttention has no backward on CPU in torch",
            "varlen": "varlen attention runs on CUDA only",
        }[attn_type]
        raise ConfigError(
            "model.flavor",
            c.cfg.model.flavor,
            f"its attn_type is {attn_type!r}: {why}; on CPU use an SDPA flavor with "
            "model.attn_mask_type = 'block_causal' (the same document mask)",
        )


def _eos(c: RecipeCheck) -> None:
    """Documents end with the tokenizer's EOS: block_causal needs one."""
    assert c.data is not None
    mask_types = {s.attn_mask_type for s in c.stages} | {c.cfg.model.attn_mask_type}
    if "block_causal" in mask_types and getattr(c.data.tokenizer, "eos_id", None) is None:
        raise ConfigError(
            "model.attn_mask_type",
            "block_causal",
            "documents end with the tokenizer's EOS token, and this tokenizer has none",
        )


RULES: tuple[Rule, ...] = (
    Rule(
        "recipe",
        ("model.attn_mask_type",),
        "causal or block_causal (varlen flavors: block_causal)",
        _mask_type,
        "parallel.cp_block_causal",
    ),
    Rule(
        "device",
        ("model.flavor",),
        "flex and varlen attention flavors train on CUDA only",
        _device,
        "parallel.cp_block_causal",
    ),
    Rule(
        "data",
        ("model.attn_mask_type",),
        "block_causal: the tokenizer has an EOS token",
        _eos,
        "parallel.cp_block_causal",
    ),
)
"""This module's recipe rules (``torchtitan_ext.rules``); ``validate.RULES`` lists them in
its table, in phase order."""
