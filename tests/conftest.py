"""Shared helpers: real multi-process launches (torchrun and torch.multiprocessing) over gloo."""

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch.multiprocessing as mp

from torchtitan_ext.distributed import launch_env, torchrun_command

ROOT = Path(__file__).resolve().parent.parent
TITAN_RECIPES = ROOT.parent / "shared" / "reference" / "torchtitan_v0.2.2_recipes"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str], timeout: float, check: bool) -> subprocess.CompletedProcess[str]:
    """Run a training command from the repo root, 1 thread per process; on ``check``, a non-zero
    exit fails the test with the tail of its output."""
    proc = subprocess.run(
        cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd[1:4]} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def torchrun(
    nproc: int, args: list[str], timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``torchrun --nproc_per_node nproc train.py args``."""
    return _run(torchrun_command(nproc, [str(ROOT / "train.py"), *args]), timeout, check)


def tiny_run_args(
    dump: Path,
    steps: int,
    seq_len: int = 64,
    local_batch_size: int = 2,
    global_batch_size: int = -1,
    warmup_steps: int = 3,
) -> list[str]:
    """The README recipe shrunk for tests: the tiny flavor, short sequences, every step logged,
    validation off. Tests append what they vary (mesh, checkpointing, tensorboard)."""
    return [
        "--job.config_file", str(ROOT / "train_configs" / "debug_cpu.toml"),
        "--job.dump_folder", str(dump),
        "--model.flavor", "debugmodel_cpu_tiny",
        "--training.seq_len", str(seq_len),
        "--training.local_batch_size", str(local_batch_size),
        "--training.global_batch_size", str(global_batch_size),
        "--training.steps", str(steps),
        "--lr_scheduler.warmup_steps", str(warmup_steps),
        "--metrics.log_freq", "1",
        "--validation.no-enable",
    ]  # fmt: skip


def train_single(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``python train.py args`` (1 rank, no torchrun)."""
    return _run([sys.executable, str(ROOT / "train.py"), *args], timeout, check=True)


def read_metrics(dump_folder: Path) -> list[dict[str, Any]]:
    """Training records (``kind`` "train") of ``metrics.jsonl``, in file order; the file must
    exist."""
    from torchtitan_ext.metrics import METRICS_FILE
    from torchtitan_ext.metrics import read_metrics as read

    assert (dump_folder / METRICS_FILE).is_file(), dump_folder
    return read(dump_folder)


def _spawn_entry(rank: int, fn: Callable[..., None], world_size: int, port: int, args: Any) -> None:
    import faulthandler

    import torch
    import torch.distributed as dist

    from torchtitan_ext.distributed import exit_process, init_distributed

    faulthandler.enable()
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
    )  # fmt: skip
    init_distributed("gloo", torch.device("cpu"), 300)
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # no rank tears down its process group while a peer still talks to it
    finally:
        dist.destroy_process_group()
    # An exception above reaches torch.multiprocessing (the test fails); on success, exit
    # without interpreter finalization (see exit_process).
    exit_process(0)


def spawn(fn: Callable[..., None], world_size: int, *args: Any) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` real processes over a gloo
    process group; an exception in any rank fails the test."""
    mp.start_processes(
        _spawn_entry,
        args=(fn, world_size, free_port(), args),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )


@pytest.fixture
def titan_recipes() -> Path:
    """TorchTitan 0.2.2's own recipes from ``../shared``. Skipped where the folder is missing,
    except in CI (``CI`` set), where a missing folder fails the test instead of hiding it."""
    if not TITAN_RECIPES.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI: TorchTitan reference recipes not found at {TITAN_RECIPES}")
        pytest.skip(f"TorchTitan reference recipes not found at {TITAN_RECIPES}")
    return TITAN_RECIPES
