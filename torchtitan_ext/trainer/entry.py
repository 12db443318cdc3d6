"""``train.py``'s entry point (``main``): prepare, lock the output folders, run, and turn every
way a run ends into the process's exit status and one line per rank (bad recipe, stop
signal, divergence, a failed collective).
"""

import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from torchtitan_ext.checkpoint import CheckpointError, complete_steps
from torchtitan_ext.config.manager import format_toml
from torchtitan_ext.curriculum import MeshPlanner
from torchtitan_ext.distributed import RankInfo, init_distributed
from torchtitan_ext.errors import ConfigError
from torchtitan_ext.preemption import STOP, STOPPED_EXIT_CODE
from torchtitan_ext.run_lock import FolderInUse, FolderLock, LocksUnsupported, acquire
from torchtitan_ext.trainer.base import TrainingDiverged, TrainingStopped
from torchtitan_ext.trainer.setup import prepare, setup_logging
from torchtitan_ext.trainer.stages import run

logger = logging.getLogger("torchtitan_ext")


def _report_error(rank: int | None, kind: str, message: str) -> None:
    """One line on stderr, written with a single write() so that ranks sharing the launcher's
    pipe cannot interleave their lines."""
    prefix = f"[rank{rank}] " if rank is not None else ""
    line = f"{prefix}{kind}: {message}"
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    # Under torchrun the launcher ends with its own failure summary (after ~60 lines of its
    # traceback); with the line in the worker's error file that summary shows it last, where
    # a user looks, instead of "To enable traceback see ...".
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and not os.path.exists(error_file):
        with contextlib.suppress(OSError), open(error_file, "w") as f:
            # torch.distributed.elastic's own format (error_handler.record_exception), without
            # a traceback: the summary then prints the message itself.
            record = {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}
            json.dump({"message": record}, f)


def _report_config_error(rank: int | None, err: ConfigError) -> None:
    _report_error(rank, "config error", str(err))


_COMM_FAILURE_MARKERS = ("Timed out", "Connection closed by peer", "Connection reset by peer")


def _is_comm_failure(err: BaseException) -> bool:
    """Whether an exception is a failed collective: torch's ``DistError`` family, or the
    ``RuntimeError`` gloo raises when a peer times out or disconnects."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return "gloo" in text and any(m in text for m in _COMM_FAILURE_MARKERS)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else type(err).__name__


def lock_outputs(cfg: Any, rank: int) -> list[FolderLock]:
    """Take the lock of ``job.dump_folder`` (and of ``checkpoint.folder`` when it lies
    outside it) on rank 0 (``run_lock``), before anything of the run touches them, and share
    the verdict with every rank (one broadcast). Collective. The locks hold until the process
    ends (the kernel releases them however it ends).

    Returns:
        Rank 0's locks (keep them alive); [] on the other ranks.

    Raises:
        ConfigError: on every rank, when another job holds a lock (the message names the folder
            and the holder) or the lock file cannot be created.
    """
    dump = os.path.abspath(cfg.job.dump_folder)
    folders = [("job.dump_folder", dump)]
    ckpt = os.path.abspath(os.path.join(dump, cfg.checkpoint.folder))
    if cfg.checkpoint.enable and os.path.commonpath([dump, ckpt]) != dump:
        folders.append(("checkpoint.folder", ckpt))
    locks: list[FolderLock] = []
    verdict: tuple[str, str, str] | None = None
    if rank == 0:
        for key, folder in folders:
            try:
                locks.append(acquire(folder))
            except FolderInUse as e:
                verdict = (key, folder, f"in use by another job ({e.holder}); wait for it to "
                           "end, or give this run a folder of its own")  # fmt: skip
            except LocksUnsupported as e:
                logger.warning(
                    f"{key} = {folder}: the file system does not support locks ({e.reason}): "
                    "a second job on this folder would not be refused"
                )
            except OSError as e:
                verdict = (key, folder, f"cannot create its lock file: {e.strerror or e}")
            if verdict is not None:
                break
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared: list[Any] = [verdict]
        dist.broadcast_object_list(shared, src=0)
        verdict = shared[0]
    if verdict is not None:
        for lock in locks:
            lock.release()
        raise ConfigError(*verdict)
    return locks


def _newest_checkpoint(cfg: Any) -> str:
    """The newest complete checkpoint of the run as ``step-N`` (or "none"), for lines."""
    if not cfg.checkpoint.enable:
        return "none (checkpoint.enable = false)"
    done = complete_steps(os.path.join(cfg.job.dump_folder, cfg.checkpoint.folder))
    return f"step-{done[-1]}" if done else "none"


def _grace_expired(rank: int, cfg: Any) -> Callable[[str], None]:
    """The line of a process whose stop outlasts ``checkpoint.stop_grace_seconds``."""
    grace = cfg.checkpoint.stop_grace_seconds

    def report(signal_name: str) -> None:
        _report_error(
            rank,
            "error",
            f"{signal_name} received {grace:g} s ago and the step or its checkpoint is not "
            f"done (checkpoint.stop_grace_seconds = {grace:g}); exiting; newest complete "
            f"checkpoint: {_newest_checkpoint(cfg)}",
        )

    return report


def main(args: list[str], mesh_planner: MeshPlanner | None = None) -> int:
    """``train.py``'s entry point; returns the exit status (2 on a bad recipe,
    ``preemption.STOPPED_EXIT_CODE`` after a stop signal). ``mesh_planner``: see ``prepare``."""
    code = _main(args, mesh_planner)
    STOP.finished(code)  # a grace-period watchdog firing while the process exits keeps it
    return code


def _main(args: list[str], mesh_planner: MeshPlanner | None) -> int:
    try:
        rank = RankInfo.from_env()
    except ConfigError as e:
        _report_config_error(None, e)
        return 2
    setup_logging(rank.rank)
    try:
        prepared = prepare(args, rank, mesh_planner)
    except ConfigError as e:
        # Same message on every rank, before any collective: no hang, no traceback.
        _report_config_error(rank.rank, e)
        return 2
    cfg = prepared.cfg  # PYTORCH_CUDA_ALLOC_CONF: set by prepare, before CUDA could start
    if cfg.job.print_config and rank.rank == 0:
        print(format_toml(cfg))
    if cfg.checkpoint.stop_grace_seconds > 0:
        STOP.install(
            cfg.checkpoint.stop_grace_seconds,
            rank.rank,
            lambda signal_name: _report_stop_at_start(rank.rank, signal_name, cfg),
            _grace_expired(rank.rank, cfg),
        )
    locks: list[FolderLock] = []
    try:
        init_distributed(prepared.backend, prepared.device, cfg.comm.init_timeout_seconds)
        STOP.connect()
        locks = lock_outputs(cfg, rank.rank)  # before anything touches the folder
        t0 = time.perf_counter()
        run(prepared)
        out = os.path.abspath(cfg.job.dump_folder)
        logger.info(f"training done in {time.perf_counter() - t0:.1f}s; outputs in {out}")
    except TrainingStopped as e:
        _report_error(rank.rank, signal.Signals(e.signum).name, str(e))
        return STOPPED_EXIT_CODE
    except ConfigError as e:
        _report_config_error(rank.rank, e)
        return 2
    except (TrainingDiverged, CheckpointError) as e:
        _report_error(rank.rank, "error", str(e))
        return 1
    except (dist.DistError, RuntimeError) as e:
        if not _is_comm_failure(e):
            raise
        # A peer that stopped responding (comm.train_timeout_seconds after the first step,
        # comm.init_timeout_seconds before) or died: the surviving ranks' one line each.
        _report_error(
            rank.rank,
            "error",
            f"a collective failed ({type(e).__name__}: {_first_line(e)}): a rank stopped "
            f"responding for comm.train_timeout_seconds = {cfg.comm.train_timeout_seconds} "
            "or exited; the newest complete checkpoint is kept",
        )
        return 1
    finally:
        for lock in locks:
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _report_stop_at_start(rank: int, signal_name: str, cfg: Any) -> None:
    """The line of a process stopped by a signal before its training loop (nothing to save)."""
    _report_error(
        rank,
        signal_name,
        f"stopped before training started; newest checkpoint: {_newest_checkpoint(cfg)}; run "
        "the same command to resume",
    )
