"""TorchTitan 0.2.2 options a recipe turns on (issue 25): the profiler's traces and memory
snapshots (``[profiling]``), FSDP2's CPU offload (``training.enable_cpu_offload``) and float8
(``model.converters = ["float8"]``), and TorchTitan's own recipes, which use them, in the
checker. Real processes over gloo; the float8 run emulates float8 (TorchTitan's
``quantize.linear.float8.emulate``), the only float8 a CPU runs."""

import json
import re

import pytest
import torch
from torch.distributed.tensor import DTensor

from tests.conftest import ROOT, read_metrics, spawn, tiny_run_args, torchrun
from torchtitan_ext.config import ConfigError, load_config
from torchtitan_ext.config.__main__ import main as config_main
from torchtitan_ext.validate import check_recipe

DEBUG_CPU = str(ROOT / "train_configs" / "debug_cpu.toml")
TITAN_RECIPES = (
    "debug_model.toml",
    "llama3_8b.toml",
    "llama3_70b.toml",
    "llama3_405b.toml",
    "qwen3_0.6b.toml",
    "integration_tests_base_config.toml",
)


@pytest.mark.parametrize("name", TITAN_RECIPES)
def test_checker_passes_torchtitan_recipes(titan_recipes, capsys, name):
    """``python -m torchtitan_ext.config --job.config_file X`` (no world size: the recipe and
    trainer phases) passes each of TorchTitan 0.2.2's recipes as they are: 8B and 70B turn on
    the profiler, 405B float8."""
    assert (titan_recipes / name).is_file()
    assert config_main(["--job.config_file", str(titan_recipes / name)]) == 0, capsys.readouterr()


def test_405b_recipe_is_refused_on_cpu_in_the_device_phase_only(titan_recipes, capsys):
    """With a world size the device phase runs: float8 needs CUDA >= 8.9, one line."""
    recipe = str(titan_recipes / "llama3_405b.toml")
    args = ["--job.config_file", recipe, "--world_size", "512", "--training.device", "cpu"]
    assert config_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: model.converters = ['float8']: ")
    assert "compute capability 8.9" in err[0] and "this run is on cpu" in err[0]


@pytest.mark.parametrize(
    ("more", "key", "fragment"),
    [
        (["--training.enable_cpu_offload"], "training.enable_cpu_offload",
         "this run is on cpu, where they already are"),
        (["--model.converters", "float8"], "model.converters", "compute capability 8.9"),
        # TorchTitan's rule: emulation is eager only.
        (["--model.converters", "float8", "--quantize.linear.float8.emulate", "--compile.enable"],
         "model.converters", "compute capability 8.9"),
        (["--model.converters", "quantize.linear.mx"], "model.converters", "only float8"),
        (["--profiling.enable_profiling", "--profiling.profile_freq", "3"],
         "profiling.profile_freq", "must be >= profiler_warmup + profiler_active = 4"),
    ],
)  # fmt: skip
def test_cpu_refusals_name_the_key(more, key, fragment):
    """On CPU, CPU offload and float8 are one line each in the device phase; a converter we do
    not run and a profiler schedule TorchTitan would assert on, one line earlier."""
    cfg = load_config(["--job.config_file", DEBUG_CPU, "--training.device", "cpu", *more])
    with pytest.raises(ConfigError, match=re.escape(fragment)) as err:
        check_recipe(cfg, 4)
    assert err.value.key == key
    assert "\n" not in str(err.value)


def test_wandb_without_the_package_is_one_line(monkeypatch):
    """metrics.enable_wandb where wandb cannot be imported: one error naming the key and the
    package (device phase), not a traceback at the first logged step."""
    import torchtitan_ext.metrics

    cfg = load_config(["--job.config_file", DEBUG_CPU, "--metrics.enable_wandb"])
    assert check_recipe(cfg, 4).notes == []  # installed here (a dev dependency)
    monkeypatch.setattr(torchtitan_ext.metrics, "wandb_installed", lambda: False)
    with pytest.raises(ConfigError, match=re.escape("needs the wandb package (pip install")) as e:
        check_recipe(cfg, 4)
    assert e.value.key == "metrics.enable_wandb"


def test_memory_snapshot_on_cpu_is_one_note_not_a_refusal(capsys):
    args = ["--job.config_file", DEBUG_CPU, "--training.device", "cpu"]
    on = [*args, "--profiling.enable_memory_snapshot"]
    check = check_recipe(load_config(on), 4)
    assert len(check.notes) == 1
    assert check.notes[0].startswith("profiling.enable_memory_snapshot = True: ")
    assert "this run is on cpu: no snapshot is written" in check.notes[0]
    assert check_recipe(load_config(args), 4).notes == []
    # Float8 emulation passes the device phase (TorchTitan's test mode, eager).
    emulated = [*args, "--model.converters", "float8", "--quantize.linear.float8.emulate"]
    assert check_recipe(load_config(emulated), 4).notes == []
    # The checker prints it as a TOML comment after the resolved config.
    assert config_main([*on, "--world_size", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    notes = [line for line in out if line.startswith("# note: ")]
    assert notes == [f"# note: {check.notes[0]}"]


def test_profiled_float8_run_writes_one_trace_per_rank_per_profiled_step(tmp_path, monkeypatch):
    """2 ranks (FSDP), 4 steps, a trace every 2 steps: iteration_2 and iteration_4 hold one
    Chrome trace per rank (TorchTitan's layout), each with the one step it recorded (torch's
    ``ProfilerStep#<n>``, n counted from 0), the rank's distributed info and float8's matmuls
    (emulated, with TorchTitan's 405B float8 settings: FSDP float8 all-gather, scales
    precomputed after each update). Memory snapshots on CPU: one log line, no files. The same
    run logs to wandb (offline, one launch for both): rank 0's run file holds each step's
    loss and grad norm as metrics.jsonl has them."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    dump = tmp_path / "run"
    proc = torchrun(
        2,
        [
            *tiny_run_args(dump, steps=4),
            "--checkpoint.no-enable",
            *("--profiling.enable_profiling", "--profiling.profile_freq", "2"),
            *("--profiling.profiler_warmup", "0", "--profiling.profiler_active", "1"),
            "--profiling.enable_memory_snapshot",
            *("--model.converters", "float8", "--quantize.linear.float8.emulate"),
            "--quantize.linear.float8.enable_fsdp_float8_all_gather",
            "--quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp",
            *("--quantize.linear.float8.filter_fqns", "output"),
            "--metrics.enable_wandb",
        ],
    )
    log = proc.stdout + proc.stderr
    assert log.count("profiling.enable_memory_snapshot = True:") == 1, log[-3000:]
    assert "Swapped to Float8Linear layers with enable_fsdp_float8_all_gather=True" in log
    traces = dump / "profile_traces"
    files = sorted(str(p.relative_to(traces)) for p in traces.rglob("*") if p.is_file())
    assert files == [f"iteration_{s}/rank{r}_trace.json" for s in (2, 4) for r in (0, 1)]
    assert not (dump / "memory_snapshot").exists()
    for step in (2, 4):
        for rank in (0, 1):
            trace = json.loads(
                (traces / f"iteration_{step}" / f"rank{rank}_trace.json").read_text()
            )
            names = [e.get("name", "") for e in trace["traceEvents"]]
            assert [n for n in names if n.startswith("ProfilerStep#")] == [
                f"ProfilerStep#{step - 1}"
            ]
            assert trace["distributedInfo"]["rank"] == rank
            assert trace["distributedInfo"]["world_size"] == 2
            assert "matmul_with_hp_or_float8_args" in names  # torchao's float8 matmul
            assert any(n.startswith("aten::mm") for n in names)
    # wandb: one offline run (rank 0) under <dump>/tb/wandb; its records are protobuf, whose
    # history values are the JSON text of each number (wandb 0.31 has no Python reader).
    (run_file,) = (dump / "tb" / "wandb").glob("offline-run-*/run-*.wandb")
    data = run_file.read_bytes()
    records = read_metrics(dump)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        for key in ("loss", "grad_norm"):
            assert json.dumps(r[key]).encode() in data, (r["step"], key)
    assert b"train/loss" in data and b"train/tokens_per_sec" in data


def _offload_checks(rank: int, world_size: int) -> None:
    """FSDP2 with CPUOffloadPolicy (on a CPU mesh: unpinned) trains like FSDP without it: the
    same loss and, after one AdamW step, the same parameters, bit for bit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy
    from torchtitan.models.llama3 import Transformer, llama3_args

    from torchtitan_ext.models import build_model_on_meta, init_weights_mesh_independent
    from torchtitan_ext.parallel.fsdp import apply_fsdp

    mesh = init_device_mesh("cpu", (world_size,))
    args = llama3_args["debugmodel_cpu_tiny"]
    tokens = torch.randint(
        0, args.vocab_size, (2, 33), generator=torch.Generator().manual_seed(rank)
    )
    results = []
    for offload in (False, True):
        model = build_model_on_meta(Transformer, args)
        apply_fsdp(model, mesh, torch.float32, torch.float32, cpu_offload=offload)
        init_weights_mesh_independent(model, seed=3, device=torch.device("cpu"))
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        groups = [m._get_fsdp_state()._fsdp_param_group for m in units]
        policies = {type(g.offload_policy) for g in groups if g is not None}
        assert policies == ({CPUOffloadPolicy} if offload else {OffloadPolicy})
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        params = [p.full_tensor() for p in model.parameters() if isinstance(p, DTensor)]
        results.append((loss.detach(), params))
    (loss0, params0), (loss1, params1) = results
    assert torch.equal(loss0, loss1)
    assert len(params0) == len(params1) > 0
    for a, b in zip(params0, params1, strict=True):
        assert torch.equal(a, b)


def test_fsdp_cpu_offload_trains_like_fsdp_on_2_ranks():
    spawn(_offload_checks, 2)
