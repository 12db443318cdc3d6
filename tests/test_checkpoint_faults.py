"""Checkpoint faults on real gloo ranks (torch.multiprocessing), driving ``Checkpointer``
directly with a small state: ranks whose views of the folder differ, an I/O error on rank 0
while it publishes, a full disk (a small tmpfs), a deleted manifest and damaged pickle data.
The trainer-level behaviour (one line per rank, exit status) is in test_failures.py.
"""

import errno
import os
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.conftest import spawn


class Box:
    """A Stateful holding one tensor (``w``, float32) and an int."""

    def __init__(self, numel: int = 8) -> None:
        self.w = torch.zeros(numel)
        self.n = 0

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w, "n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.w.copy_(state["w"])
        self.n = int(state["n"])


def checkpointer(dump: str, numel: int = 8, **overrides: Any) -> Any:
    from torchtitan_ext.checkpoint import Checkpointer
    from torchtitan_ext.checkpoint.storage import STATE_KEYS

    c = {
        "enable": True, "folder": "checkpoint", "interval": 1, "keep_latest_k": 0,
        "load_step": -1, "exclude_from_loading": [], "initial_load_path": "",
        "initial_load_model_only": False, "initial_load_in_hf": False,
        "last_save_in_hf": False, "enable_first_step_checkpoint": False,
        "load_only": False, "verify": True, "allow_unverified": False,
        "async_mode": "disabled", **overrides,
    }  # fmt: skip
    cfg = SimpleNamespace(checkpoint=SimpleNamespace(**c), job=SimpleNamespace(dump_folder=dump))
    states = {k: Box(numel if k == "model" else 8) for k in STATE_KEYS}
    return Checkpointer(cfg, states, torch.distributed.get_rank())  # type: ignore[arg-type]


def save_steps(ck: Any, steps: list[int]) -> None:
    for step in steps:
        ck.states["model"].w.fill_(float(step))
        ck.states["model"].n = step
        ck.save(step)


def short_timeout() -> None:
    """The default group times out after 20 s (not spawn's 300 s): a rank left waiting
    fails the test quickly instead of hanging it."""
    from torch.distributed import distributed_c10d

    distributed_c10d._set_pg_timeout(timedelta(seconds=20), None)


def _write(rank: int, world: int, dump: str) -> None:
    save_steps(checkpointer(dump), [2, 4, 6])


def _load_with_differing_views(rank: int, world: int, dumps: list[str], out: str) -> None:
    short_timeout()
    ck = checkpointer(dumps[rank])  # each rank its own view of "the" folder
    step = ck.maybe_load()
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, (step, ck.states["model"].n))
    if rank == 0:
        Path(out).write_text(repr(gathered))


def test_checkpoint_consensus_with_a_stale_view_on_one_rank(tmp_path):
    """Rank 1's view of the folder is stale: it still lists step-6 (gone on rank 0's side)
    and cannot see step-4's manifest. Rank 0 decides: every rank loads step-4 (before, rank 1
    loaded step-6 while rank 0 loaded step-4, silently mixing the two states)."""
    view0, view1 = tmp_path / "view0", tmp_path / "view1"
    spawn(_write, 2, str(view0))
    shutil.copytree(view0, view1)
    shutil.rmtree(view0 / "checkpoint" / "step-6")
    (view1 / "checkpoint" / "step-4" / "manifest.json").unlink()
    out = tmp_path / "loaded.txt"
    spawn(_load_with_differing_views, 2, [str(view0), str(view1)], str(out))
    assert out.read_text() == repr([(4, 4), (4, 4)])
    assert sorted(os.listdir(view0 / "checkpoint")) == ["step-2", "step-4"]  # nothing set aside


def _publish_errors(rank: int, world: int, dump: str, out: str) -> None:
    import contextlib
    from unittest import mock

    import torchtitan_ext.checkpoint.checkpointer as ckmod
    from torchtitan_ext.checkpoint import CheckpointError

    short_timeout()
    ck = checkpointer(dump)
    save_steps(ck, [2])
    real_rename = os.rename

    def failing_manifest(folder: str, digests: dict[str, Any]) -> None:
        raise OSError(errno.EIO, "Input/output error", os.path.join(folder, "manifest.json"))

    def failing_rename(src: Any, dst: Any) -> None:
        if str(dst).endswith("step-6"):  # the publishing rename, not DCP's own
            raise OSError(errno.EIO, "Input/output error", str(src))
        real_rename(src, dst)

    faults = {
        4: (ckmod, "write_manifest_file", failing_manifest),
        6: (os, "rename", failing_rename),
    }
    errors = []
    for step, (owner, name, fake) in faults.items():
        # The fault is rank 0's alone: the other ranks' files work.
        patch = mock.patch.object(owner, name, fake) if rank == 0 else contextlib.nullcontext()
        try:
            with patch:
                save_steps(ck, [step])
        except CheckpointError as e:
            errors.append(str(e))
    save_steps(ck, [8])  # the ranks are still in step
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, errors)
    if rank == 0:
        Path(out).write_text(repr(gathered))


def test_publish_error_on_rank0_is_every_ranks_error(tmp_path):
    """An OSError on rank 0 while writing the manifest, then while renaming: every rank raises
    the same CheckpointError line at once (before, rank 1 waited in a barrier until the
    timeout), the previous checkpoint is kept, and the next save works."""
    out = tmp_path / "errors.txt"
    spawn(_publish_errors, 2, str(tmp_path / "run"), str(out))
    errors = eval(out.read_text())
    assert errors[0] == errors[1] and len(errors[0]) == 2, errors
    manifest_error, rename_error = errors[0]
    folder = tmp_path / "run" / "checkpoint"
    assert f"checkpoint {folder}/step-4 could not be published: OSError" in manifest_error
    assert "manifest.json" in manifest_error and "Input/output error" in manifest_error
    assert f"checkpoint {folder}/step-6 could not be published: OSError" in rename_error
    assert sorted(os.listdir(folder)) == ["step-2", "step-8"]  # the .tmp ones removed


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs (root only: skipped where mounting is not permitted, except in CI)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        if os.environ.get("CI"):  # CI runs as root: a skip there would hide the test
            pytest.fail(f"CI: cannot mount a tmpfs: {proc.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _disk_full(rank: int, world: int, dump: str, out: str) -> None:
    from torchtitan_ext.checkpoint import CheckpointError
    from torchtitan_ext.checkpoint.storage import verify_manifest

    short_timeout()
    numel = 2**18  # 1 MiB of float32
    errors = []
    ck = checkpointer(dump, numel)
    save_steps(ck, [1, 2])
    try:  # 1 MiB known from step-2, under 1 MiB free: refused before writing
        save_steps(ck, [3])
    except CheckpointError as e:
        errors.append(str(e))
    ck.checkpoint_bytes = 1  # a size unknown: the write itself runs out of space
    try:
        save_steps(ck, [3])
    except CheckpointError as e:
        errors.append(str(e))
    background = checkpointer(dump, numel, async_mode="async")
    background.checkpoint_bytes = 1
    try:
        save_steps(background, [3])
        background.finish()
    except CheckpointError as e:
        errors.append(str(e))
    step2 = os.path.join(ck.folder, "step-2")
    errors.append(str(verify_manifest(step2, rank)))
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, errors)
    if rank == 0:
        Path(out).write_text(repr(gathered))


def test_full_disk_is_one_line_naming_the_folder(small_tmpfs, tmp_path):
    """A 3 MiB tmpfs holds two 1 MiB checkpoints: the third is refused by the free-space
    check (its size known from the previous one); with the size unknown the write itself
    fails, synchronous or in the background: each time one line, the same on every rank,
    saying "no space left on device" with the folder, bytes needed and free; step-2 stays
    intact and nothing partial is left."""
    out = tmp_path / "errors.txt"
    spawn(_disk_full, 2, str(small_tmpfs), str(out))
    errors = eval(out.read_text())
    assert errors[0] == errors[1], errors
    *failures, step2_check = errors[0]
    assert len(failures) == 3, failures
    folder = small_tmpfs / "checkpoint"
    for line in failures:
        assert "\n" not in line
        assert line.startswith(
            f"checkpoint step-3 not written: no space left on device for {folder}"
        )
        assert "it needs about 1.0 MiB" in line and "free)" in line
        assert "the newest complete checkpoint, step-2, is kept" in line
    assert step2_check == "None"
    assert sorted(os.listdir(folder)) == ["step-1", "step-2"]


def _manifest_and_pickle(rank: int, world: int, dump: str, out: str, phase: str) -> None:
    short_timeout()
    if phase == "write":
        save_steps(checkpointer(dump), [2, 4])
        return
    ck = checkpointer(dump, allow_unverified=phase == "allow")
    step = ck.maybe_load()
    if rank == 0:
        Path(out).write_text(repr((step, ck.states["model"].n)))


def test_missing_manifest_is_damage_unless_allowed(tmp_path, capfd):
    """step-4's manifest deleted and a value of its tensor flipped: the resume reports step-4
    in one line naming the missing manifest, loads step-2 and sets step-4 aside (before, a
    missing manifest turned verification off and the damaged step-4 loaded). With
    checkpoint.allow_unverified and the tensor's pickle data damaged too, DCP's load fails
    and the reason names the file, byte range, key and cause (not torch's weights_only help
    text)."""
    import struct

    import torch.distributed.checkpoint as dcp

    dump, out = tmp_path / "run", tmp_path / "loaded.txt"
    spawn(_manifest_and_pickle, 1, str(dump), str(out), "write")
    step4 = dump / "checkpoint" / "step-4"
    (step4 / "manifest.json").unlink()
    metadata = dcp.FileSystemReader(str(step4)).read_metadata()
    info = next(s for i, s in metadata.storage_data.items() if i.fqn == "model.w")
    with open(step4 / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        item = f.read(info.length)
        values = item.find(struct.pack("<f", 4.0) * 8)  # model.w, filled with 4.0
        f.seek(info.offset + values + 3)
        f.write(bytes([item[values + 3] ^ 0x01]))  # 4.0 -> 16.0: a flipped exponent bit
    capfd.readouterr()
    spawn(_manifest_and_pickle, 1, str(dump), str(out), "verify")
    assert out.read_text() == "(2, 2)"
    logged = "".join(capfd.readouterr())
    assert f"checkpoint {step4} cannot be loaded: manifest.json is missing" in logged, logged
    assert sorted(os.listdir(dump / "checkpoint")) == ["step-2", "step-4.corrupt"]

    os.rename(dump / "checkpoint" / "step-4.corrupt", step4)
    with open(step4 / info.relative_path, "r+b") as f:
        f.seek(info.offset + item.find(b"\x80\x02") + 2)  # after the pickle's PROTO opcode
        f.write(b"\xff")  # its first opcode, damaged
    spawn(_manifest_and_pickle, 1, str(dump), str(out), "allow")
    assert out.read_text() == "(2, 2)"
    logged = "".join(capfd.readouterr())
    want = (
        f"checkpoint {step4} cannot be loaded: {info.relative_path} bytes {info.offset}-"
        f"{info.offset + info.length} (model.w): UnpicklingError: damaged pickle data "
        "(Unsupported operand 255)"
    )
    assert want in logged, logged[-2000:]


def test_full_disk_in_training_is_one_line_per_rank(small_tmpfs):
    """Training on the 3 MiB tmpfs: step-2 (about 2.1 MiB) fits, step-4 does not. The run
    stops before writing it with one line per rank naming the folder and the bytes needed and
    free, exit status 1, no traceback; step-2 is intact (before: a wall of tracebacks from
    inside DCP's writer that never said "disk")."""
    import re

    from tests.conftest import ROOT, tiny_run_args, torchrun

    dump = small_tmpfs / "run"
    args = [*tiny_run_args(dump, 4), "--checkpoint.interval", "2"]
    proc = torchrun(2, args, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    folder = dump / "checkpoint"
    for rank in (0, 1):
        line = (
            rf"\[rank{rank}\] error: checkpoint step-4 not written: no space left on device "
            rf"for {re.escape(str(folder))} \(it needs about 2\.\d MiB \(\d+ bytes\), 0\.\d MiB "
            r"\(\d+ bytes\) free\); the newest complete checkpoint, step-2, is kept"
        )
        assert re.search(line, proc.stderr), proc.stderr[-3000:]
    assert f'File "{ROOT / "torchtitan_ext"}' not in proc.stdout + proc.stderr  # no traceback
    assert sorted(os.listdir(folder)) == ["step-2"]
