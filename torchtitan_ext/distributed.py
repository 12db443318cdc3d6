"""Device, backend and process-group setup: CUDA + NCCL when GPUs are visible, CPU + gloo
otherwise.

TorchTitan 0.2.2's ``init_distributed`` and ``device_type`` assume CUDA (they pick "cuda" and
NCCL on a CPU-only machine and call ``set_device`` before init); this module decides from the
recipe (``training.device``, ``comm.backend``, both "auto" by default) and the machine.
"""

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from torchtitan_ext.config.manager import ConfigError


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the job, from torchrun's environment (RANK, LOCAL_RANK,
    WORLD_SIZE); a plain ``python train.py`` is rank 0 of 1."""

    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def from_env(cls) -> "RankInfo":
        def read(name: str, default: int) -> int:
            raw = os.environ.get(name, str(default))
            try:
                return int(raw)
            except ValueError:
                raise ConfigError(f"${name}", raw, "expected an int") from None

        return cls(read("RANK", 0), read("LOCAL_RANK", 0), read("WORLD_SIZE", 1))


def resolve_device(cfg: Any, local_rank: int) -> torch.device:
    """The training device of this rank.

    Raises:
        ConfigError: ``training.device = "cuda"`` with no visible GPU, or fewer GPUs than local
            ranks.
    """
    choice = cfg.training.device
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if n == 0:
        raise ConfigError("training.device", "cuda", "no CUDA device is visible")
    if local_rank >= n:
        raise ConfigError(
            "training.device", "cuda", f"local rank {local_rank} but only {n} GPUs visible"
        )
    return torch.device("cuda", local_rank)


def resolve_backend(cfg: Any, device: torch.device) -> str:
    """``comm.backend``, with "auto" meaning nccl on CUDA and gloo on CPU.

    Raises:
        ConfigError: nccl asked for on a CPU device.
    """
    backend: str = cfg.comm.backend
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("comm.backend", backend, "nccl needs training.device = cuda")
    return backend


def init_distributed(backend: str, device: torch.device, timeout_s: int) -> None:
    """Initialize the default process group (also for a single rank, so the code path is
    the same). Without torchrun's rendezvous variables, sets up a 1-rank group on localhost."""
    if "MASTER_ADDR" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(nproc: int, target: list[str]) -> list[str]:
    """``python -m torch.distributed.run`` for ``nproc`` ranks on this host, then ``target`` (a
    script and its arguments, or ``--no-python`` and a command). Rendezvous: c10d on port 0 of
    127.0.0.1, so several launches can run side by side."""
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", *target,
    ]  # fmt: skip


def launch_env(**extra: str) -> dict[str, str]:
    """The environment for launching training processes from a script or test: one OpenMP
    thread per rank (ranks share the cores), unbuffered output, no inherited MASTER_ADDR."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONFAULTHANDLER": "1",
        **extra,
    }
    env.pop("MASTER_ADDR", None)
    return env
