"""The training loop, in TorchTitan's style (``Trainer.train -> train_step``), on CPU/gloo and
CUDA/NCCL.

Reuses TorchTitan 0.2.2's schema, model registry, loss, optimizer and LR-scheduler builders and
gradient clipping; not its ``Trainer`` (which assumes CUDA). Start-up order matters: everything
that can fail on a bad recipe (config, mesh degrees, dataset, tokenizer) runs on every rank
before the first collective, so a bad recipe exits on every rank with one message instead of
hanging.

One module per concern, each importing only those listed before it:

- ``setup``: recipe -> checked config and data (``prepare``, ``prepare_stage``), logging; no
  collective.
- ``base``: what a ``Trainer`` holds (declared for its mixins), shared helpers, and the
  exceptions that end a run early.
- ``step``: the training step (``train_step``) and its pieces.
- ``validation``: the validation windows and loss.
- ``guards``: stop signals, the non-finite guard, the training timeout.
- ``switch``: curriculum stage switches of one trainer, the recipe's LR, boundary records.
- ``core``: ``Trainer`` (the mixins above), its construction and the training loop.
- ``stages``: the run over the curriculum's stages (``run``).
- ``entry``: ``train.py``'s entry point (``main``) and its exit statuses and lines.
"""

from torchtitan_ext.trainer.base import (
    ResumeEarlierStage,
    TrainingDiverged,
    TrainingStopped,
)
from torchtitan_ext.trainer.core import Trainer
from torchtitan_ext.trainer.entry import lock_outputs, main
from torchtitan_ext.trainer.setup import Prepared, prepare, prepare_stage, setup_logging
from torchtitan_ext.trainer.stages import run
from torchtitan_ext.trainer.validation import validation_window_count

__all__ = [
    "Prepared",
    "ResumeEarlierStage",
    "Trainer",
    "TrainingDiverged",
    "TrainingStopped",
    "lock_outputs",
    "main",
    "prepare",
    "prepare_stage",
    "run",
    "setup_logging",
    "validation_window_count",
]
