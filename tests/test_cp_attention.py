"""CPU context parallel through torch's own context-parallel APIs, against single-device SDPA.

For every pattern (torch's ring through the CPU op, and ``cp_patterns``' Ulysses, hybrid and
double ring), every combination of torch's knobs (rotate method, head-tail load balancing,
causal or not, fp32/bf16, GQA with the kv heads repeated as TorchTitan's Llama 3 does and
with SDPA's enable_gqa, batch 2), through both ``context_parallel()`` (buffers API) and the
module style TorchTitan uses (``_ContextParallel`` + ``_context_parallel_shard``; on 8 ranks the
module style only), on 2, 4 and 8 real gloo ranks: forward output and q/k/v gradients. One
launch per world size.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import spawn


class _SDPA(nn.Module):
    """Stands in for TorchTitan's ScaledDotProductAttentionWrapper; with ``gqa`` "repeat_kv"
    the kv heads are repeated before it, as TorchTitan's Llama 3 attention does."""

    def __init__(self, is_causal: bool, gqa: str) -> None:
        super().__init__()
        self.is_causal, self.gqa = is_causal, gqa

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _sdpa(q, k, v, self.is_causal, self.gqa)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, gqa: str
) -> torch.Tensor:
    if gqa == "repeat_kv":
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa == "enable_gqa")


# Patterns per world size as (name, inner degree); ring's rotate methods are crossed with
# every other knob, the other patterns alternate them (Ulysses rotates nothing).
PATTERNS = {
    2: [("ring", 1), ("ulysses", 2)],
    4: [("ring", 1), ("ulysses", 4), ("hybrid", 2), ("double_ring", 2)],
    8: [("ulysses", 8), ("hybrid", 2), ("hybrid", 4), ("double_ring", 2), ("double_ring", 4)],
}
GQA = ("none", "repeat_kv", "enable_gqa")
"""K/V heads: as many as q; half, repeated before SDPA (TorchTitan's Llama 3); half, with
SDPA's enable_gqa."""


def _cases(pattern: str) -> list[tuple[bool, bool, str, torch.dtype, str]]:
    cases = []
    for lb, causal, rotate, dtype, gqa in itertools.product(
        (False, True), (True, False), ("allgather", "alltoall"),
        (torch.float32, torch.bfloat16), GQA,
    ):  # fmt: skip
        if lb and not causal:
            continue  # torch's load balancing is defined for causal attention only
        if pattern != "ring" and (rotate == "alltoall") != (gqa == "repeat_kv"):
            continue
        cases.append((lb, causal, rotate, dtype, gqa))
    return cases


def _with_grads(out: torch.Tensor, *leaves: torch.Tensor) -> list[torch.Tensor]:
    """[out, leaf grads...], the gradients checked to exist."""
    grads = [t.grad for t in leaves]
    assert all(g is not None for g in grads)
    return [out.detach(), *(g for g in grads if g is not None)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _check_all(rank: int, world_size: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import (
        _context_parallel_shard,
        _ContextParallel,
        _cp_options,
        _enable_context_parallel_dispatcher,
        _HeadTailLoadBalancer,
        context_parallel_unshard,
        set_rotate_method,
    )
    from torch.distributed.tensor.parallel import parallelize_module

    import torchtitan_ext  # noqa: F401  (registers the CPU op)
    from torchtitan_ext.parallel import cp_patterns

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    failures = []
    for name, inner in PATTERNS[world_size]:
        pattern = cp_patterns.make_pattern(name, world_size, inner, inner)
        cp_patterns.register(mesh, pattern)
        calls_before = sum(cp_patterns.calls.values())
        for case_id, (lb, causal, rotate, dtype, gqa) in enumerate(_cases(name)):
            _cp_options.enable_load_balance = lb
            set_rotate_method(rotate)
            # Fresh inputs per case, identical on every rank.
            gen = torch.Generator().manual_seed(1000 * world_size + case_id)
            b, h, s, d = 2, 8, 8 * world_size, 16
            hk = h if gqa == "none" else 2
            q, k, v = (
                torch.randn(b, n, s, d, generator=gen).to(dtype) for n in (h, hk, hk)
            )  # fmt: skip
            # Reference: single-device SDPA in fp32 on the same (rounded) inputs.
            rq, rk, rv = (t.float().clone().requires_grad_() for t in (q, k, v))
            ref_out = _sdpa(rq, rk, rv, causal, gqa)
            grad = torch.randn(ref_out.shape, generator=gen)
            ref_out.backward(grad)
            ref = _with_grads(ref_out, rq, rk, rv)
            tol = 1e-5 if dtype == torch.float32 else 2e-2

            # 1) torch's context_parallel() context manager (buffers API); on 8 ranks only
            # the module style below (the launch's cost, not the API, grows with the ranks).
            errs_cm = [0.0]
            if world_size < 8:
                bufs = [t.clone() for t in (q, k, v)] + [grad.to(dtype)]
                with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2, 2]):
                    lq, lk, lv = (t.detach().clone().requires_grad_() for t in bufs[:3])
                    out = _sdpa(lq, lk, lv, causal, gqa)
                    out.backward(bufs[3])
                    got = context_parallel_unshard(mesh, _with_grads(out, lq, lk, lv), [2, 2, 2, 2])
                errs_cm = [_rel(g, r) for g, r in zip(got, ref, strict=True)]

            # 2) The module style TorchTitan 0.2.2 applies to each block's inner attention.
            _enable_context_parallel_dispatcher()
            module = _SDPA(causal, gqa)
            style = _ContextParallel(seq_dim=2, attention_type=_ContextParallel.AttentionType.SDPA)
            parallelize_module(module, mesh, style)
            balancer = _HeadTailLoadBalancer(s, world_size, "cpu") if lb else None
            shards = _context_parallel_shard(
                mesh, [q, k, v, grad.to(dtype)], seq_dims=(2, 2, 2, 2), load_balancer=balancer
            )
            tensors = [t for t in shards if isinstance(t, torch.Tensor)]
            mq, mk, mv = (t.detach().clone().requires_grad_() for t in tensors[:3])
            out = module(mq, mk, mv)
            out.backward(tensors[3])
            locals_ = _with_grads(out, mq, mk, mv)
            gathered = []
            for t in locals_:
                parts = [torch.empty_like(t) for _ in range(world_size)]
                dist.all_gather(parts, t.contiguous())
                full = torch.cat(parts, dim=2)
                if balancer is not None:
                    full = full.index_select(2, balancer._generate_indices(restore=True)[0])
                gathered.append(full)
            errs_mod = [_rel(g, r) for g, r in zip(gathered, ref, strict=True)]

            for api, errs in (("context_parallel", errs_cm), ("module", errs_mod)):
                if max(errs) > tol:
                    failures.append(
                        f"{pattern} {api} lb={lb} causal={causal} {rotate} {dtype} gqa={gqa}: "
                        f"out/dq/dk/dv rel err {[f'{e:.1e}' for e in errs]} > {tol}"
                    )
        # The pattern itself ran (a forward and a backward per case and API), not torch's ring.
        ran = sum(cp_patterns.calls.values()) - calls_before
        expected = (2 if world_size < 8 else 1) * 2 * len(_cases(name))
        if name != "ring" and ran != expected:
            failures.append(f"{pattern}: {ran} pattern calls, expected {expected}")
    cp_patterns.register(mesh, cp_patterns.CPPattern("ring", world_size))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_cp_patterns_match_sdpa(world_size):
    spawn(_check_all, world_size)


_OTHER_TORCH = """
import sys, torch
torch.__version__ = sys.argv[1]
import torchtitan_ext  # must import on any torch
from torchtitan_ext.config import ConfigError
from torchtitan_ext.distributed import RankInfo
from torchtitan_ext.parallel import cpu_ring_attention
from torchtitan_ext.trainer import prepare
assert not cpu_ring_attention.is_enabled()
try:
    cpu_ring_attention.require()
except RuntimeError as e:
    print("require:", e)
for cp, pattern in (("1", "ring"), ("2", "ring"), ("2", "ulysses")):
    try:
        prepare(["--job.config_file", sys.argv[2], "--parallelism.context_parallel_degree", cp,
                 "--parallelism.context_parallel_pattern", pattern,
                 "--training.dataset", "local", "--training.dataset_path", sys.argv[3],
                 "--validation.no-enable",
                 "--parallelism.data_parallel_shard_degree", "-1", "--training.seq_len", "64",
                 "--model.flavor", "debugmodel_cpu_tiny"], RankInfo(0, 0, 2))
        print(f"cp {cp} {pattern}: prepared")
    except ConfigError as e:
        print(f"cp {cp} {pattern}: config error: {e}")
"""


@pytest.mark.parametrize("version", ["2.11.0+cu126", "2.15.0"])
def test_other_torch_series_imports_and_refuses_only_cpu_cp(version, tmp_path):
    """On a torch series the CPU ring attention was not checked against, the package imports
    and prepares non-CP runs; CP on CPU, and any CP pattern but the ring, is one config error
    naming the supported series."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    recipe = str(ROOT / "train_configs" / "debug_cpu.toml")
    data = tmp_path / "docs.txt"  # a small corpus: the test is about torch, not data
    data.write_text("def f(x):\n    return x + 1\n" * 400)
    proc = subprocess.run(
        [sys.executable, "-c", _OTHER_TORCH, version, recipe, str(data)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "require: context parallel on CPU needs torch 2.13.x" in out, out
    assert f"found torch {version}" in out
    assert "cp 1 ring: prepared" in out, out
    assert (
        "cp 2 ring: config error: parallelism.context_parallel_degree = 2: context parallel on "
        "CPU" in out
    ), out
    assert (
        "cp 2 ulysses: config error: parallelism.context_parallel_pattern = 'ulysses': needs "
        "torch 2.13.x" in out
    ), out


def test_supported_torch_registers_the_cpu_op():
    from torchtitan_ext.parallel import cpu_ring_attention

    assert cpu_ring_attention.unsupported_reason() is None
    assert cpu_ring_attention.is_enabled()  # by import torchtitan_ext
