"""Review checks of ``cp_patterns`` on real gloo ranks: every kernel's logsumexp layout through
Ulysses and hybrid, the double ring's fp32 accumulation, and torch.compile with each pattern.

The CUDA kernels cannot run here, so their logsumexp layouts are emulated: the CPU flash op
computes, and its logsumexp is handed over in the shape torch's meta registration of each CUDA
op gives (cuDNN (B, H, S, 1), memory-efficient padded to a multiple of 32 with +inf, flash
(B, H, S)); the emulated backward refuses any other layout than its forward's for the same
queries, and a +inf-free padding. The patterns run through the same entry points torch's CP
dispatch calls (``_templated_ring_attention`` and its backward).
"""

import math
from typing import Any

import torch
import torch.nn.functional as F

from tests.conftest import spawn

aten = torch.ops.aten
_CPU_FWD = aten._scaled_dot_product_flash_attention_for_cpu.default
_CPU_BWD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
_META_FWD = {
    "cpu_flash": lambda q: _CPU_FWD(q, q, q),
    "cuda_flash": lambda q: aten._scaled_dot_product_flash_attention.default(q, q, q),
    "efficient": lambda q: aten._scaled_dot_product_efficient_attention.default(
        q, q, q, None, True
    ),
    "cudnn": lambda q: aten._scaled_dot_product_cudnn_attention.default(q, q, q, None, True),
}
"""The logsumexp each kernel returns for a query (its meta registration, on meta tensors)."""


def _kernel_lse_shape(backend: str, query: torch.Tensor) -> tuple[int, ...]:
    meta = torch.empty(query.shape, device="meta", dtype=query.dtype)
    return tuple(_META_FWD[backend](meta)[1].shape)


class _EmulatedKernel:
    """The CPU flash op with ``backend``'s logsumexp layout, forward and backward (the ``op``
    torch's ring and the patterns call)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: Any
    ) -> tuple[torch.Tensor, ...]:
        is_causal = bool(kwargs.get("is_causal", False))
        out, lse = _CPU_FWD(query, key, value, is_causal=is_causal, scale=kwargs.get("scale"))
        if self.backend == "cpu_flash":
            return out, lse  # the real op's own (strided) layout
        full = torch.full(_kernel_lse_shape(self.backend, query), math.inf)
        b, h, t = lse.shape
        full.view(b, h, -1)[..., :t] = lse
        return out, full

    def backward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: Any
    ) -> tuple[torch.Tensor, ...]:
        out, logsumexp, grad_out = kwargs["out"], kwargs["logsumexp"], kwargs["grad_out"]
        is_causal = bool(kwargs["is_causal"])
        expected = _kernel_lse_shape(self.backend, query)
        b, h, t = query.shape[:3]
        if tuple(logsumexp.shape) != expected:
            raise AssertionError(
                f"{self.backend} backward got logsumexp {tuple(logsumexp.shape)} for "
                f"{t} queries, its forward returns {expected}"
            )
        flat = logsumexp.reshape(b, h, -1)
        if not bool(torch.isinf(flat[..., t:]).all()):
            raise AssertionError(f"{self.backend} backward: logsumexp padding is not +inf")
        return _CPU_BWD(
            grad_out, query, key, value, out, flat[..., :t].contiguous(), 0.0, is_causal,
            scale=kwargs.get("scale"),
        )  # fmt: skip


def _ref_lse(q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = q.shape[2]
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), -math.inf)
    return scores.logsumexp(-1)


def _check_lse_layouts(rank: int, world_size: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental._attention import (
        _cp_options,
        _HeadTailLoadBalancer,
    )
    from torch.distributed.tensor.experimental._context_parallel import _attention

    import torchtitan_ext  # noqa: F401
    from torchtitan_ext.parallel import cp_patterns

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    group = mesh.get_group()
    failures = []
    # Ulysses over 4: 6 local tokens, 24 gathered (the efficient kernel pads to 32). Hybrid
    # 2 x ring 2: 32 local tokens, torch's ring merges 64- and 32-query blocks (its merger
    # needs unpadded blocks: the efficient kernel at multiples of 32, as for torch's ring).
    cases = [
        ("ulysses", 0, 6, True, True),
        ("ulysses", 0, 6, False, False),
        ("hybrid", 2, 32, True, True),
    ]
    for name, inner, s_local, lb, causal in cases:
        cp_patterns.register(mesh, cp_patterns.make_pattern(name, world_size, inner, 0))
        _cp_options.enable_load_balance = lb
        b, h, d, s = 2, 4, 8, s_local * world_size
        gen = torch.Generator().manual_seed(s)
        q, k, v, dout = (torch.randn(b, h, s, d, generator=gen) for _ in range(4))
        rq, rk, rv = (x.clone().requires_grad_() for x in (q, k, v))
        ref_out = F.scaled_dot_product_attention(rq, rk, rv, is_causal=causal)
        ref_out.backward(dout)
        refs = [ref_out.detach(), _ref_lse(q, k, causal)]
        refs += [x.grad for x in (rq, rk, rv) if x.grad is not None]
        balancer = _HeadTailLoadBalancer(s, world_size, "cpu") if lb else None
        index = balancer._generate_indices()[0] if balancer else torch.arange(s)
        restore = balancer._generate_indices(restore=True)[0] if balancer else torch.arange(s)

        def local(x: torch.Tensor, dim: int = 2) -> torch.Tensor:
            return x.index_select(dim, index).chunk(world_size, dim=dim)[rank].contiguous()  # noqa: B023

        lq, lk, lv, ldout = (local(x) for x in (q, k, v, dout))
        for backend in _META_FWD:
            kernel = _EmulatedKernel(backend)
            label = f"{name} lb={lb} causal={causal} {backend}"
            try:
                out, lse = _attention._templated_ring_attention(
                    group, 2, kernel.forward, lq, lk, lv, is_causal=causal
                )[:2]
                want = _kernel_lse_shape(backend, lq)
                if backend != "cpu_flash" and tuple(lse.shape) != want:
                    failures.append(f"{label}: returned logsumexp {tuple(lse.shape)}, not {want}")
                lse_vals = lse.reshape(b, h, -1)[..., :s_local]
                grads = _attention._templated_ring_attention_backward(
                    group, 2, kernel.backward, ldout, "grad_out", lq, lk, lv, out, lse, causal
                )[:3]
            except (AssertionError, RuntimeError, ValueError) as e:
                failures.append(f"{label}: {type(e).__name__}: {e}")
                continue
            got = []
            for x in (out, lse_vals.unsqueeze(-1), *grads):
                parts = [torch.empty_like(x) for _ in range(world_size)]
                dist.all_gather(parts, x.contiguous())
                got.append(torch.cat(parts, dim=2).index_select(2, restore))
            got[1] = got[1].squeeze(-1)
            errs = [float((g - r).abs().max()) for g, r in zip(got, refs, strict=True)]
            if not max(errs) < 1e-4:
                failures.append(f"{label}: out/lse/dq/dk/dv max err {[f'{e:.1e}' for e in errs]}")
    cp_patterns.register(mesh, cp_patterns.CPPattern("ring", world_size))
    assert not failures, "\n".join(failures)


def test_cp_lse_layout_every_kernel_through_ulysses_and_hybrid():
    """[lse_layout] Ulysses and hybrid with each logsumexp layout torch's CP dispatch hands
    over (CPU flash, CUDA flash, memory-efficient, cuDNN): output, logsumexp and q/k/v
    gradients against single-device fp32 SDPA, and each kernel's backward gets its forward's
    layout."""
    spawn(_check_lse_layouts, 4)


def test_cp_lse_layout_check_kernel_lse():
    """[lse_layout] The one-device check a GPU script runs on real kernels
    (``cp_patterns.check_kernel_lse``), here on the CPU op and the emulated layouts: every
    layout goes through the Ulysses exchange code and back unchanged; an unknown layout is one
    clear error."""
    import pytest

    from torchtitan_ext.parallel import cp_patterns

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 8, generator=gen) for _ in range(3))
    for backend in _META_FWD:
        for u, causal in ((2, True), (4, True), (2, False)):
            err = cp_patterns.check_kernel_lse(
                _EmulatedKernel(backend).forward, q, k, v, ulysses_degree=u, is_causal=causal
            )
            assert err < 1e-5, (backend, u, causal, err)

    def odd_kernel(query: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return query, torch.zeros(2, 4, 25)

    with pytest.raises(RuntimeError, match=r"unknown logsumexp layout \(2, 4, 25\) for 24"):
        cp_patterns.check_kernel_lse(odd_kernel, q, k, v)
