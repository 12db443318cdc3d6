"""Tiled MLP: each block's feed-forward runs over tiles of the sequence with recompute in
backward, so its (tokens x ffn_dim) intermediates exist one tile at a time.

TorchTitan's Llama feed-forward is ``w2(silu(w1(x)) * w3(x))`` with ffn_dim about 3.5 x dim:
for a (B, S, dim) input, autograd keeps w1(x), w3(x) and their SiLU product, about 3 x S x
ffn_dim values per block, which at long sequences rival the attention activations (and a full
activation-checkpointing recompute builds them again, all at once, in backward). Here the
feed-forward splits the sequence into ``tile_tokens`` tiles: its forward computes the tiles one
after another without keeping their intermediates, and its backward recomputes one tile at a
time and takes that tile's gradients right away (``_TiledFeedForwardFn``), so only the
feed-forward's input is kept. The TiledMLP of DeepSpeed ALST (arXiv 2506.13996), an autograd
function as there, written here for TorchTitan 0.2.2's ``FeedForward`` (a class swap by
``apply_tiled_mlp``: same parameters and FQNs, so checkpoints and the TP / FSDP plans are
unchanged).

Under full activation checkpointing each feed-forward runs twice per step, as an untiled one
does: in forward, and once in backward. The input is saved by a separate identity function
(``_SaveInput``) that runs before the tiles, so the block's recompute has everything backward
needs once it reaches the feed-forward's input and stops there (``apply_ac`` turns on
non-reentrant checkpoint's early stop for full AC of tiled blocks); the tiles recompute only in
their own backward. (Each tile under its own ``torch.utils.checkpoint`` inside the
checkpointed block ran it three times: the block's recompute ran every tile forward to save
the tiles' inputs again, then each tile's checkpoint recomputed it.) A compiled block still
checkpoints each tile (Dynamo does not trace the hand-off between the two functions); its
recompute is then the compiler's.

With tensor (and sequence) parallel, the feed-forward receives the sequence all-gathered
(TorchTitan's ``PrepareModuleInput``) and w1 / w3 are column-, w2 row-parallel. Tiles split the
sequence only: each tile multiplies by the local weight shards and yields a partial sum of its
(B, tile, dim) output; the tiles are concatenated and reduce-scattered over the sequence once,
the same reduction TP's row-parallel w2 does without tiling. FSDP gathers the block's weights
once per forward and once per backward, as without tiling; activation checkpointing and
per-block compile wrap the tiled block as they wrap the plain one.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Shard
from torch.utils.checkpoint import checkpoint
from torchtitan.models.llama3.model.model import FeedForward


def _local(weight: torch.Tensor) -> torch.Tensor:
    return weight.to_local() if isinstance(weight, DTensor) else weight


class TiledFeedForward(FeedForward):
    """``FeedForward`` computed over sequence tiles of ``tile_tokens`` tokens (see the module
    docstring). Input (B, S, dim): a plain tensor, or under TP the all-gathered sequence as a
    replicated DTensor; output (B, S, dim), or under TP the (B, S / tp, dim) local sequence
    shard, as ``FeedForward`` with TorchTitan's TP plan returns."""

    tile_tokens: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, DTensor):  # TP: x replicated over the tp mesh, weights sharded
            mesh = x.device_mesh
            # Each rank's gradient of x covers its own ffn shard only: declare it Partial, so
            # backward sums it over the tp ranks (as the DTensor matmuls of the untiled
            # feed-forward do); as Replicate, the other shards' share would be dropped.
            local_x = x.to_local(grad_placements=[Partial()])
            partial = self._tiled(local_x)  # this rank's share of w2's sum
            out = DTensor.from_local(partial, mesh, [Partial()], run_check=False)
            return out.redistribute(mesh, [Shard(1)]).to_local()
        return self._tiled(x)

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, dim) -> (B, S, dim) tile by tile, with the local weight shards."""
        weights = tuple(_local(m.weight) for m in (self.w1, self.w2, self.w3))
        if not torch.is_grad_enabled():
            return _tiles_forward(self, x, weights)
        if torch.compiler.is_compiling():
            # Dynamo cannot trace the hand-off of _SaveInput's node; a compiled block gets
            # each tile under non-reentrant checkpointing (its recompute is compiled too).
            tiles = [
                checkpoint(self._tile, x[:, start : start + self.tile_tokens], *weights,
                           use_reentrant=False, preserve_rng_state=False)
                for start in range(0, x.shape[1], self.tile_tokens)
            ]  # fmt: skip
            return torch.cat(tiles, dim=1)
        saved = _SaveInput.apply(x, *weights)
        return _TiledFeedForwardFn.apply(saved, saved.grad_fn, self, *weights)

    def _tile(
        self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor
    ) -> torch.Tensor:
        """(B, tile, dim) -> (B, tile, dim): TorchTitan's ``FeedForward`` math with the given
        (local) weights w1, w3 (ffn, dim) and w2 (dim, ffn)."""
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def _tiles_forward(
    ff: TiledFeedForward, x: torch.Tensor, weights: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """The feed-forward of x (B, S, dim) tile by tile into one (B, S, dim) output."""
    out: torch.Tensor | None = None
    for start in range(0, x.shape[1], ff.tile_tokens):
        part = ff._tile(x[:, start : start + ff.tile_tokens], *weights)
        if out is None:
            out = part.new_empty((x.shape[0], x.shape[1], *part.shape[2:]))
        out[:, start : start + part.shape[1]] = part
    assert out is not None, "empty sequence"
    return out


class _SaveInput(torch.autograd.Function):
    """Identity on x (B, S, dim) that saves x and the weights for ``_TiledFeedForwardFn``'s
    backward. Separate so that they are saved before the tiles run: a checkpointed block's
    recompute (with early stop) then ends here instead of running the tiles again."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, *weights)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (grad, None, None, None)


class _TiledFeedForwardFn(torch.autograd.Function):
    """The tiled feed-forward: forward without autograd, tile by tile; backward recomputes
    each tile with autograd and takes its gradients (x's (B, tile, dim) slice, written into
    one (B, S, dim) buffer; the weights', summed over the tiles) before the next tile. x and
    the weights come from ``_SaveInput``'s node (``saved_by``), read once in backward."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, saved_by: Any, ff: TiledFeedForward, *weights: torch.Tensor
    ) -> torch.Tensor:
        ctx.saved_by, ctx.ff = saved_by, ff
        return _tiles_forward(ff, x, weights)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *weights = ctx.saved_by.saved_tensors
        ff: TiledFeedForward = ctx.ff
        leaves = [w.detach().requires_grad_() for w in weights]
        grad_x = torch.empty_like(x)
        grad_w: list[torch.Tensor] | None = None
        for start in range(0, x.shape[1], ff.tile_tokens):
            stop = start + ff.tile_tokens
            x_tile = x[:, start:stop].detach().requires_grad_()
            with torch.enable_grad():
                out = ff._tile(x_tile, *leaves)
            grads = torch.autograd.grad(out, (x_tile, *leaves), grad_out[:, start:stop])
            grad_x[:, start:stop] = grads[0]
            parts = list(grads[1:])
            grad_w = (
                parts if grad_w is None else [a + b for a, b in zip(grad_w, parts, strict=True)]
            )
        assert grad_w is not None, "empty sequence"
        return (grad_x, None, None, *grad_w)


def apply_tiled_mlp(model: nn.Module, tile_tokens: int) -> None:
    """Make every block's ``feed_forward`` a ``TiledFeedForward`` of ``tile_tokens`` tokens,
    in place (before TP and FSDP).

    Raises:
        TypeError: a block's feed-forward is not TorchTitan's ``FeedForward``.
    """
    layers: nn.Module = model.get_submodule("layers")
    for block in layers.children():
        ff = block.get_submodule("feed_forward")
        if type(ff) is not FeedForward:
            raise TypeError(f"tiled MLP needs TorchTitan's FeedForward, got {type(ff)}")
        ff.__class__ = TiledFeedForward
        assert isinstance(ff, TiledFeedForward)
        ff.tile_tokens = tile_tokens
