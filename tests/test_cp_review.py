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

import pytest
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


def _check_lse_layouts(rank: int, world_size: int, mesh: Any) -> list[str]:
    import torch.distributed as dist
    from torch.distributed.tensor.experimental._attention import (
        _cp_options,
        _HeadTailLoadBalancer,
    )
    from torch.distributed.tensor.experimental._context_parallel import _attention

    import torchtitan_ext  # noqa: F401
    from torchtitan_ext.parallel import cp_patterns

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
    return failures


def _gather(x: torch.Tensor, world_size: int, restore: torch.Tensor) -> torch.Tensor:
    """The whole sequence of a (B, H, S / cp, D) shard, in token order."""
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=2).index_select(2, restore)


def _check_double_ring_fp32(rank: int, world_size: int, mesh: Any) -> list[str]:
    """bf16 causal head-tail attention through torch's ring and the double ring (inner 2 x
    outer 2), both against single-device fp32 SDPA on the same bf16 inputs: the double ring
    must be as accurate as torch's ring (which rounds once, at the end), within 2%."""
    from torch.distributed.tensor.experimental._attention import (
        _cp_options,
        _HeadTailLoadBalancer,
    )
    from torch.distributed.tensor.experimental._context_parallel import _attention

    from torchtitan_ext.parallel import cp_patterns

    group = mesh.get_group()
    _cp_options.enable_load_balance = True
    b, h, d, s = 1, 4, 32, 64 * world_size
    gen = torch.Generator().manual_seed(7)
    q, k, v, dout = (torch.randn(b, h, s, d, generator=gen).bfloat16() for _ in range(4))
    rq, rk, rv = (x.float().requires_grad_() for x in (q, k, v))
    ref_out = F.scaled_dot_product_attention(rq, rk, rv, is_causal=True)
    ref_out.backward(dout.float())
    refs = [ref_out.detach()] + [x.grad for x in (rq, rk, rv) if x.grad is not None]
    balancer = _HeadTailLoadBalancer(s, world_size, "cpu")
    index, restore = balancer._generate_indices()[0], balancer._generate_indices(restore=True)[0]
    lq, lk, lv, ldout = (
        x.index_select(2, index).chunk(world_size, dim=2)[rank].contiguous()
        for x in (q, k, v, dout)
    )
    errs = {}
    for name in ("ring", "double_ring"):
        cp_patterns.register(mesh, cp_patterns.make_pattern(name, world_size, 0, 2))
        out, lse = _attention._templated_ring_attention(
            group, 2, aten._scaled_dot_product_flash_attention_for_cpu, lq, lk, lv, is_causal=True
        )[:2]
        grads = _attention._templated_ring_attention_backward(
            group, 2, _CPU_BWD, ldout, "grad_out", lq, lk, lv, out, lse, True, dropout_p=0.0
        )[:3]
        got = [_gather(x, world_size, restore) for x in (out, *grads)]
        errs[name] = [
            float((g.float() - r).norm() / r.norm()) for g, r in zip(got, refs, strict=True)
        ]
    cp_patterns.register(mesh, cp_patterns.CPPattern("ring", world_size))
    ring, double = errs["ring"], errs["double_ring"]
    if all(e2 <= 1.02 * e1 for e1, e2 in zip(ring, double, strict=True)):
        return []
    return [
        "bf16 double ring out/dq/dk/dv rel err vs fp32 "
        f"{[f'{e:.3e}' for e in double]}, torch's ring {[f'{e:.3e}' for e in ring]} (bound 1.02x)"
    ]


class _Block(torch.nn.Module):
    """A block whose inner attention module carries the CP style, compiled whole as
    TorchTitan's ``apply_compile`` compiles each TransformerBlock, but without
    ``fullgraph``: on torch 2.13 dynamo cannot trace the ``DTensor.from_local`` of torch's
    ``_ContextParallel`` input hook (``torch._C._DTensor_compute_global_tensor_info``), for
    every pattern, torch's ring too; the graph breaks there and the attention, patterns
    included, is traced into the compiled graph at the SDPA."""

    def __init__(self) -> None:
        super().__init__()
        self.inner_attention = _Attention()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.inner_attention(q * 1.0, k, v) * 1.0


class _Attention(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _check_compile(rank: int, world_size: int, mesh: Any) -> list[str]:
    """Ulysses, hybrid and double ring under torch.compile: forward output and q/k/v gradients
    of two compiled steps equal to eager, and the pattern executed in each (``calls`` counts
    executions inside the compiled graph, not the trace), so a fall-back to torch's ring under
    compile shows."""
    from torch.distributed.tensor.experimental._attention import (
        _context_parallel_shard,
        _ContextParallel,
        _cp_options,
        _enable_context_parallel_dispatcher,
        _HeadTailLoadBalancer,
    )
    from torch.distributed.tensor.parallel import parallelize_module

    from torchtitan_ext.parallel import cp_patterns

    _cp_options.enable_load_balance = True
    _enable_context_parallel_dispatcher()
    b, h, d, s = 2, 4, 8, 8 * world_size
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(b, h, s, d, generator=gen) for _ in range(4)]
    balancer = _HeadTailLoadBalancer(s, world_size, "cpu")
    shards = [
        x
        for x in _context_parallel_shard(
            mesh, inputs, seq_dims=(2, 2, 2, 2), load_balancer=balancer
        )
        if isinstance(x, torch.Tensor)
    ]
    failures = []
    for name, inner, backend in _COMPILED:
        cp_patterns.register(mesh, cp_patterns.make_pattern(name, world_size, inner, inner))
        torch._dynamo.reset()
        block = _Block()
        style = _ContextParallel(seq_dim=2, attention_type=_ContextParallel.AttentionType.SDPA)
        parallelize_module(block.inner_attention, mesh, style)
        runs: dict[str, list[torch.Tensor]] = {}
        for mode, fn in (
            ("eager", block),
            ("compiled", torch.compile(block, backend=backend)),
        ):
            before = cp_patterns.calls.copy()
            for _ in range(2):
                lq, lk, lv = (x.detach().clone().requires_grad_() for x in shards[:3])
                out = fn(lq, lk, lv)
                out.backward(shards[3])
            runs[mode] = [out.detach()] + [x.grad for x in (lq, lk, lv) if x.grad is not None]
            ran = (cp_patterns.calls[name] - before[name],
                   cp_patterns.calls[name + "_backward"] - before[name + "_backward"])  # fmt: skip
            if ran != (2, 2):
                failures.append(
                    f"{name} {mode}: pattern forward/backward ran {ran} times in 2 steps, not 2"
                )
        errs = [
            float((c - e).abs().max()) for c, e in zip(runs["compiled"], runs["eager"], strict=True)
        ]
        if len(errs) != 4 or max(errs) > 1e-5:
            failures.append(f"{name}: compiled vs eager out/dq/dk/dv max abs diff {errs}")
    cp_patterns.register(mesh, cp_patterns.CPPattern("ring", world_size))
    return failures


_COMPILED = (
    ("ulysses", 0, "aot_eager"),
    ("hybrid", 2, "aot_eager"),
    ("double_ring", 2, "aot_eager"),
)
"""Pattern, inner degree, compile backend. aot_eager runs the graph AOT autograd traces (where
DTensor's dispatch, hence the choice of pattern or torch's ring, happens) without code
generation; inductor (the training default; it C++-compiles on CPU) gives the same numbers
but leaves the counting op out of its code (``cp_patterns.calls``)."""
_CHECKS = {
    "lse_layout": _check_lse_layouts,
    "double_ring_fp32": _check_double_ring_fp32,
    "compile_pattern": _check_compile,
}


def _run_checks(rank: int, world_size: int, result_file: str) -> None:
    import json

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import torchtitan_ext  # noqa: F401  (registers the CPU op)

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    results = {}
    for key, check in _CHECKS.items():
        try:
            results[key] = check(rank, world_size, mesh)
        except Exception as e:  # one check's crash must not hide the others' results
            results[key] = [f"rank {rank}: {type(e).__name__}: {e}"]
    everyone: list[Any] = [None] * world_size
    dist.all_gather_object(everyone, results)
    if rank == 0:
        merged = {k: sorted({f for r in everyone for f in r[k]}) for k in _CHECKS}
        with open(result_file, "w") as f:
            json.dump(merged, f)


@pytest.fixture(scope="module")
def review(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """One 4-rank gloo launch for every check of this file: {check: failures}."""
    import json

    result_file = tmp_path_factory.mktemp("cp_review") / "results.json"
    spawn(_run_checks, 4, str(result_file))
    return dict(json.loads(result_file.read_text()))


def test_cp_lse_layout_every_kernel_through_ulysses_and_hybrid(review):
    """[lse_layout] Ulysses (over 4, 24 gathered tokens: the efficient kernel pads to 32) and
    hybrid (2 x ring 2) with each logsumexp layout torch's CP dispatch hands over (CPU flash,
    CUDA flash, memory-efficient, cuDNN): output, logsumexp and q/k/v gradients against
    single-device fp32 SDPA, and each kernel's backward gets its forward's layout."""
    assert not review["lse_layout"], "\n".join(review["lse_layout"])


def test_cp_double_ring_fp32_accumulation_bf16(review):
    """[double_ring_fp32] The double ring in bf16 is as close to fp32 SDPA as torch's ring:
    the inner rings' partial outputs and gradients are not rounded to bf16 per outer step."""
    assert not review["double_ring_fp32"], "\n".join(review["double_ring_fp32"])


def test_cp_compile_pattern_parity_and_executions(review):
    """[compile_pattern] torch.compile (aot_eager) of a block with Ulysses, hybrid and double
    ring: parity with eager, and the pattern counted per executed step, not per trace."""
    assert not review["compile_pattern"], "\n".join(review["compile_pattern"])


def test_cp_lse_layout_check_kernel_lse():
    """[lse_layout] The one-device check a GPU script runs on real kernels
    (``cp_ulysses.check_kernel_lse``), here on the CPU op and the emulated layouts: every
    layout goes through the Ulysses exchange code and back unchanged; an unknown layout is one
    clear error."""
    from torchtitan_ext.parallel import cp_ulysses

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 8, generator=gen) for _ in range(3))
    for backend in _META_FWD:
        for u, causal in ((2, True), (4, True), (2, False)):
            err = cp_ulysses.check_kernel_lse(
                _EmulatedKernel(backend).forward, q, k, v, ulysses_degree=u, is_causal=causal
            )
            assert err < 1e-5, (backend, u, causal, err)

    def odd_kernel(query: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return query, torch.zeros(2, 4, 25)

    with pytest.raises(RuntimeError, match=r"unknown logsumexp layout \(2, 4, 25\) for 24"):
        cp_ulysses.check_kernel_lse(odd_kernel, q, k, v)
