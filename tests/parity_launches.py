"""The default suite's two parity matrices (tests/test_parity.py, causal, and
tests/test_block_causal_parity.py, document-masked) in shared launches: one launch per rank
count for both, since starting the ranks is what costs here (8 ranks: ~25 s on 2 cores), not
the shapes. Each matrix keeps its own recipe, folder and 1-rank reference, and is compared
exactly as ``torchtitan_ext.tools.parity.run_matrix`` compares it.
"""

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from torchtitan_ext.distributed import launch_env, torchrun_command
from torchtitan_ext.metrics import read_metrics
from torchtitan_ext.tools.parity import (
    MAX_SHAPES_PER_LAUNCH,
    ROOT,
    Result,
    Shape,
    base_args,
    check_shape,
    compare,
    first_error_line,
    native_crash,
    parse_shape,
    shape_run_args,
)

GLOBAL_BATCH = 8
STEPS = 3
SEQ_LEN = 128
TIMEOUT = 120.0  # per shape of a launch, as run_matrix's


@dataclass
class Matrix:
    """One matrix: its shapes' names, its folder and its recipe overrides (run_matrix's
    ``out`` and ``extra``)."""

    shapes: list[str]
    out: Path
    flavor: str
    extra: list[str]

    def base(self) -> list[str]:
        return base_args(GLOBAL_BATCH, STEPS, self.flavor, SEQ_LEN) + self.extra

    def args(self, shape: Shape) -> list[str]:
        return shape_run_args(shape, self.base(), self.out, GLOBAL_BATCH)


def _launch(runs: list[tuple[Matrix, Shape]]) -> "subprocess.CompletedProcess[str]":
    """The shapes of ``runs`` (one rank count) in turn in one launch of
    ``torchtitan_ext.tools.parity --worker``; its output goes to ``launch-<n>-<shape>.log`` in
    the folder of every matrix that has a shape in it."""
    nproc = runs[0][1].nproc
    first = runs[0][0].out / f"launch-{nproc}-{runs[0][1].name}"
    payload = first.with_suffix(".json")
    payload.write_text(json.dumps([m.args(s) for m, s in runs]))
    entry = ["-m", "torchtitan_ext.tools.parity", "--worker", str(payload)]
    if nproc == 1:
        cmd = [sys.executable, *entry]
    else:
        cmd = torchrun_command(nproc, ["--no-python", sys.executable, *entry])
    timeout = TIMEOUT * (1 + len(runs))
    proc = subprocess.run(
        cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=timeout
    )
    for out in {m.out for m, _ in runs}:
        (out / f"launch-{nproc}-{runs[0][1].name}.log").write_text(proc.stdout + proc.stderr)
    return proc


def run_matrices(matrices: dict[str, Matrix]) -> dict[str, dict[str, Result]]:
    """Validate, run and compare every matrix's shapes against its own 1-rank reference, the
    shapes of all matrices with the same number of ranks in one launch (at most
    ``MAX_SHAPES_PER_LAUNCH`` each).

    Returns:
        Per matrix name, its Results by shape name.
    """
    single = Shape({})
    results: dict[str, dict[str, Result]] = {name: {} for name in matrices}
    by_nproc: dict[int, list[tuple[str, Shape]]] = {1: [(n, single) for n in matrices]}
    for name, m in matrices.items():
        m.out.mkdir(parents=True, exist_ok=True)
        for s in map(parse_shape, m.shapes):
            why = check_shape(s, m.args(s))
            if why is not None:
                results[name][s.name] = Result(s.name, s.nproc, "SKIP", detail=why)
            else:
                by_nproc.setdefault(s.nproc, []).append((name, s))
    errors: dict[tuple[str, str], str] = {}
    for _, group in sorted(by_nproc.items()):
        for i in range(0, len(group), MAX_SHAPES_PER_LAUNCH):
            runs = group[i : i + MAX_SHAPES_PER_LAUNCH]
            try:
                proc = _launch([(matrices[n], s) for n, s in runs])
            except subprocess.TimeoutExpired:
                for n, s in runs:
                    errors[(n, s.name)] = f"launch timed out after {TIMEOUT * (1 + len(runs))}s"
                continue
            if proc.returncode != 0:
                why = native_crash(proc) or first_error_line(proc)
                for n, s in runs:
                    errors[(n, s.name)] = f"launch exit {proc.returncode}: {why}"
    for name, m in matrices.items():
        ref = m.out / single.name
        if not read_metrics(ref):
            why = errors.get((name, single.name))
            raise RuntimeError(f"{name}: the 1-rank reference produced no metrics: {why}")
        masked = "block_causal" in m.extra
        for s in map(parse_shape, m.shapes):
            if s.name in results[name]:
                continue
            res = compare(s, m.out / s.name, ref, masked)
            if (name, s.name) in errors and res.status != "PASS":
                res = Result(s.name, s.nproc, "ERROR", detail=errors[(name, s.name)][-300:])
            results[name][s.name] = res
    return results
