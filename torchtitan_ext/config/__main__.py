"""``python -m torchtitan_ext.config``: validate a recipe and print the resolved config.

Usage::

    python -m torchtitan_ext.config --job.config_file train_configs/debug_cpu.toml \
        [--world_size 8] [--section.key value ...]

The world size defaults to ``$WORLD_SIZE`` when set (as under torchrun). With a world size it
runs every check ``train.py`` runs before reading data (``trainer.check_recipe``: each
curriculum stage, whose plan it prints, what the trainer supports, the device and torch);
without one, the checks that need no world size. Exit status 0 and the
resolved config as TOML on stdout; on a bad recipe, exit status 2 and one line on stderr naming
the key and the value.
"""

import os
import sys
from typing import Any

from torchtitan_ext.config.manager import (
    ConfigError,
    format_toml,
    load_config,
    pop_world_size_arg,
)
from torchtitan_ext.config.validate import validate
from torchtitan_ext.curriculum import format_plan


def main(args: list[str]) -> int:
    """Entry point; returns the process exit status."""
    try:
        args, world_size = pop_world_size_arg(args)
        if world_size is None and os.environ.get("WORLD_SIZE"):
            world_size = int(os.environ["WORLD_SIZE"])
        cfg = load_config(args)
        stages: list[Any] = []
        dims = None
        if world_size is not None:
            # train.py's own checks (every stage, trainer support, device and torch); the mesh
            # shown is the first stage's.
            from torchtitan_ext.trainer import check_recipe

            _, dims, stages, _ = check_recipe(cfg, world_size)
        else:
            validate(cfg, None)
            from torchtitan_ext.trainer import check_trainer_support

            check_trainer_support(cfg)
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
