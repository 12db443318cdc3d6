"""Trainer overhead benchmark: ``train.py`` on 1 rank vs. a minimal hand-written PyTorch loop.

What is measured: steady-state training throughput in tokens/s per rank (input tokens processed
per second of wall time by the one training process; with 1 rank this is also the job's
throughput), for

* the trainer: ``python train.py --job.config_file <recipe>`` without torchrun (a 1-rank gloo
  group), with checkpointing, validation and tensorboard off and ``metrics.log_freq = 1``; its
  throughput is read from ``<dump_folder>/metrics.jsonl``;
* a minimal loop (this script's hidden ``--_minimal`` mode running
  ``torchtitan_ext.tools.reference_loop``): the same TorchTitan Llama 3 model
  and flavor, initial weights (``init_weights_mesh_independent``, same seed), data (the packed
  windows of the tokenized stdlib corpus, same split, order and batches), parameter dtype
  (``training.dtype``: fp32 in the CPU recipes), local batch, sequence length, optimizer
  (``torch.optim.AdamW`` with the recipe's hyperparameters and implementation), TorchTitan's LR
  schedule builder, summed cross-entropy divided by the label tokens, ``clip_grad_norm_``,
  ``zero_grad`` and ``step``, timed with ``time.perf_counter``.

Both run as subprocesses of this script, with the same interpreter, working directory and
``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` (the minimal loop also calls ``torch.set_num_threads``
with that count). The first ``--warmup`` steps of every run are excluded; the throughput of a
run is (tokens of the timed steps) / (wall time of the timed steps). Runs alternate in ABBA
order over ``--repeats`` repeats and the median over repeats is reported for each side.

Result: ``ratio = trainer tokens/s / minimal-loop tokens/s``; target ``ratio >= 0.97`` (the
trainer costs at most 3% over a bare loop). Since both sides start from the same weights and see
the same batches, their per-step losses must agree: the largest difference is printed and must
be at most ``LOSS_TOLERANCE`` (a check that both did the same work). PASS/FAIL is printed for
each; the exit status is 1 when either fails, a run crashed or the setup is invalid.

Noise: on a shared machine other processes only ever slow a run down, so the report also gives
each side's best run and its median step time (tokens per step / median step time), with the
ratios these give, and flags the result as NOISY when the per-repeat ratios disagree or some
steps of a run were much slower than its typical step. Those figures are diagnostics; PASS/FAIL
uses the ratio of the medians.

Usage::

    .venv/bin/python scripts/bench_overhead.py [--config train_configs/debug_cpu.toml]
        [--steps 60] [--warmup 10] [--repeats 2] [--threads N]
        [--flavor NAME] [--local-batch-size B] [--seq-len S]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchtitan_ext.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
TARGET_RATIO = 0.97
# The largest per-step loss difference (nats) between the trainer and the minimal loop: the same
# weights, batches and fp32 arithmetic, so only reduction order can differ.
LOSS_TOLERANCE = 1e-4
# Environment variables that would make train.py join a torchrun job instead of running alone.
_LAUNCHER_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "GROUP_RANK",
)


@dataclass(frozen=True)
class Workload:
    """What both sides run: the recipe plus the values the parent resolved and passes to both
    explicitly (so an override cannot reach one side only)."""

    config: str
    flavor: str
    local_batch_size: int
    seq_len: int
    steps: int
    warmup: int
    threads: int
    dtype: str  # training.dtype (parameters); the trainer trains in it on CPU


@dataclass(frozen=True)
class RunResult:
    """One timed run of one side."""

    tokens_per_sec: float  # tokens of the timed steps / their wall time
    timed_steps: int
    timed_sec: float
    losses: list[float]  # every step's loss
    step_sec: list[float]  # wall time of each timed step
    tokens_per_step: int
    wall_sec: float  # the whole subprocess, start-up included

    @property
    def median_step_tokens_per_sec(self) -> float:
        """tokens per step / median step time: insensitive to a few steps slowed by other
        processes on the machine (a noise check, not the headline number)."""
        return self.tokens_per_step / statistics.median(self.step_sec)


class Recipe:
    """A recipe as the trainer resolves it (``torchtitan_ext.config.load_config``: TorchTitan
    0.2.2's JobConfig with torchtitan_ext's sections, TOML over defaults)."""

    def __init__(self, path: str) -> None:
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        from torchtitan_ext.config import load_config

        self.cfg = load_config(["--job.config_file", path])

    def get(self, section: str, key: str) -> Any:
        """``[section] key`` of the resolved recipe."""
        return getattr(getattr(self.cfg, section), key)


def resolve_config_path(path: str) -> str:
    """``path`` as given if it exists (relative to the current directory), else relative to the
    repository root; absolute either way, since the runs use the repository root as cwd."""
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (REPO / p).is_file():
        p = REPO / p
    if not p.is_file():
        raise SystemExit(f"bench_overhead: no such recipe: {path}")
    return str(p.resolve())


def check_recipe(recipe: Recipe) -> list[str]:
    """Recipe settings under which the minimal loop would not do the trainer's work.

    Returns:
        Warnings to print (settings the minimal loop does not reproduce).

    Raises:
        SystemExit: settings the minimal loop cannot reproduce at all (other data/tokenizer).
    """
    if (
        recipe.get("training", "dataset_path")
        or recipe.get("training", "dataset") != "python_stdlib"
    ):
        raise SystemExit("bench_overhead: only the embedded python_stdlib dataset is supported")
    if recipe.get("model", "tokenizer") == "hf":
        raise SystemExit("bench_overhead: only the byte-level tokenizer is supported")
    if recipe.get("model", "name") != "llama3":
        raise SystemExit("bench_overhead: only model.name = llama3 is supported")
    if recipe.get("training", "device") == "cuda":
        raise SystemExit("bench_overhead: the minimal loop runs on CPU only")
    warnings = []
    if recipe.get("activation_checkpoint", "mode") != "none":
        warnings.append("activation checkpointing is on in the recipe; the minimal loop has none")
    if recipe.get("compile", "enable"):
        warnings.append("torch.compile is on in the recipe; the minimal loop runs eagerly")
    if recipe.get("training", "gc_debug"):
        warnings.append("training.gc_debug is on: the trainer collects garbage at every step")
    if recipe.get("debug", "deterministic"):
        warnings.append("debug.deterministic is on in the recipe; the minimal loop does not set it")
    return warnings


def clean_env(threads: int) -> dict[str, str]:
    """The environment of both sides: ours, minus torchrun's variables, with the thread count
    pinned so that torch's intra-op pool has the same size in both processes."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def trainer_command(w: Workload, dump_folder: str) -> list[str]:
    """The train.py command line of one trainer run."""
    return [
        sys.executable,
        "train.py",
        "--job.config_file", w.config,
        "--job.dump_folder", dump_folder,
        "--model.flavor", w.flavor,
        "--training.local_batch_size", str(w.local_batch_size),
        "--training.seq_len", str(w.seq_len),
        "--training.steps", str(w.steps),
        "--metrics.log_freq", "1",
        "--metrics.no-enable-tensorboard",
        "--checkpoint.no-enable",
        "--validation.no-enable",
    ]  # fmt: skip


def minimal_command(w: Workload) -> list[str]:
    """The command line of one minimal-loop run (this script in ``--_minimal`` mode)."""
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_minimal",
        "--config", w.config,
        "--flavor", w.flavor,
        "--local-batch-size", str(w.local_batch_size),
        "--seq-len", str(w.seq_len),
        "--steps", str(w.steps),
        "--warmup", str(w.warmup),
        "--threads", str(w.threads),
    ]  # fmt: skip


def run_checked(cmd: list[str], env: dict[str, str], timeout: float, what: str) -> str:
    """Run ``cmd`` in the repository root; its stdout (stderr merged) on success.

    Raises:
        RuntimeError: non-zero exit status or timeout, with the output's tail.
    """
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{what} timed out after {timeout:.0f}s: {shlex.join(cmd)}") from e
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        raise RuntimeError(
            f"{what} exited with status {proc.returncode}: {shlex.join(cmd)}\n{tail}"
        )
    return proc.stdout


def steady_state_from_metrics(
    records: list[dict[str, Any]], warmup: int
) -> tuple[float, int, float, list[float]]:
    """Steady-state throughput of a trainer run from its per-step metrics records.

    With ``log_freq = 1`` there is one record per step, and ``elapsed_sec`` is the wall time
    from the start of the training loop to the logging of that step. The timed window is
    therefore ``elapsed_sec[last] - elapsed_sec[warmup]`` (start 0 for warmup 0: the timer
    starts just before step 1): every loop iteration of steps warmup+1..last, data loading,
    the train step and the trainer's own per-step logging included, which is what the minimal
    loop times too. The tokens of the window are ``tokens_seen[last] - tokens_seen[warmup]``
    (tokens of all ranks; with one rank, this rank's). Throughput is total tokens / total
    time over the window, not the mean of the per-step ``tokens_per_sec`` values: a mean of
    rates over-weights the fast steps, whereas tokens / time weights every second equally
    (summing ``tokens_per_sec * dt`` over the records gives the same token count).

    Returns:
        (tokens/s, number of timed steps, timed seconds, each timed step's seconds).
    """
    by_step = {int(r["step"]): r for r in records}
    last = max(by_step)
    if last <= warmup:
        raise RuntimeError(f"only {last} steps logged, not more than warmup {warmup}")
    missing = [s for s in range(max(warmup, 1), last + 1) if s not in by_step]
    if missing:
        raise RuntimeError(f"metrics.jsonl lacks steps {missing[:5]} (log_freq not 1?)")
    start_sec = float(by_step[warmup]["elapsed_sec"]) if warmup > 0 else 0.0
    start_tokens = float(by_step[warmup]["tokens_seen"]) if warmup > 0 else 0.0
    seconds = float(by_step[last]["elapsed_sec"]) - start_sec
    tokens = float(by_step[last]["tokens_seen"]) - start_tokens
    ends = [start_sec] + [float(by_step[s]["elapsed_sec"]) for s in range(warmup + 1, last + 1)]
    step_sec = [b - a for a, b in itertools.pairwise(ends)]
    return tokens / seconds, last - warmup, seconds, step_sec


def run_trainer(w: Workload, env: dict[str, str], timeout: float) -> RunResult:
    """One trainer run in a temporary dump folder."""
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as dump:
        t0 = time.perf_counter()
        run_checked(trainer_command(w, dump), env, timeout, "train.py")
        wall = time.perf_counter() - t0
        train_records = sorted(read_metrics(dump), key=lambda r: int(r["step"]))
    tps, steps, seconds, step_sec = steady_state_from_metrics(train_records, w.warmup)
    losses = [float(r["loss"]) for r in train_records]
    tokens_per_step = round(tps * seconds / steps)
    return RunResult(tps, steps, seconds, losses, step_sec, tokens_per_step, wall)


def run_minimal(w: Workload, env: dict[str, str], timeout: float) -> RunResult:
    """One minimal-loop run; it prints its result as one JSON line, last on stdout."""
    t0 = time.perf_counter()
    out = run_checked(minimal_command(w), env, timeout, "minimal loop")
    wall = time.perf_counter() - t0
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"minimal loop printed no result:\n{out[-2000:]}")
    r = json.loads(lines[-1])
    return RunResult(
        float(r["tokens_per_sec"]),
        int(r["timed_steps"]),
        float(r["timed_sec"]),
        [float(x) for x in r["losses"]],
        [float(x) for x in r["step_sec"]],
        int(r["tokens_per_step"]),
        wall,
    )


# ----------------------------------------------------------------------------- minimal loop


def minimal_loop(w: Workload) -> dict[str, Any]:
    """The minimal loop (``torchtitan_ext.tools.reference_loop``: TorchTitan's unmodified model
    in a plain PyTorch loop) on the workload; returns its throughput and per-step losses."""
    from torchtitan_ext.config import load_config
    from torchtitan_ext.tools.reference_loop import reference_loop

    cfg = load_config([
        "--job.config_file", w.config,
        "--model.flavor", w.flavor,
        "--training.local_batch_size", str(w.local_batch_size),
        "--training.seq_len", str(w.seq_len),
        "--training.steps", str(w.steps),
    ])  # fmt: skip
    r = reference_loop(cfg, w.steps, threads=w.threads)
    # The timed window runs from the end of step `warmup` to the end of the last.
    ends = r.step_ends
    seconds = ends[-1] - ends[w.warmup]
    timed_steps = w.steps - w.warmup
    return {
        "tokens_per_sec": timed_steps * r.tokens_per_step / seconds,
        "timed_steps": timed_steps,
        "timed_sec": seconds,
        "losses": r.losses,
        "step_sec": [b - a for a, b in itertools.pairwise(ends[w.warmup :])],
        "tokens_per_step": r.tokens_per_step,
    }


# ----------------------------------------------------------------------------- driver


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line (``--_minimal`` is internal: the child process mode)."""
    p = argparse.ArgumentParser(
        description="tokens/s of train.py (1 rank) vs. a minimal PyTorch loop; target ratio "
        f">= {TARGET_RATIO}",
    )
    p.add_argument("--config", default="train_configs/debug_cpu.toml", help="recipe TOML")
    p.add_argument("--steps", type=int, default=150, help="training steps per run")
    p.add_argument("--warmup", type=int, default=10, help="first steps excluded from timing")
    p.add_argument("--repeats", type=int, default=3, help="runs per side (ABBA order)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS/torch threads of both sides (default 1, as torchrun sets per rank;"
        " on a shared 2-core machine multi-threaded timings swing by +-20%%)",
    )
    p.add_argument("--flavor", default=None, help="model flavor (default: the recipe's)")
    p.add_argument("--local-batch-size", type=int, default=None, help="default: the recipe's")
    p.add_argument("--seq-len", type=int, default=None, help="default: the recipe's")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--_minimal", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps <= args.warmup or args.warmup < 0:
        p.error("need 0 <= --warmup < --steps")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def resolve_workload(args: argparse.Namespace, recipe: Recipe, config: str) -> Workload:
    """The workload from the command line over the recipe's values."""
    threads = args.threads
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    return Workload(
        config=config,
        flavor=args.flavor or str(recipe.get("model", "flavor")),
        local_batch_size=args.local_batch_size or int(recipe.get("training", "local_batch_size")),
        seq_len=args.seq_len or int(recipe.get("training", "seq_len")),
        steps=args.steps,
        warmup=args.warmup,
        threads=threads,
        dtype=str(recipe.get("training", "dtype")),
    )


NOISE_TOLERANCE = 0.05
"""Spread of the per-repeat ratios, or shortfall of a run's tokens/s against its median-step
tokens/s, above which the report flags the measurement as noisy."""


def noise_notes(trainer: list[RunResult], minimal: list[RunResult]) -> list[str]:
    """Signs that other load on the machine distorted the ratio: repeats that disagree on it,
    or runs in which some steps were much slower than the typical step. (A drift that slows
    both runs of a repeat alike leaves the ratio alone, and the ABBA order cancels a steady
    one.)"""
    notes = []
    ratios = [t.tokens_per_sec / m.tokens_per_sec for t, m in zip(trainer, minimal, strict=True)]
    spread = max(ratios) - min(ratios)
    if spread > NOISE_TOLERANCE:
        notes.append(f"the per-repeat ratios differ by {spread:.3f}")
    for side, runs in (("trainer", trainer), ("minimal", minimal)):
        for i, r in enumerate(runs, start=1):
            shortfall = 1 - r.tokens_per_sec / r.median_step_tokens_per_sec
            if shortfall > NOISE_TOLERANCE:
                notes.append(
                    f"{side} #{i}: tokens/s {shortfall:.0%} below its median-step tokens/s "
                    "(some steps were slowed down)"
                )
    return notes


def print_report(
    w: Workload,
    trainer: list[RunResult],
    minimal: list[RunResult],
    argv: list[str],
    load: tuple[float, float],
) -> bool:
    """Print the results table, the ratio and the loss check with PASS/FAIL; True when both
    pass."""

    def row(name: str, tps: float, step_tps: float, timed: str = "", wall: str = "") -> None:
        print(f"{name:<16}{tps:>12,.0f}{step_tps:>18,.0f}{timed:>10}{wall:>9}")

    print()
    print(f"command: {shlex.join([sys.executable, sys.argv[0], *argv])}")
    print(
        f"workload: {Path(w.config).name}, flavor {w.flavor}, local batch {w.local_batch_size}"
        f" x seq_len {w.seq_len}, {w.dtype}, {w.threads} threads; steps {w.warmup + 1}..{w.steps}"
        f" of {w.steps} timed; units: tokens/s per rank"
    )
    print(f"1-min load average before / after: {load[0]:.2f} / {load[1]:.2f}")
    print()
    print(f"{'run':<16}{'tokens/s':>12}{'median-step tok/s':>18}{'timed s':>10}{'wall s':>9}")
    for i, (t, m) in enumerate(zip(trainer, minimal, strict=True), start=1):
        for name, r in ((f"trainer #{i}", t), (f"minimal #{i}", m)):
            row(
                name,
                r.tokens_per_sec,
                r.median_step_tokens_per_sec,
                f"{r.timed_sec:.2f}",
                f"{r.wall_sec:.1f}",
            )
    t_med = statistics.median(r.tokens_per_sec for r in trainer)
    m_med = statistics.median(r.tokens_per_sec for r in minimal)
    t_step = statistics.median(r.median_step_tokens_per_sec for r in trainer)
    m_step = statistics.median(r.median_step_tokens_per_sec for r in minimal)
    t_best = max(trainer, key=lambda r: r.tokens_per_sec)
    m_best = max(minimal, key=lambda r: r.tokens_per_sec)
    row("trainer median", t_med, t_step)
    row("minimal median", m_med, m_step)
    row("trainer best", t_best.tokens_per_sec, t_best.median_step_tokens_per_sec)
    row("minimal best", m_best.tokens_per_sec, m_best.median_step_tokens_per_sec)
    print()
    pair_ratios = [
        t.tokens_per_sec / m.tokens_per_sec for t, m in zip(trainer, minimal, strict=True)
    ]
    print("per-repeat ratios: " + ", ".join(f"{r:.3f}" for r in pair_ratios))
    # Other load only ever slows a run down, so on a busy machine the best run of each side
    # and the median step time are the better estimates of what each side can do.
    print(
        f"noise-robust ratios: best-of-repeats {t_best.tokens_per_sec / m_best.tokens_per_sec:.3f}"
        f", median-step {t_step / m_step:.3f}"
    )
    t_loss, m_loss = trainer[0].losses, minimal[0].losses
    losses_pass = len(t_loss) == len(m_loss)
    if losses_pass:
        diff = max(abs(a - b) for a, b in zip(t_loss, m_loss, strict=True))
        losses_pass = diff <= LOSS_TOLERANCE
        print(
            f"loss check (repeat 1, {len(t_loss)} steps): max |trainer - minimal| = {diff:.2e}"
            f" (final loss {t_loss[-1]:.4f} vs {m_loss[-1]:.4f}; tolerance {LOSS_TOLERANCE:.0e})"
            f": {'PASS' if losses_pass else 'FAIL'}"
        )
    else:
        print(f"loss check: step counts differ ({len(t_loss)} vs {len(m_loss)}): FAIL")
    notes = noise_notes(trainer, minimal)
    for note in notes:
        print(f"NOISY: {note}")
    if notes:
        print("NOISY: other load on the machine; re-run when it is idle, or with more --repeats")
    ratio = t_med / m_med
    verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
    print(f"ratio = trainer / minimal = {ratio:.3f}  (target >= {TARGET_RATIO}): {verdict}")
    return ratio >= TARGET_RATIO and losses_pass


def main(argv: list[str]) -> int:
    """Entry point; 0 when the ratio and the loss check pass, 1 otherwise (or a run crashed)."""
    args = parse_args(argv)
    config = resolve_config_path(args.config)
    recipe = Recipe(config)
    w = resolve_workload(args, recipe, config)
    if args._minimal:
        print(json.dumps(minimal_loop(w)), flush=True)
        return 0
    for warning in check_recipe(recipe):
        print(f"warning: {warning}", flush=True)
    env = clean_env(w.threads)
    load_before = os.getloadavg()[0]
    trainer: list[RunResult] = []
    minimal: list[RunResult] = []
    try:
        for i in range(args.repeats):
            # ABBA order: a slow drift of the machine's load biases neither side.
            order = ("trainer", "minimal") if i % 2 == 0 else ("minimal", "trainer")
            for side in order:
                print(f"repeat {i + 1}/{args.repeats}: {side} ...", end=" ", flush=True)
                if side == "trainer":
                    r = run_trainer(w, env, args.timeout)
                    trainer.append(r)
                else:
                    r = run_minimal(w, env, args.timeout)
                    minimal.append(r)
                print(f"{r.tokens_per_sec:,.0f} tokens/s", flush=True)
    except RuntimeError as e:
        print(f"\nbench_overhead: {e}", file=sys.stderr)
        return 1
    passed = print_report(w, trainer, minimal, argv, (load_before, os.getloadavg()[0]))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
