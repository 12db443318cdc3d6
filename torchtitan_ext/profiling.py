"""TorchTitan 0.2.2's ``[profiling]`` section: torch profiler traces and CUDA memory snapshots
of the training loop, in TorchTitan's files and folders.

- ``profiling.enable_profiling``: every ``profile_freq`` steps, the step ``profile_freq``
  (after ``profiler_warmup`` warm-up steps; ``profiler_active`` steps recorded) is written as a
  Chrome trace per rank, ``<job.dump_folder>/<save_traces_folder>/iteration_<step>/
  rank<rank>_trace.json`` (open it in Perfetto or ``chrome://tracing``; its ``traceEvents``
  hold one ``ProfilerStep#<n>`` per recorded step). The schedule, the folder layout and the
  file names are those of TorchTitan 0.2.2's ``maybe_enable_profiling``
  (``torchtitan/tools/profiling.py``), written here because that function passes ``None`` in
  the profiler's activities on a machine without CUDA, which torch 2.13's profiler refuses
  (``TypeError: Expected ProfilerActivity or dict``): this one profiles the CPU, and CUDA on a
  CUDA device.
- ``profiling.enable_memory_snapshot``: on CUDA, TorchTitan's own
  ``maybe_enable_memory_snapshot`` records the caching allocator's history and pickles a
  snapshot every ``profile_freq`` steps, ``<dump_folder>/<save_memory_snapshot_folder>/
  iteration_<step>/rank<rank>_memory_snapshot.pickle``, and once more, as
  ``iteration_<step>_exit``, when a step runs out of memory (drop it on
  https://pytorch.org/memory_viz). There is no such allocator on CPU: the ``device`` phase then
  notes in one line that no snapshot is written, and the recipe still runs.
"""

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from torchtitan_ext.errors import ConfigError
from torchtitan_ext.rules import RecipeCheck, Rule

logger = logging.getLogger("torchtitan_ext")

TRACE_FILE = "rank{rank}_trace.json"
"""A trace's file name in its ``iteration_<step>`` folder (TorchTitan 0.2.2's)."""


def trace_path(dump_folder: str | Path, traces_folder: str, step: int, rank: int) -> Path:
    """Where rank ``rank``'s trace of step ``step`` goes: ``<dump_folder>/<traces_folder>/
    iteration_<step>/rank<rank>_trace.json``."""
    return Path(dump_folder, traces_folder, f"iteration_{step}", TRACE_FILE.format(rank=rank))


@dataclasses.dataclass
class StepProfilers:
    """The profilers of one ``Trainer.train`` (each None when off); ``step()`` after every
    optimizer step, as TorchTitan's trainer does.

    Attributes:
        torch_profiler: the ``torch.profiler.profile`` recording traces, or None.
        memory_profiler: TorchTitan's memory snapshot recorder, or None (always on CPU).
    """

    torch_profiler: Any = None
    memory_profiler: Any = None

    def step(self) -> None:
        """Tell both that a training step ended (writes a trace / snapshot when due)."""
        if self.torch_profiler is not None:
            self.torch_profiler.step()
        if self.memory_profiler is not None:
            self.memory_profiler.step()


@contextlib.contextmanager
def _torch_profiler(
    p: Any, dump_folder: str, rank: int, start_step: int, device_type: str
) -> Iterator[torch.profiler.profile | None]:
    """TorchTitan 0.2.2's ``maybe_enable_profiling`` with the activities of ``device_type``."""
    if not p.enable_profiling:
        yield None
        return
    traces = Path(dump_folder, p.save_traces_folder)
    traces.mkdir(parents=True, exist_ok=True)

    def on_trace_ready(prof: torch.profiler.profile) -> None:
        out = trace_path(dump_folder, p.save_traces_folder, prof.step_num, rank)
        out.parent.mkdir(parents=True, exist_ok=True)
        begin = time.monotonic()
        prof.export_chrome_trace(str(out))
        logger.info(
            f"profiler trace of step {prof.step_num} written to {out.parent} in "
            f"{time.monotonic() - begin:.2f} s"
        )

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device_type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    wait = p.profile_freq - (p.profiler_warmup + p.profiler_active)  # >= 0: the recipe rule
    logger.info(f"profiling: traces every {p.profile_freq} steps to {traces}")
    with torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(
            wait=wait, warmup=p.profiler_warmup, active=p.profiler_active
        ),
        on_trace_ready=on_trace_ready,
        record_shapes=True,
    ) as prof:
        # The schedule counts optimizer steps from the run's start, also after a resume.
        prof.step_num = start_step
        yield prof


@contextlib.contextmanager
def profile_steps(
    cfg: Any, device: torch.device, rank: int, start_step: int
) -> Iterator[StepProfilers]:
    """The ``[profiling]`` profilers around a training loop that starts after step
    ``start_step``: call ``step()`` on what it yields after each optimizer step. On CUDA, an
    out-of-memory error raised inside writes the ``iteration_<step>_exit`` snapshot and
    propagates.

    Args:
        cfg: the merged JobConfig (``profiling``, ``job.dump_folder``).
        device: the training device (memory snapshots only on CUDA).
        rank: this process's global rank (the files' ``rank<rank>``).
        start_step: the last step already done (0, or the resumed checkpoint's).
    """
    from torchtitan.tools.profiling import maybe_enable_memory_snapshot

    p, dump = cfg.profiling, cfg.job.dump_folder
    snapshots = dataclasses.replace(
        p, enable_memory_snapshot=p.enable_memory_snapshot and device.type == "cuda"
    )
    with (
        _torch_profiler(p, dump, rank, start_step, device.type) as torch_profiler,
        maybe_enable_memory_snapshot(
            snapshots, global_step=start_step, base_folder=dump
        ) as memory_profiler,
    ):
        yield StepProfilers(torch_profiler, memory_profiler)


def _schedule(c: RecipeCheck) -> None:
    p = c.cfg.profiling
    if p.enable_profiling:
        if p.profiler_active < 1:
            raise ConfigError("profiling.profiler_active", p.profiler_active, "must be >= 1")
        if p.profiler_warmup < 0:
            raise ConfigError("profiling.profiler_warmup", p.profiler_warmup, "must be >= 0")
        if p.profile_freq < p.profiler_warmup + p.profiler_active:
            raise ConfigError(
                "profiling.profile_freq",
                p.profile_freq,
                f"must be >= profiler_warmup + profiler_active = "
                f"{p.profiler_warmup + p.profiler_active} (each cycle waits, warms up, records)",
            )
    if p.enable_memory_snapshot and p.profile_freq < 1:
        raise ConfigError("profiling.profile_freq", p.profile_freq, "must be >= 1")


def memory_snapshot_note(cfg: Any, device_type: str) -> str | None:
    """The one line said when ``profiling.enable_memory_snapshot`` is on and the device has
    no CUDA caching allocator to snapshot (None otherwise): the recipe still runs."""
    if not cfg.profiling.enable_memory_snapshot or device_type == "cuda":
        return None
    return (
        f"profiling.enable_memory_snapshot = True: memory snapshots record the CUDA caching "
        f"allocator, and this run is on {device_type}: no snapshot is written (the traces of "
        f"profiling.enable_profiling still are, and metrics.jsonl has peak_mem_mib)"
    )


def _memory_snapshot(c: RecipeCheck) -> None:
    assert c.device is not None
    note = memory_snapshot_note(c.cfg, c.device.type)
    if note is not None:
        c.notes.append(note)


RULES: tuple[Rule, ...] = (
    Rule(
        "recipe",
        ("profiling.profile_freq", "profiling.profiler_warmup", "profiling.profiler_active"),
        "with profiling on: active >= 1, warmup >= 0, profile_freq >= warmup + active",
        _schedule,
        "profiling",
    ),
    Rule(
        "device",
        ("profiling.enable_memory_snapshot",),
        "memory snapshots need CUDA; elsewhere one note, the recipe still runs",
        _memory_snapshot,
        "profiling",
    ),
)
"""This module's recipe rules (``torchtitan_ext.rules``); ``validate.RULES`` lists them in
its table, in phase order."""
