"""What stops a run at a step boundary, on every rank at the same step: a stop signal
(``preemption``: checkpoint, then ``TrainingStopped``), non-finite gradient norms in a row and
non-finite state at a save (``TrainingDiverged``), and the training timeout of the process
groups after the first step.
"""

from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from torchtitan_ext.checkpoint import complete_steps
from torchtitan_ext.preemption import STOP
from torchtitan_ext.trainer.base import TrainerBase, TrainingDiverged, TrainingStopped, _local


class GuardMixin(TrainerBase):
    """Stop signals, the non-finite guard and the training timeout (``Trainer`` inherits
    them)."""

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
