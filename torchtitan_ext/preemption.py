"""Stop on SIGTERM or SIGINT at a step boundary, with a checkpoint, within a grace period.

Slurm (at a preemption or the time limit) and Kubernetes (pod deletion) send SIGTERM and kill
the job with SIGKILL some seconds later; a terminal's Ctrl-C sends SIGINT. torchrun (torch
2.13, ``torch.distributed.elastic``) handles SIGTERM, SIGINT, SIGHUP and SIGQUIT by raising
``SignalException`` in the launcher, forwarding the same signal to every worker and waiting
for them ``--shutdown-timeout`` seconds (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, default 30)
before it sends SIGKILL; then it exits 1 with its own ``SignalException`` traceback. A worker
therefore gets the signal once (Kubernetes: only torchrun, PID 1, receives it) or twice (a
terminal or Slurm signals the whole process group, and torchrun forwards it again), and the
ranks get it at slightly different moments.

What a training process does instead of dying (``StopRequest``, installed by ``train.py``'s
``main``):

- Before the training loop (start-up, checkpoint load) nothing is lost by stopping: the
  process prints its line and exits with ``STOPPED_EXIT_CODE`` at once, as the signal's
  default action would have ended it (also while the main thread waits in native code, e.g.
  for a rendezvous with a peer that has died).
- From the training loop on (``defer``; also between curriculum stages, where the next
  stage's loop checks first) the signal is only recorded. At every step boundary
  the ranks all-reduce (MAX) the signal number they have seen (``agreed``: one 8-byte
  all-reduce per step, on a gloo group of its own when the backend is NCCL, so no GPU sync),
  so every rank stops after the same step; the trainer then writes that step's checkpoint
  synchronously and exits with ``STOPPED_EXIT_CODE`` and one line.
- The whole stop must end within ``checkpoint.stop_grace_seconds`` of the first signal: a
  watchdog thread, started by the signal itself (through ``signal.set_wakeup_fd``, so also
  while the main thread is blocked in a collective or in native code), ends the process with
  one error line and status 1 when it does not. Set it below the scheduler's and torchrun's
  SIGKILL deadline, so the line is printed rather than the job killed without a word.
- Later signals (torchrun's forwarded copy, a second Ctrl-C) change nothing: only SIGKILL or
  the grace period cut a stop short.

Megatron-LM's ``--exit-signal-handler`` (``DistributedSignalHandler``: an all-gather of
per-rank flags at each step, then save and exit) follows the same pattern.
"""

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

import torch
import torch.distributed as dist

logger = logging.getLogger("torchtitan_ext")

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)
"""The signals that stop training at a step boundary."""

STOPPED_EXIT_CODE = os.EX_TEMPFAIL  # 75
"""Exit status of a process stopped by a stop signal after its checkpoint was written (or
with nothing to save): sysexits.h's EX_TEMPFAIL, "temporary failure, retry later"; running
the same command resumes exactly."""


class StopRequest:
    """This process's stop-signal state (one per process: ``STOP``). See the module docstring.

    Attributes:
        signum: the first stop signal received (0: none yet).
        received_at: ``time.monotonic()`` when it arrived.
        grace_s: ``checkpoint.stop_grace_seconds``.
        exit_code: set by ``finished`` once the process knows its status; a watchdog firing
            after that exits with it, without a line.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.signum = 0
        self.received_at: float | None = None
        self.grace_s = 0.0
        self.exit_code: int | None = None
        self._installed = False
        self._deferred = False
        self._announced = False
        self._rank = 0
        self._on_start_up: Callable[[str], None] | None = None
        self._on_expiry: Callable[[str], None] | None = None
        self._timer: threading.Timer | None = None
        self._group: dist.ProcessGroup | None = None

    @property
    def installed(self) -> bool:
        return self._installed

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def install(
        self,
        grace_s: float,
        rank: int,
        on_start_up: Callable[[str], None],
        on_expiry: Callable[[str], None],
    ) -> None:
        """Handle ``STOP_SIGNALS`` from now on (main thread only; once per process).

        Args:
            grace_s: seconds from the first signal to the process's end (> 0).
            rank: the global rank (only rank 0 logs the notice).
            on_start_up: called from the watcher thread with the signal's name when a signal
                arrives before ``defer``: it prints the process's one line; the process then
                exits with ``STOPPED_EXIT_CODE``.
            on_expiry: called from the watchdog thread with the signal's name when the grace
                period ends before the process does: it prints the process's one line; the
                process then exits with status 1.
        """
        self.grace_s, self._rank = grace_s, rank
        self._on_start_up, self._on_expiry = on_start_up, on_expiry
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        # The C-level handler writes each signal's number to `writer` at once, in whichever
        # thread receives it; the watcher wakes up even while the main thread is in native
        # code and cannot run Python handlers.
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._wakeup = (reader, writer)  # kept open for the process's life
        threading.Thread(
            target=self._watch, args=(reader,), name="stop-signal-watcher", daemon=True
        ).start()
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        self._installed = True

    def connect(self) -> None:
        """Choose the group ``agreed`` reduces over, once the default process group exists
        (collective when the backend is not gloo: a gloo group of its own is created)."""
        if not self._installed or not dist.is_initialized() or dist.get_world_size() == 1:
            return
        if dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")

    def defer(self) -> None:
        """From now on a signal is only recorded (the training loop checks ``agreed``)."""
        self._deferred = True

    def agreed(self) -> int:
        """The stop signal some rank received, agreed by all ranks (MAX over the world), or 0.
        Collective on every rank when installed (every rank installs it alike), else 0
        without communication."""
        if not self._installed:
            return 0
        flag = torch.tensor([self.signum], dtype=torch.int64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item())

    def rank0_says(self, value: bool) -> bool:
        """Rank 0's ``value`` on every rank (a decision from rank 0's view of the file system,
        which other nodes may see later). Collective when installed and distributed."""
        if not (self._installed and dist.is_initialized() and dist.get_world_size() > 1):
            return value
        flag = torch.tensor([int(value)], dtype=torch.int64)
        dist.broadcast(flag, src=0, group=self._group)
        return bool(flag.item())

    def finished(self, code: int) -> None:
        """The process knows its exit status: a watchdog firing during the exit uses it."""
        self.exit_code = code

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """The Python-level handler (main thread, between bytecodes). It only replaces the
        default action: the watcher thread gets every signal through the wakeup fd, sooner,
        and alone takes ``_lock`` (a handler taking it could interrupt itself holding it)."""

    def _watch(self, reader: socket.socket) -> None:
        """The watcher thread: records the first stop signal as soon as it arrives."""
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum not in STOP_SIGNALS:
                    continue
                self._note(signum)
                if not self._deferred:
                    self._exit(self._on_start_up, STOPPED_EXIT_CODE)
                if not self._announced and self._rank == 0:
                    self._announced = True
                    logger.warning(
                        f"{self.signal_name}: stopping after the current step with a "
                        f"checkpoint (within checkpoint.stop_grace_seconds = {self.grace_s:g})"
                    )

    def _note(self, signum: int) -> None:
        """Record the first stop signal and start the grace period's watchdog."""
        with self._lock:
            if self.signum:
                return
            self.signum, self.received_at = signum, time.monotonic()
            self._timer = threading.Timer(self.grace_s, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        """The grace period is over and the process still runs: its line, then exit 1."""
        self._exit(self._on_expiry, 1)

    def _exit(self, report: Callable[[str], None] | None, code: int) -> None:
        """End the process from a helper thread: ``report``'s line and ``code``, unless the
        main thread has settled its status already (``finished``: then that status, no line).
        Like a kill, it skips cleanup; everything on disk is written to survive one."""
        if self.exit_code is not None:
            code = self.exit_code
        elif report is not None:
            with contextlib.suppress(Exception):  # the exit must happen whatever it does
                report(self.signal_name)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


STOP = StopRequest()
"""The process's stop-signal state (signal handlers are process-wide)."""
