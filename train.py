"""Entry point.

``torchrun --nproc_per_node N train.py --job.config_file recipe.toml [--section.key value ...]``
"""

import os
import sys

from torchtitan_ext.trainer import main

if __name__ == "__main__":
    code = main(sys.argv[1:])
    # Leave without C++ static destructors: on CPU, a gloo process group still referenced at
    # interpreter teardown (after functional all-gathers such as CP's ring) sometimes aborts
    # with "terminate called without an active exception" after training succeeded.
    # Everything (metrics, tensorboard, checkpoints) is flushed and closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
