"""The auto mesh planner: the batch it plans with, the memory budget it plans against, and the
CUDA allocator settings in effect before the budget is read."""

import os
from pathlib import Path
from types import SimpleNamespace

import torch

from tests.conftest import ROOT

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
    p = prepare(args, RankInfo(0, 0, 4))
    assert p.device.type == "cuda" and p.stages[1].mesh_plan
    assert ("get_device_properties", CUDA_ALLOC_CONF) in seen  # the budget was read ...
    assert all(conf == CUDA_ALLOC_CONF for _, conf in seen), seen  # ... with the setting on
