"""Device, backend and process-group setup: CUDA + NCCL when GPUs are visible, CPU + gloo
otherwise.

TorchTitan 0.2.2's ``init_distributed`` and ``device_type`` assume CUDA (they pick "cuda" and
NCCL on a CPU-only machine and call ``set_device`` before init); this module decides from the
recipe (``training.device``, ``comm.backend``, both "auto" by default) and the machine.
"""

import gc
import os
import socket
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

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
    import_before_init()
    dist.init_process_group(
        backend=backend,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )


def import_before_init() -> None:
    """Import ``torch.distributed.nn.functional`` while no default process group exists.

    Its collectives take ``group=group.WORLD`` as a default argument, evaluated at import;
    torch imports the module lazily (through ``torch._dynamo``) on the first functional
    collective, i.e. after ``init_process_group``, which would pin the default group in those
    defaults for the life of the process, so ``release_process_groups`` could never free it.
    Call before ``dist.init_process_group`` (``init_distributed`` does)."""
    import torch.distributed.nn.functional  # noqa: F401


def clear_dtensor_caches() -> None:
    """Drop torch's DTensor and context-parallel caches that keep DeviceMeshes (and through
    ``DeviceMesh._pg_registry`` their process groups) alive: the sharding-propagation caches
    (C++ fast path and Python), the redistribute planner caches, the mesh topology cache and
    ``context_parallel()``'s replaced functions (its wrapper closes over the mesh).

    Also between meshes in one process: the propagation cache compares meshes by layout and
    names, not process groups, so a later equal mesh's DTensors would otherwise run their
    collectives on the earlier mesh's groups. Best effort: each cache is cleared only where
    this torch version has it (checked against 2.13)."""
    import torch.distributed.tensor._collective_utils as collective_utils
    import torch.distributed.tensor._redistribute as redistribute
    from torch.distributed.tensor import DTensor

    clear_cpp = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if clear_cpp is not None:
        clear_cpp()
    propagator = DTensor._op_dispatcher.sharding_propagator
    caches = [
        getattr(propagator, "propagate_op_sharding", None),
        getattr(propagator, "_propagate_tensor_meta_cached", None),
        getattr(redistribute, "_gen_transform_infos", None),
        getattr(getattr(collective_utils, "MeshTopoInfo", None), "build_from_mesh", None),
    ]
    for cached in caches:
        clear = getattr(cached, "cache_clear", None)
        if clear is not None:
            clear()
    clear_planner = getattr(redistribute, "clear_redistribute_planner_cache", None)
    if clear_planner is not None:
        clear_planner()
    cp = sys.modules.get("torch.distributed.tensor.experimental._context_parallel._attention")
    replaced = getattr(cp, "_replaced_functions", None)
    if isinstance(replaced, dict):
        replaced.clear()


def release_process_groups() -> int:
    """Destroy every process group and free them now, while the interpreter is fully alive.

    Why (torch 2.13 on gloo, CPython 3.11): a ProcessGroupGloo worker thread drops its
    reference to a finished collective just after the waiting Python thread moves on; when
    that is the last C++ reference to a tensor that has a Python object, torch takes the GIL
    in that thread (``TensorImpl::decref_pyobject``). If the main thread is already in
    ``Py_FinalizeEx``, CPython ends the thread with ``pthread_exit()``, whose unwinding through
    a ``noexcept`` destructor calls ``std::terminate``: "terminate called without an active
    exception" (SIGABRT) after a successful run. A group's destructor joins its worker
    threads, so once every group is freed no such thread is left at exit.
    ``destroy_process_group`` alone does not free them: torch's caches keep the meshes alive
    (``clear_dtensor_caches``), and the meshes form reference cycles (several gc passes).
    The caller must not hold DTensors, DeviceMeshes or models itself.

    Returns:
        gloo worker threads still alive afterwards (0: clean; always 0 off Linux).
    """
    if dist.is_initialized():
        dist.destroy_process_group()
    clear_dtensor_caches()
    # Objects freed by one pass (finalizers, weakref callbacks) can leave new unreachable
    # cycles (the meshes' parent / child / flattened links) for the next.
    for _ in range(5):
        if not gc.collect():
            break
    return gloo_worker_threads()


def gloo_worker_threads() -> int:
    """Live ProcessGroupGloo worker threads (named "pt_gloo_runloop") of this process; 0 off
    Linux."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return 0
    n = 0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                n += f.read().strip() == "pt_gloo_runloop"
        except OSError:
            pass
    return n


def exit_process(code: int) -> NoReturn:
    """End a training or worker process with status ``code``: ``release_process_groups``,
    then a normal interpreter exit; if a gloo thread is still alive (a group referenced
    somewhere), a warning and ``os._exit`` after flushing, which cannot abort in teardown."""
    left = release_process_groups()
    sys.stdout.flush()
    sys.stderr.flush()
    if left:
        sys.stderr.write(
            f"warning: {left} gloo worker thread(s) alive at exit (a process group is still "
            "referenced); leaving with os._exit\n"
        )
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def run_and_exit(main: Callable[[], int]) -> NoReturn:
    """Run a process's ``main`` and exit with its status through ``exit_process``, also when
    it raises: the traceback is printed and the status is 1 (130 on Ctrl-C), so no path skips
    the release of the process groups."""
    try:
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    exit_process(code)


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
