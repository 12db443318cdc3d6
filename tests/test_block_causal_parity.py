"""Document-masked training parity: with ``model.attn_mask_type = "block_causal"`` every CP
pattern, load balancer and composition with dp_shard, dp_replicate, tp and pp trains the same
model as 1 rank with the same mask (fp32, real gloo ranks under torchrun), on a corpus of short
documents so that every window holds several: the losses, grad norms, validation loss, every
parameter's step-1 gradient and the parameters after the last step, with the tolerances of
``test_parity``; and the block-causal attention of the shape's pattern is what ran
(``pattern_calls_problem``). One 1-rank reference, 4-rank and 8-rank shapes, each group run in
the launch of tests/test_parity.py's shapes of the same rank count (``tools.parity.run_matrices``,
the worker of ``torchtitan_ext.tools.parity`` with ``BLOCK_CAUSAL``); the other patterns and
HSDP run with ``pytest -m slow``.
"""

import json
import random
from pathlib import Path

import pytest

from tests.conftest import read_metrics
from torchtitan_ext.tools.parity import BLOCK_CAUSAL, Matrix, Result, parse_shape, run_matrix

SHAPES = [
    "cp4",  # the ring, head-tail (the recipe's balancer)
    "cp4+ulysses+pdht",  # per-document head-tail
    "pp2xcp2+lpt",  # per-document LPT; the mask split into pipeline microbatches
    "dp_shard2xtp2xcp2+ptrr",  # PTRR
]
"""The default suite's shapes (in the 4-rank and the 8-rank launch)."""

EXTENDED_SHAPES = [
    "cp4+hybrid2+ptrr",
    "cp4+dring2+nolb",  # no load balancing
    "dp_replicate2xcp2+pdht",
]
"""``pytest -m slow``: the other patterns and HSDP."""


def matrix(out: Path) -> Matrix:
    """The default suite's matrix, run in the launches it shares with tests/test_parity.py's
    (``parity_matrices`` in conftest.py)."""
    out.mkdir(parents=True, exist_ok=True)
    data = ["--training.dataset_path", str(short_documents(out / "short_documents.jsonl"))]
    return Matrix([parse_shape(n) for n in SHAPES], out, FLAVOR, BLOCK_CAUSAL + data, steps=3)


@pytest.fixture(scope="module")
def out(parity_matrices: dict[str, tuple[Matrix, dict[str, Result]]]) -> Path:
    return parity_matrices["block_causal"][0].out


def short_documents(path: Path) -> Path:
    """A corpus of short documents (10 to 120 bytes; about 2 to 8 end in every 128-token
    window), so that the mask cuts every window: the default corpus's files are long."""
    rng = random.Random(0)
    words = ["def", "return", "class", "x", "import", "lambda", "yield", "self", "(", ")"]
    with open(path, "w") as f:
        for _ in range(4000):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))
            f.write(json.dumps({"text": text}) + "\n")
    return path


FLAVOR = "debugmodel_cpu_deep_gqa"


def _run(shapes: list[str], out: Path) -> dict[str, Result]:
    data = ["--training.dataset_path", str(short_documents(out / "short_documents.jsonl"))]
    runs = run_matrix(
        [parse_shape(n) for n in shapes], out, steps=3, flavor=FLAVOR, extra=BLOCK_CAUSAL + data
    )
    return {r.shape: r for r in runs}


@pytest.fixture(scope="module")
def results(parity_matrices: dict[str, tuple[Matrix, dict[str, Result]]]) -> dict[str, Result]:
    return parity_matrices["block_causal"][1]


@pytest.fixture(scope="module")
def extended_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    return _run(EXTENDED_SHAPES, tmp_path_factory.mktemp("parity_block_causal_extended"))


@pytest.mark.slow
@pytest.mark.parametrize("shape", EXTENDED_SHAPES)
def test_block_causal_extended_mesh_matches_single_rank(
    extended_results: dict[str, Result], shape: str
) -> None:
    assert extended_results[shape].status == "PASS", extended_results[shape]


@pytest.mark.parametrize("shape", SHAPES)
def test_block_causal_mesh_matches_single_rank(
    results: dict[str, Result], out: Path, shape: str
) -> None:
    r = results[shape]
    assert r.status == "PASS", r
    # The trainer measured its cp ranks' masked work for the log; the documents make it
    # uneven under torch's head-tail layout (which balances a causal mask only).
    records = read_metrics(out / shape)
    assert records and all("attn_work_max_over_min" in rec for rec in records), records[:1]
    if shape == "cp4":
        assert min(rec["attn_work_max_over_min"] for rec in records) > 1.02, records
    if shape.endswith("+lpt"):  # even within its aim (1.02), up to rounding
        assert max(rec["attn_work_max_over_min"] for rec in records) <= 1.03, records
