"""Activation checkpointing: TorchTitan 0.2.2's ``apply_ac`` with a CPU-aware op save list, and
activation offload of the checkpointed block inputs to host memory (``OffloadedBlock``)."""

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import save_on_cpu
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper
from torchtitan.distributed.activation_checkpoint import apply_ac as titan_apply_ac

from torchtitan_ext.errors import ConfigError
from torchtitan_ext.long_context.tiled_mlp import TiledFeedForward
from torchtitan_ext.rules import RecipeCheck, Rule

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

    With full AC of blocks whose feed-forward is tiled (``long_context.tiled_mlp``), the
    checkpoint's early stop is on (``early_stop``; TorchTitan's default is off): the block's
    recompute then ends at the feed-forward's saved input instead of running its tiles, which
    recompute in their own backward, so the feed-forward runs twice per step, not three times.
    """
    if ac_config.mode == "full" and any(isinstance(m, TiledFeedForward) for m in model.modules()):
        ac_config = dataclasses.replace(ac_config, early_stop=True)
    titan_apply_ac(
        model,
        ac_config,
        model_compile_enabled=compile_enabled,
        op_sac_save_list=OP_SAC_SAVE_LIST,
        base_folder=dump_folder,
    )


class OffloadedBlock(ActivationWrapper):
    """A transformer block whose saved tensors are kept in host memory between its forward and
    backward: the forward runs under torch's ``save_on_cpu`` (``torch.autograd.graph``), whose
    pack hook copies each tensor autograd saves to (pinned) CPU memory and whose unpack hook
    copies it back to the tensor's device when backward needs it.

    Around a full-AC block (``checkpoint_wrapper``, non-reentrant) the only tensors saved
    outside the checkpoint's own hooks are the checkpoint's inputs, so exactly the block input
    (local batch x local tokens x dim, the activation dtype) moves to the host; the block's
    intermediates are recomputed on the device as before. torch's ``OffloadWrapper`` does the
    same with ``pin_memory=True`` fixed; this class takes it as an argument so that CPU tests
    can run it. State-dict keys are the wrapped block's (``ActivationWrapper`` strips its
    prefix), so checkpoints load with or without offload.

    The copy back runs on the current stream just before the block's recompute: it is not
    overlapped with compute, which costs one host-to-device copy of the block input per block
    (about 1 GiB at 256K tokens x dim 2048 in bf16: ~40 ms at 25 GB/s, against seconds of
    recompute and backward per block at that length).
    """

    def __init__(self, block: nn.Module, pin_memory: bool) -> None:
        super().__init__(block)
        self.pin_memory = pin_memory

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with save_on_cpu(pin_memory=self.pin_memory):
            return self._checkpoint_wrapped_module(*args, **kwargs)


def apply_activation_offload(model: nn.Module, pin_memory: bool = True) -> int:
    """Wrap every transformer block of ``model`` (``model.layers``, after ``apply_ac`` with
    mode "full") in ``OffloadedBlock``, in place; a pipeline stage's missing layers are skipped.

    Args:
        pin_memory: page-locked host buffers (CUDA: asynchronous, faster copies); False on CPU.

    Returns:
        The number of blocks wrapped.
    """
    layers = getattr(model, "layers", None)
    if layers is None:
        return 0
    for name, block in list(layers.named_children()):
        layers.register_module(name, OffloadedBlock(block, pin_memory))
    return len(layers)


def check_activation_offload(cfg: Any, device_type: str) -> None:
    """``activation_checkpoint.enable_cpu_offload`` needs full AC (what it offloads are the
    block inputs full AC keeps) and a CUDA device (on CPU there is nothing to offload to).
    ``device_type``: the resolved training device ("cpu" or "cuda").

    Raises:
        ConfigError: naming the key and what it needs.
    """
    ac = cfg.activation_checkpoint
    if not ac.enable_cpu_offload:
        return
    if device_type != "cuda":
        raise ConfigError(
            "activation_checkpoint.enable_cpu_offload",
            True,
            f"offloads activations from a CUDA device to host memory; this run is on "
            f"{device_type}, where activations already live in host memory",
        )
    if ac.mode != "full":
        raise ConfigError(
            "activation_checkpoint.enable_cpu_offload",
            True,
            f'needs activation_checkpoint.mode = "full" (it offloads the block inputs full AC '
            f"keeps), not {ac.mode!r}",
        )


SUPPORTED_AC_MODES = ("none", "selective", "full")


def _ac_mode(c: RecipeCheck) -> None:
    mode = c.cfg.activation_checkpoint.mode
    if mode not in SUPPORTED_AC_MODES:
        raise ConfigError(
            "activation_checkpoint.mode",
            mode,
            f"supported modes are {', '.join(SUPPORTED_AC_MODES)}",
        )


def _activation_offload(c: RecipeCheck) -> None:
    assert c.device is not None
    check_activation_offload(c.cfg, c.device.type)


RULES: tuple[Rule, ...] = (
    Rule(
        "recipe",
        ("activation_checkpoint.mode",),
        f"one of {', '.join(SUPPORTED_AC_MODES)}",
        _ac_mode,
        "parallel.activation_checkpoint",
    ),
    Rule(
        "device",
        ("activation_checkpoint.enable_cpu_offload",),
        "offload needs CUDA and full AC",
        _activation_offload,
        "parallel.activation_checkpoint",
    ),
)
"""This module's recipe rules (``torchtitan_ext.rules``); ``validate.RULES`` lists them in
its table, in phase order."""
