"""Mesh parity: context parallel and tensor parallel meshes train the same model as 1 rank with
the same global batch (fp32, real gloo ranks under torchrun). Step 1 within 1e-5 relative,
steps 1-5 within 5e-4, for the loss and the gradient norm."""

from pathlib import Path

import pytest

from tests.conftest import read_metrics, tiny_run_args, torchrun, train_single

STEPS = 5
DP_SHARD2 = ("--parallelism.data_parallel_shard_degree", "2")
CP2 = ("--parallelism.context_parallel_degree", "2")
TP2 = ("--parallelism.tensor_parallel_degree", "2")
TP_INNERMOST = ("--parallelism.mesh_dim_order", "pp,dp_replicate,dp_shard,cp,tp")
DP2_CP2_ALLTOALL_NO_LB = (
    "--parallelism.data_parallel_shard_degree", "2",
    "--parallelism.context_parallel_degree", "2",
    "--parallelism.context_parallel_rotate_method", "alltoall",
    "--parallelism.context_parallel_load_balancer", "None",
)  # fmt: skip


def args(dump: Path) -> list[str]:
    return [
        *tiny_run_args(dump, STEPS, seq_len=128, global_batch_size=4, warmup_steps=2),
        *("--metrics.no-enable-tensorboard", "--checkpoint.no-enable"),
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    dump = tmp_path_factory.mktemp("ref")
    train_single(args(dump))
    return read_metrics(dump)


@pytest.mark.parametrize(
    ("nproc", "mesh"),
    [
        (2, ["--parallelism.context_parallel_degree", "2"]),
        (4, ["--parallelism.context_parallel_degree", "4"]),
        (4, [*DP2_CP2_ALLTOALL_NO_LB]),
        (2, ["--parallelism.tensor_parallel_degree", "2"]),
        (2, ["--parallelism.tensor_parallel_degree", "2", "--parallelism.disable_loss_parallel"]),
        (4, [*DP_SHARD2, *TP2]),
        (4, [*CP2, *TP2, *TP_INNERMOST]),
    ],
    ids=[
        "cp2", "cp4", "dp_shard2-cp2-alltoall-nolb", "tp2", "tp2-no-loss-parallel",
        "dp_shard2-tp2", "cp2-tp2",
    ],
)  # fmt: skip
def test_mesh_matches_single_rank(reference, tmp_path, nproc, mesh):
    torchrun(nproc, args(tmp_path) + mesh)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for got, ref in zip(records, reference, strict=True):
        tol = 1e-5 if got["step"] == 1 else 5e-4
        assert got["loss"] == pytest.approx(ref["loss"], rel=tol), got["step"]
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=tol), got["step"]
