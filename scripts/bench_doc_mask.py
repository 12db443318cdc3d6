"""Document-masked (block-causal) attention: its time against full causal attention, and how
evenly the load balancers spread the masked work over the cp ranks.

For documents drawn from three length distributions (the byte-token lengths of the default
corpus's real documents, and exponential lengths of mean S/8 and S/32), packed into one
sequence of S tokens:

1. Attention step time (forward + backward) at cp 1, 2, 4, 8: each cp rank's kernel calls for
   every key block of the ring, timed one rank after the other in this process (the ring's
   step takes as long as its slowest rank when its transfers overlap compute, which a 2-core
   machine cannot show with 8 processes), max over ranks. Block-causal: the kernels
   ``cp_block_causal`` runs, on the per-document LPT layout (``--time-balancer``: another).
   Full causal: the calls torch's causal ring makes on its head-tail layout (the diagonal
   block with the kernel's causal mask, then half blocks). Printed next to the ideal
   ratio, the mask's FLOPs over the causal mask's at 128 x 128 block granularity. Target:
   measured / ideal <= 1.3.
2. Work per cp rank (query-key pairs under the mask, ``cp_documents.work_per_rank``), max over
   min, with the timed balancer (target <= 1.15), next to torch's per-document head-tail's,
   head-tail's and PTRR's.

Usage::

    .venv/bin/python scripts/bench_doc_mask.py [--seq-len 8192] [--heads 4] [--head-dim 64]

Prints PASS or FAIL per target; exit status 1 when any target fails.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchtitan_ext.parallel import block_causal
from torchtitan_ext.parallel.cp_documents import (
    DocumentMask,
    document_starts,
    layout,
    work_per_rank,
)

aten = torch.ops.aten
EOS = 1
BLOCK = 128
RATIO_TARGET = 1.3
BALANCE_TARGET = 1.15


def corpus_lengths() -> list[int]:
    """Byte-token lengths (BOS + bytes + EOS) of the default corpus's documents."""
    from torchtitan_ext.data.corpus import python_stdlib_documents

    return [len(d.encode()) + 2 for d in python_stdlib_documents()]


def pack(lengths: list[int] | None, mean: float, s: int, gen: torch.Generator) -> torch.Tensor:
    """(1, S) token ids: documents of the given lengths (sampled), or exponential of ``mean``,
    each ended by EOS, cut at S."""
    tokens = torch.randint(2, 250, (1, s), generator=gen)
    pos = 0
    while pos < s:
        if lengths is not None:
            n = lengths[int(torch.randint(len(lengths), (1,), generator=gen))]
        else:
            n = max(1, int(-mean * math.log(1 - float(torch.rand(1, generator=gen)))))
        pos += n
        if pos <= s:
            tokens[0, pos - 1] = EOS
    return tokens


def ideal_ratio(starts: torch.Tensor) -> float:
    """(128 x 128 blocks the mask reaches) / (blocks the causal mask reaches)."""
    s = starts.shape[1]
    firsts = torch.arange(0, s, BLOCK)
    lasts = torch.clamp(firsts + BLOCK - 1, max=s - 1)
    masked = (lasts // BLOCK - starts[0, firsts] // BLOCK + 1).sum()
    causal = (lasts // BLOCK + 1).sum()
    return float(masked) / float(causal)


def _timed(fn: object) -> float:
    """CPU seconds of this thread (one torch thread): what the rank computes, whatever else
    runs on the machine."""
    t0 = time.thread_time()
    fn()  # type: ignore[operator]
    return time.thread_time() - t0


def masked_rank_time(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask, c: int
) -> float:
    """Forward + backward of cp rank ``c``'s block-causal calls over every key block."""
    cp = mask.positions.shape[1]
    scale = 1 / math.sqrt(q.shape[-1])
    qp, qs = mask.positions[:, c], mask.starts[:, c]
    mine = qp[0]
    lq, dout = q[:, :, mine], torch.randn_like(q[:, :, mine])
    acc = torch.zeros(lq.shape)
    lse = torch.full(lq.shape[:-1], float("-inf"))
    blocks = [(k[:, :, mask.positions[0, j]], v[:, :, mask.positions[0, j]], j) for j in range(cp)]
    calls: list[list[block_causal.Tile]] = []

    def forward() -> None:  # the tiles are planned once and reused, as cp_block_causal does
        for kb, vb, j in blocks:
            calls.append(block_causal.tiles(qp, qs, mask.positions[:, j]))
            block_causal.attend(acc, lse, lq, kb, vb, qp, qs, mask.positions[:, j], scale, calls[j])

    def backward() -> None:
        dq = torch.zeros(lq.shape)
        for kb, vb, j in blocks:
            dk, dv = torch.zeros(kb.shape), torch.zeros(vb.shape)
            block_causal.attend_backward(
                dq, dk, dv, dout, lq, kb, vb, acc, lse, qp, qs, mask.positions[:, j], scale,
                calls[j],
            )  # fmt: skip

    return _timed(forward) + _timed(backward)


def causal_rank_time(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: int, cp: int) -> float:
    """Forward + backward of the calls torch's causal ring makes on cp rank ``c`` (head-tail
    layout): the diagonal block causal, then for steps i <= c the first half of the key block,
    for i > c the second half of the queries, both without a mask."""
    s = q.shape[2]
    idx = layout(torch.zeros(1, s, dtype=torch.int64), cp, "headtail" if cp > 1 else None)[0]
    n = s // cp
    shard = [idx[r * n : (r + 1) * n] for r in range(cp)]
    lq = q[:, :, shard[c]]
    calls = []
    for i in range(cp):
        src = shard[(c - i) % cp]
        kb, vb = k[:, :, src], v[:, :, src]
        if i == 0:
            calls.append((lq, kb, vb, True))
        elif i <= c:
            calls.append((lq, kb[:, :, : n // 2], vb[:, :, : n // 2], False))
        else:
            calls.append((lq[:, :, n // 2 :], kb, vb, False))
    outs: list[tuple[torch.Tensor, ...]] = []

    def forward() -> None:
        for cq, ck, cv, causal in calls:
            outs.append(aten._scaled_dot_product_flash_attention_for_cpu(cq, ck, cv, 0.0, causal))

    def backward() -> None:
        for (cq, ck, cv, causal), (out, lse) in zip(calls, outs, strict=True):
            aten._scaled_dot_product_flash_attention_for_cpu_backward(
                torch.randn_like(out), cq, ck, cv, out, lse, 0.0, causal
            )

    return _timed(forward) + _timed(backward)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--cps", default="1,2,4,8")
    ap.add_argument(
        "--time-balancer", default="per_document_lpt",
        choices=("per_document_lpt", "per_document_headtail", "ptrr", "headtail"),
        help="the layout the block-causal time is measured on (default: %(default)s)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # one core per emulated rank, as a rank would have
    s, cps = args.seq_len, [int(x) for x in args.cps.split(",")]
    gen = torch.Generator().manual_seed(0)
    lengths = corpus_lengths()
    mean = sum(lengths) / len(lengths)
    dists = [
        (f"corpus (mean {mean:,.0f})", lengths, 0.0),
        (f"mean S/8 = {s // 8}", None, s / 8),
        (f"mean S/32 = {s // 32}", None, s / 32),
    ]
    shape = (1, args.heads, s, args.head_dim)
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    failed = False
    print(f"seq_len {s}, heads {args.heads}, head_dim {args.head_dim}; per-rank fwd+bwd seconds")
    for name, lens, m in dists:
        tokens = pack(lens, m, s, gen)
        starts = document_starts(tokens, EOS)
        ideal = ideal_ratio(starts)
        docs = int((tokens == EOS).sum())
        print(f"\n{name}: {docs} documents end in the window; ideal ratio {ideal:.3f}")
        print(" cp  causal s  masked s   ratio  /ideal  target | work max/min: timed  per-doc"
              "  headtail   ptrr  target")  # fmt: skip
        for cp in cps:
            if s % (2 * cp):
                continue
            balance = {}
            for lb in dict.fromkeys(
                [args.time_balancer, "per_document_headtail", "headtail", "ptrr"]
            ):
                perm = layout(starts, cp, lb if cp > 1 else None)
                mask = DocumentMask.of(starts, perm, cp)
                w = work_per_rank(mask).double()
                balance[lb] = (float(w.max() / w.min()), mask)
            mask = balance[args.time_balancer][1]
            masked = max(masked_rank_time(q, k, v, mask, c) for c in range(cp))
            causal = max(causal_rank_time(q, k, v, c, cp) for c in range(cp))
            ratio = masked / causal
            ok_time = ratio / ideal <= RATIO_TARGET
            ok_bal = balance[args.time_balancer][0] <= BALANCE_TARGET
            failed |= not (ok_time and ok_bal)
            timed, per_doc, headtail, ptrr = (
                balance[k][0]
                for k in (args.time_balancer, "per_document_headtail", "headtail", "ptrr")
            )
            print(
                f"{cp:3d}  {causal:8.3f}  {masked:8.3f}  {ratio:6.3f}  {ratio / ideal:6.2f}  "
                f"{'PASS' if ok_time else 'FAIL':>6} | {'':12s}{timed:6.3f}  {per_doc:7.3f}  "
                f"{headtail:8.3f}  {ptrr:5.3f}  {'PASS' if ok_bal else 'FAIL':>6}"
            )
    print(f"\ntargets: masked / causal time <= {RATIO_TARGET} x ideal; {args.time_balancer} "
          f"work max/min <= {BALANCE_TARGET}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
