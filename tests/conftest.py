"""Shared helpers: real multi-process launches (torchrun and torch.multiprocessing) over gloo."""

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch.multiprocessing as mp

from tests.train_runs import RUN_MARK
from torchtitan_ext.distributed import launch_env, torchrun_command

if TYPE_CHECKING:
    from torchtitan_ext.tools.parity import Matrix, Result

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


def train_single_many(
    runs: list[list[str]], timeout: float = 600, check: bool = True
) -> list[subprocess.CompletedProcess[str]]:
    """``python train.py args`` for each ``args`` of ``runs``, in turn, inside one process:
    the ~6 s of imports of a training process are paid once (each run still builds its
    process group, model, data and checkpoints anew, as ``train.py`` does). Runs that need
    another run's outputs go in a later call. Not for runs that receive stop signals
    (``preemption.STOP`` is installed once per process).

    Returns:
        One CompletedProcess per run: its exit status and its part of stdout / stderr. On
        ``check``, a run that exited non-zero (or never finished) fails the test with its
        output's tail.
    """
    cmd = [sys.executable, "-m", "tests.train_runs", "single"]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=timeout,
        input=json.dumps(runs),
    )  # fmt: skip
    return _split_runs(runs, proc, check, rank_zero=False)


def torchrun_many(
    nproc: int, runs: list[list[str]], timeout: float = 600, check: bool = True
) -> list[subprocess.CompletedProcess[str]]:
    """``torchrun --nproc_per_node nproc train.py args`` for each ``args`` of ``runs``, in
    turn, inside one torchrun launch: the ranks start once (8 ranks: ~25 s here), each run
    still builds its own process group, model, data and checkpoints, as ``train.py`` does.
    Runs that need another run's outputs go in a later call. Not for runs that receive stop
    signals (``preemption.STOP`` is installed once per process).

    Returns:
        One CompletedProcess per run: its exit status (the highest over the ranks) and its part
        of the launch's stdout / stderr: every line rank 0 wrote for it, exactly (the other
        ranks' last lines of a run can fall into the next run's part). A run that exits
        non-zero ends the launch: the runs after it did not run (status -1, the launch's
        output tail). On ``check``, a run that exited non-zero (or never finished) fails the
        test with its output's tail.
    """
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(runs, f)
    target = ["--no-python", sys.executable, "-m", "tests.train_runs", "torchrun", f.name]
    cmd = torchrun_command(nproc, target)
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=launch_env(PYTHONPATH=str(ROOT)), capture_output=True,
            text=True, timeout=timeout,
        )  # fmt: skip
    finally:
        os.unlink(f.name)
    return _split_runs(runs, proc, check, rank_zero=True)


def _split_runs(
    runs: list[list[str]], proc: subprocess.CompletedProcess[str], check: bool, rank_zero: bool
) -> list[subprocess.CompletedProcess[str]]:
    """Cut the output of a process that ran ``runs`` in turn at the run marks (of rank 0, with
    ``rank_zero``); a run's status is the highest its ranks reported."""
    rank = r" rank (\d+)" if rank_zero else r"()"
    mark = re.compile(rf"^{re.escape(RUN_MARK)} (\d+){rank} exit (-?\d+)\n", re.MULTILINE)
    codes: dict[int, int] = {}
    for text in (proc.stdout, proc.stderr):
        for m in mark.finditer(text):
            codes[int(m[1])] = max(codes.get(int(m[1]), 0), int(m[3]))

    def parts(text: str) -> list[str]:
        ends = [m for m in mark.finditer(text) if m[2] in ("", "0")]
        starts = [0, *(m.end() for m in ends)]
        return [text[a : m.start()] for a, m in zip(starts, ends, strict=False)]

    outs, errs = parts(proc.stdout), parts(proc.stderr)
    results = []
    for i, args in enumerate(runs):
        if i >= len(outs) or i >= len(errs):
            why = f"run {i} ({args}) did not finish (process exit {proc.returncode})"
            if check:
                raise AssertionError(f"{why}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
            out, err = f"{why}:\n{proc.stdout[-4000:]}", proc.stderr[-4000:]
            results.append(subprocess.CompletedProcess(["train.py", *args], -1, out, err))
            continue
        if check and codes[i] != 0:
            raise AssertionError(
                f"run {i} ({args}) failed ({codes[i]}):\n{outs[i][-4000:]}\n{errs[i][-4000:]}"
            )
        results.append(subprocess.CompletedProcess(["train.py", *args], codes[i], outs[i], errs[i]))
    return results


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


@pytest.fixture(scope="session")
def parity_matrices(
    tmp_path_factory: pytest.TempPathFactory,
) -> "dict[str, tuple[Matrix, dict[str, Result]]]":
    """The default parity matrices of tests/test_parity.py ("causal") and
    tests/test_block_causal_parity.py ("block_causal"), each with its Results by shape, run in
    shared launches (``tools.parity.run_matrices``: one per rank count for both)."""
    from tests import test_block_causal_parity, test_parity
    from torchtitan_ext.tools.parity import run_matrices

    matrices = {
        "causal": test_parity.matrix(tmp_path_factory.mktemp("parity")),
        "block_causal": test_block_causal_parity.matrix(
            tmp_path_factory.mktemp("parity_block_causal")
        ),
    }
    results = run_matrices(matrices)
    return {name: (m, results[name]) for name, m in matrices.items()}
