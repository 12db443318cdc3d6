"""Pipeline parallel: the model split by layers into stages (``torch.distributed.pipelining``),
each stage parallelized by the same function as a whole model, driven by one of torch's
schedules.

The split and the schedule builder are TorchTitan 0.2.2's
(``torchtitan/distributed/pipeline_parallel.py``: ``generate_llm_fqn_per_model_part``,
``pipeline_module_split``, ``build_pipeline_schedule``). What is ours: ``plan_pipeline``, which
checks a recipe's pipeline against the model and the schedule's rules before any process group
exists (TorchTitan raises these deep inside its trainer, or torch raises them when the schedule
is built, one traceback per rank), and the loss that makes every schedule's gradients equal the
non-pipelined ones.

Schedules (torch's): single-stage ``GPipe`` (arXiv 1811.06965), ``1F1B`` (PipeDream-Flush,
arXiv 2006.09503); multi-stage ``Interleaved1F1B`` (Megatron-LM, arXiv 2104.04473),
``LoopedBFS`` (arXiv 2211.05953), ``InterleavedZeroBubble`` (arXiv 2401.10241); V-shaped (two
stages per rank, the first and the last folded onto one rank) ``ZBVZeroBubble`` and
``DualPipeV`` (DeepSeek-V3, arXiv 2412.19437).
"""

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.pipelining.schedules import (
    PipelineScheduleSingle,
    ScheduleDualPipeV,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
    _PipelineSchedule,
    get_schedule_class,
)
from torchtitan.distributed.pipeline_parallel import (
    build_pipeline_schedule,
    generate_llm_fqn_per_model_part,
    pipeline_module_split,
)

from torchtitan_ext.errors import ConfigError
from torchtitan_ext.rules import RecipeCheck, Rule

SCHEDULES = (
    "GPipe",
    "1F1B",
    "Interleaved1F1B",
    "LoopedBFS",
    "InterleavedZeroBubble",
    "ZBVZeroBubble",
    "DualPipeV",
)
"""The schedule names ``parallelism.pipeline_parallel_schedule`` accepts (torch's names)."""

_V_SCHEDULES = (ScheduleZBVZeroBubble, ScheduleDualPipeV)
V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")
"""Schedules with two stages per rank in a V (stage r and 2 pp - 1 - r on rank r)."""
_KEY = "parallelism.pipeline_parallel_schedule"


@dataclass(frozen=True)
class PipelinePlan:
    """How a recipe pipelines its model; pure data, the same on every rank.

    Attributes:
        schedule: torch's schedule name, e.g. "1F1B".
        pp: pipeline degree (ranks in the pp mesh dim).
        stages_per_rank: 1 for single-stage schedules, >= 2 for looped / V schedules.
        module_fqns: per stage (all ``pp * stages_per_rank`` of them), the top-level module
            names it holds, e.g. ``[["tok_embeddings", "layers.0"], ["layers.1", "norm",
            "output"]]``.
        n_microbatches: pipeline microbatches per ``local_batch_size`` batch
            (local_batch_size / pipeline_parallel_microbatch_size).
    """

    schedule: str
    pp: int
    stages_per_rank: int
    module_fqns: list[list[str]]
    n_microbatches: int

    @property
    def num_stages(self) -> int:
        return self.pp * self.stages_per_rank


def plan_pipeline(cfg: Any, n_layers: int) -> PipelinePlan:
    """Check the recipe's pipeline settings against the model and the schedule; no collective.

    Stage count: ``pipeline_parallel_layers_per_stage`` when set (stages = ceil((n_layers +
    first_stage_less_layers + last_stage_less_layers) / layers_per_stage)), else 1 stage per
    rank for single-stage schedules and 2 for the others (TorchTitan 0.2.2's rule), or the
    length of an explicit ``module_fqns_per_model_part``.

    Args:
        cfg: the merged JobConfig with ``parallelism.pipeline_parallel_degree > 1``.
        n_layers: the model's number of transformer blocks.

    Raises:
        ConfigError: unknown schedule; stage count not divisible by pp or wrong for the
            schedule (single-stage: exactly 1 per rank; looped: >= 2; V: exactly 2); layers
            that do not split into that many non-empty stages; an explicit module list that
            misses, repeats or misorders modules; ``local_batch_size`` not divisible by
            ``pipeline_parallel_microbatch_size``; too few microbatches for the schedule; a
            validation batch shaped differently from a training batch; validation with a
            V-shaped schedule.
    """
    p = cfg.parallelism
    pp = int(p.pipeline_parallel_degree)
    schedule_cls = _schedule_class(p.pipeline_parallel_schedule)
    single = issubclass(schedule_cls, PipelineScheduleSingle)
    schedule = p.pipeline_parallel_schedule

    fqns: list[list[str]] | None = p.module_fqns_per_model_part
    value: Any
    if fqns is not None:
        key, value = "parallelism.module_fqns_per_model_part", fqns
        num_stages = len(fqns)
    elif p.pipeline_parallel_layers_per_stage is not None:
        key, value = (
            "parallelism.pipeline_parallel_layers_per_stage",
            p.pipeline_parallel_layers_per_stage,
        )
        if value < 1:
            raise ConfigError(key, value, "must be >= 1")
        weights = p.pipeline_parallel_first_stage_less_layers + (
            p.pipeline_parallel_last_stage_less_layers
        )
        num_stages = math.ceil((n_layers + weights) / value)
    else:
        key, value = "parallelism.pipeline_parallel_degree", pp
        num_stages = pp * (1 if single else 2)
    if num_stages % pp != 0:
        raise ConfigError(key, value, f"gives {num_stages} stages, not divisible by pp = {pp}")
    per_rank = num_stages // pp
    if single and per_rank != 1:
        raise ConfigError(
            key, value, f"gives {per_rank} stages per rank; {schedule} runs exactly 1 per rank"
        )
    if not single and per_rank < 2:
        raise ConfigError(
            key,
            value,
            f"gives {per_rank} stage per rank; {schedule} needs >= 2 (use GPipe or 1F1B for 1)",
        )
    if issubclass(schedule_cls, _V_SCHEDULES) and per_rank != 2:
        raise ConfigError(key, value, f"gives {per_rank} stages per rank; {schedule} needs 2")

    if fqns is None:
        try:
            fqns = generate_llm_fqn_per_model_part(
                num_stages,
                n_layers,
                p.pipeline_parallel_first_stage_less_layers,
                p.pipeline_parallel_last_stage_less_layers,
            )
        except ValueError as e:
            raise ConfigError(key, value, f"the model's {n_layers} layers: {e}") from None
        if any(not stage for stage in fqns):
            raise ConfigError(
                key, value, f"leaves an empty stage among {num_stages} for {n_layers} layers"
            )
    else:
        _check_module_fqns(fqns, n_layers)

    n_microbatches = _check_microbatches(cfg, schedule_cls, pp, num_stages)
    return PipelinePlan(schedule, pp, per_rank, fqns, n_microbatches)


def _schedule_class(name: str) -> type[_PipelineSchedule]:
    try:
        cls = get_schedule_class(name)
    except ValueError:
        cls = None
    if cls is None or cls.__name__ in ("PipelineScheduleSingle", "PipelineScheduleMulti"):
        raise ConfigError(_KEY, name, f"supported schedules: {', '.join(SCHEDULES)}")
    return cls


def _check_module_fqns(fqns: list[list[str]], n_layers: int) -> None:
    """Every module exactly once, blocks in order, embedding first, norm and output last."""
    key = "parallelism.module_fqns_per_model_part"
    expected = ["tok_embeddings", *(f"layers.{i}" for i in range(n_layers)), "norm", "output"]
    flat = [name for stage in fqns for name in stage]
    if sorted(flat) != sorted(expected):
        missing = sorted(set(expected) - set(flat))
        extra = sorted({n for n in flat if flat.count(n) > 1 or n not in expected})
        raise ConfigError(
            key,
            fqns,
            f"must name each of the model's modules exactly once (missing {missing}, "
            f"repeated or unknown {extra})",
        )
    if any(not stage for stage in fqns):
        raise ConfigError(key, fqns, "every stage needs at least one module")
    if flat != expected:
        raise ConfigError(key, fqns, f"modules must appear in model order: {expected}")


def _check_microbatches(
    cfg: Any, schedule_cls: type[_PipelineSchedule], pp: int, num_stages: int
) -> int:
    p, t = cfg.parallelism, cfg.training
    mbs = p.pipeline_parallel_microbatch_size
    key = "parallelism.pipeline_parallel_microbatch_size"
    if mbs < 1:
        raise ConfigError(key, mbs, "must be >= 1")
    if t.local_batch_size % mbs != 0:
        raise ConfigError(key, mbs, f"must divide training.local_batch_size = {t.local_batch_size}")
    n = t.local_batch_size // mbs
    name = schedule_cls.__name__.removeprefix("Schedule")
    # torch's constructors raise these; here they come before any process group exists.
    min_needed = {"1F1B": pp, "DualPipeV": num_stages}.get(name)
    if min_needed is not None and n < min_needed:
        raise ConfigError(
            "training.local_batch_size",
            t.local_batch_size,
            f"gives {n} pipeline microbatches of {mbs}; {name} needs >= {min_needed}",
        )
    if issubclass(schedule_cls, (ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble)):
        rounds = max(1, n // pp)
        if n % rounds != 0:
            raise ConfigError(
                "training.local_batch_size",
                t.local_batch_size,
                f"gives {n} pipeline microbatches of {mbs}; {name} needs a multiple of "
                f"max(1, microbatches // pp) = {rounds}",
            )
    v = cfg.validation
    if v.enable and issubclass(schedule_cls, _V_SCHEDULES):
        # torch 2.13's _PipelineSchedule.eval() hands activations between the two local stages
        # of a V schedule through the backward path and asserts ("can't steal_bwd_input if
        # this stage doesn't have backward"); TorchTitan's validator calls the same eval().
        raise ConfigError(
            "validation.enable",
            True,
            f"validation with {name} is not supported (torch's schedule.eval() fails for "
            "V-shaped schedules); disable validation or use Interleaved1F1B / "
            "InterleavedZeroBubble",
        )
    if v.enable and (v.local_batch_size, v.seq_len) != (t.local_batch_size, t.seq_len):
        # The stages size their receive buffers at the first step; evaluation reuses them.
        raise ConfigError(
            "validation.local_batch_size",
            v.local_batch_size,
            f"with pp > 1, validation batches must be shaped like training ones: "
            f"local_batch_size {t.local_batch_size} (is {v.local_batch_size}) and seq_len "
            f"{t.seq_len} (is {v.seq_len})",
        )
    return n


@dataclass
class Pipeline:
    """This rank's stages and the schedule that runs them.

    Attributes:
        schedule: torch's schedule over this rank's stages.
        model_parts: this rank's stage modules (1, or 2+ for looped / V schedules), each a
            TorchTitan model with the modules of other stages set to None / removed, already
            parallelized.
        has_first_stage: this rank runs stage 0 (it feeds the token ids).
        has_last_stage: this rank runs the last stage (it computes the loss).
    """

    schedule: _PipelineSchedule
    model_parts: list[nn.Module]
    has_first_stage: bool
    has_last_stage: bool


def pipeline_split(
    model: nn.Module,
    pp_mesh: Any,
    plan: PipelinePlan,
    cfg: Any,
    device: torch.device,
    parallelize_stage: Callable[[nn.Module], nn.Module],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Pipeline:
    """Split ``model`` (on the meta device) into this rank's stages, parallelize each and build
    the schedule.

    Args:
        model: the whole model, on the meta device.
        pp_mesh: the 1-D pp mesh.
        plan: from ``plan_pipeline``.
        cfg: the merged JobConfig (schedule name, microbatch size).
        device: the training device (stage buffers).
        parallelize_stage: applies TP / CP / AC / compile / FSDP to one stage module.
        loss_fn: (logits (mb, S, vocab) fp32, labels (mb, S) int64) -> scalar; called by the last
            stage per pipeline microbatch, its gradient flows back through every stage. The
            schedule is built with ``scale_grads=False``: the loss must already carry the
            normalisation (ours divides by the global number of label tokens).

    Returns:
        The Pipeline of this rank.
    """
    stages, parts = pipeline_module_split(model, pp_mesh, plan.schedule, device, plan.module_fqns)
    for i, part in enumerate(parts):
        parts[i] = parallelize_stage(part)
        stages[i].submod = parts[i]
    # TorchTitan registers its expert-parallel overlap callback for DualPipeV whenever
    # pipeline_parallel_expert_parallel_overlap (default True) is set; it needs MoE layers and
    # a CUDA stream, and these dense models have neither.
    no_ep_overlap = dataclasses.replace(
        cfg.parallelism, pipeline_parallel_expert_parallel_overlap=False
    )
    schedule = build_pipeline_schedule(
        _with_section(cfg, "parallelism", no_ep_overlap), stages, loss_fn
    )
    return Pipeline(
        schedule,
        parts,
        any(s.is_first for s in stages),
        any(s.is_last for s in stages),
    )


def _with_section(cfg: Any, name: str, section: Any) -> Any:
    """A shallow copy of ``cfg`` with one section replaced (the original is untouched)."""
    out = copy.copy(cfg)
    setattr(out, name, section)
    return out


def _pipeline(c: RecipeCheck) -> None:
    if c.cfg.parallelism.pipeline_parallel_degree > 1:
        plan_pipeline(c.cfg, c.model_args.n_layers)


RULES: tuple[Rule, ...] = (
    Rule(
        "recipe",
        ("parallelism.pipeline_*",),
        "with pp > 1: stages divide the layers, a known schedule, microbatches divide the batch",
        _pipeline,
        "parallel.pipeline",
    ),
)
"""This module's recipe rules (``torchtitan_ext.rules``); ``validate.RULES`` lists them in
its table, in phase order."""
