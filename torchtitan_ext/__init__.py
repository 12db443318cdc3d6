"""torchtitan_ext: DTensor-native 4D training for long-context LLMs on TorchTitan 0.2.2."""

__version__ = "0.1.0"
