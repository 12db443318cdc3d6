"""Dry run: the per-rank memory of a recipe on a cluster this machine does not have.

For one rank at a time, ``plan_rank`` starts torch's fake process group (``FakeProcessGroup``:
collectives are no-ops, every rank of any world size can be simulated in one process), builds
the job's DeviceMesh, the model on the meta device, and applies the real pipeline split and
``parallelize`` (TP, CP, AC, FSDP). Parameter bytes are then read from the actual DTensor shards
of that rank; gradients are the same size (fp32, sharded like the parameters); AdamW keeps two
fp32 moments per parameter. Activations and communication are estimated, not measured
(``memory_estimate.activation_estimate``, ``comm_estimate.comm_estimate``); this module is the
driver: ``plan_rank`` and ``estimate`` feed them the rank's shards, ``stage_ranks`` picks the
ranks to plan, ``format_table`` prints the plans, ``forget_fake_meshes`` clears what the fake
run leaves in torch's DTensor caches.

Used by ``scripts/plan.py``, ``auto_mesh`` and ``ablation``; no GPU and no real process group
needed.
"""

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.protocols.train_spec import get_train_spec
from torchtitan.tools.utils import set_default_dtype

from torchtitan_ext.models import build_model_on_meta
from torchtitan_ext.parallel import cp_patterns
from torchtitan_ext.parallel.pipeline import pipeline_split, plan_pipeline
from torchtitan_ext.parallel_dims import ParallelDims
from torchtitan_ext.parallelize import parallelize
from torchtitan_ext.tools.comm_estimate import (
    COMM_KINDS,
    collective_counts,
    comm_estimate,
    cp_node_split,
)
from torchtitan_ext.tools.memory_estimate import (
    Activations,
    ModelDims,
    activation_estimate,
    local_numel_bytes,
    work_of,
)
from torchtitan_ext.validate import resolve_model_args, validate

GIB = 1024**3


@dataclass
class RankPlan:
    """One rank's memory (bytes) and communication (bytes per step) for a recipe and world size.

    Attributes:
        rank: global rank; coords: its index in each mesh dim.
        modules: the top-level modules its pipeline stage(s) hold.
        param_bytes: this rank's parameter shards (training.dtype, fp32 by default).
        grad_bytes: gradients, sharded like the parameters (same dtype).
        optim_bytes: AdamW's two moments (fp32) per local parameter element.
        activations: estimate (see ``activation_estimate``).
        comm_bytes: bytes sent per optimizer step by kind (see ``comm_estimate``).
        comm_calls: collective calls per optimizer step by kind (``collective_counts``).
        cp_inter_node_bytes: CP bytes per step sent to other nodes (``cp_node_split``, for the
            ``ranks_per_node`` given to ``plan_rank``) by the rank of this rank's cp group
            that sends the most across nodes.
    """

    rank: int
    coords: dict[str, int]
    modules: list[str]
    param_bytes: int
    grad_bytes: int
    optim_bytes: int
    activations: Activations
    comm_bytes: dict[str, int]
    cp_inter_node_bytes: int = 0
    comm_calls: dict[str, int] = field(default_factory=dict)

    @property
    def activation_bytes(self) -> int:
        """Estimated peak activation bytes."""
        return self.activations.peak

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optim_bytes + self.activation_bytes


def estimate(
    cfg: Any, dims: ParallelDims, model_dims: ModelDims, parts: list[nn.Module],
    stage_index: int, act_dtype: torch.dtype, cp_index: int | None = None,
) -> tuple[Activations, dict[str, int]]:  # fmt: skip
    """Activation and communication estimates for one rank holding the (parallelized) model
    ``parts`` of pipeline stage row ``stage_index`` at index ``cp_index`` of its cp group
    (None: read from the live cp mesh)."""
    numel, _ = local_numel_bytes(parts)
    last_unit = [
        m
        for part in parts
        for m in (getattr(part, "norm", None), getattr(part, "output", None))
        if m is not None
    ]
    last_numel, _ = local_numel_bytes(last_unit)
    layers = sum(len(list(part.get_submodule("layers").children())) for part in parts)
    stages = [
        (getattr(p, "tok_embeddings", None) is not None, getattr(p, "output", None) is not None)
        for p in parts
    ]
    has_output = any(last for _, last in stages)
    work = work_of(cfg, dims, act_dtype)
    acts = activation_estimate(cfg, dims, model_dims, work, layers, stage_index, has_output)
    if cp_index is None:
        cp_index = dims.get_mesh("cp").get_local_rank() if dims.cp > 1 else 0
    comm = comm_estimate(cfg, dims, model_dims, work, numel, last_numel, layers, stages, cp_index)
    return acts, comm


def plan_rank(
    cfg: Any, world_size: int, rank: int, act_dtype: torch.dtype | None = None,
    ranks_per_node: int = 8,
) -> RankPlan:  # fmt: skip
    """Build ``rank``'s part of the job on a fake process group and measure it.

    Args:
        act_dtype: compute dtype of activations and all-gathered parameters; default
            ``training.mixed_precision_param`` (what a GPU run uses).
        ranks_per_node: consecutive global ranks per node, for the CP traffic's inter-node
            part.

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
        model_dims = ModelDims.of(model)
        device = torch.device("cpu")
        stage_index = 0
        if dims.pp_enabled:
            plan = plan_pipeline(cfg, model_args.n_layers)
            pipeline = pipeline_split(
                model, dims.get_mesh("pp"), plan, cfg, device,
                lambda part: parallelize(part, dims, cfg, device),
                lambda pred, labels: pred.sum(),
            )  # fmt: skip
            parts = pipeline.model_parts
            stage_index = dims.get_mesh("pp").get_local_rank()
        else:
            parts = [parallelize(model, dims, cfg, device)]
        coords = {name: dims.get_mesh(name).get_local_rank() for name in dims.order}
        cp_ranks = [int(r) for r in dims.get_mesh("cp").mesh.flatten().tolist()]
    finally:
        dist.destroy_process_group()
        forget_fake_meshes()
    numel, param_bytes = local_numel_bytes(parts)
    modules = [name for part in parts for name, m in part.named_children() if m is not None]
    act_dtype = act_dtype or TORCH_DTYPE_MAP[cfg.training.mixed_precision_param]
    acts, comm = estimate(cfg, dims, model_dims, parts, stage_index, act_dtype, coords["cp"])
    layers = sum(len(list(part.get_submodule("layers").children())) for part in parts)
    work = work_of(cfg, dims, act_dtype)
    cp_inter = max(  # the busiest rank of this rank's cp group (patterns are not uniform)
        cp_node_split(cfg, dims, model_dims, work, layers, i, cp_ranks, ranks_per_node)[1]
        for i in range(dims.cp)
    )
    stages = [
        (getattr(p, "tok_embeddings", None) is not None, getattr(p, "output", None) is not None)
        for p in parts
    ]
    calls = collective_counts(cfg, dims, model_dims, work, layers, stages, coords["cp"])
    return RankPlan(
        rank, coords, modules, param_bytes, param_bytes, numel * 8, acts, comm, cp_inter, calls
    )


def forget_fake_meshes() -> None:
    """Clear torch's DTensor caches after a fake-process-group run, so that a real run in the
    same process never gets a fake mesh back from them.

    DTensor caches sharding propagation (output specs, which hold their DeviceMesh) and
    redistribution plans, keyed by DeviceMesh, whose equality compares layouts, ranks, device
    type and dim names but not the process group or this rank's coordinate. A real mesh of the
    same shape as one built on the fake process group (as rank 0) then hits the fake entries:
    the outputs of DTensor ops (e.g. FSDP2's state dict) carry the fake mesh, every rank
    reports coordinate 0, and DCP's save fails ("Failed to validate global plan ... invalid
    fill") because all ranks claim the first shard (found with ``curriculum.auto_mesh``, which
    plans before training starts). Uses torch's own helper
    ``torch.distributed.tensor.debug._clear_sharding_prop_cache``. Also forgets the fake run's
    CP pattern registrations (``cp_patterns.unregister_all``).
    """
    from torch.distributed.tensor import _redistribute
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    _clear_sharding_prop_cache()
    cp_patterns.unregister_all()  # the fake run's cp groups (their names will be reused)
    transform_infos = getattr(_redistribute, "_gen_transform_infos", None)
    if transform_infos is not None and hasattr(transform_infos, "cache_clear"):
        transform_infos.cache_clear()


def stage_ranks(dims: ParallelDims) -> list[int]:
    """One representative rank per pipeline stage (ranks within a stage hold equal shards
    when the degrees divide the model evenly): the first rank of each pp index."""
    per_stage = dims.world_size // dims.pp
    return [k * per_stage for k in range(dims.pp)]


def format_table(plans: list[RankPlan], budget_gib: float | None) -> str:
    """Per-rank memory in GiB and estimated bytes sent per step (GiB) by kind, and the CP
    traffic's inter-node part, one row per rank."""
    lines = [
        "| rank | mesh coords | params GiB | grads GiB | optimizer GiB | activations GiB (est.) "
        "| total GiB | fits | comm GiB/step: " + " / ".join(COMM_KINDS) + " | cp inter-node "
        "GiB/step |",
        "|---:|---|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for p in plans:
        coords = " ".join(f"{k}{v}" for k, v in p.coords.items())
        fits = "" if budget_gib is None else ("yes" if p.total_bytes / GIB <= budget_gib else "NO")
        lines.append(
            f"| {p.rank} | {coords} | {p.param_bytes / GIB:.2f} | {p.grad_bytes / GIB:.2f} | "
            f"{p.optim_bytes / GIB:.2f} | {p.activation_bytes / GIB:.2f} | "
            f"{p.total_bytes / GIB:.2f} | {fits} | "
            + " / ".join(f"{p.comm_bytes[k] / GIB:.2f}" for k in COMM_KINDS)
            + f" | {p.cp_inter_node_bytes / GIB:.2f} |"
        )
    return "\n".join(lines)
