"""Torch-only repro: DTensor's caches return a mesh built on an earlier (fake) process group.

Run with ``torchrun --nproc_per_node 2 scripts/repro_fake_mesh_cache.py [--clear]``. Each rank
first builds a 1-D DeviceMesh on torch's fake process group as rank 0 (what a dry run does to
simulate one rank of a cluster) and runs one DTensor op on it; then it destroys that group,
starts a real gloo group and runs the same op on a mesh of the same shape and dim names. The
second op's output carries the *fake* mesh (DeviceMesh equality ignores the process group and
the rank, and DTensor caches sharding propagation keyed by mesh), so its coordinate is (0,) on
every rank, and DCP's save of such tensors fails ("Failed to validate global plan ... invalid
fill": every rank claims the first shard). With ``--clear``, torch's
``torch.distributed.tensor.debug._clear_sharding_prop_cache()`` between the two runs avoids it
(what ``torchtitan_ext.tools.dry_run.forget_fake_meshes`` does). Exit status 1 if the output's
coordinate is wrong.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor


def op_output_coordinate() -> tuple[int, ...] | None:
    mesh = init_device_mesh("cpu", (int(os.environ["WORLD_SIZE"]),), mesh_dim_names=("dp",))
    x = distribute_tensor(torch.ones(8, 4), mesh, [Shard(0)], src_data_rank=None)
    y = x * 2  # sharding propagation (cached)
    assert isinstance(y, DTensor)
    return y.device_mesh.get_coordinate()


def main() -> int:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world = int(os.environ["WORLD_SIZE"])
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    op_output_coordinate()
    dist.destroy_process_group()
    if "--clear" in sys.argv:
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache

        _clear_sharding_prop_cache()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    got = op_output_coordinate()
    ok = got == (rank,)
    print(f"rank {rank}: op output's mesh coordinate {got}, expected ({rank},): "
          f"{'ok' if ok else 'WRONG (the fake mesh)'} (torch {torch.__version__})")  # fmt: skip
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    code = main()
    # Skip interpreter finalization, which can abort a gloo process whose work succeeded
    # (torchtitan_ext.distributed.exit_process explains why): the status stays the real one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
