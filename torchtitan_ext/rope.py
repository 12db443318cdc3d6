"""RoPE frequencies with the context-extension scalings long-context recipes use.

TorchTitan 0.2.2's Llama 3 always applies Llama 3.1's frequency scaling
(``precompute_freqs_cis`` with ``RoPEScalingArgs``: factor 8, low / high frequency factors 1 / 4,
original context 8192). ``model.rope_scaling`` chooses per recipe or curriculum stage:

- ``"llama"`` (the default: TorchTitan's behaviour, numerically unchanged): Llama 3.1's scaling
  (arXiv 2407.21783; Meta's reference ``apply_scaling``), computed by TorchTitan's function:
  wavelengths longer than original_context / low_freq_factor are divided by the factor, those
  shorter than original_context / high_freq_factor kept, the band between interpolated.
- ``"yarn"``: YaRN (arXiv 2309.00071, "NTK-by-parts" + attention temperature; Hugging Face
  transformers' ``_compute_yarn_parameters``): dimensions that turn fewer than beta_slow times
  over the original context are interpolated (divided by the factor), those that turn more than
  beta_fast times extrapolated (kept), a linear ramp between; cos and sin are multiplied by the
  attention factor (default 0.1 ln(factor) + 1), which scales q·k by its square.
- ``"none"``: plain RoPE, theta only.

The model stays TorchTitan's: ``apply_rope_scaling`` replaces the method its ``init_weights``
calls to fill the ``freqs_cis`` buffer, (max_seq_len, head_dim / 2) complex64.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchtitan.models.llama3.model.args import RoPEScalingArgs
from torchtitan.models.llama3.model.model import precompute_freqs_cis

SCALINGS = ("llama", "yarn", "none")
"""Values of ``model.rope_scaling``."""


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE context-extension scaling (module doc).

    Attributes:
        kind: one of ``SCALINGS``.
        factor: context extension factor s (>= 1; "llama", "yarn").
        original_context: the context (tokens) the frequencies were trained for.
        low_freq_factor, high_freq_factor: Llama 3.1's band edges (original_context / each is a
            wavelength in tokens).
        beta_fast, beta_slow: YaRN's ramp edges, in rotations over the original context.
        attention_factor: YaRN's scale of cos and sin (0: 0.1 ln(factor) + 1).
    """

    kind: str = "llama"
    factor: float = 8.0
    original_context: int = 8192
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 0.0


ROPE_KEYS: dict[str, str] = {
    "rope_scaling": "kind",
    "rope_scaling_factor": "factor",
    "rope_original_context": "original_context",
    "rope_low_freq_factor": "low_freq_factor",
    "rope_high_freq_factor": "high_freq_factor",
    "rope_yarn_beta_fast": "beta_fast",
    "rope_yarn_beta_slow": "beta_slow",
    "rope_yarn_attention_factor": "attention_factor",
}
"""``model.<key>`` (and curriculum stage key) -> ``RopeScaling`` field."""


def rope_scaling_of(cfg: Any) -> RopeScaling:
    """The ``RopeScaling`` of a recipe's ``model`` section."""
    return RopeScaling(**{field: getattr(cfg.model, key) for key, field in ROPE_KEYS.items()})


def check_rope_scaling(scaling: RopeScaling) -> tuple[str, object, str] | None:
    """(key, value, reason) of the first invalid setting, or None."""
    if scaling.kind not in SCALINGS:
        return "rope_scaling", scaling.kind, f"must be one of {', '.join(SCALINGS)}"
    if scaling.kind == "none":
        return None
    if not scaling.factor >= 1:
        return "rope_scaling_factor", scaling.factor, "must be >= 1"
    if scaling.original_context < 1:
        return "rope_original_context", scaling.original_context, "must be >= 1"
    if scaling.kind == "llama" and not 0 < scaling.low_freq_factor < scaling.high_freq_factor:
        return (
            "rope_high_freq_factor",
            scaling.high_freq_factor,
            f"must be greater than rope_low_freq_factor ({scaling.low_freq_factor}) > 0",
        )
    if scaling.kind == "yarn":
        if not 0 < scaling.beta_slow < scaling.beta_fast:
            return (
                "rope_yarn_beta_fast",
                scaling.beta_fast,
                f"must be greater than rope_yarn_beta_slow ({scaling.beta_slow}) > 0",
            )
        if scaling.attention_factor < 0:
            return "rope_yarn_attention_factor", scaling.attention_factor, "must be >= 0"
    return None


def inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> tuple[torch.Tensor, float]:
    """(head_dim / 2,) fp32 rotation frequencies (radians per token) and the cos/sin scale."""
    exponents = torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim
    base = 1.0 / (theta**exponents)
    if scaling.kind == "none":
        return base, 1.0
    if scaling.kind == "llama":
        # TorchTitan's own computation: its position-1 row is exp(i x freq), freq <= 1 rad.
        row = precompute_freqs_cis(head_dim, 2, theta, _llama_args(scaling))[1]
        return torch.angle(row).float(), 1.0
    s, ctx = scaling.factor, scaling.original_context

    def correction_dim(rotations: float) -> float:
        # The dimension pair whose wavelength fits ``rotations`` times into the context.
        return head_dim * math.log(ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = float(max(math.floor(correction_dim(scaling.beta_fast)), 0))
    high = float(min(math.ceil(correction_dim(scaling.beta_slow)), head_dim - 1))
    if low == high:
        high += 0.001  # as the reference: avoid a zero division
    ramp = ((torch.arange(head_dim // 2).float() - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the frequency, 0: divide it by the factor
    freqs = base / s * (1 - extrapolate) + base * extrapolate
    attention = scaling.attention_factor or (0.1 * math.log(s) + 1.0 if s > 1 else 1.0)
    return freqs, attention


def _llama_args(scaling: RopeScaling) -> RoPEScalingArgs:
    return RoPEScalingArgs(
        scaling_factor=scaling.factor,
        low_freq_factor=scaling.low_freq_factor,
        high_freq_factor=scaling.high_freq_factor,
        original_max_position_embeddings=scaling.original_context,
    )


def freqs_cis(head_dim: int, max_seq_len: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """(max_seq_len, head_dim / 2) complex64: attention-factor x exp(i x position x freq)
    ("llama": TorchTitan's ``precompute_freqs_cis`` itself)."""
    if scaling.kind == "llama":
        return precompute_freqs_cis(head_dim, max_seq_len, theta, _llama_args(scaling))
    freqs, attention = inv_freq(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_seq_len).float(), freqs)
    return torch.polar(torch.full_like(angles, attention), angles)


def apply_rope_scaling(model: nn.Module, scaling: RopeScaling) -> None:
    """Make the TorchTitan Llama ``model``'s ``init_weights`` fill ``freqs_cis`` with
    ``scaling`` (call before it; the model's args give head_dim, max_seq_len and theta)."""
    args: Any = getattr(model, "model_args")  # noqa: B009  (TorchTitan's Transformer)
    head_dim = args.dim // args.n_heads

    def precompute() -> torch.Tensor:
        return freqs_cis(head_dim, args.max_seq_len, args.rope_theta, scaling)

    object.__setattr__(model, "_precompute_freqs_cis", precompute)  # an instance override
