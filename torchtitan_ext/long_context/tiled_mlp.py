"""Tiled MLP: each block's feed-forward runs over tiles of the sequence with recompute in
backward, so its (tokens x ffn_dim) intermediates exist one tile at a time.

TorchTitan's Llama feed-forward is ``w2(silu(w1(x)) * w3(x))`` with ffn_dim about 3.5 x dim:
for a (B, S, dim) input, autograd keeps w1(x), w3(x) and their SiLU product, about 3 x S x
ffn_dim values per block, which at long sequences rival the attention activations (and a full
activation-checkpointing recompute builds them again, all at once, in backward). Here the
feed-forward splits the sequence into ``tile_tokens`` tiles and runs each under non-reentrant
activation checkpointing: only the tile inputs are kept, and backward recomputes one tile's
intermediates at a time. The TiledMLP of DeepSpeed ALST (arXiv 2506.13996), written here for
TorchTitan 0.2.2's ``FeedForward`` (a class swap by ``apply_tiled_mlp``: same parameters and
FQNs, so checkpoints and the TP / FSDP plans are unchanged).

With tensor (and sequence) parallel, the feed-forward receives the sequence all-gathered
(TorchTitan's ``PrepareModuleInput``) and w1 / w3 are column-, w2 row-parallel. Tiles split the
sequence only: each tile multiplies by the local weight shards and yields a partial sum of its
(B, tile, dim) output; the tiles are concatenated and reduce-scattered over the sequence once,
the same reduction TP's row-parallel w2 does without tiling. FSDP gathers the block's weights
once per forward and once per backward, as without tiling; activation checkpointing and
per-block compile wrap the tiled block as they wrap the plain one.
"""

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
        tiles = [
            checkpoint(self._tile, x[:, start : start + self.tile_tokens], use_reentrant=False,
                       preserve_rng_state=False)
            for start in range(0, x.shape[1], self.tile_tokens)
        ]  # fmt: skip
        return torch.cat(tiles, dim=1)

    def _tile(self, x: torch.Tensor) -> torch.Tensor:
        """(B, tile, dim) -> (B, tile, dim) with the local weight shards."""
        w1, w2, w3 = (_local(m.weight) for m in (self.w1, self.w2, self.w3))
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


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
