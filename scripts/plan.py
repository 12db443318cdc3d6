"""Dry run of a recipe for a world size this machine cannot run: per-rank memory from the real
mesh, pipeline split and parallelize function on torch's fake process group (no GPU, no
collectives), one representative rank per pipeline stage, every curriculum stage.

    .venv/bin/python scripts/plan.py --job.config_file train_configs/llama3_8b_curriculum_1m.toml \\
        --world_size 256 --budget-gib 80

Parameters, gradients and optimizer state come from the rank's actual DTensor shards;
activations and the bytes sent per step by each kind of traffic are estimates (formulas and
sources in ``torchtitan_ext.dry_run.activation_estimate`` and ``comm_estimate``; checked against
real runs by ``scripts/check_dry_run.py``).
"""

import argparse
import sys

from torchtitan_ext.config.manager import ConfigError, load_config
from torchtitan_ext.config.validate import validate
from torchtitan_ext.curriculum import plan_curriculum, stage_config
from torchtitan_ext.dry_run import format_table, plan_rank, stage_ranks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--world_size", type=int, required=True)
    ap.add_argument("--budget-gib", type=float, default=None, help="per-device memory budget")
    ap.add_argument(
        "--ranks-per-node", type=int, default=8,
        help="consecutive ranks per node, for the CP traffic's inter-node part",
    )  # fmt: skip
    a, recipe_args = ap.parse_known_args()
    try:
        cfg = load_config(recipe_args)
        stages = plan_curriculum(cfg, a.world_size)
        configs = [(f"stage {s.index} (seq_len {s.seq_len}, cp {s.cp})", stage_config(cfg, s))
                   for s in stages] or [(f"seq_len {cfg.training.seq_len}", cfg)]  # fmt: skip
        for title, stage_cfg in configs:
            dims = validate(stage_cfg, a.world_size)
            assert dims is not None
            plans = [
                plan_rank(stage_cfg, a.world_size, r, ranks_per_node=a.ranks_per_node)
                for r in stage_ranks(dims)
            ]
            print(f"\n## {title}: mesh {dims.shape_str()}\n")
            print(format_table(plans, a.budget_gib))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
