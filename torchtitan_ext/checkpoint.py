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
previous complete checkpoint is loaded instead. Once an older checkpoint has loaded, the newer
ones it replaced are renamed ``step-<N>.corrupt`` (failed) or ``step-<N>.superseded`` (an
explicit ``load_step`` roll-back), so that they are kept on disk but neither resumed from nor
counted by ``keep_latest_k``.
"""

import copy
import json
import logging
import os
import re
import shutil
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
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


def write_manifest(folder: str, metadata: Metadata, rank: int) -> None:
    """Hash the files of the DCP checkpoint in ``folder`` (the ranks share the work) and write
    ``manifest.json`` (rank 0): {"files": {name: [size, xxh3-64]}}. Collective."""
    files = sorted({info.relative_path for info in metadata.storage_data.values()})
    files.append(".metadata")
    world = dist.get_world_size() if dist.is_initialized() else 1
    digests = _all_gather_dicts(_digest_share(folder, files, rank, world))
    if rank != 0:
        return
    bad = {k: v for k, v in digests.items() if not isinstance(v, list)}
    if bad:
        raise OSError(f"checkpoint files could not be read back after the save: {bad}")
    path = os.path.join(folder, MANIFEST)
    with open(path, "w") as f:
        json.dump({"hash": "xxh3_64", "files": digests}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def verify_manifest(folder: str, rank: int) -> str | None:
    """Check a checkpoint folder against its ``manifest.json`` (the ranks share the hashing;
    collective). Returns None when it matches or has no manifest (written before manifests or
    with ``checkpoint.verify = false``), else one line naming the first bad file."""
    path = os.path.join(folder, MANIFEST)
    problem: str | None = None
    expected: dict[str, Any] = {}
    if os.path.isfile(path):
        try:
            with open(path) as f:
                expected = json.load(f)["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    files = sorted(expected)
    world = dist.get_world_size() if dist.is_initialized() else 1
    got = _all_gather_dicts(_digest_share(folder, files, rank, world)) if files else {}
    for name in files:
        if problem is not None:
            break
        want, have = expected[name], got.get(name)
        if isinstance(have, str):
            problem = f"{name} {have}"
        elif have is None or have[0] != want[0]:
            problem = f"{name} has {have[0] if have else '?'} bytes, the manifest says {want[0]}"
        elif have[1] != want[1]:
            problem = f"{name} fails its checksum (xxh3-64 {have[1]}, manifest {want[1]})"
    return problem


def describe_load_error(err: BaseException) -> str:
    """One line for a failed ``dcp.load``: the first failing rank's exception (DCP gathers
    them into a ``CheckpointException``), its type and the first line of its message."""
    if isinstance(err, CheckpointException) and err.failures:
        rank, (exc, _tb) = next(iter(sorted(err.failures.items(), key=lambda kv: kv[0])))
        err, where = exc, f" (rank {rank})"
    else:
        where = ""
    lines = "".join(traceback.format_exception_only(type(err), err)).strip().splitlines()
    return (lines[-1] if lines else type(err).__name__)[:300] + where


@dataclass
class _PendingSave:
    """A background save (``dcp.async_save``'s future) and where it goes."""

    future: Any
    tmp: str
    final: str


class Checkpointer:
    """Saves and loads the training state (see the module docstring).

    Args:
        cfg: the merged JobConfig (``checkpoint`` section, ``job.dump_folder``).
        states: the Stateful objects by key (``STATE_KEYS``).
        rank: this process's global rank.

    Honoured ``checkpoint`` keys: enable, folder, interval, keep_latest_k, load_step,
    exclude_from_loading, initial_load_path, initial_load_model_only,
    enable_first_step_checkpoint, load_only, verify, async_mode ("disabled" or "async"). Every
    save holds the full state (model, optimizer, LR scheduler, data loader, train state),
    including the last one, so any checkpoint resumes.

    With ``async_mode = "async"`` (TorchTitan's key) a save stages the state in memory and
    writes it in a background thread (``dcp.async_save`` over a process group of its own);
    training goes on, and the checkpoint is published (manifest, rename to ``step-<N>``,
    ``keep_latest_k``) by ``finish``, at the next save or at the end of training. Until then
    it is a ``.tmp`` folder, which a resume ignores: a crash meanwhile loses that checkpoint,
    never an older one.
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
        self.states = states
        self.rank = rank
        self.async_save: bool = c.async_mode == "async"
        self._async_group: dist.ProcessGroup | None = None
        self.pending: _PendingSave | None = None
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

        A newer checkpoint that fails is reported (one warning naming the folder and file) and
        the next older one is tried; after a successful load the failed ones are renamed
        ``step-<N>.corrupt``. Collective when a checkpoint folder exists.

        Raises:
            ConfigError: ``load_step`` names a step with no complete checkpoint or one that
                fails; or every complete checkpoint fails (each reason listed).
        """
        if not self.enabled:
            return None
        steps = complete_steps(self.folder)
        incomplete = incomplete_steps(self.folder)
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
            problem = self._try_load(path, keys)
            if problem is None:
                logger.info(f"resumed from {path} ({', '.join(keys)})")
                unusable = {s for s, _ in failed} | set(incomplete)
                newer = sorted(s for s in set(steps) | unusable if s > step)
                self._set_aside(newer, unusable, step)
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
            problem = self._try_load(self.initial_load_path, keys)
            if problem is not None:
                raise ConfigError("checkpoint.initial_load_path", self.initial_load_path, problem)
            logger.info(f"loaded {', '.join(keys)} from {self.initial_load_path}")
            return 0
        return None

    def _warn(self, message: str) -> None:
        """A warning on rank 0 only (every rank reaches the same conclusion)."""
        if self.rank == 0:
            logger.warning(message)

    def _try_load(self, path: str, keys: list[str]) -> str | None:
        """Verify (``checkpoint.verify``) and load ``keys`` from ``path``; None on success,
        else the one-line reason, the same on every rank. Collective."""
        if self.verify:
            problem = verify_manifest(path, self.rank)
            if problem is not None:
                return problem
        try:
            dcp.load({k: self.states[k] for k in keys}, checkpoint_id=path)
        except ConfigError:
            raise  # the recipe cannot use this state (a Stateful said so): not corruption
        except (Exception, CheckpointException) as e:  # DCP raises the latter on every rank
            return describe_load_error(e)
        return None

    def _set_aside(self, newer: list[int], failed: set[int], loaded: int) -> None:
        """Rename the checkpoints ``newer`` than the one ``loaded`` (listed before the load,
        the same on every rank; rank 0 renames, then a barrier): those that ``failed`` to
        ``step-<N>.corrupt``, the others (a ``load_step`` roll-back) to
        ``step-<N>.superseded``. Kept on disk; never resumed from or purged. Collective."""
        if self.rank == 0:
            for s in newer:
                src = os.path.join(self.folder, f"step-{s}")
                kind = "corrupt" if s in failed else "superseded"
                dst, n = f"{src}.{kind}", 1
                while os.path.exists(dst):  # an earlier one of the same step: keep both
                    n += 1
                    dst = f"{src}.{kind}-{n}"
                os.rename(src, dst)
                self._warn(f"moved {src} to {dst} (newer than the resumed step-{loaded})")
            if newer:
                _fsync_dir(self.folder)
        if dist.is_initialized():
            dist.barrier()

    def should_save(self, step: int, last_step: bool) -> bool:
        if not self.enabled or self.load_only:
            return False
        return last_step or step % self.interval == 0 or (self.first_step and step == 1)

    def save(self, step: int) -> str:
        """Write the full state as ``step-<step>`` atomically (with its manifest when
        ``checkpoint.verify``); collective on every rank. With ``async_mode = "async"`` the
        write goes on in the background and ``finish`` publishes it (a pending one first).

        Returns:
            The final folder.
        """
        self.finish()
        final = os.path.join(self.folder, f"step-{step}")
        tmp = final + ".tmp"
        if self.rank == 0:
            os.makedirs(self.folder, exist_ok=True)
            for name in os.listdir(self.folder):
                if name.endswith(".tmp"):
                    shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)
        dist.barrier()
        if self.async_save:
            if self._async_group is None:  # every rank saves at the same steps: collective
                self._async_group = dist.new_group(backend="gloo")
            future = dcp.async_save(
                dict(self.states), checkpoint_id=tmp, process_group=self._async_group
            )
            self.pending = _PendingSave(future, tmp, final)
            logger.info(f"saving checkpoint {final} in the background")
            return final
        self._publish(dcp.save(dict(self.states), checkpoint_id=tmp), tmp, final)
        return final

    def finish(self) -> None:
        """Wait for a background save (``async_mode = "async"``) and publish it; nothing
        without one. Collective.

        Raises:
            Exception: what the background write raised (on every rank: DCP's collectives).
        """
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        metadata = pending.future.result()
        self._publish(metadata, pending.tmp, pending.final)

    def _publish(self, metadata: Metadata, tmp: str, final: str) -> None:
        """Manifest (``checkpoint.verify``), atomic rename of ``tmp`` to ``final``,
        ``keep_latest_k``. Collective."""
        dist.barrier()
        if self.verify:
            write_manifest(tmp, metadata, self.rank)
        if self.rank == 0:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.folder)
            self._purge()
        dist.barrier()
        logger.info(f"saved checkpoint {final}")

    def _purge(self) -> None:
        if self.keep_latest_k <= 0:
            return
        for old in complete_steps(self.folder)[: -self.keep_latest_k]:
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
