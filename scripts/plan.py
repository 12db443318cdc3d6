"""Dry run of a recipe for a world size this machine cannot run: per-rank memory from the real
mesh, pipeline split and parallelize function on torch's fake process group (no GPU, no
collectives), one representative rank per pipeline stage, every curriculum stage.

    .venv/bin/python scripts/plan.py --job.config_file train_configs/llama3_8b_curriculum_1m.toml \\
        --world_size 256 --budget-gib 80

The recipe (--job.config_file) is required: without one the plan would be of TorchTitan's
default model (llama3 debugmodel), not of anything meant to train. Options after these are
recipe overrides (--section.key value), as for train.py. --nproc is accepted for --world_size.

With model.attn_mask_type = "block_causal", each stage also says how much of the causal
attention work the data's documents keep (``tools.auto_mesh.masked_attention_fraction``: a
prepared corpus's document index, or a sample of other data's documents).

Parameters, gradients and optimizer state come from the rank's actual DTensor shards;
activations and the bytes sent per step by each kind of traffic are estimates (formulas and
sources in ``tools.memory_estimate.activation_estimate`` and
``tools.comm_estimate.comm_estimate``; checked against real runs by
``scripts/check_dry_run.py``).
"""

import argparse
import sys

from torchtitan_ext.config.manager import WORLD_SIZE_FLAGS, ConfigError, load_config
from torchtitan_ext.curriculum import stage_config
from torchtitan_ext.tools.auto_mesh import choose_stage_mesh, document_statistics
from torchtitan_ext.tools.dry_run import format_table, plan_rank, stage_ranks
from torchtitan_ext.validate import plan_curriculum, validate


def document_mask_note(cfg: object) -> str:
    """With block_causal: the share of the causal attention work the data's documents keep
    (what the planner's compute estimate uses), and that the ring's bytes do not shrink."""
    from torchtitan_ext.parallel.cp_block_causal import uses_block_causal
    from torchtitan_ext.validate import resolve_model_args

    args = resolve_model_args(cfg)
    if not uses_block_causal(args):
        return ""
    fraction, measured, total, mean = document_statistics(cfg, args)
    sends = "the ring still sends every K/V block (the table's cp column)"
    if not measured:
        return (
            "block_causal: attention counted as causal (an upper bound): the data's documents "
            f"could not be read; {sends}"
        )
    t = cfg.training  # type: ignore[attr-defined]
    source = "training.dataset_path" if t.dataset_path else f"training.dataset {t.dataset!r}"
    sample = f"{measured:,} documents" if measured == total else (
        f"a sample of {measured:,} of its {total:,} documents"
    )  # fmt: skip
    note = (
        f"block_causal: attention work {fraction:.3f} of causal (the document lengths of "
        f"{source}, {sample}, windows of seq_len); {sends}"
    )
    p = cfg.parallelism  # type: ignore[attr-defined]
    cp = int(p.context_parallel_degree)
    chunk = mean / (2 * cp)
    if p.context_parallel_load_balancer == "per_document_headtail" and cp > 1 and chunk < 128:
        note += (
            f"\nper_document_headtail: documents of {mean:,.0f} tokens on average are cut into "
            f"chunks of about {chunk:,.0f} tokens per cp rank, where each chunk's kernel call "
            "costs more than its FLOPs; parallelism.context_parallel_load_balancer = "
            "'per_document_lpt' (short documents whole on one rank) is the faster balancer for "
            "them (docs/context_parallel.md)"
        )
    if p.context_parallel_load_balancer in ("headtail", None) and cp > 1:
        note += (
            f"\n{p.context_parallel_load_balancer or 'no load balancing'}: balances a causal "
            "mask, not documents (the log's attn work max/min shows the cp ranks' spread); "
            "parallelism.context_parallel_load_balancer = 'per_document_lpt' evens the masked "
            "work (docs/context_parallel.md)"
        )
    return note


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line), plan, print; returns the exit status (2 on a
    bad recipe; argparse exits 2 on a missing option)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--job.config_file", "--job.config-file", dest="config", required=True, metavar="RECIPE",
        help="the recipe (TOML) to plan",
    )  # fmt: skip
    ap.add_argument(
        *WORLD_SIZE_FLAGS, dest="world_size", type=int, required=True, metavar="N",
        help="world size to plan for (the ranks of the run: nnodes x nproc_per_node)",
    )  # fmt: skip
    ap.add_argument(
        "--budget-gib", type=float, default=None, metavar="GIB",
        help="per-device memory budget in GiB: the fits column says whether each rank's\n"
        "total is within it (default: none, the column stays empty)",
    )  # fmt: skip
    ap.add_argument(
        "--ranks-per-node", type=int, default=8, metavar="N",
        help="consecutive ranks per node, for the CP traffic's inter-node part\n"
        "(default: %(default)s)",
    )  # fmt: skip
    a, overrides = ap.parse_known_args(argv)
    recipe_args = ["--job.config_file", a.config, *overrides]
    try:
        cfg = load_config(recipe_args)
        stages = plan_curriculum(cfg, a.world_size, choose_stage_mesh)
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
            note = document_mask_note(stage_cfg)
            if note:
                print(f"\n{note}")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
