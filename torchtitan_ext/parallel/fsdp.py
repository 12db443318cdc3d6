"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over the dp_shard x cp mesh, or HSDP.

Follows ``apply_fsdp`` of TorchTitan 0.2.2 (``torchtitan/models/llama3/infra/parallelize.py``):
one FSDP unit for the embedding, one per transformer block, one for [norm, output] and the root;
FSDP's own gradient division is disabled because the loss is already divided by the global
number of label tokens (``torchtitan_ext.trainer``), so the reduce-scatter must sum (on gloo
as a plain SUM: gloo has no PREMUL_SUM).
"""

from typing import Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


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
