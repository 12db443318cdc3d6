"""Chunked cross-entropy: the output projection and the loss over chunks of tokens, so a step
holds one chunk's logits instead of the (tokens x vocab) logits of the whole sequence.

At long sequence lengths the logits dominate a step's memory: (B x S x vocab) in the compute
dtype, plus their fp32 copy, log-softmax and gradient; a 1.2B Llama with a 32K vocabulary at
256K tokens needs 16 GiB for one fp32 copy alone. Here the model's ``output`` projection
returns its input (``defer_output_projection``, applied by ``parallelize`` before TP), and the
loss (``ChunkedCrossEntropy``) runs ``output`` and the cross-entropy over ``chunk_tokens``
tokens at a time, each chunk under non-reentrant activation checkpointing: its logits are freed
after its loss is computed and recomputed (from the chunk's hidden states) in backward. The
same idea as TorchTitan's ``ChunkedLossWrapper`` (main branch, after 0.2.2), torchtune's
``CEWithChunkedOutputLoss`` and the tiled logits of DeepSpeed ALST (arXiv 2506.13996);
written here for TorchTitan 0.2.2's Llama and our parallelisms.

How it composes:
- FSDP2: ``output`` stays in the [norm, output] FSDP unit, which is not resharded after
  forward (``apply_fsdp``), so its weight is all-gathered once per step, before the first
  chunk, and every chunk (and every backward recompute) uses the unsharded weight; its
  gradient accumulates over the chunks before the unit's reduce-scatter.
- TP: ``output`` is column-parallel (vocab-sharded weight); its input is all-gathered over the
  sequence as without chunking and stays a replicated DTensor, so each chunk's logits are a
  DTensor sharded on the vocab (and the hidden states' gradient is summed over the vocab
  shards, as the unchunked projection's is); under ``loss_parallel()`` the chunk's loss is
  torch's vocab-parallel cross-entropy (the same numbers as the unchunked loss), without it
  the chunk's logits are gathered over the vocab first.
- CP: each rank's loss covers its own tokens; PP: the last stage's loss; gradient
  accumulation and validation call the same loss.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint
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
        h = hidden.flatten(0, 1)
        y = labels.flatten(0, 1)
        total: torch.Tensor | None = None
        for start in range(0, h.shape[0], self.chunk_tokens):
            end = start + self.chunk_tokens
            part = checkpoint(
                self._chunk_loss, h[start:end], y[start:end], use_reentrant=False,
                preserve_rng_state=False,
            )  # fmt: skip
            total = part if total is None else total + part
        assert total is not None, "empty batch"
        return total

    def _chunk_loss(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss of one chunk: h (n, dim), y (n,) -> fp32 scalar sum."""
        logits = F.linear(h, self.head.weight)  # (n, vocab); under TP a DTensor, Shard(1)
        if isinstance(logits, DTensor) and not self.loss_parallel:
            logits = logits.full_tensor()
        return F.cross_entropy(logits.float(), y, reduction="sum", ignore_index=IGNORE_INDEX)
