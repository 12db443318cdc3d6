"""The types of the recipe rules, shared by the features that declare rules and the table that
runs them (``torchtitan_ext.validate``): a leaf module that imports nothing of torchtitan_ext
at run time, so a feature declares its rules next to its code without importing the table.

A rule is a ``Rule``: the phase it runs in, the keys it judges, what it requires, and a check
that raises ``ConfigError`` naming the key and value (one line, on every rank, before any
collective) and may fill in the ``RecipeCheck`` for later rules.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import numpy as np
    import torch

    from torchtitan_ext.curriculum import MeshPlanner, Stage
    from torchtitan_ext.data.stream import Tokens
    from torchtitan_ext.parallel_dims import ParallelDims

Phase = Literal["curriculum", "recipe", "mesh", "trainer", "device", "data"]
PHASES: tuple[Phase, ...] = ("curriculum", "recipe", "mesh", "trainer", "device", "data")


@dataclass
class RecipeData:
    """The data the ``data`` phase checks (``trainer.prepare`` loads it).

    Attributes:
        tokenizer: the recipe's tokenizer (``data.build_tokenizer``).
        train_tokens: (n,) int32 token stream of the training documents (a
            ``data.TokenStream`` of memory-mapped shards for a prepared corpus).
        train_doc_offsets: (n_docs + 1,) int64 offsets of the documents in ``train_tokens``.
        val_tokens: (m,) int32 token stream of the validation documents (empty when
            validation is off; a ``data.TokenStream`` for a prepared corpus).
        val_documents: number of documents in the validation split.
    """

    tokenizer: Any
    train_tokens: "Tokens"
    train_doc_offsets: "np.ndarray"
    val_tokens: "Tokens"
    val_documents: int


@dataclass
class RecipeCheck:
    """One recipe under check: what the rules read, and what they resolve for later phases.

    Attributes:
        cfg: the merged JobConfig (after the ``curriculum`` phase: the first stage's).
        world_size: ranks of the job, or None (the ``curriculum`` and ``mesh`` phases need it).
        local_rank: this rank's index on its node (the ``device`` phase).
        model_args: TorchTitan model args of ``model.flavor`` (``recipe`` phase).
        dims: the mesh degrees (``mesh`` phase).
        stages: the curriculum stages, [] without one (``curriculum`` phase).
        device, backend: this rank's training device and process-group backend (``device``).
        data: the loaded data (set by the caller of the ``data`` phase).
        mesh_planner: chooses auto-meshed stages' meshes (``curriculum.MeshPlanner``; the
            entry points hand in ``tools.auto_mesh.choose_stage_mesh``), or None.
        notes: one line each for settings this device leaves off without refusing the recipe
            (e.g. memory snapshots on CPU); the checker prints them, training logs them.
    """

    cfg: Any
    world_size: int | None = None
    local_rank: int = 0
    model_args: Any = None
    dims: "ParallelDims | None" = None
    stages: "list[Stage]" = field(default_factory=list)
    device: "torch.device | None" = None
    backend: str = ""
    data: RecipeData | None = None
    mesh_planner: "MeshPlanner | None" = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Rule:
    """One rule of ``RULES``.

    Attributes:
        phase: when it runs (``PHASES``).
        keys: the recipe keys (or sections) it judges.
        what: what it requires, in one line.
        check: raises ``ConfigError`` when the recipe breaks the rule; may fill in the
            ``RecipeCheck``.
        where: the module that owns the check.
    """

    phase: Phase
    keys: tuple[str, ...]
    what: str
    check: Callable[[RecipeCheck], None]
    where: str
