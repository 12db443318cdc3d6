"""Every rule a recipe must pass, in one place: the table ``RULES``, run in phase order.

``train.py`` (``trainer.prepare``) and the checker (``python -m torchtitan_ext.config``) run the
same table, so the checker cannot accept what training rejects; only the ``data`` phase needs
the corpus and runs in training alone. Each rule raises one ``ConfigError`` naming the key and
the value, on every rank, before any collective (TorchTitan 0.2.2 asserts some of these deep in
its trainer, after process groups exist, where a bad value hangs or prints one traceback per
rank, and misses others).

Phases (``PHASES``), each filling in part of ``RecipeCheck`` for the next:

- ``curriculum`` (world size known): plan every ``[[curriculum.stages]]`` (each stage's recipe
  passes the ``recipe`` and ``mesh`` phases itself); the rest then checks the first stage's;
- ``recipe``: one config on its own (no world size): values, model, degrees, patterns;
- ``mesh`` (world size known): the mesh (``ParallelDims``) and the batch it implies;
- ``trainer``: the TorchTitan settings this trainer does not implement (``UNSUPPORTED``). Not
  part of ``validate``, so the dry run and the planners still estimate any TorchTitan recipe;
- ``device``: the training device and process-group backend of this rank, and what they and
  the installed torch allow;
- ``data`` (training only): the tokenizer and the corpus against the model and the batches.

Each feature declares its rules next to its code (a ``RULES`` tuple of ``rules.Rule`` in
``parallel_dims``, ``curriculum``, ``distributed``, ``long_context``, ``converters``,
``profiling`` and the ``parallel`` modules); this module, above the features, assembles the
one table from that explicit list (the order within a phase matters: a rule may read what an
earlier one resolved) and holds the rules that judge the recipe as a whole (values in range,
the model, the batch, the data). The features never import this module; ``python -m
torchtitan_ext.config --list-rules`` shows every rule.
"""

from typing import TYPE_CHECKING, Any

from torchtitan_ext import (
    converters,
    curriculum,
    distributed,
    long_context,
    metrics,
    parallel_dims,
    profiling,
)
from torchtitan_ext.checkpoint import hf as checkpoint_hf
from torchtitan_ext.checkpoint import storage as checkpoint_storage
from torchtitan_ext.config.tables import UNSUPPORTED
from torchtitan_ext.errors import ConfigError
from torchtitan_ext.parallel import (
    activation_checkpoint,
    context_parallel,
    cp_block_causal,
    cp_patterns,
    cpu_ring_attention,
    fsdp,
    pipeline,
)
from torchtitan_ext.parallel.cp_documents import ATTN_MASK_TYPES
from torchtitan_ext.parallel_dims import (
    ParallelDims,
    check_degrees,
    seq_len_divisor,
)
from torchtitan_ext.rules import PHASES, Phase, RecipeCheck, RecipeData, Rule

if TYPE_CHECKING:
    from torchtitan_ext.curriculum import MeshPlanner, Stage
    from torchtitan_ext.data.stream import Tokens


def _positive(c: RecipeCheck) -> None:
    _check_positive(c.cfg)


def _model(c: RecipeCheck) -> None:
    c.model_args = resolve_model_args(c.cfg)


def _heads(c: RecipeCheck) -> None:
    _check_heads(c.model_args, c.cfg.parallelism.tensor_parallel_degree)


def _seq_lens(c: RecipeCheck) -> None:
    p = c.cfg.parallelism
    tp, cp = p.tensor_parallel_degree, p.context_parallel_degree
    _check_seq_len(c.cfg, "training.seq_len", c.cfg.training.seq_len, tp, cp)
    if c.cfg.validation.enable:
        _check_seq_len(c.cfg, "validation.seq_len", c.cfg.validation.seq_len, tp, cp)


def _validation_fraction(c: RecipeCheck) -> None:
    fraction = c.cfg.data.validation_fraction
    if not 0.0 <= fraction < 0.5:
        raise ConfigError("data.validation_fraction", fraction, "must be in [0, 0.5)")


def _optimizer(c: RecipeCheck) -> None:
    if c.cfg.optimizer.name not in ("Adam", "AdamW"):
        raise ConfigError("optimizer.name", c.cfg.optimizer.name, "supported: Adam, AdamW")


def _trainer_support(c: RecipeCheck) -> None:
    check_trainer_support(c.cfg)


def _batch(c: RecipeCheck) -> None:
    assert c.dims is not None
    _check_batch(c.cfg, c.dims)


def _curriculum(c: RecipeCheck) -> None:
    from torchtitan_ext.curriculum import stage_config

    assert c.world_size is not None
    c.stages = plan_curriculum(c.cfg, c.world_size, c.mesh_planner)
    if c.stages:
        c.cfg = stage_config(c.cfg, c.stages[0])


def _vocab(c: RecipeCheck) -> None:
    assert c.data is not None
    vocab = c.data.tokenizer.get_vocab_size()
    if vocab > c.model_args.vocab_size:
        raise ConfigError(
            "model.flavor",
            c.cfg.model.flavor,
            f"vocab_size {c.model_args.vocab_size} is smaller than the tokenizer's {vocab}",
        )


def _validation_split(c: RecipeCheck) -> None:
    assert c.data is not None
    if c.cfg.validation.enable and not c.data.val_documents:
        raise ConfigError("validation.enable", True, "data.validation_fraction leaves no documents")


def _training_windows(c: RecipeCheck) -> None:
    """Fail now, not at the first step, when the data cannot fill one global batch of the run
    or of any stage (a stage with ``min_doc_tokens`` draws from its long documents only)."""
    from torchtitan_ext.data import long_documents

    assert c.data is not None and c.dims is not None
    cfg, d = c.cfg, c.data
    seed = cfg.data.shuffle_seed
    _check_fills_global_batch(
        "training.global_batch_size",
        d.train_tokens,
        cfg.training.seq_len,
        global_batch_size(cfg, c.dims),
        seed,
    )
    unit = unit_len(c.stages)
    for s in c.stages:
        if s.mixture:
            continue  # its sources: _mixtures
        stream = d.train_tokens
        if s.min_doc_tokens:
            stream = long_documents(d.train_tokens, d.train_doc_offsets, s.min_doc_tokens)
        if len(stream) < s.seq_len + 1:
            raise ConfigError(
                f"curriculum.stages[{s.index}].min_doc_tokens",
                s.min_doc_tokens,
                f"leaves {len(stream)} training tokens, less than one window of {s.seq_len}",
            )
        key = f"curriculum.stages[{s.index}].global_batch_size"
        _check_fills_global_batch(key, stream, s.seq_len, s.global_batch_size, seed, unit)


def _mixtures(c: RecipeCheck) -> None:
    """Every stage's mixture names sources that open (``train`` or a prepared corpus of this
    tokenizer) and that hold one unit each (after their minimum document length)."""
    from torchtitan_ext.data import PackedWindows, tokenizer_identity
    from torchtitan_ext.data.mixture import open_sources

    assert c.data is not None
    unit = unit_len(c.stages)
    for s in c.stages:
        if not s.mixture:
            continue
        key = f"curriculum.stages[{s.index}].mixture"
        identity = tokenizer_identity(c.cfg, c.data.tokenizer)
        d = c.data
        streams = open_sources(
            key, s.mixture, d.train_tokens, d.train_doc_offsets, identity, c.cfg.data.verify_corpus
        )
        for (src, _, minimum), stream in zip(s.mixture, streams, strict=True):
            try:
                PackedWindows(stream, s.seq_len, 0, unit_len=unit)
            except ConfigError:
                raise ConfigError(
                    key,
                    src,
                    f"holds {len(stream)} tokens in documents of >= {minimum} tokens, less "
                    f"than one unit of {max(unit, s.seq_len) + 1}",
                ) from None


def _validation_windows(c: RecipeCheck) -> None:
    """The validation split holds one window of the run's and of every stage's length."""
    from torchtitan_ext.data import PackedWindows

    assert c.data is not None
    if not c.cfg.validation.enable:
        return
    for seq_len in [c.cfg.validation.seq_len, *(s.seq_len for s in c.stages)]:
        PackedWindows(c.data.val_tokens, seq_len, 0, shuffle=False, key="validation")


_HERE = "validate"
_POSITIVE_KEYS = (
    "training.seq_len", "training.local_batch_size", "training.global_batch_size",
    "training.steps", "training.max_norm", "optimizer.lr", "lr_scheduler.warmup_steps",
    "metrics.log_freq", "checkpoint.interval", "checkpoint.keep_latest_k", "validation.freq",
    "training.max_consecutive_nonfinite_steps", "training.loss_chunk_tokens",
    "training.mlp_tile_tokens", "checkpoint.stop_grace_seconds",
)  # fmt: skip

RULES: tuple[Rule, ...] = (
    # curriculum: plan the stages (each checked by the recipe and mesh phases), then what
    # the stages need of the rest of the recipe.
    Rule(
        "curriculum",
        ("curriculum",),
        "every stage resolves (seq_len increasing, CP degree, batch, auto mesh) and its recipe "
        "passes the recipe and mesh phases",
        _curriculum,
        "curriculum.resolve_curriculum",
    ),
    *curriculum.RULES,
    # recipe, mesh, trainer, device and data, phase by phase in this order (run_phases); a
    # rule may use what an earlier one resolved (the model args, the mesh, the device).
    Rule("recipe", _POSITIVE_KEYS, "sizes, counts and rates in range", _positive, _HERE),
    *checkpoint_storage.RULES,
    *parallel_dims.RULES,  # recipe: degrees, dim order; mesh: the mesh
    Rule(
        "recipe",
        ("model.name", "model.flavor", "model.rope_theta", "model.rope_scaling"),
        "a registered TorchTitan model and flavor; RoPE theta and scaling valid",
        _model,
        _HERE,
    ),
    Rule(
        "recipe",
        ("parallelism.tensor_parallel_degree",),
        "tp divides n_heads and n_kv_heads",
        _heads,
        _HERE,
    ),
    Rule(
        "recipe",
        ("training.seq_len", "validation.seq_len"),
        "divisible by tp x cp (x 2 with head-tail load balancing)",
        _seq_lens,
        _HERE,
    ),
    *cp_patterns.RULES,
    *context_parallel.RULES,
    *long_context.RULES,
    *pipeline.RULES,
    Rule("recipe", ("data.validation_fraction",), "in [0, 0.5)", _validation_fraction, _HERE),
    Rule("recipe", ("optimizer.name",), "Adam or AdamW", _optimizer, _HERE),
    Rule(
        "mesh",
        ("training.global_batch_size",),
        "a multiple of local_batch_size x the data-parallel degree",
        _batch,
        _HERE,
    ),
    Rule(
        "trainer",
        tuple(key for key, _, _ in UNSUPPORTED),
        "TorchTitan settings this trainer does not implement are off (UNSUPPORTED)",
        _trainer_support,
        _HERE,
    ),
    *checkpoint_hf.RULES,  # trainer: reads the HF checkpoint's config.json
    *distributed.RULES,  # device: resolves the device the next rules read
    *activation_checkpoint.RULES,  # recipe: the AC mode; device: offload
    *cpu_ring_attention.RULES,
    *cp_block_causal.RULES,  # recipe: the mask type; device: flex / varlen; data: the EOS
    *fsdp.RULES,  # device: CPU offload
    *converters.RULES,  # device: float8
    *profiling.RULES,  # recipe: the profiler's schedule; device: memory snapshots
    *metrics.RULES,  # device: wandb installed
    Rule(
        "data",
        ("model.flavor", "model.tokenizer"),
        "the model's vocab holds the tokenizer's",
        _vocab,
        _HERE,
    ),
    Rule(
        "data",
        ("validation.enable", "data.validation_fraction"),
        "validation has documents",
        _validation_split,
        _HERE,
    ),
    Rule(
        "data",
        ("training.global_batch_size", "curriculum.stages[i].min_doc_tokens"),
        "the training data fills one global batch of the run and of every stage",
        _training_windows,
        _HERE,
    ),
    Rule(
        "data",
        ("curriculum.stages[i].mixture",),
        "every source of a stage's data mixture opens and holds one unit",
        _mixtures,
        _HERE,
    ),
    Rule(
        "data",
        ("validation.seq_len",),
        "the validation split holds one window of every length",
        _validation_windows,
        _HERE,
    ),
)


def run_phases(check: RecipeCheck, *phases: Phase) -> RecipeCheck:
    """Run the rules of ``phases`` on ``check``, phase by phase in the order given, each
    phase's in table order; returns ``check``.

    Raises:
        ConfigError: the first rule broken.
    """
    for phase in phases:
        for rule in RULES:
            if rule.phase == phase:
                rule.check(check)
    return check


def validate(cfg: Any, world_size: int | None = None) -> ParallelDims | None:
    """The ``recipe`` phase of one config; with a world size, also the ``mesh`` phase (a
    curriculum checks each stage's recipe with this).

    Args:
        cfg: the merged JobConfig from ``load_config``.
        world_size: number of ranks, or None when unknown (then checks that need it are skipped).

    Returns:
        The resolved ``ParallelDims`` when ``world_size`` is given, else None.

    Raises:
        ConfigError: the first problem found.
    """
    if world_size is None:
        run_phases(RecipeCheck(cfg), "recipe")
        return None
    return run_phases(RecipeCheck(cfg, world_size), "recipe", "mesh").dims


def plan_curriculum(
    cfg: Any, world_size: int, mesh_planner: "MeshPlanner | None" = None
) -> "list[Stage]":
    """Resolve every stage of ``cfg.curriculum`` for ``world_size`` ranks, each stage's recipe
    checked by the ``recipe`` and ``mesh`` phases (``validate``) as it is resolved.

    Args:
        cfg: the merged JobConfig.
        world_size: ranks of the job.
        mesh_planner: for auto-meshed stages (``tools.auto_mesh.choose_stage_mesh``).

    Returns:
        The stages, in order ([] when the recipe has no curriculum).

    Raises:
        ConfigError: naming ``curriculum.stages[i].<key>`` (or the curriculum key) and value.
    """
    from torchtitan_ext.curriculum import resolve_curriculum

    return resolve_curriculum(cfg, world_size, validate, mesh_planner)


def check_recipe(
    cfg: Any,
    world_size: int | None,
    local_rank: int = 0,
    mesh_planner: "MeshPlanner | None" = None,
) -> RecipeCheck:
    """Every phase but ``data``: what ``train.py`` and ``python -m torchtitan_ext.config
    --world_size N`` both run, so the checker cannot accept what training rejects. Without a
    world size (the checker without ``--world_size``), the ``recipe`` and ``trainer`` phases.
    No collective.

    Args:
        mesh_planner: chooses auto-meshed stages' meshes (``RecipeCheck.mesh_planner``);
            without it an auto-meshed stage is a ``ConfigError``.

    Returns:
        The check, with ``cfg`` (the first stage's with a curriculum) and ``model_args``
        resolved; with a world size also ``dims``, ``stages``, ``device`` and ``backend``.

    Raises:
        ConfigError: the first problem found.
    """
    if world_size is None:
        return run_phases(RecipeCheck(cfg), "recipe", "trainer")
    check = RecipeCheck(cfg, world_size, local_rank, mesh_planner=mesh_planner)
    return run_phases(check, "curriculum", "recipe", "mesh", "trainer", "device")


def check_data(check: RecipeCheck, data: RecipeData) -> None:
    """The ``data`` phase on a ``check_recipe`` result and the loaded ``data``.

    Raises:
        ConfigError: the data cannot serve the recipe (naming the key to change).
    """
    check.data = data
    run_phases(check, "data")


def format_rules() -> str:
    """``RULES`` as text, by phase: what ``--list-rules`` prints."""
    lines: list[str] = []
    for phase in PHASES:
        lines.append(f"{phase}:")
        for rule in (r for r in RULES if r.phase == phase):
            keys = ", ".join(rule.keys)
            lines.append(f"  - {rule.what} [{rule.where}]\n      {keys}")
    return "\n".join(lines) + "\n"


def resolve_model_args(cfg: Any) -> Any:
    """The TorchTitan model args of ``model.name`` / ``model.flavor`` (a deep copy), with
    ``model.rope_theta`` applied when set.

    Raises:
        ConfigError: unknown model name or flavor (with the nearest valid flavor).
    """
    import copy
    import difflib

    from torchtitan.protocols.train_spec import get_train_spec

    import torchtitan_ext.models  # noqa: F401  (registers our flavors)

    try:
        spec = get_train_spec(cfg.model.name)
    except ValueError:
        raise ConfigError(
            "model.name", cfg.model.name, "not a registered TorchTitan model"
        ) from None
    flavors = list(spec.model_args)
    if cfg.model.flavor not in spec.model_args:
        close = difflib.get_close_matches(cfg.model.flavor, flavors, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(flavors)}"
        raise ConfigError("model.flavor", cfg.model.flavor, f"unknown flavor{hint}")
    args = copy.deepcopy(spec.model_args[cfg.model.flavor])
    if cfg.model.rope_theta < 0:
        raise ConfigError("model.rope_theta", cfg.model.rope_theta, "must be > 0 (0: the flavor's)")
    if cfg.model.rope_theta > 0:
        args.rope_theta = float(cfg.model.rope_theta)
    mask_type = cfg.model.attn_mask_type
    if mask_type:
        if mask_type not in ATTN_MASK_TYPES:
            close = difflib.get_close_matches(str(mask_type), ATTN_MASK_TYPES, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                "model.attn_mask_type",
                mask_type,
                f"must be one of {', '.join(ATTN_MASK_TYPES)}{hint}",
            )
        args.attn_mask_type = mask_type
    from torchtitan_ext.rope import check_rope_scaling, rope_scaling_of

    bad = check_rope_scaling(rope_scaling_of(cfg))
    if bad is not None:
        raise ConfigError(f"model.{bad[0]}", bad[1], bad[2])
    return args


def _check_positive(cfg: Any) -> None:
    checks: list[tuple[str, Any, bool, str]] = [
        ("training.seq_len", cfg.training.seq_len, cfg.training.seq_len >= 1, ">= 1"),
        (
            "training.local_batch_size",
            cfg.training.local_batch_size,
            cfg.training.local_batch_size >= 1,
            ">= 1",
        ),
        (
            "training.global_batch_size",
            cfg.training.global_batch_size,
            cfg.training.global_batch_size == -1 or cfg.training.global_batch_size >= 1,
            ">= 1 or -1 (local_batch_size x data-parallel degree)",
        ),
        ("training.steps", cfg.training.steps, cfg.training.steps >= 1, ">= 1"),
        ("training.max_norm", cfg.training.max_norm, cfg.training.max_norm > 0, "> 0"),
        ("optimizer.lr", cfg.optimizer.lr, cfg.optimizer.lr > 0, "> 0"),
        (
            "lr_scheduler.warmup_steps",
            cfg.lr_scheduler.warmup_steps,
            cfg.lr_scheduler.warmup_steps >= 0,
            ">= 0",
        ),
        ("metrics.log_freq", cfg.metrics.log_freq, cfg.metrics.log_freq >= 1, ">= 1"),
        ("checkpoint.interval", cfg.checkpoint.interval, cfg.checkpoint.interval >= 1, ">= 1"),
        (
            "checkpoint.keep_latest_k",
            cfg.checkpoint.keep_latest_k,
            cfg.checkpoint.keep_latest_k >= 0,
            ">= 0 (0 keeps all)",
        ),
        ("validation.freq", cfg.validation.freq, cfg.validation.freq >= 1, ">= 1"),
        (
            "training.max_consecutive_nonfinite_steps",
            cfg.training.max_consecutive_nonfinite_steps,
            cfg.training.max_consecutive_nonfinite_steps >= 0,
            ">= 0",
        ),
        (
            "training.loss_chunk_tokens",
            cfg.training.loss_chunk_tokens,
            cfg.training.loss_chunk_tokens >= 0,
            ">= 0 (0: off)",
        ),
        (
            "training.mlp_tile_tokens",
            cfg.training.mlp_tile_tokens,
            cfg.training.mlp_tile_tokens >= 0,
            ">= 0 (0: off)",
        ),
        (
            "checkpoint.stop_grace_seconds",
            cfg.checkpoint.stop_grace_seconds,
            0 <= cfg.checkpoint.stop_grace_seconds < 1e9,
            "a number of seconds >= 0 (0: off)",
        ),
    ]
    for key, value, ok, rule in checks:
        if not ok:
            raise ConfigError(key, value, f"must be {rule}")
    check_degrees(cfg)


def _check_heads(model_args: Any, tp: int) -> None:
    n_heads = model_args.n_heads
    n_kv_heads = model_args.n_kv_heads or n_heads
    if n_heads % tp != 0:
        raise ConfigError(
            "parallelism.tensor_parallel_degree",
            tp,
            f"the model's n_heads = {n_heads} is not divisible by it",
        )
    if n_kv_heads % tp != 0:
        raise ConfigError(
            "parallelism.tensor_parallel_degree",
            tp,
            f"the model's n_kv_heads = {n_kv_heads} is not divisible by it",
        )


def _check_seq_len(cfg: Any, key: str, seq_len: int, tp: int, cp: int) -> None:
    lb = cfg.parallelism.context_parallel_load_balancer
    div = seq_len_divisor(tp, cp, lb)
    if seq_len % div != 0:
        why = f"tp ({tp})"
        if cp > 1:
            why += f" x {'2 x ' if lb else ''}cp ({cp})"
        raise ConfigError(key, seq_len, f"must be divisible by {why} = {div}")


def _check_batch(cfg: Any, dims: ParallelDims) -> None:
    local, global_ = cfg.training.local_batch_size, cfg.training.global_batch_size
    if global_ == -1:
        return
    per_step = local * dims.dp
    if global_ % per_step != 0:
        raise ConfigError(
            "training.global_batch_size",
            global_,
            f"must be a multiple of local_batch_size ({local}) x data-parallel degree "
            f"({dims.dp}) = {per_step}",
        )


def check_trainer_support(cfg: Any) -> None:
    """Reject recipe settings that TorchTitan's schema has but this trainer does not implement.

    Raises:
        ConfigError: the first unsupported setting, e.g. ``model.converters = ['float8']``.
    """
    for key, is_bad, why in UNSUPPORTED:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if is_bad(value):
            raise ConfigError(key, value, f"not supported by torchtitan_ext's trainer: {why}")


def global_batch_size(cfg: Any, dims: ParallelDims) -> int:
    """Sequences per optimizer step: ``training.global_batch_size``, or with -1 the local
    batch x dp (one microbatch per step)."""
    t = cfg.training
    return int(t.global_batch_size if t.global_batch_size != -1 else t.local_batch_size * dims.dp)


def derived_batch_note(cfg: Any, dims: ParallelDims) -> str | None:
    """A warning when ``training.global_batch_size = -1`` derives a smaller global batch than
    the recipe gives without context parallel: -1 means local batch x dp, and the cp ranks are
    taken from dp (``data_parallel_shard_degree = -1`` takes what cp leaves), so dp 4 on 4
    ranks trains 4 x local sequences per step but dp 1 x cp 4 only 1 x local: losses of the two
    runs are not comparable. None when the batch is set or cp is 1.

    Returns:
        One line naming the key, both batches and the value that keeps the cp = 1 batch.
    """
    t = cfg.training
    if t.global_batch_size != -1 or dims.cp == 1:
        return None
    return _batch_note(t.local_batch_size, dims.dp, dims.cp, "training.global_batch_size")


def stage_batch_note(stage: "Stage", dp_replicate: int) -> str | None:
    """``derived_batch_note`` for a curriculum stage: one that derives its global batch from
    the recipe's ``training.global_batch_size = -1`` (``Stage.batch_derived``) on a mesh whose
    cp took ranks from dp (``dp_replicate``: the recipe's degree). None otherwise, and for an
    auto-meshed stage (its batch is taken on the recipe's mesh, whatever cp the planner picks).

    Returns:
        ``curriculum.stages[i]:`` and the line of ``derived_batch_note``, naming the stage's key
        that keeps the cp 1 batch.
    """
    if not stage.batch_derived or stage.cp == 1 or stage.mesh_plan:
        return None
    key = f"curriculum.stages[{stage.index}]"
    dp = stage.dp_shard * dp_replicate
    local = stage.global_batch_size // dp  # the recipe's local batch: the batch is local x dp
    return f"{key}: " + _batch_note(local, dp, stage.cp, f"{key}.global_batch_size")


def _batch_note(local: int, dp: int, cp: int, key: str) -> str:
    """The line of ``derived_batch_note``: global batch ``local`` x ``dp`` derived with cp
    ``cp``; ``key`` sets the batch."""
    derived, without_cp = local * dp, local * dp * cp
    return (
        f"training.global_batch_size = -1: global batch = local_batch_size {local} x dp {dp} = "
        f"{derived} sequences; context_parallel_degree {cp} took its ranks from dp, which at "
        f"cp 1 gives {without_cp}. Losses compare only at equal batches: set {key} = "
        f"{without_cp} to train the cp 1 batch"
    )


def unit_len(stages: "list[Stage]") -> int:
    """``PackedWindows.unit_len`` of the training data: the longest stage's seq_len (one grid
    of units for every stage), or 0 (the run's seq_len) without a curriculum."""
    return max((s.seq_len for s in stages), default=0)


def _check_fills_global_batch(
    key: str, tokens: "Tokens", seq_len: int, global_batch: int, seed: int, unit: int = 0
) -> None:
    """Raise unless the token stream holds at least one global batch of windows.

    Raises:
        ConfigError: naming ``key`` (the global batch size) with the windows available.
    """
    from torchtitan_ext.data import PackedWindows

    windows = PackedWindows(tokens, seq_len, seed, unit_len=unit).num_windows
    if windows < global_batch:
        raise ConfigError(
            key,
            global_batch,
            f"the training set has {windows} windows of {seq_len + 1} tokens "
            f"({len(tokens)} tokens), fewer than one global batch: use more data, a shorter "
            "seq_len or a smaller batch",
        )


__all__ = [
    "PHASES",
    "RULES",
    "UNSUPPORTED",
    "RecipeCheck",
    "RecipeData",
    "Rule",
    "check_data",
    "check_recipe",
    "check_trainer_support",
    "format_rules",
    "global_batch_size",
    "resolve_model_args",
    "unit_len",
    "validate",
]
