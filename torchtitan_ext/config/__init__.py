"""Recipe loading and validation: TorchTitan 0.2.2's JobConfig plus torchtitan_ext's sections.

``python -m torchtitan_ext.config --job.config_file X.toml [--world_size N] [overrides]``
validates a recipe and prints the resolved config.
"""

from torchtitan_ext.config.manager import load_config
from torchtitan_ext.config.validate import validate
from torchtitan_ext.errors import ConfigError

__all__ = ["ConfigError", "load_config", "validate"]
