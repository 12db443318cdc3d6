"""Document-masked training parity: with ``model.attn_mask_type = "block_causal"`` every CP
pattern, load balancer and composition with dp_shard, dp_replicate, tp and pp trains the same
model as 1 rank with the same mask (fp32, real gloo ranks under torchrun): the losses, grad
norms, validation loss, every parameter's step-1 gradient and the parameters after the last
step, with the tolerances of ``test_parity``; and the block-causal attention of the shape's
pattern is what ran (``pattern_calls_problem``). One 1-rank reference, one 4-rank launch, one
8-rank launch (``torchtitan_ext.tools.parity.run_matrix`` with ``BLOCK_CAUSAL``).
"""

from pathlib import Path

import pytest

from tests.conftest import read_metrics
from torchtitan_ext.tools.parity import BLOCK_CAUSAL, Result, parse_shape, run_matrix

SHAPES = [
    "cp4",  # the ring, head-tail (the recipe's balancer)
    "cp4+ulysses+pdht",  # per-document head-tail
    "cp4+hybrid2+ptrr",  # PTRR
    "cp4+dring2+nolb",  # no load balancing
    "pp2xcp2+ptrr",  # the mask split into pipeline microbatches
    "dp_replicate2xcp2+pdht",
    "dp_shard2xtp2xcp2+ptrr",
]


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("parity_block_causal")


@pytest.fixture(scope="module")
def results(out: Path) -> dict[str, Result]:
    shapes = [parse_shape(n) for n in SHAPES]
    runs = run_matrix(shapes, out, steps=3, flavor="debugmodel_cpu_deep_gqa", extra=BLOCK_CAUSAL)
    return {r.shape: r for r in runs}


@pytest.mark.parametrize("shape", SHAPES)
def test_block_causal_mesh_matches_single_rank(
    results: dict[str, Result], out: Path, shape: str
) -> None:
    r = results[shape]
    assert r.status == "PASS", r
    # The trainer measured its cp ranks' masked work for the log.
    records = read_metrics(out / shape)
    assert records and all("attn_work_max_over_min" in rec for rec in records), records[:1]
