"""Tables of recipe keys that several layers read: the keys a ``[[curriculum.stages]]`` table may
set (``curriculum`` checks them, ``--help`` lists them) and the TorchTitan settings this trainer
does not implement (the rule table checks them, ``--help`` marks them). Data only: imports
nothing of torchtitan_ext, so the config loader can read them without importing the features.
"""

from collections.abc import Callable
from typing import Any

STAGE_INT_KEYS = (
    "seq_len",
    "steps",
    "context_parallel_degree",
    "global_batch_size",
    "local_batch_size",
    "warmup_steps",
    "min_doc_tokens",
    "context_parallel_ulysses_degree",
    "context_parallel_inner_ring_degree",
    "rope_original_context",
)
STAGE_FLOAT_KEYS = (
    "rope_theta",
    "lr",
    "rope_scaling_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_yarn_beta_fast",
    "rope_yarn_beta_slow",
    "rope_yarn_attention_factor",
)
STAGE_STR_KEYS = ("context_parallel_pattern", "rope_scaling", "attn_mask_type", "mixture")
STAGE_BOOL_KEYS = ("auto_mesh",)
PATTERN_DEGREE_KEYS = ("context_parallel_ulysses_degree", "context_parallel_inner_ring_degree")
MESH_KEYS = ("context_parallel_degree", "context_parallel_pattern", *PATTERN_DEGREE_KEYS)
"""Stage keys that fix the stage's mesh (an auto-meshed stage may not set them)."""
STAGE_KEYS = STAGE_INT_KEYS + STAGE_FLOAT_KEYS + STAGE_STR_KEYS + STAGE_BOOL_KEYS
"""Keys a ``[[curriculum.stages]]`` table may set."""


def _enabled(v: Any) -> bool:
    return bool(v)


FLOAT8_CONVERTERS = ("float8", "quantize.linear.float8")
"""The float8 converter's names: TorchTitan 0.2.2's Llama 3 recipes' and its registry's."""


UNSUPPORTED: list[tuple[str, Callable[[Any], bool], str]] = [
    (
        "parallelism.pipeline_parallel_schedule_csv",
        _enabled,
        "use one of torch's schedules by name",
    ),
    (
        "checkpoint.async_mode",
        lambda v: v not in ("disabled", "async"),
        "'disabled' or 'async' (the pinned-memory stager is not wired in)",
    ),
    ("checkpoint.create_seed_checkpoint", _enabled, "not needed: init is mesh-independent"),
    (
        "checkpoint.initial_load_in_hf_quantized",
        _enabled,
        "quantized HF checkpoints are not supported (initial_load_in_hf loads unquantized ones)",
    ),
    (
        "model.converters",
        lambda v: any(c not in FLOAT8_CONVERTERS for c in v),
        "only float8 (TorchTitan's quantize.linear.float8); mx is not supported",
    ),
    ("fault_tolerance.enable", _enabled, "not supported"),
    ("optimizer.early_step_in_backward", _enabled, "not supported"),
    ("comm.mode", lambda v: v != "default", "only 'default' is supported"),
    (
        "validation.dataset",
        lambda v: v != "c4_validation",  # TorchTitan's default, which every recipe carries
        "validation uses validation.dataset_path (local files or a prepared corpus), or the "
        "held-out data.validation_fraction of training.dataset",
    ),
]
"""TorchTitan settings this trainer does not implement (yet): ``(dotted key, is_bad(value),
why)``. Rejected, never silently ignored; ``--help`` marks them."""
