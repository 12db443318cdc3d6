"""``model.converters``: TorchTitan 0.2.2's model converters on our model, of which this trainer
runs float8 training: every ``nn.Linear`` that ``[quantize.linear.float8]`` does not filter out
becomes torchao's ``Float8Linear`` (dynamic tensorwise scaling by default: its matmuls take
float8 e4m3 inputs and e5m2 output gradients, scaled per tensor, with bf16 / fp32 results).

Everything goes through TorchTitan's own code: its converter registry
(``torchtitan.protocols.model_converter.build_model_converters``) and float8 converter
(``torchtitan.components.quantization.float8.Float8LinearConverter``: the SM 8.9 check, the
``filter_fqns`` / ``recipe_name`` / ``emulate`` options, FSDP float8 all-gather and the scale
precomputation after each optimizer step), and, with tensor parallel and tensorwise scaling,
torchao's float8 TP styles as TorchTitan's ``apply_tp`` uses them. The conversion runs on the
meta-device model before any parallelism, as in TorchTitan's trainer.

TorchTitan 0.2.2's Llama 3 recipes spell the converter ``"float8"`` (``llama3_405b.toml``, and
``parallelize_llama`` tests for that name) while its registry holds it as
``"quantize.linear.float8"``: both names are accepted here (TorchTitan's own trainer raises
``KeyError: 'float8'`` on that recipe). torchao is imported only when a converter is built: on
a CUDA device of compute capability 8.9 or more (Ada, Hopper, Blackwell), or with
``quantize.linear.float8.emulate = true`` in eager mode (TorchTitan's test mode, which emulates
the float8 casts in high precision on any device). Elsewhere the ``device`` phase refuses the
recipe in one line; the checker without a world size (``recipe`` and ``trainer`` phases) passes
it, so TorchTitan's 405B recipe checks on any machine.
"""

import copy
import dataclasses
import importlib.util
import logging
from typing import Any

import torch

from torchtitan_ext.config.tables import FLOAT8_CONVERTERS
from torchtitan_ext.errors import ConfigError
from torchtitan_ext.rules import RecipeCheck, Rule

logger = logging.getLogger("torchtitan_ext")

FLOAT8_REGISTRY_NAME = "quantize.linear.float8"
"""The float8 converter's name in TorchTitan 0.2.2's converter registry."""
FLOAT8_MIN_CAPABILITY = (8, 9)
"""CUDA compute capability of float8 tensor cores (TorchTitan's ``has_cuda_capability(8, 9)``)."""


def float8_enabled(cfg: Any) -> bool:
    """Whether ``model.converters`` asks for float8 (either spelling)."""
    return any(c in FLOAT8_CONVERTERS for c in cfg.model.converters)


def float8_tensorwise_tp(cfg: Any) -> bool:
    """Whether tensor parallel uses torchao's float8 TP styles: float8 with tensorwise scaling
    (TorchTitan's ``enable_float8_tensorwise_tp``; rowwise recipes all-gather in bf16)."""
    recipe = cfg.quantize.linear.float8.recipe_name
    return float8_enabled(cfg) and recipe not in ("rowwise", "rowwise_with_gw_hp")


def float8_problem(cfg: Any, device: torch.device) -> str | None:
    """Why float8 cannot run on ``device`` (None when it can, or when it is off).

    Float8 needs torchao and either a CUDA device of compute capability >= 8.9 or
    ``quantize.linear.float8.emulate`` without ``torch.compile`` (TorchTitan's rule)."""
    if not float8_enabled(cfg):
        return None
    compiled = cfg.compile.enable and "model" in cfg.compile.components
    emulated = cfg.quantize.linear.float8.emulate and not compiled
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < FLOAT8_MIN_CAPABILITY and not emulated:
            return (
                f"float8 matmuls need a CUDA GPU of compute capability 8.9 or more (Ada, "
                f"Hopper); {torch.cuda.get_device_name(device)} has "
                f"{capability[0]}.{capability[1]}: remove it from model.converters"
            )
    elif not emulated:
        return (
            f"float8 matmuls need a CUDA GPU of compute capability 8.9 or more; this run is on "
            f"{device.type}: remove it from model.converters, or set "
            f"quantize.linear.float8.emulate = true with compile off to emulate it (tests)"
        )
    if importlib.util.find_spec("torchao") is None:
        return "float8 training needs torchao (pip install torchao)"
    return None


def build_converters(cfg: Any, dims: Any) -> Any:
    """TorchTitan's ``ModelConvertersContainer`` for ``model.converters`` (``"float8"`` read as
    its registry name), or None when the list is empty. ``convert(model)`` converts in place;
    ``post_optimizer_hook(model_parts)`` runs after each optimizer step.

    Args:
        cfg: the merged JobConfig (``model.converters``, ``quantize``, ``compile``).
        dims: the job's ``ParallelDims`` (FSDP float8 all-gather needs ``dp_shard > 1``).

    Raises:
        ValueError, ImportError: from TorchTitan's converter, when the ``device`` phase did not
            run (it refuses such recipes first).
    """
    if not cfg.model.converters:
        return None
    import torchtitan.components.quantization  # noqa: F401  (registers the converters)
    from torchtitan.protocols.model_converter import build_model_converters

    names = [FLOAT8_REGISTRY_NAME if c == "float8" else c for c in cfg.model.converters]
    job = copy.copy(cfg)
    job.model = dataclasses.replace(cfg.model, converters=list(dict.fromkeys(names)))
    # TorchTitan's converter reads only ParallelDims.dp_shard_enabled.
    return build_model_converters(job, _TitanDims(dp_shard_enabled=dims.dp_shard > 1))


@dataclasses.dataclass(frozen=True)
class _TitanDims:
    """What TorchTitan's float8 converter reads of its ``ParallelDims``."""

    dp_shard_enabled: bool


def _float8_device(c: RecipeCheck) -> None:
    assert c.device is not None
    problem = float8_problem(c.cfg, c.device)
    if problem is not None:
        raise ConfigError("model.converters", list(c.cfg.model.converters), problem)


RULES: tuple[Rule, ...] = (
    Rule(
        "device",
        ("model.converters", "quantize.linear.float8.emulate"),
        "float8 needs CUDA with compute capability >= 8.9 (or emulate, eager) and torchao",
        _float8_device,
        "converters",
    ),
)
"""This module's recipe rules (``torchtitan_ext.rules``); ``validate.RULES`` lists them in
its table, in phase order."""
