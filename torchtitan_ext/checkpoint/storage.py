"""The on-disk format of a checkpoint and its verification.

What a checkpoint holds (``STATE_KEYS``, ``TrainState``), which ``step-<N>`` folders are
complete (``complete_steps``, ``incomplete_steps``, ``agreed_steps``: the listing of
TorchTitan's ``CheckpointManager._find_load_step``, a ``step-<N>`` folder with DCP's
``.metadata``), sizes (``folder_bytes``, ``state_bytes``: the free-space check of a save),
the integrity manifest (``manifest.json``: xxh3-64 digests of the files DCP's
``FileSystemWriter`` wrote, hashed by the ranks in shares; writing, reading, verifying) and
one-line descriptions of a failed ``torch.distributed.checkpoint`` load
(``describe_load_error``, ``find_unloadable_item``, which reads items as DCP's
``FileSystemReader`` does).
"""

import io
import json
import os
import re
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from torchtitan_ext.checkpoint.rank0 import decided_by_rank0
from torchtitan_ext.errors import ConfigError
from torchtitan_ext.rules import RecipeCheck, Rule

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


def manifest_digests(
    folder: str, metadata: Metadata, rank: int, extra_files: list[str] | None = None
) -> dict[str, Any]:
    """Hash the files of the DCP checkpoint in ``folder`` and ``extra_files`` (names in
    ``folder``, the same on every rank: a Hugging Face export beside it), the ranks sharing
    the work: {name: [size, xxh3-64]}, or {name: error string} for a file that cannot be
    read; the same on every rank. Collective."""
    files = sorted({info.relative_path for info in metadata.storage_data.values()})
    files.append(".metadata")
    files += extra_files or []
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


def _unverified(c: RecipeCheck) -> None:
    """``checkpoint.allow_unverified`` only means something when manifests are checked."""
    ckpt = c.cfg.checkpoint
    if ckpt.allow_unverified and not ckpt.verify:
        raise ConfigError(
            "checkpoint.allow_unverified",
            True,
            "has no effect with checkpoint.verify = false (nothing is verified): drop one",
        )


RULES: tuple[Rule, ...] = (
    Rule(
        "recipe",
        ("checkpoint.allow_unverified", "checkpoint.verify"),
        "allow_unverified only with verify (a checkpoint without a manifest otherwise fails)",
        _unverified,
        "checkpoint.storage",
    ),
)
"""This module's recipe rules (``torchtitan_ext.rules``); ``validate.RULES`` lists them in
its table, in phase order."""
