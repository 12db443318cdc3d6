"""The training step: one optimizer step over a rank's microbatches (``train_step``), with the
pieces it is made of (mixed precision, the scaled loss, the pipeline schedule, loss parallel,
the sequence shard of context parallelism) and the global loss and peak memory it reports.
"""

import contextlib
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed.utils import clip_grad_norm_

from torchtitan_ext.parallel.context_parallel import shard_sequence
from torchtitan_ext.parallel.cp_documents import shard_documents, work_per_rank
from torchtitan_ext.trainer.base import TrainerBase, _local

logger = logging.getLogger("torchtitan_ext")


class StepMixin(TrainerBase):
    """The training step and its pieces (``Trainer`` inherits them)."""

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
            inputs, labels, extra = self._shard_sequence(inputs, labels)
            if self.pipeline is not None:
                # The schedule runs forward and backward of its pipeline microbatches; the
                # last stage's losses (already scaled) come back in the list.
                loss_acc += self._pipeline_step(inputs, labels, extra, train=True)
                continue
            with self._loss_parallel():
                with self.amp:
                    pred = self.model_parts[0](inputs, **extra)
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
        extra: dict[str, Any],
        train: bool,
    ) -> torch.Tensor:
        """One local batch through the pipeline schedule (forward + backward when ``train``,
        forward only otherwise; torch splits it, and the model's other inputs ``extra``
        (``_shard_sequence``), into ``n_microbatches``).

        Returns:
            The sum of this rank's pipeline-microbatch losses (scaled by ``_loss_scale``) on
            the last stage; 0 on the other stages.
        """
        assert self.pipeline is not None
        pl = self.pipeline
        kwargs = extra
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
        self, inputs: torch.Tensor, labels: torch.Tensor, training: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Move a microbatch to the device and, with CP, keep this rank's part of the sequence.

        Returns:
            (inputs, labels, the model's other inputs: ``positions``, the RoPE positions of
            the kept tokens, with CP or block_causal; ``attention_masks``, the
            ``cp_documents.DocumentMask`` with block_causal, or TorchTitan's masks for its flex
            and varlen flavors).
        """
        inputs, labels = inputs.to(self.device), labels.to(self.device)
        cp = self.dims.cp if self.dims.cp_enabled else 1
        if self.attn_mask_type == "block_causal" and self.eos_id is not None:
            rank = self.dims.get_mesh("cp").get_local_rank() if cp > 1 else 0
            inputs, labels, positions, mask = shard_documents(
                inputs, labels, self.eos_id, cp, rank,
                self.cfg.parallelism.context_parallel_load_balancer if cp > 1 else None,
                self.cfg.model.document_positions,
            )  # fmt: skip
            if training:  # the log's masked work per cp rank: training microbatches only
                self.attn_work += work_per_rank(mask)
            return inputs, labels, {"positions": positions, "attention_masks": mask}
        if self.titan_masks:
            model: Any = self.model_parts[0]
            return (
                inputs,
                labels,
                {"attention_masks": model.get_attention_masks(inputs, self.tokenizer)},
            )
        if cp == 1:
            return inputs, labels, {}
        inputs, labels, positions = shard_sequence(
            self.dims.get_mesh("cp"),
            inputs,
            labels,
            self.cfg.parallelism.context_parallel_load_balancer,
        )
        return inputs, labels, {"positions": positions}

    def _global_loss(self, local: torch.Tensor) -> float:
        """Sum the ranks' loss contributions over the loss mesh (pp x dp x cp; stages other
        than the last contribute 0): the global mean."""
        if self.dims.loss_parallel_size > 1:
            local = local.clone()
            dist.all_reduce(local, group=self.dims.get_mesh("loss").get_group())
        return float(local.item())
