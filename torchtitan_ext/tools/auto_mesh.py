"""Auto mesh: each curriculum stage's degrees chosen from the dry run's estimates.

A stage with ``auto_mesh`` (or every stage, with ``curriculum.auto_mesh``) gets its tensor- and
context-parallel degrees and CP pattern from ``choose_stage_mesh``: every tp x cp x pattern
(ring, Ulysses, hybrid and double ring with each inner degree) over the ranks the recipe's pp
and dp_replicate leave, dp_shard taking the rest, that passes the stage's full config
validation is planned with the dry run (``dry_run.plan_rank`` on torch's fake process group:
the real mesh, pipeline split and ``parallelize`` on meta tensors; per-device memory and bytes
sent per step by kind); those within the memory budget (``budget_gib``: a budget of 0 is the
GPU's memory less a headroom) are ranked by the estimated time per token, the step time

    compute: flops per token (TorchTitan's 6N + attention; with block_causal the attention
             term scaled by the share of it the documents of a prepared corpus keep,
             ``masked_attention_fraction``) x tokens per step
             / (world size x ``auto_mesh_tflops``)
    + communication: for each kind of traffic (FSDP, dp_replicate, TP, CP, PP) the busiest
      rank's bytes over the intra-node link (``auto_mesh_intra_node_gbps``), or over the
      inter-node link (``auto_mesh_inter_node_gbps``) when the kind's group spans nodes of
      ``auto_mesh_ranks_per_node`` ranks (CP: its measured-model split,
      ``comm_estimate.cp_node_split``), plus its collective calls
      (``comm_estimate.collective_counts``) times ``auto_mesh_collective_latency_us``,

no overlap assumed (an upper bound; the ranking is what matters), over the tokens per step.
Every candidate trains the same batch (``stage_batch``: the planner changes the mesh, never a
hyperparameter), so this orders them as their step times do. Ties go to the smaller CP
degree. The same model as ``cp_comm.attention_comm``'s modelled table and
``ablate_mesh.py --dry-run``; its assumptions are the keys above.

Deterministic and collective-free (the fake process group is this process's alone), so every
rank computes the same plan before the real process group starts.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from torchtitan_ext.errors import ConfigError


@dataclass(frozen=True)
class MeshEstimate:
    """One candidate mesh of a stage and its estimates.

    Attributes:
        tp, cp, dp_shard: the degrees (pp and dp_replicate: the recipe's).
        pattern: the CP pattern; ulysses, inner_ring: its degrees (0 where unused).
        memory_gib: the dry run's peak memory per device (parameters, gradients, optimizer
            state, activations), GiB, worst of the first and last pipeline stage.
        fits: within the budget.
        comm_gib: bytes sent per step by the busiest rank, GiB; inter_node_gib: the part of
            it that crosses nodes; comm_calls: its collective calls per step.
        compute_sec, comm_sec: the step-time estimate's parts, seconds.
        tokens_per_step: tokens per optimizer step (global batch x seq_len): the same for
            every candidate of a stage (``stage_batch``).
    """

    tp: int
    cp: int
    dp_shard: int
    pattern: str
    ulysses: int
    inner_ring: int
    memory_gib: float
    fits: bool
    comm_gib: float
    inter_node_gib: float
    compute_sec: float
    comm_sec: float
    comm_calls: int = 0
    tokens_per_step: int = 0

    @property
    def step_sec(self) -> float:
        """Estimated seconds per optimizer step (compute + communication, no overlap)."""
        return self.compute_sec + self.comm_sec

    @property
    def sec_per_token(self) -> float:
        """Estimated seconds per token trained: what the planner ranks by (``step_sec`` /
        ``tokens_per_step``; inf without tokens)."""
        return self.step_sec / self.tokens_per_step if self.tokens_per_step else float("inf")

    @property
    def label(self) -> str:
        """E.g. ``tp2 cp4 hybrid(2) dp_shard1``."""
        pattern = ""
        if self.cp > 1:
            inner = {"hybrid": self.ulysses, "double_ring": self.inner_ring}.get(self.pattern)
            pattern = f" {self.pattern}" + (f"({inner})" if inner else "")
        return f"tp{self.tp} cp{self.cp}{pattern} dp_shard{self.dp_shard}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def pattern_options(cp: int, patterns: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """``cp_patterns.pattern_choices(cp)`` restricted to ``patterns`` (cp 1: no pattern)."""
    from torchtitan_ext.parallel.cp_patterns import pattern_choices

    return [c for c in pattern_choices(cp) if cp == 1 or c[0] in patterns]


CUDA_RESERVED_GIB = 2.0
"""Device memory, GiB, that a budget of 0 leaves to what the dry run does not see: the CUDA
context (about 0.5 GiB on Hopper with lazy module loading, more without) and NCCL's
communicator buffers (per communicator, NCCL_BUFFSIZE = 4 MiB per channel and protocol and
peer; a mesh opens one communicator per dim and CP pattern group, up to about 1 GiB in all)."""

FRAGMENTATION = 0.10
"""Share of the rest that a budget of 0 leaves to the caching allocator's fragmentation and
its rounding (blocks of 512 B, 2 MiB segments; expandable segments reduce but do not remove
it)."""


def budget_gib(cfg: Any) -> float:
    """``curriculum.auto_mesh_memory_gib``, or with 0 the memory of CUDA device 0 less the
    headroom, (total - ``CUDA_RESERVED_GIB``) x (1 - ``FRAGMENTATION``) GiB (70.2 of an 80 GiB
    H100), when ``training.device`` resolves to CUDA, else (CPU) no limit. A budget given is
    taken as is: what the dry run's estimate per device must stay within.

    Raises:
        ConfigError: 0 with ``training.device = "cuda"`` and no CUDA device visible (planning
            a GPU recipe elsewhere): the budget must be given.
    """
    import torch

    given = float(cfg.curriculum.auto_mesh_memory_gib)
    if given > 0:
        return given
    device = cfg.training.device
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(
                "curriculum.auto_mesh_memory_gib",
                given,
                "no CUDA device is visible to read the memory of: give the budget per device",
            )
        total = torch.cuda.get_device_properties(0).total_memory / 1024**3
        return (total - CUDA_RESERVED_GIB) * (1 - FRAGMENTATION)
    return float("inf")


def _spans_nodes(dims: Any, names: tuple[str, ...], ranks_per_node: int) -> bool:
    """Whether rank 0's group over the mesh dims ``names`` holds ranks of two nodes (ranks
    laid out as ``ParallelDims.order``, the first dim outermost)."""
    sizes = [getattr(dims, n) for n in dims.order]
    grid = np.arange(dims.world_size).reshape(sizes)
    index = tuple(slice(None) if n in names else 0 for n in dims.order)
    group = grid[index].ravel()
    return bool(group.min() // ranks_per_node != group.max() // ranks_per_node)


_KIND_DIMS = {
    "fsdp": ("dp_shard", "cp"),
    "dp_replicate": ("dp_replicate",),
    "tp": ("tp",),
    "pp": ("pp",),
}


def attention_flops_per_token(model_args: Any, seq_len: int) -> int:
    """The attention term of TorchTitan's dense FLOPs per token (``get_dense_model_nparams_and
    _flops``: 12 x layers x heads x head_dim x seq_len, the causal mask's pairs counted
    whole, as TorchTitan counts them)."""
    head_dim = model_args.dim // model_args.n_heads
    return 12 * model_args.n_layers * model_args.n_heads * head_dim * seq_len


SAMPLE_DOCUMENTS = 4096
"""Documents tokenized to measure the masked work of data that is not a prepared corpus (a
seeded random sample: the dry run and the planner stay quick on any corpus)."""

_fractions: dict[tuple[str, str, int], tuple[float, int, int, float]] = {}


def masked_attention_fraction(cfg: Any, model_args: Any) -> float:
    """The share of the causal attention work that the recipe's document mask keeps, from the
    document lengths of its data (``cp_documents.masked_fraction``): 1.0 without
    block_causal. A prepared corpus's document index is read without tokenizing anything;
    other data (``training.dataset`` or local files) is measured on a sample of
    ``SAMPLE_DOCUMENTS`` documents; data that cannot be read counts 1.0 (an upper bound; the
    recipe check reports the data's problem). ``document_statistics`` says which."""
    return document_statistics(cfg, model_args)[0]


def document_statistics(cfg: Any, model_args: Any) -> tuple[float, int, int, float]:
    """(``masked_attention_fraction``, the documents it was measured on, the documents of the
    data (0, 0: not measured), their mean length in tokens, each cut at ``training.seq_len``
    as the windows cut them)."""
    from torchtitan_ext.data import (
        build_tokenizer,
        is_prepared,
        load_documents,
        open_prepared,
        tokenize_with_offsets,
        tokenizer_identity,
    )
    from torchtitan_ext.parallel.cp_block_causal import uses_block_causal
    from torchtitan_ext.parallel.cp_documents import masked_fraction

    if not uses_block_causal(model_args):
        return 1.0, 0, 0, 0.0
    path, seq_len = cfg.training.dataset_path, int(cfg.training.seq_len)
    key = (str(path), str(cfg.training.dataset), seq_len)
    if key in _fractions:
        return _fractions[key]
    tokenizer = build_tokenizer(cfg)
    if path and is_prepared(path):
        offsets = np.asarray(open_prepared(path, tokenizer_identity(cfg, tokenizer)).offsets)
        total = len(offsets) - 1
    else:
        try:
            docs = load_documents(cfg)
        except ConfigError:
            return 1.0, 0, 0, 0.0
        total = len(docs)
        pick = np.random.default_rng(0).permutation(total)[:SAMPLE_DOCUMENTS]
        offsets = tokenize_with_offsets([docs[i] for i in sorted(pick)], tokenizer)[1]
    offsets = np.asarray(offsets, np.int64)
    lengths = np.minimum(np.diff(offsets), seq_len)
    mean = float(lengths.mean()) if len(lengths) else 0.0
    _fractions[key] = (masked_fraction(offsets, seq_len), len(offsets) - 1, total, mean)
    return _fractions[key]


def estimate_mesh(cfg: Any, world_size: int, budget: float) -> MeshEstimate:
    """Plan one stage config (``cfg``: degrees set) with the dry run and estimate its step.

    Raises:
        ConfigError: ``cfg`` does not validate for ``world_size``.
    """
    from torchtitan.protocols.train_spec import get_train_spec

    from torchtitan_ext.models import build_model_on_meta
    from torchtitan_ext.tools.dry_run import GIB, plan_rank, stage_ranks
    from torchtitan_ext.validate import resolve_model_args, validate

    cur = cfg.curriculum
    dims = validate(cfg, world_size)
    assert dims is not None
    rpn = int(cur.auto_mesh_ranks_per_node)
    ranks = stage_ranks(dims)
    plans = [
        plan_rank(cfg, world_size, r, ranks_per_node=rpn) for r in sorted({ranks[0], ranks[-1]})
    ]
    memory = max(p.total_bytes for p in plans) / GIB
    busiest = max(plans, key=lambda p: sum(p.comm_bytes.values()))
    intra_bw = float(cur.auto_mesh_intra_node_gbps) * 1e9
    inter_bw = float(cur.auto_mesh_inter_node_gbps) * 1e9
    latency = float(cur.auto_mesh_collective_latency_us) * 1e-6
    comm_sec = sum(busiest.comm_calls.values()) * latency
    inter = 0.0
    for kind, nbytes in busiest.comm_bytes.items():
        if kind == "cp":
            crossing = busiest.cp_inter_node_bytes
        else:
            crossing = nbytes if _spans_nodes(dims, _KIND_DIMS[kind], rpn) else 0
        inter += crossing
        comm_sec += (nbytes - crossing) / intra_bw + crossing / inter_bw
    model_args = resolve_model_args(cfg)
    model_args.update_from_config(cfg)
    meta = build_model_on_meta(get_train_spec(cfg.model.name).model_cls, model_args)
    _, flops_per_token = model_args.get_nparams_and_flops(meta, cfg.training.seq_len)
    flops_per_token -= round(attention_flops_per_token(model_args, cfg.training.seq_len) * (
        1 - masked_attention_fraction(cfg, model_args)
    ))  # fmt: skip
    tokens = cfg.training.global_batch_size * cfg.training.seq_len
    compute_sec = flops_per_token * tokens / (world_size * float(cur.auto_mesh_tflops) * 1e12)
    p = cfg.parallelism
    return MeshEstimate(
        tp=dims.tp,
        cp=dims.cp,
        dp_shard=dims.dp_shard,
        pattern=p.context_parallel_pattern,
        ulysses=p.context_parallel_ulysses_degree,
        inner_ring=p.context_parallel_inner_ring_degree,
        memory_gib=memory,
        fits=memory <= budget,
        comm_gib=sum(busiest.comm_bytes.values()) / GIB,
        inter_node_gib=inter / GIB,
        compute_sec=compute_sec,
        comm_sec=comm_sec,
        comm_calls=sum(busiest.comm_calls.values()),
        tokens_per_step=tokens,
    )


def _check_settings(cfg: Any) -> None:
    cur = cfg.curriculum
    for key in ("auto_mesh_intra_node_gbps", "auto_mesh_inter_node_gbps", "auto_mesh_tflops"):
        if not float(getattr(cur, key)) > 0:
            raise ConfigError(f"curriculum.{key}", getattr(cur, key), "must be > 0")
    if cur.auto_mesh_collective_latency_us < 0:
        raise ConfigError(
            "curriculum.auto_mesh_collective_latency_us",
            cur.auto_mesh_collective_latency_us,
            "must be >= 0",
        )
    if cur.auto_mesh_ranks_per_node < 1:
        raise ConfigError(
            "curriculum.auto_mesh_ranks_per_node", cur.auto_mesh_ranks_per_node, "must be >= 1"
        )
    from torchtitan_ext.parallel.cp_patterns import PATTERNS

    unknown = [x for x in cur.auto_mesh_patterns if x not in PATTERNS]
    if unknown or not cur.auto_mesh_patterns:
        raise ConfigError(
            "curriculum.auto_mesh_patterns",
            list(cur.auto_mesh_patterns),
            f"a non-empty list of {', '.join(PATTERNS)}",
        )
    if cur.auto_mesh_memory_gib < 0:
        raise ConfigError(
            "curriculum.auto_mesh_memory_gib",
            cur.auto_mesh_memory_gib,
            "must be >= 0 (0: the device's memory)",
        )


def stage_batch(
    cfg: Any, i: int, raw: dict[str, Any], world_size: int, step: int, prev: Any
) -> int | None:
    """The global batch (sequences per optimizer step) of auto-meshed stage ``i`` (table
    ``raw``) when the recipe leaves it to the mesh, fixed before any mesh is tried so that
    the planner changes the mesh and never a hyperparameter; None when it is the same on every
    mesh anyway (``curriculum.tokens_per_step`` / seq_len, or a ``global_batch_size`` >= 1).
    ``global_batch_size = -1`` (TorchTitan's ``local_batch_size`` x dp) is taken on the
    recipe's own mesh: its ``[parallelism]`` tp and CP degree with dp_shard the rest, the mesh
    the stage would train on without ``auto_mesh``.

    Raises:
        ConfigError: -1 and the recipe's own mesh does not resolve a batch for this stage,
            as ``training.global_batch_size``, naming why; a bad key of the table as itself.
    """
    from torchtitan_ext.curriculum import _resolve_stage

    if cfg.curriculum.tokens_per_step > 0:
        return None
    if raw.get("global_batch_size", cfg.training.global_batch_size) != -1:
        return None
    table = {k: v for k, v in raw.items() if k != "auto_mesh"}
    p = cfg.parallelism
    tp = p.tensor_parallel_degree
    free = world_size // (p.pipeline_parallel_degree * p.data_parallel_replicate_degree * tp)
    try:
        return _resolve_stage(cfg, i, table, free, step, prev, tp).global_batch_size
    except ConfigError as e:
        if not e.key.endswith(("context_parallel_degree", "global_batch_size")):
            raise  # the table itself (a key's type, seq_len, steps): its own key
        raise ConfigError(
            "training.global_batch_size",
            -1,
            f"auto-meshed stage {i} takes local_batch_size x dp on the recipe's own mesh "
            f"(tp {tp}, cp {p.context_parallel_degree}), which does not resolve ({e.key} = "
            f"{e.value}: {e.reason}); give the batch or curriculum.tokens_per_step",
        ) from None


def choose_stage_mesh(
    cfg: Any, i: int, raw: dict[str, Any], world_size: int, step: int, prev: Any
) -> Any:
    """Stage ``i`` (table ``raw``) with the mesh of least estimated time per token that fits
    the budget (see the module docstring), every candidate with the batch of ``stage_batch``.
    Collective-free.

    Returns:
        The resolved ``curriculum.Stage``, its ``mesh_plan`` the estimates of every valid
        candidate, best first.

    Raises:
        ConfigError: a bad ``auto_mesh_*`` setting; a batch left to the mesh that the
            recipe's own mesh does not resolve (``stage_batch``); no candidate passes
            validation (the first candidate's reason) or none fits the budget (naming the
            smallest estimate), each as ``curriculum.stages[i].auto_mesh``.
    """
    from torchtitan_ext.curriculum import _resolve_stage, stage_config
    from torchtitan_ext.validate import validate

    _check_settings(cfg)
    p = cfg.parallelism
    free = world_size // (p.pipeline_parallel_degree * p.data_parallel_replicate_degree)
    budget = budget_gib(cfg)
    patterns = tuple(cfg.curriculum.auto_mesh_patterns)
    key = f"curriculum.stages[{i}].auto_mesh"
    batch = stage_batch(cfg, i, raw, world_size, step, prev)
    fixed = {} if batch is None else {"global_batch_size": batch}
    found: list[tuple[MeshEstimate, Any]] = []
    reasons: list[str] = []
    for tp in _divisors(free):
        for cp in _divisors(free // tp):
            for pattern, ulysses, inner in pattern_options(cp, patterns):
                table = {
                    **raw,
                    **fixed,
                    "context_parallel_degree": cp,
                    "context_parallel_pattern": pattern,
                }
                table.pop("auto_mesh", None)
                if ulysses:
                    table["context_parallel_ulysses_degree"] = ulysses
                if inner:
                    table["context_parallel_inner_ring_degree"] = inner
                try:
                    stage = _resolve_stage(cfg, i, table, free // tp, step, prev, tp)
                    stage_cfg = stage_config(cfg, stage)
                    validate(stage_cfg, world_size)
                except ConfigError as e:
                    reasons.append(f"tp{tp} cp{cp} {pattern}: {e.key} = {e.value}: {e.reason}")
                    continue
                found.append((estimate_mesh(stage_cfg, world_size, budget), stage))
    if not found:
        raise ConfigError(key, True, f"no mesh passes validation (first: {reasons[0]})")
    ranked = sorted(found, key=lambda c: (not c[0].fits, c[0].sec_per_token, c[0].cp, c[0].tp))
    best, stage = ranked[0]
    if not best.fits:
        smallest = min((e for e, _ in found), key=lambda e: e.memory_gib)
        raise ConfigError(
            key,
            True,
            f"no mesh fits {budget:g} GiB per device (curriculum.auto_mesh_memory_gib); the "
            f"smallest estimate is {smallest.memory_gib:.2f} GiB ({smallest.label})",
        )
    return dataclasses.replace(stage, mesh_plan=tuple(e for e, _ in ranked))
