"""Staged context-length curriculum: the plan of stages and the per-stage recipe.

Long-context models grow their context in stages, each continuing from the previous one: LWM
(arXiv 2402.08268) went 32K -> 1M with RoPE theta raised per stage at a constant 4M tokens per
batch; Llama 3 (arXiv 2407.21783) raised the context in six stages up to 128K and the CP degree
with it, keeping the tokens per CP rank about constant. A recipe's ``[[curriculum.stages]]``
lists the stages; ``resolve_curriculum`` resolves all of them for the world size before step 1,
each checked by the rule table as it is resolved (``validate.plan_curriculum``: a recipe that
would fail at stage 4 fails at start-up), and ``stage_config`` gives the
recipe one stage trains with: its seq_len, batch, RoPE theta and CP degree, with dp_shard taking
the rest of the fixed world. tp, pp and dp_replicate stay fixed across stages.
"""

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torchtitan_ext.config.tables import (
    MESH_KEYS,
    PATTERN_DEGREE_KEYS,
    STAGE_BOOL_KEYS,
    STAGE_FLOAT_KEYS,
    STAGE_INT_KEYS,
    STAGE_KEYS,
    STAGE_STR_KEYS,
)
from torchtitan_ext.data.mixture import Mixture, describe_mixture, parse_mixture
from torchtitan_ext.errors import ConfigError
from torchtitan_ext.parallel_dims import seq_len_divisor
from torchtitan_ext.rope import ROPE_KEYS
from torchtitan_ext.rules import RecipeCheck, Rule


@dataclass(frozen=True)
class Stage:
    """One resolved curriculum stage.

    Attributes:
        index: 0-based stage index.
        seq_len: tokens per sequence.
        steps: optimizer steps in this stage.
        first_step, last_step: global step numbers (1-based, inclusive) of the stage.
        rope_theta: RoPE base frequency (0: the model flavor's); a stage that does not set it
            keeps the previous stage's.
        cp: context-parallel degree; dp_shard: the data-parallel shard degree it leaves.
        global_batch_size: sequences per optimizer step; local_batch_size: per microbatch and
            dp rank.
        lr: peak learning rate of the stage (None: ``optimizer.lr``); the run's one schedule
            (warmup, decay) multiplies it.
        warmup_steps: if > 0, a linear warmup over the stage's first steps on top of the
            schedule (the schedule's factor times min(1, k / warmup_steps) at the k-th step).
        min_doc_tokens: if > 0, the stage trains only on documents of at least this many
            tokens (long stages see long documents).
        mixture: the stage's data mixture (``data.mixture.parse_mixture``): (source, weight,
            min_doc_tokens) per source; () trains on the run's training data alone.
        cp_pattern, cp_ulysses_degree, cp_inner_ring_degree: the stage's
            ``parallelism.context_parallel_pattern`` and its degrees (a stage that sets the
            pattern gets degrees 0 unless it sets them too; otherwise the recipe's).
        rope: the stage's ``model.rope_*`` scaling keys (``rope.ROPE_KEYS``); a key the stage
            does not set keeps the previous stage's value (the first stage: the recipe's).
        tp: tensor-parallel degree (the recipe's, unless the stage is auto-meshed).
        attn_mask_type: the stage's ``model.attn_mask_type`` ("" : the flavor's); a stage that
            does not set it keeps the previous stage's.
        mesh_plan: for an auto-meshed stage, the planner's estimates of the meshes that
            passed validation (``auto_mesh.MeshEstimate``), best first: the stage runs the
            first; empty otherwise.
        batch_derived: the global batch is the recipe's ``training.global_batch_size = -1``
            read on this stage's mesh (local batch x dp), not set by the stage or
            ``curriculum.tokens_per_step`` (``validate.stage_batch_note``).
    """

    index: int
    seq_len: int
    steps: int
    first_step: int
    last_step: int
    rope_theta: float
    cp: int
    dp_shard: int
    global_batch_size: int
    local_batch_size: int
    lr: float | None = None
    warmup_steps: int = 0
    min_doc_tokens: int = 0
    mixture: Mixture = ()
    cp_pattern: str = "ring"
    cp_ulysses_degree: int = 0
    cp_inner_ring_degree: int = 0
    rope: dict[str, Any] = dataclasses.field(default_factory=dict)
    tp: int = 1
    attn_mask_type: str = ""
    mesh_plan: tuple[Any, ...] = ()
    batch_derived: bool = False

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


MeshPlanner = Callable[[Any, int, dict[str, Any], int, int, "Stage | None"], "Stage"]
"""Chooses an auto-meshed stage's mesh: ``(cfg, stage index, stage table, world size, steps
before the stage, previous stage) -> Stage`` (``tools.auto_mesh.choose_stage_mesh``; the entry
points hand it in, so the runtime never imports the planning tools)."""

StageCheck = Callable[[Any, int], object]
"""Checks one stage's recipe for a world size, raising ``ConfigError`` (the rule table's
``validate``, handed in by ``validate.plan_curriculum``: the rules sit above the features)."""


def resolve_curriculum(
    cfg: Any, world_size: int, check_stage: StageCheck, mesh_planner: MeshPlanner | None = None
) -> list[Stage]:
    """Resolve every stage of ``cfg.curriculum`` for ``world_size`` ranks, checking each stage's
    recipe with ``check_stage`` as it goes; auto-meshed stages get their mesh from
    ``mesh_planner``.

    Rules: seq_len strictly increasing; steps >= 1; the CP degree (given, or the smallest one
    that keeps seq_len / cp <= ``max_tokens_per_cp_rank``, or the recipe's) divides
    world / (pp x dp_replicate x tp), and dp_shard is the quotient; seq_len divisible as
    TP/CP need; the global batch (tokens_per_step / seq_len, or the stage's, or the recipe's)
    a multiple of local batch x dp; each stage's recipe passes the full config validation.

    Returns:
        The stages, in order ([] when the recipe has no curriculum).

    Raises:
        ConfigError: naming ``curriculum.stages[i].<key>`` (or the curriculum key) and value;
            an auto-meshed stage without a ``mesh_planner``.
    """
    cur = cfg.curriculum
    if not cur.stages:
        return []
    if cfg.parallelism.data_parallel_shard_degree != -1:
        raise ConfigError(
            "parallelism.data_parallel_shard_degree",
            cfg.parallelism.data_parallel_shard_degree,
            "must be -1 with a curriculum: each stage's dp_shard is the world left by its CP "
            "degree",
        )
    for key in ("tokens_per_step", "max_tokens_per_cp_rank"):
        if getattr(cur, key) < 0:
            raise ConfigError(f"curriculum.{key}", getattr(cur, key), "must be >= 0")
    p = cfg.parallelism
    others = p.pipeline_parallel_degree * p.data_parallel_replicate_degree
    if world_size % (others * p.tensor_parallel_degree) != 0:
        raise ConfigError(
            "parallelism",
            world_size,
            f"world size not divisible by pp x dp_replicate x tp = "
            f"{others * p.tensor_parallel_degree}",
        )
    if cur.auto_mesh and cur.max_tokens_per_cp_rank > 0:
        raise ConfigError(
            "curriculum.max_tokens_per_cp_rank",
            cur.max_tokens_per_cp_rank,
            "curriculum.auto_mesh chooses every stage's CP degree: set one of the two",
        )
    stages: list[Stage] = []
    step = 0
    for i, raw in enumerate(cur.stages):
        prev = stages[-1] if stages else None
        if _wants_auto_mesh(cfg, i, raw):
            if mesh_planner is None:
                raise ConfigError(
                    f"curriculum.stages[{i}].auto_mesh",
                    True,
                    "auto mesh needs the mesh planner (torchtitan_ext.tools.auto_mesh), which "
                    "train.py and python -m torchtitan_ext.config hand in; this caller gave none",
                )
            stage = mesh_planner(cfg, i, raw, world_size, step, prev)
        else:
            free = world_size // (others * p.tensor_parallel_degree)  # for dp_shard x cp
            stage = _resolve_stage(cfg, i, raw, free, step, prev, p.tensor_parallel_degree)
        if stages and stage.seq_len <= stages[-1].seq_len:
            raise ConfigError(
                f"curriculum.stages[{i}].seq_len",
                stage.seq_len,
                f"must be greater than the previous stage's {stages[-1].seq_len}",
            )
        try:
            check_stage(stage_config(cfg, stage), world_size)
        except ConfigError as e:
            raise ConfigError(f"curriculum.stages[{i}] -> {e.key}", e.value, e.reason) from None
        stages.append(stage)
        step = stage.last_step
    return stages


def _wants_auto_mesh(cfg: Any, i: int, raw: dict[str, Any]) -> bool:
    """Whether stage ``i`` is auto-meshed (its ``auto_mesh``, else ``curriculum.auto_mesh``).

    Raises:
        ConfigError: ``auto_mesh`` is not a bool, or an auto-meshed stage sets a mesh key.
    """
    key = f"curriculum.stages[{i}]"
    auto = raw.get("auto_mesh", cfg.curriculum.auto_mesh)
    if not isinstance(auto, bool):
        raise ConfigError(f"{key}.auto_mesh", auto, "expected true or false")
    if auto:
        for k in MESH_KEYS:
            if k in raw:
                raise ConfigError(
                    f"{key}.{k}",
                    raw[k],
                    "the stage is auto-meshed (auto_mesh): the planner chooses it; remove one "
                    "of the two",
                )
    return auto


def _resolve_stage(
    cfg: Any, i: int, raw: dict[str, Any], free: int, step: int, prev: Stage | None, tp: int
) -> Stage:
    """Stage ``i`` from its table ``raw``, with ``free`` ranks for dp_shard x cp and tensor
    parallel degree ``tp``. Unset keys: rope_theta is the previous stage's (a context
    extension keeps its RoPE base unless it says otherwise; the first stage: the recipe's
    ``model.rope_theta``), the others the recipe's."""
    key = f"curriculum.stages[{i}]"
    for k, v in raw.items():
        if k not in STAGE_KEYS:
            raise ConfigError(f"{key}.{k}", v, f"unknown stage key; valid: {', '.join(STAGE_KEYS)}")
        if k in STAGE_STR_KEYS:
            if not isinstance(v, str):
                raise ConfigError(f"{key}.{k}", v, "expected a string")
            continue
        if k in STAGE_BOOL_KEYS:
            continue  # checked by _wants_auto_mesh
        numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
        if k in STAGE_INT_KEYS and not (isinstance(v, int) and numeric):
            raise ConfigError(f"{key}.{k}", v, "expected an int")
        if k in STAGE_FLOAT_KEYS and not numeric:
            raise ConfigError(f"{key}.{k}", v, "expected a number")
        if v <= 0:
            raise ConfigError(f"{key}.{k}", v, "must be > 0")
    for required in ("seq_len", "steps"):
        if required not in raw:
            raise ConfigError(f"{key}.{required}", None, "every stage needs seq_len and steps")
    seq_len, steps = int(raw["seq_len"]), int(raw["steps"])
    cur, p = cfg.curriculum, cfg.parallelism

    if "context_parallel_degree" in raw:
        cp = int(raw["context_parallel_degree"])
    elif cur.max_tokens_per_cp_rank > 0:
        cp = _auto_cp(cfg, i, seq_len, free)
    else:
        cp = p.context_parallel_degree
    if free % cp != 0:
        raise ConfigError(
            f"{key}.context_parallel_degree",
            cp,
            f"must divide the {free} ranks left for dp_shard x cp (world / (pp x dp_replicate x "
            f"tp {tp}))",
        )
    dp_shard = free // cp
    dp = dp_shard * p.data_parallel_replicate_degree

    if cur.tokens_per_step > 0:
        if cur.tokens_per_step % seq_len != 0:
            raise ConfigError(
                "curriculum.tokens_per_step",
                cur.tokens_per_step,
                f"not divisible by stage {i}'s seq_len {seq_len}",
            )
        global_batch = cur.tokens_per_step // seq_len
    else:
        global_batch = int(raw.get("global_batch_size", cfg.training.global_batch_size))
    batch_derived = global_batch == -1
    if batch_derived:
        global_batch = cfg.training.local_batch_size * dp
    local = int(raw.get("local_batch_size", 0)) or max(
        1, min(cfg.training.local_batch_size, global_batch // dp)
    )
    if global_batch % (local * dp) != 0:
        raise ConfigError(
            f"{key}.global_batch_size",
            global_batch,
            f"not a multiple of local_batch_size ({local}) x dp ({dp}) = {local * dp}",
        )
    theta = float(raw.get("rope_theta", prev.rope_theta if prev else cfg.model.rope_theta))
    rope = {
        k: raw.get(k, prev.rope[k] if prev else getattr(cfg.model, k))
        for k in ROPE_KEYS
        if k != "rope_theta"
    }
    if "context_parallel_pattern" in raw:
        pattern = str(raw["context_parallel_pattern"])
        degrees = [int(raw.get(k, 0)) for k in PATTERN_DEGREE_KEYS]
    else:
        pattern = p.context_parallel_pattern
        degrees = [int(raw.get(k, getattr(p, k))) for k in PATTERN_DEGREE_KEYS]
    return Stage(
        i,
        seq_len,
        steps,
        step + 1,
        step + steps,
        theta,
        cp,
        dp_shard,
        global_batch,
        local,
        lr=float(raw["lr"]) if "lr" in raw else None,
        warmup_steps=int(raw.get("warmup_steps", 0)),
        min_doc_tokens=int(raw.get("min_doc_tokens", 0)),
        mixture=parse_mixture(f"{key}.mixture", raw["mixture"], int(raw.get("min_doc_tokens", 0)))
        if "mixture" in raw
        else (),
        cp_pattern=pattern,
        cp_ulysses_degree=degrees[0],
        cp_inner_ring_degree=degrees[1],
        rope=rope,
        tp=tp,
        attn_mask_type=str(
            raw.get("attn_mask_type", prev.attn_mask_type if prev else cfg.model.attn_mask_type)
        ),
        batch_derived=batch_derived,
    )


def _auto_cp(cfg: Any, i: int, seq_len: int, free: int) -> int:
    """Smallest CP degree dividing ``free`` with seq_len / cp <= max_tokens_per_cp_rank and
    seq_len divisible as TP / CP need."""
    cap = cfg.curriculum.max_tokens_per_cp_rank
    p = cfg.parallelism
    for cp in range(1, free + 1):
        if free % cp:
            continue
        divisor = seq_len_divisor(p.tensor_parallel_degree, cp, p.context_parallel_load_balancer)
        if seq_len / cp <= cap and seq_len % divisor == 0:
            return cp
    raise ConfigError(
        f"curriculum.stages[{i}].seq_len",
        seq_len,
        f"no CP degree dividing {free} keeps seq_len / cp <= max_tokens_per_cp_rank = {cap}",
    )


def stage_config(cfg: Any, stage: Stage) -> Any:
    """A copy of ``cfg`` for one stage: training.seq_len / batch / steps (the whole run's, so
    one LR schedule spans all stages), validation.seq_len, CP degree and pattern, dp_shard
    degree, RoPE theta.
    """
    out = copy.deepcopy(cfg)
    out.training = dataclasses.replace(
        out.training,
        seq_len=stage.seq_len,
        global_batch_size=stage.global_batch_size,
        local_batch_size=stage.local_batch_size,
        steps=sum(int(s.get("steps", 0)) for s in cfg.curriculum.stages),
    )
    out.validation = dataclasses.replace(
        out.validation, seq_len=stage.seq_len, local_batch_size=stage.local_batch_size
    )
    out.parallelism = dataclasses.replace(
        out.parallelism,
        context_parallel_degree=stage.cp,
        data_parallel_shard_degree=stage.dp_shard,
        tensor_parallel_degree=stage.tp,
        context_parallel_pattern=stage.cp_pattern,
        context_parallel_ulysses_degree=stage.cp_ulysses_degree,
        context_parallel_inner_ring_degree=stage.cp_inner_ring_degree,
    )
    out.model = dataclasses.replace(
        out.model,
        rope_theta=stage.rope_theta,
        attn_mask_type=stage.attn_mask_type,
        **stage.rope,
    )
    return out


def stage_lr_factor(stage: Stage, epoch: int) -> float:
    """The stage's warmup factor for the LR scheduler's ``epoch`` (= the number of scheduler
    steps taken; the lr of global step k is computed at epoch k - 1)."""
    if stage.warmup_steps <= 0:
        return 1.0
    k = epoch - (stage.first_step - 1) + 1  # 1 at the stage's first step
    return min(1.0, max(k, 1) / stage.warmup_steps)


def stage_of_step(stages: list[Stage], step: int) -> Stage:
    """The stage that runs the step after ``step`` (the last stage when the run is over)."""
    for stage in stages:
        if step < stage.last_step:
            return stage
    return stages[-1]


def stage_name(index: int, n_stages: int) -> str:
    """How the log names a stage: ``"1 of 0..2"`` (the second of three). Stages count from 0
    everywhere a user reads them, as the recipe's ``curriculum.stages[i]`` array does in
    config errors: the plan table, the log, the console line, ``metrics.jsonl``'s ``stage``
    and tensorboard's ``curriculum/stage``."""
    return f"{index} of 0..{n_stages - 1}"


def rope_label(rope: dict[str, Any]) -> str:
    """A stage's RoPE scaling in a few characters: "none", "llama x8", "yarn x4"."""
    kind = rope.get("rope_scaling", "llama")
    return kind if kind == "none" else f"{kind} x{rope.get('rope_scaling_factor', 8.0):g}"


def _pattern_label(s: Stage) -> str:
    if s.cp == 1:
        return "-"
    from torchtitan_ext.parallel.cp_patterns import default_inner_ring_degree

    ring = s.cp_inner_ring_degree or default_inner_ring_degree(s.cp)
    inner = {"hybrid": s.cp_ulysses_degree, "double_ring": ring}
    return f"{s.cp_pattern}({inner[s.cp_pattern]})" if s.cp_pattern in inner else s.cp_pattern


def format_plan(stages: list[Stage]) -> str:
    """A table of the stages for the log (and, for auto-meshed stages, the planner's choice
    and the next best meshes with their estimates: ``format_mesh_plan``)."""
    lines = [
        "stage  steps (global)    seq_len  rope_theta  rope scaling   tp   cp  cp pattern      "
        "attention      dp_shard  batch  "
        "tokens/step  peak lr  warmup  min doc tokens  data"
    ]
    for s in stages:
        lr = f"{s.lr:.2e}" if s.lr is not None else "recipe"
        lines.append(
            f"{s.index:5d}  {s.first_step:6d}-{s.last_step:<8d} {s.seq_len:8d}  "
            f"{f'{s.rope_theta:.3g}' if s.rope_theta else 'flavor':>10s}  "
            f"{rope_label(s.rope):12s}  {s.tp:3d}  {s.cp:3d}  "
            f"{_pattern_label(s) + (' (auto)' if s.mesh_plan else ''):14s}  "
            f"{s.attn_mask_type or 'flavor':12s}  {s.dp_shard:8d}  "
            f"{s.global_batch_size:5d}  {s.tokens_per_step:11d}  {lr:>7s}  "
            f"{s.warmup_steps:6d}  {s.min_doc_tokens:14d}  "
            f"{describe_mixture(s.mixture) if s.mixture else 'train'}"
        )
    auto = format_mesh_plan(stages)
    return "\n".join(lines) + (f"\n{auto}" if auto else "")


def format_mesh_plan(stages: list[Stage], top: int = 3) -> str:
    """For each auto-meshed stage, the chosen mesh and the next best ones with the planner's
    estimates (``Stage.mesh_plan``: memory GiB/device, comm GiB/step, step seconds), for the
    log and the checker; empty without auto-meshed stages."""
    lines = []
    for s in stages:
        if not s.mesh_plan:
            continue
        fitting = [e for e in s.mesh_plan if e.fits]
        lines.append(
            f"stage {s.index} auto mesh: {len(fitting)} of {len(s.mesh_plan)} valid meshes fit; "
            f"each at {s.tokens_per_step} tokens/step, ranked by time per token; est. memory "
            "GiB/device, comm GiB/step (inter-node), step s (compute + comm)"
        )
        for rank, e in enumerate(fitting[:top]):
            mark = "chosen" if rank == 0 else f"#{rank + 1}"
            lines.append(
                f"  {mark:6s} {e.label:34s} {e.memory_gib:8.3g}  {e.comm_gib:8.3g} "
                f"({e.inter_node_gib:.3g})  {e.step_sec:.3g} ({e.compute_sec:.3g} + "
                f"{e.comm_sec:.3g})"
            )
    return "\n".join(lines)


def _disk_switches(c: RecipeCheck) -> None:
    """Stages that start from the boundary checkpoint (``switch_in_memory = false``) need it."""
    cfg = c.cfg
    if not c.stages or cfg.curriculum.switch_in_memory:
        return
    why = "with curriculum.switch_in_memory = false each stage starts from the boundary checkpoint"
    if not cfg.checkpoint.enable:
        raise ConfigError(
            "checkpoint.enable", False, f"{why}: enable checkpoints, or switch stages in memory"
        )
    if cfg.checkpoint.load_only:
        raise ConfigError(
            "checkpoint.load_only",
            True,
            f"{why}, which load_only would not write (every stage but the last would be "
            "lost): switch stages in memory, or drop load_only",
        )
    if not cfg.curriculum.boundary_checkpoint:
        raise ConfigError("curriculum.boundary_checkpoint", False, f"{why}: it cannot be skipped")


RULES: tuple[Rule, ...] = (
    Rule(
        "curriculum",
        ("curriculum.switch_in_memory", "checkpoint.enable", "checkpoint.load_only"),
        "stages that start from the boundary checkpoint have it written",
        _disk_switches,
        "curriculum",
    ),
)
"""This module's recipe rules (``torchtitan_ext.rules``); ``validate.RULES`` lists them in
its table, in phase order."""
