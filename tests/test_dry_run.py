"""Dry run on torch's fake process group: per-rank parameter bytes of TorchTitan's 8B and 70B
recipes at 64 and 512 ranks equal the model's total divided as the mesh says."""

import pytest

from torchtitan_ext.config import load_config
from torchtitan_ext.tools.dry_run import plan_rank


def total_params(cfg) -> int:
    import torch
    from torchtitan.protocols.train_spec import get_train_spec

    from torchtitan_ext.validate import resolve_model_args

    args = resolve_model_args(cfg)
    args.update_from_config(cfg)
    with torch.device("meta"):
        model = get_train_spec(cfg.model.name).model_cls(args)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("recipe", "world_size", "divisor"),
    [("llama3_8b.toml", 64, 64), ("llama3_70b.toml", 512, 512)],
)
def test_param_bytes_per_rank(titan_recipes, recipe, world_size, divisor):
    cfg = load_config(["--job.config_file", str(titan_recipes / recipe)])
    plan = plan_rank(cfg, world_size, rank=0)
    # Each expectation from the model's own parameter count, not from the plan's other fields:
    # fp32 shards over FSDP (x TP) of the parameters, of their gradients (FSDP2 keeps sharded
    # gradients in the parameters' dtype), and of AdamW's two fp32 moments.
    per_rank = total_params(cfg) / divisor
    assert plan.param_bytes == pytest.approx(4 * per_rank, rel=0.01)
    assert plan.grad_bytes == pytest.approx(4 * per_rank, rel=0.01)
    assert plan.optim_bytes == pytest.approx(8 * per_rank, rel=0.01)
    assert plan.activation_bytes > 0


def test_estimates_match_real_runs_and_bound_the_peak_auto_mesh_memory():
    """The dry run's communication and activation estimates against what real gloo runs of
    the same shapes send and save (scripts/check_dry_run.py): within 10% for every kind of
    traffic and rank, and the CP patterns' traffic split by node (2 ranks per node).
    [auto_mesh_memory] The memory estimate per device (what auto mesh plans with) is at least
    the peak every rank measures during a step, for every CP pattern: ring, Ulysses, hybrid,
    double ring (it was not before the patterns' attention buffers were counted). The script
    fails on a larger error or a peak above its estimate, so this can fail."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shapes = (
        "single+fullac,dp_shard2,tp2,pp2,dp_replicate2,"
        "tp2+chunkloss+tiledmlp,cp2+fullac+chunkloss+tiledmlp,cp2+ulysses,cp4+hybrid2,"
        "cp4+dring2+fullac"
    )
    proc = subprocess.run(
        [sys.executable, str(root / "scripts" / "check_dry_run.py"), "--shapes", shapes,
         "--ranks-per-node", "2"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in shapes.split(","):
        assert f"| {name} |" in proc.stdout
    assert "worst relative error" in proc.stdout
    assert "## Peak memory per rank" in proc.stdout and "peak memory above" not in proc.stdout
    assert "| cp4+dring2+fullac | 5.62 / 5.6" in proc.stdout  # intra-node, then inter-node


def test_dry_run_sweep_ranks_shapes_that_fit_by_communication(titan_recipes, tmp_path):
    from torchtitan_ext.tools.ablation import dry_run_sweep, enumerate_shapes, plan_table

    valid, _ = enumerate_shapes(
        titan_recipes / "llama3_8b.toml", 64, tmp_path, steps=2,
        fixed={"pp": 1, "dp_replicate": 1}, max_degree={"tp": 2, "cp": 2}, training=False,
    )  # fmt: skip
    # For training here, TorchTitan's 8B recipe passes (its profiler runs); with FSDP's CPU
    # offload, which this machine's device rule refuses on CPU, every shape is refused.
    trained, refused = enumerate_shapes(
        titan_recipes / "llama3_8b.toml", 64, tmp_path, steps=2,
        fixed={"pp": 1, "dp_replicate": 1}, max_degree={"tp": 2, "cp": 1},
    )  # fmt: skip
    assert not refused and {s.name for s, _, _ in trained} == {"dp_shard64", "dp_shard32xtp2"}
    trained, refused = enumerate_shapes(
        titan_recipes / "llama3_8b.toml", 64, tmp_path, steps=2,
        fixed={"pp": 1, "dp_replicate": 1}, max_degree={"tp": 2, "cp": 1},
        extra=("--training.device", "cpu", "--training.enable_cpu_offload"),
    )  # fmt: skip
    assert not trained and refused
    assert all("training.enable_cpu_offload" in why for _, _, why in refused)
    assert {s.name for s, _, _ in valid} == {
        "dp_shard64", "dp_shard32xtp2", "dp_shard32xcp2", "dp_shard16xtp2xcp2",
    }  # fmt: skip
    rows = dry_run_sweep(valid, 64, budget_gib=1e9)
    comm = [r.total_comm_gib for r in rows]
    assert comm == sorted(comm) and all(r.fits for r in rows)
    # TP and CP traffic only where those dims are > 1.
    for r in rows:
        assert (r.comm_gib["tp"] > 0) == (r.degrees["tp"] > 1)
        assert (r.comm_gib["cp"] > 0) == (r.degrees["cp"] > 1)
    # A budget between the smallest and largest memory: what fits comes first, then the rest.
    peaks = sorted(r.peak_gib for r in rows)
    budget = (peaks[0] + peaks[-1]) / 2
    ranked = dry_run_sweep(valid, 64, budget_gib=budget)
    fits = [r.fits for r in ranked]
    assert fits == sorted(fits, reverse=True) and any(fits) and not all(fits)
    assert all((r.peak_gib <= budget) == r.fits for r in ranked)
    assert "**best**" in plan_table(ranked, budget).splitlines()[2]


def test_a_dry_run_leaves_no_fake_state_behind():
    """A dry run on the fake process group registers CP patterns on its cp groups; once it is
    over, a later process group whose cp group reuses the same name gets no pattern from it
    (it once ran the fake run's dead sub-groups: see dry_run.forget_fake_meshes), and even a
    stale registration never applies to another group object."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from torchtitan_ext.parallel import cp_patterns

    cfg = load_config([
        "--job.config_file", "train_configs/debug_cpu.toml",
        "--parallelism.data_parallel_shard_degree", "-1",
        "--parallelism.context_parallel_degree", "4",
        "--parallelism.context_parallel_pattern", "double_ring",
        "--parallelism.context_parallel_inner_ring_degree", "2",
    ])  # fmt: skip
    plan_rank(cfg, 4, rank=0)
    assert cp_patterns._registry == {}  # forgotten with the fake process group
    # A stale registration (as if not forgotten) is ignored by a new group of the same name.
    pattern = cp_patterns.make_pattern("ulysses", 2, 0, 0)
    names = []
    for _ in range(2):
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
        try:
            mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("cp",))
            names.append(mesh.get_group().group_name)
            assert cp_patterns.process_groups(mesh) == []
            cp_patterns.register(mesh, pattern)
            assert len(cp_patterns.process_groups(mesh)) == 2
        finally:
            dist.destroy_process_group()
    assert names[0] == names[1]  # the reuse that made names unsafe as keys
    cp_patterns.unregister_all()
