"""Mesh-shape ablation: train a recipe on every valid mesh shape of N ranks for a few steps and
compare throughput, memory and the loss.

    .venv/bin/python scripts/ablate_mesh.py --job.config_file train_configs/debug_cpu.toml \\
        --world_size 8
    .venv/bin/python scripts/ablate_mesh.py --job.config_file my.toml --world_size 8 --fixed pp=1 \\
        --max tp=4 --orders cpinner,tpinner --steps 6 --warmup 2

Writes ``<out>/ablation.csv`` (one row per shape, written as each finishes: rerun with the same
``--out`` to resume an interrupted sweep), ``ablation.md`` (sorted by tokens/s per rank, best
marked, failed shapes with their first error line, invalid shapes with the config error that
rules them out) and ``ablation.png``. Every shape trains the same global batch from the same
initial model, so their last-step losses must agree; a shape that deviates by more than 1e-3
relative is flagged in the ``numerics`` column (exit status 1).

With ``--dry-run`` nothing trains: each valid shape of a world size this machine does not have
is planned on torch's fake process group (``scripts/plan.py``'s dry run) and the shapes that fit
``--budget-gib`` per device are ranked by estimated bytes sent per rank per step (ties: fewer
cp bytes across nodes). ``--cp-patterns all`` tries every context-parallel pattern and degree
on each shape with cp > 1. Arguments after the options are recipe overrides for every shape:

    .venv/bin/python scripts/ablate_mesh.py --dry-run --world_size 256 --budget-gib 80 \\
        --job.config_file train_configs/llama3_8b_curriculum_1m.toml --training.seq_len 131072
"""

import argparse
import sys
from pathlib import Path

from torchtitan_ext.config.manager import WORLD_SIZE_FLAGS, ConfigError, load_config
from torchtitan_ext.config.schema import MESH_DIM_NAMES
from torchtitan_ext.parallel.cp_patterns import PATTERNS
from torchtitan_ext.tools.ablation import (
    ORDERS,
    dry_run_sweep,
    enumerate_shapes,
    plan_table,
    sweep,
    write_report,
)


def _degrees(text: str | None, flag: str, ap: argparse.ArgumentParser) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in filter(None, (text or "").split(",")):
        name, _, value = part.partition("=")
        if name not in MESH_DIM_NAMES or not value.isdigit():
            ap.error(
                f"{flag}: expected dim=degree with dim in {', '.join(MESH_DIM_NAMES)}: {part!r}"
            )
        out[name] = int(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line: every option's help text ends with its default."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--job.config_file", "--config", dest="config", type=Path, required=True,
        metavar="RECIPE", help="the recipe (TOML); --config is the older spelling",
    )  # fmt: skip
    ap.add_argument(
        *WORLD_SIZE_FLAGS, dest="nproc", type=int, required=True, metavar="N",
        help="world size: ranks of every shape (--nproc is the older spelling)",
    )  # fmt: skip
    ap.add_argument(
        "--out", type=Path, metavar="DIR",
        help="output folder (default: outputs/ablation/<recipe>-<world size>)",
    )  # fmt: skip
    ap.add_argument(
        "--steps", type=int, default=4, metavar="N",
        help="training steps per shape (default: %(default)s)",
    )  # fmt: skip
    ap.add_argument(
        "--warmup", type=int, default=1, metavar="N",
        help="first steps left out of the timings (default: %(default)s)",
    )  # fmt: skip
    ap.add_argument(
        "--orders", default="auto", metavar="LIST",
        help=f"comma list of {', '.join(ORDERS)} (default: %(default)s)\n"
        "auto: mesh_dim_order = \"auto\" (cp innermost where this torch trains it,\n"
        "  else tp innermost; not the recipe's order)\n"
        "cpinner: pp,dp_replicate,dp_shard,tp,cp\n"
        "tpinner: pp,dp_replicate,dp_shard,cp,tp",
    )  # fmt: skip
    ap.add_argument(
        "--fixed", metavar="DIM=N,...",
        help="degrees every shape must have, e.g. pp=1,tp=2 (default: none)",
    )  # fmt: skip
    ap.add_argument(
        "--max", metavar="DIM=N,...",
        help="largest degrees to try, e.g. cp=4 (default: none: up to the world size)",
    )  # fmt: skip
    ap.add_argument(
        "--timeout", type=float, default=600, metavar="SECONDS",
        help="seconds per shape before it counts as a timeout (default: %(default)s)",
    )  # fmt: skip
    ap.add_argument(
        "--dry-run", action="store_true",
        help="plan instead of train: rank shapes by estimated communication (fake process\n"
        "group; default: train every shape)",
    )  # fmt: skip
    ap.add_argument(
        "--budget-gib", type=float, default=80, metavar="GIB",
        help="memory per device in GiB (--dry-run): shapes whose planned peak fits it are\n"
        "ranked first, by communication, the rest after them (default: %(default)s)",
    )  # fmt: skip
    ap.add_argument(
        "--cp-patterns", default="ring", metavar="LIST",
        help=f"comma list of {', '.join(PATTERNS)}, or all (default: %(default)s):\n"
        "each shape with cp > 1 once per pattern and degree\n"
        "(hybrid / double_ring: every inner degree 2 .. cp / 2)",
    )  # fmt: skip
    ap.add_argument(
        "--ranks-per-node", type=int, default=8, metavar="N",
        help="consecutive ranks per node, for the cp inter-node column (--dry-run)\n"
        "(default: %(default)s)",
    )  # fmt: skip
    return ap


def main() -> int:
    """Run the sweep (or the dry-run ranking) the command line asks for; the exit status."""
    ap = build_parser()
    a, extra = ap.parse_known_args()
    if extra and not a.dry_run:
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    orders = tuple(o.strip() for o in a.orders.split(","))
    if any(o not in ORDERS for o in orders):
        ap.error(f"--orders: choose from {', '.join(ORDERS)}")
    patterns = PATTERNS if a.cp_patterns == "all" else tuple(a.cp_patterns.split(","))
    if any(p not in PATTERNS for p in patterns):
        ap.error(f"--cp-patterns: choose from {', '.join(PATTERNS)}, or all")
    if a.steps <= a.warmup:
        ap.error("--steps must be larger than --warmup")
    try:
        if load_config(["--job.config_file", str(a.config)]).curriculum.stages:
            ap.error(
                f"{a.config} has [[curriculum.stages]]: a sweep trains one mesh per shape, a "
                "curriculum changes it per stage; sweep a recipe without the curriculum (set "
                "training.seq_len to the stage's length)"
            )
    except ConfigError as e:
        ap.error(f"config error: {e}")
    out = a.out or Path("outputs/ablation") / f"{a.config.stem}-{a.nproc}"
    fixed, max_degree = _degrees(a.fixed, "--fixed", ap), _degrees(a.max, "--max", ap)
    if a.dry_run:
        valid, invalid = enumerate_shapes(
            a.config, a.nproc, out, a.steps, orders, fixed, max_degree, tuple(extra), patterns,
            training=False,
        )  # fmt: skip
        print(f"{len(valid)} valid shapes, {len(invalid)} invalid; planning...", flush=True)
        plan_rows = dry_run_sweep(valid, a.nproc, a.budget_gib, a.ranks_per_node)
        table = plan_table(plan_rows, a.budget_gib)
        out.mkdir(parents=True, exist_ok=True)
        (out / "dry_run.md").write_text(table + "\n")
        print(table)
        print(f"wrote {out}/dry_run.md")
        return 0
    rows, invalid = sweep(
        a.config,
        a.nproc,
        out,
        steps=a.steps,
        warmup=a.warmup,
        orders=orders,
        fixed=fixed,
        max_degree=max_degree,
        timeout=a.timeout,
        log=lambda m: print(m, flush=True),
        cp_patterns=patterns,
    )
    written = write_report(rows, invalid, out)
    print((out / "ablation.md").read_text())
    print(f"wrote {out / 'ablation.csv'}, " + ", ".join(str(p) for p in written))
    bad = [r for r in rows if r.numerics.startswith("DEVIATES")]
    if not any(r.status == "ok" for r in rows):
        print("error: no shape trained (see the status column)", file=sys.stderr)
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
