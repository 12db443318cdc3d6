"""Prepared corpora at scale (issue 24): prepare throughput, start-up time and memory per rank,
and loader throughput against what the trainer consumes.

    PYTHONPATH=$PWD python scripts/bench_data.py [--sizes 40,300] [--work DIR] [--num-proc N]

1. Builds JSON-lines corpora of real text of about each size in MB (one document per file: the
   .py, .h and .txt files of this machine's Python installations and /usr/share/doc, in sorted
   order; past the files there are, they repeat), unless already there.
2. Prepares each (``python -m torchtitan_ext.data.prepare``, byte tokenizer of debug_cpu.toml):
   tokens/s and tokens/s per process.
3. Trains 2 steps on 2 ranks (torchrun, debug_cpu.toml) from each prepared corpus: seconds
   from launch to the first step's log line, and the peak RSS per rank (the metrics' peak
   memory, the max over ranks of VmHWM). With ``--baseline`` also from the smallest corpus's
   JSON lines (tokenized at start-up, the path without preparation).
4. Loader: rank 0 of dp 2 over the largest prepared corpus (debug_cpu's local batch 4 x seq_len
   256), tokens/s, against the trainer's tokens/s per rank on ``debugmodel_cpu_32k`` (3 steps
   on 2 ranks).

Targets, each printed PASS or FAIL (exit 1 on any FAIL): the largest corpus starts within
1.25x the seconds and 1.25x the peak RSS per rank of the smallest; the loader sustains at least
20x the tokens/s the trainer consumes.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "train_configs" / "debug_cpu.toml"
SUFFIXES = (".py", ".h", ".hpp", ".txt", ".md", ".rst")


def _text_files() -> list[Path]:
    """Real text on this machine, in a fixed order."""
    roots = [
        Path(sysconfig.get_paths()["stdlib"]),
        Path(sysconfig.get_paths()["purelib"]),
        Path("/usr/share/doc"),
        Path("/usr/lib/python3"),
    ]
    files: list[Path] = []
    for root in roots:
        if root.is_dir():
            files += sorted(
                p
                for p in root.rglob("*")
                if p.suffix in SUFFIXES and p.is_file() and not p.is_symlink()
            )
    return files


def build_corpus(path: Path, megabytes: int) -> int:
    """Write about ``megabytes`` MB of JSON lines (one real file per line) to ``path``, unless a
    file of that size is already there. Returns its size in bytes."""
    target = megabytes * 1_000_000
    if path.exists() and abs(path.stat().st_size - target) < 0.05 * target:
        return path.stat().st_size
    files = _text_files()
    written = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        i = 0
        while written < target:
            p = files[i % len(files)]
            i += 1
            try:
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip() or len(text) > 4_000_000:
                continue
            line = json.dumps({"text": text, "source": str(p)}) + "\n"
            f.write(line)
            written += len(line.encode())
    os.replace(tmp, path)
    return path.stat().st_size


def prepare(source: Path, out: Path, num_proc: int) -> dict[str, float]:
    """Prepare ``source`` into ``out`` from scratch; its tokens, seconds and rates."""
    cmd = [
        sys.executable, "-m", "torchtitan_ext.data.prepare", "--source", str(source),
        "--out", str(out), "--job.config_file", str(RECIPE), "--num-proc", str(num_proc),
        "--overwrite",
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env())
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed:\n{proc.stderr[-3000:]}")
    m = re.search(r"prepared (\d+) documents, (\d+) tokens .* in (\d+) shards", proc.stdout)
    assert m, proc.stdout
    tokens = int(m.group(2))
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_per_proc": tokens / seconds / num_proc,
    }


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def train(dataset: Path, dump: Path, steps: int, *extra: str) -> dict[str, Any]:
    """2 ranks, ``steps`` steps of debug_cpu.toml on ``dataset``: seconds from launch to the
    first step's line, the peak RSS per rank (GiB) and the last step's tokens/s per rank."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "train.py"), "--job.config_file", str(RECIPE), "--job.dump_folder", str(dump),
        "--training.dataset_path", str(dataset), "--training.steps", str(steps),
        "--metrics.log_freq", "1", "--validation.no-enable", "--checkpoint.no-enable",
        "--metrics.no-enable_tensorboard", *extra,
    ]  # fmt: skip
    t0 = time.perf_counter()
    first = None
    lines = []
    with subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if first is None and re.search(r"step:\s+1\s", line):
                first = time.perf_counter() - t0
    if proc.returncode != 0 or first is None:
        raise SystemExit(f"training failed ({proc.returncode}):\n{''.join(lines[-40:])}")
    records = [
        json.loads(x)
        for x in (dump / "metrics.jsonl").read_text().splitlines()
        if '"kind": "train"' in x
    ]
    return {
        "first_step_s": first,
        "peak_rss_gib": max(r["peak_mem_mib"] for r in records) / 1024,
        "tokens_per_s_per_rank": records[-1]["tokens_per_sec"],
    }


def loader_rate(prepared: Path, seconds: float = 5.0) -> float:
    """Tokens/s of rank 0 of dp 2 drawing debug_cpu's batches (local 4 x 256) from
    ``prepared``."""
    from torchtitan_ext.data import GlobalBatchLoader, PackedWindows, open_prepared

    corpus = open_prepared(
        str(prepared), json.loads((prepared / "manifest.json").read_text())["tokenizer"]
    )
    train, _, _, _ = corpus.split(0.02)
    loader = GlobalBatchLoader(PackedWindows(train, 256, seed=0), 4, 0, 2, 1)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for inputs, _ in loader.next_step():
            n += inputs.numel()
    return n / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="40,300", help="corpus sizes in MB, comma-separated")
    parser.add_argument("--work", default="/tmp/bench_data", help="folder for corpora and runs")
    parser.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--baseline", action="store_true", help="also train from the smallest corpus unprepared"
    )
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[int, dict[str, Any]] = {}
    for mb in sizes:
        src = work / f"corpus_{mb}mb.jsonl"
        size = build_corpus(src, mb)
        prep = prepare(src, work / f"prepared_{mb}mb", args.num_proc)
        run = train(work / f"prepared_{mb}mb", work / f"run_{mb}mb", 2)
        results[mb] = {"bytes": size, **prep, **run}
        print(
            f"{mb:>5} MB corpus ({size / 1e6:.0f} MB): prepared {prep['tokens']:,} tokens in "
            f"{prep['seconds']:.1f} s = {prep['tokens_per_s']:,.0f} tokens/s "
            f"({prep['tokens_per_s_per_proc']:,.0f} per process, {args.num_proc} processes); "
            f"2 ranks: first step after {run['first_step_s']:.1f} s, peak RSS per rank "
            f"{run['peak_rss_gib']:.2f} GiB",
            flush=True,
        )
    small, large = min(sizes), max(sizes)
    if args.baseline:
        base = train(work / f"corpus_{small}mb.jsonl", work / "run_baseline", 2)
        print(
            f"{small:>5} MB corpus, unprepared (tokenized at start-up): first step after "
            f"{base['first_step_s']:.1f} s, peak RSS per rank {base['peak_rss_gib']:.2f} GiB"
        )
    consume = train(
        work / f"prepared_{small}mb", work / "run_32k", 3, "--model.flavor", "debugmodel_cpu_32k"
    )["tokens_per_s_per_rank"]
    rate = loader_rate(work / f"prepared_{large}mb")
    print(
        f"loader: {rate:,.0f} tokens/s per rank; the trainer consumes {consume:,.0f} tokens/s "
        f"per rank on debugmodel_cpu_32k: {rate / consume:.0f}x"
    )
    checks = [
        (
            f"first step: {large} MB within 1.25x of {small} MB",
            results[large]["first_step_s"] <= 1.25 * results[small]["first_step_s"],
            f"{results[large]['first_step_s']:.1f} s vs {results[small]['first_step_s']:.1f} s",
        ),
        (
            f"peak RSS per rank: {large} MB within 1.25x of {small} MB",
            results[large]["peak_rss_gib"] <= 1.25 * results[small]["peak_rss_gib"],
            f"{results[large]['peak_rss_gib']:.2f} GiB vs {results[small]['peak_rss_gib']:.2f} GiB",
        ),
        ("loader >= 20x the trainer's tokens/s", rate >= 20 * consume, f"{rate / consume:.0f}x"),
    ]
    for what, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {what}: {detail}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
