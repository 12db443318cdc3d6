"""The trainer against an independent loop: a 1-rank ``train.py`` run and a plain PyTorch loop
over TorchTitan's unmodified Llama 3 (``torchtitan_ext.tools.reference_loop``) take the same
steps. The parity matrix compares meshes of our own trainer with each other, so a bug in loss
scaling, gradient accumulation, clipping or the optimizer wiring that every mesh shares would
pass it; here it fails."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from torchtitan_ext.config import load_config
from torchtitan_ext.distributed import launch_env
from torchtitan_ext.metrics import read_metrics
from torchtitan_ext.tools.parity import (
    GRAD_RTOL,
    GRADS_FILE,
    Shape,
    base_args,
    grad_deviation,
    shape_run_args,
)
from torchtitan_ext.tools.reference_loop import reference_loop

STEPS = 3
GLOBAL_BATCH = 8


LOCAL_BATCHES = (8, 2)  # one microbatch; 4 accumulated microbatches


def trainer_args(out: Path, local_batch: int) -> list[str]:
    base = base_args(GLOBAL_BATCH, STEPS, "debugmodel_cpu_deep_gqa", seq_len=128)
    return [
        *shape_run_args(Shape({}), base, out / f"local{local_batch}", GLOBAL_BATCH),
        "--training.local_batch_size", str(local_batch),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trainer (1 rank, plain python) at each of ``LOCAL_BATCHES``, with its step-1
    gradients recorded as the parity matrix records them: both runs in one process (the
    parity worker takes a JSON list of argument lists). Returns their folder; each test checks
    the process exited 0 (``<out>/worker.log`` otherwise)."""
    out = tmp_path_factory.mktemp("reference_loop")
    payload = out / "args.json"
    payload.write_text(json.dumps([trainer_args(out, b) for b in LOCAL_BATCHES]))
    proc = subprocess.run(
        [sys.executable, "-m", "torchtitan_ext.tools.parity", "--worker", str(payload)],
        cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (out / "worker.log").write_text(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return out


@pytest.mark.parametrize("local_batch", LOCAL_BATCHES)
def test_trainer_matches_an_independent_loop(
    trainer_runs: Path, tmp_path: Path, local_batch: int
) -> None:
    """Losses of every step (bitwise with one microbatch per step, within 1e-6 relative with
    accumulation), and every parameter's step-1 gradient (after clipping) within
    ``GRAD_RTOL`` of its largest element, with grouped-query attention
    (``debugmodel_cpu_deep_gqa``)."""
    log = (trainer_runs / "worker.log").read_text()
    assert log.startswith("exit 0\n"), log[-6000:]
    args = trainer_args(trainer_runs, local_batch)
    dump = trainer_runs / f"local{local_batch}" / "single"
    trainer_losses = [float(r["loss"]) for r in sorted(read_metrics(dump), key=lambda r: r["step"])]

    ref = reference_loop(load_config(args), STEPS, record_step1_grads=True)
    ref_dump = tmp_path / "reference"
    ref_dump.mkdir()
    assert ref.grad_norm is not None
    torch.save({"grads": ref.grads, "grad_norms": ref.grad_norm.reshape(1)}, ref_dump / GRADS_FILE)

    assert len(trainer_losses) == STEPS
    if local_batch == GLOBAL_BATCH:  # one microbatch: the same float32 operations
        assert trainer_losses == ref.losses
    else:  # the trainer adds microbatch losses in float32, the loop in Python floats
        assert trainer_losses == pytest.approx(ref.losses, rel=1e-6)
    deviation, why = grad_deviation(dump, ref_dump)
    assert why == ""
    assert deviation <= GRAD_RTOL, deviation
