"""One decision about the checkpoint folder for all ranks.

Rank 0 does the file-system work (listing, manifests, renames) and every rank gets its result
or its error (``decided_by_rank0``), so that stale views of a shared file system cannot make
ranks decide differently, and a failure on rank 0 is one ``CheckpointError`` line on every rank
instead of peers left waiting in a collective. TorchTitan's ``CheckpointManager`` likewise
leaves the folder's housekeeping to rank 0 (``_purge_stale_checkpoints``); the hand-over is
``torch.distributed.broadcast_object_list``.
"""

from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch.distributed as dist


class CheckpointError(RuntimeError):
    """A checkpoint could not be listed, written or published (a full disk, an I/O error on
    rank 0's rename): one line, the same on every rank, that names the folder and the cause.
    The trainer reports it and exits with status 1; the newest complete checkpoint is kept."""


_T = TypeVar("_T")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def decided_by_rank0(fn: Callable[[], _T], what: str) -> _T:
    """Run ``fn`` on rank 0 only and hand its result, or its error, to every rank: one
    decision about the checkpoint folder for all of them (on a shared file system another
    rank's view may be stale), and no rank left waiting in a collective while rank 0 fails.
    Collective (``broadcast_object_list`` over the default group) with more than one rank.

    Args:
        fn: the file-system work (listing, renames, manifest); its result must pickle.
        what: what failed, the start of the error line (e.g. "listing /ckpt").

    Raises:
        CheckpointError: ``fn`` raised on rank 0; every rank raises the same line (a
            ``CheckpointError`` of ``fn``'s own is passed on as it is).
    """
    box: list[Any] = [None]
    if _rank() == 0:
        try:
            box[0] = (True, fn())
        except CheckpointError as e:
            box[0] = (False, str(e))
        except Exception as e:  # any failure of rank 0's file work: every rank hears of it
            box[0] = (False, f"{what}: {one_line(e)}")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise CheckpointError(value)
    return cast(_T, value)


def one_line(err: BaseException) -> str:
    """``err`` in one line: its type and the first line of its message (300 characters at
    most)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")
