"""Validation: how many windows of the validation split a validation takes, the same on every
mesh (``validation_window_count``), and the validation loss over them (``validate``).
"""

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torchtitan.components.loss import IGNORE_INDEX

from torchtitan_ext.trainer.step import StepMixin


def validation_window_count(steps: int, global_batch: int, available: int) -> int:
    """Validation windows per validation: ``validation.steps`` x the global batch (in
    sequences), at most the ``available`` windows of the split; ``steps = -1``: all of them.
    The same on every mesh whenever the global batch is (TorchTitan counts ``steps`` per dp
    rank instead, so its validation loss depends on the data-parallel degree)."""
    return available if steps == -1 else min(available, steps * global_batch)


class ValidationMixin(StepMixin):
    """The validation loss (``Trainer`` inherits it); forwards through the step's pieces."""

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
            inputs, labels, extra = self._shard_sequence(inputs, labels, training=False)
            if self.pipeline is not None:
                sums[0] += self._pipeline_step(inputs, labels, extra, train=False)
            else:
                with self._loss_parallel(), self.amp:
                    pred = self.model_parts[0](inputs, **extra)
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
