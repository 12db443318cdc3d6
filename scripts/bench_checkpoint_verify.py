"""Cost of checkpoint manifests (``checkpoint.verify``): DCP save and load of a state of a given
size, with and without the xxh3-64 manifest written at save and checked before load.

One process (a 1-rank gloo group, as ``train.py`` runs), fp32 tensors of 16 MiB each. With N
ranks the hashing is shared (each rank hashes every N-th file), so the added time per rank
shrinks with the rank count while DCP's own I/O per rank does too: the ratios below hold per
rank. Files are read back from the page cache right after the save, as in training.

    .venv/bin/python scripts/bench_checkpoint_verify.py [--size-mib 1024] [--repeats 3]

Each repeat times, on the same checkpoint, DCP's save, the manifest (hash + write), the
verification (hash + compare) and DCP's load; prints their medians and the ratios
(save + manifest) / save and (verify + load) / load.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from torchtitan_ext.checkpoint.storage import file_digest, verify_manifest, write_manifest
from torchtitan_ext.distributed import init_distributed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="state size in MiB (default 1024)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (default 3)")
    a = ap.parse_args()
    init_distributed("gloo", torch.device("cpu"), 300)
    n = max(1, a.size_mib // 16)
    state = {f"t{i}": torch.randn(4 * 2**20) for i in range(n)}  # 16 MiB each
    times: dict[str, list[float]] = {"save": [], "manifest": [], "verify": [], "load": []}
    root = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    try:
        for r in range(a.repeats):
            path = str(root / f"r{r}")
            t0 = time.perf_counter()
            md = dcp.save(state, checkpoint_id=path)
            t1 = time.perf_counter()
            write_manifest(path, md, 0)
            t2 = time.perf_counter()
            assert verify_manifest(path, 0) is None
            t3 = time.perf_counter()
            dcp.load(state, checkpoint_id=path)
            t4 = time.perf_counter()
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                times[key].append(dt)
            shutil.rmtree(path)
        probe = root / "probe.bin"
        probe.write_bytes(os.urandom(256 * 2**20))
        t0 = time.perf_counter()
        file_digest(str(probe))
        hash_gbs = 256 * 2**20 / (time.perf_counter() - t0) / 1e9
    finally:
        shutil.rmtree(root, ignore_errors=True)
        dist.destroy_process_group()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"state {n * 16} MiB, {a.repeats} repeats, 1 rank; xxh3-64 of a cached file: "
          f"{hash_gbs:.2f} GB/s")  # fmt: skip
    for k, v in med.items():
        print(f"{k:9s} median {v:6.3f} s   ({', '.join(f'{x:.3f}' for x in times[k])})")
    print(f"save + manifest / save:  {(med['save'] + med['manifest']) / med['save']:.3f}")
    print(f"verify + load / load:    {(med['verify'] + med['load']) / med['load']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
