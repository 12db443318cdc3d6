"""Does auto mesh pick a fast mesh? The planner's choice against every mesh measured.

For each stage length (default 256, 1024 and 2048 tokens at 4096 tokens per step, so global
batches of 16, 4 and 2 sequences) on N CPU ranks (default 8): the planner
(``curriculum.auto_mesh``, ``torchtitan_ext.auto_mesh``) ranks every tp x cp x CP pattern the
stage can run (pp 1, dp_replicate 1, dp_shard the rest) by its estimated step time; then each
of those meshes trains the debug recipe at that stage's seq_len, global and local batch for
``--steps`` steps under torchrun (``ablation.run_shape``, the first step left out of the
timing), and the table gives the planner's choice, the best measured mesh, and the choice's
measured tokens/s as a fraction of the best. Target (issue 14): the choice within 10% of the
best (ratio >= 0.90) at every length; exit status 1 otherwise.

    .venv/bin/python scripts/bench_auto_mesh.py [--nproc 8] [--seq-lens 256,1024,2048]
        [--patterns ring] [--steps 4]

The measured meshes are exactly the planner's candidates (both restricted to ``--patterns``,
``curriculum.auto_mesh_patterns``), so "best" is the best among the meshes it could choose.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from torchtitan_ext.ablation import run_shape, shape_args
from torchtitan_ext.auto_mesh import MeshEstimate
from torchtitan_ext.config import load_config
from torchtitan_ext.curriculum import plan_curriculum
from torchtitan_ext.parity import ROOT, Shape

TARGET = 0.90
TOKENS_PER_STEP = 4096
OPTION = {"ring": "", "ulysses": "ulysses", "hybrid": "hybrid", "double_ring": "dring"}


def stage_recipe(tmp: Path, seq_len: int, patterns: list[str]) -> Path:
    """The debug recipe with one auto-meshed stage of ``seq_len`` tokens."""
    text = (ROOT / "train_configs" / "debug_cpu.toml").read_text()
    text += (
        f"\n[curriculum]\ntokens_per_step = {TOKENS_PER_STEP}\nauto_mesh = true\n"
        f"auto_mesh_patterns = {patterns!r}\n"
        f"[[curriculum.stages]]\nseq_len = {seq_len}\nsteps = 1\n"
    ).replace("'", '"')
    path = tmp / f"auto_{seq_len}.toml"
    path.write_text(text)
    return path


def shape_of(e: MeshEstimate) -> Shape:
    """The ablation shape (degrees and CP-pattern option) of a planner candidate."""
    option = OPTION[e.pattern] + (
        str(e.ulysses or e.inner_ring) if e.ulysses or e.inner_ring else ""
    )
    return Shape(
        {"dp_shard": e.dp_shard, "tp": e.tp, "cp": e.cp},
        options=(option,) if e.cp > 1 and option else (),
    )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--nproc", type=int, default=8, help="ranks (default 8)")
    ap.add_argument("--seq-lens", default="256,1024,2048", help="stage lengths, tokens")
    ap.add_argument("--patterns", default="ring", help="CP patterns to consider (comma list)")
    ap.add_argument("--steps", type=int, default=4, help="steps per mesh (first not timed)")
    a = ap.parse_args()
    patterns = a.patterns.split(",")
    failed = False
    lines = [
        "| seq_len | global batch | meshes | planner's choice | its tokens/s/rank | best measured "
        "| best tokens/s/rank | ratio | target |",
        "|---:|---:|---:|---|---:|---|---:|---:|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for seq_len in map(int, a.seq_lens.split(",")):
            recipe = stage_recipe(tmp, seq_len, patterns)
            cfg = load_config([
                "--job.config_file", str(recipe),
                "--parallelism.data_parallel_shard_degree", "-1",
            ])  # fmt: skip
            stage = plan_curriculum(cfg, a.nproc)[0]
            candidates = [e for e in stage.mesh_plan if e.fits]
            measured: dict[str, float] = {}
            for e in candidates:
                shape = shape_of(e)
                local = max(
                    1, min(cfg.training.local_batch_size, stage.global_batch_size // (e.dp_shard))
                )
                args = shape_args(
                    ROOT / "train_configs" / "debug_cpu.toml",
                    shape,
                    tmp / f"runs_{seq_len}",
                    a.steps,
                    stage.global_batch_size,
                    (
                        "--training.seq_len", str(seq_len),
                        "--training.local_batch_size", str(local),
                    ),
                )  # fmt: skip
                row = run_shape(shape, "cpinner", args, warmup=1, timeout=900)
                if row.status != "ok":
                    print(f"seq {seq_len} {e.label}: {row.status} {row.detail}", file=sys.stderr)
                    continue
                measured[e.label] = row.tokens_per_sec
                print(f"seq {seq_len:5d}  {e.label:34s} est {e.step_sec:.3g} s  measured "
                      f"{row.tokens_per_sec:8,.0f} tokens/s/rank", flush=True)  # fmt: skip
            if not measured:
                print(f"seq {seq_len}: nothing trained", file=sys.stderr)
                return 1
            choice = candidates[0].label
            best = max(measured, key=lambda k: measured[k])
            ratio = measured.get(choice, 0.0) / measured[best]
            ok = ratio >= TARGET
            failed |= not ok
            lines.append(
                f"| {seq_len} | {stage.global_batch_size} | {len(measured)} | {choice} | "
                f"{measured.get(choice, 0.0):,.0f} | {best} | {measured[best]:,.0f} | "
                f"{ratio:.2f} | >= {TARGET:.2f}: {'PASS' if ok else 'FAIL'} |"
            )
            spread = statistics.pstdev(measured.values()) / statistics.fmean(measured.values())
            print(f"seq {seq_len}: {len(measured)} meshes, tokens/s spread {spread:.0%}")
    print(f"\n{a.nproc} CPU ranks, debugmodel_cpu, {TOKENS_PER_STEP} tokens/step, patterns "
          f"{','.join(patterns)}, {a.steps} steps per mesh (first not timed)\n")  # fmt: skip
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
