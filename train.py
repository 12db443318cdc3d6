"""Entry point.

``torchrun --nproc_per_node N train.py --job.config_file recipe.toml [--section.key value ...]``
"""

import sys

from torchtitan_ext.trainer import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
