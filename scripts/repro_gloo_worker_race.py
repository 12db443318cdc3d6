"""Minimal torch-only reproduction of the gloo heap corruption behind "malloc(): unaligned tcache
chunk detected", and an A/B of our fix (``torchtitan_ext.distributed.use_single_worker_gloo``).

torch's ``ProcessGroupGloo::runLoop`` (torch/csrc/distributed/c10d/ProcessGroupGloo.cpp) runs
two worker threads per group and, after each collective, assigns
``pgStatus_->lastCompletedWorkName`` (a ``std::string``) without holding the group's lock. Each
iteration here keeps two collectives in flight on one gloo group, as context parallel's ring
backward does on the cp group: a functional all-gather (gloo's ALLGATHER_COALESCED, a name
longer than the 15-character small-string buffer, so it lives on the heap) and a functional
permute (ALLTOALL, stored inline). When both finish together, one worker frees the heap buffer
while the other copies into it; glibc aborts at a later allocation in any thread, or the heap
is corrupted silently. Busy-loop processes widen the window, as a loaded machine does.

    .venv/bin/python scripts/repro_gloo_worker_race.py [--launches 8] [--iters 20000] [--load 2]

Each launch is 2 ranks under torchrun; the script alternates launches with torch's default
(2 worker threads per group) and with ``use_single_worker_gloo`` (1), and prints how many of
each died of a native abort; it exits 1 if a single-worker launch failed. Run it on an
otherwise idle machine; about 1 minute per pair.
A single rank (``--_rank_body``) imports nothing from torchtitan_ext unless ``--single-worker``.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NATIVE_MARKERS = ("malloc", "free()", "corrupted", "double free", "SIGABRT", "SIGSEGV", "Signal 6")


def rank_body(iters: int, single_worker: bool) -> None:
    """One rank: ``iters`` pairs of concurrent all-gather + permute on a 2-rank gloo group."""
    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    if single_worker:
        from torchtitan_ext.distributed import use_single_worker_gloo

        use_single_worker_gloo()
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    group = dist.new_group(list(range(world)))
    x = torch.randn(16)
    ring = [(r + 1) % world for r in range(world)]
    for _ in range(iters):
        gathered = funcol.all_gather_tensor(x, 0, group)
        shifted = funcol.permute_tensor(x, ring, group)
        funcol.wait_tensor(gathered)
        funcol.wait_tensor(shifted)
    dist.barrier()
    sys.stdout.flush()
    # Skip interpreter finalization: its own gloo teardown abort is a different torch bug
    # (torchtitan_ext.distributed.exit_process) and must not be counted here.
    os._exit(0)


def launch(iters: int, single_worker: bool, port: int) -> tuple[str, float]:
    """One 2-rank torchrun launch: ("ok" | "native: <first marker line>" | "failed rc=N"),
    seconds."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(port), __file__, "--_rank_body", "--iters", str(iters),
        *(["--single-worker"] if single_worker else []),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    hits = [line for line in out.splitlines() if any(m in line for m in NATIVE_MARKERS)]
    if hits:
        return "native: " + hits[0].strip()[:120], seconds
    return ("ok" if proc.returncode == 0 else f"failed rc={proc.returncode}"), seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--launches", type=int, default=8, help="launches per arm (default 8)")
    ap.add_argument("--iters", type=int, default=20000, help="iterations per launch")
    ap.add_argument("--load", type=int, default=2, help="busy-loop processes during launches")
    ap.add_argument("--single-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_rank_body", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._rank_body:
        rank_body(a.iters, a.single_worker)
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.load)]
    counts = {False: [0, 0], True: [0, 0]}  # arm -> [native aborts, other failures]
    try:
        for i in range(a.launches):
            for single in (False, True):
                verdict, seconds = launch(a.iters, single, 29600 + (2 * i + single) % 100)
                arm = "1 worker " if single else "2 workers"
                print(f"launch {i + 1} {arm}: {verdict} ({seconds:.0f} s)", flush=True)
                counts[single][0] += verdict.startswith("native")
                counts[single][1] += verdict.startswith("failed")
    finally:
        for p in load:
            p.kill()
    for single, (native, other) in counts.items():
        name = "use_single_worker_gloo (1 worker thread)" if single else "torch default (2)"
        print(f"{name}: {native} native aborts, {other} other failures in {a.launches} launches")
    return 1 if any(counts[True]) else 0  # the fix arm must be clean


if __name__ == "__main__":
    sys.exit(main())
