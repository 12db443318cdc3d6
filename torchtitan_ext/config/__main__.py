"""``python -m torchtitan_ext.config``: validate a recipe and print the resolved config.

Usage::

    python -m torchtitan_ext.config --job.config_file train_configs/debug_cpu.toml \
        [--world_size 8] [--section.key value ...]

``--help`` lists every option (``config.manager.format_help``), ``--list-rules`` every rule
(``validate.RULES``). The world size (``--world_size``, also spelled ``--world-size`` or
``--nproc``, as in the scripts) defaults to ``$WORLD_SIZE`` when set (as under torchrun). With a
world size it runs every check ``train.py`` runs before reading data
(``validate.check_recipe``: each curriculum stage, whose plan it prints, the mesh, what the
trainer supports, the device and torch); without one, the ``recipe`` and ``trainer`` phases.
Exit status 0 and the resolved config as TOML on stdout (then, as TOML comments, the mesh, the
plan and ``# note:`` lines for settings the device leaves off, e.g. memory snapshots on CPU);
on a bad recipe, exit status 2 and one
line on stderr naming the key and the value.
"""

import os
import sys

from torchtitan_ext.config.manager import (
    WORLD_SIZE_FLAGS,
    ConfigError,
    format_help,
    format_toml,
    help_requested,
    load_config,
    pop_world_size_arg,
)
from torchtitan_ext.curriculum import format_plan
from torchtitan_ext.tools.auto_mesh import choose_stage_mesh
from torchtitan_ext.validate import (
    check_recipe,
    derived_batch_note,
    format_rules,
    global_batch_size,
    stage_batch_note,
)

PROG = "python -m torchtitan_ext.config"

DESCRIPTION = """Check a recipe without training and print the resolved config as TOML (exit
status 0), or one line naming the bad key and value (exit status 2).

With a world size, every check train.py makes before reading data (each curriculum stage,
whose plan it prints, the mesh, what the trainer supports, the device and torch); without
one, the checks that need no world size."""

WORLD_SIZE_HELP = (
    "World size to check the recipe for (torchrun's nnodes x nproc_per_node). Default: "
    "$WORLD_SIZE when set, else none (only the checks that need no world size). The scripts "
    "take the same spellings (--nproc: their older one)."
)


LIST_RULES_FLAG = "--list-rules"
LIST_RULES_HELP = (
    "Print every rule a recipe is checked against (validate.RULES), by phase, with the "
    "keys each judges and the module that owns it, and exit."
)


def help_text() -> str:
    """``--help``'s text: every recipe option plus ``--world_size`` and ``--list-rules``."""
    flags = ", ".join(f"{flag} N" for flag in WORLD_SIZE_FLAGS)
    extra = [(flags, WORLD_SIZE_HELP), (LIST_RULES_FLAG, LIST_RULES_HELP)]
    return format_help(PROG, DESCRIPTION, extra)


def main(args: list[str]) -> int:
    """Entry point; returns the process exit status."""
    if help_requested(args):
        sys.stdout.write(help_text())
        return 0
    if LIST_RULES_FLAG in args:
        sys.stdout.write(format_rules())
        return 0
    try:
        args, world_size = pop_world_size_arg(args)
        if world_size is None and os.environ.get("WORLD_SIZE"):
            world_size = int(os.environ["WORLD_SIZE"])
        cfg = load_config(args)
        # train.py's own checks (every phase of RULES but data; without a world size, those
        # that need none); the mesh shown is the first stage's.
        check = check_recipe(cfg, world_size, mesh_planner=choose_stage_mesh)
        dims, stages, notes = check.dims, check.stages, check.notes
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(format_toml(cfg))
    if dims is not None:
        print(f"\n# mesh for world size {world_size}: {dims.shape_str()}")
        if not stages:
            t = cfg.training
            print(f"# global batch: {global_batch_size(cfg, dims)} x {t.seq_len} tokens")
        note = derived_batch_note(cfg, dims)
        if note is not None:
            print(f"# warning: {note}")
    for note in notes:  # settings this device leaves off (the recipe still runs)
        print(f"# note: {note}")
    if stages:
        print(
            "# curriculum:\n"
            + "\n".join(f"#   {line}" for line in format_plan(stages).splitlines())
        )
        replicate = cfg.parallelism.data_parallel_replicate_degree
        for stage in stages:
            note = stage_batch_note(stage, replicate)
            if note is not None:
                print(f"# warning: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
