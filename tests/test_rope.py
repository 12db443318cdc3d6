"""RoPE scalings against reference formulas written out here from the papers (Llama 3.1's
``apply_scaling`` in Meta's reference code; YaRN, arXiv 2309.00071 section 3, as Hugging Face
transformers' ``_compute_yarn_parameters`` computes it), and their use by the model."""

import math

import pytest
import torch

from torchtitan_ext.rope import RopeScaling, apply_rope_scaling, freqs_cis, inv_freq

HEAD_DIM, THETA = 64, 500000.0


def _base(i: int) -> float:
    return 1.0 / THETA ** (2 * i / HEAD_DIM)


def _llama_reference(factor: float, low: float, high: float, ctx: int) -> list[float]:
    out = []
    for i in range(HEAD_DIM // 2):
        f = _base(i)
        wavelen = 2 * math.pi / f
        if wavelen < ctx / high:
            out.append(f)
        elif wavelen > ctx / low:
            out.append(f / factor)
        else:
            smooth = (ctx / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out


def _yarn_reference(factor: float, ctx: int, fast: float, slow: float) -> list[float]:
    def dim_of(rotations: float) -> float:  # r(d) = ctx / wavelength(d) = rotations
        return HEAD_DIM * math.log(ctx / (rotations * 2 * math.pi)) / (2 * math.log(THETA))

    lo, hi = max(math.floor(dim_of(fast)), 0), min(math.ceil(dim_of(slow)), HEAD_DIM - 1)
    out = []
    for i in range(HEAD_DIM // 2):
        ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)  # 0: extrapolate, 1: interpolate
        out.append(_base(i) * (1 - ramp) + _base(i) / factor * ramp)
    return out


@pytest.mark.parametrize(
    ("scaling", "reference"),
    [
        (RopeScaling("none"), [_base(i) for i in range(HEAD_DIM // 2)]),
        (RopeScaling("llama"), _llama_reference(8.0, 1.0, 4.0, 8192)),
        (RopeScaling("llama", 4.0, 2048, 2.0, 8.0), _llama_reference(4.0, 2.0, 8.0, 2048)),
        (RopeScaling("yarn", 4.0, 4096), _yarn_reference(4.0, 4096, 32.0, 1.0)),
        (RopeScaling("yarn", 16.0, 8192, beta_fast=16.0, beta_slow=2.0),
         _yarn_reference(16.0, 8192, 16.0, 2.0)),
    ],
)  # fmt: skip
def test_frequencies_match_the_reference_formulas(scaling, reference):
    got, attention = inv_freq(HEAD_DIM, THETA, scaling)
    ref = torch.tensor(reference, dtype=torch.float64)
    assert torch.allclose(got.double(), ref, rtol=1e-6, atol=0), (got, ref)
    expected = 0.1 * math.log(scaling.factor) + 1 if scaling.kind == "yarn" else 1.0
    assert attention == pytest.approx(expected)
    table = freqs_cis(HEAD_DIM, 16, THETA, scaling)
    assert table.shape == (16, HEAD_DIM // 2) and table.dtype == torch.complex64
    assert torch.allclose(table.abs(), torch.full((16, HEAD_DIM // 2), attention), rtol=1e-6)
    assert torch.allclose(torch.angle(table[1]).double(), ref, rtol=1e-5)


def test_model_uses_the_scaling_and_llama_is_torchtitans():
    from torchtitan.models.llama3 import Transformer, llama3_args

    import torchtitan_ext.models  # noqa: F401  (registers the CPU flavors)

    args = llama3_args["debugmodel_cpu_tiny"]

    def build(scaling: RopeScaling | None) -> Transformer:
        model = Transformer(args)
        if scaling is not None:
            apply_rope_scaling(model, scaling)
        with torch.no_grad():
            model.init_weights()
        return model

    default, llama = build(None), build(RopeScaling("llama"))
    assert torch.equal(llama.freqs_cis, default.freqs_cis)  # TorchTitan's default, unchanged
    yarn = build(RopeScaling("yarn", 4.0, 64))
    head_dim = args.dim // args.n_heads
    assert torch.equal(
        yarn.freqs_cis,
        freqs_cis(head_dim, args.max_seq_len, args.rope_theta, RopeScaling("yarn", 4.0, 64)),
    )
    assert not torch.allclose(yarn.freqs_cis, default.freqs_cis)
