"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over the dp_shard x cp mesh, or HSDP.

Follows ``apply_fsdp`` of TorchTitan 0.2.2 (``torchtitan/models/llama3/infra/parallelize.py``):
one FSDP unit for the embedding, one per transformer block, one for [norm, output] and the root;
FSDP's own gradient division is disabled because the loss is already divided by the global
number of label tokens (``torchtitan_ext.trainer``), so the reduce-scatter must sum (on gloo
as a plain SUM: gloo has no PREMUL_SUM).

With TP, FSDP2 composes its (dp_shard x cp) mesh and the tp mesh of TP's DTensors into one 2-D
mesh with ``DeviceMesh._concatenate``, which accepts any order of the dims in the world mesh,
so cp may stay innermost (``parallelism.mesh_dim_order``'s default) after tp;
``allow_non_ascending_flattening`` works around the one place in torch 2.13 that still
assumes ascending dims.
"""

from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def non_ascending_fsdp_tp_supported() -> bool:
    """Whether this torch composes FSDP with TP when the FSDP dims (dp_shard, cp) are not all
    before tp in the world mesh: FSDP2 builds the 2-D mesh with ``DeviceMesh._concatenate``
    and ``allow_non_ascending_flattening`` can patch the redistribute planner (torch 2.13)."""
    from torch.distributed.tensor import _redistribute

    return hasattr(DeviceMesh, "_concatenate") and hasattr(
        _redistribute, "_get_flattened_mesh_by_layout_impl"
    )


def allow_non_ascending_flattening() -> None:
    """Let DTensor's redistribute planner skip merging collectives over mesh dims whose names
    are not in ascending order in the world mesh, instead of raising. Idempotent; a no-op on a
    torch without that planner lookup (``non_ascending_fsdp_tp_supported``).

    torch 2.13's planner (``torch/distributed/tensor/_redistribute.py``) tries to merge the
    all-gathers or reduce-scatters of several mesh dims into one collective over an already
    flattened mesh, and looks that mesh up by re-slicing the world mesh by the dims' names
    (``_get_flattened_mesh_by_layout_impl``). For FSDP2's 2-D (fsdp, tp) mesh with cp
    innermost, "fsdp" (dp_shard x cp) comes after "tp" in the world mesh, the slice raises
    ``KeyError("... Mesh dim indices should be in ascending order")`` and the step fails.
    No flattened mesh spans those dims anyway, so the lookup's answer is "none": the planner
    then issues one collective per mesh dim, as it does for any dims without a flattened mesh.
    Checked by the parity tests (dp_shard2 x tp2 x cp2 and others, cp innermost, against 1
    rank).
    """
    from torch.distributed.tensor import _redistribute

    if not non_ascending_fsdp_tp_supported():
        return
    lookup: Any = _redistribute._get_flattened_mesh_by_layout_impl
    if getattr(lookup, "_non_ascending_ok", False):
        return

    def lookup_or_none(mesh: DeviceMesh, mesh_dims: tuple[int, ...]) -> DeviceMesh | None:
        try:
            return lookup(mesh, mesh_dims)
        except KeyError:  # dims not ascending in the world mesh: no flattened mesh
            return None

    lookup_or_none._non_ascending_ok = True  # type: ignore[attr-defined]
    _redistribute._get_flattened_mesh_by_layout_impl = lookup_or_none


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    reshard_after_forward_policy: Literal["default", "always", "never"] = "default",
    pp_enabled: bool = False,
    output_used_after_forward: bool = False,
) -> None:
    """Shard a TorchTitan Llama-style model (``tok_embeddings``, ``layers``, ``norm``,
    ``output``) with FSDP2, in place.

    Args:
        model: the model, typically on the meta device.
        dp_mesh: 1-D (FSDP over dp_shard x cp) or 2-D (HSDP: dp_replicate, dp_shard x cp).
        param_dtype: dtype of the all-gathered parameters used in compute (bf16 on GPU).
        reduce_dtype: dtype of the gradient reduce-scatter (fp32).
        reshard_after_forward_policy: "always", "never", or "default" (reshard unless pp).
        pp_enabled: whether pipeline parallelism is on (for the "default" policy).
        output_used_after_forward: the loss applies ``output``'s weight after the forward
            (chunked cross-entropy): the [norm, output] unit is never resharded after forward,
            so the weight is gathered once per step, whatever the policy.
    """
    allow_non_ascending_flattening()
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    reshard = {
        "always": True,
        "never": False,
        # With PP, resharding after every microbatch forward re-gathers per microbatch.
        "default": not pp_enabled,
    }[reshard_after_forward_policy]
    tok_embeddings = getattr(model, "tok_embeddings", None)
    if tok_embeddings is not None:
        fully_shard(
            tok_embeddings, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard
        )
    layers: nn.Module = model.get_submodule("layers")
    for block in layers.children():
        fully_shard(block, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard)
    norm, output = getattr(model, "norm", None), getattr(model, "output", None)
    if norm is not None and output is not None:
        # The last unit is needed again right after forward: keep it unless told "always".
        fully_shard(
            [norm, output],
            mesh=dp_mesh,
            mp_policy=mp_policy,
            reshard_after_forward=(
                reshard_after_forward_policy == "always" and not output_used_after_forward
            ),
        )
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            if dp_mesh.device_type == "cpu":
                # Divide factor 1 means NCCL's PREMUL_SUM, which gloo lacks; plain SUM (with
                # an exact post-multiply by 1) is the same reduction.
                module.set_force_sum_reduction_for_comms(True)
