"""Activation checkpointing: TorchTitan 0.2.2's ``apply_ac`` with a CPU-aware op save list."""

from typing import Any

import torch
from torch import nn
from torchtitan.distributed.activation_checkpoint import apply_ac as titan_apply_ac

# Ops whose outputs selective op-level AC saves instead of recomputing: matmuls and the
# attention kernels (TorchTitan's list, plus the CPU flash-attention op it lacks).
OP_SAC_SAVE_LIST: set[Any] = {
    torch.ops.aten.mm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_attention_math.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops.aten.max.default,
}


def apply_ac(model: nn.Module, ac_config: Any, compile_enabled: bool, dump_folder: str) -> None:
    """Wrap the transformer blocks of ``model`` for activation checkpointing, in place.

    Args:
        ac_config: ``activation_checkpoint`` section: mode "full" (recompute each block),
            "selective" with ``selective_ac_option`` = "N" (every N-th block) or "op" (save the
            outputs of ``OP_SAC_SAVE_LIST``, recompute the rest).
        compile_enabled: whether blocks will be compiled (TorchTitan adapts its wrappers).
        dump_folder: job dump folder (TorchTitan writes memory-budget plots there).
    """
    titan_apply_ac(
        model,
        ac_config,
        model_compile_enabled=compile_enabled,
        op_sac_save_list=OP_SAC_SAVE_LIST,
        base_folder=dump_folder,
    )
