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

import logging
import re
import warnings
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from torchtitan_ext.errors import ConfigError
from torchtitan_ext.rules import RecipeCheck, Rule

# FSDP2's warning (torch/distributed/fsdp/_fully_shard/_fsdp_state.py,
# FSDPState._register_pre_backward_hook) when a wrapped module's output is a view, for the
# TP-sharded embedding only: RowwiseParallel's output is ``DTensor.to_local()``, which torch
# returns as a view of the reduce-scattered tensor from a custom autograd Function
# (``_ToTorchTensor``). The failure the warning describes needs an in-place op on that view,
# which autograd refuses outright for such views ("... is a view and is being modified
# inplace ... This behavior is forbidden"), and the model adds to it out of place.
EMBEDDING_VIEW_WARNING = r"FSDP2-wrapped module \(FSDPEmbedding\) returned a view tensor\. "
EMBEDDING_VIEW_WARNING_MODULE = r"torch\.distributed\.fsdp\._fully_shard\._fsdp_state$"

# DTensor's redistribute planner (torch/distributed/tensor/_redistribute.py,
# _warn_flatten_optimization_not_possible), for the gradient norm of clip_grad_norm_ on FSDP2's
# 2-D (fsdp, tp) mesh only: ``total_norm.full_tensor()`` reduces the norm's two partial dims with
# one all-reduce each (a scalar: one more small collective per step), since no flattened mesh
# spans fsdp and tp. Its other concern, ranks ending with different norms, does not arise: the
# second all-reduce gives all ranks of its group the same bits, and all groups along that dim
# reduce the same values (the first all-reduce's results) in the same order.
GRAD_NORM_REDISTRIBUTE_WARNING = (
    r"While redistributing from \(_NormPartial\(2\.0\), _NormPartial\(2\.0\)\) to "
    r"\(Replicate\(\), Replicate\(\)\), 2 sequential all_reduce operations will be "
    r"performed\. .* flatten mesh dimensions \[\"fsdp\", \"tp\"\] so DTensor can use a "
    r"single operation instead\.$"
)
REDISTRIBUTE_LOGGER = "torch.distributed.tensor._redistribute"


class DropGradNormWarning(logging.Filter):
    """Drops ``GRAD_NORM_REDISTRIBUTE_WARNING``'s record from torch's redistribute logger."""

    pattern = re.compile(GRAD_NORM_REDISTRIBUTE_WARNING, re.DOTALL)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def quiet_proven_harmless_warnings() -> None:
    """Silence the two warnings torch prints for every FSDP x TP run, each matched on its
    exact text so that any other case of the same warnings still shows. Idempotent.

    Both are proven harmless for this package's FSDP x TP meshes by the parity tests
    (``tests/test_parity.py::test_mesh_matches_single_rank``, dp_shard2xtp2xcp2 in both mesh
    orders, pp2xdp_shard2xtp2, pp2xtp2xcp2+...): every parameter's step-1 gradient, the
    embedding's included, equals the 1-rank run's (``parity.grad_deviation``) and the gradient
    norm is bitwise the same on every rank; ``tests/test_warnings.py`` checks that torch still
    refuses in-place ops on a TP embedding's output and that the filters are this narrow.
    """
    # FSDP2-wrapped module (FSDPEmbedding) returned a view tensor: harmless here, see
    # EMBEDDING_VIEW_WARNING (proof: tests/test_parity.py::test_mesh_matches_single_rank).
    warnings.filterwarnings(
        "ignore",
        message=EMBEDDING_VIEW_WARNING,
        category=UserWarning,
        module=EMBEDDING_VIEW_WARNING_MODULE,
    )
    # 2 sequential all_reduce for the grad norm: see GRAD_NORM_REDISTRIBUTE_WARNING (proof:
    # the same parity tests' grad norms, equal to 1 rank's and identical on all ranks).
    logger = logging.getLogger(REDISTRIBUTE_LOGGER)
    if not any(isinstance(f, DropGradNormWarning) for f in logger.filters):
        logger.addFilter(DropGradNormWarning())


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
    cpu_offload: bool = False,
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
        cpu_offload: ``training.enable_cpu_offload``: FSDP2's ``CPUOffloadPolicy`` (as
            TorchTitan's ``apply_fsdp``): the sharded parameters, their gradients and the
            optimizer state live in pinned host memory; each unit's parameters are copied to
            the device for its all-gather and its reduced gradients copied back, and the
            optimizer steps on the CPU. The model must be materialized on the CPU
            (``init_weights_mesh_independent(..., device=cpu, buffer_device=<device>)``).
    """
    allow_non_ascending_flattening()
    if any(isinstance(p, DTensor) for p in model.parameters()):  # TP: FSDP's mesh is 2-D
        quiet_proven_harmless_warnings()
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # Pinned host memory (asynchronous copies) needs CUDA; a CPU mesh (tests) copies plainly.
    pinned = dp_mesh.device_type == "cuda"
    offload = CPUOffloadPolicy(pin_memory=pinned) if cpu_offload else OffloadPolicy()
    reshard = {
        "always": True,
        "never": False,
        # With PP, resharding after every microbatch forward re-gathers per microbatch.
        "default": not pp_enabled,
    }[reshard_after_forward_policy]
    tok_embeddings = getattr(model, "tok_embeddings", None)
    if tok_embeddings is not None:
        fully_shard(
            tok_embeddings,
            mesh=dp_mesh,
            mp_policy=mp_policy,
            reshard_after_forward=reshard,
            offload_policy=offload,
        )
    layers: nn.Module = model.get_submodule("layers")
    for block in layers.children():
        fully_shard(
            block,
            mesh=dp_mesh,
            mp_policy=mp_policy,
            reshard_after_forward=reshard,
            offload_policy=offload,
        )
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
            offload_policy=offload,
        )
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy, offload_policy=offload)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            if dp_mesh.device_type == "cpu":
                # Divide factor 1 means NCCL's PREMUL_SUM, which gloo lacks; plain SUM (with
                # an exact post-multiply by 1) is the same reduction.
                module.set_force_sum_reduction_for_comms(True)


def check_cpu_offload(cfg: Any, device_type: str) -> None:
    """``training.enable_cpu_offload`` needs a CUDA device: it moves parameters, gradients and
    optimizer state from the GPU to host memory, where a CPU run keeps them anyway.
    ``device_type``: the resolved training device ("cpu" or "cuda").

    Raises:
        ConfigError: naming the key, on a device other than CUDA.
    """
    if cfg.training.enable_cpu_offload and device_type != "cuda":
        raise ConfigError(
            "training.enable_cpu_offload",
            True,
            f"FSDP2's CPU offload moves parameters, gradients and optimizer state from a CUDA "
            f"device to host memory; this run is on {device_type}, where they already are: "
            f"remove it (--training.no-enable-cpu-offload)",
        )


def _cpu_offload(c: RecipeCheck) -> None:
    assert c.device is not None
    check_cpu_offload(c.cfg, c.device.type)


RULES: tuple[Rule, ...] = (
    Rule(
        "device",
        ("training.enable_cpu_offload",),
        "FSDP CPU offload needs CUDA",
        _cpu_offload,
        "parallel.fsdp",
    ),
)
"""This module's recipe rules (``torchtitan_ext.rules``); ``validate.RULES`` lists them in
its table, in phase order."""
