"""The run over the recipe's curriculum: one ``Trainer``, or one per stage from the stage of the
latest checkpoint on, each continuing from the previous one (in memory or through the
boundary checkpoint).
"""

import gc
import logging
import os

from torchtitan_ext.checkpoint import agreed_steps
from torchtitan_ext.curriculum import Stage, format_plan, rope_label, stage_name, stage_of_step
from torchtitan_ext.data.mixture import format_supply
from torchtitan_ext.trainer.base import ResumeEarlierStage
from torchtitan_ext.trainer.core import Trainer
from torchtitan_ext.trainer.setup import Prepared, prepare_stage, stage_sources
from torchtitan_ext.validate import stage_batch_note, unit_len

logger = logging.getLogger("torchtitan_ext")


def run(p: Prepared) -> None:
    """Train the recipe: one Trainer, or with a curriculum one per stage from the stage of the
    latest checkpoint on. At each boundary the last stage's final step is checkpointed, and the
    next stage builds its mesh (its CP degree may differ), model (RoPE theta and length),
    optimizer and data loader anew and loads that checkpoint through DCP, which reshards it
    to the new mesh. Collective.
    """
    if not p.stages:
        Trainer(p).train()
        return
    logger.info(
        "curriculum (its stages set seq_len, steps and batch: the recipe's training.seq_len, "
        "training.steps, batch sizes and validation seq_len and batch are not used):\n"
        + format_plan(p.stages)
        + "".join(f"\n{line}" for line in _supply_lines(p))
    )
    ckpt = p.cfg.checkpoint
    folder = os.path.join(p.cfg.job.dump_folder, ckpt.folder)
    # Rank 0's listing on every rank: a stale view elsewhere must not pick another stage.
    done = agreed_steps(folder)[0] if ckpt.load_step == -1 else [ckpt.load_step]
    first = stage_of_step(p.stages, done[-1] if done else 0)
    while True:
        try:
            _run_stages(p, p.stages[first.index :])
            return
        except ResumeEarlierStage as e:
            # The newer checkpoints failed to load and were set aside (Checkpointer): go on
            # from the stage of the one that loaded.
            first = stage_of_step(p.stages, e.step)
            logger.warning(f"resuming from step {e.step}: stage {first.index} again")
        gc.collect()  # the abandoned stage's trainer


def _run_stages(p: Prepared, stages: list[Stage]) -> None:
    """Train ``stages`` in order, one Trainer each (see ``run``). Collective.

    Raises:
        ResumeEarlierStage: the first stage's trainer loaded a checkpoint of an earlier stage.
    """
    switch_started: float | None = None
    trainer: Trainer | None = None
    for i, stage in enumerate(stages):
        logger.info(
            f"stage {stage_name(stage.index, len(p.stages))}: steps {stage.first_step}-"
            f"{stage.last_step}, seq_len {stage.seq_len}, cp {stage.cp}, dp_shard "
            f"{stage.dp_shard}, global batch {stage.global_batch_size}, rope_theta "
            f"{stage.rope_theta or 'flavor default'}, rope scaling {rope_label(stage.rope)}"
        )
        note = stage_batch_note(stage, p.cfg.parallelism.data_parallel_replicate_degree)
        if note is not None and p.rank.rank == 0:
            logger.warning(note)
        prepared = prepare_stage(p, stage, handed_over=i > 0)
        if stage.mixture:
            supply = format_supply(stage.mixture, prepared.mixture, unit_len(p.stages))
            logger.info(f"stage {stage.index} data mixture: {supply}")
        mode = trainer.switch_mode(prepared) if trainer is not None else "disk"
        if trainer is not None and mode == "same mesh":
            trainer.switch_stage(prepared, stage)
        elif trainer is not None and mode == "re-mesh":
            old, trainer = trainer, Trainer(prepared, stage, len(p.stages))
            trainer.take_state(old)
            # A boundary checkpoint still being written finishes in this stage.
            trainer.checkpointer.pending, old.checkpointer.pending = old.checkpointer.pending, None
            del old
            gc.collect()  # the last stage's model and optimizer
        else:
            if trainer is not None:
                trainer.checkpointer.finish()  # the next stage loads it
            trainer = None
            gc.collect()  # free the last stage's model and optimizer before the next is built
            trainer = Trainer(prepared, stage, len(p.stages))
        c = prepared.cfg.curriculum
        # The next stage starts from memory unless this stage's end is on disk: skip that
        # checkpoint only when asked to (a crash then resumes from the last interval one).
        trainer.save_at_end = (
            stage.index == len(p.stages) - 1 or c.boundary_checkpoint or not c.switch_in_memory
        )
        trainer.train(until=stage.last_step, switch_started=switch_started)
        switch_started = trainer.last_step_ended


def _supply_lines(p: Prepared) -> list[str]:
    """Under the plan table, per stage with a data mixture: each source's weight, its tokens
    and how many tokens of the stage it supplies before it repeats (``format_supply``; the
    sources memory-mapped, not hashed)."""
    lines = []
    for stage in p.stages:
        if not stage.mixture or p.train_doc_offsets is None:
            continue
        supply = format_supply(stage.mixture, stage_sources(p, stage), unit_len(p.stages))
        lines.append(f"stage {stage.index} data mixture: {supply}")
    return lines
