"""The training loop, in TorchTitan's style (``Trainer.train -> train_step``), on CPU/gloo and
CUDA/NCCL.

Reuses TorchTitan 0.2.2's schema, model registry, loss, optimizer and LR-scheduler builders and
gradient clipping; not its ``Trainer`` (which assumes CUDA). Start-up order matters: everything
that can fail on a bad recipe (config, mesh degrees, dataset, tokenizer) runs on every rank
before the first collective, so a bad recipe exits on every rank with one message instead of
hanging.
"""

import contextlib
import dataclasses
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import distributed_c10d
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torchtitan.components.checkpoint import ModelWrapper
from torchtitan.components.loss import IGNORE_INDEX, build_cross_entropy_loss
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed.utils import clip_grad_norm_
from torchtitan.protocols.train_spec import get_train_spec
from torchtitan.tools.utils import GarbageCollection, set_default_dtype

from torchtitan_ext.checkpoint import (
    Checkpointer,
    CheckpointError,
    TrainState,
    agreed_steps,
    complete_steps,
    transfer_state,
)
from torchtitan_ext.config.manager import format_toml, load_config
from torchtitan_ext.curriculum import (
    MeshPlanner,
    Stage,
    format_plan,
    rope_label,
    stage_config,
    stage_lr_factor,
    stage_name,
    stage_of_step,
)
from torchtitan_ext.data import (
    GlobalBatchLoader,
    PackedWindows,
    build_tokenizer,
    load_documents,
    long_documents,
    split_documents,
    tokenize,
    tokenize_with_offsets,
)
from torchtitan_ext.distributed import (
    RankInfo,
    configure_cuda_allocator,
    init_distributed,
)
from torchtitan_ext.errors import ConfigError
from torchtitan_ext.long_context.chunked_loss import ChunkedCrossEntropy
from torchtitan_ext.metrics import (
    MetricsLogger,
    device_peak_flops,
    peak_memory_mib,
    reset_peak_memory,
)
from torchtitan_ext.models import (
    build_model_on_meta,
    canonical_name,
    init_weights_mesh_independent,
)
from torchtitan_ext.parallel import cp_patterns
from torchtitan_ext.parallel.context_parallel import shard_sequence
from torchtitan_ext.parallel.pipeline import Pipeline, pipeline_split, plan_pipeline
from torchtitan_ext.parallel_dims import ParallelDims
from torchtitan_ext.parallelize import parallelize
from torchtitan_ext.preemption import STOP, STOPPED_EXIT_CODE
from torchtitan_ext.rope import apply_rope_scaling, rope_scaling_of
from torchtitan_ext.run_lock import FolderInUse, FolderLock, LocksUnsupported, acquire
from torchtitan_ext.validate import (
    RecipeData,
    check_data,
    check_recipe,
    derived_batch_note,
    global_batch_size,
    resolve_model_args,
    unit_len,
    validate,
)

logger = logging.getLogger("torchtitan_ext")


@dataclass
class Prepared:
    """Everything resolved before the first collective."""

    cfg: Any
    rank: RankInfo
    dims: ParallelDims
    device: torch.device
    backend: str
    tokenizer: BaseTokenizer
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    model_args: Any
    stages: list[Stage] = dataclasses.field(default_factory=list)
    """Curriculum stages ([] without a curriculum); ``cfg`` is then stage 0's recipe."""
    train_doc_offsets: np.ndarray | None = None
    """(n_docs + 1,) offsets of the documents in ``train_tokens`` (for stages' min_doc_tokens)."""


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


def prepare(args: list[str], rank: RankInfo, mesh_planner: MeshPlanner | None = None) -> Prepared:
    """Parse, check (``validate.RULES``, every phase) and load data: no collective,
    identical on every rank. Unless ``training.device = "cpu"``, first sets the CUDA
    allocator's settings (``configure_cuda_allocator``), before any rule can start CUDA.
    ``mesh_planner`` chooses auto-meshed stages' meshes (the entry point hands in
    ``tools.auto_mesh.choose_stage_mesh``: the runtime never imports the tools).

    Raises:
        ConfigError: any problem with the recipe, the environment or the data.
    """
    recipe = load_config(args)
    if recipe.training.device != "cpu":
        # Before any rule can start CUDA (auto mesh reads the GPU's memory): the caching
        # allocator reads its settings once, when CUDA starts.
        configure_cuda_allocator()
    check = check_recipe(recipe, rank.world_size, rank.local_rank, mesh_planner)
    cfg, dims, device = check.cfg, check.dims, check.device
    assert dims is not None and device is not None
    model_args = check.model_args  # the recipe phase's own copy of the flavor's args
    model_args.update_from_config(cfg)
    tokenizer = build_tokenizer(cfg)
    docs = load_documents(cfg)
    train_docs, val_docs = split_documents(
        docs, cfg.data.validation_fraction, cfg.data.shuffle_seed
    )
    train_tokens, train_doc_offsets = tokenize_with_offsets(train_docs, tokenizer)
    val_tokens = tokenize(val_docs, tokenizer) if cfg.validation.enable else np.zeros(0, np.int32)
    data = RecipeData(tokenizer, train_tokens, train_doc_offsets, val_tokens, len(val_docs))
    check_data(check, data)
    return Prepared(
        cfg,
        rank,
        dims,
        device,
        check.backend,
        tokenizer,
        train_tokens,
        val_tokens,
        model_args,
        check.stages,
        train_doc_offsets,
    )


def validation_window_count(steps: int, global_batch: int, available: int) -> int:
    """Validation windows per validation: ``validation.steps`` x the global batch (in
    sequences), at most the ``available`` windows of the split; ``steps = -1``: all of them.
    The same on every mesh whenever the global batch is (TorchTitan counts ``steps`` per dp
    rank instead, so its validation loss depends on the data-parallel degree)."""
    return available if steps == -1 else min(available, steps * global_batch)


def prepare_stage(p: Prepared, stage: Stage, handed_over: bool) -> Prepared:
    """The Prepared of one curriculum stage: its recipe, mesh degrees and model args (RoPE
    theta, max_seq_len); the tokenized data is shared. No collective.

    Args:
        handed_over: the stage starts from the boundary checkpoint the previous stage of this
            run just wrote. It then loads the newest checkpoint and all of it: the recipe's
            ``load_step``, ``exclude_from_loading`` and initial load apply to where the run
            starts (its first stage), not to the hand-off between stages.
    """
    cfg = stage_config(p.cfg, stage)
    if handed_over:
        cfg.checkpoint = dataclasses.replace(
            cfg.checkpoint, load_step=-1, exclude_from_loading=[], initial_load_path=""
        )
    elif stage.index > 0:
        # A run resumed in a later stage: from its checkpoints, not a recipe's start point.
        cfg.checkpoint = dataclasses.replace(cfg.checkpoint, initial_load_path="")
    dims = validate(cfg, p.rank.world_size)
    assert dims is not None
    model_args = resolve_model_args(cfg)
    model_args.update_from_config(cfg)
    tokens = p.train_tokens
    if stage.min_doc_tokens and p.train_doc_offsets is not None:
        tokens = long_documents(tokens, p.train_doc_offsets, stage.min_doc_tokens)
    return dataclasses.replace(p, cfg=cfg, dims=dims, model_args=model_args, train_tokens=tokens)


class Trainer:
    """Builds the mesh, model, optimizer, data loader and checkpointer, then trains.

    Collective from construction on: every rank must construct and ``train()`` it.
    """

    def __init__(self, p: Prepared, stage: Stage | None = None, n_stages: int = 1) -> None:
        cfg, dims, device = p.cfg, p.dims, p.device
        self.stage, self.n_stages = stage, n_stages
        # perf_counter() at the end of the stage's last step (before validation): where the
        # next stage's switch time starts.
        self.last_step_ended: float | None = None
        self.cfg, self.dims, self.device, self.rank = cfg, dims, device, p.rank.rank
        dims.build_mesh(device.type)
        seed = cfg.debug.seed if cfg.debug.seed is not None else 0
        torch.manual_seed(seed)
        if cfg.debug.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=cfg.debug.deterministic_warn_only)

        # Model: meta -> parallelize -> materialize and initialize (mesh-independent).
        spec = get_train_spec(cfg.model.name)
        with set_default_dtype(TORCH_DTYPE_MAP[cfg.training.dtype]):
            model = build_model_on_meta(spec.model_cls, p.model_args)
        apply_rope_scaling(model, rope_scaling_of(cfg))  # freqs_cis, filled by init_weights
        nparams, self.flops_per_token = p.model_args.get_nparams_and_flops(
            model, cfg.training.seq_len
        )
        pattern = cp_patterns.recipe_pattern(cfg.parallelism, dims.cp)
        logger.info(
            f"model {cfg.model.name}/{cfg.model.flavor}: {nparams:,} parameters, "
            f"mesh {dims.shape_str()}"
            + (f" (context parallel: {pattern})" if dims.cp > 1 else "")
            + f", device {device}, backend {p.backend}, activation checkpointing "
            + _ac_label(cfg)
        )
        self.loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
            build_cross_entropy_loss(cfg)
        )
        # 1 / (label tokens in the global batch), set per step (see train_step).
        self._loss_scale = torch.ones((), device=device)
        self.pipeline: Pipeline | None = None
        plan = plan_pipeline(cfg, p.model_args.n_layers) if dims.pp_enabled else None
        if plan is not None:
            # Pipeline split first; each stage gets the same parallelize() as a whole model.
            self.pipeline = pipeline_split(
                model,
                dims.get_mesh("pp"),
                plan,
                cfg,
                device,
                lambda part: parallelize(part, dims, cfg, device),
                self._scaled_loss,
            )
            self.model_parts: list[nn.Module] = self.pipeline.model_parts
        else:
            self.model_parts = [parallelize(model, dims, cfg, device)]
        del model
        for part in self.model_parts:
            init_weights_mesh_independent(part, seed, device)
            part.train()
        heads = [m for part in self.model_parts if isinstance(m := part.output, nn.Linear)]
        if cfg.training.loss_chunk_tokens > 0 and heads:
            # parallelize() deferred the output projection to this loss (the last stage's).
            self.loss_fn = ChunkedCrossEntropy(
                heads[0],
                cfg.training.loss_chunk_tokens,
                loss_parallel=not cfg.parallelism.disable_loss_parallel,
            )
        self.amp = self._amp_context()

        self.optimizers = build_optimizers(self.model_parts, cfg.optimizer, dims)
        self.lr_schedulers = build_lr_schedulers(
            self.optimizers, cfg.lr_scheduler, cfg.training.steps
        )
        # The run's schedule (one across stages); a stage's warmup wraps it (_apply_recipe_lr).
        self._run_lr_lambdas = [list(sched.lr_lambdas) for sched in self.lr_schedulers.schedulers]
        self._switched_in_memory = False
        self._boundary_stats: dict[str, Any] = {}
        # Whether train() checkpoints its last step (a curriculum may skip a stage's end).
        self.save_at_end = True

        # Data: the same global batch at every step whatever the mesh.
        t = cfg.training
        self.dataloader = self._build_dataloader(p, stage)
        self.val_windows = self._build_val_windows(p)
        # Non-finite guard (train()): skipped steps in total and in a row.
        self.skipped_steps = 0
        self.nonfinite_streak: list[int] = []
        self.train_state = TrainState()
        self.checkpointer = Checkpointer(
            cfg,
            {
                "model": ModelWrapper(self.model_parts),
                "optimizer": self.optimizers,
                "lr_scheduler": self.lr_schedulers,
                "dataloader": self.dataloader,
                "train_state": self.train_state,
            },
            rank=self.rank,
        )
        self.metrics = MetricsLogger(
            dump_folder=cfg.job.dump_folder,
            enabled=self.rank == 0,
            enable_tensorboard=cfg.metrics.enable_tensorboard,
            tb_folder=cfg.metrics.save_tb_folder,
            flops_per_token=self.flops_per_token,
            peak_flops=device_peak_flops(device),
            total_steps=t.steps,
            stage_last_step=stage.last_step if stage else None,
            stage_label=stage_name(stage.index, n_stages) if stage else "",
            # Colors only on a terminal: piped logs stay free of escape codes.
            color=not cfg.metrics.disable_color_printing and sys.stdout.isatty(),
        )
        logger.info(
            f"global batch {self.dataloader.global_batch_size} x {t.seq_len} tokens "
            f"(local batch {t.local_batch_size}, {self.dataloader.grad_accum_steps} "
            f"microbatch(es) per step, dp {dims.dp})"
        )
        batch_note = derived_batch_note(cfg, dims)
        if batch_note is not None:
            self._warn(batch_note)
        if self.val_windows is not None:
            v = cfg.validation
            wanted = v.steps * self.dataloader.global_batch_size
            if self.validation_windows() < wanted:
                self._warn(
                    f"validation: the split has {self.val_windows.num_windows} windows of "
                    f"{v.seq_len + 1} tokens, fewer than validation.steps {v.steps} x global "
                    f"batch {self.dataloader.global_batch_size} = {wanted}; validating all of them"
                )
        if plan is not None:
            logger.info(
                f"pipeline: {plan.schedule}, {plan.num_stages} stages ({plan.stages_per_rank} "
                f"per rank), {plan.n_microbatches} pipeline microbatches of "
                f"{cfg.parallelism.pipeline_parallel_microbatch_size}; stages: "
                f"{plan.module_fqns}"
            )

    def _amp_context(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision outside FSDP, as TorchTitan 0.2.2's ``maybe_enable_amp``: with
        FSDP/HSDP its MixedPrecisionPolicy casts (nothing here); on one CUDA device, autocast to
        ``mixed_precision_param``; with TP or PP but no FSDP, none (TorchTitan supports mixed
        precision there only through FSDP; autocast would also wrap the pipeline's backward),
        with a warning; nothing on CPU, where training is fp32."""
        sharded = self.dims.fsdp_enabled or self.dims.dp_replicate_enabled
        dtype = TORCH_DTYPE_MAP[self.cfg.training.mixed_precision_param]
        if self.device.type != "cuda" or sharded or dtype == torch.float32:
            return contextlib.nullcontext()
        if self.dims.tp_enabled or self.dims.pp_enabled:
            logger.warning(
                "mixed precision with TP or PP needs FSDP (dp_shard x cp > 1), as in TorchTitan: "
                "this run computes in training.dtype"
            )
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dtype)

    def train_step(
        self, microbatches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One optimizer step over this rank's microbatches.

        The loss of each microbatch is its summed cross-entropy divided by the number of label
        tokens in the whole global batch (all microbatches, all dp ranks), so that summing the
        gradients over microbatches and over dp ranks (FSDP reduce-scatter with divide factor 1)
        gives exactly the gradient of the global mean loss, whatever the mesh
        (TorchTitan 0.2.2 ``Trainer.train_step``).

        A step whose global gradient norm is not finite does not update the parameters or
        the optimizer state (``train`` counts and limits such steps).

        Returns:
            (this rank's loss contribution: local loss sum / global tokens, fp32 scalar;
             total gradient norm before clipping, fp32 scalar; whether the optimizer
             stepped).
        """
        self.optimizers.zero_grad()
        local_tokens = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in microbatches)
        global_tokens = torch.tensor(float(local_tokens), device=self.device)
        if self.dims.dp_enabled:
            dist.all_reduce(global_tokens, group=self.dims.get_mesh("batch").get_group())
        self._loss_scale = 1.0 / global_tokens
        loss_acc = torch.zeros((), device=self.device)
        for inputs, labels in microbatches:
            inputs, labels, positions = self._shard_sequence(inputs, labels)
            if self.pipeline is not None:
                # The schedule runs forward and backward of its pipeline microbatches; the
                # last stage's losses (already scaled) come back in the list.
                loss_acc += self._pipeline_step(inputs, labels, positions, train=True)
                continue
            with self._loss_parallel():
                with self.amp:
                    pred = self.model_parts[0](inputs, positions=positions)
                    loss = self._scaled_loss(pred, labels)
                del pred
                loss.backward()
            loss_acc += loss.detach()
        grad_norm = clip_grad_norm_(
            [p for m in self.model_parts for p in m.parameters()],
            self.cfg.training.max_norm,
            foreach=True,
            # Each pp rank holds different parameters: the norm sums over stages too.
            pp_mesh=self.dims.get_mesh("pp") if self.dims.pp_enabled else None,
        )
        # Non-finite guard: the norm is global (reduced over every rank's gradients), so all
        # ranks take the same decision; a non-finite loss on any rank makes it non-finite.
        # One host sync per step.
        updated = bool(torch.isfinite(grad_norm).item())
        if updated:
            self.optimizers.step()
        # The LR schedule advances either way: step k always trains at the LR of step k.
        self.lr_schedulers.step()
        return loss_acc, grad_norm, updated

    def _scaled_loss(self, pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of (B, S, vocab) logits against (B, S) labels, times the current
        ``_loss_scale``: a local fp32 scalar (loss parallel's replicated DTensor unwrapped)."""
        return _local(self.loss_fn(pred, labels)) * self._loss_scale

    def _pipeline_step(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        positions: torch.Tensor | None,
        train: bool,
    ) -> torch.Tensor:
        """One local batch through the pipeline schedule (forward + backward when ``train``,
        forward only otherwise; torch splits it into ``n_microbatches``).

        Returns:
            The sum of this rank's pipeline-microbatch losses (scaled by ``_loss_scale``) on
            the last stage; 0 on the other stages.
        """
        assert self.pipeline is not None
        pl = self.pipeline
        kwargs: dict[str, Any] = {} if positions is None else {"positions": positions}
        losses: list[torch.Tensor] | None = [] if pl.has_last_stage else None
        target = labels if pl.has_last_stage else None
        args = (inputs,) if pl.has_first_stage else ()
        run = pl.schedule.step if train else pl.schedule.eval
        with self._loss_parallel(), self.amp:
            if train:
                run(*args, target=target, losses=losses, return_outputs=False, **kwargs)
            else:
                run(*args, target=target, losses=losses, **kwargs)
        if not losses:
            return torch.zeros((), device=self.device)
        return torch.stack([x.detach() for x in losses]).sum()

    def _loss_parallel(self) -> contextlib.AbstractContextManager[Any]:
        """torch's ``loss_parallel()`` with TP (cross-entropy on vocab-sharded logits) unless
        ``parallelism.disable_loss_parallel``."""
        if self.dims.tp_enabled and not self.cfg.parallelism.disable_loss_parallel:
            return loss_parallel()
        return contextlib.nullcontext()

    def _shard_sequence(
        self, inputs: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Move a microbatch to the device and, with CP, keep this rank's part of the sequence
        (with the RoPE positions of the kept tokens; None without CP)."""
        inputs, labels = inputs.to(self.device), labels.to(self.device)
        if not self.dims.cp_enabled:
            return inputs, labels, None
        return shard_sequence(
            self.dims.get_mesh("cp"),
            inputs,
            labels,
            self.cfg.parallelism.context_parallel_load_balancer,
        )

    def _global_loss(self, local: torch.Tensor) -> float:
        """Sum the ranks' loss contributions over the loss mesh (pp x dp x cp; stages other
        than the last contribute 0): the global mean."""
        if self.dims.loss_parallel_size > 1:
            local = local.clone()
            dist.all_reduce(local, group=self.dims.get_mesh("loss").get_group())
        return float(local.item())

    def _max_peak_memory(self) -> float:
        """Peak memory (MiB, max over ranks) since the previous log, then a new window."""
        mem = torch.tensor(peak_memory_mib(self.device), device=self.device)
        if self.dims.world_size > 1:
            dist.all_reduce(mem, op=dist.ReduceOp.MAX)
        reset_peak_memory(self.device)
        return float(mem.item())

    def validation_windows(self) -> int:
        """Windows per validation (``validation_window_count`` for this run)."""
        assert self.val_windows is not None
        return validation_window_count(
            self.cfg.validation.steps,
            self.dataloader.global_batch_size,
            self.val_windows.num_windows,
        )

    @torch.no_grad()
    def validate(self) -> float:
        """Mean cross-entropy over the first ``validation_windows()`` windows of the validation
        split, the same windows on every mesh: each forward takes ``validation.local_batch_size``
        windows per dp rank; in the last forward, windows past the end are padding whose
        labels are ignored, so every rank runs the same number of forwards."""
        assert self.val_windows is not None
        v = self.cfg.validation
        dp, dp_rank = self.dims.dp, self.dims.dp_rank()
        n_windows = self.validation_windows()
        per_forward = v.local_batch_size * dp
        for part in self.model_parts:
            part.eval()
        self._loss_scale = torch.ones((), device=self.device)  # sums, not means
        computes_loss = self.pipeline is None or self.pipeline.has_last_stage
        sums = torch.zeros(2, device=self.device)  # (loss sum, tokens)
        for b in range(-(-n_windows // per_forward)):
            start = b * per_forward + dp_rank * v.local_batch_size
            inputs, labels = self.val_windows.batch(start, v.local_batch_size)
            n_real = min(max(n_windows - start, 0), v.local_batch_size)
            if n_real < v.local_batch_size:
                labels = labels.clone()  # a view sharing memory with inputs
                labels[n_real:] = IGNORE_INDEX
            inputs, labels, positions = self._shard_sequence(inputs, labels)
            if self.pipeline is not None:
                sums[0] += self._pipeline_step(inputs, labels, positions, train=False)
            else:
                with self._loss_parallel(), self.amp:
                    pred = self.model_parts[0](inputs, positions=positions)
                    sums[0] += self._scaled_loss(pred, labels).float()
            if computes_loss:
                sums[1] += (labels != IGNORE_INDEX).sum()
        for part in self.model_parts:
            part.train()
            # A forward without backward leaves FSDP units built with
            # reshard_after_forward=False (norm + output; every unit with PP) unsharded;
            # reshard so parameters are the optimizer's DTensors again.
            for module in part.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()
        if self.dims.loss_parallel_size > 1:
            dist.all_reduce(sums, group=self.dims.get_mesh("loss").get_group())
        return float(sums[0] / sums[1].clamp(min=1))

    @torch.no_grad()
    def param_fingerprint(self) -> dict[str, tuple[float, float]]:
        """Per parameter (canonical FQN), the (sum, sum of squares) of its full tensor in fp64:
        the same numbers on every mesh that holds the same model (up to fp64 rounding of the
        summation order). Gathers one parameter at a time; collective.

        Returns:
            {fqn: (sum, sum of squares)} for every parameter of the whole model (all stages).
        """
        stats: dict[str, tuple[float, float]] = {}
        for part in self.model_parts:
            for name, param in part.named_parameters():
                full = param.full_tensor() if isinstance(param, DTensor) else param
                full = full.detach().to(torch.float64)
                stats[canonical_name(name)] = (float(full.sum()), float(full.square().sum()))
        if self.dims.pp_enabled:  # each pp rank holds other stages' parameters
            gathered: list[Any] = [None] * self.dims.pp
            dist.all_gather_object(gathered, stats, group=self.dims.get_mesh("pp").get_group())
            stats = {k: v for part_stats in gathered for k, v in part_stats.items()}
        return stats

    def train(
        self, until: int | None = None, switch_started: float | None = None
    ) -> list[dict[str, Any]]:
        """Run until step ``until`` (default ``training.steps``), resuming from the latest
        checkpoint if any; the last step is logged, validated and checkpointed.

        Args:
            until: the last step to run (a curriculum stage's last step).
            switch_started: with a curriculum, ``time.perf_counter()`` when the previous
                stage's last step ended: the stage switch time (boundary checkpoint, new mesh,
                model, optimizer, reload) is logged as ``switch_sec``.

        Returns:
            The metric records of the logged steps (also on non-logging ranks).
        """
        cfg = self.cfg
        end = until if until is not None else cfg.training.steps
        in_memory, self._switched_in_memory = self._switched_in_memory, False
        if not in_memory:
            self.checkpointer.maybe_load()
        start = self.train_state.step
        if self.stage is not None and start < self.stage.first_step - 1:
            raise ResumeEarlierStage(start)
        self._apply_recipe_lr(self.stage)
        self.metrics.start(start)
        if self.stage is not None and start == self.stage.first_step - 1 and start > 0:
            # Entering a stage from the previous one's checkpoint: the state must be the
            # one the previous stage ended with, whatever the mesh change.
            reuse = in_memory and bool(self._boundary_stats)  # the same tensors: same mesh
            self._log_boundary("start", start, switch_started, reuse=reuse)
        # From here a stop signal waits for a step boundary (before, it ends the process).
        STOP.defer()
        self._stop_if_requested(start)
        if start >= end:
            logger.info(f"nothing to do: checkpoint at step {start} >= {end}")
            return []
        logger.info(f"training from step {start + 1} to {end}")
        reset_peak_memory(self.device)  # the first log's peak: this stage's steps, not setup
        gc_handler = GarbageCollection(gc_freq=cfg.training.gc_freq, debug=cfg.training.gc_debug)
        records: list[dict[str, Any]] = []
        tokens_since_log = 0
        extra: dict[str, float | int] = {}
        if self.stage is not None:
            extra = {
                "stage": self.stage.index,
                "cp": self.dims.cp,
                "tokens_per_step": self.stage.tokens_per_step,
            }
        for step in range(start + 1, end + 1):
            gc_handler.run(step)
            lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]
            microbatches = self.dataloader.next_step()
            loss, grad_norm, updated = self.train_step(microbatches)
            if step == start + 1:
                self._set_train_timeout()
            diverged: TrainingDiverged | None = None
            try:
                self._guard_nonfinite(step, updated, float(grad_norm.item()))
            except TrainingDiverged as e:
                diverged = e  # raised once the step that stops the run is recorded
            self.train_state.step = step
            step_tokens = self.dataloader.global_batch_size * cfg.training.seq_len
            self.train_state.tokens_seen += step_tokens
            # Tokens per device (TorchTitan's convention): each sample's tokens are shared by
            # the pp x tp x cp ranks that compute on it.
            tokens_since_log += (
                sum(x.numel() for x, _ in microbatches) // self.dims.non_data_parallel_size
            )
            last = step == end
            # The first step of the run and of every (re)start: a stage's first loss shows.
            if step == start + 1 or step % cfg.metrics.log_freq == 0 or last or diverged:
                records.append(
                    self.metrics.log(
                        step,
                        self._global_loss(loss),
                        float(grad_norm.item()),
                        float(lr),
                        tokens_since_log,
                        cfg.training.seq_len,
                        self._max_peak_memory(),
                        extra={
                            "tokens_seen": int(self.train_state.tokens_seen),
                            "skipped_steps": int(self.skipped_steps),
                            **extra,
                        },
                    )
                )
                tokens_since_log = 0
            if diverged is not None:
                raise diverged
            val_sec = 0.0
            if self.val_windows is not None and (step % cfg.validation.freq == 0 or last):
                t_val = time.perf_counter()
                self.metrics.log_validation(step, self.validate())
                val_sec = time.perf_counter() - t_val
            if last and self.stage is not None and step < cfg.training.steps:
                self.last_step_ended = time.perf_counter() - val_sec
                self._log_boundary("end", step, None)
            if self.checkpointer.should_save(step, last and self.save_at_end):
                if self.nonfinite_streak and not last:
                    # The weights are those before the streak, but possibly what caused it:
                    # do not let keep_latest_k trade an older checkpoint for them.
                    self._warn(f"step {step} was skipped: no checkpoint at this step")
                else:
                    self._check_state_finite(step)
                    self.checkpointer.save(step)
            if step < cfg.training.steps:  # after the run's last step: nothing left to stop
                self._stop_if_requested(step)
        if self.stage is None or end >= cfg.training.steps:
            self.checkpointer.finish()  # else the next stage finishes a background save
        self.metrics.close()
        return records

    def _stop_if_requested(self, step: int) -> None:
        """At a step boundary (``step`` done, or loaded before the loop): when any rank has
        received a stop signal (``STOP.agreed``, one small all-reduce), write this step's
        checkpoint unless it is on disk already, synchronously, and stop. Collective.

        Raises:
            TrainingStopped: on every rank at the same step, with the process's line.
            TrainingDiverged: the state to save is not finite (the checkpoint is refused).
        """
        signum = STOP.agreed()
        if not signum:
            return
        c = self.checkpointer
        c.finish()  # a background save (of this step or an earlier one) is published
        if not c.enabled or c.load_only:
            key = "checkpoint.enable = false" if not c.enabled else "checkpoint.load_only = true"
            what = f"no checkpoint written ({key})"
        elif step == 0:
            what = "nothing trained yet, no checkpoint"
        else:
            # Rank 0's view of the folder decides for all (others may see it later).
            if STOP.rank0_says(self.rank == 0 and step not in complete_steps(c.folder)):
                self._check_state_finite(step)
                c.save(step)
                c.finish()  # async_mode: synchronous all the same
            what = f"checkpoint step-{step}; run the same command to resume"
        self.metrics.close()
        where = f"at step {step}" if step > 0 else "before step 1"
        raise TrainingStopped(signum, step, f"stopped {where}; {what}")

    def _warn(self, message: str) -> None:
        """A warning on rank 0 only, for conclusions every rank reaches alike."""
        if self.rank == 0:
            logger.warning(message)

    def _guard_nonfinite(self, step: int, updated: bool, grad_norm: float) -> None:
        """Count a step skipped by ``train_step`` (non-finite gradient norm) and stop the run
        after more than ``training.max_consecutive_nonfinite_steps`` in a row.

        Raises:
            TrainingDiverged: on every rank at the same step.
        """
        if updated:
            self.nonfinite_streak = []
            self.checkpointer.step_finished(step)  # the checkpoints before it are good
            return
        self.skipped_steps += 1
        self.nonfinite_streak.append(step)
        limit = self.cfg.training.max_consecutive_nonfinite_steps
        self._warn(
            f"step {step}: gradient norm {grad_norm}: optimizer update skipped "
            f"({len(self.nonfinite_streak)} in a row, at most {limit} tolerated)"
        )
        if len(self.nonfinite_streak) > limit:
            self.checkpointer.finish()  # publish a background save, then judge it with the rest
            streak = self.nonfinite_streak
            # The weights of the step before the first non-finite gradient norm gave it.
            newest, moved = self.checkpointer.set_aside_suspect(streak[0])
            aside = f" ({', '.join(moved)}: written before it, set aside)" if moved else ""
            raise TrainingDiverged(
                f"training diverged: non-finite gradient norm at steps {streak[0]}-{streak[-1]} "
                f"({len(streak)} in a row, training.max_consecutive_nonfinite_steps = {limit}); "
                f"newest good checkpoint: {f'step-{newest}' if newest is not None else 'none'}"
                f"{aside}; lower optimizer.lr or raise lr_scheduler.warmup_steps and run "
                "again to resume from it"
            )

    @torch.no_grad()
    def _check_state_finite(self, step: int) -> None:
        """Refuse to checkpoint non-finite weights or optimizer state (collective: every rank
        checks its shards, the flags are reduced).

        Raises:
            TrainingDiverged: some parameter or optimizer state tensor holds inf or NaN.
        """
        tensors: list[torch.Tensor] = []
        for part in self.model_parts:
            tensors += [_local(p.detach()) for p in part.parameters()]
        for opt in self.optimizers.optimizers:
            for state in opt.state.values():
                tensors += [_local(t) for t in state.values() if isinstance(t, torch.Tensor)]
        bad = torch.zeros((), device=self.device)
        finite = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
        if finite:
            bad = (~torch.stack(finite).all()).float()
        if self.dims.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            self.checkpointer.finish()
            raise TrainingDiverged(
                f"non-finite weights or optimizer state at step {step}: checkpoint step-{step} "
                "not written; the newest checkpoint is kept"
            )

    def _set_train_timeout(self) -> None:
        """After the first step (lazy init, compilation and the first collectives are done),
        give every process group ``comm.train_timeout_seconds``, as TorchTitan's trainer does
        (``torchtitan.distributed.utils.set_pg_timeouts``): a rank that stops responding ends
        the job within that time. A barrier first, so no rank runs under the short timeout
        while another is still inside the first step."""
        if not dist.is_initialized() or self.dims.world_size == 1:
            return
        dist.barrier()
        timeout = timedelta(seconds=self.cfg.comm.train_timeout_seconds)
        # Every group of this process: the mesh's, the flattened ones and the default group.
        for group in list(distributed_c10d._world.pg_map):
            if not distributed_c10d._rank_not_in_group(group):
                distributed_c10d._set_pg_timeout(timeout, group)

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
        return GlobalBatchLoader(
            PackedWindows(
                p.train_tokens, t.seq_len, p.cfg.data.shuffle_seed, unit_len=unit_len(p.stages)
            ),
            local_batch_size=t.local_batch_size,
            dp_rank=dims.dp_rank(),
            dp_degree=dims.dp,
            grad_accum_steps=global_batch_size(p.cfg, dims) // (t.local_batch_size * dims.dp),
            continue_at_new_seq_len=stage is not None,
            derived_global_batch=t.global_batch_size == -1,
        )

    def switch_mode(self, p: Prepared) -> str:
        """How the stage prepared in ``p`` continues from this trainer (which has finished its
        stage): ``"same mesh"`` (``switch_stage``: the same degrees and order, no PP, whose
        schedules are built for one sequence length), ``"re-mesh"`` (a new Trainer takes this
        one's state in memory: ``take_state``) or ``"disk"`` (a new Trainer loads the
        boundary checkpoint; ``curriculum.switch_in_memory = false``)."""
        if not p.cfg.curriculum.switch_in_memory or self.stage is None:
            return "disk"
        if self.train_state.step != self.stage.last_step:
            return "disk"
        if self.dims.shape_str() == p.dims.shape_str() and self.pipeline is None:
            return "same mesh"
        return "re-mesh"

    def switch_stage(self, p: Prepared, stage: Stage) -> None:
        """Continue with ``stage`` (prepared in ``p``, the same mesh) from this trainer's
        model, optimizer and LR schedule in memory. Rebuilt: the RoPE buffers (new length,
        theta, scaling), the CP pattern, the data loader (continuing the token stream) and the
        validation windows; the stage's LR and warmup apply in ``train``. The result equals
        loading the boundary checkpoint into a new Trainer (tested)."""
        cfg = p.cfg
        self.cfg, self.stage = cfg, stage
        torch.manual_seed(cfg.debug.seed if cfg.debug.seed is not None else 0)
        scaling = rope_scaling_of(cfg)
        for part in self.model_parts:
            buffer: torch.Tensor = part.get_buffer("freqs_cis")
            object.__setattr__(part, "model_args", p.model_args)
            apply_rope_scaling(part, scaling)
            with torch.no_grad():
                part.register_buffer(
                    "freqs_cis",
                    getattr(part, "_precompute_freqs_cis")().to(buffer.device),  # noqa: B009
                    persistent=False,
                )
        spec = get_train_spec(cfg.model.name)
        meta = build_model_on_meta(spec.model_cls, p.model_args)
        _, self.flops_per_token = p.model_args.get_nparams_and_flops(meta, cfg.training.seq_len)
        if self.dims.cp_enabled:
            cp_patterns.register(
                self.dims.get_mesh("cp"), cp_patterns.recipe_pattern(cfg.parallelism, self.dims.cp)
            )
        position = self.dataloader.state_dict()
        self.dataloader = self._build_dataloader(p, stage)
        self.dataloader.load_state_dict(position)
        self.checkpointer.states["dataloader"] = self.dataloader
        self.val_windows = self._build_val_windows(p)
        self.metrics.flops_per_token = self.flops_per_token
        self.metrics.stage_last_step = stage.last_step
        self.metrics.stage_label = stage_name(stage.index, self.n_stages)
        self._switched_in_memory = True
        logger.info(f"stage {stage.index}: switched in memory (same mesh)")

    def take_state(self, old: "Trainer") -> None:
        """Continue from ``old``'s model, optimizer, LR schedule, data position and step (the
        previous stage's trainer, which may be on another mesh) in memory instead of through
        its boundary checkpoint: DCP's resharding done in memory (``checkpoint.transfer_state``;
        tested equal to the disk round trip). Both trainers' model and optimizer are alive
        during the transfer (the shards whose layout is unchanged are shared). Collective.
        """
        started = time.perf_counter()
        transfer_state(self.checkpointer.states, old.checkpointer.states)
        self._switched_in_memory = True
        logger.info(
            f"stage {self.stage.index if self.stage else 0}: re-meshed in memory "
            f"({old.dims.shape_str()} -> {self.dims.shape_str()}, state moved in "
            f"{time.perf_counter() - started:.2f} s)"
        )

    def _apply_recipe_lr(self, stage: Stage | None) -> None:
        """Give the LR schedule the recipe's peak LR (``optimizer.lr``, or the stage's ``lr``)
        and the stage's warmup (``warmup_steps``), after loading a checkpoint: the checkpoint
        restores the base LR it was saved with, so without this a resumed run ignores a new
        ``--optimizer.lr`` (e.g. a lower LR after a divergence) and a stage keeps the previous
        stage's LR. Deterministic in the step, so resuming with the same recipe gives the same
        LRs."""
        peak = stage.lr if stage is not None and stage.lr is not None else self.cfg.optimizer.lr
        saved = self.lr_schedulers.schedulers[0].base_lrs[0]
        if stage is None and saved != peak and self.train_state.step > 0:
            self._warn(f"peak LR {peak:g} (optimizer.lr) replaces the checkpoint's {saved:g}")
        for sched, run_lambdas in zip(
            self.lr_schedulers.schedulers, self._run_lr_lambdas, strict=True
        ):
            sched.base_lrs = [peak for _ in sched.base_lrs]
            sched.lr_lambdas = list(run_lambdas)
            if stage is not None and stage.warmup_steps > 0:
                sched.lr_lambdas = [
                    (lambda e, f=f: f(e) * stage_lr_factor(stage, e)) for f in run_lambdas
                ]
            groups = sched.optimizer.param_groups
            for group, base, fn in zip(groups, sched.base_lrs, sched.lr_lambdas, strict=True):
                group["initial_lr"] = base
                group["lr"] = base * fn(sched.last_epoch)
            sched._last_lr = [float(g["lr"]) for g in groups]

    def _log_boundary(
        self,
        event: Literal["start", "end"],
        step: int,
        switch_started: float | None,
        reuse: bool = False,
    ) -> None:
        """A stage boundary record with the parameters' fingerprint (``param_fingerprint``: a
        gather of every parameter). ``reuse``: the last boundary's (an in-memory switch keeps
        the very same tensors, so a second gather could only repeat it)."""
        stats = self._boundary_stats if reuse else self.param_fingerprint()
        self._boundary_stats = stats
        switch_sec = None if switch_started is None else time.perf_counter() - switch_started
        stage = self.stage.index if self.stage else 0
        self.metrics.log_boundary(step, event, stage, stats, switch_sec)


def run(p: Prepared) -> None:
    """Train the recipe: one Trainer, or with a curriculum one per stage from the stage of the
    latest checkpoint on. At each boundary the last stage's final step is checkpointed, and the
    next stage builds its mesh (its CP degree may differ), model (RoPE theta and length),
    optimizer and data loader anew and loads that checkpoint through DCP, which reshards it
    to the new mesh. Collective.
    """
    if not p.stages:
        Trainer(p).train()
        return
    logger.info(
        "curriculum (its stages set seq_len, steps and batch: the recipe's training.seq_len, "
        "training.steps, batch sizes and validation seq_len and batch are not used):\n"
        + format_plan(p.stages)
    )
    ckpt = p.cfg.checkpoint
    folder = os.path.join(p.cfg.job.dump_folder, ckpt.folder)
    # Rank 0's listing on every rank: a stale view elsewhere must not pick another stage.
    done = agreed_steps(folder)[0] if ckpt.load_step == -1 else [ckpt.load_step]
    first = stage_of_step(p.stages, done[-1] if done else 0)
    while True:
        try:
            _run_stages(p, p.stages[first.index :])
            return
        except ResumeEarlierStage as e:
            # The newer checkpoints failed to load and were set aside (Checkpointer): go on
            # from the stage of the one that loaded.
            first = stage_of_step(p.stages, e.step)
            logger.warning(f"resuming from step {e.step}: stage {first.index} again")
        gc.collect()  # the abandoned stage's trainer


def _run_stages(p: Prepared, stages: list[Stage]) -> None:
    """Train ``stages`` in order, one Trainer each (see ``run``). Collective.

    Raises:
        ResumeEarlierStage: the first stage's trainer loaded a checkpoint of an earlier stage.
    """
    switch_started: float | None = None
    trainer: Trainer | None = None
    for i, stage in enumerate(stages):
        logger.info(
            f"stage {stage_name(stage.index, len(p.stages))}: steps {stage.first_step}-"
            f"{stage.last_step}, seq_len {stage.seq_len}, cp {stage.cp}, dp_shard "
            f"{stage.dp_shard}, global batch {stage.global_batch_size}, rope_theta "
            f"{stage.rope_theta or 'flavor default'}, rope scaling {rope_label(stage.rope)}"
        )
        prepared = prepare_stage(p, stage, handed_over=i > 0)
        mode = trainer.switch_mode(prepared) if trainer is not None else "disk"
        if trainer is not None and mode == "same mesh":
            trainer.switch_stage(prepared, stage)
        elif trainer is not None and mode == "re-mesh":
            old, trainer = trainer, Trainer(prepared, stage, len(p.stages))
            trainer.take_state(old)
            # A boundary checkpoint still being written finishes in this stage.
            trainer.checkpointer.pending, old.checkpointer.pending = old.checkpointer.pending, None
            del old
            gc.collect()  # the last stage's model and optimizer
        else:
            if trainer is not None:
                trainer.checkpointer.finish()  # the next stage loads it
            trainer = None
            gc.collect()  # free the last stage's model and optimizer before the next is built
            trainer = Trainer(prepared, stage, len(p.stages))
        c = prepared.cfg.curriculum
        # The next stage starts from memory unless this stage's end is on disk: skip that
        # checkpoint only when asked to (a crash then resumes from the last interval one).
        trainer.save_at_end = (
            stage.index == len(p.stages) - 1 or c.boundary_checkpoint or not c.switch_in_memory
        )
        trainer.train(until=stage.last_step, switch_started=switch_started)
        switch_started = trainer.last_step_ended


def _ac_label(cfg: Any) -> str:
    """The activation checkpointing in use, said outright: TorchTitan's default (no
    ``[activation_checkpoint]`` section) is selective AC, which surprises users who left the
    section out."""
    ac = cfg.activation_checkpoint
    if ac.mode == "selective":
        option = str(ac.selective_ac_option)
        which = "per op" if option == "op" else f"every {option} blocks"
        return f'selective ({which}; [activation_checkpoint] mode = "none" turns it off)'
    return str(ac.mode)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (loss parallel's loss) as its local tensor; autograd flows through."""
    return t.to_local() if isinstance(t, DTensor) else t


def _report_error(rank: int | None, kind: str, message: str) -> None:
    """One line on stderr, written with a single write() so that ranks sharing the launcher's
    pipe cannot interleave their lines."""
    prefix = f"[rank{rank}] " if rank is not None else ""
    line = f"{prefix}{kind}: {message}"
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    # Under torchrun the launcher ends with its own failure summary (after ~60 lines of its
    # traceback); with the line in the worker's error file that summary shows it last, where
    # a user looks, instead of "To enable traceback see ...".
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and not os.path.exists(error_file):
        with contextlib.suppress(OSError), open(error_file, "w") as f:
            # torch.distributed.elastic's own format (error_handler.record_exception), without
            # a traceback: the summary then prints the message itself.
            record = {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}
            json.dump({"message": record}, f)


def _report_config_error(rank: int | None, err: ConfigError) -> None:
    _report_error(rank, "config error", str(err))


_COMM_FAILURE_MARKERS = ("Timed out", "Connection closed by peer", "Connection reset by peer")


def _is_comm_failure(err: BaseException) -> bool:
    """Whether an exception is a failed collective: torch's ``DistError`` family, or the
    ``RuntimeError`` gloo raises when a peer times out or disconnects."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return "gloo" in text and any(m in text for m in _COMM_FAILURE_MARKERS)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else type(err).__name__


def setup_logging(rank: int) -> None:
    """INFO on rank 0, WARNING elsewhere (TorchTitan logs through the root logger too)."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )


def lock_outputs(cfg: Any, rank: int) -> list[FolderLock]:
    """Take the lock of ``job.dump_folder`` (and of ``checkpoint.folder`` when it lies
    outside it) on rank 0 (``run_lock``), before anything of the run touches them, and share
    the verdict with every rank (one broadcast). Collective. The locks hold until the process
    ends (the kernel releases them however it ends).

    Returns:
        Rank 0's locks (keep them alive); [] on the other ranks.

    Raises:
        ConfigError: on every rank, when another job holds a lock (the message names the folder
            and the holder) or the lock file cannot be created.
    """
    dump = os.path.abspath(cfg.job.dump_folder)
    folders = [("job.dump_folder", dump)]
    ckpt = os.path.abspath(os.path.join(dump, cfg.checkpoint.folder))
    if cfg.checkpoint.enable and os.path.commonpath([dump, ckpt]) != dump:
        folders.append(("checkpoint.folder", ckpt))
    locks: list[FolderLock] = []
    verdict: tuple[str, str, str] | None = None
    if rank == 0:
        for key, folder in folders:
            try:
                locks.append(acquire(folder))
            except FolderInUse as e:
                verdict = (key, folder, f"in use by another job ({e.holder}); wait for it to "
                           "end, or give this run a folder of its own")  # fmt: skip
            except LocksUnsupported as e:
                logger.warning(
                    f"{key} = {folder}: the file system does not support locks ({e.reason}): "
                    "a second job on this folder would not be refused"
                )
            except OSError as e:
                verdict = (key, folder, f"cannot create its lock file: {e.strerror or e}")
            if verdict is not None:
                break
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared: list[Any] = [verdict]
        dist.broadcast_object_list(shared, src=0)
        verdict = shared[0]
    if verdict is not None:
        for lock in locks:
            lock.release()
        raise ConfigError(*verdict)
    return locks


def _newest_checkpoint(cfg: Any) -> str:
    """The newest complete checkpoint of the run as ``step-N`` (or "none"), for lines."""
    if not cfg.checkpoint.enable:
        return "none (checkpoint.enable = false)"
    done = complete_steps(os.path.join(cfg.job.dump_folder, cfg.checkpoint.folder))
    return f"step-{done[-1]}" if done else "none"


def _grace_expired(rank: int, cfg: Any) -> Callable[[str], None]:
    """The line of a process whose stop outlasts ``checkpoint.stop_grace_seconds``."""
    grace = cfg.checkpoint.stop_grace_seconds

    def report(signal_name: str) -> None:
        _report_error(
            rank,
            "error",
            f"{signal_name} received {grace:g} s ago and the step or its checkpoint is not "
            f"done (checkpoint.stop_grace_seconds = {grace:g}); exiting; newest complete "
            f"checkpoint: {_newest_checkpoint(cfg)}",
        )

    return report


def main(args: list[str], mesh_planner: MeshPlanner | None = None) -> int:
    """``train.py``'s entry point; returns the exit status (2 on a bad recipe,
    ``preemption.STOPPED_EXIT_CODE`` after a stop signal). ``mesh_planner``: see ``prepare``."""
    code = _main(args, mesh_planner)
    STOP.finished(code)  # a grace-period watchdog firing while the process exits keeps it
    return code


def _main(args: list[str], mesh_planner: MeshPlanner | None) -> int:
    try:
        rank = RankInfo.from_env()
    except ConfigError as e:
        _report_config_error(None, e)
        return 2
    setup_logging(rank.rank)
    try:
        prepared = prepare(args, rank, mesh_planner)
    except ConfigError as e:
        # Same message on every rank, before any collective: no hang, no traceback.
        _report_config_error(rank.rank, e)
        return 2
    cfg = prepared.cfg  # PYTORCH_CUDA_ALLOC_CONF: set by prepare, before CUDA could start
    if cfg.job.print_config and rank.rank == 0:
        print(format_toml(cfg))
    if cfg.checkpoint.stop_grace_seconds > 0:
        STOP.install(
            cfg.checkpoint.stop_grace_seconds,
            rank.rank,
            lambda signal_name: _report_stop_at_start(rank.rank, signal_name, cfg),
            _grace_expired(rank.rank, cfg),
        )
    locks: list[FolderLock] = []
    try:
        init_distributed(prepared.backend, prepared.device, cfg.comm.init_timeout_seconds)
        STOP.connect()
        locks = lock_outputs(cfg, rank.rank)  # before anything touches the folder
        t0 = time.perf_counter()
        run(prepared)
        out = os.path.abspath(cfg.job.dump_folder)
        logger.info(f"training done in {time.perf_counter() - t0:.1f}s; outputs in {out}")
    except TrainingStopped as e:
        _report_error(rank.rank, signal.Signals(e.signum).name, str(e))
        return STOPPED_EXIT_CODE
    except ConfigError as e:
        _report_config_error(rank.rank, e)
        return 2
    except (TrainingDiverged, CheckpointError) as e:
        _report_error(rank.rank, "error", str(e))
        return 1
    except (dist.DistError, RuntimeError) as e:
        if not _is_comm_failure(e):
            raise
        # A peer that stopped responding (comm.train_timeout_seconds after the first step,
        # comm.init_timeout_seconds before) or died: the surviving ranks' one line each.
        _report_error(
            rank.rank,
            "error",
            f"a collective failed ({type(e).__name__}: {_first_line(e)}): a rank stopped "
            f"responding for comm.train_timeout_seconds = {cfg.comm.train_timeout_seconds} "
            "or exited; the newest complete checkpoint is kept",
        )
        return 1
    finally:
        for lock in locks:
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _report_stop_at_start(rank: int, signal_name: str, cfg: Any) -> None:
    """The line of a process stopped by a signal before its training loop (nothing to save)."""
    _report_error(
        rank,
        signal_name,
        f"stopped before training started; newest checkpoint: {_newest_checkpoint(cfg)}; run "
        "the same command to resume",
    )
