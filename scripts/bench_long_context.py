"""Long context per device: what chunked cross-entropy and the tiled MLP buy.

For each feature setting (off; ``training.loss_chunk_tokens``; ``training.mlp_tile_tokens``;
both) and each CP degree (1 rank, and cp 2 on 2 ranks), the script trains ``train.py``
under torchrun on a model with a realistic vocabulary (``debugmodel_cpu_32k``: vocab 32768,
dim 1024; fp32, batch 1, full activation checkpointing as long-context runs use) for two steps
at two sequence lengths, and reads the second step's record of ``metrics.jsonl``:

- step memory per rank: its ``step_mem_mib``, the log's ``step memory`` column
  (``torchtitan_ext.metrics.StepMemory``): the step's peak minus what the rank held just before
  it (parameters and optimizer state; gradients are freed first, as the step does), so
  activations plus the gradients (a constant, 4 bytes per parameter), max over ranks; on CPU
  from the kernel's resident-set high-water mark, on CUDA the allocator's
  ``max_memory_allocated``. A user's run prints the same figure;
- its per-token slope and intercept over the two lengths (activation memory is linear in the
  sequence), hence the longest sequence whose step memory fits ``--budget-mib`` per rank.
  Where the peak hardly grows ("flat": it is the parameter-side constant, FSDP-gathered
  weights and gradients, not activations) only a lower bound is known: budget x long length /
  peak, printed with ">=";
- tokens/s of the step (sequence tokens over the time between the two records), relative to
  the setting with both features off.

Targets (issue 11): the longest sequence with both features at least 4x the baseline's, and
each feature's throughput at least 0.9x the baseline's.

    .venv/bin/python scripts/bench_long_context.py [--seq-lens 2048 4096] [--budget-mib 4096]
        [--cp 1 2] [--settings off "tiled MLP" ...]

About 10 minutes on the 2-core CPU machine. On a GPU the same command measures CUDA memory.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from torchtitan_ext.distributed import launch_env, torchrun_command
from torchtitan_ext.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
SETTINGS: dict[str, list[str]] = {
    "off": [],
    "chunked loss": ["--training.loss_chunk_tokens", "CHUNK"],
    "tiled MLP": ["--training.mlp_tile_tokens", "TILE"],
    "both": ["--training.loss_chunk_tokens", "CHUNK", "--training.mlp_tile_tokens", "TILE"],
}


def measure(nproc: int, args: list[str]) -> dict[str, float]:
    """Train 2 steps with ``train.py args`` on ``nproc`` ranks; step 2's ``step_mem_mib`` (the
    log's ``step memory``, max over ranks) and seconds (``elapsed_sec`` from step 1's record)."""
    with tempfile.TemporaryDirectory(prefix="bench_long_context-") as dump:
        train = [str(ROOT / "train.py"), *args, "--job.dump_folder", dump,
                 "--training.steps", "2", "--metrics.log_freq", "1"]  # fmt: skip
        cmd = torchrun_command(nproc, train)
        proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True)
        records = read_metrics(dump)
        if proc.returncode != 0 or len(records) != 2:
            sys.exit(f"run failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    first, second = records
    return {"mib": second["step_mem_mib"], "seconds": second["elapsed_sec"] - first["elapsed_sec"]}


def recipe(
    seq_len: int, cp: int, flavor: str, setting: list[str], chunk: int, tile: int
) -> list[str]:
    tokens = {"CHUNK": str(chunk), "TILE": str(tile)}
    return [
        "--job.config_file", str(ROOT / "train_configs" / "debug_cpu.toml"),
        "--model.flavor", flavor,
        "--training.seq_len", str(seq_len),
        "--training.local_batch_size", "1",
        "--training.global_batch_size", "1",
        "--parallelism.data_parallel_shard_degree", "1",
        "--parallelism.context_parallel_degree", str(cp),
        "--activation_checkpoint.mode", "full",
        # Fused AdamW has no per-step temporaries the size of the parameters, which would
        # otherwise be the step's peak at these lengths and hide the activations.
        "--optimizer.implementation", "fused",
        "--validation.no-enable", "--checkpoint.no-enable", "--metrics.no-enable-tensorboard",
        *(tokens.get(x, x) for x in setting),
    ]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seq-lens", type=int, nargs=2, default=[2048, 4096],
                    help="the two sequence lengths measured, tokens")  # fmt: skip
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2], help="CP degrees (default 1 2)")
    ap.add_argument("--flavor", default="debugmodel_cpu_32k", help="model flavor")
    ap.add_argument("--chunk", type=int, default=512, help="loss_chunk_tokens (default 512)")
    ap.add_argument("--tile", type=int, default=1024, help="mlp_tile_tokens (default 1024)")
    ap.add_argument("--budget-mib", type=float, default=4096.0,
                    help="step memory per rank for the longest-sequence column, MiB")  # fmt: skip
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                    help="settings besides 'off' (the reference); default all")  # fmt: skip
    a = ap.parse_args()

    short, long = sorted(a.seq_lens)
    print(f"# bench_long_context: {a.flavor}, fp32, batch 1, full AC; chunk {a.chunk} tokens, "
          f"tile {a.tile} tokens; step-memory budget {a.budget_mib:.0f} MiB per rank",
          flush=True)  # fmt: skip
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for cp in a.cp:
        for name, setting in SETTINGS.items():
            if name != "off" and name not in a.settings:
                continue
            got = {
                n: measure(cp, recipe(n, cp, a.flavor, setting, a.chunk, a.tile))
                for n in (short, long)
            }
            slope = (got[long]["mib"] - got[short]["mib"]) / (long - short)  # MiB per token
            intercept = got[long]["mib"] - slope * long
            # A peak that hardly grows is the parameter-side constant (FSDP-gathered weights,
            # gradients), not activations: the fit says nothing, but activations at the long
            # length are at most that peak, which bounds the reach from below.
            flat = got[long]["mib"] - got[short]["mib"] < 0.05 * got[short]["mib"]
            if flat:
                reach = a.budget_mib * long / got[long]["mib"]
            else:
                reach = (a.budget_mib - intercept) / slope
            rows.append({
                "cp": cp, "setting": name, "mib_short": got[short]["mib"],
                "mib_long": got[long]["mib"], "kib_per_token": slope * 1024, "flat": flat,
                "reach": reach, "tps": long / got[long]["seconds"],
            })  # fmt: skip
            print(f"[{time.perf_counter() - start:5.0f}s] cp {cp} {name}: "
                  f"{got[short]['mib']:.0f} / {got[long]['mib']:.0f} MiB at {short} / {long} "
                  f"tokens, {long / got[long]['seconds']:.0f} tokens/s (step "
                  f"{got[short]['seconds']:.2f} / {got[long]['seconds']:.2f} s)",
                  flush=True)  # fmt: skip
    print(f"\n| cp | setting | step MiB @{short} | step MiB @{long} | KiB/token | "
          f"longest seq in {a.budget_mib:.0f} MiB | x off | tokens/s | x off |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    failed = False
    for r in rows:
        base = next(b for b in rows if b["cp"] == r["cp"] and b["setting"] == "off")
        reach_x, tps_x = r["reach"] / base["reach"], r["tps"] / base["tps"]
        at_least = ">= " if r["flat"] else ""
        print(f"| {r['cp']} | {r['setting']} | {r['mib_short']:.0f} | {r['mib_long']:.0f} | "
              f"{'flat' if r['flat'] else format(r['kib_per_token'], '.0f')} | "
              f"{at_least}{r['reach']:,.0f} | {at_least}{reach_x:.2f} | "
              f"{r['tps']:.0f} | {tps_x:.2f} |")  # fmt: skip
        if r["setting"] == "both":
            failed |= reach_x < 4.0
        if r["setting"] != "off":
            failed |= tps_x < 0.9
    print("\ntargets: longest sequence with both features >= 4x off; tokens/s of each "
          f">= 0.9x off: {'FAIL' if failed else 'PASS'}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
