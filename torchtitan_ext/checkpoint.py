"""Distributed checkpoints (``torch.distributed.checkpoint``) that a crash cannot corrupt.

Layout: ``<dump_folder>/<checkpoint.folder>/step-<N>/`` (DCP files). A save writes into
``step-<N>.tmp/``; after every rank has finished (DCP's own final collective plus a barrier),
rank 0 renames it to ``step-<N>`` (an atomic rename on POSIX file systems). A crash mid-save
therefore leaves only a ``.tmp`` folder, which loading ignores and the next save removes; the
latest complete checkpoint is untouched.

The state is: model (``ModelWrapper`` of TorchTitan), optimizer and LR scheduler containers of
TorchTitan, the data loader (one global integer, so it loads into any mesh) and the train state
(step, tokens seen). DCP reshards on load, so a checkpoint written with one mesh loads into
another.

Integrity (``checkpoint.verify``, on by default): with each save every rank hashes a share of
the files DCP wrote (size and xxh3-64) and rank 0 writes them to ``manifest.json`` before the
rename. At load the manifest is checked first (the ranks share the hashing), then DCP loads; a
checkpoint that fails either is reported in one line naming its folder and file, and the
previous complete checkpoint is loaded instead. A checkpoint without a manifest is damaged
too (the manifest was deleted) unless ``checkpoint.allow_unverified``. Once an older
checkpoint has loaded, the newer ones it replaced are renamed ``step-<N>.corrupt`` (failed) or
``step-<N>.superseded`` (an explicit ``load_step`` roll-back), so that they are kept on disk
but neither resumed from nor counted by ``keep_latest_k``; after a divergence the checkpoint
of the step before the first non-finite gradient norm becomes ``step-<N>.suspect``.

One decision for all ranks: rank 0 lists the folder, reads manifests, renames and publishes,
and hands the outcome (or its error) to every rank, so that stale views of a shared file
system cannot make ranks load different steps, and an error on rank 0 is one
``CheckpointError`` line on every rank (a full disk says so, with the bytes needed and free).
"""

import copy
import errno
import functools
import io
import json
import logging
import os
import re
import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor, distribute_tensor

from torchtitan_ext.errors import ConfigError

logger = logging.getLogger("torchtitan_ext")

_STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_KEYS = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state")
MANIFEST = "manifest.json"
_HASH_CHUNK = 16 * 2**20  # bytes read per hash update


@dataclass
class TrainState(Stateful):
    """Progress counters saved with every checkpoint.

    Attributes:
        step: optimizer steps completed.
        tokens_seen: tokens of the global batch consumed so far (all ranks together).
    """

    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": torch.tensor(self.step), "tokens_seen": torch.tensor(self.tokens_seen)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.tokens_seen = int(state_dict["tokens_seen"])


def complete_steps(folder: str) -> list[int]:
    """Steps with a complete checkpoint in ``folder`` (renamed and holding DCP metadata),
    ascending."""
    if not os.path.isdir(folder):
        return []
    steps = []
    for name in os.listdir(folder):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(folder, name, ".metadata")):
            steps.append(int(m.group(1)))
    return sorted(steps)


def incomplete_steps(folder: str) -> list[int]:
    """Steps with a renamed ``step-<N>`` folder but no DCP ``.metadata`` (a deleted file: a
    crash mid-save leaves ``.tmp`` instead), ascending."""
    if not os.path.isdir(folder):
        return []
    complete = set(complete_steps(folder))
    return sorted(
        int(m.group(1))
        for m in map(_STEP_DIR.match, os.listdir(folder))
        if m and int(m.group(1)) not in complete
    )


class CheckpointError(RuntimeError):
    """A checkpoint could not be listed, written or published (a full disk, an I/O error on
    rank 0's rename): one line, the same on every rank, that names the folder and the cause.
    The trainer reports it and exits with status 1; the newest complete checkpoint is kept."""


_T = TypeVar("_T")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def decided_by_rank0(fn: Callable[[], _T], what: str) -> _T:
    """Run ``fn`` on rank 0 only and hand its result, or its error, to every rank: one
    decision about the checkpoint folder for all of them (on a shared file system another
    rank's view may be stale), and no rank left waiting in a collective while rank 0 fails.
    Collective (``broadcast_object_list`` over the default group) with more than one rank.

    Args:
        fn: the file-system work (listing, renames, manifest); its result must pickle.
        what: what failed, the start of the error line (e.g. "listing /ckpt").

    Raises:
        CheckpointError: ``fn`` raised on rank 0; every rank raises the same line (a
            ``CheckpointError`` of ``fn``'s own is passed on as it is).
    """
    box: list[Any] = [None]
    if _rank() == 0:
        try:
            box[0] = (True, fn())
        except CheckpointError as e:
            box[0] = (False, str(e))
        except Exception as e:  # any failure of rank 0's file work: every rank hears of it
            box[0] = (False, f"{what}: {_one_line(e)}")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise CheckpointError(value)
    return cast(_T, value)


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


def agreed_steps(folder: str) -> tuple[list[int], list[int]]:
    """(``complete_steps``, ``incomplete_steps``) of ``folder`` as rank 0 lists it, on every
    rank. Collective.

    Raises:
        CheckpointError: rank 0 cannot list the folder (on every rank).
    """
    return decided_by_rank0(
        lambda: (complete_steps(folder), incomplete_steps(folder)), f"listing {folder}"
    )


def folder_bytes(path: str) -> int:
    """Total size in bytes of the regular files directly in ``path`` (a DCP checkpoint)."""
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file(follow_symlinks=False))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB ({n} bytes)"


def _out_of_space(err: BaseException) -> bool:
    """Whether a failed write ran out of disk space: an ``ENOSPC`` anywhere in the exception,
    the failures DCP gathered from the ranks, or their causes; or the zip writer's "unexpected
    pos" (torch.save into a stream whose short write it cannot see)."""
    seen: set[int] = set()
    todo: list[BaseException] = [err]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        text = str(e)
        if "No space left on device" in text or "unexpected pos" in text:
            return True
        if isinstance(e, CheckpointException):
            todo += [exc for exc, _tb in e.failures.values()]
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
    return False


def state_bytes(states: dict[str, Stateful]) -> int:
    """About the bytes a DCP save of ``states`` writes: every rank's local shards of DTensors,
    plus each plain tensor once per key (DCP writes a replicated tensor once). Pickled
    non-tensor values and DCP's metadata are not counted. Collective."""
    sharded = 0
    plain: dict[str, int] = {}

    def walk(prefix: str, value: Any) -> None:
        nonlocal sharded
        if isinstance(value, DTensor):
            local = value.to_local()
            sharded += local.numel() * local.element_size()
        elif isinstance(value, torch.Tensor):
            plain[prefix] = value.numel() * value.element_size()
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)

    for key, state in states.items():
        walk(key, state.state_dict())
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return sharded + sum(plain.values())
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (sharded, plain))
    union = {k: v for _, p in gathered for k, v in p.items()}
    return sum(s for s, _ in gathered) + sum(union.values())


def file_digest(path: str) -> tuple[int, str]:
    """(size in bytes, xxh3-64 hex digest) of a file, read in 16 MiB chunks.

    Raises:
        OSError: the file cannot be read.
    """
    h = xxhash.xxh3_64()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


_WRITER_RANK = re.compile(r"^__(\d+)_")  # DCP's FileSystemWriter names rank r's files __r_<i>


def _digest_share(folder: str, files: list[str], rank: int, world: int) -> dict[str, Any]:
    """This rank's share of ``files`` hashed: {name: [size, digest]}, or {name: error string}
    for a file that cannot be read. A DCP data file goes to the rank that wrote it (modulo
    ``world``), whose page cache still holds it right after a save; other files to rank 0."""
    out: dict[str, Any] = {}
    for name in files:
        m = _WRITER_RANK.match(name)
        if (int(m.group(1)) % world if m else 0) != rank:
            continue
        try:
            out[name] = list(file_digest(os.path.join(folder, name)))
        except OSError as e:
            out[name] = f"cannot be read ({e.strerror or e})"
    return out


def _all_gather_dicts(local: dict[str, Any]) -> dict[str, Any]:
    """The union of every rank's dict (collective when the process group is initialized)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(local)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return {k: v for d in gathered for k, v in d.items()}


def manifest_digests(folder: str, metadata: Metadata, rank: int) -> dict[str, Any]:
    """Hash the files of the DCP checkpoint in ``folder``, the ranks sharing the work:
    {name: [size, xxh3-64]}, or {name: error string} for a file that cannot be read; the same
    on every rank. Collective."""
    files = sorted({info.relative_path for info in metadata.storage_data.values()})
    files.append(".metadata")
    world = dist.get_world_size() if dist.is_initialized() else 1
    return _all_gather_dicts(_digest_share(folder, files, rank, world))


def write_manifest_file(folder: str, digests: dict[str, Any]) -> None:
    """Write ``manifest.json`` ({"hash": "xxh3_64", "files": {name: [size, digest]}}) into
    ``folder``, flushed to disk.

    Raises:
        OSError: a file could not be read back after the save, or the manifest not written.
    """
    bad = {k: v for k, v in digests.items() if not isinstance(v, list)}
    if bad:
        raise OSError(f"checkpoint files could not be read back after the save: {bad}")
    path = os.path.join(folder, MANIFEST)
    with open(path, "w") as f:
        json.dump({"hash": "xxh3_64", "files": digests}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def write_manifest(folder: str, metadata: Metadata, rank: int) -> None:
    """``manifest_digests`` and, on rank 0, ``write_manifest_file``. Collective.

    Raises:
        OSError: on rank 0 only (``Checkpointer`` passes rank 0's error to every rank).
    """
    digests = manifest_digests(folder, metadata, rank)
    if rank == 0:
        write_manifest_file(folder, digests)


def read_manifest(folder: str, allow_missing: bool) -> tuple[dict[str, Any] | None, str | None]:
    """The ``files`` table of ``folder``'s manifest and None, or None and the one-line
    problem: unreadable or malformed, or missing (unless ``allow_missing``: then (None, None),
    nothing to check). Every checkpoint this project writes with ``checkpoint.verify`` has a
    manifest, so a missing one is damage (deleted), not an old format."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.lexists(path):
        if allow_missing:
            return None, None
        return None, (
            f"{MANIFEST} is missing (deleted, or the checkpoint was written with "
            "checkpoint.verify = false or elsewhere): it cannot be verified; "
            "checkpoint.allow_unverified = true loads checkpoints without a manifest"
        )
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        if not isinstance(files, dict) or not all(
            isinstance(v, list) and len(v) == 2 for v in files.values()
        ):
            raise ValueError("malformed files table")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    return files, None


def verify_manifest(folder: str, rank: int, allow_missing: bool = False) -> str | None:
    """Check a checkpoint folder against its ``manifest.json``. Rank 0 reads the manifest and
    hands it to every rank (``decided_by_rank0``), the ranks share the hashing, and every rank
    judges the same gathered digests: the verdict is the same everywhere. Collective.

    Returns:
        None when every file matches (or, with ``allow_missing``, there is no manifest), else
        one line naming the first bad file (or the missing or unreadable manifest).
    """
    expected, problem = decided_by_rank0(
        lambda: read_manifest(folder, allow_missing), f"reading {folder}/{MANIFEST}"
    )
    if problem is not None or not expected:
        return problem
    files = sorted(expected)
    world = dist.get_world_size() if dist.is_initialized() else 1
    got = _all_gather_dicts(_digest_share(folder, files, rank, world))
    for name in files:
        want, have = expected[name], got.get(name)
        if isinstance(have, str):
            return f"{name} {have}"
        if have is None or have[0] != want[0]:
            return f"{name} has {have[0] if have else '?'} bytes, the manifest says {want[0]}"
        if have[1] != want[1]:
            return f"{name} fails its checksum (xxh3-64 {have[1]}, manifest {want[1]})"
    return None


def describe_load_error(err: BaseException) -> str:
    """One line for a failed ``dcp.load``: the first failing rank's exception (DCP gathers
    them into a ``CheckpointException``), its type and the first line of its message; for
    torch's ``weights_only`` unpickling failure (whose first lines are generic help) the
    reason it buries after its help text."""
    if isinstance(err, CheckpointException) and err.failures:
        rank, (exc, _tb) = next(iter(sorted(err.failures.items(), key=lambda kv: kv[0])))
        err, where = exc, f" (rank {rank})"
    else:
        where = ""
    return _exception_line(err) + where


def _exception_line(err: BaseException) -> str:
    text = str(err)
    if "Unpickler error:" in text:  # torch.load(weights_only=True): the reason after its help
        reason = text.split("Unpickler error:", 1)[1].split("Check the documentation")[0]
        return f"{type(err).__name__}: damaged pickle data ({' '.join(reason.split())})"[:300]
    lines = "".join(traceback.format_exception_only(type(err), err)).strip().splitlines()
    return (lines[-1] if lines else type(err).__name__)[:300]


def find_unloadable_item(path: str) -> str | None:
    """Read every item of the DCP checkpoint at ``path`` as ``FileSystemReader`` does (a
    ``torch.load`` of its byte range: ``weights_only`` for tensors, as DCP loads them) and
    name the first that fails: "<file> bytes <start>-<end> (<key>): <cause>". None when all
    load (or the metadata itself cannot be read: the load error names that). Used after a
    failed ``dcp.load``, whose error names neither the file nor the key."""
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception:
        return None
    items = sorted(
        metadata.storage_data.items(), key=lambda kv: (kv[1].relative_path, kv[1].offset)
    )
    for index, info in items:
        is_bytes = isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata)
        try:
            with open(os.path.join(path, info.relative_path), "rb") as f:
                f.seek(info.offset)
                raw = f.read(info.length)
            torch.load(io.BytesIO(raw), map_location="cpu", weights_only=not is_bytes)
        except Exception as e:
            span = f"bytes {info.offset}-{info.offset + info.length}"
            return f"{info.relative_path} {span} ({index.fqn}): {_exception_line(e)}"
    return None


@dataclass
class _PendingSave:
    """A background save (``dcp.async_save``'s future) and where it goes."""

    future: Any
    tmp: str
    final: str
    step: int


class Checkpointer:
    """Saves and loads the training state (see the module docstring).

    Args:
        cfg: the merged JobConfig (``checkpoint`` section, ``job.dump_folder``).
        states: the Stateful objects by key (``STATE_KEYS``).
        rank: this process's global rank.

    Honoured ``checkpoint`` keys: enable, folder, interval, keep_latest_k, load_step,
    exclude_from_loading, initial_load_path, initial_load_model_only,
    enable_first_step_checkpoint, load_only, verify, allow_unverified, async_mode ("disabled"
    or "async"). Every save holds the full state (model, optimizer, LR scheduler, data loader,
    train state), including the last one, so any checkpoint resumes.

    Every decision about the folder (what it holds, whether a checkpoint verifies, which one
    to fall back to, renames) is rank 0's, handed to the other ranks (``decided_by_rank0``):
    ranks whose views of a shared file system differ still load one step, and an error on
    rank 0's side is the same ``CheckpointError`` line on every rank, never a peer left in a
    barrier.

    With ``async_mode = "async"`` (TorchTitan's key) a save stages the state in memory and
    writes it in a background thread (``dcp.async_save`` over a process group of its own);
    training goes on, and the checkpoint is published (manifest, rename to ``step-<N>``,
    ``keep_latest_k``) by ``finish``, at the next save or at the end of training. Until then
    it is a ``.tmp`` folder, which a resume ignores: a crash meanwhile loses that checkpoint,
    never an older one.

    ``keep_latest_k`` never deletes the newest confirmed checkpoint: one at step N is
    confirmed once a later step's gradient norm was finite (``step_finished``), because the
    weights of the step just before a divergence are themselves suspect
    (``set_aside_suspect``).
    """

    def __init__(self, cfg: Any, states: dict[str, Stateful], rank: int) -> None:
        c = cfg.checkpoint
        self.enabled: bool = c.enable
        self.folder = os.path.join(cfg.job.dump_folder, c.folder)
        self.interval: int = c.interval
        self.keep_latest_k: int = c.keep_latest_k
        self.load_step: int = c.load_step
        self.exclude: set[str] = set(c.exclude_from_loading)
        self.initial_load_path: str | None = c.initial_load_path
        self.initial_load_model_only: bool = c.initial_load_model_only
        self.first_step: bool = c.enable_first_step_checkpoint
        self.load_only: bool = c.load_only
        self.verify: bool = c.verify
        self.allow_unverified: bool = c.allow_unverified
        self.states = states
        self.rank = rank
        self.async_save: bool = c.async_mode == "async"
        self._async_group: dist.ProcessGroup | None = None
        self.pending: _PendingSave | None = None
        # The newest step whose gradient norm was finite: checkpoints before it are confirmed.
        self.finite_through = 0
        self._purge_due = False  # rank 0: keep_latest_k held back an unconfirmed checkpoint
        # Bytes of the newest checkpoint written or loaded (the free-space check of a save).
        self.checkpoint_bytes: int | None = None
        unknown = self.exclude - set(STATE_KEYS)
        if unknown:
            raise ConfigError(
                "checkpoint.exclude_from_loading",
                sorted(unknown),
                f"valid entries: {', '.join(STATE_KEYS)}",
            )

    def maybe_load(self) -> int | None:
        """Resume from the latest checkpoint that verifies and loads (or exactly ``load_step``),
        else from ``initial_load_path``; returns the step loaded, or None when starting fresh.

        Rank 0 lists the folder and every rank gets its listing. A newer checkpoint that fails
        (its manifest is missing, it fails the manifest, or DCP's load fails) is reported (one
        warning naming the folder and file) and the next older one is tried; after a
        successful load the failed ones are renamed ``step-<N>.corrupt``. Collective when
        checkpoints are enabled.

        Raises:
            ConfigError: ``load_step`` names a step with no complete checkpoint or one that
                fails; or every complete checkpoint fails (each reason listed).
            CheckpointError: rank 0 cannot list or rename in the folder.
        """
        if not self.enabled:
            return None
        steps, incomplete = agreed_steps(self.folder)
        for bad in incomplete:
            self._warn(
                f"checkpoint {self.folder}/step-{bad} has no .metadata (deleted, or not "
                "written by DCP): skipped"
            )
        if self.load_step != -1:
            if self.load_step not in steps:
                raise ConfigError(
                    "checkpoint.load_step",
                    self.load_step,
                    f"no complete checkpoint for it in {self.folder} (found steps {steps})",
                )
            candidates = [self.load_step]
        else:
            candidates = steps[::-1]
        keys = [k for k in STATE_KEYS if k not in self.exclude]
        failed: list[tuple[int, str]] = []
        for step in candidates:
            path = os.path.join(self.folder, f"step-{step}")
            problem = self._try_load(path, keys, self.allow_unverified)
            if problem is None:
                logger.info(f"resumed from {path} ({', '.join(keys)})")
                unusable = {s for s, _ in failed} | set(incomplete)
                newer = sorted(s for s in set(steps) | unusable if s > step)
                self._set_aside(newer, unusable, step)
                self.checkpoint_bytes = decided_by_rank0(
                    functools.partial(folder_bytes, path),
                    f"measuring {path}",
                )
                return step
            self._warn(f"checkpoint {path} cannot be loaded: {problem}")
            failed.append((step, problem))
        if failed:
            reasons = "; ".join(f"step-{s}: {why}" for s, why in failed)
            key, value = (
                ("checkpoint.load_step", self.load_step)
                if self.load_step != -1
                else ("checkpoint.folder", self.folder)
            )
            raise ConfigError(key, value, f"no checkpoint could be loaded ({reasons})")
        if self.initial_load_path:
            keys = ["model"] if self.initial_load_model_only else list(STATE_KEYS)
            keys = [k for k in keys if k not in self.exclude]
            # Written elsewhere (a seed or another project's run): no manifest is expected.
            problem = self._try_load(self.initial_load_path, keys, allow_missing=True)
            if problem is not None:
                raise ConfigError("checkpoint.initial_load_path", self.initial_load_path, problem)
            logger.info(f"loaded {', '.join(keys)} from {self.initial_load_path}")
            return 0
        return None

    def _warn(self, message: str) -> None:
        """A warning on rank 0 only (every rank reaches the same conclusion)."""
        if self.rank == 0:
            logger.warning(message)

    def _try_load(self, path: str, keys: list[str], allow_missing: bool) -> str | None:
        """Verify (``checkpoint.verify``; a missing manifest fails unless ``allow_missing``)
        and load ``keys`` from ``path``; None on success, else the one-line reason, the same
        on every rank (rank 0's verdict on the manifest; DCP gathers load failures). A load
        that fails while unpickling names the file, byte range and key. Collective."""
        if self.verify:
            problem = verify_manifest(path, self.rank, allow_missing)
            if problem is not None:
                return problem
        try:
            dcp.load({k: self.states[k] for k in keys}, checkpoint_id=path)
        except ConfigError:
            raise  # the recipe cannot use this state (a Stateful said so): not corruption
        except (Exception, CheckpointException) as e:  # DCP raises the latter on every rank
            reason = describe_load_error(e)
            if "Unpickler" in reason or "pickle" in reason.lower():
                where = decided_by_rank0(lambda: find_unloadable_item(path), f"reading {path}")
                if where is not None:
                    reason = where
            return reason
        return None

    def _move_aside(self, step: int, kind: str) -> str:
        """Rank 0: rename ``step-<step>`` to ``step-<step>.<kind>`` (``-2``, ``-3``... after an
        earlier one of the same step: both kept); returns the new path."""
        src = os.path.join(self.folder, f"step-{step}")
        dst, n = f"{src}.{kind}", 1
        while os.path.lexists(dst):
            n += 1
            dst = f"{src}.{kind}-{n}"
        os.rename(src, dst)
        return dst

    def _set_aside(self, newer: list[int], failed: set[int], loaded: int) -> None:
        """Rename the checkpoints ``newer`` than the one ``loaded`` (rank 0's listing, handed
        to every rank): those that ``failed`` to ``step-<N>.corrupt``, the others (a
        ``load_step`` roll-back) to ``step-<N>.superseded``. Kept on disk; never resumed from
        or purged. Collective.

        Raises:
            CheckpointError: a rename failed (on every rank).
        """

        def on_rank0() -> None:
            for s in newer:
                dst = self._move_aside(s, "corrupt" if s in failed else "superseded")
                logger.warning(
                    f"moved {self.folder}/step-{s} to {dst} (newer than the resumed step-{loaded})"
                )
            if newer:
                _fsync_dir(self.folder)

        decided_by_rank0(on_rank0, f"setting aside checkpoints in {self.folder}")

    def step_finished(self, step: int) -> None:
        """Step ``step``'s gradient norm was finite: the checkpoints before it are confirmed,
        and one that ``keep_latest_k`` held back for an unconfirmed newer one goes now (rank 0;
        no collective)."""
        self.finite_through = step
        if self._purge_due and self.rank == 0:
            try:
                self._purge()
            except OSError as e:  # the next save's purge tries again
                logger.warning(f"checkpoint purge in {self.folder} failed: {_one_line(e)}")

    def set_aside_suspect(self, first_nonfinite: int) -> tuple[int | None, list[str]]:
        """After a divergence whose first non-finite gradient norm was at step
        ``first_nonfinite``: rename the checkpoints of step ``first_nonfinite - 1`` and later
        ``step-<N>.suspect`` (their weights gave that gradient; resuming from them diverges
        again). Kept on disk, never resumed from or purged. Collective.

        Returns:
            (the newest remaining complete step or None, the new paths of those moved).

        Raises:
            CheckpointError: rank 0 cannot list or rename (on every rank).
        """

        def on_rank0() -> tuple[int | None, list[str]]:
            steps = complete_steps(self.folder)
            moved = [self._move_aside(s, "suspect") for s in steps if s >= first_nonfinite - 1]
            if moved:
                _fsync_dir(self.folder)
            left = [s for s in steps if s < first_nonfinite - 1]
            return (left[-1] if left else None), moved

        if not self.enabled:
            return None, []
        return decided_by_rank0(on_rank0, f"setting aside suspect checkpoints in {self.folder}")

    def should_save(self, step: int, last_step: bool) -> bool:
        if not self.enabled or self.load_only:
            return False
        return last_step or step % self.interval == 0 or (self.first_step and step == 1)

    def _newest_kept(self) -> str:
        """Rank 0: the end of an error line, the newest complete checkpoint left on disk."""
        try:
            done = complete_steps(self.folder)
        except OSError:
            return ""
        return f"; the newest complete checkpoint, step-{done[-1]}, is kept" if done else ""

    def _no_space(self, step: int, need: int, free: int) -> str:
        return (
            f"checkpoint step-{step} not written: no space left on device for {self.folder} "
            f"(it needs about {_mib(need)}, {_mib(free)} free){self._newest_kept()}; free "
            "space, lower checkpoint.keep_latest_k or move job.dump_folder"
        )

    def save(self, step: int) -> str:
        """Write the full state as ``step-<step>`` atomically (with its manifest when
        ``checkpoint.verify``); collective on every rank. With ``async_mode = "async"`` the
        write goes on in the background and ``finish`` publishes it (a pending one first).

        Before writing, rank 0 checks the folder's free space against the checkpoint's size
        (the previous checkpoint's, else ``state_bytes``).

        Returns:
            The final folder.

        Raises:
            CheckpointError: too little free space, or the write or the publishing failed
                (one line on every rank; the partial ``.tmp`` is removed, older checkpoints
                are untouched).
        """
        self.finish()
        final = os.path.join(self.folder, f"step-{step}")
        tmp = final + ".tmp"
        if self.checkpoint_bytes is None:
            self.checkpoint_bytes = state_bytes(self.states)
        need = self.checkpoint_bytes

        def prepare_on_rank0() -> None:
            os.makedirs(self.folder, exist_ok=True)
            for name in os.listdir(self.folder):
                if name.endswith(".tmp"):
                    shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)
            free = shutil.disk_usage(self.folder).free
            if free < need:
                raise CheckpointError(self._no_space(step, need, free))

        decided_by_rank0(prepare_on_rank0, f"checkpoint {final} could not be started")
        try:
            if self.async_save:
                if self._async_group is None:  # every rank saves at the same steps: collective
                    self._async_group = dist.new_group(backend="gloo")
                future = dcp.async_save(
                    dict(self.states), checkpoint_id=tmp, process_group=self._async_group
                )
                self.pending = _PendingSave(future, tmp, final, step)
                logger.info(f"saving checkpoint {final} in the background")
                return final
            metadata = dcp.save(dict(self.states), checkpoint_id=tmp)
        except (Exception, CheckpointException) as e:  # DCP gathers failures to every rank
            self._write_failed(e, step, tmp)
        self._publish(metadata, tmp, final)
        return final

    def _write_failed(self, err: BaseException, step: int, tmp: str) -> NoReturn:
        """A failed DCP write (raised on every rank): rank 0 removes the partial ``tmp`` and
        words one line, naming a full disk as such (``_out_of_space``, or less free space
        than the checkpoint needs, ``state_bytes``, once the partial write is gone).
        Collective.

        Raises:
            CheckpointError: always, the same line on every rank.
        """
        # Every rank is here (DCP raised on all): the state's size, in case the known one was
        # an underestimate (a write that ran out of space at a size thought to fit).
        need = max(self.checkpoint_bytes or 0, state_bytes(self.states))

        def on_rank0() -> str:
            shutil.rmtree(tmp, ignore_errors=True)
            free = shutil.disk_usage(self.folder).free
            if _out_of_space(err) or free < need:
                return self._no_space(step, need, free)
            return (
                f"checkpoint step-{step} could not be written to {self.folder}: "
                f"{describe_load_error(err)}{self._newest_kept()}"
            )

        raise CheckpointError(decided_by_rank0(on_rank0, f"checkpoint {tmp} failed"))

    def finish(self) -> None:
        """Wait for a background save (``async_mode = "async"``) and publish it; nothing
        without one. Collective.

        Raises:
            CheckpointError: the background write failed (on every rank: DCP's collectives),
                worded as for a synchronous save.
        """
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        try:
            metadata = pending.future.result()
        except (Exception, CheckpointException) as e:
            self._write_failed(e, pending.step, pending.tmp)
        self._publish(metadata, pending.tmp, pending.final)

    def _publish(self, metadata: Metadata, tmp: str, final: str) -> None:
        """Manifest (``checkpoint.verify``), atomic rename of ``tmp`` to ``final``,
        ``keep_latest_k``: the ranks hash, rank 0 writes and renames and hands the outcome to
        every rank. Collective.

        Raises:
            CheckpointError: writing the manifest or renaming failed (on every rank).
        """
        dist.barrier()
        digests = manifest_digests(tmp, metadata, self.rank) if self.verify else None

        def on_rank0() -> int:
            if digests is not None:
                write_manifest_file(tmp, digests)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.folder)
            self._purge()
            return folder_bytes(final)

        self.checkpoint_bytes = decided_by_rank0(
            on_rank0, f"checkpoint {final} could not be published"
        )
        logger.info(f"saved checkpoint {final}")

    def _purge(self) -> None:
        """Rank 0: delete all but the newest ``keep_latest_k`` checkpoints, and the newest
        confirmed one (a step before ``finite_through``) whatever its age."""
        if self.keep_latest_k <= 0:
            return
        steps = complete_steps(self.folder)
        keep = set(steps[-self.keep_latest_k :])
        confirmed = [s for s in steps if s < self.finite_through]
        if confirmed:
            keep.add(confirmed[-1])
        self._purge_due = len(keep) > self.keep_latest_k
        for old in steps:
            if old not in keep:
                shutil.rmtree(os.path.join(self.folder, f"step-{old}"), ignore_errors=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def reshard_like(src: dict[str, Any], like: dict[str, Any], what: str) -> dict[str, Any]:
    """``src`` laid out as ``like``: the in-memory counterpart of saving ``src`` with DCP and
    loading it into a state dict shaped as ``like`` (DCP's resharding on load).

    Both are flat state dicts of the same model on two meshes (``ModelWrapper`` /
    ``OptimizersContainer`` state dicts: FQN keys, DTensor parameters and optimizer states as
    FSDP2 and TP lay them out). A DTensor whose layout is unchanged (the same global ranks in
    the same mesh grid, the same placements: a curriculum stage that trades dp_shard for cp
    keeps the FSDP mesh dp_shard x cp) keeps its local shard, without a copy or a
    collective. Another is gathered over its old mesh (``full_tensor``) and sliced locally to
    its new one (``distribute_tensor`` with ``src_data_rank=None``: no second collective),
    one tensor at a time. Plain tensors and other values are taken as they are.

    Collective over each resharded tensor's old mesh: every rank calls it with the keys of
    its own model part (the same keys on the ranks of one pipeline stage).

    Args:
        src: the state to move (its tensors may be shared with the result).
        like: the target's own state dict, for the target layouts (its values are not read).
        what: the state's name (``"model"``, ``"optimizer"``), for errors.

    Returns:
        ``like``'s keys with ``src``'s values in ``like``'s layouts.

    Raises:
        ValueError: the two hold different keys (e.g. a different pipeline split) or a tensor
            of another global shape.
    """
    if set(src) != set(like):
        missing, extra = sorted(set(like) - set(src)), sorted(set(src) - set(like))
        raise ValueError(
            f"{what}: the states differ in keys (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    out: dict[str, Any] = {}
    for key in sorted(like):  # one order on every rank: the gathers below are collectives
        value, target = src[key], like[key]
        if not isinstance(target, DTensor):
            out[key] = value.full_tensor() if isinstance(value, DTensor) else value
            continue
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"{what}: {key} has shape {tuple(value.shape)}, expected {tuple(target.shape)}"
            )
        if isinstance(value, DTensor) and _same_layout(value, target):
            local = value.to_local()
        else:
            full = value.full_tensor() if isinstance(value, DTensor) else value
            local = distribute_tensor(
                full, target.device_mesh, target.placements, src_data_rank=None
            ).to_local()
            del full
        out[key] = DTensor.from_local(
            local,
            target.device_mesh,
            target.placements,
            run_check=False,
            shape=target.shape,
            stride=target.stride(),
        )
    return out


def _same_layout(a: DTensor, b: DTensor) -> bool:
    """Whether every rank holds the same local shard of ``a`` and ``b``: the same device type,
    rank grid and placements (the mesh objects and their dim names may differ)."""
    ma, mb = a.device_mesh, b.device_mesh
    return (
        ma.device_type == mb.device_type
        and tuple(a.placements) == tuple(b.placements)
        and torch.equal(ma.mesh, mb.mesh)
    )


def transfer_state(dst: dict[str, Stateful], src: dict[str, Stateful]) -> None:
    """Load ``src``'s training state (``STATE_KEYS``) into ``dst`` in memory, as saving ``src``
    to a checkpoint and loading it into ``dst`` would (``dst`` may be on another mesh: see
    ``reshard_like``). Model and optimizer tensors of an unchanged layout are shared, not
    copied into new memory where the loader keeps them (the optimizer's states); the other
    states are deep-copied. Collective.

    Raises:
        ValueError: the model or optimizer of ``dst`` holds other parameters than ``src``'s.
    """
    for key in STATE_KEYS:
        state = src[key].state_dict()
        if key in ("model", "optimizer"):
            state = reshard_like(state, dst[key].state_dict(), key)
        else:
            state = copy.deepcopy(state)
        dst[key].load_state_dict(state)
