"""End-to-end training under torchrun on real gloo ranks: parity of meshes against 1 rank, loss
falling on the real corpus, checkpoint resume (same mesh: exact; other meshes: fp32 noise),
tensorboard read-back, and the fail-fast path for bad recipes.

Launches are the expensive part on 2 cores, so the two reference runs are module fixtures that
several tests read.
"""

import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, read_metrics, tiny_run_args, torchrun, torchrun_many

STEPS = 20
INTERVAL = 5
# The type of each field of a "train" record of metrics.jsonl (counts are ints).
TRAIN_RECORD_TYPES = {
    "step": int, "seq_len": int, "tokens_seen": int, "skipped_steps": int,
    "loss": float, "grad_norm": float, "lr": float, "tokens_per_sec": float,
    "tflops": float, "peak_mem_mib": float, "step_mem_mib": float, "elapsed_sec": float,
}  # fmt: skip


def base_args(dump: Path, steps: int = STEPS) -> list[str]:
    return [
        *tiny_run_args(dump, steps, global_batch_size=8),
        *("--checkpoint.interval", str(INTERVAL), "--checkpoint.keep_latest_k", "2"),
    ]


@pytest.fixture(scope="module")
def run_4rank(tmp_path_factory) -> Path:
    dump = tmp_path_factory.mktemp("r4")
    torchrun(4, base_args(dump))  # FSDP over dp_shard 4, local batch 2, 1 microbatch
    return dump


Runs = dict[str, tuple[Path, subprocess.CompletedProcess[str]]]


@pytest.fixture(scope="module")
def four_rank_resumes(run_4rank, tmp_path_factory) -> Runs:
    """Three resumes of a copy of ``run_4rank`` stopped after step 15 (``_resume_copy``), in
    one 4-rank launch (``torchrun_many``): "same-mesh", "hsdp" (FSDP 4 -> HSDP 2 x 2) and
    "pp" (FSDP 4 -> pp 2 x dp_shard 2)."""
    tmp = tmp_path_factory.mktemp("resume4")
    meshes = {"same-mesh": [], "hsdp": HSDP, "pp": PP2_DP2}
    dumps = {name: _resume_copy(run_4rank, tmp / name) for name in meshes}
    procs = torchrun_many(4, [base_args(dumps[n]) + m for n, m in meshes.items()], check=False)
    return {name: (dumps[name], proc) for name, proc in zip(meshes, procs, strict=True)}


@pytest.fixture(scope="module")
def one_rank_runs(run_4rank, four_rank_resumes, tmp_path_factory) -> Runs:
    """The module's 1-rank runs, in one launch (``torchrun_many``): "reference", the run of
    ``base_args`` (local batch 2 x 4 microbatches = the same global batch of 8 sequences);
    "one-rank", a resume of a copy of ``run_4rank`` stopped after step 15 (world size 4 -> 1,
    no FSDP; global_batch_size = -1 would derive 2 x dp 1 sequences: the resume keeps the
    checkpoint's 8, 4 microbatches, and says so); "from_pp" and "from_fsdp", steps 21-22 from
    the step-20 checkpoint of the "pp" resume and of ``run_4rank``."""
    tmp = tmp_path_factory.mktemp("r1")
    dumps = {name: tmp / name for name in ("reference", "one-rank", "from_pp", "from_fsdp")}
    _resume_copy(run_4rank, dumps["one-rank"])
    for name, src in (("from_pp", four_rank_resumes["pp"][0]), ("from_fsdp", run_4rank)):
        shutil.copytree(src / "checkpoint", dumps[name] / "checkpoint")
    runs = {
        "reference": base_args(dumps["reference"]),
        "one-rank": [*base_args(dumps["one-rank"]), "--training.global_batch_size", "-1"],
        "from_pp": base_args(dumps["from_pp"], steps=STEPS + 2),
        "from_fsdp": base_args(dumps["from_fsdp"], steps=STEPS + 2),
    }
    procs = torchrun_many(1, list(runs.values()), check=False)
    return {name: (dumps[name], proc) for name, proc in zip(runs, procs, strict=True)}


def run_of(runs: Runs, name: str) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A run of ``four_rank_resumes`` or ``one_rank_runs``, which must have exited 0."""
    dump, proc = runs[name]
    assert proc.returncode == 0, (name, proc.stdout[-3000:], proc.stderr[-3000:])
    return dump, proc


@pytest.fixture(scope="module")
def run_1rank(one_rank_runs) -> Path:
    return run_of(one_rank_runs, "reference")[0]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def by_step(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {r["step"]: r for r in records}


def test_fsdp4_matches_single_rank(run_1rank, run_4rank):
    ref, fsdp = by_step(read_metrics(run_1rank)), by_step(read_metrics(run_4rank))
    assert sorted(ref) == sorted(fsdp) == list(range(1, STEPS + 1))
    # Step 1 is pure forward numerics: identical weights and batch, fp32.
    assert rel(fsdp[1]["loss"], ref[1]["loss"]) < 1e-5
    assert rel(fsdp[1]["grad_norm"], ref[1]["grad_norm"]) < 1e-5
    for step in ref:
        assert rel(fsdp[step]["loss"], ref[step]["loss"]) < 5e-4, step
        assert rel(fsdp[step]["grad_norm"], ref[step]["grad_norm"]) < 5e-4, step


def test_loss_falls_on_real_text(run_4rank):
    losses = [r["loss"] for r in read_metrics(run_4rank)]
    assert losses[0] > math.log(320) - 0.5  # near-uniform predictions over the vocab at init
    assert max(losses[-3:]) < 0.75 * losses[0]


def test_metrics_jsonl_and_tensorboard(run_4rank):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = read_metrics(run_4rank)
    # Every line has a kind (validation is off here: tests/test_curriculum.py checks the
    # "val" and "curriculum" records); counts are ints, measurements floats.
    lines = [json.loads(x) for x in (run_4rank / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["train"] * len(records)
    for key, typ in TRAIN_RECORD_TYPES.items():
        assert all(type(r[key]) is typ for r in records), key
    assert all(r["seq_len"] == 64 and r["tokens_per_sec"] > 0 for r in records)
    acc = EventAccumulator(str(run_4rank / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"loss", "grad_norm", "lr", "tokens_per_sec", "seq_len"}
    expected |= {"peak_mem_mib", "step_mem_mib"}  # the console's memory and step memory
    assert {f"train/{k}" for k in expected} <= tags
    assert all(t.startswith("train/") for t in tags), tags
    tb_loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(tb_loss) == [r["step"] for r in records]
    for r in records:
        assert tb_loss[r["step"]] == pytest.approx(r["loss"], rel=1e-6)


def test_checkpoints_keep_latest_k(run_4rank):
    folder = run_4rank / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == ["step-15", "step-20"]
    assert (folder / "step-20" / ".metadata").is_file()


def _resume_copy(src: Path, dst: Path) -> Path:
    """A copy of a finished run as if it had stopped right after the step-15 checkpoint, plus
    the debris a crash mid-save leaves behind."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoint" / "step-20")
    (dst / "metrics.jsonl").unlink()
    shutil.rmtree(dst / "tb")
    partial = dst / "checkpoint" / "step-17.tmp"  # crashed mid-save, never renamed
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"truncated")
    (dst / "checkpoint" / "step-18").mkdir()  # a folder without DCP metadata
    return dst


def test_resume_same_mesh_is_exact(run_4rank, four_rank_resumes):
    dump, proc = run_of(four_rank_resumes, "same-mesh")
    assert "resumed from" in proc.stdout and "step-15" in proc.stdout
    full, resumed = by_step(read_metrics(run_4rank)), by_step(read_metrics(dump))
    assert sorted(resumed) == list(range(16, STEPS + 1))
    for step, r in resumed.items():
        assert r["loss"] == full[step]["loss"], step
        assert r["grad_norm"] == full[step]["grad_norm"], step
    # The next save cleaned up the crashed one.
    assert not (dump / "checkpoint" / "step-17.tmp").exists()


HSDP = ["--parallelism.data_parallel_replicate_degree", "2"]


@pytest.mark.parametrize("name", ["one-rank", "hsdp"])
def test_resume_into_another_mesh(run_4rank, four_rank_resumes, one_rank_runs, name):
    """World size 4 -> 1 (no FSDP, the checkpoint's global batch kept) and FSDP 4 -> HSDP 2 x
    2 (``one_rank_runs``, ``four_rank_resumes``): the uninterrupted run's numbers."""
    dump, proc = run_of({**four_rank_resumes, **one_rank_runs}, name)
    if name == "one-rank":
        assert "kept the checkpoint's global batch of 8 sequences" in proc.stdout
        assert "4 microbatch(es) per step" in proc.stdout
    full, resumed = by_step(read_metrics(run_4rank)), by_step(read_metrics(dump))
    assert sorted(resumed) == list(range(16, STEPS + 1))
    for step, r in resumed.items():
        assert rel(r["loss"], full[step]["loss"]) < 5e-4, step
        assert rel(r["grad_norm"], full[step]["grad_norm"]) < 5e-4, step


PP2_DP2 = [
    "--parallelism.pipeline_parallel_degree",
    "2",
    "--parallelism.data_parallel_shard_degree",
    "2",
]


def test_pipeline_checkpoint_round_trip(run_4rank, four_rank_resumes, one_rank_runs):
    """FSDP 4 -> pp 2 x dp_shard 2 (1F1B, 2 stages of the 2-layer model) resumes at step 15 and
    matches the uninterrupted run; the step-20 checkpoint it writes from the pipeline mesh loads
    into 1 rank exactly like the FSDP one (steps 21-22 agree)."""
    pp, _ = run_of(four_rank_resumes, "pp")
    full, resumed = by_step(read_metrics(run_4rank)), by_step(read_metrics(pp))
    assert sorted(resumed) == list(range(16, STEPS + 1))
    for step, r in resumed.items():
        assert rel(r["loss"], full[step]["loss"]) < 5e-4, step
        assert rel(r["grad_norm"], full[step]["grad_norm"]) < 5e-4, step
    assert (pp / "checkpoint" / "step-20" / ".metadata").is_file()
    after = {name: by_step(read_metrics(run_of(one_rank_runs, name)[0]))
             for name in ("from_pp", "from_fsdp")}  # fmt: skip
    assert sorted(after["from_pp"]) == [21, 22]
    for step in (21, 22):
        for key in ("loss", "grad_norm"):
            assert rel(after["from_pp"][step][key], after["from_fsdp"][step][key]) < 5e-4


def test_bad_recipe_fails_fast_on_every_rank(tmp_path):
    bad = tmp_path / "bad.toml"
    recipe = (ROOT / "train_configs" / "debug_cpu.toml").read_text()
    bad.write_text(recipe.replace("seq_len = 256\n", 'seq_len = "abc"\n', 1))
    # A hang waiting for a collective would run into the subprocess timeout.
    proc = torchrun(4, ["--job.config_file", str(bad)], timeout=120, check=False)
    # The ranks exit 2, torchrun 1 (its status for any failed worker), as troubleshooting.md
    # says: the root cause of its summary is a rank that exited 2.
    assert proc.returncode == 1
    # Every rank detects the error on its own; torchrun stops the others as soon as the first
    # exits, so how many lines arrive depends on timing: at least one, all the same message.
    message = r"\[rank[0-3]\] config error: training\.seq_len = 'abc': expected an int\n"
    assert re.search(message, proc.stderr)
    assert len(re.findall(message, proc.stderr)) == proc.stderr.count("config error")
    # No worker prints a traceback; torchrun's launcher prints its own ChildFailedError summary
    # (one traceback of torch/distributed/run.py), which no worker can suppress, but the
    # summary at the very end shows the line (the worker's error file), not a link.
    summary = proc.stderr[proc.stderr.rindex("Root Cause") :]
    assert re.search(message, summary), summary
    assert re.search(r"exitcode\s*: 2 ", summary), summary
    output = proc.stdout + proc.stderr
    assert output.count("Traceback (most recent call last)") <= 1
    for ours in (ROOT / "train.py", ROOT / "torchtitan_ext"):
        assert f'File "{ours}' not in output  # no frame of our code anywhere


def test_step_that_stops_a_diverged_run_is_recorded_metrics_once(tmp_path):
    """The step whose non-finite gradient norm stops the run ("training diverged") has its
    record in metrics.jsonl, like every skipped step before it, each step once."""
    import subprocess
    import sys

    from torchtitan_ext.distributed import launch_env

    dump = tmp_path / "run"
    args = [*tiny_run_args(dump, 8, warmup_steps=1), "--optimizer.lr", "1e6"]
    args += ["--training.max_consecutive_nonfinite_steps", "1"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    found = re.search(
        r"training diverged: non-finite gradient norm at steps (\d+)-(\d+)", proc.stderr
    )
    assert found, proc.stderr[-2000:]
    first, stop = int(found[1]), int(found[2])
    records = read_metrics(dump)
    assert [r["step"] for r in records] == list(range(1, stop + 1))
    for r in records[first - 1 :]:  # the skipped steps: non-finite norm, counted
        assert not math.isfinite(r["grad_norm"]), r
        assert r["skipped_steps"] == r["step"] - first + 1, r


# One rank of a 2-rank gloo job in a fresh process. ``import torchtitan_ext`` applies
# use_single_worker_gloo; then, for each faked torch change, the binding is put back as torch
# left it, the change is faked and use_single_worker_gloo applied again. Each case creates a
# new gloo group and all-reduces on it; prints its worker threads and warnings as JSON.
_GLOO_RANK = r"""
import json, warnings
from datetime import timedelta
import torch
import torch.distributed as dist

gloo = torch._C._distributed_c10d.ProcessGroupGloo
torch_init, torch_device = gloo.__init__, gloo.create_default_device
torch_version = torch.__version__


def changed_init(self, store, rank, size, *, timeout=timedelta(minutes=30)):
    torch_init(self, store, rank, size, timeout)  # a binding taking the timeout by keyword only


def moved(*args, **kwargs):  # a binding changed behind the checks: building options fails
    raise AttributeError("create_default_device moved")


results = {}
for case in ("import", "version", "constructor", "options"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if case == "import":
            import torchtitan_ext
            from torchtitan_ext.distributed import exit_process, use_single_worker_gloo

            dist.init_process_group("gloo", timeout=timedelta(seconds=60))
        else:
            gloo.__init__ = torch_init
            if case == "version":
                torch.__version__ = "2.99.0+cpu"
            elif case == "constructor":
                gloo.__init__ = changed_init
            use_single_worker_gloo()
            if case == "options":
                gloo.create_default_device = moved
        group = dist.new_group([0, 1])
        x = torch.full((2,), float(dist.get_rank() + 1))
        dist.all_reduce(x, group=group)
    torch.__version__, gloo.create_default_device = torch_version, torch_device
    results[case] = {
        "threads": group._get_backend(torch.device("cpu")).options._threads,
        "sum": x.tolist(),
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
    }
print(json.dumps(results))
exit_process(0)
"""


def test_single_worker_gloo_only_where_checked_gloo_patch():
    """``use_single_worker_gloo`` gives gloo groups one worker thread on the checked torch
    series; on another series, with a changed constructor or with options that cannot be
    built, gloo groups are still created (with torch's threads) and a warning says the fix is
    off. 2 real processes create real gloo groups and all-reduce on each."""
    import subprocess
    import sys

    from tests.conftest import free_port
    from torchtitan_ext.distributed import launch_env

    env = {**launch_env(PYTHONPATH=str(ROOT)), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _GLOO_RANK],
            cwd=ROOT,
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    reasons = {
        "version": "checked on torch 2.13.x, found 2.99.0+cpu",
        "constructor": "ProcessGroupGloo's constructors are not",
        "options": "single-worker options failed (AttributeError: create_default_device moved)",
    }
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, (rank, out[-2000:], err[-2000:])
        results = json.loads(out.strip().splitlines()[-1])
        assert list(results) == ["import", *reasons], results
        for case, r in results.items():
            assert r["sum"] == [3.0, 3.0], (case, rank, r)  # the group works
            if case == "import":  # the checked torch: one worker thread, no warning
                assert (r["threads"], r["warnings"]) == (1, []), (case, rank, r)
                continue
            assert r["threads"] == 2, (case, rank, r)  # torch's default: the fix is off
            assert r["warnings"], (case, rank, r)
            assert all(reasons[case] in w for w in r["warnings"]), (case, rank, r)
