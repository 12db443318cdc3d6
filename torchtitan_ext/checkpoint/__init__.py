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

Hugging Face checkpoints (``checkpoint.initial_load_in_hf``, ``last_save_in_hf``): module
``hf``; the export lies in the last step's folder beside the full state, in its manifest.

Modules, lowest first: ``rank0`` (``decided_by_rank0``, ``CheckpointError``), ``storage`` (the
on-disk format: state keys, step listing, sizes, the manifest and its verification, load-error
lines), ``hf`` (Hugging Face: config.json check and export, load and save through
TorchTitan's state-dict adapter and DCP's HF storage), ``checkpointer`` (``Checkpointer``:
save, load, publish, purge, async) and ``reshard`` (the in-memory counterpart of a save and a
load into another mesh: ``transfer_state``).
"""

from torchtitan_ext.checkpoint.checkpointer import Checkpointer
from torchtitan_ext.checkpoint.rank0 import CheckpointError
from torchtitan_ext.checkpoint.reshard import transfer_state
from torchtitan_ext.checkpoint.storage import TrainState, agreed_steps, complete_steps

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "TrainState",
    "agreed_steps",
    "complete_steps",
    "transfer_state",
]
