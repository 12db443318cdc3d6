"""Training metrics: a console line, tensorboard scalars (and with ``metrics.enable_wandb``
Weights & Biases) and ``metrics.jsonl`` per logged step.

Every line of ``metrics.jsonl`` is one JSON object with a ``kind`` and an integer ``step``:

- ``"train"``: one per logged optimizer step: ``loss`` (nats), ``grad_norm``, ``lr``,
  ``tokens_per_sec`` (per rank), ``tflops``, ``mfu_pct`` (GPU only), ``seq_len`` (tokens),
  ``peak_mem_mib`` (the console's ``memory``: the peak since the last log), ``step_mem_mib``
  (the console's ``step memory``: the largest step's peak above what the rank held before it,
  i.e. without parameters and optimizer state; ``StepMemory``; absent where it cannot be
  measured), ``elapsed_sec``, ``tokens_seen`` (tokens, global), ``skipped_steps``; with a
  curriculum also ``stage`` (0-based), ``cp``, ``tp``, ``tokens_per_step`` and
  ``cp_pattern_calls`` (attention calls rank 0 ran through the stage's CP pattern since the
  last record, forward and backward; 0 for torch's ring). Memory is MiB, the max over ranks.
  Counts are ints.
- ``"val"``: ``loss``, the validation loss (global mean over the validation batches).
- ``"curriculum"``: a stage boundary: ``event`` (``"start"`` | ``"end"``), ``stage``,
  ``param_sum``, ``param_sq_sum`` (the parameters' fingerprint) and, at a start after a switch,
  ``switch_sec`` (seconds). The per-parameter fingerprint goes to ``param_stats.jsonl``, one
  line per boundary (``step``, ``event``, ``stage``, ``params``: name -> [sum, sum of squares,
  position-weighted sum]).

Tensorboard tags are grouped the same way: ``train/loss``, ``val/loss``, ``curriculum/stage``
(``stage``, ``cp``, ``tp``, ``tokens_per_step`` and ``cp_pattern_calls`` of the step records go
to ``curriculum/`` too).
``read_metrics`` reads one kind back.

Throughput follows TorchTitan 0.2.2 (``torchtitan/components/metrics.py``): tokens/s is per
rank (tokens this rank processed since the last log over the wall time), TFLOP/s is
tokens/s x model FLOPs per token (``get_dense_model_nparams_and_flops``: 6N plus attention),
and MFU divides that by the device's peak bf16 FLOP/s (GPU only).
"""

import ctypes
import functools
import json
import logging
import math
import os
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from torchtitan_ext.errors import ConfigError
from torchtitan_ext.rules import RecipeCheck, Rule

logger = logging.getLogger("torchtitan_ext")

METRICS_FILE = "metrics.jsonl"
PARAM_STATS_FILE = "param_stats.jsonl"
Kind = Literal["train", "val", "curriculum"]
# Keys of a "train" record that tensorboard shows under curriculum/ rather than train/.
_CURRICULUM_KEYS = ("stage", "cp", "tp", "tokens_per_step", "cp_pattern_calls")


def read_metrics(dump_folder: str | Path, kind: Kind = "train") -> list[dict[str, Any]]:
    """The records of ``<dump_folder>/metrics.jsonl`` of one ``kind``, in file order; [] if the
    file is missing. Raises ``ValueError`` on a line that is not JSON."""
    path = Path(dump_folder) / METRICS_FILE
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def read_param_stats(dump_folder: str | Path) -> list[dict[str, Any]]:
    """The per-parameter fingerprints of ``<dump_folder>/param_stats.jsonl`` (one per
    curriculum boundary, in file order): ``step``, ``event``, ``stage`` and ``params`` (name ->
    [sum, sum of squares, position-weighted sum], fp64; ``Trainer.param_fingerprint``). [] if
    the file is missing."""
    path = Path(dump_folder) / PARAM_STATS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak memory since the last ``reset_peak_memory``, MiB: the CUDA caching
    allocator's peak reserved bytes on GPU; on CPU the kernel's resident-set high-water mark
    (``VmHWM``), or, where /proc cannot be read, the process's lifetime peak (``ru_maxrss``)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**20
    try:
        return _high_water_mark() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory(device: torch.device) -> None:
    """Start a new window for ``peak_memory_mib`` (TorchTitan resets its peak after every
    log, so a stage that needs less memory shows it): CUDA's peak statistics; on CPU the
    resident-set high-water mark, set back to the current RSS where ``/proc/self/clear_refs``
    is writable (else the peak stays the lifetime one)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_high_water_mark()


def _high_water_mark() -> int:
    """``VmHWM`` of this process, bytes (raises OSError where /proc lacks it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_high_water_mark() -> bool:
    """Set ``VmHWM`` back to the current RSS (Linux ``clear_refs`` 5); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    """This process's resident set size now, bytes (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager measuring this process's peak resident set size from entry to exit:
    ``peak`` (bytes). The CPU counterpart of CUDA's ``max_memory_allocated`` for a span of work;
    run with small ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` so that freed tensors
    leave the resident set.

    On Linux the kernel's high-water mark is exact: entry resets it to the current RSS (writing
    5 to ``/proc/self/clear_refs``), exit reads ``VmHWM`` from ``/proc/self/status``. Where that
    file cannot be written, a thread samples the RSS every millisecond instead; it may miss a
    peak that lasts less than one torch op, since most ops hold the GIL."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __enter__(self) -> "PeakRSS":
        self.peak = rss_bytes()
        if not _reset_high_water_mark():
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            self.peak = max(self.peak, _high_water_mark())
        else:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())


class StepMemory:
    """Two memory figures per logged window of steps, on CPU and CUDA:

    - the window's peak (the ``memory`` column): ``peak_memory_mib`` over the whole window,
      steps and what runs between them (validation, checkpoints);
    - the step figure (the ``step memory`` column, ``step_mib``): the largest step peak above
      what the rank held just before that step (its parameters and optimizer state, gradients
      freed: the trainer calls ``optimizers.zero_grad()`` first). That is the step's
      activations plus its gradients (a constant: the parameters' bytes) and the step's
      communication buffers, the figure that long-context settings (chunked loss, tiled MLP,
      CP, activation checkpointing) change; ``scripts/bench_long_context.py`` and
      ``docs/long_context.md`` report it.

    On CUDA the step figure is the allocator's ``max_memory_allocated`` minus
    ``memory_allocated`` before the step (blocks the caching allocator keeps reserved do not
    count; the ``memory`` column, ``max_memory_reserved``, includes them). On CPU it is the
    kernel's resident-set high-water mark (``VmHWM``, reset before the step through
    ``/proc/self/clear_refs``) minus the resident set before the step, after glibc has handed
    its free heap pages back (``malloc_trim``), so memory freed by earlier steps and kept by the
    allocator is not counted as held; the trainer also calls ``release_freed_memory`` on CPU,
    without which glibc's retention adds several hundred MiB of noise to the figure (measured:
    1048-1209 MiB instead of 544 for ``debugmodel_cpu_32k`` at 4096 tokens with both
    long-context features). Where the high-water mark cannot be reset the step figure is not
    measured (``step_mib`` None). Follows the CPU measurement of
    ``scripts/bench_cp_memory.py`` (``PeakRSS``), per step of a running job.

    Use: ``start()`` once, then ``step_begins()`` / ``step_ends()`` around every step and
    ``window()`` at every log (it starts the next window).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.step_mib: float | None = None
        self._window_peak = 0.0
        self._before = 0
        self._measurable = True

    def start(self) -> None:
        """Start a window with no step measured (the first: after set-up, whose memory is not
        a step's)."""
        reset_peak_memory(self.device)
        self._window_peak, self.step_mib = 0.0, None

    def step_begins(self) -> None:
        """Fold the window's peak so far, note what the rank holds, reset the peak."""
        self._window_peak = max(self._window_peak, peak_memory_mib(self.device))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            return
        _trim_heap()
        self._measurable = _reset_high_water_mark()
        self._before = rss_bytes() if self._measurable else 0

    def step_ends(self) -> None:
        """Take the step's peak above what the rank held before it into ``step_mib``."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._measurable:
            peak = max(_high_water_mark(), rss_bytes())
        else:
            return
        mib = max(peak - self._before, 0) / 2**20
        self.step_mib = mib if self.step_mib is None else max(self.step_mib, mib)

    def window(self) -> tuple[float, float | None]:
        """(window peak MiB, largest step figure MiB or None) since the last call; starts the
        next window."""
        peak = max(self._window_peak, peak_memory_mib(self.device))
        step = self.step_mib
        self.start()
        return peak, step


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
RELEASE_THRESHOLD_BYTES = 65536


def release_freed_memory() -> bool:
    """Make glibc hand freed memory back to the kernel at once (``mallopt``: blocks over
    ``RELEASE_THRESHOLD_BYTES`` get their own mapping, unmapped when freed, and the heap is
    trimmed past that much free memory; what the ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` environment variables do), so that a CPU process's resident set
    follows its live tensors and ``StepMemory``'s CPU figure measures them rather than what the
    allocator kept from earlier steps. Left alone where either variable is set. Returns whether
    it was applied (False also without glibc)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, RELEASE_THRESHOLD_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, RELEASE_THRESHOLD_BYTES)
    )


def _trim_heap() -> None:
    """Give glibc's free heap memory back to the kernel (``malloc_trim(0)``), so that the
    resident set is what the process holds; nothing where libc has no ``malloc_trim``."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """libc's ``malloc_trim``, or None (not glibc)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def device_peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of ``device`` (TorchTitan's table), or None on CPU."""
    if device.type != "cuda":
        return None
    from torchtitan.tools.utils import get_peak_flops

    return float(get_peak_flops(torch.cuda.get_device_name(device)))


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m05s"``."""
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


@dataclass
class MetricsLogger:
    """Writes one record per logged step (only on the logging rank).

    Attributes:
        dump_folder: job folder; ``metrics.jsonl`` goes there, tensorboard events to
            ``<dump_folder>/<tb_folder>``.
        enabled: whether this rank writes (rank 0).
        enable_tensorboard: write tensorboard events.
        tb_folder: ``metrics.save_tb_folder``.
        flops_per_token: model FLOPs per token (forward + backward).
        peak_flops: device peak FLOP/s for MFU, None on CPU.
        total_steps: steps of the run (for the ETA).
        color: ANSI colors on the console line.
        stage_last_step, stage_label: with a curriculum, the current stage's last step and
            label (``curriculum.stage_name``: "1 of 0..2", stages count from 0): the console
            line adds the stage and its ETA.
        wandb_config: with ``metrics.enable_wandb``, the JobConfig: the records' numbers also
            go to Weights & Biases, under the same ``<group>/<key>`` names as tensorboard,
            through TorchTitan 0.2.2's ``WandBLogger`` (its ``WANDB_PROJECT``,
            ``WANDB_RUN_NAME``, ... variables; files under ``<dump_folder>/<tb_folder>/wandb``;
            ``WANDB_MODE=offline`` needs no network, ``wandb sync`` uploads later). With a
            curriculum, one wandb run per stage (``WANDB_RUN_GROUP`` groups them). None: off.
    """

    dump_folder: str
    enabled: bool
    enable_tensorboard: bool
    tb_folder: str
    flops_per_token: float
    peak_flops: float | None
    total_steps: int
    color: bool = True
    stage_last_step: int | None = None
    stage_label: str = ""
    wandb_config: Any = None
    _writer: Any = field(default=None, repr=False)
    _wandb: Any = field(default=None, repr=False)
    _jsonl: Any = field(default=None, repr=False)
    _param_stats: Any = field(default=None, repr=False)
    _last_time: float = field(default_factory=time.perf_counter, repr=False)
    _start_time: float = field(default_factory=time.perf_counter, repr=False)
    _start_step: int | None = field(default=None, repr=False)

    def start(self, step: int) -> None:
        """Open the outputs and start timing for a run that continues after ``step`` (0 for a
        fresh start); call once, after the checkpoint is loaded and before the first record.

        Each record is written once: records of later steps (left by an earlier attempt that
        crashed or diverged after the checkpoint this run resumed from), and a curriculum
        ``"start"`` boundary at ``step`` itself (a stage entered from that checkpoint, which
        this run enters again and records anew), are moved from ``metrics.jsonl`` to
        ``metrics_superseded.jsonl`` (appended, after a line
        ``{"superseded_at_resume_from": step}``; those of ``param_stats.jsonl`` to
        ``param_stats_superseded.jsonl``), and tensorboard hides its events from ``step + 1``
        on (``SummaryWriter(purge_step=...)``).
        """
        self._last_time = self._start_time = time.perf_counter()
        self._start_step = step
        if not self.enabled:
            return
        os.makedirs(self.dump_folder, exist_ok=True)
        path, stats_path = (
            os.path.join(self.dump_folder, name) for name in (METRICS_FILE, PARAM_STATS_FILE)
        )
        for p in (path, stats_path):
            _supersede_after(p, step, p.removesuffix(".jsonl") + "_superseded.jsonl")
        self._jsonl = open(path, "a")  # noqa: SIM115
        self._param_stats = open(stats_path, "a")  # noqa: SIM115
        if self.enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(
                os.path.join(self.dump_folder, self.tb_folder), purge_step=step + 1
            )
        if self.wandb_config is not None:
            from torchtitan.components.metrics import WandBLogger

            self._wandb = WandBLogger(
                os.path.join(self.dump_folder, self.tb_folder), self.wandb_config
            )

    def log(
        self,
        step: int,
        loss: float,
        grad_norm: float,
        lr: float,
        tokens_since_last: int,
        seq_len: int,
        peak_mem_mib: float,
        extra: dict[str, float | int] | None = None,
    ) -> dict[str, Any]:
        """Record one step.

        Args:
            step: 1-based optimizer step.
            loss: global mean loss over every label token of the step (nats).
            grad_norm: total L2 norm of the gradients before clipping.
            lr: learning rate used in this step.
            tokens_since_last: tokens this rank processed since the previous log.
            seq_len: training sequence length (tokens).
            peak_mem_mib: peak memory (max over ranks), MiB.
            extra: more scalars to record (``_CURRICULUM_KEYS`` show under
                ``curriculum/`` in tensorboard, the rest under ``train/``).

        Returns:
            The ``"train"`` record written (also on non-logging ranks, which write nothing).
        """
        now = time.perf_counter()
        dt = max(now - self._last_time, 1e-9)
        self._last_time = now
        tps = tokens_since_last / dt
        tflops = tps * self.flops_per_token / 1e12
        record: dict[str, Any] = {
            "kind": "train",
            "step": step,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens_per_sec": tps,
            "tflops": tflops,
            "seq_len": seq_len,
            "peak_mem_mib": peak_mem_mib,
            "elapsed_sec": now - self._start_time,
        }
        if self.peak_flops:
            record["mfu_pct"] = 100.0 * tps * self.flops_per_token / self.peak_flops
        if extra:
            record.update(extra)
        if not self.enabled:
            return record
        start = self._start_step if self._start_step is not None else 0
        done = max(step - start, 1)
        per_step = (now - self._start_time) / done
        eta = per_step * (self.total_steps - step)
        stage_eta = None
        if self.stage_last_step is not None:
            stage_eta = per_step * (self.stage_last_step - step)
        self._console(record, eta, stage_eta)
        self._write(record)
        return record

    def log_validation(self, step: int, loss: float) -> None:
        """Record a validation loss (global mean over the validation batches, nats) as a
        ``"val"`` record."""
        if not self.enabled:
            return
        logger.info(f"step {step:5d}  validation loss {loss:8.4f}")
        self._write({"kind": "val", "step": step, "loss": loss})

    def log_boundary(
        self,
        step: int,
        event: Literal["start", "end"],
        stage: int,
        param_stats: dict[str, tuple[float, float, float]],
        switch_sec: float | None = None,
    ) -> None:
        """Record a curriculum stage boundary: a ``"curriculum"`` record with the parameters'
        total sum and sum of squares, and ``param_stats`` (name -> (sum, sum of squares,
        position-weighted sum)) as a line of ``param_stats.jsonl``.

        Args:
            step: the last step of the stage that ends, or the step a stage starts after.
            event: "end" after a stage's last step, "start" before a stage's first.
            stage: 0-based index of the stage that ends or starts.
            param_stats: per-parameter fingerprint (``Trainer.param_fingerprint``).
            switch_sec: seconds from the end of the last stage's step to this start.
        """
        if not self.enabled:
            return
        record: dict[str, Any] = {
            "kind": "curriculum",
            "step": step,
            "event": event,
            "stage": stage,
            "param_sum": sum(v[0] for v in param_stats.values()),
            "param_sq_sum": sum(v[1] for v in param_stats.values()),
        }
        if switch_sec is not None:
            record["switch_sec"] = switch_sec
        logger.info(" ".join(f"{k}={v}" for k, v in record.items() if k != "kind"))
        assert self._param_stats is not None, "MetricsLogger.start() must run first"
        line = {"step": step, "event": event, "stage": stage, "params": param_stats}
        self._param_stats.write(json.dumps(line) + "\n")
        self._param_stats.flush()
        self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        """One line of ``metrics.jsonl``; its numbers to tensorboard as ``<group>/<key>`` (the
        record's kind, or ``curriculum`` for ``_CURRICULUM_KEYS``) at ``record["step"]``."""
        assert self._jsonl is not None, "MetricsLogger.start() must run first"
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._writer is None and self._wandb is None:
            return
        kind, step = record["kind"], record["step"]
        scalars = {
            f"{'curriculum' if key in _CURRICULUM_KEYS else kind}/{key}": value
            for key, value in record.items()
            if key not in ("kind", "step") and isinstance(value, (int, float))
        }
        if self._writer is not None:
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, value, step)
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step)

    def _console(self, r: dict[str, Any], eta: float, stage_eta: float | None = None) -> None:
        c = _Colors(self.color)
        line = (
            f"{c.red}step: {r['step']:5d}  {c.green}loss: {r['loss']:8.4f}  "
            f"{c.reset}grad_norm: {r['grad_norm']:7.4f}  lr: {r['lr']:.2e}  "
            f"{c.yellow}memory: {r['peak_mem_mib']:8.1f}MiB  "
            + (f"step memory: {r['step_mem_mib']:8.1f}MiB  " if "step_mem_mib" in r else "")
            + f"{c.blue}tps: {r['tokens_per_sec']:,.0f}  "
            f"{c.cyan}tflops: {r['tflops']:.3f}  "
        )
        if "mfu_pct" in r:
            line += f"{c.magenta}mfu: {r['mfu_pct']:.2f}%  "
        if "attn_work_max_over_min" in r:
            line += f"{c.reset}attn work max/min: {r['attn_work_max_over_min']:.2f}  "
        if stage_eta is not None:
            line += f"{c.reset}stage {self.stage_label} eta: {format_duration(stage_eta)}  "
        line += f"{c.reset}eta: {format_duration(eta)}"
        logger.info(line)

    def close(self) -> None:
        """Close the files, the tensorboard writer and the wandb run (idempotent)."""
        for f in (self._jsonl, self._param_stats):
            if f is not None:
                f.close()
        self._jsonl = self._param_stats = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None


def _supersede_after(path: str, step: int, superseded_path: str) -> None:
    """Move the records of ``path`` (JSON lines) that come after resuming from the checkpoint
    of ``step`` (``_after_resume``) to ``superseded_path``; the kept ones are rewritten
    atomically (temp file + rename)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    keep: list[str] = []
    later: list[str] = []
    unterminated = bool(lines) and not lines[-1].endswith("\n")
    for line in lines:
        line = line if line.endswith("\n") else line + "\n"
        try:
            drop = _after_resume(json.loads(line), step)
        except (ValueError, AttributeError, TypeError):
            drop = True  # a torn last line of a crashed run
        (later if drop else keep).append(line)
    if not later and not unterminated:
        return
    if later:
        logger.info(f"metrics: {len(later)} records after step {step} moved to {superseded_path}")
        with open(superseded_path, "a") as f:
            f.write(json.dumps({"superseded_at_resume_from": step}) + "\n")
            f.writelines(later)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _after_resume(record: dict[str, Any], step: int) -> bool:
    """Whether a record of ``metrics.jsonl`` or ``param_stats.jsonl`` comes after the
    checkpoint of ``step`` was written: a later step's, or the ``"start"`` boundary of the
    stage entered from that checkpoint (its ``"end"`` boundary, train and val records come
    before the save)."""
    at = int(record.get("step", 0))
    return at > step or (at == step and record.get("event") == "start")


class _Colors:
    def __init__(self, enabled: bool) -> None:
        codes = {
            "red": "\033[31m",
            "green": "\033[32m",
            "yellow": "\033[33m",
            "blue": "\033[34m",
            "magenta": "\033[35m",
            "cyan": "\033[36m",
            "reset": "\033[39m",
        }
        for name, code in codes.items():
            setattr(self, name, code if enabled else "")

    red = green = yellow = blue = magenta = cyan = reset = ""


def wandb_installed() -> bool:
    """Whether the ``wandb`` package can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def _wandb(c: RecipeCheck) -> None:
    if c.cfg.metrics.enable_wandb and not wandb_installed():
        raise ConfigError(
            "metrics.enable_wandb",
            True,
            "needs the wandb package (pip install wandb; WANDB_MODE=offline logs without an "
            "account or network)",
        )


RULES: tuple[Rule, ...] = (
    Rule(
        "device",
        ("metrics.enable_wandb",),
        "wandb logging needs the wandb package installed",
        _wandb,
        "metrics",
    ),
)
"""This module's recipe rules (``torchtitan_ext.rules``); ``validate.RULES`` lists them in
its table, in phase order."""
