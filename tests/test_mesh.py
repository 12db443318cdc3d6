"""DeviceMesh construction and mesh-independent initialization, on 4 real gloo ranks.

One launch runs every check (starting ranks dominates the cost on 2 cores).
"""

import re
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tests.conftest import spawn
from torchtitan_ext.config import ConfigError
from torchtitan_ext.parallel_dims import ParallelDims


def _cfg(dp_replicate: int, dp_shard: int, tp: int, cp: int, order: list[str]) -> SimpleNamespace:
    return SimpleNamespace(
        parallelism=SimpleNamespace(
            pipeline_parallel_degree=1,
            data_parallel_replicate_degree=dp_replicate,
            data_parallel_shard_degree=dp_shard,
            tensor_parallel_degree=tp,
            context_parallel_degree=cp,
            mesh_dim_order=order,
        )
    )


CP_INNER = ["pp", "dp_replicate", "dp_shard", "tp", "cp"]
CP_OUTER = ["pp", "dp_replicate", "cp", "tp", "dp_shard"]


def _group_ranks(mesh) -> list[int]:
    """Global ranks of this rank's group in a 1-D mesh."""
    return sorted(dist.get_process_group_ranks(mesh.get_group()))


def _mesh_checks(rank: int, world_size: int) -> None:
    # CP innermost: CP ring neighbours are adjacent ranks.
    dims = ParallelDims.from_config(_cfg(1, -1, 1, 2, CP_INNER), world_size)
    assert (dims.dp_shard, dims.cp) == (2, 2)
    dims.build_mesh("cpu")
    assert _group_ranks(dims.get_mesh("cp")) == [rank - rank % 2, rank - rank % 2 + 1]
    assert _group_ranks(dims.get_mesh("dp_shard")) == [rank % 2, rank % 2 + 2]
    assert dims.get_mesh("fsdp").size() == 4  # FSDP over dp_shard x cp
    assert _group_ranks(dims.get_mesh("batch")) == [rank % 2, rank % 2 + 2]  # cp peers: same data
    assert dims.get_mesh("loss").size() == 4
    assert dims.dp_rank() == rank // 2

    # The same shape with cp outermost: CP peers are 2 ranks apart.
    dims = ParallelDims.from_config(_cfg(1, 2, 1, 2, CP_OUTER), world_size)
    dims.build_mesh("cpu")
    assert _group_ranks(dims.get_mesh("cp")) == [rank % 2, rank % 2 + 2]
    assert _group_ranks(dims.get_mesh("dp_shard")) == [rank - rank % 2, rank - rank % 2 + 1]

    # HSDP: replicate over pairs (0,2),(1,3); shard within (0,1),(2,3).
    dims = ParallelDims.from_config(_cfg(2, 2, 1, 1, CP_INNER), world_size)
    dims.build_mesh("cpu")
    hsdp = dims.get_mesh("hsdp")
    assert hsdp.mesh.tolist() == [[0, 1], [2, 3]]
    assert dims.get_mesh("batch").size() == 4

    _init_checks(rank, world_size)


def _init_checks(rank: int, world_size: int) -> None:
    """A sharded model (FSDP over 4 ranks, and HSDP 2 x 2) starts from the same weights as the
    unsharded one, bit for bit."""
    from torchtitan.models.llama3 import Transformer, llama3_args

    from torchtitan_ext.models import build_model_on_meta, init_weights_mesh_independent
    from torchtitan_ext.parallel.fsdp import apply_fsdp

    args = llama3_args["debugmodel_cpu_tiny"]
    reference = build_model_on_meta(Transformer, args)
    init_weights_mesh_independent(reference, seed=5, device=torch.device("cpu"))
    for replicate in (1, 2):
        dims = ParallelDims.from_config(_cfg(replicate, -1, 1, 1, CP_INNER), world_size)
        dims.build_mesh("cpu")
        model = build_model_on_meta(Transformer, args)
        mesh = dims.get_mesh("hsdp") if replicate > 1 else dims.get_mesh("fsdp")
        apply_fsdp(model, mesh, torch.float32, torch.float32)
        init_weights_mesh_independent(model, seed=5, device=torch.device("cpu"))
        for (name, p), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert isinstance(p, DTensor)
            full = p.full_tensor()
            assert torch.equal(full, ref), f"{name} differs (replicate={replicate})"
            if replicate == 1 and p.shape[0] >= world_size:
                assert p.to_local().shape[0] < p.shape[0], f"{name} is not sharded"


def test_mesh_and_init_on_4_ranks():
    spawn(_mesh_checks, 4)


@pytest.mark.parametrize(
    ("cfg", "world_size", "fragment"),
    [
        (_cfg(1, 3, 1, 1, CP_INNER), 4, "multiply to 3 but the world size is 4"),
        (_cfg(1, 0, 1, 1, CP_INNER), 4, "must be >= 1 or -1"),
        (_cfg(1, -1, 1, 3, CP_INNER), 4, "not divisible by pp * dp_replicate * tp * cp = 3"),
        (
            _cfg(1, -1, 1, 1, ["pp", "dp_shard", "dp_replicate", "tp", "cp"]),
            4,
            "dp_replicate second",
        ),
    ],
)
def test_parallel_dims_errors(cfg, world_size, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        ParallelDims.from_config(cfg, world_size)
