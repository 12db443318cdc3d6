"""Hugging Face checkpoints in and out on 8-rank meshes (too slow for the test suite on 2 cores;
``tests/test_hf_checkpoint.py`` runs 1 rank and dp_shard 2 x tp 2).

For each mesh: a tiny random Llama made and saved by ``transformers`` (the
``debugmodel_cpu_tiny`` shape, byte vocabulary) is loaded with ``checkpoint.initial_load_in_hf``
into a 1-step run with LR 1e-30 (Adam's update is below fp32 resolution: the weights stay
bitwise the same) and ``checkpoint.last_save_in_hf``. Checked, as in the tests: the step-1
loss equals transformers' on the same batch (1e-5 relative), the export holds the source's
tensors bit for bit, and transformers loads the export with the same loss.

    PYTHONPATH=$PWD .venv/bin/python scripts/check_hf_checkpoint.py \\
        [--meshes pp2.dp2.tp2,dp2.tp2.cp2,pp2.tp2.cp2] [--timeout 900]

A mesh is ``pp<k>.dp<k>.tp<k>.cp<k>`` (dp: dp_shard; a degree left out is 1); the ranks are
their product. Prints one line per mesh (losses, relative differences, seconds) and exits 1
if any check fails. Needs transformers (the dev extra).
"""

import argparse
import math
import re
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import read_metrics, torchrun
from tests.test_hf_checkpoint import (
    assert_export_equals_source,
    hf_args,
    hf_loss,
    rel,
    save_hf_llama,
    step1_batch,
)

_KEYS = {
    "pp": "--parallelism.pipeline_parallel_degree",
    "dp": "--parallelism.data_parallel_shard_degree",
    "tp": "--parallelism.tensor_parallel_degree",
    "cp": "--parallelism.context_parallel_degree",
}
GLOBAL_BATCH = 4


def mesh_args(mesh: str) -> tuple[int, list[str]]:
    """(ranks, CLI overrides) of a mesh spelled ``pp2.dp2.tp2``.

    Raises:
        ValueError: a part that is not ``<pp|dp|tp|cp><degree>``.
    """
    degrees = {k: 1 for k in _KEYS}
    for part in mesh.split("."):
        m = re.fullmatch(r"(pp|dp|tp|cp)(\d+)", part)
        if m is None:
            raise ValueError(f"mesh part {part!r}: expected pp<k>, dp<k>, tp<k> or cp<k>")
        degrees[m.group(1)] = int(m.group(2))
    args = [x for k, d in degrees.items() for x in (_KEYS[k], str(d))]
    return math.prod(degrees.values()), args


def check(mesh: str, root: Path, src: Path, timeout: float) -> bool:
    """Run one mesh and print its line; True when every check holds."""
    ranks, overrides = mesh_args(mesh)
    dump = root / mesh
    started = time.perf_counter()
    torchrun(ranks, [*hf_args(dump, src, GLOBAL_BATCH), *overrides], timeout=timeout)
    seconds = time.perf_counter() - started
    inputs, labels = step1_batch(GLOBAL_BATCH)
    (record,) = read_metrics(dump)
    theirs = hf_loss(src, inputs, labels)
    export = dump / "checkpoint" / "step-1"
    reloaded = hf_loss(export, inputs, labels)
    try:
        assert_export_equals_source(export, src)
        same = "bitwise equal"
    except AssertionError as e:
        same = f"DIFFERENT ({e})"
    ok = rel(record["loss"], theirs) < 1e-5 and rel(reloaded, record["loss"]) < 1e-5
    ok = ok and same == "bitwise equal"
    print(
        f"{mesh} ({ranks} ranks, {seconds:.0f} s): loss {record['loss']:.7f}, transformers "
        f"{theirs:.7f} (rel {rel(record['loss'], theirs):.1e}); export {same}, reloaded loss "
        f"{reloaded:.7f} (rel {rel(reloaded, record['loss']):.1e}): {'ok' if ok else 'FAILED'}",
        flush=True,
    )
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--meshes", default="pp2.dp2.tp2,dp2.tp2.cp2,pp2.tp2.cp2")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run (default 900)")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="check_hf_"))
    src = save_hf_llama(root / "hf_src")
    results = [check(mesh, root, src, a.timeout) for mesh in a.meshes.split(",")]
    print(f"outputs in {root}")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
