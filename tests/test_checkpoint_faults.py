"""Checkpoint faults on real gloo ranks (torch.multiprocessing), driving ``Checkpointer``
directly with a small state: ranks whose views of the folder differ, an I/O error on rank 0
while it publishes, a full disk (a small tmpfs), a deleted manifest and damaged pickle data.
The trainer-level behaviour (one line per rank, exit status) is in test_failures.py.
"""

import errno
import os
import shutil
import subprocess
import sys
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


def mount_tmpfs(mnt: Path) -> str | None:
    """Mount a 3 MiB tmpfs at ``mnt`` (root only); the reason when it cannot be, which fails
    the caller in CI (CI runs as root: a skip there would hide the test)."""
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"CI: cannot mount a tmpfs: {proc.stderr.strip()}")
        return proc.stderr.strip()
    return None


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs (root only: skipped where mounting is not permitted, except in CI)."""
    mnt = tmp_path / "tmpfs"
    why = mount_tmpfs(mnt)
    if why is not None:
        pytest.skip(f"cannot mount a tmpfs here: {why}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


SCENARIOS = ("consensus", "publish", "disk-full")
"""The 2-rank scenarios of ``two_rank_scenarios``, in the order they run."""


def _scenarios(rank: int, world: int, root: str, tmpfs: str | None) -> None:
    """Every 2-rank scenario in turn on one process group, each in its own folder under
    ``root``; a scenario that raises writes its error to ``<folder>/failed.txt`` (rank 0's,
    else rank 1's) and the next one still runs."""
    import traceback

    runs = {
        "consensus": lambda d: _load_with_differing_views(
            rank, world, str(d / "view0"), str(d / "view1"), str(d / "loaded.txt")
        ),
        "publish": lambda d: _publish_errors(rank, world, str(d / "run"), str(d / "errors.txt")),
        "disk-full": lambda d: _disk_full(rank, world, str(tmpfs), str(d / "errors.txt")),
    }
    for name in SCENARIOS:
        folder = Path(root) / name
        if name == "disk-full" and tmpfs is None:
            continue
        try:
            runs[name](folder)
        except Exception:
            failed = folder / "failed.txt"
            if rank == 0 or not failed.exists():
                failed.write_text(f"rank {rank}:\n{traceback.format_exc()}")
        torch.distributed.barrier()


@pytest.fixture(scope="module")
def two_rank_scenarios(tmp_path_factory) -> Any:
    """The 2-rank scenarios (``SCENARIOS``) in one launch of 2 ranks (``spawn``: starting the
    ranks costs more than the scenarios). Returns the folder of each, the 3 MiB tmpfs of
    "disk-full" (None where it cannot be mounted: ``no_tmpfs`` says why)."""
    root = tmp_path_factory.mktemp("faults")
    for name in SCENARIOS:
        (root / name).mkdir()
    mnt = root / "tmpfs"
    no_tmpfs = mount_tmpfs(mnt)
    tmpfs = None if no_tmpfs else mnt
    try:
        spawn(_scenarios, 2, str(root), None if tmpfs is None else str(tmpfs))
        yield SimpleNamespace(root=root, tmpfs=tmpfs, no_tmpfs=no_tmpfs)
    finally:
        if tmpfs is not None:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def scenario_folder(scenarios: Any, name: str) -> Path:
    """The folder of a scenario of ``two_rank_scenarios``, which must not have raised."""
    folder = Path(scenarios.root) / name
    failed = folder / "failed.txt"
    assert not failed.exists(), failed.read_text()
    return folder


def _load_with_differing_views(rank: int, world: int, view0: str, view1: str, out: str) -> None:
    """Both ranks write step-2, -4 and -6 to ``view0``; rank 0 then makes ``view1`` a stale
    copy of it (still listing step-6, which goes from ``view0``, and without step-4's manifest)
    and each rank loads from its own view."""
    short_timeout()
    save_steps(checkpointer(view0), [2, 4, 6])
    torch.distributed.barrier()
    if rank == 0:
        shutil.copytree(view0, view1)
        shutil.rmtree(Path(view0) / "checkpoint" / "step-6")
        (Path(view1) / "checkpoint" / "step-4" / "manifest.json").unlink()
    torch.distributed.barrier()
    ck = checkpointer([view0, view1][rank])  # each rank its own view of "the" folder
    step = ck.maybe_load()
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, (step, ck.states["model"].n))
    if rank == 0:
        Path(out).write_text(repr(gathered))


def test_checkpoint_consensus_with_a_stale_view_on_one_rank(two_rank_scenarios):
    """Rank 1's view of the folder is stale: it still lists step-6 (gone on rank 0's side)
    and cannot see step-4's manifest. Rank 0 decides: every rank loads step-4 (before, rank 1
    loaded step-6 while rank 0 loaded step-4, silently mixing the two states)."""
    tmp_path = scenario_folder(two_rank_scenarios, "consensus")
    view0, out = tmp_path / "view0", tmp_path / "loaded.txt"
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


def test_publish_error_on_rank0_is_every_ranks_error(two_rank_scenarios):
    """An OSError on rank 0 while writing the manifest, then while renaming: every rank raises
    the same CheckpointError line at once (before, rank 1 waited in a barrier until the
    timeout), the previous checkpoint is kept, and the next save works."""
    tmp_path = scenario_folder(two_rank_scenarios, "publish")
    out = tmp_path / "errors.txt"
    errors = eval(out.read_text())
    assert errors[0] == errors[1] and len(errors[0]) == 2, errors
    manifest_error, rename_error = errors[0]
    folder = tmp_path / "run" / "checkpoint"
    assert f"checkpoint {folder}/step-4 could not be published: OSError" in manifest_error
    assert "manifest.json" in manifest_error and "Input/output error" in manifest_error
    assert f"checkpoint {folder}/step-6 could not be published: OSError" in rename_error
    assert sorted(os.listdir(folder)) == ["step-2", "step-8"]  # the .tmp ones removed


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


def test_full_disk_is_one_line_naming_the_folder(two_rank_scenarios):
    """A 3 MiB tmpfs holds two 1 MiB checkpoints: the third is refused by the free-space
    check (its size known from the previous one); with the size unknown the write itself
    fails, synchronous or in the background: each time one line, the same on every rank,
    saying "no space left on device" with the folder, bytes needed and free; step-2 stays
    intact and nothing partial is left."""
    small_tmpfs = two_rank_scenarios.tmpfs
    if small_tmpfs is None:
        pytest.skip(f"cannot mount a tmpfs here: {two_rank_scenarios.no_tmpfs}")
    out = scenario_folder(two_rank_scenarios, "disk-full") / "errors.txt"
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


PHASE_MARK = "=== test_checkpoint_faults phase"


def _manifest_and_pickle(rank: int, world: int, dump: str, out: str) -> None:
    """Write step-2 and step-4; delete step-4's manifest and flip a bit of its ``model.w``
    (``<out>.info`` gets the item's file, offset and length), load ("verify" phase, the result
    in ``<out>.verify``, the checkpoint folder's listing in ``<out>.listing``); put step-4 back
    with its pickle data damaged too and load with allow_unverified ("allow" phase, the result
    in ``<out>.allow``). Each phase's output follows a ``PHASE_MARK`` line on stdout and
    stderr."""
    import struct

    import torch.distributed.checkpoint as dcp

    def phase(name: str) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.write(f"{PHASE_MARK} {name}\n")
            stream.flush()

    short_timeout()
    save_steps(checkpointer(dump), [2, 4])
    step4 = Path(dump) / "checkpoint" / "step-4"
    (step4 / "manifest.json").unlink()
    metadata = dcp.FileSystemReader(str(step4)).read_metadata()
    info = next(s for i, s in metadata.storage_data.items() if i.fqn == "model.w")
    Path(out + ".info").write_text(repr((info.relative_path, info.offset, info.length)))
    with open(step4 / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        item = f.read(info.length)
        values = item.find(struct.pack("<f", 4.0) * 8)  # model.w, filled with 4.0
        f.seek(info.offset + values + 3)
        f.write(bytes([item[values + 3] ^ 0x01]))  # 4.0 -> 16.0: a flipped exponent bit
    phase("verify")
    ck = checkpointer(dump)
    step = ck.maybe_load()
    Path(out + ".verify").write_text(repr((step, ck.states["model"].n)))
    Path(out + ".listing").write_text(repr(sorted(os.listdir(Path(dump) / "checkpoint"))))

    os.rename(Path(dump) / "checkpoint" / "step-4.corrupt", step4)
    with open(step4 / info.relative_path, "r+b") as f:
        f.seek(info.offset + item.find(b"\x80\x02") + 2)  # after the pickle's PROTO opcode
        f.write(b"\xff")  # its first opcode, damaged
    phase("allow")
    ck = checkpointer(dump, allow_unverified=True)
    step = ck.maybe_load()
    Path(out + ".allow").write_text(repr((step, ck.states["model"].n)))
    phase("end")


def test_missing_manifest_is_damage_unless_allowed(tmp_path, capfd):
    """step-4's manifest deleted and a value of its tensor flipped: the resume reports step-4
    in one line naming the missing manifest, loads step-2 and sets step-4 aside (before, a
    missing manifest turned verification off and the damaged step-4 loaded). With
    checkpoint.allow_unverified and the tensor's pickle data damaged too, DCP's load fails
    and the reason names the file, byte range, key and cause (not torch's weights_only help
    text). 1 rank; the phases share one process (``_manifest_and_pickle``)."""
    dump, out = tmp_path / "run", tmp_path / "loaded"
    spawn(_manifest_and_pickle, 1, str(dump), str(out))
    captured = capfd.readouterr()
    logs: dict[str, str] = {}
    for text in (captured.out, captured.err):
        parts = text.split(PHASE_MARK + " ")
        for part in parts[1:]:
            name, _, rest = part.partition("\n")
            logs[name] = logs.get(name, "") + rest
    step4 = dump / "checkpoint" / "step-4"
    relative_path, offset, length = eval(Path(f"{out}.info").read_text())
    assert Path(f"{out}.verify").read_text() == "(2, 2)"
    logged = logs["verify"]
    assert f"checkpoint {step4} cannot be loaded: manifest.json is missing" in logged, logged
    assert eval(Path(f"{out}.listing").read_text()) == ["step-2", "step-4.corrupt"]

    assert Path(f"{out}.allow").read_text() == "(2, 2)"
    logged = logs["allow"]
    want = (
        f"checkpoint {step4} cannot be loaded: {relative_path} bytes {offset}-"
        f"{offset + length} (model.w): UnpicklingError: damaged pickle data "
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
