"""The two torch warnings every FSDP x TP run used to print once per rank, in process: what makes
them harmless here and that their filters (``torchtitan_ext.parallel.fsdp``) drop nothing else.

The numerical proof is the parity suite (``tests/test_parity.py``): for dp_shard2xtp2xcp2 (both
mesh orders) and the other FSDP x TP shapes, every parameter's step-1 gradient, the embedding's
included, equals the 1-rank run's and the gradient norm is the same on every rank.
"""

import logging
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from torchtitan_ext.parallel import fsdp

FSDP_STATE_MODULE = "torch.distributed.fsdp._fully_shard._fsdp_state"


@pytest.fixture
def fake_tp_mesh() -> Iterator[object]:
    """A 1-D "tp" mesh of 2 on torch's fake process group (collectives are no-ops)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from torchtitan_ext.tools.dry_run import forget_fake_meshes

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    finally:
        dist.destroy_process_group()
        forget_fake_meshes()


def _tp_embedding_output(mesh: object) -> torch.Tensor:
    """The output of an embedding sharded as ``apply_tp`` shards ``tok_embeddings``."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    emb = nn.Embedding(16, 8)
    style = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    parallelize_module(emb, mesh, style)  # type: ignore[arg-type]
    return emb(torch.randint(0, 16, (2, 4)))


def test_tp_embedding_output_is_a_view_torch_refuses_to_modify_in_place(
    fake_tp_mesh: object,
) -> None:
    """FSDP2 warns because the TP embedding's output is a view (``DTensor.to_local()``); its
    failure mode needs an in-place op on that view. Autograd refuses any (a view made by a
    custom Function), with or without grad mode, so the silent wrong gradient cannot happen."""
    h = _tp_embedding_output(fake_tp_mesh)
    assert h._base is not None and h.requires_grad  # what FSDP2's check sees
    with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
        h.mul_(1.0)
    h + 0  # an out-of-place op waits for the (fake) reduce-scatter, as the model's do
    h = _tp_embedding_output(fake_tp_mesh)
    with pytest.raises(RuntimeError, match=r"is a view and its base .* modified inplace"):
        with torch.no_grad():
            h.mul_(1.0)
        (h * 2).sum().backward()


def _fsdp_view_warning(module_names: str) -> str:
    return (
        f"FSDP2-wrapped module ({module_names}) returned a view tensor. An in-place op on this "
        "view (e.g., `x += y`) will silently drop the pre-backward hook and skip the "
        "all-gather, which can cause backward to fail or produce wrong gradients. Use "
        "out-of-place ops (`out = out + y`, not `out += y`) or `.clone()` the output before "
        "any in-place op."
    )


def test_fsdp_view_warning_filter_drops_only_the_embedding() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fsdp.quiet_proven_harmless_warnings()
        for names, module in (
            ("FSDPEmbedding", FSDP_STATE_MODULE),  # dropped
            ("FSDPLinear", FSDP_STATE_MODULE),
            ("FSDPRMSNorm, FSDPLinear", FSDP_STATE_MODULE),
            ("FSDPEmbedding", "my_model"),
        ):
            warnings.warn_explicit(
                _fsdp_view_warning(names), UserWarning, "_fsdp_state.py", 331, module=module
            )
    shown = [str(w.message).split(")")[0] for w in caught]
    assert shown == [
        "FSDP2-wrapped module (FSDPLinear",
        "FSDP2-wrapped module (FSDPRMSNorm, FSDPLinear",
        "FSDP2-wrapped module (FSDPEmbedding",
    ]


class _Mesh:
    """What torch's warning reads of a DeviceMesh: a hash and the dim names."""

    def __init__(self, *names: str) -> None:
        self.mesh_dim_names = names


def test_redistribute_warning_filter_drops_only_the_fsdp_tp_grad_norm() -> None:
    """Through torch's own warning function, so a change of its wording fails here."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._ops._math_ops import _NormPartial
    from torch.distributed.tensor._redistribute import _warn_flatten_optimization_not_possible

    logger = logging.getLogger(fsdp.REDISTRIBUTE_LOGGER)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger.addHandler(handler)
    filters = list(logger.filters)  # restored after; without this package's first
    logger.filters[:] = [f for f in filters if not isinstance(f, fsdp.DropGradNormWarning)]
    try:
        fsdp.quiet_proven_harmless_warnings()
        fsdp.quiet_proven_harmless_warnings()  # idempotent: one filter
        assert sum(isinstance(f, fsdp.DropGradNormWarning) for f in logger.filters) == 1
        norm, r = _NormPartial(2.0), Replicate()
        cases = [
            (_Mesh("fsdp", "tp"), (norm, norm), (r, r), "all_reduce"),  # dropped
            (_Mesh("dp_shard", "cp"), (norm, norm), (r, r), "all_reduce"),
            (_Mesh("fsdp", "tp"), (_NormPartial(1.0),) * 2, (r, r), "all_reduce"),
            (_Mesh("fsdp", "tp"), (Shard(0), Shard(0)), (r, r), "all_gather"),
        ]
        for mesh, src, dst, comm in cases:
            _warn_flatten_optimization_not_possible(
                mesh,  # type: ignore[arg-type]
                (0, 1),
                src,
                dst,
                2,
                comm,
                "no_flattened_mesh",
            )
    finally:
        logger.removeHandler(handler)
        logger.filters[:] = filters
    shown = [rec.getMessage() for rec in records]
    assert len(shown) == 3, shown
    assert '["dp_shard", "cp"]' in shown[0]
    assert "_NormPartial(1.0)" in shown[1]
    assert "all_gather" in shown[2]
