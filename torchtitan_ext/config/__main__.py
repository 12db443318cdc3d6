"""``python -m torchtitan_ext.config``: validate a recipe and print the resolved config.

Usage::

    python -m torchtitan_ext.config --job.config_file train_configs/debug_cpu.toml \
        [--world_size 8] [--section.key value ...]

The world size defaults to ``$WORLD_SIZE`` when set (as under torchrun). With a world size, a
curriculum recipe has every stage checked and its plan printed. Exit status 0 and the
resolved config as TOML on stdout; on a bad recipe, exit status 2 and one line on stderr naming
the key and the value.
"""

import os
import sys

from torchtitan_ext.config.manager import (
    ConfigError,
    format_toml,
    load_config,
    pop_world_size_arg,
)
from torchtitan_ext.config.validate import validate
from torchtitan_ext.curriculum import format_plan, plan_curriculum, stage_config


def main(args: list[str]) -> int:
    """Entry point; returns the process exit status."""
    try:
        args, world_size = pop_world_size_arg(args)
        if world_size is None and os.environ.get("WORLD_SIZE"):
            world_size = int(os.environ["WORLD_SIZE"])
        cfg = load_config(args)
        stages = []
        if cfg.curriculum.stages and world_size is not None:
            # Every stage is checked for the world size; the mesh shown is stage 0's.
            stages = plan_curriculum(cfg, world_size)
            dims = validate(stage_config(cfg, stages[0]), world_size)
        else:
            dims = validate(cfg, world_size)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(format_toml(cfg))
    if dims is not None:
        print(f"\n# mesh for world size {world_size}: {dims.shape_str()}")
    if stages:
        print(
            "# curriculum:\n"
            + "\n".join(f"#   {line}" for line in format_plan(stages).splitlines())
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
