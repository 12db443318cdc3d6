"""Soak test for native aborts: launch the processes this project starts, many times, and count
the ones that die in native code (glibc heap checks, ``std::terminate``, a signal) or exit with
another status than their work's.

Kinds (each launched ``--runs`` times, one launch at a time; ``--launches`` for the parity group):
- ``parity``: the 8-rank parity group that used to crash (``dp_shard2xtp2xcp2``,
  ``pp2xtp2xcp2``, ``pp4xcp2@Interleaved1F1B``, ``tp2xcp4``, trained one after another in one
  launch, as ``scripts/parity_matrix.py`` runs them; no retry), each shape compared with the
  1-rank run;
- ``train_cp2``: ``train.py`` with context parallel 2 on 2 ranks (CP's functional collectives
  were the worst case for the teardown abort);
- ``bench_cp_memory``: the benchmark's memory and balance workers at cp 2;
- ``bench_pipeline``: the benchmark's spawned pipeline workers (P = 2, 1F1B).

    .venv/bin/python scripts/soak_native.py [--launches 20] [--runs 10] [--kinds ...]

Prints one line per launch and, per kind, the launches, native aborts and other failures;
exits 1 if any launch failed.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from torchtitan_ext.distributed import launch_env, torchrun_command
from torchtitan_ext.tools.parity import NATIVE_CRASH_MARKERS, native_crash, parse_shape, run_matrix

ROOT = Path(__file__).resolve().parent.parent
KEEP_DIR = Path(tempfile.gettempdir()) / "soak_native_failures"
"""Where the outputs of a failed parity launch are kept (the rest is deleted)."""
PARITY_GROUP = ["dp_shard2xtp2xcp2", "pp2xtp2xcp2", "pp4xcp2@Interleaved1F1B", "tp2xcp4"]


def _run(cmd: list[str], timeout: float) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(
        cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=timeout
    )


def _verdict(proc: "subprocess.CompletedProcess[str]") -> tuple[str, str]:
    """("ok" | "native" | "failed", detail) for a finished launch."""
    crash = native_crash(proc)
    if crash is not None or proc.returncode < 0:
        return "native", crash or f"killed by signal {-proc.returncode}"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        return "failed", f"exit {proc.returncode}: {tail[-1][:200] if tail else ''}"
    return "ok", ""


def soak_parity(tmp: Path) -> tuple[str, str]:
    """One launch of the parity group (and of its 1-rank reference), compared."""
    out = tmp / "parity"
    shutil.rmtree(out, ignore_errors=True)
    results = run_matrix([parse_shape(n) for n in PARITY_GROUP], out)
    bad = [r for r in results if r.status != "PASS"]
    if not bad:
        return "ok", ""
    kept = KEEP_DIR / f"parity-{time.strftime('%H%M%S')}"
    shutil.copytree(out, kept)
    detail = f"(logs: {kept}) " + "; ".join(f"{r.shape}: {r.status} {r.detail}" for r in bad)
    detail = detail[:400]
    native = any(m in r.detail for r in bad for m in (*NATIVE_CRASH_MARKERS, "launch exit -"))
    return ("native" if native else "failed"), detail


def soak_train_cp2(tmp: Path) -> tuple[str, str]:
    args = [
        "--job.config_file", str(ROOT / "train_configs" / "debug_cpu.toml"),
        "--job.dump_folder", str(tmp / "train_cp2"),
        "--model.flavor", "debugmodel_cpu_tiny", "--training.seq_len", "64",
        "--training.local_batch_size", "2", "--training.steps", "3",
        "--parallelism.context_parallel_degree", "2",
        "--validation.no-enable", "--checkpoint.no-enable", "--metrics.no-enable-tensorboard",
    ]  # fmt: skip
    return _verdict(_run(torchrun_command(2, [str(ROOT / "train.py"), *args]), 300))


def soak_bench_cp_memory(tmp: Path) -> tuple[str, str]:
    script = str(ROOT / "scripts" / "bench_cp_memory.py")
    for worker in ("memory", "balance"):
        out = tmp / f"cp_{worker}.json"
        out.unlink(missing_ok=True)
        cmd = torchrun_command(
            2, [script, "--_worker", worker, "--seq-len", "1024", "--out", str(out)]
        )
        verdict, detail = _verdict(_run(cmd, 300))
        if verdict == "ok" and not out.exists():
            verdict, detail = "failed", "no result written"
        if verdict != "ok":
            return verdict, f"{worker} worker: {detail}"
    return "ok", ""


def soak_bench_pipeline(tmp: Path) -> tuple[str, str]:
    cmd = [
        sys.executable, str(ROOT / "scripts" / "bench_pipeline.py"), "--pp", "2",
        "--schedules", "1F1B", "--steps", "1", "--warmup", "0", "--t-fwd-ms", "1",
    ]  # fmt: skip
    return _verdict(_run(cmd, 300))


KINDS: dict[str, Callable[[Path], tuple[str, str]]] = {
    "parity": soak_parity,
    "train_cp2": soak_train_cp2,
    "bench_cp_memory": soak_bench_cp_memory,
    "bench_pipeline": soak_bench_pipeline,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--launches", type=int, default=20, help="parity group launches (default 20)")
    ap.add_argument("--runs", type=int, default=10, help="launches of each other kind (10)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {list(KINDS)}")
    a = ap.parse_args()
    kinds = a.kinds.split(",")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        ap.error(f"unknown kinds {unknown}; known: {list(KINDS)}")
    counts: dict[str, dict[str, int]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="soak_native-") as tmp_dir:
        tmp = Path(tmp_dir)
        for kind in kinds:
            n = a.launches if kind == "parity" else a.runs
            c = counts.setdefault(kind, {"ok": 0, "native": 0, "failed": 0})
            for i in range(1, n + 1):
                verdict, detail = KINDS[kind](tmp)
                c[verdict] += 1
                print(f"[{time.perf_counter() - start:6.0f}s] {kind} {i}/{n}: {verdict} {detail}",
                      flush=True)  # fmt: skip
    print("\n| kind | launches | native aborts | other failures |")
    print("|---|---:|---:|---:|")
    for kind, c in counts.items():
        print(f"| {kind} | {sum(c.values())} | {c['native']} | {c['failed']} |")
    total_bad = sum(c["native"] + c["failed"] for c in counts.values())
    print(f"\n{total_bad} failed launches; {time.perf_counter() - start:.0f}s")
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())
