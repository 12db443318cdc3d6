"""What happens when things fail, on real gloo ranks under torchrun: a diverging run, a frozen
rank, corrupt checkpoints, a resume on another data-parallel degree, and metrics after a
resume. Each test injects the fault a user would meet and checks that the newest good
checkpoint survives and the run resumes to the numbers of an uninterrupted run.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import (
    ROOT,
    free_port,
    read_metrics,
    tiny_run_args,
    torchrun,
    torchrun_many,
)
from torchtitan_ext.distributed import launch_env


def ckpt_args(dump: Path, steps: int, interval: int, keep: int = 0) -> list[str]:
    return [
        *tiny_run_args(dump, steps, global_batch_size=4, warmup_steps=2),
        *("--checkpoint.interval", str(interval), "--checkpoint.keep_latest_k", str(keep)),
    ]


def steps_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def losses(dump: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(dump)}


def corrupt_args(dump: Path) -> list[str]:
    return [*ckpt_args(dump, 12, interval=2), "--metrics.enable_tensorboard"]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory) -> SimpleNamespace:
    """The 2-rank runs of the divergence and corrupt-checkpoint tests, their launches shared:
    the two reference runs in one (``torchrun_many``); the diverging run alone (a real
    torchrun, whose failure is what the divergence test checks; the folder's checkpoints and
    metrics as it left them are kept for the test); then the rerun after the divergence and
    the resume past the corrupt checkpoints in one."""
    tmp = tmp_path_factory.mktemp("failures")
    ref, dump = tmp / "divergence-ref", tmp / "divergence"  # ref: the run that never diverges
    corrupt_ref, corrupt_dump = tmp / "corrupt-ref", tmp / "corrupt"
    torchrun_many(2, [ckpt_args(ref, 6, interval=3, keep=2), corrupt_args(corrupt_ref)])

    shutil.copytree(ref / "checkpoint" / "step-3", dump / "checkpoint" / "step-3")
    diverging = torchrun(
        2, [*ckpt_args(dump, 12, interval=1, keep=1), "--optimizer.lr", "1e30"], check=False
    )
    diverged_checkpoints = steps_in(dump / "checkpoint")
    diverged = read_metrics(dump)

    shutil.copytree(corrupt_ref, corrupt_dump)
    for step, (kind, _) in CORRUPTIONS.items():
        corrupt(corrupt_dump / "checkpoint" / f"step-{step}", kind)
    with open(corrupt_dump / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "lo')  # torn by a kill
    # The rerun at the recipe's LR, and the resume past the corrupt checkpoints.
    rerun, resumed = torchrun_many(
        2, [ckpt_args(dump, 6, interval=3, keep=1), corrupt_args(corrupt_dump)], check=False
    )
    return SimpleNamespace(
        ref=ref, dump=dump, diverging=diverging, diverged_checkpoints=diverged_checkpoints,
        diverged=diverged, rerun=rerun, corrupt_ref=corrupt_ref, corrupt_dump=corrupt_dump,
        resumed=resumed,
    )  # fmt: skip


def test_divergence_keeps_the_newest_good_checkpoint(two_rank_runs):
    """lr 1e30 after a sane start, a checkpoint every step, keep_latest_k = 1: step 4 applies
    the LR (huge but finite weights, checkpointed) and step 5's gradient norm is NaN. The
    non-finite steps are skipped and the run stops with one line per rank naming step-3 as
    the newest good checkpoint: step-4, whose weights gave the NaN, is set aside as
    step-4.suspect (kept, never resumed from), and keep_latest_k did not delete step-3 for it
    (it waits for the next step's finite gradient norm). A rerun at the sane LR resumes from
    step-3 to exactly the losses of a run that never diverged (``two_rank_runs``)."""
    runs = two_rank_runs
    dump, ref, proc = runs.dump, runs.ref, runs.diverging
    assert proc.returncode != 0
    line = r"\[rank[01]\] error: training diverged: non-finite gradient norm at steps 5-8 "
    assert re.search(line, proc.stderr), proc.stderr[-2000:]
    suspect = dump / "checkpoint" / "step-4.suspect"
    assert f"newest good checkpoint: step-3 ({suspect}: written before it, set aside)" in (
        proc.stderr
    ), proc.stderr[-2000:]
    assert "optimizer update skipped" in proc.stdout
    assert f'File "{ROOT / "torchtitan_ext"}' not in proc.stdout + proc.stderr  # no traceback
    assert runs.diverged_checkpoints == ["step-3", "step-4.suspect"]
    diverged = runs.diverged
    assert any(r["grad_norm"] != r["grad_norm"] for r in diverged)  # NaN logged, not hidden

    rerun = runs.rerun
    assert rerun.returncode == 0, (rerun.stdout[-3000:], rerun.stderr[-3000:])
    got, want = losses(dump), losses(ref)
    assert sorted(got) == [4, 5, 6]  # each step once: the diverged ones were superseded
    for step in got:
        assert got[step] == want[step], step
    superseded = (dump / "metrics_superseded.jsonl").read_text().splitlines()
    assert json.loads(superseded[0]) == {"superseded_at_resume_from": 3}
    assert len(superseded) == 1 + len(diverged)


def test_frozen_rank_ends_the_job_within_the_train_timeout(tmp_path):
    """SIGSTOP rank 1 after step 3: rank 0's next collective times out after
    comm.train_timeout_seconds (not the 300 s init timeout) and it exits with one line. The
    ranks are started directly (torchrun would add its 30 s SIGTERM-to-SIGKILL grace before
    killing the frozen rank; that part is torchrun's)."""
    timeout_s = 3
    args = [
        *tiny_run_args(tmp_path / "run", 100_000),
        *("--checkpoint.no-enable", "--comm.train_timeout_seconds", str(timeout_s)),
    ]
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args],
            cwd=ROOT,
            env={**launch_env(), **rendezvous, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    rank0, rank1 = ranks
    assert rank0.stdout is not None
    try:
        output = []
        for line in rank0.stdout:
            output.append(line)
            if re.search(r"step:\s+3 ", line):
                break
        rank1.send_signal(signal.SIGSTOP)
        output.append(rank0.stdout.read())
        # Ending within the train timeout, not the 300 s init timeout: a wait far below 300 s
        # (no wall-clock assertion, which a loaded machine could break).
        rank0.wait(timeout=timeout_s + 120)
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()
    text = "".join(output)
    assert rank0.returncode == 1, text[-3000:]
    assert re.search(
        r"\[rank0\] error: a collective failed \(RuntimeError: .*Timed out waiting 3000ms", text
    ), text[-3000:]
    assert "Traceback" not in text


# Corruptions of one checkpoint each, newest first; the resume must fall back past all of them.
CORRUPTIONS = {
    12: ("deleted .metadata", "has no .metadata"),
    10: ("flipped bit in a shard", "__1_0.distcp fails its checksum"),
    8: ("truncated shard", "__0_0.distcp has 5000 bytes, the manifest says"),
    6: ("missing shard", "__1_0.distcp cannot be read (No such file or directory)"),
    4: ("truncated .metadata", ".metadata has 1000 bytes, the manifest says"),
}


def corrupt(step_dir: Path, kind: str) -> None:
    if kind == "deleted .metadata":
        (step_dir / ".metadata").unlink()
    elif kind == "flipped bit in a shard":
        with open(step_dir / "__1_0.distcp", "r+b") as f:
            f.seek(1000)
            byte = f.read(1)[0]
            f.seek(1000)
            f.write(bytes([byte ^ 0x10]))
    elif kind == "truncated shard":
        os.truncate(step_dir / "__0_0.distcp", 5000)
    elif kind == "missing shard":
        (step_dir / "__1_0.distcp").unlink()
    elif kind == "truncated .metadata":
        os.truncate(step_dir / ".metadata", 1000)


def test_corrupt_checkpoints_fall_back_to_the_previous_good_one(two_rank_runs):
    """Five checkpoints damaged five ways: the resume reports each in one line, loads step 2,
    sets the damaged ones aside, and trains steps 3-12 to the uninterrupted run's losses. The
    metrics of the crashed attempt after step 2 (and its torn last line) are superseded, so
    metrics.jsonl and tensorboard show each step once (``two_rank_runs``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ref, dump, proc = two_rank_runs.corrupt_ref, two_rank_runs.corrupt_dump, two_rank_runs.resumed
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    manifest = json.loads((ref / "checkpoint" / "step-12" / "manifest.json").read_text())
    assert set(manifest["files"]) == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    for step, (kind, message) in CORRUPTIONS.items():
        lines = [x for x in proc.stdout.splitlines() if f"step-{step} " in x and message in x]
        assert len(lines) == 1, (kind, proc.stdout[-3000:])
    assert "resumed from" in proc.stdout and "step-2 (" in proc.stdout
    names = steps_in(dump / "checkpoint")
    for step in CORRUPTIONS:
        assert f"step-{step}.corrupt" in names  # kept for inspection, not resumed or purged
    got, want = losses(dump), losses(ref)
    assert sorted(got) == list(range(1, 13))
    for step in got:
        assert got[step] == want[step], step

    superseded = (dump / "metrics_superseded.jsonl").read_text().splitlines()
    assert json.loads(superseded[0]) == {"superseded_at_resume_from": 2}
    assert [json.loads(x)["step"] for x in superseded[1:-1]] == list(range(3, 13))
    assert superseded[-1] == '{"step": 13, "lo'
    acc = EventAccumulator(str(dump / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 13))


def test_unverified_corrupt_checkpoint_and_no_loadable_checkpoint(tmp_path):
    """Without manifests (checkpoint.verify = false) a truncated shard fails in DCP's load:
    reported, and the previous checkpoint is loaded. When no checkpoint loads, one config
    error per rank lists every step's reason and nothing is renamed."""
    dump = tmp_path / "run"
    torchrun(1, [*ckpt_args(dump, 4, interval=2), "--checkpoint.no-verify"])
    assert not (dump / "checkpoint" / "step-4" / "manifest.json").exists()
    os.truncate(dump / "checkpoint" / "step-4" / "__0_0.distcp", 5000)
    proc = torchrun(1, [*ckpt_args(dump, 6, interval=2), "--checkpoint.no-verify"])
    assert re.search(r"step-4 cannot be loaded: \w+Error: .*\(rank 0\)", proc.stdout)
    assert steps_in(dump / "checkpoint") == ["step-2", "step-4", "step-4.corrupt", "step-6"]

    for step in (2, 4, 6):
        os.truncate(dump / "checkpoint" / f"step-{step}" / "__0_0.distcp", 100)
    proc = torchrun(1, [*ckpt_args(dump, 8, interval=2), "--checkpoint.no-verify"], check=False)
    assert proc.returncode != 0
    workers = proc.stderr.partition(" FAILED\n")[0]  # torchrun's summary repeats the line
    errors = [x for x in workers.splitlines() if "config error" in x]
    assert len(errors) == 1
    assert "checkpoint.folder" in errors[0] and "no checkpoint could be loaded" in errors[0]
    for step in (6, 4, 2):  # no manifests (verify was off): DCP's own error, the first line
        assert f"step-{step}: EOFError: Ran out of input (rank 0)" in errors[0]
    assert steps_in(dump / "checkpoint") == ["step-2", "step-4", "step-4.corrupt", "step-6"]


def test_training_set_smaller_than_a_global_batch_is_a_config_error(tmp_path):
    from torchtitan_ext.config.manager import ConfigError
    from torchtitan_ext.distributed import RankInfo
    from torchtitan_ext.trainer import prepare

    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"text": "x" * 30}) + "\n" for _ in range(6)))
    args = [
        *tiny_run_args(tmp_path / "run", 2, seq_len=32, global_batch_size=8),
        *("--training.dataset_path", str(data), "--data.validation_fraction", "0"),
    ]
    with pytest.raises(ConfigError) as err:
        prepare(args, RankInfo(0, 0, 1))
    assert err.value.key == "training.global_batch_size"
    assert "5 windows of 33 tokens (192 tokens)" in str(err.value)
    assert "fewer than one global batch" in str(err.value)


def test_supersede_keeps_earlier_records(tmp_path):
    from torchtitan_ext.metrics import _supersede_after

    path, old = tmp_path / "m.jsonl", tmp_path / "old.jsonl"
    rows: list[dict[str, Any]] = [{"kind": "train", "step": s, "loss": float(s)} for s in (1, 2, 3)]
    rows.insert(2, {"kind": "val", "step": 2, "loss": 1.5})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _supersede_after(str(path), 2, str(old))
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows[:3]
    assert json.loads(old.read_text().splitlines()[1]) == rows[3]
    _supersede_after(str(path), 2, str(old))  # nothing later: unchanged
    assert len(old.read_text().splitlines()) == 2


def test_validation_covers_the_same_windows_on_every_mesh():
    from torchtitan_ext.trainer import validation_window_count

    assert validation_window_count(2, 8, 1000) == 16  # steps x global batch, not x dp
    assert validation_window_count(8, 16, 5) == 5  # a small split: all of it, not 0
    assert validation_window_count(-1, 16, 5) == 5


def test_peak_memory_is_per_log_window():
    """After a reset, the reported CPU peak is this window's (the kernel's RSS high-water mark
    set back by clear_refs), so a later stage that needs less memory shows less; the lifetime
    ru_maxrss it replaced never went down."""
    import torch

    from torchtitan_ext.metrics import peak_memory_mib, reset_peak_memory

    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    big = torch.ones(64 * 2**20)  # 256 MiB, touched
    del big
    with_big = peak_memory_mib(cpu)
    reset_peak_memory(cpu)
    after = peak_memory_mib(cpu)
    assert with_big - after > 200, (with_big, after)


def test_autocast_only_where_torchtitan_uses_it():
    """CUDA autocast on one device; not with FSDP (its policy casts), and not with TP or PP
    alone (TorchTitan 0.2.2's maybe_enable_amp; with PP the backward would run inside it)."""
    from types import SimpleNamespace

    import torch

    from torchtitan_ext.trainer import Trainer

    def amp(device: str, fsdp: bool = False, tp: bool = False, pp: bool = False) -> object:
        dims = SimpleNamespace(fsdp_enabled=fsdp, dp_replicate_enabled=False, tp_enabled=tp,
                               pp_enabled=pp)  # fmt: skip
        cfg = SimpleNamespace(training=SimpleNamespace(mixed_precision_param="bfloat16"))
        stub = SimpleNamespace(dims=dims, cfg=cfg, device=torch.device(device))
        return Trainer._amp_context(stub)  # type: ignore[arg-type]

    assert isinstance(amp("cuda"), torch.autocast)
    for kwargs in ({"fsdp": True}, {"tp": True}, {"pp": True}):
        assert not isinstance(amp("cuda", **kwargs), torch.autocast), kwargs
    assert not isinstance(amp("cpu"), torch.autocast)
