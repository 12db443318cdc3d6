"""Hugging Face checkpoints in and out: ``checkpoint.initial_load_in_hf`` and
``checkpoint.last_save_in_hf``, as TorchTitan 0.2.2's ``CheckpointManager`` does them
(``torchtitan.components.checkpoint``: ``dcp_load(from_hf=True)``, ``dcp_save(to_hf=True)``).

No converter of our own: the model's TorchTitan state-dict adapter (the train spec's
``state_dict_adapter``; for Llama 3 ``Llama3StateDictAdapter``: the key map and the RoPE
q/k permutation of Hugging Face's conversion script) maps names and layouts, and DCP's
``HuggingFaceStorageReader`` / ``HuggingFaceStorageWriter`` read and write the safetensors
files. Both work on the model's own (DTensor) state dict, so an HF checkpoint loads into any
mesh (FSDP, TP, PP, CP) and is written from any mesh: each rank reads and writes its shards.

What this module adds to TorchTitan's:

- the Hugging Face ``config.json`` is checked against the flavor before anything is loaded
  (``check_hf_config``: one ``ConfigError`` line naming both values, on every rank, before any
  collective; TorchTitan fails later, in DCP, with a shape mismatch or not at all);
- the export writes a ``config.json`` (``hf_config``) next to the safetensors file, so that
  ``transformers``' ``from_pretrained`` loads the folder as it is (TorchTitan writes the
  weights only).

The file layout is TorchTitan's: the export is ``model-00001-of-00001.safetensors`` and
``model.safetensors.index.json`` in ``step-<N>`` of the last step (DCP's consolidation of the
ranks' shards; the intermediate ``sharded/`` folder is removed). Unlike TorchTitan's
``last_save_model_only`` export, the full training state stays in the same folder
(``torchtitan_ext.checkpoint``: every checkpoint resumes), and the manifest covers the
exported files too.
"""

import json
import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor, distribute_tensor

from torchtitan_ext.errors import ConfigError
from torchtitan_ext.rope import RopeScaling
from torchtitan_ext.rules import RecipeCheck, Rule

HF_CONFIG = "config.json"
HF_INDEX = "model.safetensors.index.json"
SAFETENSORS = ".safetensors"
SHARDED_DIR = "sharded"  # DCP's HuggingFaceStorageWriter: the ranks' shards before consolidation


def hf_load_source(cfg: Any) -> tuple[str, str]:
    """(recipe key, folder) of the Hugging Face checkpoint an ``initial_load_in_hf`` run
    starts from: ``checkpoint.initial_load_path``, else ``model.hf_assets_path``
    (TorchTitan 0.2.2's fallback)."""
    if cfg.checkpoint.initial_load_path:
        return "checkpoint.initial_load_path", str(cfg.checkpoint.initial_load_path)
    return "model.hf_assets_path", str(cfg.model.hf_assets_path)


def read_hf_config(key: str, folder: str) -> dict[str, Any]:
    """The ``config.json`` of the Hugging Face checkpoint in ``folder``.

    Raises:
        ConfigError: naming ``key`` and ``folder``: no such folder, no config.json, no
            ``*.safetensors`` file, or a config.json that is not a JSON object.
    """
    if not os.path.isdir(folder):
        raise ConfigError(key, folder, "no such folder (checkpoint.initial_load_in_hf)")
    path = os.path.join(folder, HF_CONFIG)
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ConfigError(
            key, folder, f"no {HF_CONFIG} there: not a Hugging Face checkpoint folder"
        ) from None
    except (OSError, ValueError) as e:
        reason = f"{HF_CONFIG} is unreadable ({type(e).__name__}: {e})"
        raise ConfigError(key, folder, reason) from None
    if not isinstance(config, dict):
        raise ConfigError(key, folder, f"{HF_CONFIG} is not a JSON object")
    if not any(name.endswith(SAFETENSORS) for name in os.listdir(folder)):
        raise ConfigError(key, folder, f"no *{SAFETENSORS} file there (only safetensors load)")
    return config


def ffn_hidden_dim(model_args: Any) -> int:
    """The SwiGLU hidden size of TorchTitan's Llama 3 ``FeedForward`` (its arithmetic:
    2/3 of 4 x dim, times ``ffn_dim_multiplier``, rounded up to ``multiple_of``): Hugging
    Face's ``intermediate_size``."""
    hidden = int(2 * (4 * model_args.dim) / 3)
    if model_args.ffn_dim_multiplier is not None:
        hidden = int(model_args.ffn_dim_multiplier * hidden)
    m = model_args.multiple_of
    return int(m * ((hidden + m - 1) // m))


def hf_rope_theta(config: dict[str, Any]) -> float | None:
    """RoPE theta of a Hugging Face config: ``rope_theta`` (transformers 4) or
    ``rope_parameters.rope_theta`` (transformers 5); None when neither is given."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    theta = config.get("rope_theta")
    return None if theta is None else float(theta)


def hf_rope_scaling(config: dict[str, Any]) -> dict[str, Any] | None:
    """The RoPE scaling of a Hugging Face config (``rope_scaling``, or transformers 5's
    ``rope_parameters`` without its theta), or None for plain RoPE."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        params = config.get("rope_scaling")
    if not isinstance(params, dict):
        return None
    params = {k: v for k, v in params.items() if k != "rope_theta"}
    kind = params.get("rope_type", params.get("type", "default"))
    return None if kind == "default" else params


def rope_scaling_dict(scaling: RopeScaling) -> dict[str, Any] | None:
    """``scaling`` as a Hugging Face ``rope_scaling`` (transformers' "llama3" and "yarn"
    rope types, whose parameters are the same formulas: ``torchtitan_ext.rope``), or None
    for plain RoPE."""
    if scaling.kind == "none":
        return None
    if scaling.kind == "llama":
        return {
            "rope_type": "llama3",
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_context,
        }
    out: dict[str, Any] = {
        "rope_type": "yarn",
        "factor": scaling.factor,
        "original_max_position_embeddings": scaling.original_context,
        "beta_fast": scaling.beta_fast,
        "beta_slow": scaling.beta_slow,
    }
    if scaling.attention_factor:
        out["attention_factor"] = scaling.attention_factor
    return out


def _same_rope(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    if a is None or b is None:
        return a is b
    kind = a.get("rope_type", a.get("type"))
    if kind != b.get("rope_type", b.get("type")):
        return False
    return all(
        math.isclose(float(a[k]), float(b[k]), rel_tol=1e-6)
        for k in b
        if k != "rope_type" and k in a and isinstance(b[k], int | float)
    )


def check_hf_config(config: dict[str, Any], model_args: Any, cfg: Any, where: str) -> None:
    """Check a Hugging Face Llama ``config.json`` against the model the recipe builds.

    Compared: model_type, hidden_size (dim), num_hidden_layers, num_attention_heads,
    num_key_value_heads, head_dim, intermediate_size (TorchTitan's SwiGLU size), vocab_size,
    rms_norm_eps, hidden_act, attention / MLP biases and tie_word_embeddings (TorchTitan's
    Llama has a separate output projection), and rope_theta when the recipe keeps the
    flavor's (a recipe that sets ``model.rope_theta`` or a curriculum stage's
    ``rope_theta`` changes it on purpose). RoPE scaling is not compared: context extension
    changes it on purpose (``rope_difference`` words the change).

    Args:
        config: the parsed config.json.
        model_args: the flavor's TorchTitan ``TransformerModelArgs`` (``model.rope_theta``
            applied).
        cfg: the recipe (``model.flavor``, ``model.rope_theta``).
        where: the config.json's path, for the message.

    Raises:
        ConfigError: the first mismatch, one line naming ``model.flavor``, the flavor's value
            and the config.json's (e.g. ``dim 64, but .../config.json has hidden_size 128``).
    """
    flavor = cfg.model.flavor

    def mismatch(ours: str, value: object, theirs: str, got: object) -> ConfigError:
        return ConfigError(
            "model.flavor",
            flavor,
            f"{ours} {value}, but {where} has {theirs} {got}: the Hugging Face checkpoint "
            "is another model",
        )

    model_type = config.get("model_type")
    if model_type != "llama":
        raise mismatch("a Llama model", f"({cfg.model.name})", "model_type", repr(model_type))
    n_kv = model_args.n_kv_heads or model_args.n_heads
    expected: list[tuple[str, object, str, object]] = [
        ("dim", model_args.dim, "hidden_size", config.get("hidden_size")),
        ("n_layers", model_args.n_layers, "num_hidden_layers", config.get("num_hidden_layers")),
        ("n_heads", model_args.n_heads, "num_attention_heads", config.get("num_attention_heads")),
        (
            "n_kv_heads",
            n_kv,
            "num_key_value_heads",
            config.get("num_key_value_heads", config.get("num_attention_heads")),
        ),
        (
            "head dim",
            model_args.dim // model_args.n_heads,
            "head_dim",
            config.get("head_dim") or model_args.dim // model_args.n_heads,
        ),
        (
            "FFN hidden size",
            ffn_hidden_dim(model_args),
            "intermediate_size",
            config.get("intermediate_size"),
        ),
        ("vocab_size", model_args.vocab_size, "vocab_size", config.get("vocab_size")),
        ("hidden_act", "silu", "hidden_act", config.get("hidden_act", "silu")),
        ("attention bias", False, "attention_bias", bool(config.get("attention_bias", False))),
        ("MLP bias", False, "mlp_bias", bool(config.get("mlp_bias", False))),
        (
            "tied embeddings",
            False,
            "tie_word_embeddings",
            bool(config.get("tie_word_embeddings", False)),
        ),
    ]
    for ours, value, theirs, got in expected:
        if value != got:
            raise mismatch(ours, value, theirs, got)
    eps = config.get("rms_norm_eps")
    if eps is None or not math.isclose(float(eps), model_args.norm_eps, rel_tol=1e-6):
        raise mismatch("norm_eps", model_args.norm_eps, "rms_norm_eps", eps)
    theta = hf_rope_theta(config)
    if (
        cfg.model.rope_theta <= 0
        and theta is not None
        and not math.isclose(theta, float(model_args.rope_theta), rel_tol=1e-6)
    ):
        raise ConfigError(
            "model.flavor",
            flavor,
            f"rope_theta {model_args.rope_theta:g}, but {where} has rope_theta {theta:g}: "
            f"set model.rope_theta = {theta:g} to train with the checkpoint's",
        )


def rope_difference(config: dict[str, Any], model_args: Any, scaling: RopeScaling) -> str | None:
    """One line when the recipe's RoPE (theta, scaling) differs from the checkpoint's
    config.json (deliberate for context extension, a surprise otherwise: TorchTitan's
    default ``model.rope_scaling = "llama"`` on a checkpoint without scaling); None when
    they agree."""
    theta = hf_rope_theta(config)
    theirs, ours = hf_rope_scaling(config), rope_scaling_dict(scaling)
    parts = []
    if theta is not None and not math.isclose(theta, float(model_args.rope_theta), rel_tol=1e-6):
        parts.append(f"rope_theta {theta:g} -> {model_args.rope_theta:g}")
    if not _same_rope(theirs, ours):
        parts.append(f"rope scaling {theirs} -> {ours} (model.rope_scaling = {scaling.kind!r})")
    if not parts:
        return None
    return (
        "the Hugging Face checkpoint's RoPE differs from the recipe's, which trains with the "
        f"recipe's: {'; '.join(parts)}"
    )


def hf_config(model_args: Any, scaling: RopeScaling, dtype: str, seq_len: int) -> dict[str, Any]:
    """A Hugging Face ``LlamaConfig`` (as config.json) of the model: what ``from_pretrained``
    needs to rebuild it (architecture, RoPE theta and scaling in transformers' legacy
    ``rope_theta`` / ``rope_scaling`` keys, which transformers 4 and 5 both read).

    Args:
        model_args: the TorchTitan ``TransformerModelArgs`` trained.
        scaling: the RoPE scaling trained with (``rope.rope_scaling_of``).
        dtype: the exported weights' dtype name (``checkpoint.export_dtype``).
        seq_len: the context trained last (tokens): ``max_position_embeddings``, or with a
            scaling at least the context it extends to (original context x factor; Hugging
            Face's check wants it above the original context).
    """
    context = seq_len
    if scaling.kind != "none":
        context = max(seq_len, int(scaling.original_context * scaling.factor))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": model_args.dim,
        "intermediate_size": ffn_hidden_dim(model_args),
        "num_hidden_layers": model_args.n_layers,
        "num_attention_heads": model_args.n_heads,
        "num_key_value_heads": model_args.n_kv_heads or model_args.n_heads,
        "head_dim": model_args.dim // model_args.n_heads,
        "vocab_size": model_args.vocab_size,
        "rms_norm_eps": model_args.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "max_position_embeddings": context,
        "rope_theta": float(model_args.rope_theta),
        "rope_scaling": rope_scaling_dict(scaling),
        "torch_dtype": dtype,
    }


def build_adapter(cfg: Any, model_args: Any) -> Any:
    """The model's TorchTitan state-dict adapter (its train spec's ``state_dict_adapter``,
    built as TorchTitan's trainer builds it but without ``hf_assets_path``: the export is one
    safetensors file).

    Raises:
        ConfigError: ``model.name``'s train spec has no state-dict adapter.
    """
    from torchtitan.protocols.train_spec import get_train_spec

    adapter_cls = get_train_spec(cfg.model.name).state_dict_adapter
    if adapter_cls is None:
        raise ConfigError("model.name", cfg.model.name, "its train spec has no HF adapter")
    return adapter_cls(model_args, None)


def _convert(
    convert: Callable[[dict[str, Any]], dict[str, Any]], state: dict[str, Any], values: bool
) -> dict[str, Any]:
    """``convert`` (the adapter's ``to_hf`` or ``from_hf``) applied to ``state`` one tensor at
    a time, so that no DTensor goes through the adapter's layout changes.

    A tensor the adapter only renames keeps its object (and its shards). One whose layout it
    changes (Llama's RoPE q/k row permutation, found by converting a meta tensor of the same
    shape first) is gathered (``DTensor.full_tensor``), converted as a plain tensor and
    sliced back to its own placements (``distribute_tensor`` with ``src_data_rank=None``:
    every rank holds the full tensor, no second collective): the permutation moves rows
    across FSDP and TP shards, and DTensor's view of a row-sharded 2-D mesh (FSDP's
    ``_StridedShard`` x TP's ``Shard(0)``) gives overlapping chunks that DCP's planner
    refuses. One full tensor at a time is held. With ``values=False`` (the templates a load
    fills) a changed tensor is an uninitialized one of its placements, nothing gathered.
    Collective over each changed DTensor's mesh (the same keys, in the same order, on the
    ranks of one pipeline stage).
    """
    out: dict[str, Any] = {}
    for key, value in state.items():
        probe = torch.empty(tuple(value.shape), dtype=value.dtype, device="meta")
        converted = convert({key: probe})
        if not converted:
            continue  # a key the adapter drops
        ((new_key, new_probe),) = converted.items()
        if new_probe is probe:
            out[new_key] = value
        elif not isinstance(value, DTensor):
            out[new_key] = convert({key: value})[new_key]
        elif not values:
            out[new_key] = torch.empty_like(value)
        else:
            full = convert({key: value.full_tensor()})[new_key].contiguous()
            out[new_key] = distribute_tensor(
                full, value.device_mesh, value.placements, src_data_rank=None
            )
    return out


def load_hf(model: Stateful, adapter: Any, folder: str) -> None:
    """Load the Hugging Face safetensors in ``folder`` into ``model`` (TorchTitan's
    ``ModelWrapper``, whose state dict may hold DTensors of any mesh), as TorchTitan 0.2.2's
    ``CheckpointManager.dcp_load`` with ``from_hf`` does: the adapter's ``to_hf`` names and
    lays out the model's own state dict as Hugging Face's, DCP's ``HuggingFaceStorageReader``
    fills each rank's shards from the files, ``from_hf`` maps them back; the tensors whose
    layout the adapter changes go through it whole (``_convert``). Collective.

    Raises:
        CheckpointException: DCP's load failed (a tensor missing from the files, a shape
            that differs), on every rank.
    """
    hf_state = _convert(adapter.to_hf, model.state_dict(), values=False)
    dcp.load(hf_state, storage_reader=HuggingFaceStorageReader(folder))
    model.load_state_dict(_convert(adapter.from_hf, hf_state, values=True))


def save_hf(model: Stateful, adapter: Any, folder: str, dtype: torch.dtype) -> None:
    """Write ``model`` as Hugging Face safetensors into ``folder``: each rank writes its
    shards under ``folder/sharded``, and DCP's ``HuggingFaceStorageWriter`` consolidates them
    into ``model-00001-of-00001.safetensors`` and ``model.safetensors.index.json`` (TorchTitan
    0.2.2's ``CheckpointManager.dcp_save`` with ``to_hf`` and no ``fqn_to_index_mapping``).
    Tensors are cast to ``dtype`` (``checkpoint.export_dtype``); those whose layout the
    adapter changes go through it whole (``_convert``). Collective.

    Raises:
        CheckpointException: the write failed (on every rank).
    """
    hf_state = _convert(adapter.to_hf, model.state_dict(), values=True)
    hf_state = {k: v.to(dtype) for k, v in hf_state.items()}
    writer = HuggingFaceStorageWriter(path=folder, save_distributed=True, enable_consolidation=True)
    dcp.save(hf_state, storage_writer=writer)


def export_files(folder: str) -> list[str]:
    """The exported Hugging Face files in ``folder`` (config.json, the index, the
    safetensors), sorted: what the manifest adds to the DCP files."""
    return sorted(
        name
        for name in os.listdir(folder)
        if name in (HF_CONFIG, HF_INDEX) or name.endswith(SAFETENSORS)
    )


def _hf_options(c: RecipeCheck) -> None:
    """``initial_load_in_hf`` / ``last_save_in_hf`` with the keys they need, and the
    checkpoint's config.json against the flavor (a file read on every rank: no
    collective)."""
    ckpt = c.cfg.checkpoint
    if not (ckpt.initial_load_in_hf or ckpt.last_save_in_hf):
        return
    for key in ("initial_load_in_hf", "last_save_in_hf"):
        if getattr(ckpt, key) and not ckpt.enable:
            raise ConfigError(
                f"checkpoint.{key}",
                True,
                "needs checkpoint.enable = true (otherwise nothing is loaded or saved)",
            )
    if ckpt.last_save_in_hf and ckpt.load_only:
        raise ConfigError(
            "checkpoint.last_save_in_hf", True, "nothing is saved with checkpoint.load_only"
        )
    if c.cfg.model.name != "llama3":
        raise ConfigError(
            "model.name", c.cfg.model.name, "Hugging Face checkpoints: only llama3 is supported"
        )
    if not ckpt.initial_load_in_hf:
        return
    if not ckpt.initial_load_model_only:
        raise ConfigError(
            "checkpoint.initial_load_model_only",
            False,
            "a Hugging Face checkpoint holds only the model (initial_load_in_hf): set it true",
        )
    key, folder = hf_load_source(c.cfg)
    config = read_hf_config(key, folder)
    check_hf_config(config, c.model_args, c.cfg, os.path.join(folder, HF_CONFIG))


RULES: tuple[Rule, ...] = (
    Rule(
        "trainer",
        (
            "checkpoint.initial_load_in_hf",
            "checkpoint.last_save_in_hf",
            "checkpoint.initial_load_path",
            "model.flavor",
        ),
        "HF checkpoints: checkpoints enabled, a model-only load, and the checkpoint's "
        "config.json matches the flavor (dims, layers, heads, kv heads, FFN, vocab, norm eps, "
        "untied embeddings, rope_theta)",
        _hf_options,
        "checkpoint.hf",
    ),
)
"""This module's recipe rules (``torchtitan_ext.rules``); ``validate.RULES`` lists them."""
