"""Chunked cross-entropy: the output projection and the loss over chunks of tokens, so a step
holds one chunk's logits instead of the (tokens x vocab) logits of the whole sequence.

At long sequence lengths the logits dominate a step's memory: (B x S x vocab) in the compute
dtype, plus their fp32 copy, log-softmax and gradient; a 1.2B Llama with a 32K vocabulary at
256K tokens needs 16 GiB for one fp32 copy alone. Here the model's ``output`` projection
returns its input (``defer_output_projection``, applied by ``parallelize`` before TP), and the
loss (``ChunkedCrossEntropy``) runs ``output`` and the cross-entropy over ``chunk_tokens``
tokens at a time and computes each chunk's gradients (for the hidden states and the weight)
right away, in the forward: the chunk's logits are freed before the next chunk, and backward
only scales the stored gradients (``_GradientInForward``). Chunking the logits is the idea of
TorchTitan's ``ChunkedLossWrapper`` (main branch, after 0.2.2), torchtune's
``CEWithChunkedOutputLoss`` and the tiled logits of DeepSpeed ALST (arXiv 2506.13996); taking
the gradients in forward, that of Liger-Kernel's fused linear cross-entropy. Written here for
TorchTitan 0.2.2's Llama and our parallelisms.

How it composes:
- FSDP2: ``output`` stays in the [norm, output] FSDP unit, which is not resharded after
  forward (``apply_fsdp``), so its weight is all-gathered once per step, before the first
  chunk, and every chunk uses the unsharded weight; its gradient, summed over the chunks,
  reaches the unit's reduce-scatter in backward.
- TP: ``output`` is column-parallel (vocab-sharded weight); its input is all-gathered over the
  sequence as without chunking and stays a replicated DTensor, so each chunk's logits are a
  DTensor sharded on the vocab (and the hidden states' gradient is summed over the vocab
  shards, as the unchunked projection's is); under ``loss_parallel()`` the chunk's loss is
  torch's vocab-parallel cross-entropy (the same numbers as the unchunked loss), without it
  the chunk's logits are gathered over the vocab first.
- CP: each rank's loss covers its own tokens; PP: the last stage's loss; gradient
  accumulation and validation call the same loss.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torchtitan.components.loss import IGNORE_INDEX


class DeferredOutput(nn.Linear):
    """The model's output projection with its forward deferred to the loss: ``forward``
    returns the hidden states (B, S, dim) unchanged; ``ChunkedCrossEntropy`` applies the
    weight (vocab, dim) chunk by chunk. Same parameters and FQN (``output.weight``) as the
    ``nn.Linear`` it replaces, so checkpoints and TP / FSDP plans are unchanged."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h


def defer_output_projection(model: nn.Module) -> None:
    """Make ``model.output`` (a bias-free ``nn.Linear``; absent on a pipeline stage without
    it) a ``DeferredOutput``, in place; call before TP and FSDP."""
    output = getattr(model, "output", None)
    if output is None:
        return
    if type(output) is not nn.Linear or output.bias is not None:
        raise TypeError(f"chunked loss needs model.output to be a bias-free nn.Linear: {output}")
    output.__class__ = DeferredOutput


class ChunkedCrossEntropy:
    """Summed cross-entropy of ``head(hidden)`` against labels, over ``chunk_tokens`` tokens
    at a time (see the module docstring).

    Args:
        head: the model's ``DeferredOutput`` (weight (vocab, dim); under TP a DTensor sharded
            on the vocab dim).
        chunk_tokens: tokens per chunk (of the flattened local batch x sequence).
        loss_parallel: under TP, whether the caller runs the loss and its backward inside
            ``torch.distributed.tensor.parallel.loss_parallel()`` (vocab-parallel
            cross-entropy); else each chunk's logits are gathered over the vocab first.

    Called as ``loss(hidden, labels)``: hidden (B, S, dim) in the compute dtype (under TP a
    DTensor replicated over the tp mesh, so that its gradient is summed over the vocab
    shards), labels (B, S) int64 with ``IGNORE_INDEX`` for ignored positions; returns the fp32
    sum over the labelled tokens (a scalar; under TP a replicated DTensor), equal to
    TorchTitan's ``cross_entropy_loss(head(hidden), labels)``.
    """

    def __init__(self, head: nn.Linear, chunk_tokens: int, loss_parallel: bool = True) -> None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.head = head
        self.chunk_tokens = chunk_tokens
        self.loss_parallel = loss_parallel

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return _GradientInForward.apply(hidden, self.head.weight, labels, self)
        # Validation: only the chunk losses.
        h, y, n = hidden.flatten(0, 1), labels.flatten(0, 1), self.chunk_tokens
        parts = [self._chunk_loss(h[i : i + n], self.head.weight, y[i : i + n])
                 for i in range(0, h.shape[0], n)]  # fmt: skip
        return torch.stack(parts).sum()

    def _chunk_loss(self, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss of one chunk: h (n, dim), weight (vocab, dim), y (n,) -> fp32 scalar sum."""
        logits = F.linear(h, weight)  # (n, vocab); under TP a DTensor, Shard(1)
        if isinstance(logits, DTensor) and not self.loss_parallel:
            logits = logits.full_tensor()
        return F.cross_entropy(logits.float(), y, reduction="sum", ignore_index=IGNORE_INDEX)


class _GradientInForward(torch.autograd.Function):
    """The chunked loss with each chunk's gradients computed in the forward, while its logits
    exist, so nothing is recomputed in backward (as Liger-Kernel's fused linear
    cross-entropy does; a per-chunk checkpoint would run the output projection a second time,
    which on a small model with a large vocabulary is a large share of the step).

    The loss is the end of the graph, so d(sum loss)/d(hidden) (B, S, dim, hidden's dtype)
    and d(sum loss)/d(weight) (vocab, dim; accumulated over the chunks in fp32, then in the
    weight's dtype) are known in forward; backward scales them by the incoming gradient (the
    trainer's 1 / global tokens). Memory: those two gradients, which backward produces anyway,
    instead of the chunks' saved hidden states.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        loss: ChunkedCrossEntropy,
    ) -> torch.Tensor:
        h, y, n = hidden.detach().flatten(0, 1), labels.flatten(0, 1), loss.chunk_tokens
        w = weight.detach().requires_grad_()
        total: torch.Tensor | None = None
        grad_w: torch.Tensor | None = None
        # d(loss)/d(hidden), written chunk by chunk into one (B x S, dim) buffer: holding the
        # chunks and concatenating them would need the whole gradient twice at the end.
        grad_h: torch.Tensor | None = None
        d_h: torch.Tensor | None = None
        for start in range(0, h.shape[0], n):
            h_chunk = h[start : start + n].detach().requires_grad_()
            with torch.enable_grad():
                part = loss._chunk_loss(h_chunk, w, y[start : start + n])
            d_h, d_w = torch.autograd.grad(part, (h_chunk, w))
            d_local = _local_values(d_h)
            if grad_h is None:
                grad_h = d_local.new_empty((h.shape[0], *d_local.shape[1:]))
            grad_h[start : start + n].copy_(d_local)
            grad_w = d_w.float() if grad_w is None else grad_w + d_w
            total = part.detach() if total is None else total + part.detach()
        assert total is not None and grad_w is not None and grad_h is not None, "empty batch"
        if isinstance(d_h, DTensor):  # every chunk's gradient has the same placements
            grad_h = DTensor.from_local(grad_h, d_h.device_mesh, d_h.placements, run_check=False)
        ctx.save_for_backward(grad_h.view_as(hidden), grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None


def _local_values(grad: torch.Tensor) -> torch.Tensor:
    """A chunk's hidden-state gradient as a plain tensor: under TP its local values (the
    chunk's rows in full: the hidden states are replicated over the tp mesh, and their
    gradient is Replicate or a Partial sum over the vocab shards, never sharded)."""
    if not isinstance(grad, DTensor):
        return grad
    if any(p.is_shard() for p in grad.placements):
        raise AssertionError(f"sharded hidden-state gradient: {grad.placements}")
    return grad.to_local()
