"""Entry point.

``torchrun --nproc_per_node N train.py --job.config_file recipe.toml [--section.key value ...]``
"""

import sys

from torchtitan_ext.config.manager import format_help, help_requested
from torchtitan_ext.distributed import run_and_exit
from torchtitan_ext.tools.auto_mesh import choose_stage_mesh
from torchtitan_ext.trainer import main

DESCRIPTION = """Train a recipe on every rank torchrun starts:

    torchrun --nproc_per_node N train.py --job.config_file RECIPE.toml [--section.key VALUE ...]

The world size is torchrun's (--nnodes x --nproc_per_node); train.py takes no --world_size. To
check a recipe for a world size without training: python -m torchtitan_ext.config
--job.config_file RECIPE.toml --world_size N."""

if __name__ == "__main__":
    if help_requested(sys.argv[1:]):
        sys.stdout.write(format_help("train.py", DESCRIPTION))
        sys.exit(0)
    # Exits with main's status on every path (an unexpected exception: its traceback and 1),
    # without interpreter finalization, which can abort on gloo: see distributed.exit_process.
    # The planner of auto-meshed curriculum stages is handed in here, above the runtime.
    run_and_exit(lambda: main(sys.argv[1:], mesh_planner=choose_stage_mesh))
