"""Recipe loading: TorchTitan 0.2.2's JobConfig plus torchtitan_ext's sections.

The config layer is the bottom of the package (it imports nothing of torchtitan_ext but the leaf
``errors``): ``schema`` (our sections), ``tables`` (key tables), ``manager`` (TOML + CLI ->
JobConfig). The rule table that validates a loaded recipe against the features,
``torchtitan_ext.validate``, sits above the features and is imported by its own name.

``python -m torchtitan_ext.config --job.config_file X.toml [--world_size N] [overrides]``
validates a recipe and prints the resolved config.
"""

from torchtitan_ext.config.manager import load_config
from torchtitan_ext.errors import ConfigError

__all__ = ["ConfigError", "load_config"]
