"""Semantic checks of a resolved recipe, run identically on every rank before any collective.

TorchTitan 0.2.2 asserts some of these deep inside its trainer (after process groups exist, so a
bad value hangs or prints one traceback per rank) and misses others. Each check here raises one
``ConfigError`` naming the key and the value.
"""

from typing import Any

from torchtitan_ext.config.manager import ConfigError
from torchtitan_ext.parallel_dims import ParallelDims, check_degrees, mesh_dim_order_of

SUPPORTED_AC_MODES = ("none", "selective", "full")


def validate(cfg: Any, world_size: int | None = None) -> ParallelDims | None:
    """Check ``cfg`` (the merged JobConfig); with a world size, also the mesh for it.

    Args:
        cfg: the merged JobConfig from ``load_config``.
        world_size: number of ranks, or None when unknown (then checks that need it are skipped).

    Returns:
        The resolved ``ParallelDims`` when ``world_size`` is given, else None.

    Raises:
        ConfigError: the first problem found.
    """
    _check_positive(cfg)
    mesh_dim_order_of(cfg.parallelism.mesh_dim_order)  # "auto" is resolved with the degrees
    model_args = resolve_model_args(cfg)
    p = cfg.parallelism
    tp, cp = p.tensor_parallel_degree, p.context_parallel_degree
    _check_heads(model_args, tp)
    _check_seq_len(cfg, "training.seq_len", cfg.training.seq_len, tp, cp)
    if cfg.validation.enable:
        _check_seq_len(cfg, "validation.seq_len", cfg.validation.seq_len, tp, cp)
    _check_cp_pattern(cfg, model_args, tp, cp)
    if cp > 1:
        _check_cp(cfg, model_args)
    _check_long_context(cfg, cp)
    if p.pipeline_parallel_degree > 1:
        from torchtitan_ext.parallel.pipeline import plan_pipeline

        plan_pipeline(cfg, model_args.n_layers)
    if cfg.activation_checkpoint.mode not in SUPPORTED_AC_MODES:
        raise ConfigError(
            "activation_checkpoint.mode",
            cfg.activation_checkpoint.mode,
            f"supported modes are {', '.join(SUPPORTED_AC_MODES)}",
        )
    if not 0.0 <= cfg.data.validation_fraction < 0.5:
        raise ConfigError(
            "data.validation_fraction", cfg.data.validation_fraction, "must be in [0, 0.5)"
        )
    if cfg.optimizer.name not in ("Adam", "AdamW"):
        raise ConfigError("optimizer.name", cfg.optimizer.name, "supported: Adam, AdamW")
    if world_size is None:
        return None
    dims = ParallelDims.from_config(cfg, world_size)
    _check_batch(cfg, dims)
    return dims


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
    from torchtitan_ext.rope import check_rope_scaling, rope_scaling_of

    bad = check_rope_scaling(rope_scaling_of(cfg))
    if bad is not None:
        raise ConfigError(f"model.{bad[0]}", bad[1], bad[2])
    return args


def _check_long_context(cfg: Any, cp: int) -> None:
    """The long-context memory settings against the local sequence (seq_len / cp)."""
    local = cfg.training.seq_len // max(cp, 1)
    for key in ("loss_chunk_tokens", "mlp_tile_tokens"):
        tokens = getattr(cfg.training, key)
        if tokens > local:
            raise ConfigError(
                f"training.{key}",
                tokens,
                f"larger than the local sequence (seq_len {cfg.training.seq_len} / cp {cp} = "
                f"{local} tokens): it would not save memory; use at most {local}",
            )


def check_activation_offload(cfg: Any, device_type: str) -> None:
    """``activation_checkpoint.enable_cpu_offload`` needs full AC (what it offloads are the
    block inputs full AC keeps) and a CUDA device (on CPU there is nothing to offload to).
    ``device_type``: the resolved training device ("cpu" or "cuda").

    Raises:
        ConfigError: naming the key and what it needs.
    """
    ac = cfg.activation_checkpoint
    if not ac.enable_cpu_offload:
        return
    if device_type != "cuda":
        raise ConfigError(
            "activation_checkpoint.enable_cpu_offload",
            True,
            f"offloads activations from a CUDA device to host memory; this run is on "
            f"{device_type}, where activations already live in host memory",
        )
    if ac.mode != "full":
        raise ConfigError(
            "activation_checkpoint.enable_cpu_offload",
            True,
            f'needs activation_checkpoint.mode = "full" (it offloads the block inputs full AC '
            f"keeps), not {ac.mode!r}",
        )


def seq_len_divisor(tp: int, cp: int, load_balancer: str | None) -> int:
    """What ``seq_len`` must be divisible by: tp for sequence parallel, and cp (2 x cp with a
    load balancer, which splits the sequence into 2 x cp chunks: TorchTitan's head-tail)."""
    cp_factor = 2 * cp if cp > 1 and load_balancer else cp
    return tp * cp_factor


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


def _check_cp(cfg: Any, model_args: Any) -> None:
    """What context parallel can shard: SDPA attention, head-tail or no load balancing."""
    from torchtitan_ext.parallel.context_parallel import LOAD_BALANCERS

    attn_type = getattr(model_args, "attn_type", "sdpa")
    if attn_type != "sdpa":
        raise ConfigError(
            "model.flavor",
            cfg.model.flavor,
            f"its attn_type is {attn_type!r}; context parallel supports 'sdpa' attention",
        )
    lb = cfg.parallelism.context_parallel_load_balancer
    if lb not in LOAD_BALANCERS:
        raise ConfigError(
            "parallelism.context_parallel_load_balancer",
            lb,
            "supported with SDPA: 'headtail', or None (no load balancing)",
        )


def _check_cp_pattern(cfg: Any, model_args: Any, tp: int, cp: int) -> None:
    """``parallelism.context_parallel_pattern`` and the degrees it needs (``cp_patterns``)."""
    import difflib

    from torchtitan_ext.parallel import cp_patterns

    p = cfg.parallelism
    key = "parallelism.context_parallel_pattern"
    name = p.context_parallel_pattern
    if name not in cp_patterns.PATTERNS:
        close = difflib.get_close_matches(str(name), cp_patterns.PATTERNS, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(key, name, f"must be one of {', '.join(cp_patterns.PATTERNS)}{hint}")
    uses = {"hybrid": "ulysses_degree", "double_ring": "inner_ring_degree"}
    for degree in ("ulysses_degree", "inner_ring_degree"):
        value = getattr(p, f"context_parallel_{degree}")
        if value != 0 and uses.get(name) != degree:
            user = next(k for k, v in uses.items() if v == degree)
            raise ConfigError(
                f"parallelism.context_parallel_{degree}",
                value,
                f"only context_parallel_pattern = {user!r} uses it (the pattern is {name!r}); "
                "leave it 0",
            )
    if cp == 1 or name == "ring":
        return
    if name in uses:
        degree_key = f"parallelism.context_parallel_{uses[name]}"
        inner = getattr(p, f"context_parallel_{uses[name]}")
        if inner < 2 or cp % inner != 0 or inner == cp:
            raise ConfigError(
                degree_key,
                inner,
                f"{name} needs a divisor of context_parallel_degree ({cp}) in 2 .. {cp // 2}",
            )
    else:
        degree_key, inner = "parallelism.context_parallel_degree", cp
    heads = model_args.n_heads // tp
    if name in ("ulysses", "hybrid") and heads % inner != 0:
        raise ConfigError(
            degree_key,
            inner,
            f"{name} splits the {heads} attention heads per TP rank (n_heads {model_args.n_heads}"
            f" / tp {tp}) over it: must divide {heads}",
        )
    from torchtitan_ext.parallel import cpu_ring_attention

    if cpu_ring_attention.unsupported_reason() is not None:
        raise ConfigError(
            key,
            name,
            f"needs torch {', '.join(cpu_ring_attention.SUPPORTED_TORCH)}.x (it wraps torch's "
            f"private ring attention); found torch {__import__('torch').__version__}. Use 'ring'",
        )


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


__all__ = ["resolve_model_args", "seq_len_divisor", "validate"]
