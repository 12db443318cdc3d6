"""Mesh parity: every parallelism, alone and composed, trains the same model as 1 rank with the
same global batch (fp32, real gloo ranks under torchrun). Step 1 within 1e-5 relative, steps
1-3 within 5e-4 (two optimizer updates in; scripts/parity_matrix.py runs 5 steps), for the loss
and the gradient norm; the validation loss within 5e-4; every parameter's step-1 gradient
element by element within 1e-5 of its largest element, and the step-1 gradient norm bitwise the
same on all ranks; every parameter after the last step within 1e-4 (its relative norm
deviation), which also covers the V schedules that do not validate.

The model is ``debugmodel_cpu_deep_gqa`` (grouped-query attention: 8 query heads, 2 kv heads).
Shapes with the same number of ranks share one launch (``torchtitan_ext.tools.parity``'s
worker): four launches in all (1, 2, 4, 8 ranks), which tests/test_block_causal_parity.py's
shapes share too (``tools.parity.run_matrices``). The full matrix (every factorization of 8
ranks and a 16-rank 4D shape) is ``scripts/parity_matrix.py``.
"""

import re
import shutil
from pathlib import Path

import pytest

from torchtitan_ext.parallel.fsdp import GRAD_NORM_REDISTRIBUTE_WARNING
from torchtitan_ext.tools.parity import (
    GRAD_RTOL,
    STEP1_RTOL,
    Matrix,
    Result,
    parse_shape,
    run_matrix,
)

SHAPES = [
    # 2 ranks: each parallelism alone, and the long-context memory features: chunked
    # cross-entropy (vocab-parallel under TP) and tiled MLP (one reduce-scatter of the tiles'
    # partial sums under TP).
    "cp2",
    "tp2",
    "pp2",  # 1F1B
    "tp2+chunkloss+tiledmlp",
    # 4 ranks: pairs.
    "dp_shard2xtp2",
    "dp_replicate2xcp2",  # HSDP: replicas of FSDP over cp
    "pp2xcp2+ulysses",  # PP, FSDP over cp, Ulysses
    # 8 ranks: cp innermost with TP and FSDP, and hybrid CP with TP.
    "dp_shard2xtp2xcp2",
    "tp2xcp4+hybrid2",  # Ulysses over 2 of the 4 cp ranks (heads 8 / tp 2 / 2), ring over 2
]
"""The default suite's shapes: each parallelism, and cp with each of FSDP, HSDP, TP and PP."""

EXTENDED_SHAPES = [
    # The pipeline schedules of each kind (GPipe and LoopedBFS run in
    # scripts/parity_matrix.py, with every 8-rank cp x tp shape).
    "pp2@InterleavedZeroBubble",
    "pp2@ZBVZeroBubble",
    "pp2@DualPipeV",
    "dp_shard2xcp2+alltoall+nolb",
    "pp2xdp_shard2@Interleaved1F1B",
    "dp_shard2xcp2+chunkloss+tiledmlp",  # FSDP gathers each weight once for all chunks
    "dp_shard2xtp2xcp2+tpinner",  # tp innermost (TorchTitan's order)
    "pp2xcp4+dring2",  # inner rings of 2 inside an outer ring of 2
    "pp2xtp2xcp2+chunkloss+tiledmlp+fullac",  # last stage; TP, CP, FSDP over cp, full AC
]
"""``pytest -m slow``: the rest of the matrix the suite used to run (and scripts/parity_matrix.py
runs every factorization of 8 ranks)."""

# 3 steps, not the matrix script's 5: the suite's time, with the updates of steps 1 and 2 still
# compared after they are applied. The GQA twin of the matrix's flavor (8 query heads, 2 kv
# heads): every shape also checks grouped-query attention, and tp2xcp4+hybrid2 the Ulysses K/V
# replication (1 kv head per tp rank, Ulysses degree 2).
FLAVOR = "debugmodel_cpu_deep_gqa"


def matrix(out: Path) -> Matrix:
    """The default suite's matrix, run in the launches it shares with
    tests/test_block_causal_parity.py's (``parity_matrices`` in conftest.py)."""
    return Matrix([parse_shape(n) for n in SHAPES], out, FLAVOR, steps=3)


@pytest.fixture(scope="module")
def parity_out(parity_matrices: dict[str, tuple[Matrix, dict[str, Result]]]) -> Path:
    return parity_matrices["causal"][0].out


@pytest.fixture(scope="module")
def results(parity_matrices: dict[str, tuple[Matrix, dict[str, Result]]]) -> dict[str, Result]:
    return parity_matrices["causal"][1]


@pytest.fixture(scope="module")
def extended_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    shapes = [parse_shape(n) for n in EXTENDED_SHAPES]
    out = tmp_path_factory.mktemp("parity_extended")
    return {r.shape: r for r in run_matrix(shapes, out, steps=3, flavor=FLAVOR)}


def _check(r: Result) -> None:
    assert r.status == "PASS", r
    assert r.step1_dev <= STEP1_RTOL
    assert r.grad_dev <= GRAD_RTOL


@pytest.mark.parametrize("shape", SHAPES)
def test_mesh_matches_single_rank(results: dict[str, Result], shape: str) -> None:
    """Also the proof that two torch warnings of FSDP x TP runs are harmless here (silenced by
    ``torchtitan_ext.parallel.fsdp.quiet_proven_harmless_warnings``): with the TP embedding's
    output a view (FSDP2's "returned a view tensor"), the embedding's gradient is still the
    1-rank one, like every parameter's; with the grad norm reduced by one all-reduce per mesh
    dim (DTensor's "2 sequential all_reduce"), it is still the 1-rank norm on every rank."""
    _check(results[shape])


@pytest.mark.slow
@pytest.mark.parametrize("shape", EXTENDED_SHAPES)
def test_extended_mesh_matches_single_rank(extended_results: dict[str, Result], shape: str) -> None:
    _check(extended_results[shape])


def test_fsdp_tp_runs_print_neither_silenced_warning(
    results: dict[str, Result], parity_out: Path
) -> None:
    """No launch logged either warning, the 4- and 8-rank ones that ran FSDP x TP included."""
    logs = {p.name: p.read_text() for p in sorted(parity_out.glob("launch-*.log"))}
    fsdp_tp = re.compile(r"dp_shard 2 x (cp 2 x )?tp 2")  # the model line's mesh
    assert sum(bool(fsdp_tp.search(text)) for text in logs.values()) >= 2, list(logs)
    grad_norm = re.compile(GRAD_NORM_REDISTRIBUTE_WARNING.rstrip("$"), re.MULTILINE)
    for log, text in logs.items():
        assert "(FSDPEmbedding) returned a view tensor" not in text, log
        assert not grad_norm.search(text), log


def test_parity_check_can_fail(tmp_path: Path) -> None:
    """The comparison flags losses that differ by more than the tolerance (and passes equal
    ones), a parameter's gradient that differs where the losses and norms do not (the
    embedding's rows swapped), a grad norm that differs between ranks, missing gradients, a
    parameter that ended elsewhere after the last step, and a CP-pattern shape whose pattern
    never ran (torch's ring instead, numerically right too),
    so a PASS above means something."""
    import torch

    from torchtitan_ext.tools.parity import (
        GRADS_FILE,
        PARAMS_FILE,
        PATTERN_CALLS_FILE,
        Shape,
        compare,
    )

    emb = torch.arange(12.0).reshape(4, 3) / 10
    swapped = emb[[1, 0, 2, 3]]
    for name, lr, emb_grad, norms in (
        ("single", "3e-3", emb, [1.5]),
        ("other", "2e-3", emb, [1.5, 1.5]),
        ("swapped", "3e-3", swapped, [1.5, 1.5]),
        ("ranks", "3e-3", emb, [1.5, 1.5000001]),
        ("nograds", "3e-3", None, None),
    ):
        dump = tmp_path / name
        dump.mkdir()
        lines = [
            f'{{"kind": "train", "step": {s}, "loss": {6.0 - s * float(lr) * 100}, '
            '"grad_norm": 1.5}'
            for s in (1, 2)
        ]
        lines.append('{"kind": "val", "step": 2, "loss": 5.0}')
        (dump / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        if emb_grad is not None:
            grads = {"tok_embeddings.weight": emb_grad, "norm.weight": torch.ones(3)}
            torch.save({"grads": grads, "grad_norms": torch.tensor(norms)}, dump / GRADS_FILE)
        (dump / PATTERN_CALLS_FILE).write_text("{}")  # no pattern ran: right for the ring
        torch.save({"tok_embeddings.weight": emb, "norm.weight": torch.ones(3)}, dump / PARAMS_FILE)
    res = compare(Shape({"tp": 2}), tmp_path / "other", tmp_path / "single")
    assert res.status == "FAIL" and res.loss_dev > 1e-3
    same = compare(Shape({"tp": 2}), tmp_path / "single", tmp_path / "single")
    assert same.status == "PASS" and same.loss_dev == 0.0 and same.grad_dev == 0.0
    swap = compare(Shape({"tp": 2}), tmp_path / "swapped", tmp_path / "single")
    assert swap.status == "FAIL" and swap.loss_dev == 0.0 and swap.grad_dev > 0.1
    ranks = compare(Shape({"tp": 2}), tmp_path / "ranks", tmp_path / "single")
    assert ranks.status == "FAIL" and "differs between ranks" in ranks.detail
    missing = compare(Shape({"tp": 2}), tmp_path / "nograds", tmp_path / "single")
    assert missing.status == "FAIL" and "no step-1 gradients" in missing.detail
    # The same losses, norms and step-1 gradients, but one parameter ended elsewhere (a shard
    # updated wrongly after step 1).
    drifted = tmp_path / "drifted"
    shutil.copytree(tmp_path / "single", drifted)
    torch.save({"tok_embeddings.weight": emb, "norm.weight": torch.ones(3) * 1.01},
               drifted / PARAMS_FILE)  # fmt: skip
    drift = compare(Shape({"tp": 2}), drifted, tmp_path / "single")
    assert drift.status == "FAIL" and drift.loss_dev == 0.0 and drift.grad_dev == 0.0
    assert drift.param_dev == pytest.approx(0.01, rel=1e-3)
    assert same.param_dev == 0.0
    ulysses = Shape({"cp": 2}, options=("ulysses",))
    fell_back = compare(ulysses, tmp_path / "single", tmp_path / "single")
    assert fell_back.status == "FAIL" and "ulysses never ran" in fell_back.detail
    (tmp_path / "other" / PATTERN_CALLS_FILE).write_text('{"ulysses": 6, "ulysses_backward": 6}')
    ran = compare(ulysses, tmp_path / "other", tmp_path / "other")
    assert ran.status == "PASS", ran
    ring = compare(Shape({"cp": 2}), tmp_path / "other", tmp_path / "other")
    assert ring.status == "FAIL" and "other CP patterns ran" in ring.detail


def test_native_crash_is_told_apart_from_python_errors() -> None:
    import subprocess

    from torchtitan_ext.tools.parity import native_crash

    def proc(err: str) -> "subprocess.CompletedProcess[str]":
        return subprocess.CompletedProcess(["x"], 1, stdout="", stderr=err)

    assert native_crash(proc("[rank0] step 3\nmalloc(): unaligned tcache chunk detected\n"))
    assert native_crash(proc("terminate called without an active exception\n"))
    assert native_crash(proc("[rank1]: RuntimeError: shapes do not match\n")) is None
