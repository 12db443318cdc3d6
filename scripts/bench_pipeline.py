"""Pipeline-bubble benchmark: measured idle fraction of torch's pipeline schedules vs. theory.

What is measured: for each schedule of ``torch.distributed.pipelining`` (GPipe, 1F1B,
Interleaved1F1B, InterleavedZeroBubble, ZBVZeroBubble) and each pipeline degree ``P``, the
fraction of a training step during which a pipeline rank computes nothing (the *pipeline
bubble*). The script spawns ``P`` real processes (``torch.multiprocessing.spawn``, gloo on
127.0.0.1), builds real ``PipelineStage`` objects and the real schedule class from
``get_schedule_class(name)``, and times ``schedule.step(...)`` with ``M`` microbatches
(``scale_grads=False``, summed MSE loss). Stage placement: loop style (rank ``r`` holds stages
``r, r+P, ...``) for GPipe/1F1B (one stage per rank) and the interleaved schedules (``v = 2``
stages per rank); V style (rank ``r`` holds stages ``r`` and ``2P-1-r``) for ZBVZeroBubble.

Cost model: a stage does no arithmetic worth timing; its "compute" is ``time.sleep`` inside
custom autograd Functions. Per stage chunk (``v`` stages per rank, ``t_f = --t-fwd-ms``):

* F (forward), on the activation path: sleeps ``t_f / v``;
* B (gradient w.r.t. the stage input), in the backward of that same activation Function:
  sleeps ``t_f / v``;
* W (gradient w.r.t. the weights), in the backward of a separate Function that takes only a
  tiny ``nn.Parameter`` and whose output is added to the activation: sleeps ``t_f / v``.

So F : (B + W) = 1 : 2, as in the usual cost model, and every schedule does the same work per
rank and microbatch (``3 t_f``). Because the W Function lies on no path from the stage output to
the stage input, ``stage_backward_input`` (``autograd.grad`` w.r.t. the input only, used by the
zero-bubble schedules) runs B but not W, and ``stage_backward_weight`` later runs W but not B;
a full backward (GPipe, 1F1B, Interleaved1F1B) runs both. The script counts every sleep by stage,
kind (F/B/W) and the stage call it ran under (forward, full backward, input backward, weight
backward) and checks that split. Known torch detail: the zero-bubble runtime skips the input
backward of stage 0 (the pipeline input needs no gradient) and runs stage 0's whole backward,
B and W, in its W action; the check allows exactly that.

Why sleeps: this machine has 2 CPU cores shared with other jobs and ``P`` goes up to 4 ranks, so
FLOP-based stages would measure CPU contention, not the schedule. A sleeping stage takes the same
time however busy the CPU is; only the schedule's own overhead (Python, autograd bookkeeping,
gloo send/recv of small tensors) still competes for the CPU, and that shows up as extra idle.
On a loaded machine, ``--nice -10`` keeps that overhead small (the driver's niceness, inherited
by the spawned workers; needs root or CAP_SYS_NICE, otherwise a warning and the run goes on
unchanged): the workers sleep nearly all the time, so this takes little CPU from other jobs, but
their short bursts of Python are no longer queued behind CPU-bound neighbours. The default
leaves priorities alone. Measured busy time includes any oversleep, so a late wake-up is not
counted as idle.

Metrics, per rank and measured step: ``busy`` = total time inside the sleeps (``perf_counter``
around each sleep); ``step`` = wall time of ``schedule.step`` on that rank, started right after a
``dist.barrier()``; ``makespan`` = from that rank's start to the moment the *last* rank finished
the step (``perf_counter`` is CLOCK_MONOTONIC, shared by all processes of the machine), i.e. the
step time a training loop sees once it synchronizes (optimizer step, next step's data). The
reported idle fraction is ``1 - busy / makespan`` (the bubble definition the formulas below use:
a rank that finishes early idles until the flush ends); ``1 - busy / step`` (the rank's own
step wall only) is also printed as a diagnostic. ``--warmup`` steps are run unmeasured, then
``--steps`` are measured; the table shows the mean over steps and ranks and the max over ranks
(of each rank's mean over steps).

Theory (bubble time / step time, with F, B, W uniform and no communication cost):

* GPipe and 1F1B: ``(P-1) / (M+P-1)``. GPipe: Huang et al. 2019, arXiv 1811.06965;
  1F1B (PipeDream-Flush): Narayanan et al. 2021, arXiv 2006.09503.
* Interleaved 1F1B with ``v`` stages per rank: ``(P-1) / (v*M+P-1)``; Narayanan et al. 2021
  (Megatron-LM), arXiv 2104.04473.
* Zero bubble: the target is ~0 once B and W are split and W fills the bubble (ZB-V reaches it
  for F = B = W); Qi et al. (ICLR 2024), arXiv 2401.10241. The single-stage formula
  ``(P-1)/(M+P-1)`` is printed for every row as the common reference. The paper's ~0 also
  drops the synchronization at the optimizer step (its "optimizer post-validation"), so that
  consecutive iterations overlap. ``schedule.step`` here ends each step with a full flush, and
  then no schedule can beat a floor: the last rank's first forward waits for ``P-1`` forward
  chunks (``t_f / v`` each) and every rank has ``3 M t_f`` of work, so idle >=
  ``(P-1) / (3 v M + P-1)``. The diagnostics print that floor.

Besides theory, every row gets ``sim``: an event simulation (in this script) of the order in
which that rank's stages actually ran their F/I/W/B calls in the last measured step, with the
cost model's durations and free communication. ``sim`` is what the measurement would be with
zero runtime overhead; ``measured - sim`` is the overhead of the runtime on this machine.

Command line::

    .venv/bin/python scripts/bench_pipeline.py [--pp 2,4] [--microbatches 8]
        [--schedules GPipe,1F1B,Interleaved1F1B,InterleavedZeroBubble,ZBVZeroBubble]
        [--steps 5] [--warmup 2] [--t-fwd-ms 20] [--nice 0] [--json PATH]

The exit status is 1 if the B/W split check failed for some row, else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

# Schedule name -> (stages per rank, placement style). Names as get_schedule_class spells them.
SCHEDULES: dict[str, tuple[int, str]] = {
    "GPipe": (1, "loop"),
    "1F1B": (1, "loop"),
    "Interleaved1F1B": (2, "loop"),
    "InterleavedZeroBubble": (2, "loop"),
    "ZBVZeroBubble": (2, "v"),
}
ZERO_BUBBLE = frozenset({"InterleavedZeroBubble", "ZBVZeroBubble"})
# Stage call (phase) -> torch's action letter: forward, full backward, input backward, weight.
PHASE_TO_ACTION = {"forward": "F", "full": "B", "input": "I", "weight": "W"}
MICROBATCH_SIZE = 2
HIDDEN = 8


@dataclass(frozen=True)
class BenchConfig:
    """Settings shared by every rank of one spawned pipeline group."""

    schedules: tuple[str, ...]
    microbatches: int
    steps: int
    warmup: int
    t_fwd_s: float


# --------------------------------------------------------------------------------------------
# Sleep-based cost model (runs inside the spawned workers).
# --------------------------------------------------------------------------------------------


class _Recorder:
    """Per-process record of sleep time, sleep counts and the stage calls run, in order.

    ``counts`` is keyed by (stage, kind, phase); ``actions`` lists the stage calls of the
    current step as (action, stage, microbatch), action being torch's F/B/I/W.
    """

    def __init__(self) -> None:
        self.busy_s = 0.0
        self.phase = "none"
        self.counts: Counter[tuple[int, str, str]] = Counter()
        self.actions: list[tuple[str, int, int]] = []

    @contextlib.contextmanager
    def in_phase(self, phase: str, stage: int, microbatch: int) -> Iterator[None]:
        """Label the sleeps run inside the block with ``phase`` (the stage call running them)."""
        self.actions.append((PHASE_TO_ACTION[phase], stage, microbatch))
        outer, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = outer

    def work(self, seconds: float, stage: int, kind: str) -> None:
        """Sleep ``seconds`` as stage ``stage``'s ``kind`` work and record it as busy time."""
        start = time.perf_counter()
        time.sleep(seconds)
        self.busy_s += time.perf_counter() - start
        self.counts[(stage, kind, self.phase)] += 1


_REC = _Recorder()


class _ActivationWork(torch.autograd.Function):
    """Identity on the activation path: F sleeps in forward, B (input grad) in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, stage: int, t_f: float, t_b: float) -> torch.Tensor:
        ctx.stage, ctx.t_b = stage, t_b
        _REC.work(t_f, stage, "F")
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        _REC.work(ctx.t_b, ctx.stage, "B")
        return grad, None, None, None


class _WeightWork(torch.autograd.Function):
    """``0 * w`` as a 0-d tensor; W (weight grad) sleeps in backward, forward costs nothing."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, stage: int, t_w: float) -> torch.Tensor:
        ctx.stage, ctx.t_w, ctx.shape = stage, t_w, w.shape
        return (w * 0.0).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        _REC.work(ctx.t_w, ctx.stage, "W")
        return grad.expand(ctx.shape) * 0.0, None, None


class SleepStage(nn.Module):
    """One pipeline stage: ``ActivationWork(x + bias) + WeightWork(weight)``.

    ``bias`` puts a parameter on the activation path, so B also runs on stage 0, whose input
    needs no gradient; ``weight`` hangs off a branch that only W's backward reaches.
    """

    def __init__(self, stage_index: int, t_f: float, t_b: float, t_w: float) -> None:
        super().__init__()
        self.stage_index = stage_index
        self.t_f, self.t_b, self.t_w = t_f, t_b, t_w
        self.bias = nn.Parameter(torch.zeros(HIDDEN))
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the stage: F sleep now, B and W sleeps in backward."""
        act = _ActivationWork.apply(x + self.bias, self.stage_index, self.t_f, self.t_b)
        return act + _WeightWork.apply(self.weight, self.stage_index, self.t_w)


class _InstrumentedStage(PipelineStage):
    """``PipelineStage`` that labels sleeps with the stage call (phase) running them."""

    def forward_one_chunk(
        self,
        fwd_chunk_id: int,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None = None,
        save_forward_output: bool = True,
    ) -> Any:
        with _REC.in_phase("forward", self.stage_index, fwd_chunk_id):
            return super().forward_one_chunk(fwd_chunk_id, args, kwargs, save_forward_output)

    def backward_one_chunk(
        self,
        bwd_chunk_id: int,
        loss: Any = None,
        full_backward: bool = True,
        last_backward: bool = False,
    ) -> None:
        with _REC.in_phase("full" if full_backward else "input", self.stage_index, bwd_chunk_id):
            super().backward_one_chunk(bwd_chunk_id, loss, full_backward, last_backward)

    def backward_weight_one_chunk(self, bwd_chunk_id: int, last_backward: bool = False) -> None:
        with _REC.in_phase("weight", self.stage_index, bwd_chunk_id):
            super().backward_weight_one_chunk(bwd_chunk_id, last_backward)


def stage_indices(rank: int, pp: int, per_rank: int, style: str) -> list[int]:
    """Stage indices held by ``rank``: loop style ``r, r+P, ...``; V style ``r, 2P-1-r``."""
    if style == "v":
        if per_rank != 2:
            raise ValueError("V-style placement needs exactly 2 stages per rank")
        return [rank, 2 * pp - 1 - rank]
    return [rank + k * pp for k in range(per_rank)]


def _loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target, reduction="sum")


def _run_schedule(name: str, rank: int, pp: int, cfg: BenchConfig) -> dict[str, Any]:
    """Build ``name``'s stages for this rank, run warmup + measured steps, return raw timings."""
    per_rank, style = SCHEDULES[name]
    n_stages = per_rank * pp
    # Same work per rank and microbatch for every schedule: 3 * t_f split over the local stages.
    t_chunk = cfg.t_fwd_s / per_rank
    device = torch.device("cpu")
    stages = []
    for idx in stage_indices(rank, pp, per_rank, style):
        module = SleepStage(idx, t_chunk, t_chunk, t_chunk)
        # Static shapes (no runtime inference). The metadata's requires_grad decides whether
        # gradients are exchanged: received activations and stage outputs need it.
        example_in = torch.zeros(MICROBATCH_SIZE, HIDDEN, requires_grad=idx > 0)
        example_out = torch.zeros(MICROBATCH_SIZE, HIDDEN, requires_grad=True)
        stages.append(
            _InstrumentedStage(
                module, idx, n_stages, device, input_args=example_in, output_args=example_out
            )
        )
    schedule_cls = get_schedule_class(name)
    if issubclass(schedule_cls, PipelineScheduleSingle):
        schedule = schedule_cls(
            stages[0], n_microbatches=cfg.microbatches, loss_fn=_loss_fn, scale_grads=False
        )
    else:
        schedule = schedule_cls(
            stages, n_microbatches=cfg.microbatches, loss_fn=_loss_fn, scale_grads=False
        )
    has_first = any(s.is_first for s in stages)
    has_last = any(s.is_last for s in stages)
    batch = torch.randn(cfg.microbatches * MICROBATCH_SIZE, HIDDEN)
    target = torch.randn(cfg.microbatches * MICROBATCH_SIZE, HIDDEN)
    args = (batch,) if has_first else ()
    kwargs: dict[str, Any] = {"target": target} if has_last else {}
    params = [p for s in stages for p in s.submod.parameters()]

    records: list[dict[str, float]] = []
    for step in range(cfg.warmup + cfg.steps):
        if step == cfg.warmup:
            _REC.counts.clear()
        _REC.busy_s = 0.0
        _REC.actions.clear()
        dist.barrier()
        t0 = time.perf_counter()
        schedule.step(*args, **kwargs)
        t1 = time.perf_counter()
        busy = _REC.busy_s
        for p in params:
            p.grad = None
        if step >= cfg.warmup:
            records.append({"t0": t0, "t1": t1, "busy": busy})
    dist.barrier()
    counts = [[s, k, ph, n] for (s, k, ph), n in sorted(_REC.counts.items())]
    _REC.counts.clear()
    return {
        "rank": rank,
        "stages": [s.stage_index for s in stages],
        "steps": records,
        "counts": counts,
        "actions": [list(a) for a in _REC.actions],
    }


def _worker(rank: int, pp: int, port: int, cfg: BenchConfig, out_path: str) -> None:
    """Spawned entry point: one rank of a ``pp``-rank gloo group; rank 0 writes the results."""
    from torchtitan_ext.distributed import exit_process, init_distributed

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(pp)
    )
    init_distributed("gloo", torch.device("cpu"), 300)
    results: dict[str, list[dict[str, Any]]] = {}
    for name in cfg.schedules:
        local = _run_schedule(name, rank, pp, cfg)
        gathered: list[Any] = [None] * pp
        dist.all_gather_object(gathered, local)
        results[name] = gathered
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.barrier()
    exit_process(0)  # no interpreter finalization: see exit_process


# --------------------------------------------------------------------------------------------
# Driver: spawn, analyse, report.
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def set_niceness(nice: int) -> int:
    """Set this process's niceness (inherited by the workers spawned later); return the result.

    Raising the priority (negative values) needs root or CAP_SYS_NICE; without it the run goes
    on at the current niceness, with a warning.
    """
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if nice != current:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except OSError as exc:
            print(
                f"warning: cannot set niceness {nice} ({exc}); keeping {current}", file=sys.stderr
            )
    return os.getpriority(os.PRIO_PROCESS, 0)


def run_group(pp: int, cfg: BenchConfig) -> dict[str, list[dict[str, Any]]]:
    """Spawn ``pp`` ranks, run every configured schedule, return the per-rank raw results."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "results.json")
        mp.spawn(_worker, args=(pp, _free_port(), cfg, out_path), nprocs=pp, join=True)
        data: dict[str, list[dict[str, Any]]] = json.loads(Path(out_path).read_text())
    return data


def theory_reference(pp: int, m: int) -> float:
    """Single-stage-per-rank bubble fraction ``(P-1)/(M+P-1)`` (GPipe, 1F1B)."""
    return (pp - 1) / (m + pp - 1)


def theory_schedule(name: str, pp: int, m: int) -> float:
    """Bubble fraction the literature gives for ``name``; 0 (the target) for zero bubble."""
    if name in ZERO_BUBBLE:
        return 0.0
    per_rank = SCHEDULES[name][0]
    return (pp - 1) / (per_rank * m + pp - 1)


def simulate_idle(
    order: dict[int, list[tuple[str, int, int]]], n_stages: int, t_chunk: float
) -> tuple[float, float]:
    """Idle fraction and makespan of an executed action order under the cost model, no overhead.

    ``order`` holds, per rank, the stage calls that rank ran in the last measured step (recorded
    by ``_InstrumentedStage``, so it is torch's real execution order, not its schedule IR). Each
    rank runs its actions in that order, each as soon as its inputs exist (communication is
    free): F(s, m) after F(s-1, m); I or B(s, m) after F(s, m) and after the input gradient
    I/B(s+1, m); W(s, m) after I(s, m). Durations per stage chunk: F = I = W = ``t_chunk``,
    B = 2 ``t_chunk``, except that torch runs stage 0's whole backward in its W action (I of
    stage 0 takes no time, its W takes 2 ``t_chunk``). Every rank does the same work, so the
    idle fraction is the same on every rank.
    """

    def duration(kind: str, stage: int) -> float:
        if kind == "B" or (kind == "W" and stage == 0):
            return 2 * t_chunk
        if kind == "I" and stage == 0:
            return 0.0
        return t_chunk

    def deps(kind: str, stage: int, mb: int) -> list[tuple[str, int, int]]:
        if kind == "F":
            return [("F", stage - 1, mb)] if stage > 0 else []
        if kind == "W":
            return [("I", stage, mb)]
        grads = [("G", stage + 1, mb)] if stage < n_stages - 1 else []
        return [("F", stage, mb), *grads]

    done: dict[tuple[str, int, int], float] = {}
    clock = dict.fromkeys(order, 0.0)
    busy = dict.fromkeys(order, 0.0)
    pos = dict.fromkeys(order, 0)
    remaining = sum(len(a) for a in order.values())
    while remaining:
        progressed = False
        for rank, actions in order.items():
            while pos[rank] < len(actions):
                kind, stage, mb = actions[pos[rank]]
                needed = deps(kind, stage, mb)
                if any(d not in done for d in needed):
                    break
                start = max([clock[rank], *(done[d] for d in needed)])
                clock[rank] = start + duration(kind, stage)
                busy[rank] += duration(kind, stage)
                done[(kind, stage, mb)] = clock[rank]
                if kind in ("I", "B"):
                    done[("G", stage, mb)] = clock[rank]
                pos[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("schedule simulation deadlocked")
    makespan = max(clock.values())
    return 1 - statistics.fmean(busy.values()) / makespan, makespan


def check_split(name: str, counts: list[list[Any]], n_stages: int, m: int) -> list[str]:
    """Check where the B and W sleeps ran; return a list of violations (empty when fine)."""
    problems: list[str] = []
    by_kind: Counter[str] = Counter()
    for stage, kind, phase, n in counts:
        by_kind[kind] += n
        if kind == "F" and phase != "forward":
            problems.append(f"F of stage {stage} ran in phase {phase}")
        if kind in "BW" and name not in ZERO_BUBBLE and phase != "full":
            problems.append(f"{kind} of stage {stage} ran in phase {phase}, not one backward")
        if name in ZERO_BUBBLE:
            if kind == "W" and phase == "input":
                problems.append(f"W of stage {stage} ran inside the input backward")
            if kind == "B" and phase == "weight" and stage != 0:
                problems.append(f"B of stage {stage} ran inside the weight backward")
    for kind in "FBW":
        if by_kind[kind] != n_stages * m:
            problems.append(f"{by_kind[kind]} {kind} sleeps per step, expected {n_stages * m}")
    if name in ZERO_BUBBLE and not any(
        k == "W" and ph == "weight" and s != 0 for s, k, ph, _ in counts
    ):
        problems.append("no W ran as a separate weight backward: B/W split did not happen")
    return problems


def analyse(name: str, pp: int, cfg: BenchConfig, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Turn the raw per-rank timings of one (schedule, P) run into idle fractions."""
    n_steps = cfg.steps
    ends = [max(r["steps"][i]["t1"] for r in ranks) for i in range(n_steps)]
    idle_make: list[float] = []
    idle_step: list[float] = []
    busy_ms: list[float] = []
    makespan_ms: list[float] = []
    for r in ranks:
        steps = r["steps"]
        idle_make.append(
            statistics.fmean(1 - s["busy"] / (ends[i] - s["t0"]) for i, s in enumerate(steps))
        )
        idle_step.append(statistics.fmean(1 - s["busy"] / (s["t1"] - s["t0"]) for s in steps))
        busy_ms.append(1e3 * statistics.fmean(s["busy"] for s in steps))
        makespan_ms.append(1e3 * statistics.fmean(ends[i] - s["t0"] for i, s in enumerate(steps)))
    per_rank, _ = SCHEDULES[name]
    m = cfg.microbatches
    # Sleep counts summed over ranks, per measured step.
    total: Counter[tuple[int, str, str]] = Counter()
    for r in ranks:
        for s, k, ph, n in r["counts"]:
            total[(s, k, ph)] += n
    counts = [[s, k, ph, n // n_steps] for (s, k, ph), n in sorted(total.items())]
    ref = theory_reference(pp, m)
    sched = theory_schedule(name, pp, m)
    order = {
        int(r["rank"]): [(str(k), int(s), int(mb)) for k, s, mb in r["actions"]] for r in ranks
    }
    sim_idle, sim_makespan = simulate_idle(order, per_rank * pp, cfg.t_fwd_s / per_rank)
    mean_idle = statistics.fmean(idle_make)
    return {
        "schedule": name,
        "pp": pp,
        "microbatches": m,
        "stages_per_rank": per_rank,
        "idle_mean": mean_idle,
        "idle_max": max(idle_make),
        "idle_per_rank": idle_make,
        "idle_own_step_mean": statistics.fmean(idle_step),
        "idle_own_step_per_rank": idle_step,
        "busy_ms_per_rank": busy_ms,
        "ideal_busy_ms": 3 * m * cfg.t_fwd_s * 1e3,
        "makespan_ms_per_rank": makespan_ms,
        "sim_makespan_ms": sim_makespan * 1e3,
        "sim_idle": sim_idle,
        "sync_floor": (pp - 1) / (3 * per_rank * m + pp - 1),
        "theory_reference": ref,
        "theory_schedule": sched,
        "ratio_reference": mean_idle / ref,
        "ratio_schedule": mean_idle / sched if sched > 0 else None,
        "sleep_counts_per_step": counts,
        "split_problems": check_split(name, counts, per_rank * pp, m),
    }


def _phase_summary(counts: list[list[Any]], kind: str) -> str:
    phases: Counter[str] = Counter()
    for _, k, ph, n in counts:
        if k == kind:
            phases[ph] += n
    return ", ".join(f"{ph} {n}" for ph, n in sorted(phases.items()))


def format_report(rows: list[dict[str, Any]], cfg: BenchConfig, pps: list[int], nice: int) -> str:
    """Markdown report: parameters, the idle-fraction table, the B/W split check."""
    out = [
        "## Pipeline bubble: measured idle fraction vs. theory",
        "",
        f"command: `{shlex.join([sys.executable, *sys.argv])}`",
        "",
        f"parameters: P = {', '.join(map(str, pps))}; M = {cfg.microbatches} microbatches; "
        f"t_f = {cfg.t_fwd_s * 1e3:g} ms per rank and microbatch (F = B = W = t_f / v per stage "
        f"chunk, v = stages per rank); {cfg.warmup} warmup + {cfg.steps} measured steps; "
        f"torch {torch.__version__}, gloo, {os.cpu_count()} CPU cores, niceness {nice}.",
        "",
        "| schedule | P | M | stages/rank | idle mean | idle max | (P-1)/(M+P-1) "
        "| theory (schedule) | measured / (P-1)/(M+P-1) | measured / theory | sim |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sched = r["theory_schedule"]
        sched_txt = "~0 (ZB target)" if r["schedule"] in ZERO_BUBBLE else f"{sched:.3f}"
        ratio = r["ratio_schedule"]
        ratio_txt = "n/a (theory 0)" if ratio is None else f"{ratio:.2f}"
        out.append(
            f"| {r['schedule']} | {r['pp']} | {r['microbatches']} | {r['stages_per_rank']} "
            f"| {r['idle_mean']:.3f} | {r['idle_max']:.3f} | {r['theory_reference']:.3f} "
            f"| {sched_txt} | {r['ratio_reference']:.2f} | {ratio_txt} | {r['sim_idle']:.3f} |"
        )
    out += [
        "",
        "idle = 1 - busy / makespan per rank and step (makespan: from the rank's start, after a "
        "barrier, to the end of the step on the last rank); mean over steps and ranks, max over "
        "ranks. Interleaved theory: (P-1)/(v*M+P-1). sim = idle fraction of torch's own action "
        "order for that schedule under the same cost model with zero overhead (event simulation "
        "in this script): what the measurement would give on an idle machine with free "
        "communication; measured - sim is runtime overhead (Python, autograd, gloo, CPU "
        "contention).",
        "",
        "### Diagnostics",
        "",
        "| schedule | P | idle per rank | idle, own step wall (mean) | measured - sim "
        "| floor (P-1)/(3vM+P-1) | busy ms per rank (ideal) | makespan ms (sim) "
        "| B sleeps by phase | W sleeps by phase | B/W check |",
        "|---|---:|---|---:|---:|---:|---|---:|---|---|---|",
    ]
    for r in rows:
        per_rank = " ".join(f"{x:.3f}" for x in r["idle_per_rank"])
        busy = " ".join(f"{x:.0f}" for x in r["busy_ms_per_rank"])
        check = "ok" if not r["split_problems"] else "; ".join(r["split_problems"])
        out.append(
            f"| {r['schedule']} | {r['pp']} | {per_rank} | {r['idle_own_step_mean']:.3f} "
            f"| {r['idle_mean'] - r['sim_idle']:.3f} | {r['sync_floor']:.3f} "
            f"| {busy} ({r['ideal_busy_ms']:.0f}) | {max(r['makespan_ms_per_rank']):.0f} "
            f"({r['sim_makespan_ms']:.0f}) "
            f"| {_phase_summary(r['sleep_counts_per_step'], 'B')} "
            f"| {_phase_summary(r['sleep_counts_per_step'], 'W')} | {check} |"
        )
    out += [
        "",
        "Sleep counts are per step, summed over ranks (phase = the stage call that ran the "
        "sleep: full = one backward doing B and W, input = stage_backward_input, weight = "
        "stage_backward_weight). In the zero-bubble schedules torch runs stage 0's whole "
        "backward in its W action, so stage 0's B appears under 'weight'. Own step wall: "
        "1 - busy / (this rank's schedule.step time), which leaves out the time a rank that "
        "finished early waits for the flush. Floor: the least idle any schedule with v stages per "
        "rank can have when every step ends in a flush (the last rank starts P-1 forward "
        "chunks late).",
    ]
    return "\n".join(out)


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--pp", default="2,4", help="comma-separated pipeline degrees")
    parser.add_argument("--microbatches", type=int, default=8, help="microbatches per step (M)")
    parser.add_argument(
        "--schedules", default=",".join(SCHEDULES), help=f"comma-separated, of {list(SCHEDULES)}"
    )
    parser.add_argument("--steps", type=int, default=5, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    parser.add_argument(
        "--t-fwd-ms", type=float, default=20.0, help="forward time per rank and microbatch"
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness for the driver and its workers (default 0: unchanged; -10 on a loaded "
        "machine keeps the workers' short bursts of Python from queueing behind CPU-bound "
        "neighbours; needs root or CAP_SYS_NICE)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run every (P, schedule) combination and print the Markdown report."""
    args = _parse_args(argv)
    pps = [int(x) for x in args.pp.split(",") if x.strip()]
    canonical = {k.lower(): k for k in SCHEDULES}
    names: list[str] = []
    for raw in args.schedules.split(","):
        if raw.strip().lower() not in canonical:
            raise SystemExit(f"unknown schedule {raw!r}; choose from {list(SCHEDULES)}")
        names.append(canonical[raw.strip().lower()])
    if any(p < 2 for p in pps) or args.microbatches < 1 or args.steps < 1 or args.warmup < 0:
        raise SystemExit("need --pp >= 2, --microbatches >= 1, --steps >= 1, --warmup >= 0")
    cfg = BenchConfig(
        schedules=tuple(names),
        microbatches=args.microbatches,
        steps=args.steps,
        warmup=args.warmup,
        t_fwd_s=args.t_fwd_ms / 1e3,
    )
    start = time.perf_counter()
    nice = set_niceness(args.nice)
    rows: list[dict[str, Any]] = []
    for pp in pps:
        t_group = time.perf_counter()
        raw = run_group(pp, cfg)
        rows += [analyse(name, pp, cfg, raw[name]) for name in names]
        print(f"P={pp}: {time.perf_counter() - t_group:.1f} s", file=sys.stderr, flush=True)
    print(format_report(rows, cfg, pps, nice))
    print(f"\ntotal wall time: {time.perf_counter() - start:.1f} s")
    if args.json is not None:
        payload = {"config": asdict(cfg), "pp": pps, "niceness": nice, "results": rows}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if any(r["split_problems"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
