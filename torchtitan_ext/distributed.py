"""Device, backend and process-group setup: CUDA + NCCL when GPUs are visible, CPU + gloo
otherwise.

TorchTitan 0.2.2's ``init_distributed`` and ``device_type`` assume CUDA (they pick "cuda" and
NCCL on a CPU-only machine and call ``set_device`` before init); this module decides from the
recipe (``training.device``, ``comm.backend``, both "auto" by default) and the machine.
"""

import atexit
import os
import socket
import sys
import traceback
import warnings
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from torchtitan_ext.errors import ConfigError
from torchtitan_ext.rules import RecipeCheck, Rule


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


CUDA_ALLOC_CONF = "expandable_segments:True"
"""The CUDA caching allocator's setting unless the user set ``PYTORCH_CUDA_ALLOC_CONF``:
expandable segments avoid the fragmentation that long sequences' few huge allocations cause
(what DeepSpeed ALST, arXiv 2506.13996, found next after tiling)."""


def configure_cuda_allocator(env: MutableMapping[str, str] | None = None) -> str:
    """Set ``PYTORCH_CUDA_ALLOC_CONF`` to ``CUDA_ALLOC_CONF`` in ``env`` (default
    ``os.environ``) unless it is set; must run before the first CUDA allocation (read once,
    at allocator start). Returns the value in effect."""
    target: MutableMapping[str, str] = os.environ if env is None else env
    return target.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)


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


SINGLE_WORKER_GLOO_TORCH = ("2.13",)
"""torch release series ``use_single_worker_gloo`` was checked against (it relies on the
private ``ProcessGroupGloo._Options`` fields and on how torch calls the constructor)."""

_GLOO_OPTIONS_FIELDS = ("_devices", "_threads", "_timeout")
_GLOO_CONSTRUCTORS = ("options: torch._C._distributed_c10d.ProcessGroupGloo._Options",
                      "timeout: datetime.timedelta")  # fmt: skip


def use_single_worker_gloo() -> bool:
    """Make every gloo backend created from now on run one worker thread instead of torch's
    two; returns whether that is in effect. Idempotent; ``import torchtitan_ext`` calls it, so
    it is in effect before any group this package (``init_distributed``) or a script using it
    creates.

    Why: torch's ``ProcessGroupGloo::runLoop`` (torch/csrc/distributed/c10d/ProcessGroupGloo.cpp,
    2.13 and later) records ``pgStatus_->lastCompletedWorkName``, a ``std::string``, after each
    collective without holding the group's lock. When two collectives of one group finish
    together on its two worker threads, one thread frees the string's heap buffer
    ("ALLGATHER_COALESCED") while the other writes "ALLTOALL" into it. Context parallel's ring
    backward keeps exactly that pair in flight on the cp group (the k/v all-gather and the dk/dv
    all-to-all). The freed chunk's tcache link is overwritten and glibc aborts later, in any
    thread ("malloc(): unaligned tcache chunk detected"), or the heap is corrupted silently; load
    on the machine widens the window. ``scripts/repro_gloo_worker_race.py`` reproduces it with
    torch alone. With one worker thread per group the assignments never overlap; a group's
    collectives then run one after another in the order every rank issues them, which is the
    order gloo matches them in anyway.

    torch builds gloo backends with the ``(store, rank, size, timeout)`` constructor and ignores
    ``pg_options`` for gloo, so that form is redirected to the options form with ``threads = 1``
    and the same devices torch would choose (``GLOO_SOCKET_IFNAME``, else the default device);
    the class stays ``ProcessGroupGloo`` for torch's ``isinstance`` checks.

    Fail safe, since this relies on torch's private binding: it patches only on a torch series
    in ``SINGLE_WORKER_GLOO_TORCH`` whose binding still has both constructors and the
    ``_Options`` fields it sets; otherwise it warns (``RuntimeWarning``: gloo groups keep
    torch's worker threads) and returns False. A constructor call of another form (the caller's
    own options, other arguments) goes to torch's constructor unchanged, and if building the
    options fails, the group is built by torch's constructor too, with a warning. False, without
    a warning, on a torch built without gloo."""
    gloo: Any = getattr(torch._C._distributed_c10d, "ProcessGroupGloo", None)
    if gloo is None:
        return False
    if getattr(gloo.__init__, "_single_worker", False):
        return True
    reason = _single_worker_gloo_unsupported(gloo)
    if reason is not None:
        warnings.warn(
            f"gloo process groups keep torch's worker threads (torchtitan_ext's single-worker "
            f"gloo fix is off: {reason}); context parallel on gloo may then corrupt the heap "
            "(see torchtitan_ext.distributed.use_single_worker_gloo)",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    torch_init = gloo.__init__
    default_timeout = timedelta(minutes=30)  # the timeout constructor's default

    def single_worker_init(self: Any, *args: Any, **kwargs: Any) -> None:
        # torch 2.13 calls (store, rank, size, timeout=timeout); any other form is torch's.
        if len(args) not in (3, 4) or set(kwargs) - {"timeout"} or (len(args) == 4 and kwargs):
            torch_init(self, *args, **kwargs)
            return
        store, rank, size = args[:3]
        timeout = args[3] if len(args) == 4 else kwargs.get("timeout", default_timeout)
        if not isinstance(timeout, timedelta):  # e.g. the caller's own options: keep them
            torch_init(self, *args, **kwargs)
            return
        try:
            opts = _single_worker_options(gloo, timeout)
        except Exception as e:  # a changed binding: torch's constructor still builds the group
            warnings.warn(
                f"gloo process group built with torch's worker threads: single-worker options "
                f"failed ({type(e).__name__}: {e})",
                RuntimeWarning,
                stacklevel=2,
            )
            torch_init(self, *args, **kwargs)
            return
        torch_init(self, store, rank, size, opts)

    single_worker_init._single_worker = True  # type: ignore[attr-defined]
    gloo.__init__ = single_worker_init
    return True


def _single_worker_gloo_unsupported(gloo: Any) -> str | None:
    """Why ``use_single_worker_gloo`` cannot patch this torch's ``ProcessGroupGloo`` (None
    when it can)."""
    series = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if series not in SINGLE_WORKER_GLOO_TORCH:
        return (
            f"checked on torch {', '.join(SINGLE_WORKER_GLOO_TORCH)}.x, found {torch.__version__}"
        )
    options = getattr(gloo, "_Options", None)
    missing = [f for f in _GLOO_OPTIONS_FIELDS if options is None or not hasattr(options, f)]
    if missing:
        return f"ProcessGroupGloo._Options lacks {', '.join(missing)}"
    doc = getattr(gloo.__init__, "__doc__", None) or ""
    if not all(signature in doc for signature in _GLOO_CONSTRUCTORS):
        return "ProcessGroupGloo's constructors are not (store, rank, size, options | timeout)"
    return None


def _single_worker_options(gloo: Any, timeout: timedelta) -> Any:
    """``ProcessGroupGloo._Options`` with one worker thread, ``timeout`` and the devices torch's
    timeout constructor picks (``GLOO_SOCKET_IFNAME``'s interfaces, else the default one)."""
    opts = gloo._Options()
    ifnames = os.environ.get("GLOO_SOCKET_IFNAME", "")
    if len(ifnames) > 1:  # torch's rule in its timeout constructor
        opts._devices = [gloo.create_device(interface=name) for name in ifnames.split(",")]
    else:
        opts._devices = [gloo.create_default_device()]
    opts._timeout = timeout
    opts._threads = 1
    return opts


def clear_dtensor_caches() -> None:
    """Drop torch's DTensor and context-parallel caches that hold DeviceMeshes (and through
    ``DeviceMesh._pg_registry`` their process groups): the sharding-propagation caches (C++
    fast path and Python), the redistribute planner caches, the mesh topology cache and
    ``context_parallel()``'s replaced functions (its wrapper closes over the mesh).

    For a process that builds several meshes in turn (the parity worker): the propagation
    cache compares meshes by layout and names, not process groups, so a later, equal mesh's
    DTensors would otherwise run their collectives on the earlier mesh's groups. Best effort:
    each cache is cleared only where this torch version has it (checked against 2.13)."""
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


def exit_process(code: int) -> NoReturn:
    """End a training or worker process with status ``code``, skipping interpreter
    finalization: destroy the default process group (peers see an orderly close), run the
    ``atexit`` handlers (logging and other libraries' cleanup), flush stdout / stderr, then
    ``os._exit(code)``.

    Why not a normal exit: with torch 2.13 on gloo and CPython 3.11, finalization can abort a
    process whose work succeeded ("terminate called without an active exception", SIGABRT).
    A ProcessGroupGloo worker thread drops its reference to a finished collective just after
    the waiting Python thread moves on; when that is the last C++ reference to a tensor that
    has a Python object, torch takes the GIL in that thread (``TensorImpl::decref_pyobject``),
    and once the main thread is in ``Py_FinalizeEx`` CPython ends the thread with
    ``pthread_exit()``, whose unwinding through a ``noexcept`` destructor calls
    ``std::terminate`` (seen in core dumps; 13 of 50 runs of a torch-only script of 50
    functional collectives on 2 ranks). ``destroy_process_group`` does not join those threads:
    torch's DTensor caches, ``context_parallel()``'s replaced functions and
    ``torch.distributed.nn.functional``'s ``group=WORLD`` defaults keep the groups alive.
    Freeing them all first makes a normal exit safe too, but finalizing torch's modules then
    costs about 1.5 s per process, for nothing a training process needs.
    """
    if dist.is_initialized():
        dist.destroy_process_group()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_and_exit(main: Callable[[], int]) -> NoReturn:
    """Run a process's ``main`` and exit with its status through ``exit_process``, also when
    it raises: the traceback is printed and the status is 1 (130 on Ctrl-C), so no path
    reaches interpreter finalization."""
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


def _device(c: RecipeCheck) -> None:
    c.device = resolve_device(c.cfg, c.local_rank)
    c.backend = resolve_backend(c.cfg, c.device)


RULES: tuple[Rule, ...] = (
    Rule(
        "device",
        ("training.device", "comm.backend"),
        "the device is visible to this rank; nccl only on CUDA",
        _device,
        "distributed",
    ),
)
"""This module's recipe rules (``torchtitan_ext.rules``); ``validate.RULES`` lists them in
its table, in phase order."""
