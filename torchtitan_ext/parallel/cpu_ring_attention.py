"""CPU ring attention for torch's context parallel, as a DTensor extension.

torch's ``context_parallel()`` (``torch/distributed/tensor/experimental/_context_parallel``)
turns q/k/v into DTensors sharded on the sequence dim and lets DTensor dispatch the fused SDPA
op to a custom handler that runs the ring (``_templated_ring_attention``, Ring Attention,
arXiv 2310.01889, with torch's head-tail load balancing and LSE merging). It registers handlers
and Shard(seq) sharding rules only for the CUDA ops (flash, efficient, cuDNN), so on CPU
tensors it fails with "Operator aten._scaled_dot_product_flash_attention_for_cpu.default does
not have a sharding strategy registered".

This module adds the CPU op and its backward to the same machinery, reusing torch's ring
algorithm, rotaters (allgather / alltoall), load balancing and merger unchanged:

- base sharding strategies (Replicate, Shard(0) batch, Shard(1) heads) registered permanently,
  as torch does for the CUDA ops;
- the Shard(2) (sequence) strategy registered only while CP is enabled, by hooking torch's own
  ``register_cp_sharding_rules`` / ``unregister_cp_sharding_rules``;
- a handler in torch's CP custom-op table that calls ``_templated_ring_attention`` /
  ``_templated_ring_attention_backward`` with the CPU op.

``enable()`` is idempotent and runs on ``import torchtitan_ext``. It registers only on a torch
series in ``SUPPORTED_TORCH``; on another, import still works and CP on CPU fails with one
error (``require``, and a config error before any collective in the trainer) rather than
risking silently wrong numbers through changed internals. On CUDA tensors nothing changes: the
CPU op is never dispatched there.
"""

from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._op_schema import OpSchema, OpStrategy, PlacementList
from torch.distributed.tensor._ops.utils import (
    expand_to_full_mesh_op_strategy,
    register_op_strategy,
)

from torchtitan_ext.errors import ConfigError
from torchtitan_ext.rules import RecipeCheck, Rule

SUPPORTED_TORCH = ("2.13",)
"""torch release series this extension was checked against (its CP internals are private)."""

aten = torch.ops.aten
_FWD = aten._scaled_dot_product_flash_attention_for_cpu.default
_BWD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
_SEQ_DIM = 2
_enabled = False


def unsupported_reason() -> str | None:
    """Why CP on CPU cannot run on this torch (None when it can): the extension relies on
    torch's private CP internals and registers only on a series in ``SUPPORTED_TORCH``."""
    series = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if series in SUPPORTED_TORCH:
        return None
    return (
        f"context parallel on CPU needs torch {', '.join(SUPPORTED_TORCH)}.x (torchtitan_ext's "
        f"CPU ring attention hooks torch's private CP internals and was checked only there); "
        f"found torch {torch.__version__}. CP on CUDA and everything else work on this torch"
    )


def is_enabled() -> bool:
    """Whether ``enable()`` registered the CPU op (False on an unsupported torch series)."""
    return _enabled


def _forward_strategies(with_cp: bool) -> list[PlacementList]:
    # Placements of [output (B, H, S, D), logsumexp (B, H, S), query, key, value].
    placements: list[PlacementList] = [
        [Replicate()] * 5,
        [Shard(0)] * 5,  # batch
        [Shard(1)] * 5,  # heads (tensor parallel)
    ]
    if with_cp:
        placements.append([Shard(_SEQ_DIM)] * 5)
    return placements


def _backward_strategies(with_cp: bool, num_tensor_inputs: int) -> list[PlacementList]:
    # Placements of [grad_q, grad_k, grad_v, grad_out, query, key, value, out, logsumexp, ...].
    n = 3 + num_tensor_inputs
    placements: list[PlacementList] = [[Replicate()] * n, [Shard(0)] * n, [Shard(1)] * n]
    if with_cp:
        placements.append([Shard(_SEQ_DIM)] * 9 + [Replicate()] * (num_tensor_inputs - 6))
    return placements


def _make_forward_strategy(with_cp: bool) -> Any:
    def strategy(op_schema: OpSchema) -> OpStrategy:
        mesh = op_schema.get_mesh_from_args()
        return expand_to_full_mesh_op_strategy(
            mesh, op_schema, _forward_strategies(with_cp), input_index=2
        )

    return strategy


def _make_backward_strategy(with_cp: bool) -> Any:
    def strategy(op_schema: OpSchema) -> OpStrategy:
        mesh = op_schema.get_mesh_from_args(validate=False)
        n_inputs = sum(isinstance(a, OpStrategy) for a in op_schema.args_schema)
        return expand_to_full_mesh_op_strategy(
            mesh, op_schema, _backward_strategies(with_cp, n_inputs), input_index=3
        )

    return strategy


def _cpu_flash_handler(
    op_call: torch._ops.OpOverload, args: tuple[object, ...], kwargs: dict[str, object]
) -> object:
    """DTensor custom-op handler: the CPU flash op on Shard(2) q/k/v runs as ring attention
    (mirrors torch's ``_sdpa_handler`` for the CUDA ops)."""
    from torch.distributed.tensor.experimental._context_parallel._attention import (
        _templated_ring_attention,
        _templated_ring_attention_backward,
    )

    dispatcher = DTensor._op_dispatcher
    op_info = dispatcher.unwrap_to_op_info(op_call, args, kwargs)
    dispatcher.sharding_propagator.propagate(op_info)
    output_sharding = op_info.output_sharding
    if output_sharding is None or output_sharding.needs_redistribute:
        raise RuntimeError(
            f"{op_call}: context parallel needs q, k, v sharded on the sequence dim (Shard(2))"
        )
    local_kwargs: dict[str, Any] = dict(op_info.local_kwargs)
    if local_kwargs.pop("attn_mask", None) is not None:
        raise NotImplementedError("CPU context parallel does not support attn_mask")
    group = op_info.compute_mesh.get_group()
    local_args: list[Any] = list(op_info.local_args)
    if op_call is _FWD:
        query, key, value, *rest = local_args
        dropout_p = float(rest[0]) if len(rest) > 0 else 0.0
        is_causal = bool(rest[1]) if len(rest) > 1 else False
        if dropout_p:
            raise NotImplementedError("context parallel does not support dropout")
        local_results = _templated_ring_attention(
            group, _SEQ_DIM, aten._scaled_dot_product_flash_attention_for_cpu,
            query=query, key=key, value=value, is_causal=is_causal, **local_kwargs,
        )  # fmt: skip
    else:
        grad_out, query, key, value, out, lse, dropout_p, is_causal = local_args
        local_results = _templated_ring_attention_backward(
            group, _SEQ_DIM, _BWD,
            grad_out=grad_out, grad_out_name="grad_out", query=query, key=key, value=value,
            out=out, logsumexp=lse, is_causal=bool(is_causal), dropout_p=dropout_p,
            **local_kwargs,
        )  # fmt: skip
    return dispatcher.wrap(local_results, output_sharding.output_spec)


def enable() -> None:
    """Register the CPU flash-attention op with torch's context-parallel dispatcher.

    Idempotent. After it, ``torch.distributed.tensor.experimental.context_parallel()`` (and the
    module-level ``_ContextParallel`` style) work on CPU tensors over gloo. On a torch series
    not in ``SUPPORTED_TORCH`` it registers nothing (``unsupported_reason`` says why), so that
    ``import torchtitan_ext`` works on any torch; ``require()`` turns CP on CPU into one error.
    """
    global _enabled
    if _enabled or unsupported_reason() is not None:
        return
    from torch.distributed.tensor.experimental._context_parallel import (
        _attention,
        _sharding_rules,
    )

    register_op_strategy(_FWD)(_make_forward_strategy(with_cp=False))
    register_op_strategy(_BWD)(_make_backward_strategy(with_cp=False))

    torch_register = _sharding_rules.register_cp_sharding_rules
    torch_unregister = _sharding_rules.unregister_cp_sharding_rules
    contexts: list[Any] = []

    def register_cp_sharding_rules() -> None:
        torch_register()
        if contexts:
            return
        for op, make in ((_FWD, _make_forward_strategy), (_BWD, _make_backward_strategy)):
            ctx = _sharding_rules._op_strategy_context(op, make(with_cp=True))
            ctx.__enter__()
            contexts.append(ctx)

    def unregister_cp_sharding_rules(clear_the_cache: bool = False) -> None:
        while contexts:
            contexts.pop().__exit__(None, None, None)
        torch_unregister(clear_the_cache=clear_the_cache)

    _sharding_rules.register_cp_sharding_rules = register_cp_sharding_rules
    _sharding_rules.unregister_cp_sharding_rules = unregister_cp_sharding_rules
    _attention.custom_ops[_FWD] = _cpu_flash_handler
    _attention.custom_ops[_BWD] = _cpu_flash_handler
    _enabled = True


def require() -> None:
    """Raise unless CP on CPU can run (call before building a CPU CP model).

    Raises:
        RuntimeError: the torch series is not in ``SUPPORTED_TORCH`` (``unsupported_reason``).
    """
    reason = unsupported_reason()
    if reason is not None:
        raise RuntimeError(reason)
    enable()


def _cpu_ring_attention(c: RecipeCheck) -> None:
    """CP on CPU needs the ring-attention hook, tied to the torch series it was checked on."""
    assert c.device is not None
    cp = max([s.cp for s in c.stages] or [c.cfg.parallelism.context_parallel_degree])
    if c.device.type == "cpu" and cp > 1 and (why := unsupported_reason()):
        raise ConfigError("parallelism.context_parallel_degree", cp, why)


RULES: tuple[Rule, ...] = (
    Rule(
        "device",
        ("parallelism.context_parallel_degree",),
        "CP on CPU needs a torch series the CPU ring attention was checked on",
        _cpu_ring_attention,
        "parallel.cpu_ring_attention",
    ),
)
"""This module's recipe rules (``torchtitan_ext.rules``); ``validate.RULES`` lists them in
its table, in phase order."""
