"""Dry run: the per-rank memory of a recipe on a cluster this machine does not have.

For one rank at a time, ``plan_rank`` starts torch's fake process group (``FakeProcessGroup``:
collectives are no-ops, every rank of any world size can be simulated in one process), builds
the job's DeviceMesh, the model on the meta device, and applies the real pipeline split and
``parallelize`` (TP, CP, AC, FSDP). Parameter bytes are then read from the actual DTensor shards
of that rank; gradients are the same size (fp32, sharded like the parameters); AdamW keeps two
fp32 moments per parameter. Activations are estimated, not measured (see
``activation_bytes``).

Used by ``scripts/plan.py``; no GPU and no real process group needed.
"""

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.protocols.train_spec import get_train_spec
from torchtitan.tools.utils import set_default_dtype

from torchtitan_ext.config.validate import resolve_model_args, validate
from torchtitan_ext.models import build_model_on_meta
from torchtitan_ext.parallel.pipeline import pipeline_split, plan_pipeline
from torchtitan_ext.parallel_dims import ParallelDims
from torchtitan_ext.parallelize import parallelize

GIB = 1024**3


@dataclass
class RankPlan:
    """One rank's memory (bytes) for a recipe and world size.

    Attributes:
        rank: global rank; coords: its index in each mesh dim.
        modules: the top-level modules its pipeline stage(s) hold.
        param_bytes: this rank's parameter shards (training.dtype, fp32 by default).
        grad_bytes: gradients, sharded like the parameters (same dtype).
        optim_bytes: AdamW's two moments (fp32) per local parameter element.
        activation_bytes: estimate for one step (see ``activation_bytes``).
    """

    rank: int
    coords: dict[str, int]
    modules: list[str]
    param_bytes: int
    grad_bytes: int
    optim_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optim_bytes + self.activation_bytes


def _local_numel_bytes(parts: list[nn.Module]) -> tuple[int, int]:
    numel = nbytes = 0
    for part in parts:
        for p in part.parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            numel += local.numel()
            nbytes += local.numel() * local.element_size()
    return numel, nbytes


def activation_bytes(cfg: Any, dims: ParallelDims, model_args: Any, n_layers_here: int,
                     stage_index: int, n_microbatches: int, has_output: bool) -> int:  # fmt: skip
    """Estimated activation memory of one rank at its peak, in bytes.

    Per transformer layer and microbatch, with sequence parallel, s·b·h·34/tp activations of 2
    bytes (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
    Models", arXiv 2205.05198, Table 2, without its 5·a·s/h attention-score term: SDPA /
    FlashAttention does not store the scores), with s = seq_len / cp. Activation checkpointing
    "full" keeps only each layer's input (2·s·b·h/tp) plus one layer recomputed at a time;
    "selective" is counted like "none" (the scores it would save are not stored anyway). Scaled
    by the activation dtype (bf16 on GPU: x1; fp32: x2). The logits and their gradient (fp32,
    vocab / tp with loss parallel) on the last stage. With pipeline parallel, stage k holds
    min(microbatches, pp - k) microbatches in flight (1F1B); without, one.
    """
    h, vocab = model_args.dim, model_args.vocab_size
    tp, cp = dims.tp, dims.cp
    s = cfg.training.seq_len // cp
    b = (
        cfg.parallelism.pipeline_parallel_microbatch_size
        if dims.pp > 1
        else (cfg.training.local_batch_size)
    )
    act_dtype = TORCH_DTYPE_MAP[cfg.training.mixed_precision_param]
    scale = torch.tensor([], dtype=act_dtype).element_size() / 2
    per_layer = s * b * h * 34 / tp * scale
    if cfg.activation_checkpoint.mode == "full":
        held = n_layers_here * 2 * s * b * h / tp * scale + per_layer
    else:
        held = n_layers_here * per_layer
    in_flight = min(n_microbatches, dims.pp - stage_index) if dims.pp > 1 else 1
    logits = 2 * s * b * vocab / tp * 4 if has_output else 0
    return int(held * in_flight + logits)


def plan_rank(cfg: Any, world_size: int, rank: int) -> RankPlan:
    """Build ``rank``'s part of the job on a fake process group and measure it.

    Raises:
        ConfigError: the recipe does not validate for ``world_size``.
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    cfg = copy.deepcopy(cfg)
    cfg.compile = dataclasses.replace(cfg.compile, enable=False)  # no tracing needed
    dims = validate(cfg, world_size)
    assert dims is not None
    model_args = resolve_model_args(cfg)
    model_args.update_from_config(cfg)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        dims.build_mesh("cpu")
        spec = get_train_spec(cfg.model.name)
        with set_default_dtype(TORCH_DTYPE_MAP[cfg.training.dtype]):
            model = build_model_on_meta(spec.model_cls, model_args)
        device = torch.device("cpu")
        stage_index, n_micro = 0, 1
        if dims.pp_enabled:
            plan = plan_pipeline(cfg, model_args.n_layers)
            pipeline = pipeline_split(
                model, dims.get_mesh("pp"), plan, cfg, device,
                lambda part: parallelize(part, dims, cfg, device),
                lambda pred, labels: pred.sum(),
            )  # fmt: skip
            parts = pipeline.model_parts
            stage_index = dims.get_mesh("pp").get_local_rank()
            n_micro = plan.n_microbatches
        else:
            parts = [parallelize(model, dims, cfg, device)]
        coords = {name: dims.get_mesh(name).get_local_rank() for name in dims.order}
    finally:
        dist.destroy_process_group()
    numel, param_bytes = _local_numel_bytes(parts)
    modules = [name for part in parts for name, m in part.named_children() if m is not None]
    layers = sum(len(list(part.get_submodule("layers").children())) for part in parts)
    has_output = any(getattr(part, "output", None) is not None for part in parts)
    acts = activation_bytes(cfg, dims, model_args, layers, stage_index, n_micro, has_output)
    return RankPlan(rank, coords, modules, param_bytes, param_bytes, numel * 8, acts)


def stage_ranks(dims: ParallelDims) -> list[int]:
    """One representative rank per pipeline stage (ranks within a stage hold equal shards
    when the degrees divide the model evenly): the first rank of each pp index."""
    per_stage = dims.world_size // dims.pp
    return [k * per_stage for k in range(dims.pp)]


def format_table(plans: list[RankPlan], budget_gib: float | None) -> str:
    """Per-rank memory in GiB, one row per rank."""
    lines = [
        "| rank | mesh coords | params GiB | grads GiB | optimizer GiB | activations GiB (est.) "
        "| total GiB | fits |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for p in plans:
        coords = " ".join(f"{k}{v}" for k, v in p.coords.items())
        fits = "" if budget_gib is None else ("yes" if p.total_bytes / GIB <= budget_gib else "NO")
        lines.append(
            f"| {p.rank} | {coords} | {p.param_bytes / GIB:.2f} | {p.grad_bytes / GIB:.2f} | "
            f"{p.optim_bytes / GIB:.2f} | {p.activation_bytes / GIB:.2f} | "
            f"{p.total_bytes / GIB:.2f} | {fits} |"
        )
    return "\n".join(lines)
