"""Model building on top of TorchTitan 0.2.2's model registry, and mesh-independent init.

The model classes and flavors are TorchTitan's (``torchtitan.models.llama3``); this module only
adds small CPU flavors to its registry and initializes weights so that the initial model does
not depend on the mesh (see ``init_weights_mesh_independent``).
"""

import hashlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.overrides import TorchFunctionMode
from torchtitan.models.llama3 import llama3_args
from torchtitan.models.llama3.model.args import TransformerModelArgs

# Flavors sized for 2 CPU cores shared by 4-8 ranks. vocab_size 320 holds the 258 ids of the
# byte-level tokenizer, rounded up to a multiple of 64 so that vocab-sharding TP degrees divide it.
CPU_FLAVORS: dict[str, TransformerModelArgs] = {
    # ~0.9M parameters: the README's 4-rank recipe.
    "debugmodel_cpu": TransformerModelArgs(
        dim=128,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        vocab_size=320,
        multiple_of=32,
        rope_theta=500000,
    ),
    # ~0.15M parameters: the test suite's multi-process runs.
    "debugmodel_cpu_tiny": TransformerModelArgs(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=320,
        multiple_of=32,
        rope_theta=500000,
    ),
    # ~0.3M parameters: the parity matrix. 8 heads and 8 kv heads so that tp up to 8 divides
    # them; 6 layers (+ embedding and output) so that pp 8, or pp 4 with 2 stages per rank,
    # gets one module per stage.
    "debugmodel_cpu_deep": TransformerModelArgs(
        dim=64,
        n_layers=6,
        n_heads=8,
        n_kv_heads=8,
        vocab_size=320,
        multiple_of=32,
        rope_theta=500000,
    ),
    # debugmodel_cpu_deep with grouped-query attention (8 query heads over 2 kv heads): the
    # test suite's parity shapes (tp up to 2), so every parallelism is checked with GQA, and
    # Ulysses inside a tp2 group (1 kv head per tp rank) replicates K/V to the query heads.
    "debugmodel_cpu_deep_gqa": TransformerModelArgs(
        dim=64,
        n_layers=6,
        n_heads=8,
        n_kv_heads=2,
        vocab_size=320,
        multiple_of=32,
        rope_theta=500000,
    ),
    # ~99M parameters, vocab 32768 (a real tokenizer's size) against dim 1024: the logits are
    # as large a share of the activations as in real models (Llama 3 8B: 128256 / 4096).
    # Random token ids are enough for the memory benchmark (scripts/bench_long_context.py).
    "debugmodel_cpu_32k": TransformerModelArgs(
        dim=1024,
        n_layers=2,
        n_heads=8,
        n_kv_heads=4,
        vocab_size=32768,
        multiple_of=256,
        ffn_dim_multiplier=1.5,
        rope_theta=500000,
    ),
}
# Flavors for one-GPU long-context benchmarks.
GPU_FLAVORS: dict[str, TransformerModelArgs] = {
    # The "1.2B" Llama 3 of the H100 measurements (1.11B parameters: dim 2048, 16 layers, 32
    # heads, 8 kv heads, ffn multiplier 1.5, vocab 32768): 196,608 tokens at 56% MFU without
    # the long-context features; at 262,144 it and TorchTitan 0.2.2 run out of memory.
    "1.2B": TransformerModelArgs(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=32768,
        multiple_of=256,
        ffn_dim_multiplier=1.5,
        rope_theta=500000,
    ),
}
for _name, _args in {**CPU_FLAVORS, **GPU_FLAVORS}.items():
    llama3_args.setdefault(_name, _args)


def flavor_table() -> str:
    """The Llama 3 flavors of TorchTitan's registry (``llama3_args``, with the ones this module
    adds) as a Markdown table: dim, layers, heads, kv heads (a flavor without ``n_kv_heads``
    has one per head), head dim and vocab (embedding rows), and where each is defined.
    ``docs/recipes.md`` holds it (tests/test_config.py checks that it matches); print it with
    ``python -c "from torchtitan_ext.models import flavor_table; print(flavor_table())"``."""
    ours = {**CPU_FLAVORS, **GPU_FLAVORS}
    rows = [
        "| flavor | dim | layers | heads | kv heads | head dim | vocab | defined by |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, a in llama3_args.items():
        kv = a.n_kv_heads or a.n_heads
        where = "torchtitan_ext" if name in ours else "TorchTitan 0.2.2"
        rows.append(
            f"| `{name}` | {a.dim} | {a.n_layers} | {a.n_heads} | {kv} | {a.dim // a.n_heads} "
            f"| {a.vocab_size} | {where} |"
        )
    return "\n".join(rows) + "\n"


def build_model_on_meta(model_cls: type[nn.Module], model_args: Any) -> nn.Module:
    """Construct the model on the meta device (no memory); parallelize, then initialize."""
    with torch.device("meta"):
        return model_cls(model_args)


# In-place random fills that take a ``generator`` keyword. ``torch.nn.init`` functions that
# dispatch through ``__torch_function__`` arrive here whole; the others arrive as the Tensor
# methods they call.
_RANDOM_INIT_OPS: frozenset[Callable[..., Any]] = frozenset(
    {
        torch.Tensor.normal_,
        torch.Tensor.uniform_,
        nn.init.normal_,
        nn.init.uniform_,
        nn.init.trunc_normal_,
        nn.init.xavier_normal_,
        nn.init.xavier_uniform_,
        nn.init.kaiming_normal_,
        nn.init.kaiming_uniform_,
    }
)
_UNSUPPORTED_RANDOM_OPS: frozenset[Callable[..., Any]] = frozenset(
    {
        torch.Tensor.bernoulli_,
        torch.Tensor.cauchy_,
        torch.Tensor.exponential_,
        torch.Tensor.geometric_,
        torch.Tensor.log_normal_,
        torch.Tensor.random_,
    }
)


# Module wrappers that insert a level into parameter names: activation checkpointing and
# torch.compile. The seed of a parameter must not depend on them.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def canonical_name(fqn: str) -> str:
    """A parameter's name in the unwrapped model:
    ``layers.0._checkpoint_wrapped_module.attention.wq.weight`` -> ``layers.0.attention.wq.weight``.
    """
    for prefix in _WRAPPER_PREFIXES:
        fqn = fqn.replace(prefix, "")
    return fqn


def _param_seed(seed: int, name: str, count: int) -> int:
    digest = hashlib.sha256(f"{seed}:{name}:{count}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class _PerParameterRNG(TorchFunctionMode):
    """Redirects in-place random init ops on parameters to a per-parameter generator that fills
    the full (global) tensor, then keeps this rank's shard.

    A parameter's values then depend only on (seed, its name, how many random ops it has seen),
    not on how it is sharded or on the order in which ranks initialize.
    """

    def __init__(self, names: dict[int, str], seed: int) -> None:
        super().__init__()
        self.names = names
        self.seed = seed
        self.counts: Counter[str] = Counter()
        self.current: str | None = None

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _UNSUPPORTED_RANDOM_OPS:
            raise NotImplementedError(f"mesh-independent init does not support {func}")
        if func not in _RANDOM_INIT_OPS:
            return func(*args, **kwargs)
        kwargs = dict(kwargs)
        target = args[0] if args else kwargs.pop("tensor")
        args = args[1:]
        name = self.names.get(id(target), self.current)
        if name is None:
            raise RuntimeError(
                "a random init op ran on a tensor that is not a parameter of the model "
                "before any parameter was initialized; initialize parameters in place"
            )
        # A temporary (e.g. the resampling buffer of torch's trunc_normal_) is attributed to
        # the parameter being initialized: the op sequence is the same on every mesh.
        self.current = name
        count = self.counts[name]
        self.counts[name] += 1
        local = target.to_local() if isinstance(target, DTensor) else target
        gen = torch.Generator(device=local.device).manual_seed(_param_seed(self.seed, name, count))
        full = torch.empty(tuple(target.shape), dtype=target.dtype, device=local.device)
        func(full, *args, **{**kwargs, "generator": gen})
        if isinstance(target, DTensor):
            # src_data_rank=None: every rank keeps its own chunk of its own (identical) full
            # tensor; no communication.
            full = distribute_tensor(
                full, target.device_mesh, target.placements, src_data_rank=None
            ).to_local()
        with torch.no_grad():
            local.copy_(full)
        return target


def init_weights_mesh_independent(
    model: nn.Module, seed: int, device: torch.device, buffer_device: torch.device | None = None
) -> None:
    """Materialize a (possibly sharded) meta-device model on ``device`` and run its own
    ``init_weights``, so that every parameter gets the same values whatever the mesh.

    DTensor's random ops only give sharding-independent results on CUDA (its offset-based
    Philox tracker, ``torch/distributed/tensor/_random.py``); on CPU each shard would draw from
    its rank's generator. Here each random fill of a parameter draws the full tensor from a
    generator seeded by (seed, parameter name without AC/compile wrapper levels) and keeps the
    local shard, so a 1-rank run and any mesh, with or without activation checkpointing or
    compile, start from bit-identical weights. Cost: each rank draws every full parameter once
    (transient memory: the largest parameter).

    Args:
        model: the model (parallelized or not) on the meta device, with TorchTitan's
            ``init_weights(buffer_device=...)``.
        seed: the run's seed (``debug.seed``; 0 when unset).
        device: where parameters and buffers are materialized.
        buffer_device: where the RoPE buffer is computed (default: ``device``).

    Raises:
        RuntimeError: the model's init ran a random op on a tensor that is not a parameter.
    """
    model.to_empty(device=device)
    names = {id(p): canonical_name(n) for n, p in model.named_parameters()}
    init: Callable[..., None] = model.init_weights  # type: ignore[assignment]
    with torch.no_grad(), _PerParameterRNG(names, seed):
        init(buffer_device=buffer_device or device)
