"""Context-parallel patterns beyond torch's single ring: Ulysses, double ring, and their hybrid.

torch's ``context_parallel()`` turns q/k/v into DTensors sharded on the sequence dim and
dispatches SDPA (the CUDA flash / efficient / cuDNN ops, and through
``cpu_ring_attention`` the CPU flash op) to ``_templated_ring_attention`` and
``_templated_ring_attention_backward``: one flat ring over the cp group. This module plugs the
other patterns into that same dispatch. ``register(cp_mesh, pattern)`` records the pattern of a
cp group; the two ring functions are wrapped (``install``) so that a call on a registered group
runs the pattern, and any other call runs torch's ring unchanged. Callers keep using torch's
``context_parallel()`` or the ``_ContextParallel`` module style as before.

The patterns (``cp = outer x inner``, inner = adjacent ranks, i.e. the same node when cp is
the innermost mesh dim):

- ``ring`` (torch's): K/V blocks rotate over all cp ranks (Ring Attention, arXiv 2310.01889).
- ``ulysses`` (DeepSpeed-Ulysses, arXiv 2309.14509): an all-to-all turns each rank's
  (all heads, local sequence) q/k/v into (heads / cp, whole sequence); any attention kernel
  runs locally; an all-to-all turns the output back. Needs heads (after TP) divisible by cp.
- ``hybrid`` (USP, arXiv 2405.07719): Ulysses over the inner ``ulysses_degree`` ranks, then
  torch's ring over the ``cp / ulysses_degree`` groups, on heads / ulysses_degree.
- ``double_ring`` (LoongTrain, arXiv 2406.18485): torch's ring over the inner
  ``inner_ring_degree`` ranks, nested in an outer ring that passes each rank's K/V block to the
  next group once per inner cycle, overlapped with it: the slow link carries outer - 1 larger
  transfers per step instead of one per ring step.

Causal load balancing: every pattern keeps torch's head-tail layout over all cp ranks (rank c
holds chunks c and 2cp-1-c of 2cp), so inputs are sharded as for the ring (torch's
``_HeadTailLoadBalancer``, or ``context_parallel()``'s default; how Ulysses and hybrid keep it
through their all-to-all: ``cp_ulysses``). Without load balancing every pattern shards
contiguously.

Block results are merged with torch's ``_SDPAMerger`` and K/V move with torch's rotaters; only
the schedule of the double ring's outer loop, its inner rings' backward (torch's schedule,
returning fp32 accumulators where torch casts to the input dtype) and the Ulysses all-to-alls
are ours. Every kernel's logsumexp layout is handled (``cp_lse.LseLayout``).

This module is the patterns' public surface: the recipe's pattern (``PATTERNS``,
``make_pattern``, ``recipe_pattern``, ``check_recipe_pattern``), its registration and the
dispatch (``register``, ``require``, ``calls``). The rest lives below it, one concern a module:
``cp_groups`` (``CPPattern`` and what the dispatch hands a pattern), ``cp_lse`` (the kernels'
logsumexp layouts), ``cp_ulysses`` (Ulysses and hybrid, ``check_kernel_lse``),
``cp_double_ring`` and ``cp_comm`` (the bytes each pattern sends, for the dry run).

These wrap private torch functions, so they are installed only on a torch series in
``cpu_ring_attention.SUPPORTED_TORCH`` (``require``); ``ring`` needs none of this.
"""

from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from torchtitan_ext.errors import ConfigError
from torchtitan_ext.parallel import cpu_ring_attention
from torchtitan_ext.parallel.cp_double_ring import _double_ring_backward, _double_ring_forward
from torchtitan_ext.parallel.cp_groups import CPPattern, _Bwd, _Groups
from torchtitan_ext.parallel.cp_ulysses import _ulysses_backward, _ulysses_forward
from torchtitan_ext.rules import RecipeCheck, Rule

PATTERNS = ("ring", "ulysses", "double_ring", "hybrid")
"""Values of ``parallelism.context_parallel_pattern``."""


def pattern_choices(cp: int) -> list[tuple[str, int, int]]:
    """Every (pattern, Ulysses degree, inner-ring degree) a cp group of ``cp`` ranks can run:
    the ring alone for cp 1; else the ring, Ulysses, and the hybrid and the double ring with
    each inner degree 2 .. cp / 2 that divides cp (0 where a degree is unused). What the
    planner (``auto_mesh``), the parity matrix and the ablation sweep enumerate."""
    if cp == 1:
        return [("ring", 0, 0)]
    inner = [d for d in range(2, cp // 2 + 1) if cp % d == 0]
    return [
        ("ring", 0, 0),
        ("ulysses", 0, 0),
        *(("hybrid", d, 0) for d in inner),
        *(("double_ring", 0, d) for d in inner),
    ]


RANKS_PER_NODE = 8
"""Ranks of one node for ``default_inner_ring_degree``: the 8 GPUs of an H100 / H200 HGX node
(the planner's ``curriculum.auto_mesh_ranks_per_node`` default too)."""


def default_inner_ring_degree(cp: int) -> int:
    """The inner ring of a double ring whose ``context_parallel_inner_ring_degree`` is 0
    (unset): the largest divisor of ``cp`` in 2 .. min(cp / 2, ``RANKS_PER_NODE``).

    The largest so that the outer ring, the one that crosses the slow links, has as few
    hops as can be (LoongTrain, arXiv 2406.18485, puts the inner ring inside a node); at most
    cp / 2 so that there are two rings to nest; at most a node's 8 ranks so that with cp
    innermost in the mesh an inner ring never spans nodes. cp 4 -> 2, 6 -> 3, 8 -> 4,
    16 -> 8, 64 -> 8, 12 -> 6. 0 when there is none (cp 1, 2 or a prime): the double ring
    needs another degree then.
    """
    cap = min(cp // 2, RANKS_PER_NODE)
    return next((d for d in range(cap, 1, -1) if cp % d == 0), 0)


def make_pattern(name: str, cp: int, ulysses_degree: int, inner_ring_degree: int) -> CPPattern:
    """The ``CPPattern`` of the recipe keys (validated by ``validate``, which names the
    keys; this raises ``ValueError`` for what slipped through). A double ring with
    ``inner_ring_degree`` 0 gets ``default_inner_ring_degree(cp)``."""
    if name == "ring" or cp == 1:
        return CPPattern("ring", cp, 1)
    if name == "ulysses":
        return CPPattern(name, cp, cp)
    inner = ulysses_degree if name == "hybrid" else inner_ring_degree
    if name == "double_ring" and inner == 0:
        inner = default_inner_ring_degree(cp)
    if name not in PATTERNS or inner < 2 or cp % inner != 0 or inner == cp:
        raise ValueError(f"invalid context-parallel pattern {name!r} with cp {cp}, inner {inner}")
    return CPPattern(name, cp, inner)


def recipe_pattern(parallelism: Any, cp: int) -> CPPattern:
    """The ``CPPattern`` of a recipe's ``parallelism`` section at CP degree ``cp``."""
    return make_pattern(
        parallelism.context_parallel_pattern, cp, parallelism.context_parallel_ulysses_degree,
        parallelism.context_parallel_inner_ring_degree,
    )  # fmt: skip


_registry: dict[str, _Groups] = {}
_installed = False
calls: Counter[str] = Counter()
"""Attention forwards / backwards run per pattern in this process ("ulysses",
"ulysses_backward", ...): how tests and benchmarks see that a pattern, not torch's ring, ran.
Counted when the attention executes, also inside a graph compiled with aot_eager (``_count``),
not when torch.compile traces it; inductor's code does not count (the same trace decides
whether the pattern runs, so an aot_eager count shows it)."""


@torch.library.custom_op("torchtitan_ext::cp_pattern_ran", mutates_args=())
def _count(x: torch.Tensor, name: str) -> None:
    """Add one to ``calls[name]`` (``x``: a tensor of the call, for the dispatcher). An op,
    registered as ordered-effectful, not Python: torch.compile's trace keeps it in the graph,
    and aot_eager runs it with each execution (inductor's generated code leaves it out)."""
    calls[name] += 1


@_count.register_fake
def _count_fake(x: torch.Tensor, name: str) -> None:
    return None


_count.register_effect(torch.library.EffectType.ORDERED)


def register(cp_mesh: DeviceMesh, pattern: CPPattern) -> None:
    """Run ``pattern`` for every SDPA that context parallel dispatches on ``cp_mesh``.

    Collective over the world (creates the inner and outer process groups once per layout).
    ``ring`` unregisters (torch's ring). Raises ``RuntimeError`` (``require``) on a torch
    series the wrappers were not checked against.
    """
    group = cp_mesh.get_group()
    name = group.group_name
    if pattern.name == "ring":
        _registry.pop(name, None)
        return
    if _entry(group) is not None and _registry[name].pattern == pattern:
        return  # e.g. each pipeline stage of this rank applies CP to its own module
    require()
    if pattern.cp != cp_mesh.size():
        raise ValueError(f"pattern for cp {pattern.cp} on a cp mesh of {cp_mesh.size()} ranks")
    names = (
        f"cp_outer_{pattern.outer}x{pattern.inner}",
        f"cp_inner_{pattern.outer}x{pattern.inner}",
    )
    mesh2d = cp_mesh._unflatten(0, (pattern.outer, pattern.inner), names)
    _registry[name] = _Groups(
        pattern, mesh2d[names[0]].get_group(), mesh2d[names[1]].get_group(), group
    )


def _entry(group: dist.ProcessGroup) -> _Groups | None:
    """The registration of ``group`` itself: group names are counters that a later process
    group (a real run after a dry run on the fake one) reuses, so a name alone could route a
    group to another's pattern and dead sub-groups."""
    entry = _registry.get(group.group_name)
    return entry if entry is not None and entry.cp is group else None


def unregister_all() -> None:
    """Forget every registration (after the process group they were made on is destroyed)."""
    _registry.clear()


def process_groups(cp_mesh: DeviceMesh) -> list[dist.ProcessGroup]:
    """The outer and inner process groups ``register`` made for ``cp_mesh`` ([]: the ring)."""
    entry = _entry(cp_mesh.get_group())
    return [] if entry is None else [entry.outer, entry.inner]


def require() -> None:
    """Install the pattern dispatch, or raise ``RuntimeError`` naming the supported torch
    series when it wraps torch internals it was not checked against."""
    reason = cpu_ring_attention.unsupported_reason()
    if reason is not None:
        raise RuntimeError(
            "context-parallel patterns other than 'ring' wrap torch's private ring attention "
            f"and were checked only on torch {', '.join(cpu_ring_attention.SUPPORTED_TORCH)}.x; "
            f"found torch {torch.__version__}"
        )
    _install()


def _install() -> None:
    global _installed
    if _installed:
        return
    from torch.distributed.tensor.experimental._context_parallel import _attention

    torch_forward = _attention._templated_ring_attention
    torch_backward = _attention._templated_ring_attention_backward

    def forward(
        group: dist.ProcessGroup, seq_dim: int, op: Any, query: torch.Tensor,
        key: torch.Tensor, value: torch.Tensor, is_causal: bool = False, **kwargs: Any,
    ) -> tuple[torch.Tensor, ...]:  # fmt: skip
        entry = _entry(group)
        if entry is None:
            return torch_forward(group, seq_dim, op, query, key, value, is_causal, **kwargs)
        run = _double_ring_forward if entry.pattern.name == "double_ring" else _ulysses_forward
        _count(query, entry.pattern.name)
        return run(entry, torch_forward, seq_dim, op, query, key, value, is_causal, kwargs)

    def backward(
        group: dist.ProcessGroup, seq_dim: int, op: Any, grad_out: torch.Tensor,
        grad_out_name: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        out: torch.Tensor, logsumexp: torch.Tensor, is_causal: bool, **kwargs: Any,
    ) -> tuple[torch.Tensor, ...]:  # fmt: skip
        entry = _entry(group)
        if entry is None:
            return torch_backward(
                group, seq_dim, op, grad_out, grad_out_name, query, key, value, out,
                logsumexp, is_causal, **kwargs,
            )  # fmt: skip
        _count(query, entry.pattern.name + "_backward")
        tensors = _Bwd(grad_out, grad_out_name, query, key, value, out, logsumexp)
        if entry.pattern.name == "double_ring":
            return _double_ring_backward(entry, seq_dim, op, tensors, is_causal, kwargs)
        return _ulysses_backward(entry, torch_backward, seq_dim, op, tensors, is_causal, kwargs)

    _attention._templated_ring_attention = forward
    _attention._templated_ring_attention_backward = backward
    _installed = True


def check_recipe_pattern(cfg: Any, model_args: Any, tp: int, cp: int) -> None:
    """The recipe's ``parallelism.context_parallel_pattern`` and the degree it needs: a known
    pattern; a Ulysses / hybrid degree that divides cp and the heads per TP rank; an inner ring
    degree that divides cp (0: ``default_inner_ring_degree``, which needs cp to have one); no
    degree set that the pattern does not use; torch 2.13 for any
    pattern but the ring (a rule of ``validate.RULES``).

    Raises:
        ConfigError: naming the key and the value.
    """
    import difflib

    p = cfg.parallelism
    key = "parallelism.context_parallel_pattern"
    name = p.context_parallel_pattern
    if name not in PATTERNS:
        close = difflib.get_close_matches(str(name), PATTERNS, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(key, name, f"must be one of {', '.join(PATTERNS)}{hint}")
    uses = {"hybrid": "ulysses_degree", "double_ring": "inner_ring_degree"}
    for degree in ("ulysses_degree", "inner_ring_degree"):
        value = getattr(p, f"context_parallel_{degree}")
        if value != 0 and uses.get(name) != degree:
            user = next(k for k, v in uses.items() if v == degree)
            raise ConfigError(
                f"parallelism.context_parallel_{degree}",
                value,
                f"only context_parallel_pattern = {user!r} uses it (the pattern is {name!r}); "
                "leave it 0",
            )
    if cp == 1 or name == "ring":
        return
    if name in uses:
        degree_key = f"parallelism.context_parallel_{uses[name]}"
        inner = getattr(p, f"context_parallel_{uses[name]}")
        if name == "double_ring" and inner == 0:
            inner = default_inner_ring_degree(cp)
            if inner == 0:
                raise ConfigError(
                    "parallelism.context_parallel_degree",
                    cp,
                    "double_ring nests an inner ring of 2 .. cp / 2 ranks (a divisor of cp) in "
                    f"an outer ring: cp {cp} has none; use 'ring'",
                )
        if inner < 2 or cp % inner != 0 or inner == cp:
            raise ConfigError(
                degree_key,
                inner,
                f"{name} needs a divisor of context_parallel_degree ({cp}) in 2 .. {cp // 2}",
            )
    else:
        degree_key, inner = "parallelism.context_parallel_degree", cp
    heads = model_args.n_heads // tp
    if name in ("ulysses", "hybrid") and heads % inner != 0:
        raise ConfigError(
            degree_key,
            inner,
            f"{name} splits the {heads} attention heads per TP rank (n_heads {model_args.n_heads}"
            f" / tp {tp}) over it: must divide {heads}",
        )
    if cpu_ring_attention.unsupported_reason() is not None:
        raise ConfigError(
            key,
            name,
            f"needs torch {', '.join(cpu_ring_attention.SUPPORTED_TORCH)}.x (it wraps torch's "
            f"private ring attention); found torch {__import__('torch').__version__}. Use 'ring'",
        )


def _cp_pattern(c: RecipeCheck) -> None:
    p = c.cfg.parallelism
    check_recipe_pattern(c.cfg, c.model_args, p.tensor_parallel_degree, p.context_parallel_degree)


RULES: tuple[Rule, ...] = (
    Rule(
        "recipe",
        ("parallelism.context_parallel_pattern", "parallelism.context_parallel_*_degree"),
        "a known CP pattern whose degrees divide cp and the heads per TP rank",
        _cp_pattern,
        "parallel.cp_patterns",
    ),
)
"""This module's recipe rules (``torchtitan_ext.rules``); ``validate.RULES`` lists them in
its table, in phase order."""
