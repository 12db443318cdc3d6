"""Curriculum stage switches of one trainer: how the next stage continues from it (same mesh in
memory, re-mesh in memory, or through the boundary checkpoint), the switches themselves, the
recipe's LR and warmup applied to the run's schedule, and the boundary records.
"""

import logging
import time
from typing import Literal

import torch
from torchtitan.protocols.train_spec import get_train_spec

from torchtitan_ext.checkpoint import transfer_state
from torchtitan_ext.curriculum import Stage, stage_lr_factor, stage_name
from torchtitan_ext.models import build_model_on_meta
from torchtitan_ext.parallel import cp_patterns
from torchtitan_ext.parallel.cp_block_causal import apply_block_causal, needs_block_causal
from torchtitan_ext.rope import apply_rope_scaling, rope_scaling_of
from torchtitan_ext.trainer.base import TrainerBase
from torchtitan_ext.trainer.setup import Prepared

logger = logging.getLogger("torchtitan_ext")


class SwitchMixin(TrainerBase):
    """Stage switches, the recipe's LR and boundary records (``Trainer`` inherits them)."""

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
        self._set_attention_masks(p)
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
        pattern = cp_patterns.recipe_pattern(cfg.parallelism, self.dims.cp)
        cp_mesh = self.dims.get_mesh("cp") if self.dims.cp_enabled else None
        if cp_mesh is not None:
            cp_patterns.register(cp_mesh, pattern)
        if needs_block_causal(cfg, p.model_args):
            for part in self.model_parts:
                apply_block_causal(part, cp_mesh, pattern)  # the stage's pattern
        position = self.dataloader.state_dict()
        self.dataloader = self._build_dataloader(p, stage)
        self.dataloader.load_state_dict(position)
        self.checkpointer.states["dataloader"] = self.dataloader
        self.checkpointer.update_model(cfg, p.model_args)
        self.val_windows = self._build_val_windows(p)
        self.metrics.flops_per_token = self.flops_per_token
        self.metrics.stage_last_step = stage.last_step
        self.metrics.stage_label = stage_name(stage.index, self.n_stages)
        self._switched_in_memory = True
        logger.info(f"stage {stage.index}: switched in memory (same mesh)")

    def take_state(self, old: TrainerBase) -> None:
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
