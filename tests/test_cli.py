"""The command lines (issue 15 items 3 and 8): ``--help`` generated from the schema and
complete, one set of world-size spellings, ``scripts/plan.py``'s required recipe, the
ablation's help defaults and progress lines."""

import dataclasses
import importlib.util
import re
import subprocess
import sys
import types
import typing
from importlib.machinery import ModuleSpec

import pytest

from tests.conftest import ROOT
from torchtitan_ext.config.__main__ import main as config_main
from torchtitan_ext.config.manager import (
    UNSUPPORTED_MARK,
    WORLD_SIZE_FLAGS,
    ConfigError,
    ConfigManager,
    default_prog,
    merged_config_class,
    pop_world_size_arg,
)
from torchtitan_ext.curriculum import STAGE_KEYS
from torchtitan_ext.tools.ablation import Row, progress_line
from torchtitan_ext.validate import UNSUPPORTED

DEBUG_CPU = str(ROOT / "train_configs" / "debug_cpu.toml")
_ENTRY = re.compile(r"^  (-\S.*|\w+|\S+ \(recipe only\))$")


def entries(text: str) -> dict[str, str]:
    """``first flag (or stage key) -> its help text, whitespace collapsed`` of a format_help
    text's entries (a 2-space-indented name line, then 6-space-indented text)."""
    out: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        if _ENTRY.match(line):
            name = line.split()[0].rstrip(",")
            out[name] = ""
        elif line.startswith("      ") and name is not None:
            out[name] = f"{out[name]} {line.strip()}".strip()
        elif line.strip():
            name = None
    return out


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted keys of every non-section field of a config class."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def load_script(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_help_lists_every_option_stage_key_and_unsupported_one(capsys):
    assert config_main(["--help"]) == 0
    text = capsys.readouterr().out
    usage = text.splitlines()[0]
    assert usage.startswith("usage: python -m torchtitan_ext.config [-h] ")
    assert "/" not in usage and "__main__" not in usage
    options, _, stages = text.partition("\n[[curriculum.stages]]\n")
    got = entries(options)
    assert "--world_size N, --world-size N, --nproc N" in options
    assert "World size to check the recipe for" in got["--world_size"]
    # Every recipe key, with text besides its default.
    for key in leaf_keys(merged_config_class()):
        name = f"--{key}" if key != "curriculum.stages" else key
        assert name in got, key
        assert re.sub(r"\(default: .*\)$", "", got[name]).strip(), key
    assert got["--parallelism.mesh_dim_order"].startswith("Order of the DeviceMesh dims")
    assert got["--model.tokenizer"].startswith('Tokenizer: "byte"')
    assert got["--model.rope_theta"].startswith("RoPE base frequency")
    # TorchTitan's text names only headtail and ptrr (for FlexAttention); ours every balancer.
    from torchtitan_ext.parallel.cp_documents import BALANCERS

    balancer_help = " ".join(got["--parallelism.context_parallel_load_balancer"].split())
    assert all(f'"{b}"' in balancer_help for b in BALANCERS if b), balancer_help
    # Marked: exactly the options of the trainer's own table, with its reason.
    marked = {name for name, t in got.items() if UNSUPPORTED_MARK in t}
    assert marked == {f"--{key}" for key, _, _ in UNSUPPORTED}
    assert got["--model.converters"].startswith(
        f"({UNSUPPORTED_MARK}: only float8 (TorchTitan's quantize.linear.float8); mx is not "
        "supported)"
    )
    # Every per-stage key, described.
    stage_entries = entries(stages)
    assert set(stage_entries) == set(STAGE_KEYS)
    for key in STAGE_KEYS:
        assert len(stage_entries[key]) > 20 and "no description" not in stage_entries[key], key
    assert "one [[curriculum.stages]] table per context-length stage" in " ".join(stages.split())


def test_train_help_usage_names_the_script_not_its_path(tmp_path):
    """Run by absolute path from elsewhere, as the user did: the usage line says train.py."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--help"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("usage: train.py [-h] [--job.config_file RECIPE.toml]")
    assert "torchrun --nproc_per_node N train.py" in proc.stdout
    assert "--training.seq_len INT" in proc.stdout and "[[curriculum.stages]]" in proc.stdout
    assert str(ROOT) not in proc.stdout


def test_prog_is_what_the_user_typed(monkeypatch, capsys):
    """``python -m pkg`` for a module run with -m, else the script's name; tyro's own messages
    (a bad flag) name it too."""
    main_module = types.ModuleType("__main__")
    main_module.__spec__ = ModuleSpec("torchtitan_ext.config.__main__", None)
    monkeypatch.setitem(sys.modules, "__main__", main_module)
    assert default_prog() == "python -m torchtitan_ext.config"
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    monkeypatch.setattr(sys, "argv", [str(ROOT / "train.py"), "--help"])
    assert default_prog() == "train.py"
    with pytest.raises(SystemExit) as err:
        ConfigManager().parse_args(["--help"])
    assert err.value.code == 0
    assert capsys.readouterr().out.startswith("usage: train.py [-h]")
    # tyro's message for a bad flag becomes one ConfigError line (no box, no file path).
    with pytest.raises(ConfigError) as bad:
        ConfigManager().parse_args(["--no-such-option"])
    assert bad.value.key == "no_such_option" and str(ROOT) not in str(bad.value)
    captured = capsys.readouterr()
    assert captured.err == ""


@pytest.mark.parametrize("flag", WORLD_SIZE_FLAGS)
def test_every_world_size_spelling_is_accepted(flag):
    assert pop_world_size_arg([flag, "4", "--x"]) == (["--x"], 4)
    assert pop_world_size_arg([f"{flag}=8"]) == ([], 8)
    assert set(WORLD_SIZE_FLAGS) >= {"--world_size", "--nproc"}
    parser = load_script("ablate_mesh").build_parser()
    a, _ = parser.parse_known_args(["--job.config_file", DEBUG_CPU, flag, "4"])
    assert a.nproc == 4


def test_config_checker_and_plan_take_nproc(capsys):
    assert config_main(["--job.config_file", DEBUG_CPU, "--nproc", "4"]) == 0
    assert "# mesh for world size 4: pp 1 x dp_replicate 1 x dp_shard 4" in capsys.readouterr().out
    plan = load_script("plan")
    args = ["--job.config_file", DEBUG_CPU, "--nproc", "4", "--training.seq_len", "128"]
    assert plan.main(args) == 0
    assert "## seq_len 128: mesh pp 1 x dp_replicate 1 x dp_shard 4" in capsys.readouterr().out


def test_plan_requires_a_recipe(capsys):
    """It used to plan TorchTitan's default model (llama3 debugmodel) without saying so."""
    plan = load_script("plan")
    with pytest.raises(SystemExit) as err:
        plan.main(["--world_size", "8"])
    assert err.value.code == 2
    assert "required: --job.config_file" in capsys.readouterr().err


def test_ablation_help_shows_every_default():
    ap = load_script("ablate_mesh").build_parser()
    for action in ap._actions:
        if action.dest == "help":
            continue
        assert action.help, action.option_strings
        assert action.required or "default:" in action.help, action.option_strings
    text = " ".join(ap.format_help().split())
    assert "--budget-gib GIB memory per device in GiB (--dry-run)" in text
    assert "ranked first, by communication, the rest after them (default: 80)" in text
    assert "--steps N training steps per shape (default: 4)" in text


def test_ablation_progress_lines_have_no_dangling_parts():
    ok = Row("cp4", "auto", 4, 1, 1, 1, 1, 4, status="ok", tokens_per_sec=1234.4)
    ok.step_time_sec = 0.5
    assert progress_line(ok) == "    ok: 1,234 tokens/s/rank, 0.50 s/step"
    failed = Row("tp8", "auto", 8, 1, 1, 1, 8, 1, status="error", detail="RuntimeError: boom")
    assert progress_line(failed) == "    error: RuntimeError: boom"
    assert progress_line(Row("x", "auto", 1, 1, 1, 1, 1, 1, status="error")) == "    error"


def _gpu_check() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_without_cuda_is_one_line_and_nonzero():
    """scripts/gpu_check.sh lists its checks anywhere, and without CUDA stops before the first
    check with one line and exit status 3 (issue 20 item 13)."""
    import torch

    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    script = str(ROOT / "scripts" / "gpu_check.sh")
    listed = subprocess.run(["bash", script, "--list"], env=env, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()] == list(_gpu_check().CHECKS)
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the checks would run")
    proc = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("gpu_check: needs a CUDA GPU"), line


def test_gpu_check_titan_recipe_loads_in_torchtitan(tmp_path):
    """The tokens_per_s check's recipe for TorchTitan's own trainer is one TorchTitan 0.2.2's
    ConfigManager accepts, and its custom import registers what it names (the 1.2B flavor, the
    python_stdlib corpus, the byte tokenizer)."""
    import argparse

    from torchtitan.config import ConfigManager as TitanConfigManager
    from torchtitan.hf_datasets.text_datasets import DATASETS
    from torchtitan.protocols.train_spec import get_train_spec

    recipe = tmp_path / "titan.toml"
    recipe.write_text(_gpu_check()._titan_toml(argparse.Namespace(steps=8), tmp_path))
    cfg = TitanConfigManager().parse_args(["--job.config_file", str(recipe)])
    assert (cfg.model.flavor, cfg.training.seq_len, cfg.training.steps) == ("1.2B", 8192, 8)
    from torchtitan.protocols import train_spec

    try:
        importlib.import_module(cfg.experimental.custom_import)
        spec = get_train_spec("llama3")
        assert spec.model_args["1.2B"].n_heads == 32
        assert cfg.training.dataset in DATASETS
        assert spec.build_tokenizer_fn is not None
        assert spec.build_tokenizer_fn(cfg).get_vocab_size() == 258
    finally:  # TorchTitan's own llama3 spec again for the rest of the session
        train_spec._extra_train_specs.pop("llama3", None)


def test_gpu_check_titan_options_recipes_pass_the_checker(tmp_path):
    """The titan_options check's runs (issue 25: float8, CPU offload, a memory snapshot, each
    with its baseline) are recipes our checker accepts without a device (the recipe and trainer
    phases): on a GPU only the device phase is left to pass."""
    from torchtitan_ext.config import load_config
    from torchtitan_ext.validate import check_recipe

    gpu_check = _gpu_check()
    settings = {name: load_config(gpu_check.ours_args(8, tmp_path, extra))
                for name, extra in gpu_check.TITAN_OPTIONS.items()}  # fmt: skip
    for name, cfg in settings.items():
        assert check_recipe(cfg, None).model_args.dim == 2048, name
    assert settings["float8 (compiled)"].model.converters == ["float8"]
    assert settings["float8 (compiled)"].compile.enable
    assert settings["CPU offload"].training.enable_cpu_offload
    assert settings["memory snapshot"].profiling.enable_memory_snapshot
    base = settings["baseline"]
    assert not (base.model.converters or base.training.enable_cpu_offload or base.compile.enable)
