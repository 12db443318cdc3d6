"""``Checkpointer``: save, load, publish, purge and async saves of the training state.

TorchTitan 0.2.2's ``CheckpointManager`` (``torchtitan.components.checkpoint``) reworked so
that a crash cannot corrupt a checkpoint (write into ``step-<N>.tmp``, rename once every rank
is done), with a verified manifest (``torchtitan_ext.checkpoint.storage``), fallback to an
older checkpoint, and every decision about the folder taken by rank 0
(``torchtitan_ext.checkpoint.rank0``). Saves and loads are ``torch.distributed.checkpoint``'s
(``dcp.save``, ``dcp.async_save``, ``dcp.load``). The format and its guarantees are described
in the package docstring (``torchtitan_ext.checkpoint``).
"""

import errno
import functools
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.stateful import Stateful
from torchtitan.config import TORCH_DTYPE_MAP

from torchtitan_ext.checkpoint import hf
from torchtitan_ext.checkpoint.rank0 import CheckpointError, decided_by_rank0, one_line
from torchtitan_ext.checkpoint.storage import (
    STATE_KEYS,
    agreed_steps,
    complete_steps,
    describe_load_error,
    find_unloadable_item,
    folder_bytes,
    manifest_digests,
    state_bytes,
    verify_manifest,
    write_manifest_file,
)
from torchtitan_ext.errors import ConfigError
from torchtitan_ext.rope import rope_scaling_of

logger = logging.getLogger("torchtitan_ext")


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


@dataclass
class _PendingSave:
    """A background save (``dcp.async_save``'s future) and where it goes."""

    future: Any
    tmp: str
    final: str
    step: int
    hf_files: list[str] = field(default_factory=list)


class Checkpointer:
    """Saves and loads the training state (see the docstring of ``torchtitan_ext.checkpoint``).

    Args:
        cfg: the merged JobConfig (``checkpoint`` section, ``job.dump_folder``).
        states: the Stateful objects by key (``STATE_KEYS``).
        rank: this process's global rank.
        model_args: the model's TorchTitan args (the Hugging Face state-dict adapter's; needed
            with ``initial_load_in_hf`` or ``last_save_in_hf``).

    Honoured ``checkpoint`` keys: enable, folder, interval, keep_latest_k, load_step,
    exclude_from_loading, initial_load_path, initial_load_model_only, initial_load_in_hf,
    last_save_in_hf, export_dtype (of the Hugging Face export), enable_first_step_checkpoint,
    load_only, verify, allow_unverified, async_mode ("disabled" or "async"). Every save holds
    the full state (model, optimizer, LR scheduler, data loader, train state), including the
    last one, so any checkpoint resumes; with ``last_save_in_hf`` the last step's folder
    holds a Hugging Face export of the model besides (``torchtitan_ext.checkpoint.hf``).

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

    def __init__(
        self, cfg: Any, states: dict[str, Stateful], rank: int, model_args: Any = None
    ) -> None:
        c = cfg.checkpoint
        self.enabled: bool = c.enable
        self.folder = os.path.join(cfg.job.dump_folder, c.folder)
        self.interval: int = c.interval
        self.keep_latest_k: int = c.keep_latest_k
        self.load_step: int = c.load_step
        self.exclude: set[str] = set(c.exclude_from_loading)
        self.initial_load_path: str | None = c.initial_load_path
        self.initial_load_model_only: bool = c.initial_load_model_only
        self.initial_load_in_hf: bool = c.initial_load_in_hf
        self.last_save_in_hf: bool = c.last_save_in_hf
        self.cfg, self.model_args = cfg, model_args
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
        if self.initial_load_in_hf:
            return self._load_hf()
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

    def _load_hf(self) -> int:
        """Load the model from the Hugging Face checkpoint of ``initial_load_path`` (else
        ``model.hf_assets_path``), whose config.json the recipe rules checked; a manifest
        there (one of our exports) is verified. Returns 0. Collective.

        Raises:
            ConfigError: naming the path's key: the files fail to load (DCP's reason).
        """
        key, folder = hf.hf_load_source(self.cfg)
        adapter = hf.build_adapter(self.cfg, self.model_args)
        problem = self._try_load(
            folder,
            ["model"],
            allow_missing=True,
            load=lambda: hf.load_hf(self.states["model"], adapter, folder),
        )
        if problem is not None:
            raise ConfigError(key, folder, problem)
        if self.rank == 0:
            config = hf.read_hf_config(key, folder)
            note = hf.rope_difference(config, self.model_args, rope_scaling_of(self.cfg))
            if note is not None:
                logger.warning(note)
        logger.info(f"loaded the model from the Hugging Face checkpoint {folder}")
        return 0

    def update_model(self, cfg: Any, model_args: Any) -> None:
        """The recipe and model args of a curriculum stage switched in memory (RoPE theta,
        scaling and length change): what a Hugging Face export's config.json says."""
        self.cfg, self.model_args = cfg, model_args

    def _warn(self, message: str) -> None:
        """A warning on rank 0 only (every rank reaches the same conclusion)."""
        if self.rank == 0:
            logger.warning(message)

    def _try_load(
        self,
        path: str,
        keys: list[str],
        allow_missing: bool,
        load: Callable[[], None] | None = None,
    ) -> str | None:
        """Verify (``checkpoint.verify``; a missing manifest fails unless ``allow_missing``)
        and load ``keys`` from ``path`` (or run ``load``: the Hugging Face reader); None on
        success, else the one-line reason, the same on every rank (rank 0's verdict on the
        manifest; DCP gathers load failures). A load that fails while unpickling names the
        file, byte range and key. Collective."""
        if self.verify:
            problem = verify_manifest(path, self.rank, allow_missing)
            if problem is not None:
                return problem
        try:
            if load is not None:
                load()
            else:
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
                logger.warning(f"checkpoint purge in {self.folder} failed: {one_line(e)}")

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
        At the run's last step (``training.steps``) with ``last_save_in_hf`` the folder also
        gets the Hugging Face export of the model (``_save_hf``, written before the state).

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
        hf_files: list[str] = []
        if self.last_save_in_hf and step == self.cfg.training.steps:
            hf_files = self._save_hf(step, tmp)
        try:
            if self.async_save:
                if self._async_group is None:  # every rank saves at the same steps: collective
                    self._async_group = dist.new_group(backend="gloo")
                future = dcp.async_save(
                    dict(self.states), checkpoint_id=tmp, process_group=self._async_group
                )
                self.pending = _PendingSave(future, tmp, final, step, hf_files)
                logger.info(f"saving checkpoint {final} in the background")
                return final
            metadata = dcp.save(dict(self.states), checkpoint_id=tmp)
        except (Exception, CheckpointException) as e:  # DCP gathers failures to every rank
            self._write_failed(e, step, tmp)
        self._publish(metadata, tmp, final, hf_files)
        return final

    def _save_hf(self, step: int, tmp: str) -> list[str]:
        """The Hugging Face export of the model into ``tmp`` (``hf.save_hf``, in
        ``checkpoint.export_dtype``) and its config.json; rank 0 then removes DCP's
        intermediate ``sharded/`` folder. Returns the exported file names (for the manifest).
        Collective.

        Raises:
            CheckpointError: the write failed (one line on every rank; ``tmp`` removed).
        """
        dtype = self.cfg.checkpoint.export_dtype
        adapter = hf.build_adapter(self.cfg, self.model_args)
        try:
            hf.save_hf(self.states["model"], adapter, tmp, TORCH_DTYPE_MAP[dtype])
        except (Exception, CheckpointException) as e:
            self._write_failed(e, step, tmp)
        config = hf.hf_config(
            self.model_args, rope_scaling_of(self.cfg), dtype, self.cfg.training.seq_len
        )

        def on_rank0() -> list[str]:
            with open(os.path.join(tmp, hf.HF_CONFIG), "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
            shutil.rmtree(os.path.join(tmp, hf.SHARDED_DIR), ignore_errors=True)
            return hf.export_files(tmp)

        files = decided_by_rank0(on_rank0, f"checkpoint {tmp}: writing the Hugging Face export")
        logger.info(f"Hugging Face export of step {step}: {', '.join(files)}")
        return files

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
        self._publish(metadata, pending.tmp, pending.final, pending.hf_files)

    def _publish(
        self, metadata: Metadata, tmp: str, final: str, extra_files: list[str] | None = None
    ) -> None:
        """Manifest (``checkpoint.verify``; of the DCP files and ``extra_files``, the
        Hugging Face export), atomic rename of ``tmp`` to ``final``, ``keep_latest_k``: the
        ranks hash, rank 0 writes and renames and hands the outcome to every rank.
        Collective.

        Raises:
            CheckpointError: writing the manifest or renaming failed (on every rank).
        """
        dist.barrier()
        digests = manifest_digests(tmp, metadata, self.rank, extra_files) if self.verify else None

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
