"""Entry point.

``torchrun --nproc_per_node N train.py --job.config_file recipe.toml [--section.key value ...]``
"""

import sys

from torchtitan_ext.distributed import run_and_exit
from torchtitan_ext.trainer import main

if __name__ == "__main__":
    # Exits with main's status on every path (an unexpected exception: its traceback and 1),
    # without interpreter finalization, which can abort on gloo: see distributed.exit_process.
    run_and_exit(lambda: main(sys.argv[1:]))
