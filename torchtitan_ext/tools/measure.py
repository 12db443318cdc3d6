"""Measurement of real runs, what the dry run's estimates are checked against
(``scripts/check_dry_run.py``).

- ``CommCounter`` (with ``group_labels``): bytes each collective of a rank sends, by kind of
  traffic (``comm_estimate.COMM_KINDS``), from a ``TorchDispatchMode`` over c10d and functional
  collectives, letting DTensor dispatch first as torch's ``CommDebugMode`` does.
- ``saved_activations``: bytes autograd saves for backward, through torch's
  ``saved_tensors_hooks``.
- ``measure_peak``: the peak of live tensor bytes during one training step, from torch's
  ``MemTracker`` (``torch.distributed._tools.mem_tracker``).
"""

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.distributed_c10d import GroupName
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from torchtitan_ext.parallel import cp_patterns
from torchtitan_ext.parallel_dims import ParallelDims
from torchtitan_ext.tools.comm_estimate import COMM_KINDS

_ALL_GATHERS = {"_allgather_base_", "allgather_", "allgather_into_tensor_coalesced_",
                "all_gather_into_tensor", "all_gather_into_tensor_coalesced"}  # fmt: skip
_REDUCE_SCATTERS = {"_reduce_scatter_base_", "reduce_scatter_tensor_coalesced_",
                    "reduce_scatter_tensor", "reduce_scatter_tensor_coalesced"}  # fmt: skip
_ALL_REDUCES = {"allreduce_", "all_reduce", "all_reduce_coalesced", "allreduce_coalesced_"}
_ALL_TO_ALLS = {"alltoall_base_", "all_to_all_single"}
_KNOWN = {"send", *_ALL_GATHERS, *_REDUCE_SCATTERS, *_ALL_REDUCES, *_ALL_TO_ALLS}


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, list | tuple):
        return [t for y in x for t in _tensors(y)]
    return []


def _nbytes(ts: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


class CommCounter(TorchDispatchMode):
    """Counts the bytes each collective of this rank sends, by kind of traffic, the way
    ``comm_estimate`` counts them (ring algorithms: an all-gather sends (n-1) x its input, a
    reduce-scatter (n-1) x its output, an all-reduce 2·(n-1)/n x its tensor, an all-to-all
    its input minus the rank's own split, a send its tensor).

    Sees both c10d ops (FSDP, ``dist.*``) and functional collectives (DTensor, ring
    attention) through torch's dispatcher. A group is labelled by the mesh it belongs to:
    c10d ops prefer ``fsdp`` / ``dp_replicate`` (FSDP's traffic), functional ones ``tp`` /
    ``cp`` (DTensor's), since with dp_shard 1 the fsdp and cp groups are the same. Tensors of
    at most 8 elements (token counts, losses, norms) count as "other".

    Args:
        groups: the global ranks of a process group -> the labels of the meshes with those
            ranks (by ranks, not by group name: DTensor caches redistribution plans by mesh
            layout, so a run may use an equal, earlier mesh's groups).
        ranks_per_node: if > 0, also split the "cp" bytes by destination into ``cp_intra`` /
            ``cp_inter`` (node = global rank // ranks_per_node; an all-gather's bytes spread
            evenly over the group's other ranks, an all-to-all's go where its splits say),
            as ``cp_comm.split_by_node`` models them.
    """

    C10D_ORDER = ("fsdp", "dp_replicate", "pp", "tp", "cp")
    FUNCOL_ORDER = ("tp", "cp", "pp", "dp_replicate", "fsdp")

    def __init__(self, groups: dict[frozenset[int], set[str]], ranks_per_node: int = 0) -> None:
        super().__init__()
        self.groups = groups
        self.ranks_per_node = ranks_per_node
        self.bytes: dict[str, int] = dict.fromkeys((*COMM_KINDS, "other"), 0)
        self.cp_intra = self.cp_inter = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if any(t is DTensor for t in types):
            # Let DTensor run first (as torch's CommDebugMode does): the collectives it issues,
            # ring attention's included, then come back here as plain-tensor ops.
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        if func.namespace in ("c10d", "_c10d_functional"):
            self._count(func, list(args))
        return out

    def _count(self, func: Any, args: list[Any]) -> None:
        name = func._schema.name.split("::")[1]
        if name not in _KNOWN:
            return
        if func.namespace == "c10d":
            pgs = [
                a
                for a in args
                if isinstance(a, torch.ScriptObject) and "ProcessGroup" in str(a._type())
            ]
            if not pgs:
                return
            pg = dist.ProcessGroup.unbox(pgs[0])
            order = self.C10D_ORDER
        else:
            name_arg = next(a for a in reversed(args) if isinstance(a, str))
            pg = dist.distributed_c10d._resolve_process_group(GroupName(name_arg))
            order = self.FUNCOL_ORDER
        size, rank = pg.size(), pg.rank()
        group = frozenset(dist.get_process_group_ranks(pg))
        if name == "send":
            sent = _nbytes(_tensors(args[0]))
        elif name in _ALL_GATHERS:
            inputs = args[1] if func.namespace == "c10d" else args[0]
            sent = (size - 1) * _nbytes(_tensors(inputs))
        elif name in _REDUCE_SCATTERS:
            if func.namespace == "c10d":
                sent = (size - 1) * _nbytes(_tensors(args[0]))
            else:
                sent = (size - 1) * _nbytes(_tensors(args[0])) // size
        elif name in _ALL_REDUCES:
            sent = 2 * (size - 1) * _nbytes(_tensors(args[0])) // size
        elif name in _ALL_TO_ALLS:
            inp = args[1] if func.namespace == "c10d" else args[0]
            splits = args[4] if func.namespace == "c10d" else args[2]
            own = splits[rank] if splits else inp.shape[0] // size
            sent = (inp.shape[0] - own) * _nbytes([inp]) // max(inp.shape[0], 1)
        else:
            return
        tensors = _tensors(args[0])
        small = sum(t.numel() for t in tensors) <= 8
        labels = self.groups.get(group, set())
        label = "other" if small else next((k for k in order if k in labels), "other")
        self.bytes[label] += sent
        if label == "cp" and self.ranks_per_node > 0:
            members = dist.get_process_group_ranks(pg)
            if name in _ALL_TO_ALLS and splits:
                rows = inp.shape[0]
                to = {
                    m: sent_rows * _nbytes([inp]) // rows
                    for m, sent_rows in zip(members, splits, strict=True)
                }
            else:
                others = [m for m in members if m != members[rank]]
                to = dict.fromkeys(others, sent // len(others))
            node = members[rank] // self.ranks_per_node
            inter = sum(b for m, b in to.items() if m // self.ranks_per_node != node)
            self.cp_inter += inter
            self.cp_intra += sent - inter


def group_labels(dims: ParallelDims) -> dict[frozenset[int], set[str]]:
    """Global ranks of a process group -> labels (``COMM_KINDS``) of this rank's meshes with
    those ranks, for ``CommCounter``. Needs ``dims.build_mesh`` to have run."""
    meshes = {
        "fsdp": [dims.get_mesh("fsdp"), dims.get_mesh("hsdp")["hsdp_shard"]],
        "dp_replicate": [dims.get_mesh("dp_replicate"), dims.get_mesh("hsdp")["hsdp_replicate"]],
        "tp": [dims.get_mesh("tp")],
        "cp": [dims.get_mesh("cp")],
        "pp": [dims.get_mesh("pp")],
    }
    out: dict[frozenset[int], set[str]] = {}
    groups = [(label, m.get_group()) for label, ms in meshes.items() for m in ms if m.size() > 1]
    if dims.cp > 1:  # a cp pattern's inner and outer groups
        groups += [("cp", g) for g in cp_patterns.process_groups(dims.get_mesh("cp"))]
    for label, group in groups:
        ranks = frozenset(dist.get_process_group_ranks(group))
        out.setdefault(ranks, set()).add(label)
    return out


@contextlib.contextmanager
def saved_activations() -> Iterator[list[int]]:
    """Inside the block, count the bytes autograd saves for backward (unique storages, not
    parameters: leaf tensors that require grad and views of them are skipped, which covers
    FSDP's unsharded parameters and TP's DTensor parameters). Yields a one-element list holding
    the total, set when the block exits: only tensors some graph still holds then count, so
    what a graph built and freed inside the block saved (the chunked loss's per-chunk
    gradients, taken in forward) is left out, as it is from memory.
    """
    saved: list[tuple[weakref.ref[torch.Tensor], int, int]] = []
    total = [0]

    def is_param(t: torch.Tensor) -> bool:  # a parameter or a view of one (w.t() in mm)
        base = t if t._base is None else t._base
        return base.is_leaf and base.requires_grad

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not is_param(t):
            local = t.to_local() if isinstance(t, DTensor) else t
            if isinstance(local, AsyncCollectiveTensor):  # a collective's (waited) output
                local = local.trigger_wait()
            storage = local.untyped_storage()
            if storage.nbytes() > 0:
                saved.append((weakref.ref(t), storage.data_ptr(), storage.nbytes()))
        return t  # what the graph keeps: alive exactly as long as the graph holds it

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total
    live = {ptr: nbytes for ref, ptr, nbytes in saved if ref() is not None}
    total[0] = sum(live.values())


def measure_peak(trainer: Any) -> int:
    """Run one training step of ``trainer`` (a ``trainer.Trainer``) and return this rank's
    peak of live tensor bytes during it: the parameters, gradients and optimizer state it
    holds plus everything the step allocates (activations, collective buffers, temporaries),
    tracked by torch's ``MemTracker`` (``torch.distributed._tools.mem_tracker``: a dispatch
    mode over every op's outputs' storages, freed by weakref, storage resizes included, as
    FSDP2 frees its unsharded parameters) without its per-module statistics, which refuse a
    module called twice in one step (pipeline microbatches, gradient accumulation). What
    ``RankPlan.total_bytes`` estimates; on CPU, where no allocator statistics exist.
    Collective (one step)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class PeakTracker(MemTracker):
        def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
            pass

        def _post_fw_hook(self, module: nn.Module, inputs: Any, outputs: Any) -> None:
            pass

        def _pre_bw_hook(self, module: nn.Module, args: Any) -> None:
            pass

        def _post_bw_hook(self, module: nn.Module, args: Any) -> None:
            pass

    tracker = PeakTracker()
    tracker.track_external(*trainer.model_parts, *trainer.optimizers.optimizers)
    batch = trainer.dataloader.next_step()
    with tracker:
        trainer.train_step(batch)
    peak = tracker.get_tracker_snapshot("peak")
    return max(snap["Total"] for snap in peak.values())
