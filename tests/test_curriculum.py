"""The context-length curriculum: planning and its errors (in-process), and one real 4-rank
run through three stages with two re-meshes (cp 1 -> 2 -> 4, the CP pattern ring -> ulysses ->
double ring, causal then block-causal attention from stage 1 on), resumed mid-stage and at a
boundary."""

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, torchrun, torchrun_many
from torchtitan_ext.config import ConfigError, load_config
from torchtitan_ext.tools.auto_mesh import choose_stage_mesh
from torchtitan_ext.validate import plan_curriculum

STAGES = """
[curriculum]
tokens_per_step = 1024

[[curriculum.stages]]
seq_len = 64
steps = 3
rope_theta = 10000
rope_scaling = "none"
context_parallel_degree = 1

[[curriculum.stages]]
seq_len = 128
steps = 3
rope_theta = 100000
context_parallel_degree = 2
context_parallel_pattern = "ulysses"
lr = 1e-3
warmup_steps = 2
attn_mask_type = "block_causal"

[[curriculum.stages]]
seq_len = 256
steps = 3
rope_theta = 1000000
context_parallel_degree = 4
context_parallel_pattern = "double_ring"
context_parallel_inner_ring_degree = 2
rope_scaling = "yarn"
rope_scaling_factor = 2.0
rope_original_context = 128
min_doc_tokens = 100000
"""


def recipe(tmp_path: Path, stages: str = STAGES) -> Path:
    """The debug recipe with its [parallelism] / [training] and a test curriculum."""
    text = (ROOT / "train_configs" / "debug_cpu.toml").read_text()
    path = tmp_path / "curriculum.toml"
    path.write_text(text + "\n" + stages)
    return path


def plan(tmp_path: Path, stages: str, world_size: int = 4, extra: list[str] | None = None):
    cfg = load_config(["--job.config_file", str(recipe(tmp_path, stages)), *(extra or [])])
    return plan_curriculum(cfg, world_size, choose_stage_mesh)


def test_plan_resolves_stages(tmp_path):
    stages = plan(tmp_path, STAGES, extra=["--parallelism.data_parallel_shard_degree", "-1"])
    assert [(s.first_step, s.last_step) for s in stages] == [(1, 3), (4, 6), (7, 9)]
    assert [(s.cp, s.dp_shard) for s in stages] == [(1, 4), (2, 2), (4, 1)]
    assert [s.global_batch_size for s in stages] == [16, 8, 4]
    assert {s.tokens_per_step for s in stages} == {1024}
    assert [s.rope_theta for s in stages] == [1e4, 1e5, 1e6]
    assert [(s.lr, s.warmup_steps, s.min_doc_tokens) for s in stages] == [
        (None, 0, 0),
        (1e-3, 2, 0),
        (None, 0, 100000),
    ]
    # A stage without rope_theta keeps the previous stage's, not the recipe's (500000 here).
    unset = STAGES.replace("rope_theta = 1000000\n", "")
    stages = plan(tmp_path, unset, extra=["--parallelism.data_parallel_shard_degree", "-1"])
    assert [s.rope_theta for s in stages] == [1e4, 1e5, 1e5]


def test_auto_cp_from_max_tokens_per_cp_rank(tmp_path):
    stages_toml = """
[curriculum]
max_tokens_per_cp_rank = 128
[[curriculum.stages]]
seq_len = 128
steps = 1
[[curriculum.stages]]
seq_len = 256
steps = 1
[[curriculum.stages]]
seq_len = 512
steps = 1
"""
    stages = plan(tmp_path, stages_toml, extra=["--parallelism.data_parallel_shard_degree", "-1"])
    assert [s.cp for s in stages] == [1, 2, 4]


AUTO = """
[curriculum]
tokens_per_step = 2048
[[curriculum.stages]]
seq_len = 128
steps = 1
context_parallel_degree = 1
[[curriculum.stages]]
seq_len = 512
steps = 1
auto_mesh = true
"""


def test_auto_mesh_picks_the_least_estimated_step_time_that_fits(tmp_path):
    """The auto-meshed stage runs the first of its ranked candidates: every one a valid
    (tp, cp, pattern) of the 8 ranks, the fitting ones by estimated step time. A budget
    that rules the cheapest out moves the choice to the best that fits, and the plan says
    so."""
    from torchtitan_ext.curriculum import format_plan
    from torchtitan_ext.parallel.cp_patterns import pattern_choices

    dp = ["--parallelism.data_parallel_shard_degree", "-1"]
    stages = plan(tmp_path, AUTO, world_size=8, extra=dp)
    assert stages[0].mesh_plan == ()
    ranked = stages[1].mesh_plan
    best = ranked[0]
    assert (stages[1].tp, stages[1].cp, stages[1].cp_pattern) == (best.tp, best.cp, best.pattern)
    assert stages[1].tp * stages[1].cp * stages[1].dp_shard == 8
    assert [e.step_sec for e in ranked] == sorted(e.step_sec for e in ranked)
    # global batch 4 leaves dp <= 4: tp x cp >= 2; n_kv_heads 4 caps tp at 4
    assert all(e.tp * e.cp >= 2 and e.tp <= 4 for e in ranked)
    n_options = sum(len(pattern_choices(cp)) for tp in (1, 2, 4) for cp in (1, 2, 4, 8)
                    if tp * cp in (2, 4, 8))  # fmt: skip
    assert 0 < len(ranked) <= n_options
    assert "(auto)" in format_plan(stages) and "chosen" in format_plan(stages)
    # A budget between the two smallest memory estimates: only the smallest fits.
    sizes = sorted({round(e.memory_gib, 9) for e in ranked})
    budget = (sizes[0] + sizes[1]) / 2
    tight = plan(tmp_path, AUTO, 8, [*dp, "--curriculum.auto_mesh_memory_gib", str(budget)])
    chosen = tight[1].mesh_plan[0]
    assert chosen.fits and chosen.memory_gib <= budget
    assert chosen.step_sec == min(e.step_sec for e in tight[1].mesh_plan if e.fits)
    assert chosen.memory_gib < best.memory_gib or chosen == best


def test_auto_mesh_weighs_traffic_that_crosses_nodes(tmp_path):
    """With 2 ranks per node and a slow inter-node link, the estimate charges a group that
    spans nodes at the inter-node bandwidth: the choice keeps its heaviest traffic inside a
    node (or at least never sends more across nodes than the single-node choice would)."""
    from torchtitan_ext.tools.auto_mesh import _spans_nodes
    from torchtitan_ext.validate import validate

    dp = ["--parallelism.data_parallel_shard_degree", "-1"]
    for cp, tp_spans in ((1, False), (2, True)):  # cp innermost: tp peers are cp ranks apart
        cfg = load_config(["--job.config_file", str(recipe(tmp_path)), *dp,
                           "--parallelism.tensor_parallel_degree", "2",
                           "--parallelism.context_parallel_degree", str(cp)])  # fmt: skip
        cfg.curriculum.stages = []
        dims = validate(cfg, 8)
        assert dims is not None and dims.order[-2:] == ("tp", "cp")
        assert _spans_nodes(dims, ("tp",), 2) == tp_spans
        assert _spans_nodes(dims, ("dp_shard", "cp"), 2)  # 4 FSDP ranks: never in one node
        assert not _spans_nodes(dims, ("dp_shard", "cp", "tp"), 8)
    one = plan(tmp_path, AUTO, 8, dp)[1].mesh_plan
    nodes = ["--curriculum.auto_mesh_ranks_per_node", "2",
             "--curriculum.auto_mesh_inter_node_gbps", "1"]  # fmt: skip
    slow = plan(tmp_path, AUTO, 8, [*dp, *nodes])[1].mesh_plan
    assert all(e.inter_node_gib == 0 for e in one)
    assert any(e.inter_node_gib > 0 for e in slow)
    gib = 1024**3
    for e in slow:  # intra-node bytes at 450 GB/s, the rest at 1 GB/s, 20 us per call
        intra = (e.comm_gib - e.inter_node_gib) * gib / 450e9
        calls = e.comm_calls * 20e-6
        assert e.comm_calls > 0
        assert e.comm_sec == pytest.approx(intra + e.inter_node_gib * gib / 1e9 + calls, rel=1e-6)
    assert slow[0].step_sec == min(e.step_sec for e in slow)
    # The claim itself: the mesh chosen on one node would send across 2-rank nodes, and the
    # planner that sees those nodes picks one that sends less across them (one that ignored
    # the nodes would pick the same mesh, and fail here).
    single_node_choice = next(e for e in slow if e.label == one[0].label)
    assert single_node_choice.inter_node_gib > 0
    assert slow[0].inter_node_gib < single_node_choice.inter_node_gib, (
        slow[0].label,
        single_node_choice.label,
    )


def _stage(seq_len: int, steps: int, cp: int, more: str = "") -> str:
    return (
        f"[[curriculum.stages]]\nseq_len = {seq_len}\nsteps = {steps}\n"
        f"context_parallel_degree = {cp}\n{more}"
    )


@pytest.mark.parametrize(
    ("stages", "key", "fragment"),
    [
        (_stage(128, 2, 1) + _stage(128, 2, 2), "curriculum.stages[1].seq_len",
         "greater than the previous stage's 128"),
        (_stage(128, 2, 1) + _stage(256, 2, 3), "curriculum.stages[1].context_parallel_degree",
         "must divide the 4 ranks"),
        (_stage(128, 0, 1), "curriculum.stages[0].steps", "must be > 0"),
        (_stage(128, 2, 1, "tensor_parallel_degree = 2\n"),
         "curriculum.stages[0].tensor_parallel_degree", "unknown stage key"),
        (_stage(128, 2, 1) + _stage(250, 2, 2), "curriculum.stages[1] -> training.seq_len",
         "2 x cp (2) = 4"),
        ("[curriculum]\ntokens_per_step = 1000\n" + _stage(128, 2, 1),
         "curriculum.tokens_per_step", "not divisible by stage 0's seq_len 128"),
        ("[[curriculum.stages]]\nsteps = 2\n", "curriculum.stages[0].seq_len",
         "needs seq_len and steps"),
        (_stage(128, 2, 1)
         + _stage(256, 2, 2, 'rope_scaling = "yarn"\nrope_scaling_factor = 0.5\n'),
         "curriculum.stages[1] -> model.rope_scaling_factor", "must be >= 1"),
        (_stage(128, 2, 1, "rope_scaling = 2\n"), "curriculum.stages[0].rope_scaling",
         "expected a string"),
        (_stage(128, 2, 1, "auto_mesh = true\n"), "curriculum.stages[0].context_parallel_degree",
         "the planner chooses it"),
        ("[[curriculum.stages]]\nseq_len = 128\nsteps = 2\nauto_mesh = 1\n",
         "curriculum.stages[0].auto_mesh", "expected true or false"),
        ("[curriculum]\nauto_mesh = true\nmax_tokens_per_cp_rank = 64\n"
         "[[curriculum.stages]]\nseq_len = 128\nsteps = 2\n",
         "curriculum.max_tokens_per_cp_rank", "set one of the two"),
        ("[curriculum]\nauto_mesh = true\nauto_mesh_inter_node_gbps = 0\n"
         "[[curriculum.stages]]\nseq_len = 128\nsteps = 2\n",
         "curriculum.auto_mesh_inter_node_gbps", "must be > 0"),
        ("[curriculum]\nauto_mesh = true\nauto_mesh_memory_gib = 0.001\n"
         "[[curriculum.stages]]\nseq_len = 128\nsteps = 2\n",
         "curriculum.stages[0].auto_mesh", "no mesh fits 0.001 GiB per device"),
    ],
)  # fmt: skip
def test_bad_curricula(tmp_path, stages, key, fragment):
    with pytest.raises(ConfigError) as err:
        plan(tmp_path, stages, extra=["--parallelism.data_parallel_shard_degree", "-1"])
    assert err.value.key == key
    assert fragment in str(err.value), str(err.value)


def test_fixed_dp_shard_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="must be -1 with a curriculum") as err:
        plan(tmp_path, STAGES, extra=["--parallelism.data_parallel_shard_degree", "4"])
    assert err.value.key == "parallelism.data_parallel_shard_degree"


def run_args(path: Path, dump: Path) -> list[str]:
    return [
        "--job.config_file", str(path),
        "--job.dump_folder", str(dump),
        "--model.flavor", "debugmodel_cpu_tiny",
        "--parallelism.data_parallel_shard_degree", "-1",
        "--training.local_batch_size", "4",
        "--lr_scheduler.warmup_steps", "2",
        "--metrics.log_freq", "1",
        "--metrics.no-enable-tensorboard",
        "--validation.no-enable",
        "--checkpoint.interval", "2",
        "--checkpoint.keep_latest_k", "0",
    ]  # fmt: skip


def records(dump: Path) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """The run's step records by step, and its boundary records (``kind`` "curriculum") with
    their per-parameter fingerprint from ``param_stats.jsonl`` as ``params``."""
    from torchtitan_ext.metrics import read_metrics, read_param_stats

    steps = {r["step"]: r for r in read_metrics(dump)}
    boundaries = read_metrics(dump, "curriculum")
    stats = read_param_stats(dump)
    assert [(b["step"], b["event"], b["stage"]) for b in boundaries] == [
        (s["step"], s["event"], s["stage"]) for s in stats
    ]
    return steps, [{**b, "params": s["params"]} for b, s in zip(boundaries, stats, strict=True)]


PP = ["--parallelism.pipeline_parallel_degree", "2",
      "--parallelism.pipeline_parallel_schedule", "1F1B",
      "--training.local_batch_size", "2",
      "--parallelism.pipeline_parallel_microbatch_size", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def four_rank_runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess[str]]]:
    """The module's 4-rank runs from scratch, by name, each with its dump folder and its part
    of the output, in one launch (``torchrun_many``: the ranks start once, not four times):
    "full", the 3-stage run (validation, 1 batch at each stage's end, and tensorboard on: the
    metrics schema test); "pp-memory" and "pp-disk", the pipeline curriculum switching in
    memory and from disk; "tp", the tensor-parallel re-mesh. Each test checks its own run's
    exit status."""
    tmp = tmp_path_factory.mktemp("curriculum")
    full, pp, tp = tmp / "full", tmp / "pp", tmp / "tp"
    for folder in (full, pp, tp):
        folder.mkdir()
    val = ["--validation.enable", "--validation.steps", "1", "--validation.freq", "1000"]
    pp_path = recipe(pp, PIPELINE_STAGES)
    runs = {
        "full": (full / "run", [*val, "--metrics.enable-tensorboard"], recipe(full)),
        "pp-memory": (pp / "memory", PP, pp_path),
        "pp-disk": (pp / "disk", [*PP, "--curriculum.no-switch-in-memory"], pp_path),
        "tp": (tp / "run", ["--parallelism.tensor_parallel_degree", "2"], recipe(tp, TP_STAGES)),
    }
    procs = torchrun_many(
        4, [[*run_args(path, dump), *more] for dump, more, path in runs.values()], check=False
    )
    return {name: (run[0], proc) for (name, run), proc in zip(runs.items(), procs, strict=True)}


def run_of(
    runs: dict[str, tuple[Path, subprocess.CompletedProcess[str]]], name: str
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A run of ``four_rank_runs``, which must have exited 0."""
    dump, proc = runs[name]
    assert proc.returncode == 0, (name, proc.stdout[-3000:], proc.stderr[-3000:])
    return dump, proc


@pytest.fixture(scope="module")
def full_run(four_rank_runs) -> tuple[Path, Path]:
    dump, proc = run_of(four_rank_runs, "full")
    (dump.parent / "torchrun.log").write_text(proc.stdout + proc.stderr)
    return dump.parent / "curriculum.toml", dump


def test_metrics_are_typed_and_grouped(full_run):
    """metrics.jsonl: every line has a kind ("train", "val" or "curriculum"), counts are ints;
    per-parameter stats sit in param_stats.jsonl; tensorboard tags are train/, val/ and
    curriculum/ (a step record's stage and cp under curriculum/)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.test_train import TRAIN_RECORD_TYPES
    from torchtitan_ext.metrics import read_metrics

    _, dump = full_run
    lines = [json.loads(x) for x in (dump / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in lines]
    assert (kinds.count("train"), kinds.count("val"), kinds.count("curriculum")) == (9, 3, 4)
    train = read_metrics(dump)
    for key, typ in {**TRAIN_RECORD_TYPES, "stage": int, "cp": int, "tp": int}.items():
        assert all(type(r[key]) is typ for r in train), key
    val = read_metrics(dump, "val")
    assert [r["step"] for r in val] == [3, 6, 9]
    assert all(set(r) == {"kind", "step", "loss"} and type(r["loss"]) is float for r in val)
    boundaries = read_metrics(dump, "curriculum")
    assert [(b["step"], b["event"], b["stage"]) for b in boundaries] == [
        (3, "end", 0), (3, "start", 1), (6, "end", 1), (6, "start", 2)
    ]  # fmt: skip
    for b in boundaries:
        assert set(b) - {"switch_sec"} == {
            "kind", "step", "event", "stage", "param_sum", "param_sq_sum"
        }, b  # fmt: skip
        assert ("switch_sec" in b) == (b["event"] == "start")
    assert len(records(dump)[1]) == 4  # one param_stats.jsonl line per boundary, matched
    acc = EventAccumulator(str(dump / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/seq_len", "val/loss", "curriculum/stage", "curriculum/cp"} <= tags
    assert {"curriculum/param_sum", "curriculum/switch_sec"} <= tags
    assert {t.split("/")[0] for t in tags} == {"train", "val", "curriculum"}, tags
    assert {e.step: e.value for e in acc.Scalars("curriculum/cp")} == {
        r["step"]: r["cp"] for r in train
    }
    assert [e.value for e in acc.Scalars("val/loss")] == pytest.approx([r["loss"] for r in val])


def test_stages_switch_context_parallel_pattern(full_run):
    """Stage 1 runs Ulysses over cp 2, stage 2 a double ring over cp 4 (the parity of each
    pattern is tests/test_parity.py's; here: the switch itself, and resume across it below)."""
    _, dump = full_run
    log = (dump.parent / "torchrun.log").read_text()
    assert "x cp 2 (context parallel: ulysses (2))" in log, log[-3000:]
    assert "(context parallel: double_ring (inner ring 2 x outer ring 2))" in log, log[-3000:]
    # Both switches re-meshed in memory (their equality with the disk round trip:
    # test_state_survives_remesh and test_resume_equals_uninterrupted at the boundary).
    assert log.count("re-meshed in memory") == 2, log[-3000:]
    # Stage 1 sets attn_mask_type = "block_causal" and stage 2 keeps it: their steps measure
    # the cp ranks' masked work, stage 0's (causal, cp 1) do not.
    steps, _ = records(dump)
    masked = {k: "attn_work_max_over_min" in r for k, r in steps.items()}
    assert masked == {k: k > 3 for k in steps}, masked
    # Settings a user could miss are said outright: the stages replace [training]'s length,
    # steps and batch; the AC in use (the recipe's "none" here; TorchTitan's default is
    # selective, which a recipe without the section gets).
    not_used = "training.steps, batch sizes and validation seq_len and batch are not used"
    assert f"the recipe's training.seq_len, {not_used}" in log
    assert "activation checkpointing none" in log
    # Each stage's trainer names its memory features; the records count the pattern's calls
    # (a stage whose pattern fell back to torch's ring would count 0).
    for pattern in ("context parallel off", "context parallel ulysses (2)",
                    "context parallel double_ring (inner ring 2 x outer ring 2)"):  # fmt: skip
        features = "activation checkpointing none, chunked loss off, tiled MLP off"
        assert f"memory features: {features}, {pattern}, FSDP over 4 ranks" in log, log[:3000]
    steps, _ = records(dump)
    calls = {stage: [r["cp_pattern_calls"] for r in steps.values() if r["stage"] == stage]
             for stage in (0, 1, 2)}  # fmt: skip
    assert calls[0] == [0, 0, 0] and min(calls[1]) > 0 and min(calls[2]) > 0, calls


def test_stages_switch_at_configured_steps(full_run):
    _, dump = full_run
    steps, _ = records(dump)
    assert sorted(steps) == list(range(1, 10))
    expected = {1: (0, 64, 1), 4: (1, 128, 2), 7: (2, 256, 4)}
    for step, r in steps.items():
        first = max(s for s in expected if s <= step)
        assert (r["stage"], r["seq_len"], r["cp"]) == expected[first], step
        assert r["tokens_per_step"] == 1024
    # The first loss of a stage is finite and near the last one, also where the RoPE changes
    # from theta only (stages 0-1) to YaRN (stage 2).
    for boundary in (3, 6):
        before, after = steps[boundary]["loss"], steps[boundary + 1]["loss"]
        # Measured: 2.7% at step 3 -> 4 and 7.9% at 6 -> 7 (a new stage's windows and, at 7,
        # YaRN). The bound is 1.5x the larger: a stage entered with the wrong RoPE or state
        # jumps further (the runs are deterministic: fixed seeds, fp32, gloo).
        assert abs(after - before) / before < 0.12, (boundary, before, after)


def test_stage_numbering_is_zero_based_everywhere(full_run):
    """One numbering, from 0 (as ``curriculum.stages[i]`` in config errors): the plan table,
    each stage's log line and console label, the re-mesh lines, and ``metrics.jsonl``'s
    ``stage`` of step and boundary records name the same stage by the same number."""
    _, dump = full_run
    log = (dump.parent / "torchrun.log").read_text()
    steps, boundaries = records(dump)
    for index, (first, last) in enumerate([(1, 3), (4, 6), (7, 9)]):
        assert f"stage {index} of 0..2: steps {first}-{last}," in log, log[-3000:]
        assert steps[first]["stage"] == steps[last]["stage"] == index
        assert re.search(rf"\s{index}\s+{first}-{last}\s+\d", log), log[:3000]  # the plan
    assert re.search(r"stage 2 of 0\.\.2 eta", log), log[-3000:]
    assert "stage 1: re-meshed in memory" in log and "stage 2: re-meshed in memory" in log
    assert [(b["event"], b["stage"]) for b in boundaries] == [
        ("end", 0), ("start", 1), ("end", 1), ("start", 2)
    ]  # fmt: skip
    assert "stage 3" not in log


def test_one_lr_schedule_with_stage_lr_and_warmup(full_run, tmp_path):
    """The run's schedule (warmup 2, cosine decay over 9 steps) spans the stages; stage 1
    (steps 4-6) has peak LR 1e-3 and a 2-step warmup of its own, the others the recipe's 3e-3."""
    import torch
    from torchtitan.components.lr_scheduler import build_lr_schedulers

    path, dump = full_run
    steps, _ = records(dump)
    cfg = load_config(["--job.config_file", str(path), "--lr_scheduler.warmup_steps", "2"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_schedulers([opt], cfg.lr_scheduler, 9).schedulers[0]
    factor = [sched.lr_lambdas[0](e) for e in range(9)]  # factor of step k is factor[k - 1]
    peak = {1: 3e-3, 2: 3e-3, 3: 3e-3, 4: 1e-3, 5: 1e-3, 6: 1e-3, 7: 3e-3, 8: 3e-3, 9: 3e-3}
    warm = {4: 0.5}
    for step, r in steps.items():
        expected = peak[step] * factor[step - 1] * warm.get(step, 1.0)
        assert r["lr"] == pytest.approx(expected, rel=1e-6), step


def test_state_survives_remesh(full_run):
    _, dump = full_run
    _, boundaries = records(dump)
    by_step: dict[int, dict[str, dict[str, Any]]] = {}
    for b in boundaries:
        by_step.setdefault(b["step"], {})[b["event"]] = b
    assert sorted(by_step) == [3, 6]
    for step, pair in by_step.items():
        end, start = pair["end"], pair["start"]
        # Every gathered parameter after the re-mesh equals itself before it: per parameter
        # fp64 sum, sum of squares and position-weighted sum (the last changes when elements
        # move; only the summation order differs between meshes).
        assert set(start["params"]) == set(end["params"])
        assert len(end["params"]) == 1 + 2 * 9 + 2  # embedding, 2 blocks, norm, output
        for name, (total, squares, weighted) in end["params"].items():
            got_total, got_squares, got_weighted = start["params"][name]
            assert got_squares == pytest.approx(squares, rel=1e-12), (step, name)
            assert got_total == pytest.approx(total, rel=1e-9, abs=1e-9), (step, name)
            assert got_weighted == pytest.approx(weighted, rel=1e-9, abs=1e-7), (step, name)
        assert start["switch_sec"] > 0


@pytest.fixture(scope="module")
def resumed_runs(full_run, tmp_path_factory) -> dict[int, Path]:
    """Resumes of ``full_run`` from step 4 (mid-stage) and from step 3 (the boundary into stage
    2), both in one launch (``torchrun_many``), as the run killed after step 9 left its folder:
    its metrics files and its checkpoints up to the resume step."""
    path, dump = full_run
    tmp = tmp_path_factory.mktemp("resumed")
    resumed = {step: tmp / f"from-{step}" for step in (4, 3)}
    for resume_step, folder in resumed.items():
        shutil.copytree(dump / "checkpoint", folder / "checkpoint")
        for ckpt in (folder / "checkpoint").iterdir():
            if int(ckpt.name.split("-")[1]) > resume_step:
                shutil.rmtree(ckpt)
        for name in ("metrics.jsonl", "param_stats.jsonl"):
            shutil.copy(dump / name, folder / name)
    procs = torchrun_many(4, [run_args(path, folder) for folder in resumed.values()])
    assert all(proc.returncode == 0 for proc in procs)
    return resumed


@pytest.mark.parametrize("resume_step", [4, 3], ids=["mid-stage", "at-boundary"])
def test_resume_equals_uninterrupted_metrics_once(full_run, resumed_runs, resume_step):
    """Resuming from step 4 (mid-stage) or 3 (the boundary into stage 2) gives the losses of
    the run that never stopped, in the metrics files the interrupted run left: each step and
    boundary is recorded once (at the boundary, the start of stage 2 again, from the
    checkpoint it was entered from), the crashed attempt's later records superseded."""
    from torchtitan_ext.metrics import read_metrics

    _, dump = full_run
    resumed = resumed_runs[resume_step]
    full, full_boundaries = records(dump)
    got, boundaries = records(resumed)
    assert [r["step"] for r in read_metrics(resumed)] == list(range(1, 10))
    for step, r in got.items():
        assert r["loss"] == full[step]["loss"], step
        assert r["grad_norm"] == full[step]["grad_norm"], step
    assert [(b["step"], b["event"], b["stage"]) for b in boundaries] == [
        (3, "end", 0), (3, "start", 1), (6, "end", 1), (6, "start", 2)
    ]  # fmt: skip
    for b, want in zip(boundaries, full_boundaries, strict=True):
        assert b["param_sq_sum"] == pytest.approx(want["param_sq_sum"], rel=1e-12), b
    superseded = (resumed / "param_stats_superseded.jsonl").read_text().splitlines()
    assert json.loads(superseded[0]) == {"superseded_at_resume_from": resume_step}
    # The boundaries after the resume point: (6, end), (6, start) and at the boundary (3, start).
    assert len(superseded) == 1 + (3 if resume_step == 3 else 2)


def test_disk_switches_need_boundary_checkpoints(tmp_path):
    """Stages that start from the boundary checkpoint (switch_in_memory = false) need it
    written: checkpoints enabled, not load_only, not skipped. Switching in memory needs none."""
    from torchtitan_ext.validate import check_recipe

    def check(*more: str) -> None:
        check_recipe(load_config([*run_args(recipe(tmp_path), tmp_path / "run"), *more]), 4)

    disk = "--curriculum.no-switch-in-memory"
    for flag, key in (
        ("--checkpoint.no-enable", "checkpoint.enable"),
        ("--checkpoint.load_only", "checkpoint.load_only"),
        ("--curriculum.no-boundary-checkpoint", "curriculum.boundary_checkpoint"),
    ):
        with pytest.raises(ConfigError, match="each stage starts from the boundary") as err:
            check(disk, flag)
        assert err.value.key == key
        check(flag)  # in memory: accepted


TWO_STAGES = """
[curriculum]
tokens_per_step = 512

[[curriculum.stages]]
seq_len = 64
steps = 3
rope_theta = 10000

[[curriculum.stages]]
seq_len = 128
steps = 3
rope_theta = 100000
"""


def test_load_step_and_exclusions_apply_where_the_run_starts(tmp_path):
    """1 rank, 2 stages of 3 steps. A roll-back into stage 1 (load_step 4, with step-6 on
    disk) trains steps 5-6 again, exactly, and keep_latest_k keeps what it wrote;
    exclude_from_loading and load_step apply to where a run starts, never to the hand-off
    between stages (which once restarted the LR warmup and the data at stage 1), also when the
    hand-off loads the boundary checkpoint from disk."""
    from tests.conftest import read_metrics, train_single_many

    path = recipe(tmp_path, TWO_STAGES)

    def args(dump: Path, *more: str) -> list[str]:
        return [*run_args(path, dump), "--parallelism.data_parallel_shard_degree", "-1", *more]

    def losses(dump: Path) -> dict[int, tuple[float, float]]:
        return {r["step"]: (r["loss"], r["lr"]) for r in read_metrics(dump)}

    full, excluded, disk = tmp_path / "full", tmp_path / "excluded", tmp_path / "disk"
    skipped, background = tmp_path / "no-boundary", tmp_path / "async"
    rolled, rolled_disk = tmp_path / "rolled", tmp_path / "rolled-disk"
    # The runs from scratch share one process (train_single_many), the roll-backs from the
    # full run's checkpoints and the background run's resume a second one.
    full_log, _, disk_log, _, log = (
        proc.stdout
        for proc in train_single_many(
            [
                args(full),
                # Both hand-off checks in disk mode (switch_in_memory = false), where the
                # hand-off loads the boundary checkpoint and so could wrongly apply them; an
                # in-memory switch loads nothing.
                args(
                    excluded,
                    "--checkpoint.exclude_from_loading", "dataloader,lr_scheduler",
                    "--curriculum.no-switch-in-memory",
                ),
                args(disk, "--curriculum.no-switch-in-memory"),
                args(skipped, "--curriculum.no-boundary-checkpoint"),
                args(background, "--checkpoint.async_mode", "async"),
            ]
        )
    )  # fmt: skip
    assert sorted(losses(full)) == [1, 2, 3, 4, 5, 6]
    assert losses(excluded) == losses(full)
    # The same-mesh switch happened in memory; reloading the boundary checkpoint instead gives
    # the same run bit for bit.
    assert "stage 1 of 0..1: steps 4-6," in full_log
    assert "stage 1: switched in memory" in full_log
    assert losses(disk) == losses(full)
    assert "switched in memory" not in disk_log
    # Without the boundary checkpoint only the interval ones (every 2 steps) are written.
    assert losses(skipped) == losses(full)
    assert sorted(p.name for p in (skipped / "checkpoint").iterdir()) == [
        "step-2",
        "step-4",
        "step-6",
    ]
    assert (full / "checkpoint" / "step-3").is_dir()
    # Background saves (checkpoint.async_mode = "async"): the same run and the same (verified)
    # checkpoints, the boundary one published during stage 1; resuming from one is exact.
    assert "in the background" in log
    assert losses(background) == losses(full)
    ckpts = sorted(p.name for p in (background / "checkpoint").iterdir())
    assert ckpts == ["step-2", "step-3", "step-4", "step-6"], ckpts
    shutil.rmtree(background / "checkpoint" / "step-6")
    shutil.copytree(full / "checkpoint", rolled / "checkpoint")
    shutil.copytree(full / "checkpoint" / "step-2", rolled_disk / "checkpoint" / "step-2")
    proc, _, _ = train_single_many(
        [
            # keep_latest_k 1 after the roll-back purges older checkpoints, never the one just
            # written (the step-6 it replaces was set aside as step-6.superseded before
            # training) nor the newest confirmed one (step-4: step 5's gradient norm was
            # finite; step-6 has no next step).
            args(rolled, "--checkpoint.load_step", "4", "--checkpoint.keep_latest_k", "1"),
            # A roll-back into stage 0 (load_step 2): the hand-off at step 3 loads the boundary
            # checkpoint just written, not load_step's.
            args(rolled_disk, "--checkpoint.load_step", "2", "--curriculum.no-switch-in-memory"),
            args(background, "--checkpoint.async_mode", "async"),
        ]
    )
    assert "nothing to do" not in proc.stdout
    assert losses(rolled) == {k: v for k, v in losses(full).items() if k > 4}
    ckpts = sorted(p.name for p in (rolled / "checkpoint").iterdir())
    assert ckpts == ["step-4", "step-6", "step-6.superseded"], ckpts
    assert losses(rolled_disk) == {k: v for k, v in losses(full).items() if k > 2}
    superseded = map(json.loads, (background / "metrics_superseded.jsonl").read_text().splitlines())
    # Steps 5 and 6 were retrained after the resume.
    assert [r["step"] for r in superseded if r.get("kind") == "train"] == [5, 6]
    assert losses(background) == losses(full)


PIPELINE_STAGES = TWO_STAGES.replace(
    "rope_theta = 100000\n",
    'rope_theta = 100000\ncontext_parallel_degree = 2\ncontext_parallel_pattern = "ulysses"\n',
)


def test_in_memory_remesh_with_pipeline_equals_reloading(four_rank_runs):
    """4 ranks, pp 2 (a 1F1B schedule per stage): dp_shard 2 x cp 1 (ring), then dp_shard 1 x
    cp 2 with Ulysses (``PIPELINE_STAGES``). Taking the state over in memory trains exactly as
    reloading the boundary checkpoint into the new stage's trainer."""
    runs = {}
    for name in ("memory", "disk"):
        dump, proc = run_of(four_rank_runs, f"pp-{name}")
        assert ("re-meshed in memory" in proc.stdout) == (name == "memory"), proc.stdout[-2000:]
        runs[name] = [(r["step"], r["loss"], r["grad_norm"]) for r in records(dump)[0].values()]
    assert [s for s, _, _ in runs["memory"]] == [1, 2, 3, 4, 5, 6]
    assert runs["memory"] == runs["disk"]


def test_auto_meshed_stage_trains_and_checkpoints(tmp_path):
    """2 ranks, stage 0 Ulysses over cp 2, stage 1 auto-meshed: the plan is logged before
    training, the stage runs the chosen mesh with the state taken over exactly, and neither
    DCP checkpoints nor CP patterns trip over what the planner's fake-process-group runs left
    in the process (they once did: every rank claimed the first shard in a save, and a
    pattern ran on the fake run's dead groups; see dry_run.forget_fake_meshes)."""
    stages = TWO_STAGES.replace(
        "rope_theta = 10000\n",
        'rope_theta = 10000\ncontext_parallel_degree = 2\ncontext_parallel_pattern = "ulysses"\n',
    )
    path = recipe(tmp_path, stages + "auto_mesh = true\n")
    dump = tmp_path / "run"
    log = torchrun(2, run_args(path, dump)).stdout
    assert "stage 1 auto mesh:" in log and "chosen" in log, log[-3000:]
    steps, boundaries = records(dump)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    end, start = (b["params"] for b in boundaries)
    assert set(start) == set(end)
    for name, stats in end.items():  # sum, sum of squares, position-weighted sum
        assert start[name] == pytest.approx(stats, rel=1e-9, abs=1e-7), name
    # The records of stage 1 train on the mesh the plan chose (its "chosen" line).
    chosen = re.search(r"chosen\s+tp(\d+) cp(\d+)", log)
    assert chosen is not None, log[-3000:]
    tp, cp = int(chosen[1]), int(chosen[2])
    assert {(r["tp"], r["cp"]) for r in steps.values() if r["stage"] == 1} == {(tp, cp)}
    assert {(r["tp"], r["cp"]) for r in steps.values() if r["stage"] == 0} == {(1, 2)}
    assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == [
        "step-2",
        "step-3",
        "step-4",
        "step-6",
    ]


TP_STAGES = """
[[curriculum.stages]]
seq_len = 64
steps = 2
rope_theta = 10000
context_parallel_degree = 1

[[curriculum.stages]]
seq_len = 128
steps = 2
context_parallel_degree = 2
context_parallel_pattern = "ulysses"
"""


def test_remesh_that_moves_tensor_parallel_shards(four_rank_runs):
    """4 ranks, tp 2 in both stages, cp innermost: stage 0 is dp_shard 2 x tp 2 (tp groups
    {0, 1}, {2, 3}), stage 1 tp 2 x cp 2 with Ulysses (tp groups {0, 2}, {1, 3}). Every
    parameter and optimizer state changes ranks, so the in-memory re-mesh gathers and
    re-slices each one (``reshard_like``), and the per-parameter fingerprint (sum, squares,
    position-weighted sum) after it equals the one before; a shard kept on the wrong rank
    changes the weighted sum (shown by breaking ``_same_layout`` to ignore the rank grid).
    Stage 1's records count Ulysses calls (0 would be torch's ring running instead), and its
    global batch, derived (-1) as local 4 x dp 1, is said to be half the cp 1 reading."""
    dump, proc = run_of(four_rank_runs, "tp")
    log = proc.stdout
    remesh = "dp_shard 2 x tp 2 x cp 1 -> pp 1 x dp_replicate 1 x dp_shard 1 x tp 2 x cp 2"
    assert f"stage 1: re-meshed in memory (pp 1 x dp_replicate 1 x {remesh}" in log, log[-3000:]
    steps, boundaries = records(dump)
    assert {(r["stage"], r["tp"], r["cp"]) for r in steps.values()} == {(0, 2, 1), (1, 2, 2)}
    end, start = (b["params"] for b in boundaries)
    assert set(start) == set(end) and len(end) == 1 + 2 * 9 + 2
    for name, (total, squares, weighted) in end.items():
        got_total, got_squares, got_weighted = start[name]
        assert got_squares == pytest.approx(squares, rel=1e-12), name
        assert got_total == pytest.approx(total, rel=1e-9, abs=1e-9), name
        assert got_weighted == pytest.approx(weighted, rel=1e-9, abs=1e-7), name
    assert all(r["cp_pattern_calls"] == 0 for r in steps.values() if r["stage"] == 0)
    assert all(r["cp_pattern_calls"] > 0 for r in steps.values() if r["stage"] == 1), steps
    warning = (
        "curriculum.stages[1]: training.global_batch_size = -1: global batch = local_batch_size"
        " 4 x dp 1 = 4 sequences; context_parallel_degree 2 took its ranks from dp, which at "
        "cp 1 gives 8. Losses compare only at equal batches: set "
        "curriculum.stages[1].global_batch_size = 8 to train the cp 1 batch"
    )
    assert log.count(warning) == 1, log[-3000:]
    assert "curriculum.stages[0]: training.global_batch_size" not in log


def test_8b_1m_recipe_validates_for_its_cluster():
    from torchtitan_ext.curriculum import stage_config
    from torchtitan_ext.validate import validate

    cfg = load_config(
        ["--job.config_file", str(ROOT / "train_configs" / "llama3_8b_curriculum_1m.toml")]
    )
    stages = plan_curriculum(cfg, 256, choose_stage_mesh)
    assert stages[0].seq_len == 4096 and stages[-1].seq_len == 1048576
    thetas = [s.rope_theta for s in stages]
    assert thetas == sorted(thetas) and len(set(thetas)) > 1
    # Once CP is on, the tokens per CP rank stay at the cap (Llama 3's rule).
    per_rank = [s.seq_len // s.cp for s in stages]
    assert all(n <= 16384 for n in per_rank), per_rank
    assert [n for s, n in zip(stages, per_rank, strict=True) if s.cp > 1] == [16384] * 3
    for s in stages:
        assert validate(stage_config(cfg, s), 256) is not None


@pytest.mark.parametrize(
    ("stage2", "warned"),
    [("", [1, 2]), ("global_batch_size = 4\n", [1])],
    ids=["derived", "stage-2-batch-set"],
)
def test_stage_batch_shrunk_by_cp_is_reported(tmp_path, capsys, stage2, warned):
    """A stage that derives its batch (global_batch_size = -1, no tokens_per_step) on a mesh
    whose cp took ranks from dp gets the single-stage run's warning, naming the stage's key
    and the cp 1 batch (16 on 4 ranks at local batch 4); not a stage that sets its batch, nor
    the cp 1 stage. The trainer prints the same line at the stage's start
    (test_remesh_that_moves_tensor_parallel_shards)."""
    from torchtitan_ext.config.__main__ import main as config_main

    stages = STAGES.replace("[curriculum]\ntokens_per_step = 1024\n", "") + stage2
    args = ["--job.config_file", str(recipe(tmp_path, stages)), "--world_size", "4"]
    assert config_main([*args, "--training.local_batch_size", "4"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("# warning:")]
    assert len(lines) == len(warned), out
    for line, (index, batch) in zip(lines, [(i, {1: 8, 2: 4}[i]) for i in warned], strict=True):
        key = f"curriculum.stages[{index}]"
        assert line.startswith(f"# warning: {key}: training.global_batch_size = -1: "), line
        assert f"= {batch} sequences;" in line and f"set {key}.global_batch_size = 16 " in line
