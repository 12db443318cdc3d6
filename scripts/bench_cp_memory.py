"""Context-parallel memory and load-balance benchmark.

1. Per-rank peak activation memory of one training step (forward + backward of the real model,
   parallelized by ``torchtitan_ext.parallelize`` with CP over cp ranks and FSDP over dp_shard x
   cp) at a fixed long sequence, for cp = 1, 2, 4. "Activation memory" is the peak during the
   step minus the memory held just before it (parameters, optimizer state): on GPU from the
   CUDA caching allocator (``max_memory_allocated``), on CPU from the kernel's resident-set
   high-water mark over the step (``torchtitan_ext.metrics.PeakRSS``).
   Target: cp = c uses at most 1.15 / c of cp = 1.
2. Longest trainable sequence per cp degree under a per-rank budget (``--budget-mib`` of
   activation memory): measured at two sequence lengths per degree, the per-token slope and
   intercept give the length at which activations reach the budget (activation memory is
   linear in the sequence with flash attention). Target: at least 0.9 x c times that of cp = 1.
   A slope <= 0 (memory that did not grow with the sequence) is a failed measurement: FAIL,
   never an infinite reach.
3. Load balance: per-rank compute time (main-thread CPU time, or CUDA time on GPU) of causal
   ring attention forward + backward at cp = 4 with torch's head-tail balancer and without;
   prints max/min over ranks for both.

Usage::

    .venv/bin/python scripts/bench_cp_memory.py [--seq-len 8192] [--budget-mib 1024]

Each configuration runs under ``torchrun`` with one process per rank; on a 2-core CPU machine
the whole benchmark takes a few minutes. Exit status: 0 when every target printed passes,
1 otherwise.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from torchtitan_ext.distributed import launch_env, torchrun_command
from torchtitan_ext.metrics import PeakRSS, rss_bytes

REPO = Path(__file__).resolve().parent.parent


def worker_memory(seq_len: int, flavor: str, out: str) -> int:
    """One rank: build, parallelize and init the model; measure one forward + backward."""
    import torch
    import torch.distributed as dist

    from torchtitan_ext.config import load_config
    from torchtitan_ext.distributed import RankInfo, init_distributed, resolve_device
    from torchtitan_ext.models import build_model_on_meta, init_weights_mesh_independent
    from torchtitan_ext.parallel.context_parallel import shard_sequence
    from torchtitan_ext.parallelize import parallelize
    from torchtitan_ext.validate import resolve_model_args, validate

    rank = RankInfo.from_env()
    cp = rank.world_size
    cfg = load_config(
        [
            "--model.flavor", flavor, "--training.seq_len", str(seq_len),
            "--training.local_batch_size", "1", "--parallelism.context_parallel_degree", str(cp),
            "--activation_checkpoint.mode", "none", "--validation.no-enable",
        ]
    )  # fmt: skip
    dims = validate(cfg, rank.world_size)
    assert dims is not None
    device = resolve_device(cfg, rank.local_rank)
    init_distributed("nccl" if device.type == "cuda" else "gloo", device, 300)
    dims.build_mesh(device.type)
    from torchtitan.models.llama3 import Transformer

    args = resolve_model_args(cfg)
    args.update_from_config(cfg)
    model = build_model_on_meta(Transformer, args)
    parallelize(model, dims, cfg, device)
    init_weights_mesh_independent(model, 0, device)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (1, seq_len + 1), generator=gen)
    inputs, labels, positions = tokens[:, :-1].to(device), tokens[:, 1:].to(device), None
    if cp > 1:
        inputs, labels, positions = shard_sequence(dims.get_mesh("cp"), inputs, labels, "headtail")
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        pred = model(inputs, positions=positions)
        torch.nn.functional.cross_entropy(pred.flatten(0, 1).float(), labels.flatten()).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        before = rss_bytes()
        with PeakRSS() as sampler:
            pred = model(inputs, positions=positions)
            loss = torch.nn.functional.cross_entropy(pred.flatten(0, 1), labels.flatten())
            loss.backward()
        peak = sampler.peak
    del pred
    result = {"rank": rank.rank, "activation_bytes": peak - before}
    gathered: list[Any] = [None] * rank.world_size
    dist.all_gather_object(gathered, result)
    if rank.rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()
    return 0


def worker_balance(seq_len: int, out: str) -> int:
    """One rank of cp = world: per-rank compute time of causal ring attention fwd + bwd."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental._attention import (
        _context_parallel_shard,
        _ContextParallel,
        _cp_options,
        _enable_context_parallel_dispatcher,
        _HeadTailLoadBalancer,
    )
    from torch.distributed.tensor.parallel import parallelize_module

    import torchtitan_ext  # noqa: F401  (CPU ring attention)

    class Attn(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    from torchtitan_ext.distributed import init_distributed

    cuda = torch.cuda.is_available()
    rank = int(os.environ["RANK"])
    device = "cuda" if cuda else "cpu"
    init_distributed(
        "nccl" if cuda else "gloo",
        torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu"),
        300,
    )
    ws = dist.get_world_size()
    mesh = init_device_mesh(device, (ws,), mesh_dim_names=("cp",))
    _enable_context_parallel_dispatcher()
    module = Attn()
    parallelize_module(module, mesh, _ContextParallel(2, _ContextParallel.AttentionType.SDPA))
    times: dict[str, float] = {}
    for balanced in (True, False):
        _cp_options.enable_load_balance = balanced
        balancer = _HeadTailLoadBalancer(seq_len, ws, device) if balanced else None
        gen = torch.Generator().manual_seed(0)
        qkv = [torch.randn(1, 8, seq_len, 64, generator=gen).to(device) for _ in range(3)]
        shards = _context_parallel_shard(mesh, qkv, (2, 2, 2), load_balancer=balancer)
        leaves = [t.detach().requires_grad_() for t in shards if isinstance(t, torch.Tensor)]
        total = 0.0
        for it in range(3):
            dist.barrier()
            t0 = time.thread_time()
            start = time.perf_counter()
            module(*leaves).sum().backward()
            if cuda:
                torch.cuda.synchronize()
            elapsed = (time.perf_counter() - start) if cuda else (time.thread_time() - t0)
            if it > 0:  # the first iteration warms up
                total += elapsed
        times["headtail" if balanced else "none"] = total / 2
    gathered: list[Any] = [None] * ws
    dist.all_gather_object(gathered, times)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()
    return 0


def launch(nproc: int, worker_args: list[str]) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = torchrun_command(nproc, [__file__, *worker_args, "--out", out])
        # Large tensors straight from mmap and back to the OS on free (no dynamic threshold),
        # so the resident set follows live tensor memory instead of malloc's retained arenas.
        env = launch_env(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            raise SystemExit(
                f"run failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
            )
        return json.loads(Path(out).read_text())


def main() -> int:
    """Run the benchmark; 0 when every printed target passes, 1 otherwise."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=8192, help="fixed long sequence (tokens)")
    p.add_argument("--flavor", default="debugmodel_cpu")
    p.add_argument("--budget-mib", type=float, default=1024.0, help="per-rank activation budget")
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--_worker", choices=["memory", "balance"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._worker is not None:
        from torchtitan_ext.distributed import run_and_exit

        if a._worker == "memory":
            run_and_exit(lambda: worker_memory(a.seq_len, a.flavor, a.out))
        run_and_exit(lambda: worker_balance(a.seq_len, a.out))

    mib = 2**20
    print(f"# bench_cp_memory: flavor {a.flavor}, batch 1, fp32; activation memory per rank")
    rows = []
    for cp in a.cp:
        per_len = {}
        for seq in (a.seq_len // 2, a.seq_len):
            res = launch(cp, ["--_worker", "memory", "--seq-len", str(seq), "--flavor", a.flavor])
            per_len[seq] = max(r["activation_bytes"] for r in res) / mib
        slope = (per_len[a.seq_len] - per_len[a.seq_len // 2]) / (a.seq_len // 2)  # MiB/token
        intercept = per_len[a.seq_len] - slope * a.seq_len
        # A slope <= 0 means the measurement failed (memory must grow with the sequence):
        # no reach is derived from it (NaN compares False, so its target FAILs).
        reach = (a.budget_mib - intercept) / slope if slope > 0 else float("nan")
        rows.append((cp, per_len[a.seq_len], reach))
        print(f"  measured cp={cp}: {per_len[a.seq_len // 2]:.1f} MiB at {a.seq_len // 2}, "
              f"{per_len[a.seq_len]:.1f} MiB at {a.seq_len} tokens", flush=True)  # fmt: skip
    base_mem, base_reach = rows[0][1], rows[0][2]
    failed = False
    print(f"\nseq_len {a.seq_len}, budget {a.budget_mib:.0f} MiB of activations per rank")
    print(f"{'cp':>3} {'act MiB/rank':>13} {'ratio':>7} {'target':>7} "
          f"{'max seq':>9} {'ratio':>7} {'target':>7}")  # fmt: skip
    for cp, mem, reach in rows:
        r_mem, r_reach = mem / base_mem, reach / base_reach
        ok_mem = "PASS" if r_mem <= 1.15 / cp else "FAIL"
        ok_reach = "PASS" if r_reach >= 0.9 * cp else "FAIL"  # False for a NaN reach
        if cp == 1:
            failed |= reach != reach  # cp = 1's own reach is the baseline: NaN fails it
        else:
            failed |= "FAIL" in (ok_mem, ok_reach)
        print(f"{cp:>3} {mem:>13.1f} {r_mem:>7.3f} {ok_mem + ' ' if cp > 1 else '':>7} "
              f"{reach:>9.0f} {r_reach:>7.2f} {ok_reach if cp > 1 else '':>7}")  # fmt: skip
    print("(targets: activation ratio <= 1.15/cp; reachable length ratio >= 0.9 x cp)")

    cp_bal = max(a.cp)
    times = launch(cp_bal, ["--_worker", "balance", "--seq-len", str(a.seq_len)])
    print(f"\nload balance: causal ring attention fwd+bwd at cp={cp_bal}, seq {a.seq_len}")
    for mode in ("none", "headtail"):
        per_rank = [t[mode] for t in times]
        ratio = max(per_rank) / min(per_rank)
        print(
            f"  {mode:>8}: per-rank compute s {[round(x, 3) for x in per_rank]}  "
            f"max/min {ratio:.2f}"
        )
    evened = max(t["headtail"] for t in times) / min(t["headtail"] for t in times)
    unbalanced = max(t["none"] for t in times) / min(t["none"] for t in times)
    print(
        f"  head-tail evens the per-rank time: {'yes' if evened < unbalanced else 'no'} "
        f"(max/min {evened:.2f} vs {unbalanced:.2f} without balancing)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
