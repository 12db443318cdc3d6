"""The parity matrix: every mesh shape of N ranks trains the same model as 1 rank.

By default: every factorization of 8 ranks into (pp, dp_replicate, dp_shard, tp, cp), each
pipeline schedule on pp 2 and the interleaved ones on pp 4, each context-parallel pattern
(Ulysses, hybrid, double ring) with TP, PP and FSDP, and the 16-rank 4D shape
pp2 x dp_shard2 x tp2 x cp2 with the ring and with Ulysses. Each shape trains the debug
recipe (``debugmodel_cpu_deep``, seq 128, global batch 8, fp32) for 5 steps; the table gives
the relative deviation of its losses and grad norms from the 1-rank run: PASS when step 1 is
within 1e-5 and every step within 5e-4, every parameter's step-1 gradient within 1e-5 of its
largest element, and the step-1 grad norm the same on all ranks (the "step-1 grads dev"
column; ``parity.grad_deviation``). Shapes invalid for the recipe are listed as SKIP with
the config error that rules them out. Shapes with the same rank count share one launch
(``torchtitan_ext.tools.parity``). Exit status 1 if any shape fails.

    .venv/bin/python scripts/parity_matrix.py     # the full matrix (~18 min here: 733 + 348 s)
    .venv/bin/python scripts/parity_matrix.py --shapes pp2xtp2xcp2,tp2xcp4 --no-4d
"""

import argparse
import sys
import time
from pathlib import Path

from torchtitan_ext.config.manager import WORLD_SIZE_FLAGS
from torchtitan_ext.tools.parity import (
    Shape,
    factorizations,
    format_table,
    parse_shape,
    run_matrix,
)

SCHEDULE_SHAPES = [
    "pp2xdp_shard4@GPipe",
    "pp2xdp_shard4@LoopedBFS",
    "pp2xdp_shard4@Interleaved1F1B",
    "pp2xdp_shard4@InterleavedZeroBubble",
    "pp2xdp_shard4@ZBVZeroBubble",
    "pp2xtp2xcp2@DualPipeV",
    "pp4xcp2@Interleaved1F1B",
    "pp4xdp_shard2@ZBVZeroBubble",
    "dp_shard2xcp4+alltoall+nolb",
    "tp2xcp4+nolossparallel",
]
# Context-parallel patterns (ring is every other cp shape): each with TP, PP and FSDP.
PATTERN_SHAPES = [
    "cp8+ulysses",
    "cp8+hybrid2",
    "cp8+dring2",
    "dp_shard2xtp2xcp2+ulysses",
    "pp2xtp2xcp2+ulysses",
    "dp_shard2xcp4+hybrid2",
    "tp2xcp4+hybrid2",
    "pp2xcp4+hybrid2+nolb",
    "dp_shard2xcp4+dring2",
    "tp2xcp4+dring2+alltoall",
    "pp2xcp4+dring2",
]
SHAPE_4D = "pp2xdp_shard2xtp2xcp2"
SHAPES_4D = [SHAPE_4D, SHAPE_4D + "+ulysses"]


def default_shapes(nproc: int, with_4d: bool) -> list[Shape]:
    shapes = factorizations(nproc)
    if nproc == 8:
        shapes += [parse_shape(n) for n in SCHEDULE_SHAPES + PATTERN_SHAPES]
    if with_4d:
        shapes += [parse_shape(n) for n in SHAPES_4D]
    return shapes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        *WORLD_SIZE_FLAGS, dest="nproc", type=int, default=8, metavar="N",
        help="world size: ranks for the factorizations (default: %(default)s; --nproc is the\n"
        "older spelling)",
    )  # fmt: skip
    ap.add_argument("--shapes", help="comma-separated shape names instead of the default set")
    ap.add_argument("--no-4d", action="store_true", help=f"skip the 16-rank {SHAPE_4D}")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("outputs/parity_matrix"))
    a = ap.parse_args()
    if a.shapes:
        try:
            shapes = [parse_shape(n) for n in a.shapes.split(",")]
        except ValueError as e:
            ap.error(str(e))
    else:
        shapes = default_shapes(a.nproc, not a.no_4d)
    t0 = time.perf_counter()
    print(f"{len(shapes)} shapes; outputs in {a.out}", flush=True)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:5.0f}s] {msg}", flush=True)

    results = run_matrix(shapes, a.out, steps=a.steps, log=log)
    table = format_table(results)
    print(table)
    (a.out / "parity.md").write_text(table + "\n")
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "ERROR", "SKIP")}
    print(
        f"{counts['PASS']} pass, {counts['FAIL']} fail, {counts['ERROR']} error, "
        f"{counts['SKIP']} skipped (invalid for the recipe) in {time.perf_counter() - t0:.0f}s"
    )
    return 1 if counts["FAIL"] or counts["ERROR"] else 0


if __name__ == "__main__":
    sys.exit(main())
