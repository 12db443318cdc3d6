"""Before the first collective: the recipe parsed and checked (``validate.RULES``, every phase)
and the data loaded (``prepare``), one curriculum stage's recipe (``prepare_stage``), and the
ranks' logging. Everything here can fail on a bad recipe, so it runs on every rank before any
collective: a bad recipe exits on every rank with one message instead of hanging.
"""

import dataclasses
import logging
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchtitan.components.tokenizer import BaseTokenizer

from torchtitan_ext.config.manager import load_config
from torchtitan_ext.curriculum import MeshPlanner, Stage, stage_config
from torchtitan_ext.data import (
    Tokens,
    build_tokenizer,
    is_prepared,
    load_documents,
    long_documents,
    open_prepared,
    split_documents,
    tokenize,
    tokenize_with_offsets,
    tokenizer_identity,
)
from torchtitan_ext.data.corpus import local_documents
from torchtitan_ext.data.mixture import open_sources
from torchtitan_ext.distributed import RankInfo, configure_cuda_allocator
from torchtitan_ext.errors import ConfigError
from torchtitan_ext.parallel_dims import ParallelDims
from torchtitan_ext.validate import (
    RecipeData,
    check_data,
    check_recipe,
    resolve_model_args,
    validate,
)

logger = logging.getLogger("torchtitan_ext")


@dataclass
class Prepared:
    """Everything resolved before the first collective."""

    cfg: Any
    rank: RankInfo
    dims: ParallelDims
    device: torch.device
    backend: str
    tokenizer: BaseTokenizer
    train_tokens: Tokens
    """The training token stream: an int32 array, or a prepared corpus's memory-mapped
    ``TokenStream``."""
    val_tokens: Tokens
    model_args: Any
    stages: list[Stage] = dataclasses.field(default_factory=list)
    """Curriculum stages ([] without a curriculum); ``cfg`` is then stage 0's recipe."""
    train_doc_offsets: np.ndarray | None = None
    """(n_docs + 1,) offsets of the documents in ``train_tokens`` (for stages' min_doc_tokens)."""
    mixture: list[Tokens] = dataclasses.field(default_factory=list)
    """A stage with a data mixture: each source's token stream (``data.mixture.open_sources``),
    in the order of ``Stage.mixture``; [] otherwise."""


def prepare(args: list[str], rank: RankInfo, mesh_planner: MeshPlanner | None = None) -> Prepared:
    """Parse, check (``validate.RULES``, every phase) and load data: no collective,
    identical on every rank. Unless ``training.device = "cpu"``, first sets the CUDA
    allocator's settings (``configure_cuda_allocator``), before any rule can start CUDA.
    ``mesh_planner`` chooses auto-meshed stages' meshes (the entry point hands in
    ``tools.auto_mesh.choose_stage_mesh``: the runtime never imports the tools).

    Raises:
        ConfigError: any problem with the recipe, the environment or the data.
    """
    recipe = load_config(args)
    if recipe.training.device != "cpu":
        # Before any rule can start CUDA (auto mesh reads the GPU's memory): the caching
        # allocator reads its settings once, when CUDA starts.
        configure_cuda_allocator()
    check = check_recipe(recipe, rank.world_size, rank.local_rank, mesh_planner)
    for note in check.notes:  # settings this device leaves off: one line each, rank 0 logs
        logger.info(note)
    cfg, dims, device = check.cfg, check.dims, check.device
    assert dims is not None and device is not None
    model_args = check.model_args  # the recipe phase's own copy of the flavor's args
    model_args.update_from_config(cfg)
    tokenizer = build_tokenizer(cfg)
    data = _load_data(cfg, tokenizer)
    check_data(check, data)
    return Prepared(
        cfg,
        rank,
        dims,
        device,
        check.backend,
        tokenizer,
        data.train_tokens,
        data.val_tokens,
        model_args,
        check.stages,
        data.train_doc_offsets,
    )


def _load_data(cfg: Any, tokenizer: BaseTokenizer) -> RecipeData:
    """The recipe's training and validation token streams. A prepared corpus (a folder from
    ``python -m torchtitan_ext.data.prepare``) is memory-mapped and checked
    (``data.open_prepared``: manifest, tokenizer, sizes, and hashes with
    ``data.verify_corpus``); anything else is read and tokenized here, on every rank. The
    validation split is the held-out ``data.validation_fraction`` of the training documents, or
    all of ``validation.dataset_path`` when set (then nothing is held out).

    Raises:
        ConfigError: see ``data.load_documents`` and ``data.open_prepared``; problems of
            ``validation.dataset_path`` are keyed by it.
    """
    path, val_path = cfg.training.dataset_path, cfg.validation.dataset_path
    fraction = 0.0 if val_path else cfg.data.validation_fraction
    identity = tokenizer_identity(cfg, tokenizer)
    val: Tokens
    train: Tokens
    if path and is_prepared(path):
        corpus = open_prepared(path, identity, cfg.data.verify_corpus)
        train, offsets, val, n_val = corpus.split(fraction)
    else:
        docs = load_documents(cfg)
        train_docs, val_docs = split_documents(docs, fraction, cfg.data.shuffle_seed)
        train, offsets = tokenize_with_offsets(train_docs, tokenizer)
        val, n_val = np.zeros(0, np.int32), len(val_docs)
        if cfg.validation.enable:
            val = tokenize(val_docs, tokenizer)
    if not cfg.validation.enable:
        val = np.zeros(0, np.int32)
    elif val_path:
        val, n_val = _validation_data(cfg, tokenizer, identity)
    return RecipeData(tokenizer, train, offsets, val, n_val)


def _validation_data(
    cfg: Any, tokenizer: BaseTokenizer, identity: dict[str, Any]
) -> tuple[Tokens, int]:
    """The token stream and document count of ``validation.dataset_path``: a prepared corpus
    (memory-mapped, all of it) or local files (tokenized).

    Raises:
        ConfigError: keyed ``validation.dataset_path``, naming the file.
    """
    key, path = "validation.dataset_path", cfg.validation.dataset_path
    if is_prepared(path):
        corpus = open_prepared(path, identity, cfg.data.verify_corpus, key=key)
        return corpus.stream, corpus.num_documents
    try:
        docs = local_documents(path, cfg.data.text_field)
    except ConfigError as e:
        if e.key == "training.dataset_path":
            raise ConfigError(key, path, e.reason) from None
        raise
    return tokenize(docs, tokenizer), len(docs)


def prepare_stage(p: Prepared, stage: Stage, handed_over: bool) -> Prepared:
    """The Prepared of one curriculum stage: its recipe, mesh degrees and model args (RoPE
    theta, max_seq_len); the tokenized data is shared. No collective.

    Args:
        handed_over: the stage starts from the boundary checkpoint the previous stage of this
            run just wrote. It then loads the newest checkpoint and all of it: the recipe's
            ``load_step``, ``exclude_from_loading`` and initial load apply to where the run
            starts (its first stage), not to the hand-off between stages.
    """
    cfg = stage_config(p.cfg, stage)
    if handed_over:
        cfg.checkpoint = dataclasses.replace(
            cfg.checkpoint,
            load_step=-1,
            exclude_from_loading=[],
            initial_load_path="",
            initial_load_in_hf=False,
        )
    elif stage.index > 0:
        # A run resumed in a later stage: from its checkpoints, not a recipe's start point.
        cfg.checkpoint = dataclasses.replace(
            cfg.checkpoint, initial_load_path="", initial_load_in_hf=False
        )
    dims = validate(cfg, p.rank.world_size)
    assert dims is not None
    model_args = resolve_model_args(cfg)
    model_args.update_from_config(cfg)
    tokens = p.train_tokens
    mixture: list[Tokens] = []
    if stage.mixture:
        mixture = stage_sources(p, stage, p.cfg.data.verify_corpus)
    elif stage.min_doc_tokens and p.train_doc_offsets is not None:
        tokens = long_documents(tokens, p.train_doc_offsets, stage.min_doc_tokens)
    return dataclasses.replace(
        p, cfg=cfg, dims=dims, model_args=model_args, train_tokens=tokens, mixture=mixture
    )


def stage_sources(p: Prepared, stage: Stage, verify: bool = False) -> list[Tokens]:
    """The token streams of ``stage``'s data mixture (``data.mixture.open_sources``: memory-
    mapped, each shard hashed when ``verify``), errors named by the stage's ``mixture`` key."""
    assert stage.mixture and p.train_doc_offsets is not None
    return open_sources(
        f"curriculum.stages[{stage.index}].mixture",
        stage.mixture,
        p.train_tokens,
        p.train_doc_offsets,
        tokenizer_identity(p.cfg, p.tokenizer),
        verify,
    )


def setup_logging(rank: int) -> None:
    """INFO on rank 0, WARNING elsewhere (TorchTitan logs through the root logger too)."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
