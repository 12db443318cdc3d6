"""Context parallel (ring attention and the ``cp_patterns``) for TorchTitan's Llama models, on
CUDA and CPU.

Follows TorchTitan 0.2.2 (``torchtitan/distributed/context_parallel.py``): torch's module-level
``_ContextParallel`` style on every block's ``attention.inner_attention`` (q/k/v become DTensors
sharded on the sequence dim, DTensor dispatches SDPA to torch's ring attention), and the
inputs, labels and RoPE ``positions`` sharded along the sequence with torch's head-tail load
balancer (``_HeadTailLoadBalancer``: rank r holds chunks r and 2cp-1-r of 2cp, which evens the
causal work). On CPU the ring runs through ``torchtitan_ext.parallel.cpu_ring_attention``.
"""

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.experimental._attention import (
    _context_parallel_shard,
    _ContextParallel,
    _cp_options,
    _enable_context_parallel_dispatcher,
    _HeadTailLoadBalancer,
    set_rotate_method,
)
from torch.distributed.tensor.parallel import parallelize_module

from torchtitan_ext.errors import ConfigError
from torchtitan_ext.parallel import cp_patterns, cpu_ring_attention
from torchtitan_ext.parallel.cp_documents import BALANCERS
from torchtitan_ext.parallel.cp_patterns import CPPattern
from torchtitan_ext.rules import RecipeCheck, Rule

LOAD_BALANCERS = ("headtail", None)
"""Values of ``parallelism.context_parallel_load_balancer`` with causal SDPA (None: no
balancing; TOML cannot spell None, so from the CLI: ``--parallelism.context_parallel_load_balancer
None``). With block_causal: ``cp_documents.BALANCERS``."""


def apply_cp(
    model: nn.Module,
    cp_mesh: DeviceMesh,
    rotate_method: str,
    load_balancer: str | None,
    pattern: CPPattern | None = None,
) -> None:
    """Make every attention of ``model`` context-parallel over ``cp_mesh``, in place.

    Args:
        model: a TorchTitan Llama-style model with ``layers[i].attention.inner_attention``
            (the SDPA wrapper).
        cp_mesh: the 1-D cp mesh.
        rotate_method: "allgather" or "alltoall" (how k/v shards move around the ring).
        load_balancer: "headtail" or None/"" (must match ``shard_sequence``).
        pattern: how attention runs over the cp ranks (``cp_patterns``; None: torch's ring).
            Collective (other patterns build their process groups).
    """
    if cp_mesh.device_type == "cpu":
        cpu_ring_attention.require()
    cp_patterns.register(cp_mesh, pattern or CPPattern("ring", cp_mesh.size()))
    set_rotate_method(rotate_method)
    # Process-wide torch option read by the ring kernel; it must agree with how inputs are
    # sharded (shard_sequence), so it is set from the same recipe key.
    _cp_options.enable_load_balance = bool(load_balancer)
    _enable_context_parallel_dispatcher()
    style = _ContextParallel(seq_dim=2, attention_type=_ContextParallel.AttentionType.SDPA)
    layers: nn.Module = model.get_submodule("layers")
    for block in layers.children():
        parallelize_module(block.get_submodule("attention.inner_attention"), cp_mesh, style)


def shard_sequence(
    cp_mesh: DeviceMesh,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    load_balancer: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's part of the sequence of a microbatch, and the matching RoPE positions.

    Args:
        cp_mesh: the 1-D cp mesh.
        inputs, labels: (B, S) int64 token ids, the same on every cp rank.
        load_balancer: "headtail" or None/"".

    Returns:
        (inputs, labels, positions), each (B, S / cp); positions are the global token indices
        of the kept tokens (int32), so RoPE rotates each token by its true position.
    """
    seq_len = inputs.shape[1]
    positions = torch.arange(seq_len, dtype=torch.int32, device=inputs.device).expand(inputs.shape)
    balancer: Any = (
        _HeadTailLoadBalancer(seq_len, cp_mesh.size(), cp_mesh.device_type)
        if load_balancer
        else None
    )
    sharded = _context_parallel_shard(
        cp_mesh, (inputs, labels, positions), seq_dims=(1, 1, 1), load_balancer=balancer
    )
    out_inputs, out_labels, out_positions = sharded
    assert isinstance(out_inputs, torch.Tensor) and isinstance(out_labels, torch.Tensor)
    assert isinstance(out_positions, torch.Tensor)
    return out_inputs, out_labels, out_positions


def check_recipe_cp(cfg: Any, model_args: Any) -> None:
    """What context parallel can shard, for a recipe with cp > 1: SDPA attention (causal, or
    block-causal through ``cp_block_causal``); head-tail or no load balancing, and with
    block_causal also torch's per-document head-tail and PTRR (a rule of ``validate.RULES``).

    Raises:
        ConfigError: the flavor's attention or the load balancer, with what is supported.
    """
    attn_type = getattr(model_args, "attn_type", "sdpa")
    mask_type = getattr(model_args, "attn_mask_type", "causal")
    if attn_type != "sdpa":
        raise ConfigError(
            "model.flavor",
            cfg.model.flavor,
            f"its attn_type is {attn_type!r}; context parallel runs SDPA flavors: for "
            "documents masked under CP use an SDPA flavor with model.attn_mask_type = "
            "'block_causal' (every context_parallel_pattern)",
        )
    lb = cfg.parallelism.context_parallel_load_balancer
    allowed: tuple[str | None, ...] = BALANCERS if mask_type == "block_causal" else LOAD_BALANCERS
    if lb not in allowed:
        masked = ", 'per_document_headtail', 'per_document_lpt', 'ptrr'"
        raise ConfigError(
            "parallelism.context_parallel_load_balancer",
            lb,
            "supported: 'headtail', None (no load balancing), and with "
            f"model.attn_mask_type = 'block_causal' also{masked[1:]}",
        )


def _cp_attention(c: RecipeCheck) -> None:
    if c.cfg.parallelism.context_parallel_degree > 1:
        check_recipe_cp(c.cfg, c.model_args)


RULES: tuple[Rule, ...] = (
    Rule(
        "recipe",
        ("model.flavor", "parallelism.context_parallel_load_balancer"),
        "with cp > 1: SDPA attention; head-tail or no load balancing (block_causal: also "
        "per-document head-tail, per-document LPT, PTRR)",
        _cp_attention,
        "parallel.context_parallel",
    ),
)
"""This module's recipe rules (``torchtitan_ext.rules``); ``validate.RULES`` lists them in
its table, in phase order."""
