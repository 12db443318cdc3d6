"""Mesh-shape ablation: enumeration (in-process) and a tiny real sweep on 2 gloo ranks (3
shapes: dp_shard, tp and cp; a 2-rank start costs half a 4-rank one here) with its CSV /
Markdown / plot outputs and resume."""

from pathlib import Path

import pytest

from tests.conftest import ROOT
from torchtitan_ext.tools.ablation import (
    ORDERS,
    enumerate_shapes,
    read_csv,
    sweep,
    write_csv,
    write_report,
)

DEBUG_CPU = ROOT / "train_configs" / "debug_cpu.toml"
FIXED = {"pp": 1, "dp_replicate": 1}  # leaves dp_shard, tp or cp: 3 shapes of 2 ranks
NPROC = 2


def test_enumeration_covers_every_factorization(tmp_path):
    valid, invalid = enumerate_shapes(DEBUG_CPU, 8, tmp_path, steps=2)
    assert len(valid) + len(invalid) == 35  # ordered factorizations of 8 into 5 degrees
    names = {s.name for s, _, _ in valid}
    assert {"dp_shard8", "dp_shard2xtp2xcp2", "pp2xdp_shard2xcp2", "tp4xcp2"} <= names
    reasons = {s.name: why for s, _, why in invalid}
    # debugmodel_cpu: 4 kv heads, 4 layers (+ embedding and output: 6 "layers" for pp).
    assert "n_kv_heads = 4 is not divisible" in reasons["tp8"]
    assert "pipeline_parallel_degree" in reasons["pp8"]


def test_filters_and_orders(tmp_path):
    valid, invalid = enumerate_shapes(
        DEBUG_CPU, 4, tmp_path, steps=2, orders=("cpinner", "tpinner"),
        fixed={"pp": 1, "dp_replicate": 1}, max_degree={"dp_shard": 1},
    )  # fmt: skip
    got = {(s.name, o) for s, o, _ in valid}
    # tp x cp with FSDP over cp: both orders are valid (torch 2.13 composes either).
    assert {("tp2xcp2+tpinner", "tpinner"), ("tp2xcp2+cpinner", "cpinner")} <= got
    assert not any(s.name.startswith("tp2xcp2") for s, _, _ in invalid)


def test_cp_patterns_are_swept_and_planned_by_node(tmp_path):
    """--cp-patterns: each cp > 1 shape once per pattern and degree; the dry run gives the
    double ring with node-sized inner rings the least cp traffic across nodes (the ring
    sends most of its traffic across), and rejects Ulysses where heads do not divide."""
    from torchtitan_ext.parallel.cp_patterns import PATTERNS
    from torchtitan_ext.tools.ablation import dry_run_sweep

    fixed = {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 1}
    valid, invalid = enumerate_shapes(
        DEBUG_CPU, 8, tmp_path, steps=2, fixed=fixed, cp_patterns=PATTERNS, training=False
    )
    names = sorted(s.name for s, _, _ in valid)
    assert names == sorted(
        ["cp8", "cp8+ulysses", "cp8+hybrid2", "cp8+hybrid4", "cp8+dring2", "cp8+dring4"]
    ), names
    assert not invalid
    rows = {r.shape: r for r in dry_run_sweep(valid, 8, 1e9, ranks_per_node=4)}
    assert rows["cp8+dring4"].cp_inter_node_gib < rows["cp8+dring2"].cp_inter_node_gib
    assert rows["cp8+dring4"].cp_inter_node_gib < 0.5 * rows["cp8"].cp_inter_node_gib
    assert rows["cp8+ulysses"].comm_gib["cp"] < rows["cp8"].comm_gib["cp"]
    ring_only, _ = enumerate_shapes(DEBUG_CPU, 8, tmp_path, steps=2, fixed=fixed)
    assert [s.name for s, _, _ in ring_only] == ["cp8"]
    _, bad = enumerate_shapes(
        DEBUG_CPU, 16, tmp_path, steps=2, fixed={**fixed, "cp": 16}, cp_patterns=("ulysses",)
    )
    assert any("must divide 8" in why for _, _, why in bad), bad


def test_auto_order_is_the_resolved_auto_order_not_the_recipes(tmp_path):
    """The "auto" order overrides the recipe's mesh_dim_order with "auto" (debug_cpu_4d.toml
    sets tp innermost; "auto" resolves to cp innermost on torch 2.13) and keeps the plain
    shape name."""
    from torchtitan_ext.config import load_config
    from torchtitan_ext.validate import validate

    recipe = ROOT / "train_configs" / "debug_cpu_4d.toml"
    fixed = {"pp": 1, "dp_replicate": 1, "dp_shard": 2, "tp": 2, "cp": 2}
    valid, _ = enumerate_shapes(recipe, 8, tmp_path, steps=2, orders=ORDERS, fixed=fixed)
    orders = {}
    for shape, order, args in valid:
        dims = validate(load_config(args), 8)
        assert dims is not None
        orders[(shape.name, order)] = ",".join(dims.order)
    assert orders == {
        ("dp_shard2xtp2xcp2", "auto"): "pp,dp_replicate,dp_shard,tp,cp",
        ("dp_shard2xtp2xcp2+cpinner", "cpinner"): "pp,dp_replicate,dp_shard,tp,cp",
        ("dp_shard2xtp2xcp2+tpinner", "tpinner"): "pp,dp_replicate,dp_shard,cp,tp",
    }


def tiny_recipe(tmp_path: Path) -> Path:
    text = DEBUG_CPU.read_text()
    text = text.replace('flavor = "debugmodel_cpu"', 'flavor = "debugmodel_cpu_tiny"')
    text = text.replace("seq_len = 256", "seq_len = 64")
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablation")
    recipe, out = tiny_recipe(tmp), tmp / "out"
    logs: list[str] = []
    rows, invalid = sweep(recipe, NPROC, out, steps=3, warmup=1, fixed=FIXED, log=logs.append)
    write_report(rows, invalid, out)
    return recipe, out, rows, logs


def test_sweep_writes_rows_table_and_plot(tiny_sweep):
    _, out, rows, _ = tiny_sweep
    assert sorted(r.shape for r in rows) == ["cp2", "dp_shard2", "tp2"]
    for r in rows:
        assert r.status == "ok", r
        assert r.tokens_per_sec > 0 and r.step_time_sec > 0 and r.peak_mem_mib > 0
        assert r.numerics == "ok", r  # same global batch: same last loss on every shape
    assert [repr(r) for r in read_csv(out / "ablation.csv")] == [repr(r) for r in rows]  # NaN-safe
    table = (out / "ablation.md").read_text()
    assert table.count("**best**") == 1
    assert (out / "ablation.png").stat().st_size > 1000


def test_interrupted_sweep_resumes(tiny_sweep):
    recipe, out, rows, _ = tiny_sweep
    write_csv(out / "ablation.csv", [r for r in rows if r.shape != "cp2"])  # "interrupted"
    logs: list[str] = []
    again, _ = sweep(recipe, NPROC, out, steps=3, warmup=1, fixed=FIXED, log=logs.append)
    assert "2 already in" in logs[0] and "1 to run" in logs[0]
    assert sum(line.startswith("[") for line in logs) == 1  # only cp2 ran
    assert logs[-1].startswith("    ok: ") and "tokens/s/rank" in logs[-1]
    assert not any(line.rstrip().endswith(",") for line in logs), logs  # no dangling comma
    assert sorted(r.shape for r in again) == ["cp2", "dp_shard2", "tp2"]


def test_curriculum_recipe_is_refused_up_front(capsys):
    """One error before any launch (it used to run every shape into the same failure and exit
    0); the recipe flag is --job.config_file like everywhere else."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(
        "ablate_mesh", ROOT / "scripts" / "ablate_mesh.py"
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    recipe = ROOT / "train_configs" / "debug_cpu_curriculum.toml"
    argv = sys.argv
    sys.argv = ["ablate_mesh.py", "--job.config_file", str(recipe), "--nproc", "4"]
    try:
        with pytest.raises(SystemExit) as err:
            script.main()
    finally:
        sys.argv = argv
    assert err.value.code == 2
    assert "has [[curriculum.stages]]: a sweep trains one mesh per shape" in capsys.readouterr().err
