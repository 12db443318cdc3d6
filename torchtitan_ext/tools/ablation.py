"""Mesh-shape ablations: train a recipe on every valid mesh shape of N ranks for a few steps and
tabulate throughput, memory and the loss.

For a recipe and a world size, ``enumerate_shapes`` lists every factorization into (pp,
dp_replicate, dp_shard, tp, cp), in one or more mesh dim orders, and splits it into the shapes
that pass the config validation (heads, layers, sequence and batch divisibility...) and those
that do not (with the reason). ``sweep`` runs each valid shape with ``torchrun train.py`` on the
same global batch (so every shape sees the same tokens and the last-step losses must agree:
a free numerics check), reads ``metrics.jsonl`` and writes one row per shape to
``<out>/ablation.csv`` as soon as the shape finishes, so an interrupted sweep restarted with the
same ``--out`` skips the shapes it has. ``write_report`` adds a Markdown table sorted by
throughput and PNG plots (matplotlib).

Like nanotron's scaling-study generator and TorchTitan's hand-made mesh tables, but run from one
command: ``scripts/ablate_mesh.py``.
"""

import csv
import dataclasses
import itertools
import math
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchtitan_ext.config.manager import load_config
from torchtitan_ext.config.schema import MESH_DIM_NAMES
from torchtitan_ext.distributed import launch_env, torchrun_command
from torchtitan_ext.tools.parity import (
    ROOT,
    Shape,
    check_shape,
    factorizations,
    first_error_line,
    option_args,
    pattern_options,
    read_metrics,
)

ORDERS = ("auto", "cpinner", "tpinner")
"""Mesh dim orders a sweep can try: "auto" (``parallelism.mesh_dim_order = "auto"``, whatever the
recipe sets: cp innermost where this torch trains it with the shape's degrees, else tp innermost,
``torchtitan_ext.parallel_dims.auto_mesh_dim_order``; always cp innermost on torch 2.13),
"cpinner" (pp, dp_replicate, dp_shard, tp, cp), "tpinner" (pp, dp_replicate, dp_shard, cp, tp).
"""

AUTO_ORDER_ARGS = ("--parallelism.mesh_dim_order", "auto")
"""The recipe override of the "auto" order (the other orders are shape options)."""

LOSS_RTOL = 1e-3
"""Relative deviation of a shape's last-step loss from the median that flags its numerics."""


@dataclass
class Row:
    """One shape's result (a CSV row).

    Units: tokens_per_sec per rank (tokens/s), step_time_sec (s), peak_mem_mib (MiB, max over
    ranks), mfu_pct (% of peak, GPU only, else NaN).
    """

    shape: str
    order: str
    nproc: int
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    cp: int
    status: str  # ok | error | timeout
    tokens_per_sec: float = math.nan
    step_time_sec: float = math.nan
    peak_mem_mib: float = math.nan
    last_loss: float = math.nan
    mfu_pct: float = math.nan
    numerics: str = ""  # ok | DEVIATES (set by flag_numerics)
    detail: str = ""

    @property
    def key(self) -> str:
        return f"{self.shape}/{self.order}"


def progress_line(row: Row) -> str:
    """The sweep's line after a shape: ``    ok: 1,234 tokens/s/rank, 0.52 s/step`` or
    ``    error: <first error line>`` (no throughput that was not measured, no empty part)."""
    parts = []
    if row.status == "ok":
        parts.append(f"{row.tokens_per_sec:,.0f} tokens/s/rank")
        if math.isfinite(row.step_time_sec):
            parts.append(f"{row.step_time_sec:.2f} s/step")
    if row.detail:
        parts.append(row.detail)
    return f"    {row.status}: {', '.join(parts)}" if parts else f"    {row.status}"


def _with_order(shape: Shape, order: str) -> Shape:
    """``shape`` with the option of ``order`` ("cpinner", "tpinner"); "auto" has none (its
    override is ``AUTO_ORDER_ARGS``), so its rows keep the plain shape name."""
    if order == "auto":
        return shape
    return dataclasses.replace(shape, options=(*shape.options, order))


def shape_args(
    recipe: Path,
    shape: Shape,
    out: Path,
    steps: int,
    global_batch: int,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """CLI overrides that train ``recipe`` on ``shape`` for ``steps`` steps with a fixed global
    batch (the recipe's local batch per microbatch; gradient accumulation fills the rest), then
    ``extra`` recipe overrides."""
    return [
        "--job.config_file", str(recipe),
        "--job.dump_folder", str(out / "runs" / f"{shape.name}"),
        "--training.steps", str(steps),
        "--training.global_batch_size", str(global_batch),
        "--metrics.log_freq", "1",
        "--metrics.no-enable-tensorboard",
        "--validation.no-enable",
        "--checkpoint.no-enable",
        *shape.args(),
        *extra,
    ]  # fmt: skip


def global_batch_for(recipe: Path, nproc: int, extra: tuple[str, ...] = ()) -> int:
    """The sweep's global batch: the recipe's, or its local batch x the world size."""
    cfg = load_config(["--job.config_file", str(recipe), *extra])
    g = int(cfg.training.global_batch_size)
    return g if g != -1 else int(cfg.training.local_batch_size) * nproc


def enumerate_shapes(
    recipe: Path,
    nproc: int,
    out: Path,
    steps: int,
    orders: tuple[str, ...] = ("auto",),
    fixed: dict[str, int] | None = None,
    max_degree: dict[str, int] | None = None,
    extra: tuple[str, ...] = (),
    cp_patterns: tuple[str, ...] = ("ring",),
    training: bool = True,
) -> tuple[list[tuple[Shape, str, list[str]]], list[tuple[Shape, str, str]]]:
    """Every factorization of ``nproc`` (filtered by ``fixed`` degrees and ``max_degree``), in
    each of ``orders`` (``ORDERS``), with ``extra`` recipe overrides; shapes with cp > 1 once
    per context-parallel pattern in ``cp_patterns`` (``cp_patterns.PATTERNS``) and degree
    (``parity.pattern_options``: "+ulysses", "+hybrid<u>", "+dring<n>"; the ring unmarked).
    A shape is valid when train.py would run it here (``parity.check_shape``); with
    ``training=False`` (a dry run), when its recipe and mesh pass (the trainer's and this
    machine's rules left out: a dry run plans TorchTitan's own GPU recipes on a CPU).

    Returns:
        (valid, invalid): valid as (shape, order, CLI args); invalid as (shape, order, the
        config error that rules it out).
    """
    fixed, max_degree = fixed or {}, max_degree or {}
    g = global_batch_for(recipe, nproc, extra)
    valid: list[tuple[Shape, str, list[str]]] = []
    invalid: list[tuple[Shape, str, str]] = []
    for base in factorizations(nproc):
        d = {n: base.degrees.get(n, 1) for n in MESH_DIM_NAMES}
        if any(d[k] != v for k, v in fixed.items()) or any(d[k] > v for k, v in max_degree.items()):
            continue
        variants = [
            dataclasses.replace(base, options=(*base.options, o)) if o else base
            for o in pattern_options(d["cp"])
            if _pattern_of(o) in cp_patterns
        ]
        for variant, order in itertools.product(variants, orders):
            shape = _with_order(variant, order)
            order_args = AUTO_ORDER_ARGS if order == "auto" else ()
            args = shape_args(recipe, shape, out, steps, g, (*order_args, *extra))
            why = check_shape(shape, args, training)
            if why is None:
                valid.append((shape, order, args))
            else:
                invalid.append((shape, order, why))
    return valid, invalid


def _pattern_of(option: str) -> str:
    """The ``cp_patterns`` name of a ``pattern_options`` option ("" is the ring), read from
    the recipe overrides the option stands for."""
    args = option_args(option) or [] if option else []
    key = "--parallelism.context_parallel_pattern"
    return args[args.index(key) + 1] if key in args else "ring"


def run_shape(shape: Shape, order: str, args: list[str], warmup: int, timeout: float) -> Row:
    """Train one shape under torchrun and summarize its ``metrics.jsonl`` (steps after
    ``warmup`` for the timings)."""
    g = shape.degrees.get
    row = Row(
        shape.name, order, shape.nproc, g("pp", 1), g("dp_replicate", 1), g("dp_shard", 1),
        g("tp", 1), g("cp", 1), status="error",
    )  # fmt: skip
    dump = Path(args[args.index("--job.dump_folder") + 1])
    if (dump / "metrics.jsonl").exists():
        (dump / "metrics.jsonl").unlink()  # a partial run of an interrupted sweep
    cmd = torchrun_command(shape.nproc, [str(ROOT / "train.py"), *args])
    env = launch_env()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        row.status, row.detail = "timeout", f"no result within {timeout:.0f}s"
        return row
    if proc.returncode != 0:
        row.detail = first_error_line(proc)[:300]
        return row
    records = read_metrics(dump)
    if not records:
        row.detail = "no metrics written"
        return row
    timed = [r for r in records if r["step"] > warmup] or records[-1:]
    by_step = {r["step"]: r for r in records}
    step_times = [
        r["elapsed_sec"] - by_step[r["step"] - 1]["elapsed_sec"]
        for r in timed
        if r["step"] - 1 in by_step
    ]
    row.status = "ok"
    row.tokens_per_sec = statistics.fmean(r["tokens_per_sec"] for r in timed)
    row.step_time_sec = statistics.fmean(step_times) if step_times else math.nan
    row.peak_mem_mib = max(r["peak_mem_mib"] for r in records)
    row.last_loss = records[-1]["loss"]
    if "mfu_pct" in timed[0]:
        row.mfu_pct = statistics.fmean(r["mfu_pct"] for r in timed)
    return row


def flag_numerics(rows: list[Row]) -> None:
    """Mark each ok row's last loss against the median of all ok rows (same global batch and
    initial model: they must agree up to fp rounding)."""
    ok = [r for r in rows if r.status == "ok"]
    if not ok:
        return
    median = statistics.median(r.last_loss for r in ok)
    for r in ok:
        dev = abs(r.last_loss - median) / max(abs(median), 1e-12)
        r.numerics = "ok" if dev <= LOSS_RTOL else f"DEVIATES ({dev:.1e})"


def read_csv(path: Path) -> list[Row]:
    """Rows of an earlier (possibly interrupted) sweep; [] if none."""
    if not path.exists():
        return []
    types = {f.name: f.type for f in dataclasses.fields(Row)}
    rows = []
    with path.open() as f:
        for raw in csv.DictReader(f):
            values: dict[str, Any] = {}
            for k, v in raw.items():
                t = types[k]
                values[k] = (
                    int(v) if t in (int, "int") else float(v) if t in (float, "float") else v
                )
            rows.append(Row(**values))
    return rows


def write_csv(path: Path, rows: list[Row]) -> None:
    """Write all rows (atomically: a crash never leaves a half-written CSV)."""
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[x.name for x in dataclasses.fields(Row)])
        w.writeheader()
        for r in rows:
            w.writerow(dataclasses.asdict(r))
    os.replace(tmp, path)


def sweep(
    recipe: Path,
    nproc: int,
    out: Path,
    steps: int = 4,
    warmup: int = 1,
    orders: tuple[str, ...] = ("auto",),
    fixed: dict[str, int] | None = None,
    max_degree: dict[str, int] | None = None,
    timeout: float = 600,
    log: Callable[[str], None] = print,
    cp_patterns: tuple[str, ...] = ("ring",),
) -> tuple[list[Row], list[tuple[Shape, str, str]]]:
    """Run every valid shape (``enumerate_shapes``) not already in ``<out>/ablation.csv``;
    returns (rows, invalid)."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "ablation.csv"
    valid, invalid = enumerate_shapes(
        recipe, nproc, out, steps, orders, fixed, max_degree, cp_patterns=cp_patterns
    )
    rows = read_csv(csv_path)
    done = {r.key for r in rows}
    todo = [(s, o, a) for s, o, a in valid if f"{s.name}/{o}" not in done]
    log(
        f"{len(valid)} valid shapes ({len(invalid)} invalid), {len(valid) - len(todo)} already "
        f"in {csv_path}, {len(todo)} to run"
    )
    t0 = time.perf_counter()
    for i, (shape, order, args) in enumerate(todo):
        elapsed = time.perf_counter() - t0
        eta = f"{elapsed / i * (len(todo) - i):.0f}s" if i else "?"
        log(f"[{i + 1}/{len(todo)}] {shape.name} ({order})  elapsed {elapsed:.0f}s  eta {eta}")
        row = run_shape(shape, order, args, warmup, timeout)
        log(progress_line(row))
        rows.append(row)
        write_csv(csv_path, rows)
    flag_numerics(rows)
    write_csv(csv_path, rows)
    return rows, invalid


def markdown_table(rows: list[Row], invalid: list[tuple[Shape, str, str]]) -> str:
    """Rows sorted by throughput (best first, marked), failures last, then the invalid shapes."""
    ok = sorted((r for r in rows if r.status == "ok"), key=lambda r: -r.tokens_per_sec)
    failed = [r for r in rows if r.status != "ok"]
    lines = [
        "| | shape | order | tokens/s/rank | step s | peak MiB | last loss | numerics | status |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for i, r in enumerate(ok + failed):
        best = "**best**" if i == 0 and r.status == "ok" else ""
        status = r.status if not r.detail else f"{r.status}: {r.detail}"
        lines.append(
            f"| {best} | {r.shape} | {r.order} | {r.tokens_per_sec:,.0f} | {r.step_time_sec:.3f} | "
            f"{r.peak_mem_mib:,.0f} | {r.last_loss:.4f} | {r.numerics} | {status} |"
        )
    if invalid:
        lines += ["", "Invalid for this recipe and world size:", ""]
        lines += [f"- {s.name} ({o}): {why}" for s, o, why in invalid]
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    """Two horizontal bar charts (tokens/s per rank, peak memory per rank) of the ok shapes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = sorted((r for r in rows if r.status == "ok"), key=lambda r: r.tokens_per_sec)
    labels = [f"{r.shape} ({r.order})" if r.order != "auto" else r.shape for r in ok]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.35 * len(ok) + 1.5), sharey=True)
    ax1.barh(labels, [r.tokens_per_sec for r in ok], color="tab:blue")
    ax1.set_xlabel("tokens/s per rank")
    ax2.barh(labels, [r.peak_mem_mib for r in ok], color="tab:orange")
    ax2.set_xlabel("peak memory per rank (MiB)")
    fig.suptitle("mesh-shape ablation")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(rows: list[Row], invalid: list[tuple[Shape, str, str]], out: Path) -> list[Path]:
    """``<out>/ablation.md``, and ``<out>/ablation.png`` when some shape trained; returns the
    files written."""
    written = [out / "ablation.md"]
    written[0].write_text(markdown_table(rows, invalid) + "\n")
    if any(r.status == "ok" for r in rows):
        plot(rows, out / "ablation.png")
        written.append(out / "ablation.png")
    return written


@dataclass
class PlanRow:
    """One shape of a dry-run sweep (``dry_run_sweep``): the worst of its first- and last-stage
    ranks.

    Attributes:
        peak_gib: estimated memory per device (parameters, gradients, optimizer state,
            activations), GiB; fits: within the budget.
        comm_gib: estimated bytes sent per rank per step by kind (``COMM_KINDS``), GiB, for the
            rank that sends the most; total_comm_gib: their sum.
        cp_inter_node_gib: the part of that rank's cp traffic that crosses nodes, GiB.
    """

    shape: str
    order: str
    degrees: dict[str, int]
    peak_gib: float
    fits: bool
    comm_gib: dict[str, float]
    cp_inter_node_gib: float = 0.0

    @property
    def total_comm_gib(self) -> float:
        return sum(self.comm_gib.values())


def dry_run_sweep(
    valid: list[tuple[Shape, str, list[str]]], nproc: int, budget_gib: float,
    ranks_per_node: int = 8,
) -> list[PlanRow]:  # fmt: skip
    """Plan every valid shape with the dry run (``dry_run.plan_rank`` on torch's
    fake process group, ranks of the first and last pipeline stage) and rank them: shapes within
    ``budget_gib`` first, by estimated bytes sent per rank per step (ties: fewer cp bytes
    across nodes, for ``ranks_per_node`` ranks per node), then the rest by memory.
    """
    from torchtitan_ext.tools.dry_run import GIB, plan_rank, stage_ranks
    from torchtitan_ext.validate import validate

    rows = []
    for shape, order, args in valid:
        cfg = load_config(args)
        dims = validate(cfg, nproc)
        assert dims is not None
        ranks = stage_ranks(dims)
        plans = [
            plan_rank(cfg, nproc, r, ranks_per_node=ranks_per_node)
            for r in sorted({ranks[0], ranks[-1]})
        ]
        peak = max(p.total_bytes for p in plans) / GIB
        busiest = max(plans, key=lambda p: sum(p.comm_bytes.values()))
        comm = {k: v / GIB for k, v in busiest.comm_bytes.items()}
        degrees = {n: shape.degrees.get(n, 1) for n in MESH_DIM_NAMES}
        inter = busiest.cp_inter_node_bytes / GIB
        rows.append(PlanRow(shape.name, order, degrees, peak, peak <= budget_gib, comm, inter))
    return sorted(
        rows,
        key=lambda r: (
            not r.fits,
            round(r.total_comm_gib, 6) if r.fits else r.peak_gib,
            r.cp_inter_node_gib,
        ),
    )


def plan_table(rows: list[PlanRow], budget_gib: float) -> str:
    """Markdown table of a dry-run sweep, best shape marked."""
    from torchtitan_ext.tools.comm_estimate import COMM_KINDS

    lines = [
        f"| shape | order | memory GiB/device | fits {budget_gib:g} GiB | comm GiB/step/rank "
        "| " + " | ".join(COMM_KINDS) + " | cp inter-node |",
        "|---|---|---:|---|---:|" + "---:|" * (len(COMM_KINDS) + 1),
    ]
    for i, r in enumerate(rows):
        best = " **best**" if i == 0 and r.fits else ""
        lines.append(
            f"| {r.shape}{best} | {r.order} | {r.peak_gib:.1f} | {'yes' if r.fits else 'NO'} | "
            f"{r.total_comm_gib:.1f} | "
            + " | ".join(f"{r.comm_gib[k]:.1f}" for k in COMM_KINDS)
            + f" | {r.cp_inter_node_gib:.1f} |"
        )
    return "\n".join(lines)
