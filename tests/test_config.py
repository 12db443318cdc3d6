"""Recipe loading and validation (in-process; no collectives involved)."""

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import ROOT
from torchtitan_ext.config import ConfigError, load_config
from torchtitan_ext.config.__main__ import main as config_main
from torchtitan_ext.validate import validate

DEBUG_CPU = str(ROOT / "train_configs" / "debug_cpu.toml")


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("name", "world_size", "shape", "refused_on_cpu"),
    [
        ("debug_model.toml", 8, (1, 1, 8, 1, 1), None),
        ("llama3_8b.toml", 64, (1, 1, 64, 1, 1), None),
        ("llama3_70b.toml", 64, (1, 1, 8, 8, 1), None),
        ("llama3_405b.toml", 512, (1, 1, 64, 8, 1), "model.converters"),
    ],
)
def test_torchtitan_recipes_load_unmodified(titan_recipes, name, world_size, shape, refused_on_cpu):
    """TorchTitan's own recipes load and resolve their mesh as they are (the dry run plans
    them) and pass every phase but data, the profiler of 8B and 70B included, except what
    the device cannot run: float8 (405B) needs CUDA >= 8.9, one error in the device phase."""
    from torchtitan_ext.validate import check_recipe

    cfg = load_config(["--job.config_file", str(titan_recipes / name)])
    dims = validate(cfg, world_size)
    assert dims is not None
    assert (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp, dims.cp) == shape
    if refused_on_cpu is None or torch.cuda.is_available():
        check_recipe(cfg, world_size)
    else:
        with pytest.raises(ConfigError, match=r"compute capability 8\.9") as err:
            check_recipe(cfg, world_size)
        assert err.value.key == refused_on_cpu
    # TorchTitan's values survive the merge with our sections, ours get their defaults.
    assert cfg.model.name == "llama3"
    assert cfg.model.tokenizer == "auto"
    assert cfg.data.validation_fraction == 0.02


def test_cli_overrides_titan_and_our_keys():
    cfg = load_config(
        [
            "--job.config_file", DEBUG_CPU,
            "--training.seq_len", "128",
            "--data.shuffle_seed", "7",
            "--parallelism.mesh_dim_order", "pp,dp_replicate,cp,dp_shard,tp",
        ]
    )  # fmt: skip
    assert cfg.training.seq_len == 128  # TorchTitan key: CLI > TOML
    assert cfg.data.shuffle_seed == 7  # our key
    assert cfg.parallelism.mesh_dim_order == ["pp", "dp_replicate", "cp", "dp_shard", "tp"]
    assert cfg.training.steps == 300  # TOML > default
    assert cfg.optimizer.lr == pytest.approx(3e-3)


@pytest.mark.parametrize(
    ("toml", "key", "fragment"),
    [
        ('[training]\nseq_len = "abc"\n', "training.seq_len", "expected an int"),
        ("[training]\nseq_lenn = 128\n", "training.seq_lenn", "did you mean 'training.seq_len'"),
        ("[trainng]\nsteps = 1\n", "trainng", "did you mean 'training'"),
        ('[model]\ntokenizer = "bpe"\n', "model.tokenizer", "one of 'auto', 'byte', 'hf'"),
        ("[metrics]\nenable_tensorboard = 1\n", "metrics.enable_tensorboard", "expected a bool"),
        ('[parallelism]\nmesh_dim_order = "pp"\n', "parallelism.mesh_dim_order", "a list of"),
        ('[model]\nflavor = "debugmodel_cpuu"\n', "model.flavor", "did you mean 'debugmodel_cpu'"),
        (
            '[parallelism]\ncontext_parallel_load_balancer = ""\n',
            "parallelism.context_parallel_load_balancer",
            "cannot be an empty string",
        ),
        ("[validation]\nsteps = 0\n", "validation.steps", "must be positive or -1"),
        ("[training]\nsteps = 0\n", "training.steps", "must be >= 1"),
        ("[checkpoint]\nstop_grace_seconds = -1.0\n", "checkpoint.stop_grace_seconds",
         "must be a number of seconds >= 0 (0: off)"),
        (
            "[parallelism]\nmesh_dim_order = ['dp_shard', 'pp', 'dp_replicate', 'tp', 'cp']\n",
            "parallelism.mesh_dim_order",
            "pp must be first",
        ),
        (
            "[parallelism]\nmesh_dim_order = ['pp', 'dp_replicate', 'dp_shard', 'tp']\n",
            "parallelism.mesh_dim_order",
            "permutation",
        ),
        ('[model]\nrope_scaling = "ntk"\n', "model.rope_scaling", "one of llama, yarn, none"),
        ('[model]\nrope_scaling = "yarn"\nrope_scaling_factor = 0.5\n',
         "model.rope_scaling_factor", "must be >= 1"),
        ('[model]\nrope_scaling = "yarn"\nrope_yarn_beta_fast = 0.5\n',
         "model.rope_yarn_beta_fast", "greater than rope_yarn_beta_slow (1.0)"),
        ("[model]\nrope_low_freq_factor = 4.0\n", "model.rope_high_freq_factor",
         "greater than rope_low_freq_factor (4.0)"),
    ],
)  # fmt: skip
def test_bad_recipe_values_name_key_and_value(tmp_path, toml, key, fragment):
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as err:
        validate(load_config(["--job.config_file", path]), None)
    assert err.value.key == key
    assert fragment in str(err.value)


CP4 = ["--parallelism.context_parallel_degree", "4"]
PATTERN = ["--parallelism.context_parallel_pattern"]
UD = ["--parallelism.context_parallel_ulysses_degree"]
IRD = ["--parallelism.context_parallel_inner_ring_degree"]


@pytest.mark.parametrize(
    ("overrides", "world_size", "key", "fragment"),
    [
        ([], 6, "parallelism",  # dp_shard 4 fixed below, world 6
         "multiply to 4 but the world size is 6: set data_parallel_shard_degree = -1"),
        (["--parallelism.tensor_parallel_degree", "3"], 6, "parallelism.tensor_parallel_degree",
         "n_heads = 8 is not divisible"),
        (["--parallelism.tensor_parallel_degree", "8"], 8, "parallelism.tensor_parallel_degree",
         "n_kv_heads = 4 is not divisible"),
        (["--parallelism.context_parallel_degree", "4", "--training.seq_len", "260"], 4,
         "training.seq_len", "2 x cp (4) = 8"),
        (["--parallelism.tensor_parallel_degree", "2", "--training.seq_len", "255"], 2,
         "training.seq_len", "tp (2) = 2"),
        (["--parallelism.data_parallel_shard_degree", "-1",
          "--parallelism.context_parallel_degree", "3", "--training.seq_len", "258",
          "--validation.no-enable"], 4,
         "parallelism.data_parallel_shard_degree", "not divisible by"),
        (["--training.global_batch_size", "6"], 4, "training.global_batch_size",
         "multiple of local_batch_size (4) x data-parallel degree (4) = 16"),
        (["--parallelism.context_parallel_degree", "2", "--validation.seq_len", "250"], 4,
         "validation.seq_len", "2 x cp (2) = 4"),
        (["--parallelism.context_parallel_degree", "2",
          "--parallelism.context_parallel_load_balancer", "ptrr"], 4,
         "parallelism.context_parallel_load_balancer",
         "with model.attn_mask_type = 'block_causal' also 'per_document_headtail', "
         "'per_document_lpt', 'ptrr'"),
        (["--parallelism.context_parallel_degree", "2",
          "--parallelism.context_parallel_load_balancer", "per_documents", "--model.attn_mask_type",
          "block_causal"], 4, "parallelism.context_parallel_load_balancer", "supported:"),
        (["--parallelism.context_parallel_degree", "2", "--model.flavor", "debugmodel_flex_attn"],
         4, "model.flavor", "use an SDPA flavor with model.attn_mask_type = 'block_causal'"),
        (["--model.attn_mask_type", "block_casual"], 4, "model.attn_mask_type",
         "did you mean 'block_causal'?"),
        (["--model.flavor", "debugmodel_varlen_attn", "--model.attn_mask_type", "causal"], 4,
         "model.attn_mask_type", "varlen attention, which is block_causal only"),
        (["--parallelism.context_parallel_degree", "2",
          "--parallelism.context_parallel_load_balancer", "None", "--training.seq_len", "258",
          "--validation.no-enable"], 4, "parallelism", "multiply to 8"),
        (["--parallelism.context_parallel_degree", "2", "--training.loss_chunk_tokens", "200",
          "--parallelism.data_parallel_shard_degree", "2"], 4,
         "training.loss_chunk_tokens", "larger than the local sequence (seq_len 256 / cp 2"),
        (["--training.loss_chunk_tokens", "-8"], 4, "training.loss_chunk_tokens", ">= 0"),
        (["--training.max_consecutive_nonfinite_steps", "-1"], 4,
         "training.max_consecutive_nonfinite_steps", ">= 0"),
        # Context-parallel patterns (dp_shard 4 x cp 4 = 16 ranks; 8 heads).
        ([*CP4, *PATTERN, "ulyses"], 16, "parallelism.context_parallel_pattern",
         "did you mean 'ulysses'?"),
        ([*CP4, *PATTERN, "hybrid", *UD, "3"], 16, "parallelism.context_parallel_ulysses_degree",
         "hybrid needs a divisor of context_parallel_degree (4) in 2 .. 2"),
        ([*CP4, *PATTERN, "double_ring", *IRD, "4"], 16,
         "parallelism.context_parallel_inner_ring_degree", "in 2 .. 2"),
        (["--parallelism.context_parallel_degree", "2", *PATTERN, "double_ring"], 8,
         "parallelism.context_parallel_degree", "cp 2 has none; use 'ring'"),
        ([*CP4, *UD, "2"], 16, "parallelism.context_parallel_ulysses_degree",
         "only context_parallel_pattern = 'hybrid' uses it (the pattern is 'ring')"),
        ([*CP4, *PATTERN, "ulysses", "--parallelism.tensor_parallel_degree", "4"], 64,
         "parallelism.context_parallel_degree", "must divide 2"),
    ],
)  # fmt: skip
def test_bad_mesh_for_world_size(overrides, world_size, key, fragment):
    args = ["--job.config_file", DEBUG_CPU, "--parallelism.data_parallel_shard_degree", "4"]
    with pytest.raises(ConfigError) as err:
        validate(load_config(args + overrides), world_size)
    assert err.value.key == key
    assert fragment in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("cp", "dp_shard", "inner"), [(4, 4, 2), (8, 2, 4), (6, 1, 3), (16, 1, 8)]
)  # fmt: skip
def test_double_ring_default_inner_ring_degree(tmp_path, cp, dp_shard, inner):
    """``context_parallel_inner_ring_degree`` unset (0) with the double ring: the largest
    divisor of cp in 2 .. min(cp / 2, 8) (an inner ring within an 8-GPU node), in the check,
    the pattern the trainer builds, and the stage plan's label."""
    from torchtitan_ext.curriculum import _pattern_label, stage_config
    from torchtitan_ext.parallel.cp_patterns import default_inner_ring_degree, recipe_pattern
    from torchtitan_ext.validate import plan_curriculum

    assert default_inner_ring_degree(cp) == inner
    args = ["--job.config_file", DEBUG_CPU, *PATTERN, "double_ring", "--validation.no-enable",
            "--parallelism.context_parallel_degree", str(cp), "--training.seq_len", "384",
            "--parallelism.data_parallel_shard_degree", str(dp_shard)]  # fmt: skip
    cfg = load_config(args)
    assert cfg.parallelism.context_parallel_inner_ring_degree == 0
    validate(cfg, cp * dp_shard)
    pattern = recipe_pattern(cfg.parallelism, cp)
    assert (pattern.name, pattern.inner, pattern.outer) == ("double_ring", inner, cp // inner)
    # A curriculum stage that sets the pattern without its degree gets the same.
    stage_toml = (
        "\n[curriculum]\n[[curriculum.stages]]\nseq_len = 384\nsteps = 2\n"
        f'context_parallel_degree = {cp}\ncontext_parallel_pattern = "double_ring"\n'
    )
    recipe = write(tmp_path, (ROOT / "train_configs" / "debug_cpu.toml").read_text() + stage_toml)
    cfg = load_config(["--job.config_file", recipe, "--validation.no-enable",
                       "--parallelism.data_parallel_shard_degree", "-1"])  # fmt: skip
    (stage,) = plan_curriculum(cfg, cp * dp_shard)
    assert _pattern_label(stage) == f"double_ring({inner})"
    assert recipe_pattern(stage_config(cfg, stage).parallelism, cp).inner == inner


PP = ["--parallelism.pipeline_parallel_degree"]
SCHED = ["--parallelism.pipeline_parallel_schedule"]
LPS = ["--parallelism.pipeline_parallel_layers_per_stage"]


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        ([*PP, "2", *SCHED, "Fancy1F1B"], "parallelism.pipeline_parallel_schedule",
         "supported schedules: GPipe, 1F1B"),
        ([*PP, "2", *SCHED, "Interleaved1F1B", *LPS, "3"],
         "parallelism.pipeline_parallel_layers_per_stage", "needs >= 2"),
        ([*PP, "2", *SCHED, "GPipe", *LPS, "1"],
         "parallelism.pipeline_parallel_layers_per_stage", "exactly 1 per rank"),
        ([*PP, "2", *SCHED, "ZBVZeroBubble", *LPS, "1"],
         "parallelism.pipeline_parallel_layers_per_stage", "ZBVZeroBubble needs 2"),
        ([*PP, "4", *SCHED, "Interleaved1F1B"], "parallelism.pipeline_parallel_degree",
         "cannot be greater than effective layers (6)"),
        ([*PP, "2", *LPS, "2"], "parallelism.pipeline_parallel_layers_per_stage",
         "gives 3 stages, not divisible by pp = 2"),
        ([*PP, "2", "--parallelism.pipeline_parallel_microbatch_size", "3"],
         "parallelism.pipeline_parallel_microbatch_size", "must divide training.local_batch_size"),
        ([*PP, "4", "--training.local_batch_size", "2", "--training.global_batch_size", "4",
          "--model.flavor", "debugmodel_cpu_deep"], "training.local_batch_size",
         "1F1B needs >= 4"),
        ([*PP, "2", *SCHED, "DualPipeV", "--training.local_batch_size", "2"],
         "training.local_batch_size", "DualPipeV needs >= 4"),
        ([*PP, "2", "--validation.local_batch_size", "2"], "validation.local_batch_size",
         "shaped like training ones"),
        ([*PP, "2", *SCHED, "ZBVZeroBubble"], "validation.enable", "V-shaped schedules"),
    ],
)  # fmt: skip
def test_bad_pipeline_settings(overrides, key, fragment):
    args = ["--job.config_file", DEBUG_CPU, "--parallelism.data_parallel_shard_degree", "1"]
    with pytest.raises(ConfigError) as err:
        validate(load_config(args + overrides), None)
    assert err.value.key == key
    assert fragment in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("fqns", "fragment"),
    [
        ('[["tok_embeddings", "layers.0"], ["layers.1", "layers.3", "norm", "output"]]',
         "missing ['layers.2']"),
        ('[["tok_embeddings", "layers.1", "layers.0"], ["layers.2", "layers.3", "norm", '
         '"output"]]', "in model order"),
        ('[["tok_embeddings", "layers.0", "layers.1", "layers.2", "layers.3", "norm", '
         '"output"], []]', "at least one module"),
    ],
)  # fmt: skip
def test_bad_module_fqns_per_model_part(tmp_path, fqns, fragment):
    recipe = (ROOT / "train_configs" / "debug_cpu.toml").read_text()
    recipe = recipe.replace(
        "[parallelism]\n", f"[parallelism]\nmodule_fqns_per_model_part = {fqns}\n"
    )
    args = ["--job.config_file", write(tmp_path, recipe), *PP, "2"]
    with pytest.raises(ConfigError) as err:
        validate(load_config([*args, "--parallelism.data_parallel_shard_degree", "1"]), None)
    assert err.value.key == "parallelism.module_fqns_per_model_part"
    assert fragment in str(err.value), str(err.value)


def test_pipeline_plan_splits_layers_like_torchtitan():
    from torchtitan_ext.parallel.pipeline import plan_pipeline

    args = ["--job.config_file", DEBUG_CPU, "--model.flavor", "debugmodel_cpu_deep"]
    plan = plan_pipeline(load_config([*args, *PP, "2", *SCHED, "Interleaved1F1B"]), 6)
    assert plan.num_stages == 4 and plan.stages_per_rank == 2 and plan.n_microbatches == 4
    # 6 layers + embedding + output (weight 1 each) over 4 stages: 2 "layers" per stage.
    assert plan.module_fqns == [
        ["tok_embeddings", "layers.0"],
        ["layers.1", "layers.2"],
        ["layers.3", "layers.4"],
        ["layers.5", "norm", "output"],
    ]


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(["--job.config_file", str(tmp_path / "nope.toml")])
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(["--job.config_file", write(tmp_path, "[training\n")])


@pytest.mark.parametrize(
    ("more", "fragment"),
    [
        (["--fault_tolerance.enable"], "fault_tolerance.enable = True: not supported"),
        (["--world_size", "4", "--fault_tolerance.enable"], "not supported"),
        (["--world_size", "4", "--training.device", "cpu", "--training.enable_cpu_offload"],
         "training.enable_cpu_offload = True: FSDP2's CPU offload"),
        (["--world_size", "4", "--training.device", "cpu",
          "--parallelism.data_parallel_shard_degree", "-1",
          "--activation_checkpoint.enable_cpu_offload", "--activation_checkpoint.mode", "full"],
         "activation_checkpoint.enable_cpu_offload"),
        (["--world_size", "1", "--training.device", "cpu", "--model.flavor",
          "debugmodel_flex_attn"], "FlexAttention has no backward on CPU"),
        (["--world_size", "1", "--training.device", "cpu", "--model.flavor",
          "debugmodel_varlen_attn"], "varlen attention runs on CUDA only"),
        (["--checkpoint.allow_unverified", "--checkpoint.no-verify"],
         "checkpoint.allow_unverified = True: has no effect with checkpoint.verify = false"),
    ],
)  # fmt: skip
def test_config_cli_rejects_what_training_rejects(capsys, more, fragment):
    """The checker runs train.py's own checks (validate.check_recipe), so it cannot pass a
    recipe that training refuses before reading data."""
    assert config_main(["--job.config_file", DEBUG_CPU, *more]) == 2
    assert fragment in capsys.readouterr().err


def test_checker_and_trainer_run_every_rule_of_one_table(monkeypatch, capsys):
    """validate.RULES is the one list of rules: the checker (with a world size) runs
    every rule of every phase but data, train.py's prepare every rule of every phase (the
    recipe and mesh ones once more per curriculum stage); --list-rules prints each of them."""
    import importlib

    from torchtitan_ext.distributed import RankInfo
    from torchtitan_ext.tools.auto_mesh import choose_stage_mesh
    from torchtitan_ext.trainer import prepare

    v = importlib.import_module("torchtitan_ext.validate")
    calls: dict[int, int] = {}

    def counted(i: int, rule: Any) -> Any:
        def check(c: Any) -> None:
            calls[i] = calls.get(i, 0) + 1
            rule.check(c)

        return v.Rule(rule.phase, rule.keys, rule.what, check, rule.where)

    monkeypatch.setattr(v, "RULES", tuple(counted(i, r) for i, r in enumerate(v.RULES)))
    curriculum = str(ROOT / "train_configs" / "debug_cpu_curriculum.toml")
    args = ["--job.config_file", curriculum, "--training.device", "cpu"]
    stages = 4  # debug_cpu_curriculum.toml's
    per_stage = {"recipe", "mesh"}
    for run, phases in (
        ("checker", ("curriculum", "recipe", "mesh", "trainer", "device")),
        ("train.py", v.PHASES),
    ):
        calls.clear()
        if run == "checker":
            assert config_main([*args, "--world_size", "4"]) == 0, capsys.readouterr().err
        else:
            prepare(args, RankInfo(0, 0, 4), choose_stage_mesh)
        # Exactly the rules of these phases ran; the recipe and mesh ones also for each stage
        # (and for each mesh the auto-meshed stage 3 considers).
        assert set(calls) == {i for i, r in enumerate(v.RULES) if r.phase in phases}, run
        for i, r in enumerate(v.RULES):
            if r.phase in phases:
                assert calls[i] >= 1 + stages * (r.phase in per_stage), (run, r.what)
    capsys.readouterr()
    assert config_main(["--list-rules"]) == 0
    listed = capsys.readouterr().out
    assert [line.rstrip(":") for line in listed.splitlines() if not line.startswith(" ")] == list(
        v.PHASES
    )
    for rule in v.RULES:
        assert f"{rule.what} [{rule.where}]" in listed


def test_walkthrough_recipe_is_the_template_edited(capsys):
    """train_configs/debug_cpu_4d_curriculum.toml (the README walkthrough's recipe) differs from
    docs/recipe_template.toml only in the walkthrough's edits, and passes the checker on 8 ranks
    with pp 2 x tp 2 and cp 1 -> 2 over its two stages."""
    import tomli

    template = tomli.loads((ROOT / "docs" / "recipe_template.toml").read_text())
    recipe = ROOT / "train_configs" / "debug_cpu_4d_curriculum.toml"
    walk = tomli.loads(recipe.read_text())
    changed = {
        f"{section}.{key}"
        for section in template.keys() | walk.keys()
        for key in template.get(section, {}).keys() | walk.get(section, {}).keys()
        if template.get(section, {}).get(key) != walk.get(section, {}).get(key)
    }
    assert changed == {
        "job.dump_folder", "job.description", "training.local_batch_size",
        "lr_scheduler.warmup_steps", "parallelism.tensor_parallel_degree",
        "parallelism.pipeline_parallel_degree", "checkpoint.interval", "metrics.log_freq",
        "validation.freq", "validation.steps", "validation.local_batch_size",
        "curriculum.tokens_per_step", "curriculum.stages",
    }  # fmt: skip
    assert config_main(["--job.config_file", str(recipe), "--world_size", "8"]) == 0
    out = capsys.readouterr().out
    assert "pp 2 x dp_replicate 1 x dp_shard 2 x tp 2 x cp 1" in out
    assert [line.split()[7:9] for line in out.splitlines() if line.startswith("#       ")] == [
        ["2", "1"], ["2", "2"]
    ]  # fmt: skip


def test_config_cli_prints_resolved_config(capsys):
    assert config_main(["--job.config_file", DEBUG_CPU, "--world_size", "4"]) == 0
    out = capsys.readouterr().out
    assert 'flavor = "debugmodel_cpu"' in out
    assert "[parallelism]" in out and "[data]" in out
    assert "pp 1 x dp_replicate 1 x dp_shard 4 x tp 1 x cp 1" in out


def test_config_cli_error_is_one_line_and_nonzero(tmp_path):
    path = write(tmp_path, '[training]\nseq_len = "abc"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "torchtitan_ext.config", "--job.config_file", path],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "config error: training.seq_len = 'abc': expected an int"
    ]


def test_command_line_override_error_is_one_line_naming_the_key():
    """A malformed override on the command line gets the recipe file's treatment: one line
    naming the key and value, exit status 2, not tyro's box (which every rank would print)."""
    recipe = str(ROOT / "train_configs" / "debug_cpu.toml")
    proc = subprocess.run(
        [sys.executable, "-m", "torchtitan_ext.config", "--job.config_file", recipe,
         "--training.seq-len=abc"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("config error: training.seq_len = 'abc': "), line
    assert "invalid literal for int()" in line and "(command line)" in line


@pytest.mark.parametrize(
    "args",
    [
        ["--training.seq_len", "64", "--training.seq_len", "abc"],
        ["--training.seq_len=64", "--training.seq-len=abc"],
        ["--training.seq_len", "abc", "--training.steps", "3"],
    ],
)  # fmt: skip
def test_override_error_names_the_value_tyro_rejected(args):
    """A key given twice on the command line (a script's default, then the user's own): the
    error names the value that failed (tyro takes the last), not the first occurrence."""
    with pytest.raises(ConfigError) as err:
        load_config(args)
    assert (err.value.key, err.value.value) == ("training.seq_len", "abc")


@pytest.mark.parametrize(
    ("flags", "enable"),
    [
        (["--validation.enable", "false"], False),
        (["--validation.enable=False"], False),
        (["--validation.enable", "off", "--training.steps", "3"], False),
        (["--validation.no-enable", "--validation.enable", "true"], True),
        (["--validation.no_enable", "--validation.enable=1"], True),
        (["--validation.no_enable"], False),
        (["--validation.no_enable", "--validation.enable"], True),
    ],
)  # fmt: skip
def test_bool_override_takes_true_or_false(flags, enable):
    """``--section.key true|false`` (TorchTitan's users' spelling) sets a boolean, besides
    tyro's flags ``--section.key`` / ``--section.no_key``; the next option still parses."""
    cfg = load_config(["--job.config_file", DEBUG_CPU, *flags])
    assert cfg.validation.enable is enable
    assert cfg.training.steps == (3 if "3" in flags else 300)


def test_bool_override_with_another_word_names_the_key():
    with pytest.raises(ConfigError) as err:
        load_config(["--job.config_file", DEBUG_CPU, "--validation.enable=maybe"])
    assert err.value.key == "validation.enable"
    assert "expected true or false" in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "batch", "warned"),
    [
        ([], 16, None),
        (["--parallelism.context_parallel_degree", "4"], 4, 16),
        (["--parallelism.context_parallel_degree", "2"], 8, 16),
        (["--parallelism.context_parallel_degree", "4", "--training.global_batch_size", "4"],
         4, None),
    ],
)  # fmt: skip
def test_derived_global_batch_shrunk_by_cp_is_reported(capsys, overrides, batch, warned):
    """global_batch_size = -1 is local batch x dp, and cp takes its ranks from dp: the checker
    (and the trainer, through the same ``derived_batch_note``) says so, with the value that
    keeps the cp 1 batch; nothing when the batch is set or cp is 1."""
    args = ["--job.config_file", DEBUG_CPU, "--world_size", "4", *overrides]
    assert config_main(args) == 0
    out = capsys.readouterr().out
    assert f"# global batch: {batch} x 256 tokens" in out
    warnings = [line for line in out.splitlines() if line.startswith("# warning:")]
    if warned is None:
        assert warnings == []
    else:
        (line,) = warnings
        assert line.startswith("# warning: training.global_batch_size = -1: global batch = ")
        assert f"= {batch} sequences" in line
        assert f"set training.global_batch_size = {warned} to train the cp 1 batch" in line


def test_pipeline_validation_shape_follows_training_unless_set(tmp_path):
    """With pp > 1, a training override carries over to validation unless validation's own
    keys are set (in the recipe or on the command line); without pp nothing changes."""
    recipe = tmp_path / "pp.toml"
    text = (ROOT / "train_configs" / "debug_cpu_4d.toml").read_text()
    recipe.write_text(text)
    base = [
        "--job.config_file",
        str(recipe),
        "--training.local_batch_size",
        "4",
        "--training.global_batch_size",
        "-1",
    ]
    cfg = load_config([*base, "--training.seq_len", "256"])
    assert (cfg.validation.local_batch_size, cfg.validation.seq_len) == (4, 256)
    validate(cfg, 16)  # the 4-D recipe's shape: no "shaped like training ones" error
    cli = load_config([*base, "--validation.local-batch-size", "2"])
    assert cli.validation.local_batch_size == 2  # set on the command line: kept (then refused)
    recipe.write_text(text.replace("steps = 4\n", "steps = 4\nlocal_batch_size = 2\n", 1))
    assert load_config(base).validation.local_batch_size == 2  # set in the recipe: kept
    no_pp = load_config(["--job.config_file", DEBUG_CPU, "--training.local_batch_size", "2"])
    assert no_pp.validation.local_batch_size == 4  # debug_cpu.toml's own value


def test_cp_innermost_with_tp_and_fsdp_is_valid_where_torch_composes_it(monkeypatch):
    """The default order (cp innermost) with tp and FSDP over cp validates on torch 2.13;
    on a torch whose FSDP2 cannot compose non-ascending meshes it is one config error."""
    from torchtitan_ext import parallel_dims

    args = ["--job.config_file", DEBUG_CPU, "--parallelism.context_parallel_degree", "2",
            "--parallelism.tensor_parallel_degree", "2",
            "--parallelism.data_parallel_shard_degree", "1"]  # fmt: skip
    dims = validate(load_config(args), 4)
    assert dims is not None and dims.order[-1] == "cp"
    monkeypatch.setattr(parallel_dims, "non_ascending_fsdp_tp_supported", lambda: False)
    with pytest.raises(ConfigError, match=r"needs tp after dp_shard and cp") as err:
        validate(load_config(args), 4)
    assert err.value.key == "parallelism.mesh_dim_order"


def test_recipes_doc_flavor_table_matches_registry():
    """docs/recipes.md lists every flavor's dim, layers, heads, kv heads and vocab (the numbers
    tp and Ulysses degrees must divide) as the registry has them."""
    from torchtitan_ext.models import flavor_table

    doc = (ROOT / "docs" / "recipes.md").read_text()
    assert flavor_table() in doc, (
        "docs/recipes.md's flavor table is stale: replace it with the output of "
        'python -c "from torchtitan_ext.models import flavor_table; print(flavor_table())"'
    )


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["--parallelism.context_parallel_load_balancer", "ptrr"],
        ["--parallelism.context_parallel_load_balancer", "per_document_headtail"],
        ["--parallelism.context_parallel_pattern", "ulysses"],
    ],
)
def test_block_causal_is_accepted_with_every_pattern_and_balancer(overrides):
    """block_causal with CP passes every check a recipe meets before its data (the numerics:
    tests/test_block_causal.py)."""
    from torchtitan_ext.validate import check_recipe

    args = ["--job.config_file", DEBUG_CPU, "--model.attn_mask_type", "block_causal",
            "--parallelism.context_parallel_degree", "2", "--training.device", "cpu"]  # fmt: skip
    check = check_recipe(load_config(args + overrides), 4)
    assert check.model_args.attn_mask_type == "block_causal"


def test_block_causal_needs_a_tokenizer_with_eos():
    """Documents end with the tokenizer's EOS: the data phase refuses a tokenizer without one,
    in one error naming model.attn_mask_type."""
    import numpy as np

    from torchtitan_ext.rules import RecipeData
    from torchtitan_ext.validate import check_recipe, run_phases

    class NoEos:
        eos_id = None

    args = ["--job.config_file", DEBUG_CPU, "--model.attn_mask_type", "block_causal",
            "--training.device", "cpu"]  # fmt: skip
    check = check_recipe(load_config(args), 1)
    empty = np.zeros(0, np.int32)
    check.data = RecipeData(NoEos(), empty, np.zeros(1, np.int64), empty, 0)
    with pytest.raises(ConfigError, match="this tokenizer has none") as err:
        run_phases(check, "data")
    assert err.value.key == "model.attn_mask_type"
