"""Context-parallel patterns: measured traffic and step time on CPU, modelled time at scale.

Part 1 (measured, gloo ranks on this machine): for each pattern at cp 4 and cp 8 (ring,
ulysses, hybrid with Ulysses degree 2 [and 4], double ring with inner ring 2 [and 4]), the
parity recipe (``debugmodel_cpu_deep``, fp32) trains a few steps; per rank, the CP bytes sent
in one step, counted from the collectives torch dispatches and split by destination node for
``--ranks-per-node`` consecutive ranks per node, against the dry run's estimate
(``cp_comm.attention_comm``), and the median step time. Exit status 1 if any estimate is
off by more than 1%.

Part 2 (modelled, no run): the 8B Llama 3 (dim 4096, 32 heads, 8 kv heads) at 128K, 512K and 1M
tokens (one sequence, bf16) with all of 32 / 64 / 128 / 256 GPUs as cp, 8 GPUs per node.
Per transformer block, one attention forward + backward per rank:

- compute: causal attention, 2·s·S·h FLOPs forward (s = S / cp local tokens) and 2.5 x that
  backward, at ``--tflops`` (achieved, not peak);
- bytes: the same estimate, split intra / inter node;
- time: ring and double ring overlap their transfers with compute, step by step: a flat ring
  moves every block at the speed of its slowest hop (one hop per step crosses nodes), so it
  takes max(compute, bytes / inter-node bandwidth); the double ring moves its inner-ring
  blocks over NVLink and its outer-ring blocks over the inter-node link concurrently:
  max(compute, intra / NVLink, inter / inter-node). Ulysses's all-to-alls are not overlapped:
  compute + max(intra / NVLink, inter / inter-node); hybrid = its all-to-alls (inside a node)
  + its ring's overlapped time. Ulysses needs heads (32) divisible by cp.

Assumptions written down: bandwidths are per GPU and per direction, links are otherwise idle,
no latency term, perfect overlap where the pattern overlaps, the MLP / projections / FSDP
traffic (identical across patterns) left out.

    .venv/bin/python scripts/bench_cp_patterns.py                 # both parts (~2 min here)
    .venv/bin/python scripts/bench_cp_patterns.py --model-only --nvlink-gbps 900
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from torchtitan_ext.parallel.cp_comm import attention_comm, split_by_node  # noqa: E402
from torchtitan_ext.parallel.cp_patterns import CPPattern, make_pattern  # noqa: E402
from torchtitan_ext.tools.parity import parse_shape, pattern_options  # noqa: E402

MEASURED = {cp: [f"cp{cp}+{o}" if o else f"cp{cp}" for o in pattern_options(cp)] for cp in (4, 8)}


def _measured(ranks_per_node: int, seq_len: int, timed_steps: int) -> int:
    from check_dry_run import cp_split_cells, measure

    names = [n for cp in sorted(MEASURED) for n in MEASURED[cp]]
    results = measure([parse_shape(n) for n in names], ranks_per_node, timed_steps, 2, 8, seq_len)
    if results is None:
        return 1
    print(f"\n## Measured on this machine: seq {seq_len}, {ranks_per_node} ranks per node\n")
    print("CP MiB sent per rank per step, estimated / measured (worst rank), and step time.\n")
    print("| shape | intra-node | inter-node | error | step s (median) |")
    print("|---|---:|---:|---:|---:|")
    worst_all = 0.0
    for name in names:
        ranks = results[name]
        cells, worst = cp_split_cells(ranks, 3)
        worst_all = max(worst_all, worst)
        step = max(r["step_sec"] for r in ranks)
        print(f"| {name} | {cells[0]} | {cells[1]} | {worst:.2%} | {step:.3f} |")
    print(f"\nworst estimate error {worst_all:.2%} (must be <= 1%)")
    return 0 if worst_all <= 0.01 else 1


def modelled_time(
    pattern: CPPattern, seq: int, dim: int, heads: int, kv_heads: int, tflops: float,
    nvlink: float, inter: float, ranks_per_node: int,
) -> tuple[float, float] | None:  # fmt: skip
    """(time, compute) per block in seconds for one attention forward + backward per rank
    (module doc), or None when the pattern cannot run (Ulysses degree not dividing heads)."""
    cp, e = pattern.cp, 2
    s = seq // cp
    if pattern.ulysses_degree > 1 and heads % pattern.ulysses_degree:
        return None
    compute = 3.5 * 2 * s * seq * dim / (tflops * 1e12)
    head_dim = dim // heads
    worst = 0.0
    for cp_index in range(cp):  # the slowest rank sets the pace
        fwd, bwd = attention_comm(
            pattern, cp_index, q_elems=s * dim, kv_elems=s * kv_heads * head_dim,
            lse_elems=s * heads, act_bytes=e, rotate="alltoall", kv_heads=kv_heads,
        )  # fmt: skip
        transfers = fwd + bwd
        a2a = [t for t in transfers if t.kind == "all_to_all"]
        ring = [t for t in transfers if t.kind != "all_to_all"]
        ranks = list(range(cp))
        a_intra, a_inter = split_by_node(a2a, pattern, cp_index, ranks, ranks_per_node)
        r_intra, r_inter = split_by_node(ring, pattern, cp_index, ranks, ranks_per_node)
        a2a_time = max(a_intra / nvlink, a_inter / inter)
        if pattern.name == "double_ring":
            ring_time = max(compute, r_intra / nvlink, r_inter / inter)
        else:  # one flat ring (of cp, or of the hybrid's groups): slowest hop per step
            spans_nodes = pattern.ring_degree * max(pattern.ulysses_degree, 1) > ranks_per_node
            bw = inter if spans_nodes else nvlink
            ring_time = max(compute, (r_intra + r_inter) / bw)
        worst = max(worst, a2a_time + ring_time)
    return worst, compute


def _model(a: argparse.Namespace) -> None:
    dim, heads, kv_heads = 4096, 32, 8
    rpn = a.gpus_per_node
    nvlink, inter = a.nvlink_gbps * 1e9, a.inter_gbps * 1e9
    print(
        f"\n## Modelled: Llama 3 8B, one sequence, bf16, {rpn} GPUs per node, NVLink "
        f"{a.nvlink_gbps:g} GB/s, inter-node {a.inter_gbps:g} GB/s per GPU, attention at "
        f"{a.tflops:g} TFLOP/s\n"
    )
    print("Attention forward + backward per block (ms), and its communication not hidden by "
          "compute (% of the time); best: the fastest, and any within 0.5% of it.\n")  # fmt: skip
    inner = rpn
    patterns = [("ring", 0), ("ulysses", 0), ("hybrid", inner), ("double_ring", inner)]
    labels = ["ring", "ulysses", f"hybrid (u {inner})", f"double ring (inner {inner})"]
    print("| tokens | GPUs | compute ms | " + " | ".join(labels) + " | best |")
    print("|---:|---:|---:|" + "---:|" * len(labels) + "---|")
    for seq in (131072, 524288, 1048576):
        for gpus in (32, 64, 128, 256):
            cells, times = [], {}
            compute = 0.0
            for (name, deg), label in zip(patterns, labels, strict=True):
                pattern = make_pattern(name, gpus, deg, deg)
                got = modelled_time(
                    pattern, seq, dim, heads, kv_heads, a.tflops, nvlink, inter, rpn
                )
                if got is None:
                    cells.append("n/a")
                    continue
                t, compute = got
                cells.append(f"{t * 1e3:.2f} ({(t - compute) / t:.0%})")
                times[label] = t
            fastest = min(times.values())
            best = " = ".join(k for k, t in times.items() if t <= fastest * 1.005)
            print(f"| {seq // 1024}K | {gpus} | {compute * 1e3:.2f} | " + " | ".join(cells)
                  + f" | {best} |")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--ranks-per-node",
        type=int,
        default=2,
        help="ranks per node for the measured intra/inter split (default 2)",
    )
    ap.add_argument("--seq-len", type=int, default=512, help="measured runs' tokens per sequence")
    ap.add_argument("--timed-steps", type=int, default=3)
    ap.add_argument("--model-only", action="store_true", help="skip the measured part")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--nvlink-gbps", type=float, default=450.0, help="GB/s per GPU in a node")
    ap.add_argument("--inter-gbps", type=float, default=50.0, help="GB/s per GPU across nodes")
    ap.add_argument("--tflops", type=float, default=400.0, help="achieved attention TFLOP/s")
    a = ap.parse_args()
    start = time.perf_counter()
    status = 0 if a.model_only else _measured(a.ranks_per_node, a.seq_len, a.timed_steps)
    _model(a)
    print(f"\n{time.perf_counter() - start:.0f}s")
    return status


if __name__ == "__main__":
    sys.exit(main())
