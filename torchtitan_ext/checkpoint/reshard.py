"""In-memory state transfer between meshes: what a DCP save followed by a load into another
mesh does (``torch.distributed.checkpoint``'s resharding on load), without the files.

``reshard_like`` lays one state dict out as another (DTensors of an unchanged layout keep their
shard; the others are gathered with ``DTensor.full_tensor`` and sliced with
``distribute_tensor``); ``transfer_state`` moves the whole training state (``STATE_KEYS``) of
one model, optimizer, scheduler and loader into those built for the next curriculum stage.
"""

import copy
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor, distribute_tensor

from torchtitan_ext.checkpoint.storage import STATE_KEYS


def reshard_like(src: dict[str, Any], like: dict[str, Any], what: str) -> dict[str, Any]:
    """``src`` laid out as ``like``: the in-memory counterpart of saving ``src`` with DCP and
    loading it into a state dict shaped as ``like`` (DCP's resharding on load).

    Both are flat state dicts of the same model on two meshes (``ModelWrapper`` /
    ``OptimizersContainer`` state dicts: FQN keys, DTensor parameters and optimizer states as
    FSDP2 and TP lay them out). A DTensor whose layout is unchanged (the same global ranks in
    the same mesh grid, the same placements: a curriculum stage that trades dp_shard for cp
    keeps the FSDP mesh dp_shard x cp) keeps its local shard, without a copy or a
    collective. Another is gathered over its old mesh (``full_tensor``) and sliced locally to
    its new one (``distribute_tensor`` with ``src_data_rank=None``: no second collective),
    one tensor at a time. Plain tensors and other values are taken as they are.

    Collective over each resharded tensor's old mesh: every rank calls it with the keys of
    its own model part (the same keys on the ranks of one pipeline stage).

    Args:
        src: the state to move (its tensors may be shared with the result).
        like: the target's own state dict, for the target layouts (its values are not read).
        what: the state's name (``"model"``, ``"optimizer"``), for errors.

    Returns:
        ``like``'s keys with ``src``'s values in ``like``'s layouts.

    Raises:
        ValueError: the two hold different keys (e.g. a different pipeline split) or a tensor
            of another global shape.
    """
    if set(src) != set(like):
        missing, extra = sorted(set(like) - set(src)), sorted(set(src) - set(like))
        raise ValueError(
            f"{what}: the states differ in keys (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    out: dict[str, Any] = {}
    for key in sorted(like):  # one order on every rank: the gathers below are collectives
        value, target = src[key], like[key]
        if not isinstance(target, DTensor):
            out[key] = value.full_tensor() if isinstance(value, DTensor) else value
            continue
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"{what}: {key} has shape {tuple(value.shape)}, expected {tuple(target.shape)}"
            )
        if isinstance(value, DTensor) and _same_layout(value, target):
            local = value.to_local()
        else:
            full = value.full_tensor() if isinstance(value, DTensor) else value
            local = distribute_tensor(
                full, target.device_mesh, target.placements, src_data_rank=None
            ).to_local()
            del full
        out[key] = DTensor.from_local(
            local,
            target.device_mesh,
            target.placements,
            run_check=False,
            shape=target.shape,
            stride=target.stride(),
        )
    return out


def _same_layout(a: DTensor, b: DTensor) -> bool:
    """Whether every rank holds the same local shard of ``a`` and ``b``: the same device type,
    rank grid and placements (the mesh objects and their dim names may differ)."""
    ma, mb = a.device_mesh, b.device_mesh
    return (
        ma.device_type == mb.device_type
        and tuple(a.placements) == tuple(b.placements)
        and torch.equal(ma.mesh, mb.mesh)
    )


def transfer_state(dst: dict[str, Stateful], src: dict[str, Stateful]) -> None:
    """Load ``src``'s training state (``STATE_KEYS``) into ``dst`` in memory, as saving ``src``
    to a checkpoint and loading it into ``dst`` would (``dst`` may be on another mesh: see
    ``reshard_like``). Model and optimizer tensors of an unchanged layout are shared, not
    copied into new memory where the loader keeps them (the optimizer's states); the other
    states are deep-copied. Collective.

    Raises:
        ValueError: the model or optimizer of ``dst`` holds other parameters than ``src``'s.
    """
    for key in STATE_KEYS:
        state = src[key].state_dict()
        if key in ("model", "optimizer"):
            state = reshard_like(state, dst[key].state_dict(), key)
        else:
            state = copy.deepcopy(state)
        dst[key].load_state_dict(state)
