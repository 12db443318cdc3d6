"""The parallelize function: every parallelism, applied to one model (or pipeline stage) over
one DeviceMesh, in the order it must happen.

Order (TorchTitan 0.2.2 ``parallelize_llama``, plus the long-context memory features): with
chunked cross-entropy, the output projection is first deferred to the loss
(``torchtitan_ext.long_context.chunked_loss``), and with tiled MLP the feed-forwards become
tiled (``torchtitan_ext.long_context.tiled_mlp``), both before any parallelism sees them;
tensor parallel next (it rewrites the parameters into DTensors over the tp mesh), then context
parallel on the attention modules, then, when any stage masks documents, the block-causal
attention around them (``torchtitan_ext.parallel.cp_block_causal``), then activation
checkpointing (wraps the blocks, which TP and CP have already rewritten), then
``torch.compile`` per block (compiles the wrapped block, so AC is traced into the graph), then
activation offload (around the compiled block, so the checkpoint's saved inputs go to host
memory), and FSDP2 last (it shards whatever parameters the previous steps produced, composing
its dp_shard x cp mesh with the tp mesh into 2-D DTensors; with ``training.enable_cpu_offload``
its shards live in host memory, on one rank too). The model definition carries no parallel
code. Model converters (float8, ``torchtitan_ext.converters``) run before this function, on the
whole model, as in TorchTitan's trainer; tensor parallel then uses torchao's float8 styles.

With pipeline parallel, the model is first split into stages
(``torchtitan_ext.parallel.pipeline.pipeline_split``) and this function runs on each stage
module: a stage is a TorchTitan model whose other stages' modules are None, and every step
below only touches the modules a stage holds.
"""

from typing import Any

import torch
from torch import nn
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.models.llama3.infra.parallelize import apply_compile

from torchtitan_ext.converters import float8_tensorwise_tp
from torchtitan_ext.long_context.chunked_loss import defer_output_projection
from torchtitan_ext.long_context.tiled_mlp import apply_tiled_mlp
from torchtitan_ext.parallel.activation_checkpoint import apply_ac, apply_activation_offload
from torchtitan_ext.parallel.context_parallel import apply_cp
from torchtitan_ext.parallel.cp_block_causal import apply_block_causal, needs_block_causal
from torchtitan_ext.parallel.cp_patterns import recipe_pattern
from torchtitan_ext.parallel.fsdp import apply_fsdp
from torchtitan_ext.parallel.tensor_parallel import apply_tp
from torchtitan_ext.parallel_dims import ParallelDims


def parallelize(model: nn.Module, dims: ParallelDims, cfg: Any, device: torch.device) -> nn.Module:
    """Apply TP, CP, AC, compile, activation offload and FSDP/HSDP to ``model`` (on the meta
    device), in place.

    Args:
        model: a TorchTitan Llama-style model on the meta device.
        dims: the job's ParallelDims with its mesh built.
        cfg: the merged JobConfig.
        device: the training device (mixed precision is bf16 on CUDA, fp32 on CPU).

    Returns:
        The same model.
    """
    compile_model = cfg.compile.enable and "model" in cfg.compile.components
    chunked_loss = cfg.training.loss_chunk_tokens > 0
    if chunked_loss:
        # The output projection moves into the loss (ChunkedCrossEntropy), chunk by chunk.
        defer_output_projection(model)
    if cfg.training.mlp_tile_tokens > 0:
        apply_tiled_mlp(model, cfg.training.mlp_tile_tokens)
    if dims.tp_enabled:
        apply_tp(
            model,
            dims.get_mesh("tp"),
            loss_parallel=not cfg.parallelism.disable_loss_parallel,
            output_deferred=chunked_loss,
            # Float8 all-gathers need NCCL (gloo has no float8 dtypes: emulated float8 on
            # CPU all-gathers in high precision).
            float8_tensorwise=float8_tensorwise_tp(cfg) and device.type == "cuda",
        )
    if dims.cp_enabled:
        p = cfg.parallelism
        apply_cp(
            model,
            dims.get_mesh("cp"),
            p.context_parallel_rotate_method,
            p.context_parallel_load_balancer,
            recipe_pattern(p, dims.cp),
        )
    if needs_block_causal(cfg, getattr(model, "model_args", None)):
        # Attention takes a DocumentMask (after CP: the causal module it keeps is CP's).
        cp_mesh = dims.get_mesh("cp") if dims.cp_enabled else None
        apply_block_causal(model, cp_mesh, recipe_pattern(cfg.parallelism, dims.cp))
    if cfg.activation_checkpoint.mode != "none":
        apply_ac(model, cfg.activation_checkpoint, compile_model, cfg.job.dump_folder)
    if compile_model:
        apply_compile(model, cfg.compile)
    if cfg.activation_checkpoint.enable_cpu_offload:
        # Around the compiled checkpointed block: its inputs go to pinned host memory.
        apply_activation_offload(model, pin_memory=device.type == "cuda")
    cpu_offload = cfg.training.enable_cpu_offload
    # CPU offload needs FSDP's units, also on one rank (a 1-rank "fsdp" mesh).
    if dims.fsdp_enabled or dims.dp_replicate_enabled or cpu_offload:
        mesh = dims.get_mesh("hsdp") if dims.dp_replicate_enabled else dims.get_mesh("fsdp")
        apply_fsdp(
            model,
            mesh,
            param_dtype=param_dtype(cfg, device),
            reduce_dtype=TORCH_DTYPE_MAP[cfg.training.mixed_precision_reduce],
            reshard_after_forward_policy=cfg.parallelism.fsdp_reshard_after_forward,
            pp_enabled=dims.pp_enabled,
            output_used_after_forward=chunked_loss,
            cpu_offload=cpu_offload,
        )
    return model


def param_dtype(cfg: Any, device: torch.device) -> torch.dtype:
    """Compute dtype of parameters: ``training.mixed_precision_param`` on CUDA, fp32 on CPU
    (CPU bf16 matmuls are slow and parity checks need fp32)."""
    if device.type == "cpu":
        return torch.float32
    return TORCH_DTYPE_MAP[cfg.training.mixed_precision_param]
