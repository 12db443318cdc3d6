"""DeviceMesh construction and mesh-independent initialization, on 4 real gloo ranks; the
degree and mesh_dim_order checks ("auto" included) in process.

One launch runs every multi-rank check (starting ranks dominates the cost on 2 cores).
"""

import re
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tests.conftest import ROOT, spawn
from torchtitan_ext.config import ConfigError, load_config
from torchtitan_ext.parallel_dims import ParallelDims
from torchtitan_ext.validate import validate


def _cfg(dp_replicate: int, dp_shard: int, tp: int, cp: int, order: object) -> SimpleNamespace:
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
    _reshard_checks(rank, world_size)


def _reshard_checks(rank: int, world_size: int) -> None:
    """``checkpoint.reshard.reshard_like`` (a curriculum's in-memory re-mesh): a shard whose layout
    is unchanged (FSDP over dp_shard 2 x cp 2, then over dp_shard 4: the same 4 ranks in the
    same order) is shared; one whose layout changes (FSDP over 4 ranks to HSDP 2 x 2, and an
    unevenly sharded (5, 3) tensor to Shard(1) over 2 x 2) arrives with the same values."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from torchtitan_ext.checkpoint.reshard import reshard_like

    torch.manual_seed(0)
    full = torch.randn(5, 3)
    flat = init_device_mesh("cpu", (4,), mesh_dim_names=("fsdp",))
    grid = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "cp"))
    fsdp = grid["dp_shard", "cp"]._flatten("dp_shard_cp")
    src: dict[str, Any] = {
        "kept": distribute_tensor(full, fsdp, [Shard(0)]),
        "hsdp": distribute_tensor(full, flat, [Shard(0)]),
        "cols": distribute_tensor(full, flat, [Shard(0)]),
        "step": torch.tensor(7.0),
        "lr": 0.5,
    }
    like: dict[str, Any] = {
        "kept": distribute_tensor(torch.zeros(5, 3), flat, [Shard(0)]),
        "hsdp": distribute_tensor(torch.zeros(5, 3), grid, [Replicate(), Shard(0)]),
        "cols": distribute_tensor(torch.zeros(5, 3), grid, [Shard(0), Shard(1)]),
        "step": torch.tensor(0.0),
        "lr": 0.0,
    }
    out = reshard_like(src, like, "test")
    assert out["kept"].to_local().data_ptr() == src["kept"].to_local().data_ptr()
    for key in ("kept", "hsdp", "cols"):
        assert out[key].device_mesh is like[key].device_mesh, key
        assert out[key].placements == like[key].placements, key
        assert out[key].to_local().shape == like[key].to_local().shape, key
        assert torch.equal(out[key].full_tensor(), full), key
    assert out["step"].item() == 7.0 and out["lr"] == 0.5
    with pytest.raises(ValueError, match="missing \\['lr'\\]"):
        reshard_like({k: v for k, v in src.items() if k != "lr"}, like, "test")


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


TP_INNER = ["pp", "dp_replicate", "dp_shard", "cp", "tp"]


@pytest.mark.parametrize("auto", ["auto", ["auto"]])  # TOML string; the CLI's comma-split list
@pytest.mark.parametrize(
    ("dp_shard", "tp", "cp", "world_size"),
    [(2, 2, 2, 8), (1, 2, 2, 4), (4, 2, 1, 8), (-1, 1, 1, 8)],
)
def test_auto_order_is_cp_innermost(auto, dp_shard, tp, cp, world_size):
    dims = ParallelDims.from_config(_cfg(1, dp_shard, tp, cp, auto), world_size)
    assert dims.order == tuple(CP_INNER) and dims.auto_order
    explicit = ParallelDims.from_config(_cfg(1, dp_shard, tp, cp, CP_INNER), world_size)
    assert explicit.order == tuple(CP_INNER) and not explicit.auto_order


@pytest.mark.parametrize("auto", ["auto", ["auto"]])
def test_auto_order_is_tp_innermost_where_torch_cannot_compose_cp_innermost(monkeypatch, auto):
    """On a torch whose FSDP2 cannot compose a tp dim before the FSDP dims, tp > 1 with FSDP
    over dp_shard x cp (cp > 1) resolves to tp innermost instead of the error an explicit
    cp-innermost order gets; without cp in FSDP cp innermost is kept (tp is after dp_shard)."""
    from torchtitan_ext import parallel_dims

    monkeypatch.setattr(parallel_dims, "non_ascending_fsdp_tp_supported", lambda: False)
    for dp_shard, tp, cp, world_size in [(2, 2, 2, 8), (1, 2, 2, 4), (-1, 2, 4, 16)]:
        dims = ParallelDims.from_config(_cfg(1, dp_shard, tp, cp, auto), world_size)
        assert dims.order == tuple(TP_INNER), (dp_shard, tp, cp)
        with pytest.raises(ConfigError, match="needs tp after dp_shard and cp") as err:
            ParallelDims.from_config(_cfg(1, dp_shard, tp, cp, CP_INNER), world_size)
        assert err.value.key == "parallelism.mesh_dim_order"
    for dp_shard, tp, cp in [(4, 2, 1), (4, 1, 2)]:
        dims = ParallelDims.from_config(_cfg(1, dp_shard, tp, cp, auto), 8)
        assert dims.order == tuple(CP_INNER), (dp_shard, tp, cp)


@pytest.mark.parametrize(
    ("order", "fragment"),
    [
        ("Auto", 'must be "auto" or a list'),
        ("pp,dp_replicate,dp_shard,tp,cp", 'must be "auto" or a list'),
        (["autoo"], 'must be "auto" or a permutation'),
        (["auto", "pp"], 'must be "auto" or a permutation'),
        (["pp", "dp_replicate", "dp_shard", "tp"], 'must be "auto" or a permutation'),
        (5, 'must be "auto" or a list'),
    ],
)
def test_bad_mesh_dim_order_is_one_config_error_naming_the_key(order, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)) as err:
        ParallelDims.from_config(_cfg(1, -1, 1, 1, order), 4)
    assert err.value.key == "parallelism.mesh_dim_order"


def test_auto_order_from_toml_and_cli(tmp_path):
    """`mesh_dim_order = "auto"` in a recipe (a string) and `--parallelism.mesh_dim_order auto`
    (the list ["auto"]) both validate; a TOML string other than "auto" names the key."""
    text = (ROOT / "train_configs" / "debug_cpu.toml").read_text()
    explicit = 'mesh_dim_order = ["pp", "dp_replicate", "dp_shard", "tp", "cp"]'
    assert explicit in text
    recipe = tmp_path / "auto.toml"
    recipe.write_text(text.replace(explicit, 'mesh_dim_order = "auto"'))
    shape = ["--parallelism.data_parallel_shard_degree", "2",
             "--parallelism.tensor_parallel_degree", "2",
             "--parallelism.context_parallel_degree", "2"]  # fmt: skip
    cfg = load_config(["--job.config_file", str(recipe), *shape])
    assert cfg.parallelism.mesh_dim_order == "auto"
    dims = validate(cfg, 8)
    assert dims is not None and dims.order == tuple(CP_INNER) and dims.auto_order
    cli = ["--job.config_file", str(ROOT / "train_configs" / "debug_cpu.toml"), *shape]
    cfg = load_config([*cli, "--parallelism.mesh_dim_order", "auto"])
    assert cfg.parallelism.mesh_dim_order == ["auto"]
    dims = validate(cfg, 8)
    assert dims is not None and dims.order == tuple(CP_INNER) and dims.auto_order
    recipe.write_text(text.replace(explicit, 'mesh_dim_order = "cp_inner"'))
    with pytest.raises(ConfigError) as err:
        load_config(["--job.config_file", str(recipe)])
    assert err.value.key == "parallelism.mesh_dim_order"


@pytest.mark.parametrize("supported", [True, False])
def test_auto_order_is_logged_once_on_rank_0(monkeypatch, caplog, supported):
    """build_mesh says which order "auto" picked (in process, on torch's fake process group)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from torchtitan_ext import parallel_dims

    monkeypatch.setattr(parallel_dims, "non_ascending_fsdp_tp_supported", lambda: supported)
    dims = ParallelDims.from_config(_cfg(1, 2, 2, 2, "auto"), 8)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    try:
        with caplog.at_level("INFO", logger="torchtitan_ext"):
            dims.build_mesh("cpu")
    finally:
        dist.destroy_process_group()
    lines = [r.getMessage() for r in caplog.records if "mesh_dim_order" in r.getMessage()]
    expected = ",".join(CP_INNER if supported else TP_INNER)
    inner = "cp" if supported else "tp"
    assert len(lines) == 1 and lines[0].startswith(
        f"mesh_dim_order auto -> {expected} ({inner} innermost"
    )
