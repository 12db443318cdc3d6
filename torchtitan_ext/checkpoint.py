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
"""

import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.stateful import Stateful

from torchtitan_ext.config.manager import ConfigError

logger = logging.getLogger("torchtitan_ext")

_STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_KEYS = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state")


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


class Checkpointer:
    """Saves and loads the training state (see the module docstring).

    Args:
        cfg: the merged JobConfig (``checkpoint`` section, ``job.dump_folder``).
        states: the Stateful objects by key (``STATE_KEYS``).
        rank: this process's global rank.

    Honoured ``checkpoint`` keys: enable, folder, interval, keep_latest_k, load_step,
    exclude_from_loading, initial_load_path, initial_load_model_only,
    enable_first_step_checkpoint, load_only. Every save holds the full state (model, optimizer,
    LR scheduler, data loader, train state), including the last one, so any checkpoint resumes.
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
        self.states = states
        self.rank = rank
        unknown = self.exclude - set(STATE_KEYS)
        if unknown:
            raise ConfigError(
                "checkpoint.exclude_from_loading",
                sorted(unknown),
                f"valid entries: {', '.join(STATE_KEYS)}",
            )

    def maybe_load(self) -> int | None:
        """Resume from the latest complete checkpoint (or ``load_step``), else from
        ``initial_load_path``; returns the step loaded, or None when starting fresh.

        Collective when a checkpoint is found.

        Raises:
            ConfigError: ``load_step`` names a step with no complete checkpoint.
        """
        if not self.enabled:
            return None
        steps = complete_steps(self.folder)
        if self.load_step != -1:
            if self.load_step not in steps:
                raise ConfigError(
                    "checkpoint.load_step",
                    self.load_step,
                    f"no complete checkpoint for it in {self.folder} (found steps {steps})",
                )
            step: int | None = self.load_step
        else:
            step = steps[-1] if steps else None
        if step is not None:
            keys = [k for k in STATE_KEYS if k not in self.exclude]
            self._load(os.path.join(self.folder, f"step-{step}"), keys)
            logger.info(f"resumed from {self.folder}/step-{step} ({', '.join(keys)})")
            return step
        if self.initial_load_path:
            keys = ["model"] if self.initial_load_model_only else list(STATE_KEYS)
            self._load(self.initial_load_path, [k for k in keys if k not in self.exclude])
            logger.info(f"loaded {', '.join(keys)} from {self.initial_load_path}")
            return 0
        return None

    def _load(self, path: str, keys: list[str]) -> None:
        state = {k: self.states[k] for k in keys}
        dcp.load(state, checkpoint_id=path)

    def should_save(self, step: int, last_step: bool) -> bool:
        if not self.enabled or self.load_only:
            return False
        return last_step or step % self.interval == 0 or (self.first_step and step == 1)

    def save(self, step: int) -> str:
        """Write the full state as ``step-<step>`` atomically; collective on every rank.

        Returns:
            The final folder.
        """
        final = os.path.join(self.folder, f"step-{step}")
        tmp = final + ".tmp"
        if self.rank == 0:
            os.makedirs(self.folder, exist_ok=True)
            for name in os.listdir(self.folder):
                if name.endswith(".tmp"):
                    shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)
        dist.barrier()
        dcp.save(dict(self.states), checkpoint_id=tmp)
        dist.barrier()
        if self.rank == 0:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.folder)
            self._purge()
        dist.barrier()
        logger.info(f"saved checkpoint {final}")
        return final

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
