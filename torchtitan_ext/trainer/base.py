"""What a ``Trainer`` holds, declared once for the parts it is made of (``step``, ``validation``,
``guards``, ``switch``; ``core.Trainer.__init__`` sets it all), the helpers they share (the
data loaders of a recipe, the parameters' fingerprint, rank-0 warnings), and the exceptions
that end a run early.
"""

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torchtitan.components.lr_scheduler import LRSchedulersContainer
from torchtitan.components.optimizer import OptimizersContainer

from torchtitan_ext.checkpoint import Checkpointer, TrainState
from torchtitan_ext.curriculum import Stage
from torchtitan_ext.data import GlobalBatchLoader, PackedWindows
from torchtitan_ext.data.loader import Windows
from torchtitan_ext.data.mixture import MixedWindows
from torchtitan_ext.metrics import MetricsLogger, StepMemory
from torchtitan_ext.models import canonical_name
from torchtitan_ext.parallel.pipeline import Pipeline
from torchtitan_ext.parallel_dims import ParallelDims
from torchtitan_ext.trainer.setup import Prepared
from torchtitan_ext.validate import global_batch_size, unit_len

logger = logging.getLogger("torchtitan_ext")


class TrainingDiverged(RuntimeError):
    """The run cannot continue from its current state: more consecutive non-finite gradient
    norms than ``training.max_consecutive_nonfinite_steps``, or non-finite weights at a save.
    Raised on every rank at the same step (the decision uses global values only)."""


class TrainingStopped(Exception):
    """Every rank stopped after the same step on a stop signal (``preemption``), its
    checkpoint written; the message is the process's one line.

    Attributes:
        signum: the signal the ranks agreed on.
        step: the last step trained.
    """

    def __init__(self, signum: int, step: int, message: str) -> None:
        super().__init__(message)
        self.signum, self.step = signum, step


class ResumeEarlierStage(Exception):
    """A curriculum stage's trainer loaded a checkpoint of an earlier stage (the newer ones
    failed to load): ``run`` starts again from that checkpoint's stage.

    Attributes:
        step: the step of the checkpoint that was loaded.
    """

    def __init__(self, step: int) -> None:
        super().__init__(f"loaded step {step}, before this stage")
        self.step = step


def _local(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (loss parallel's loss) as its local tensor; autograd flows through."""
    return t.to_local() if isinstance(t, DTensor) else t


class TrainerBase:
    """The attributes a ``Trainer`` has (``core.Trainer.__init__`` sets them), declared for
    the mixins that make up the trainer, and the helpers they share."""

    stage: Stage | None
    n_stages: int
    last_step_ended: float | None
    cfg: Any
    dims: ParallelDims
    device: torch.device
    rank: int
    flops_per_token: int
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    _loss_scale: torch.Tensor
    pipeline: Pipeline | None
    model_parts: list[nn.Module]
    amp: contextlib.AbstractContextManager[Any]
    optimizers: OptimizersContainer
    lr_schedulers: LRSchedulersContainer
    _run_lr_lambdas: list[list[Any]]
    _switched_in_memory: bool
    _boundary_stats: dict[str, Any]
    save_at_end: bool
    dataloader: GlobalBatchLoader
    val_windows: PackedWindows | None
    skipped_steps: int
    nonfinite_streak: list[int]
    train_state: TrainState
    checkpointer: Checkpointer
    metrics: MetricsLogger
    memory: StepMemory
    attn_mask_type: str
    eos_id: int | None
    tokenizer: Any
    titan_masks: bool
    attn_work: torch.Tensor

    def _set_attention_masks(self, p: Prepared) -> None:
        """What ``_shard_sequence`` builds for the attention of ``p``'s recipe (stage): the
        mask type, the EOS that ends documents, whether TorchTitan's flex / varlen masks are
        needed; and a zeroed per-cp-rank count of the block-causal work (``attn_work``)."""
        args = p.model_args
        self.attn_mask_type = getattr(args, "attn_mask_type", "causal")
        self.tokenizer = p.tokenizer
        self.eos_id = getattr(p.tokenizer, "eos_id", None)
        self.titan_masks = getattr(args, "attn_type", "sdpa") in ("flex", "varlen")
        cp = self.dims.cp if self.dims.cp_enabled else 1
        self.attn_work = torch.zeros(cp, dtype=torch.int64)

    def _warn(self, message: str) -> None:
        """A warning on rank 0 only, for conclusions every rank reaches alike."""
        if self.rank == 0:
            logger.warning(message)

    def _attn_work_record(self) -> dict[str, float]:
        """``attn_work_max_over_min``: the block-causal attention work (query-key pairs under
        the document mask) of the busiest cp rank over the idlest's, for this rank's
        microbatches since the previous log (1.0: balanced; {} without block_causal); then a
        new window."""
        work, self.attn_work = self.attn_work, torch.zeros_like(self.attn_work)
        if work.numel() < 2 or int(work.sum()) == 0:
            return {}
        return {"attn_work_max_over_min": float(work.max()) / max(float(work.min()), 1.0)}

    @torch.no_grad()
    def param_fingerprint(self) -> dict[str, tuple[float, float, float]]:
        """Per parameter (canonical FQN), the (sum, sum of squares, position-weighted sum) of
        its full tensor in fp64: the same numbers on every mesh that holds the same model (up
        to fp64 rounding of the summation order). The weighted sum, sum_i x_i (1 + i mod 251)
        over the flattened tensor, changes when elements move (a re-mesh that puts a shard in
        the wrong place); the first two do not. Gathers one parameter at a time; collective.

        Returns:
            {fqn: (sum, sum of squares, weighted sum)} for every parameter of the whole model
            (all stages).
        """
        stats: dict[str, tuple[float, float, float]] = {}
        for part in self.model_parts:
            for name, param in part.named_parameters():
                full = param.full_tensor() if isinstance(param, DTensor) else param
                flat = full.detach().to(torch.float64).flatten()
                weights = torch.arange(flat.numel(), dtype=torch.float64) % 251 + 1
                stats[canonical_name(name)] = (
                    float(flat.sum()),
                    float(flat.square().sum()),
                    float((flat * weights.to(flat.device)).sum()),
                )
        if self.dims.pp_enabled:  # each pp rank holds other stages' parameters
            gathered: list[Any] = [None] * self.dims.pp
            dist.all_gather_object(gathered, stats, group=self.dims.get_mesh("pp").get_group())
            stats = {k: v for part_stats in gathered for k, v in part_stats.items()}
        return stats

    @staticmethod
    def _build_val_windows(p: Prepared) -> PackedWindows | None:
        v = p.cfg.validation
        if not v.enable:
            return None
        return PackedWindows(p.val_tokens, v.seq_len, 0, shuffle=False, key="validation")

    def _build_dataloader(self, p: Prepared, stage: Stage | None) -> GlobalBatchLoader:
        """The training loader of ``p``'s recipe (a stage's: its seq_len, batch, documents),
        on this trainer's mesh."""
        t, dims = p.cfg.training, self.dims
        seed, unit = p.cfg.data.shuffle_seed, unit_len(p.stages)
        windows: Windows
        if stage is not None and stage.mixture:
            # Every source's windows on the run's grid of units, drawn in the stage's weights.
            key = f"curriculum.stages[{stage.index}].mixture"
            sources = [PackedWindows(s, t.seq_len, seed, unit_len=unit, key=key) for s in p.mixture]
            windows = MixedWindows(sources, [w for _, w, _ in stage.mixture], seed)
        else:
            windows = PackedWindows(p.train_tokens, t.seq_len, seed, unit_len=unit)
        return GlobalBatchLoader(
            windows,
            local_batch_size=t.local_batch_size,
            dp_rank=dims.dp_rank(),
            dp_degree=dims.dp,
            grad_accum_steps=global_batch_size(p.cfg, dims) // (t.local_batch_size * dims.dp),
            continue_at_new_seq_len=stage is not None,
            derived_global_batch=t.global_batch_size == -1,
        )
