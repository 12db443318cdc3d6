"""The auto mesh planner: the batch it plans with, the memory budget it plans against, and the
CUDA allocator settings in effect before the budget is read."""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import ROOT
from torchtitan_ext.config import load_config
from torchtitan_ext.tools.auto_mesh import choose_stage_mesh
from torchtitan_ext.validate import plan_curriculum

AUTO = """
[curriculum]
[[curriculum.stages]]
seq_len = 64
steps = 1
context_parallel_degree = 1
[[curriculum.stages]]
seq_len = 128
steps = 1
auto_mesh = true
"""


def recipe(tmp_path: Path, stages: str = AUTO) -> Path:
    """The debug recipe (global_batch_size = -1, local_batch_size 4) with an auto-meshed
    second stage."""
    text = (ROOT / "train_configs" / "debug_cpu.toml").read_text()
    path = tmp_path / "auto.toml"
    path.write_text(text + "\n" + stages)
    return path


def test_alloc_conf_is_set_before_the_budget_initializes_cuda(tmp_path, monkeypatch):
    """[alloc_conf] With ``auto_mesh_memory_gib = 0`` on CUDA, ``prepare`` reads the GPU's
    memory (``torch.cuda.get_device_properties``), which starts CUDA and with it the caching
    allocator, which reads ``PYTORCH_CUDA_ALLOC_CONF`` then and never again. One real
    ``prepare`` (no GPU here: CUDA's device queries are stood in for, and every call that
    would start CUDA records the allocator setting in effect) must have set it by then."""
    from torchtitan_ext.distributed import CUDA_ALLOC_CONF, RankInfo
    from torchtitan_ext.trainer import prepare

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    seen: list[tuple[str, str | None]] = []

    def starts_cuda(name: str):
        def call(*args, **kwargs):
            seen.append((name, os.environ.get("PYTORCH_CUDA_ALLOC_CONF")))
            if name == "get_device_properties":
                return SimpleNamespace(total_memory=80 * 1024**3, name="stand-in")

        return call

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "_lazy_init", starts_cuda("_lazy_init"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", starts_cuda("get_device_properties"))
    args = ["--job.config_file", str(recipe(tmp_path)), "--training.device", "cuda",
            "--job.dump_folder", str(tmp_path / "run")]  # fmt: skip
    p = prepare(args, RankInfo(0, 0, 4), choose_stage_mesh)
    assert p.device.type == "cuda" and p.stages[1].mesh_plan
    assert ("get_device_properties", CUDA_ALLOC_CONF) in seen  # the budget was read ...
    assert all(conf == CUDA_ALLOC_CONF for _, conf in seen), seen  # ... with the setting on


def test_auto_mesh_batch_is_the_recipes_on_every_mesh(tmp_path):
    """[auto_mesh_batch] With ``global_batch_size = -1`` and no ``tokens_per_step`` the batch
    is TorchTitan's local_batch_size x dp, so each candidate mesh would train its own batch
    (16, 8 and 4 sequences for tp1 cp1, tp1 cp2 and tp2 cp2 on 4 ranks) and seconds per step
    would favour small dp. The planner fixes the batch first, on the recipe's own mesh (tp 1,
    cp 1: dp 4, 16 sequences), plans every candidate with it and ranks by time per token; a
    recipe whose own mesh gives no batch is refused in one line naming the key."""
    from torchtitan_ext.config import ConfigError

    # A slow device: compute (tokens per step / world x flops per token) outweighs traffic,
    # which is where a smaller batch looked faster per step.
    slow = ["--curriculum.auto_mesh_tflops", "1e-6"]
    cfg = load_config(["--job.config_file", str(recipe(tmp_path)), *slow])
    assert cfg.training.global_batch_size == -1 and cfg.training.local_batch_size == 4
    stages = plan_curriculum(cfg, 4, choose_stage_mesh)
    auto = stages[1]
    assert auto.global_batch_size == 16 and auto.tokens_per_step == 16 * 128
    ranked = auto.mesh_plan
    assert {(e.tp, e.cp) for e in ranked} >= {(1, 1), (1, 2), (2, 2)}
    assert {e.tokens_per_step for e in ranked} == {16 * 128}
    per_token = [e.step_sec / e.tokens_per_step for e in ranked]
    assert per_token == sorted(per_token) and ranked[0].sec_per_token == per_token[0]
    # The recipe's own mesh (cp 3 of 4 ranks) resolves no batch: refused, naming the key.
    cfg.parallelism.context_parallel_degree = 3
    with pytest.raises(ConfigError) as err:
        plan_curriculum(cfg, 4, choose_stage_mesh)
    assert err.value.key == "training.global_batch_size"
    assert "recipe's own mesh" in str(err.value) and "\n" not in str(err.value)


def test_auto_mesh_memory_budget_of_0_leaves_headroom(tmp_path, monkeypatch):
    """[auto_mesh_memory] A budget of 0 is the GPU's memory less what the dry run does not
    see: the CUDA context and NCCL's buffers (a fixed reserve), and the allocator's
    fragmentation (a share of the rest); a budget given is taken as is."""
    from torchtitan_ext.tools.auto_mesh import CUDA_RESERVED_GIB, FRAGMENTATION, budget_gib

    props = SimpleNamespace(total_memory=80 * 1024**3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    args = ["--job.config_file", str(recipe(tmp_path)), "--training.device", "cuda"]
    budget = budget_gib(load_config(args))
    assert budget == pytest.approx((80 - CUDA_RESERVED_GIB) * (1 - FRAGMENTATION))
    assert 60 < budget < 80 - CUDA_RESERVED_GIB
    given = budget_gib(load_config([*args, "--curriculum.auto_mesh_memory_gib", "80"]))
    assert given == 80
