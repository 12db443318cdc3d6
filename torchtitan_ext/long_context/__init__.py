"""Long context per device: memory features that let one device train longer sequences
(chunked cross-entropy, ...), applied by ``parallelize`` and the loss, never by editing the
model's code."""

from typing import Any

from torchtitan_ext.errors import ConfigError
from torchtitan_ext.rules import RecipeCheck, Rule


def check_local_sequence(cfg: Any, cp: int) -> None:
    """``training.loss_chunk_tokens`` and ``training.mlp_tile_tokens`` are at most the local
    sequence (seq_len / cp tokens), where they would save memory (a rule of
    ``validate.RULES``).

    Raises:
        ConfigError: naming the key, with the largest useful value.
    """
    local = cfg.training.seq_len // max(cp, 1)
    for key in ("loss_chunk_tokens", "mlp_tile_tokens"):
        tokens = getattr(cfg.training, key)
        if tokens > local:
            raise ConfigError(
                f"training.{key}",
                tokens,
                f"larger than the local sequence (seq_len {cfg.training.seq_len} / cp {cp} = "
                f"{local} tokens): it would not save memory; use at most {local}",
            )


def _long_context(c: RecipeCheck) -> None:
    check_local_sequence(c.cfg, c.cfg.parallelism.context_parallel_degree)


RULES: tuple[Rule, ...] = (
    Rule(
        "recipe",
        ("training.loss_chunk_tokens", "training.mlp_tile_tokens"),
        "at most the local sequence (seq_len / cp)",
        _long_context,
        "long_context",
    ),
)
"""This module's recipe rules (``torchtitan_ext.rules``); ``validate.RULES`` lists them in
its table, in phase order."""
