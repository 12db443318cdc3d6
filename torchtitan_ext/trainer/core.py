"""The ``Trainer``: its construction (mesh, model, optimizer, data loader, checkpointer) and the
training loop (``Trainer.train -> train_step``); the step, validation, guards and stage
switches it calls are its mixins (``step``, ``validation``, ``guards``, ``switch``).
"""

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchtitan.components.checkpoint import ModelWrapper
from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.protocols.train_spec import get_train_spec
from torchtitan.tools.utils import GarbageCollection, set_default_dtype

from torchtitan_ext.checkpoint import Checkpointer, TrainState
from torchtitan_ext.converters import build_converters
from torchtitan_ext.curriculum import Stage, stage_name
from torchtitan_ext.long_context.chunked_loss import ChunkedCrossEntropy
from torchtitan_ext.metrics import (
    MetricsLogger,
    StepMemory,
    device_peak_flops,
    release_freed_memory,
)
from torchtitan_ext.models import build_model_on_meta, init_weights_mesh_independent
from torchtitan_ext.parallel import cp_patterns
from torchtitan_ext.parallel.pipeline import Pipeline, pipeline_split, plan_pipeline
from torchtitan_ext.parallel_dims import ParallelDims
from torchtitan_ext.parallelize import parallelize
from torchtitan_ext.preemption import STOP
from torchtitan_ext.profiling import profile_steps
from torchtitan_ext.rope import apply_rope_scaling, rope_scaling_of
from torchtitan_ext.trainer.base import ResumeEarlierStage, TrainingDiverged
from torchtitan_ext.trainer.guards import GuardMixin
from torchtitan_ext.trainer.setup import Prepared
from torchtitan_ext.trainer.switch import SwitchMixin
from torchtitan_ext.trainer.validation import ValidationMixin
from torchtitan_ext.validate import derived_batch_note

logger = logging.getLogger("torchtitan_ext")


class Trainer(ValidationMixin, GuardMixin, SwitchMixin):
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
        self._set_attention_masks(p)
        seed = cfg.debug.seed if cfg.debug.seed is not None else 0
        torch.manual_seed(seed)
        if cfg.debug.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=cfg.debug.deterministic_warn_only)

        # Model: meta -> parallelize -> materialize and initialize (mesh-independent).
        spec = get_train_spec(cfg.model.name)
        with set_default_dtype(TORCH_DTYPE_MAP[cfg.training.dtype]):
            model = build_model_on_meta(spec.model_cls, p.model_args)
        apply_rope_scaling(model, rope_scaling_of(cfg))  # freqs_cis, filled by init_weights
        # Model converters (float8) on the whole meta model, before any parallelism
        # (TorchTitan's order); None without model.converters.
        converters = build_converters(cfg, dims)
        if converters is not None:
            converters.convert(model)
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
        released = device.type == "cpu" and release_freed_memory()
        logger.info(f"memory features: {memory_features(cfg, dims, device, released)}")
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
        # With FSDP's CPU offload the sharded parameters live in host memory (FSDP2 requires
        # them materialized there); the RoPE buffer stays on the device (TorchTitan's rule).
        init_device = torch.device("cpu") if cfg.training.enable_cpu_offload else device
        for part in self.model_parts:
            init_weights_mesh_independent(part, seed, init_device, buffer_device=device)
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
        if converters is not None:
            # E.g. float8's scales for FSDP's float8 all-gather, after each update.
            parts = self.model_parts
            self.optimizers.register_step_post_hook(
                lambda *args, **kwargs: converters.post_optimizer_hook(parts)
            )
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
            model_args=p.model_args,
        )
        self.memory = StepMemory(device)
        self._pattern_calls_logged = 0  # cp_patterns.calls of the stage's pattern at the last log
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
            wandb_config=cfg if cfg.metrics.enable_wandb else None,
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
        self.memory.start()  # the first log's peak: this stage's steps, not setup
        gc_handler = GarbageCollection(gc_freq=cfg.training.gc_freq, debug=cfg.training.gc_debug)
        records: list[dict[str, Any]] = []
        tokens_since_log = 0
        self._pattern_calls_logged = self._pattern_calls()
        extra: dict[str, float | int] = {}
        if self.stage is not None:
            extra = {
                "stage": self.stage.index,
                "cp": self.dims.cp,
                "tp": self.dims.tp,
                "tokens_per_step": self.stage.tokens_per_step,
            }
        # Traces and memory snapshots ([profiling]) of the steps below, TorchTitan's files.
        with profile_steps(cfg, self.device, self.rank, start) as profilers:
            for step in range(start + 1, end + 1):
                gc_handler.run(step)
                lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]
                microbatches = self.dataloader.next_step()
                # The step's memory is measured from what the rank holds without gradients
                # (the step frees them first too): parameters and optimizer state.
                self.optimizers.zero_grad()
                self.memory.step_begins()
                loss, grad_norm, updated = self.train_step(microbatches)
                self.memory.step_ends()
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
                    peak_mib, step_mib = self._memory_window()
                    step_mem = {} if step_mib is None else {"step_mem_mib": step_mib}
                    if self.stage is not None:
                        extra["cp_pattern_calls"] = self._pattern_calls_since_log()
                    records.append(
                        self.metrics.log(
                            step,
                            self._global_loss(loss),
                            float(grad_norm.item()),
                            float(lr),
                            tokens_since_log,
                            cfg.training.seq_len,
                            peak_mib,
                            extra={
                                **step_mem,
                                "tokens_seen": int(self.train_state.tokens_seen),
                                "skipped_steps": int(self.skipped_steps),
                                **self._attn_work_record(),
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
                profilers.step()  # a trace / memory snapshot when this step is due
                if step < cfg.training.steps:  # after the run's last step: nothing left to stop
                    self._stop_if_requested(step)
        if self.stage is None or end >= cfg.training.steps:
            self.checkpointer.finish()  # else the next stage finishes a background save
        self.metrics.close()
        return records

    def _pattern_calls(self) -> int:
        """Attention calls (forward and backward) this rank ran through the stage's CP pattern
        (``cp_patterns.calls``), causal or block-causal (``cp_block_causal`` counts
        "block_causal_<pattern>", the ring's too): 0 for torch's causal ring and without CP,
        and 0 for a pattern that fell back to torch's ring (its group unregistered)."""
        name = self.cfg.parallelism.context_parallel_pattern
        names = (name, f"block_causal_{name}") if self.dims.cp_enabled else (name,)
        return sum(cp_patterns.calls[n] + cp_patterns.calls[n + "_backward"] for n in names)

    def _pattern_calls_since_log(self) -> int:
        """``_pattern_calls`` since the previous log."""
        total = self._pattern_calls()
        since, self._pattern_calls_logged = total - self._pattern_calls_logged, total
        return since

    def _memory_window(self) -> tuple[float, float | None]:
        """``StepMemory.window()``'s two figures (MiB), each the max over ranks (None: the
        step figure could not be measured on some rank). Collective."""
        peak, step = self.memory.window()
        mem = torch.tensor([peak, -1.0 if step is None else step], device=self.device)
        low = torch.tensor([-1.0 if step is None else step], device=self.device)
        if self.dims.world_size > 1:
            dist.all_reduce(mem, op=dist.ReduceOp.MAX)
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
        return float(mem[0]), (None if float(low[0]) < 0 else float(mem[1]))


def memory_features(
    cfg: Any, dims: ParallelDims, device: torch.device, released: bool = False
) -> str:
    """The settings that change what a step holds, in one line for the start of the log (what
    a user compares runs by): activation checkpointing and its offload, the chunked loss, the
    tiled MLP, context parallel and its pattern, FSDP, and the allocator: on CUDA its settings,
    on CPU whether freed memory goes back to the kernel at once (``released``:
    ``metrics.release_freed_memory`` applied)."""
    t, ac = cfg.training, cfg.activation_checkpoint
    offload = " + block inputs offloaded to CPU" if ac.enable_cpu_offload else ""
    parts = [
        f"activation checkpointing {ac.mode}{offload}",
        f"chunked loss {t.loss_chunk_tokens} tokens" if t.loss_chunk_tokens else "chunked loss off",
        f"tiled MLP {t.mlp_tile_tokens} tokens" if t.mlp_tile_tokens else "tiled MLP off",
    ]
    if dims.cp > 1:
        pattern = cp_patterns.recipe_pattern(cfg.parallelism, dims.cp)
        parts.append(f"context parallel {pattern}")
    else:
        parts.append("context parallel off")
    parts.append(f"FSDP over {dims.dp_shard * dims.cp} ranks" if dims.fsdp_enabled else "no FSDP")
    if device.type == "cuda":
        parts.append(f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')}")
    elif released:
        parts.append("freed CPU memory returned at once (glibc mallopt)")
    return ", ".join(parts)


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
