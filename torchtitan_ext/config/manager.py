"""Load a recipe: TOML file + CLI overrides -> TorchTitan 0.2.2 ``JobConfig`` merged with ours.

TorchTitan's ``ConfigManager`` (``torchtitan/config/manager.py`` at v0.2.2) merges TOML values
into the dataclass defaults and then lets tyro apply the CLI (CLI > TOML > defaults). It rejects
unknown TOML keys only per section and without suggestions, and does not check TOML value
types (``seq_len = "abc"`` is accepted and fails much later). ``load_config`` adds both checks
before handing over to TorchTitan, and turns every problem into one ``ConfigError`` naming the
key and the value.
"""

import dataclasses
import difflib
import json
import os
import types
import typing
from typing import Any, Literal, Union

import tomli
from torchtitan.config import ConfigManager as TitanConfigManager
from torchtitan.config import JobConfig as TitanJobConfig

from torchtitan_ext.config.schema import JobConfig as ExtJobConfig


class ConfigError(ValueError):
    """A recipe or CLI value that cannot be trained with.

    ``str(err)`` is one line: ``<key> = <value>: <reason>``, the form every rank prints
    before exiting (see ``torchtitan_ext.trainer.main``).
    """

    def __init__(self, key: str, value: object, reason: str) -> None:
        self.key = key
        self.value = value
        self.reason = reason
        super().__init__(f"{key} = {value!r}: {reason}")


_MISSING = object()


def merged_config_class() -> type:
    """TorchTitan's JobConfig with torchtitan_ext's sections and fields merged in."""
    return TitanConfigManager._merge_configs(TitanJobConfig, ExtJobConfig)


class ConfigManager(TitanConfigManager):
    """TorchTitan's ConfigManager over the merged JobConfig, with strict TOML checking.

    Differences from TorchTitan's: unknown keys and wrongly typed values in the TOML file raise
    ``ConfigError`` (with the nearest valid key name); an unreadable or malformed TOML file raises
    ``ConfigError`` instead of logging a traceback; and the HF-assets-path warnings of TorchTitan's
    ``_validate_config`` are dropped (the byte-level tokenizer needs no assets).
    """

    def __init__(self) -> None:
        super().__init__(config_cls=merged_config_class())
        self.toml_data: dict[str, Any] = {}
        """The recipe file's contents as parsed (empty without ``--job.config_file``)."""

    def _maybe_load_toml(self, args: list[str]) -> dict[str, Any] | None:
        path = _config_file_arg(args)
        if path is None:
            return None
        if not os.path.isfile(path):
            raise ConfigError("job.config_file", path, "no such file")
        try:
            with open(path, "rb") as f:
                self.toml_data = tomli.load(f)
                return self.toml_data
        except tomli.TOMLDecodeError as e:
            raise ConfigError("job.config_file", path, f"invalid TOML: {e}") from None

    def _dict_to_dataclass(self, cls: Any, data: dict[str, Any]) -> Any:
        # TorchTitan calls this on the root class with the whole TOML dict, then recursively
        # (through this override) on each section.
        if cls is self.config_cls:
            check_toml_values(cls, data)
        try:
            return super()._dict_to_dataclass(cls, data)
        except (ValueError, AssertionError) as e:
            if isinstance(e, ConfigError):
                raise
            # A TorchTitan section's __post_init__ check: name the field its message names.
            section = _section_path(self.config_cls, cls) or cls.__name__
            message = str(e)
            named = [f.name for f in dataclasses.fields(cls) if f.name in message]
            field = max(named, key=len) if named else None
            key = f"{section}.{field}" if field else section
            raise ConfigError(key, data.get(field) if field else data, message) from None

    def _validate_config(self) -> None:
        cfg: Any = self.config
        if cfg.experimental.custom_args_module:
            cfg.job.custom_config_module = cfg.experimental.custom_args_module
        if cfg.model.tokenizer_path:
            cfg.model.hf_assets_path = cfg.model.tokenizer_path


def _section_path(root: Any, cls: Any, prefix: str = "") -> str | None:
    """Dotted path of the section of type ``cls`` inside the config class ``root``."""
    for f in dataclasses.fields(root):
        tp = typing.get_type_hints(root)[f.name]
        if not dataclasses.is_dataclass(tp):
            continue
        if tp is cls:
            return f"{prefix}{f.name}"
        found = _section_path(tp, cls, f"{prefix}{f.name}.")
        if found:
            return found
    return None


def _config_file_arg(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if key in ("--job.config_file", "--job.config-file"):
            if eq:
                return value
            if i + 1 < len(args):
                return args[i + 1]
            raise ConfigError("job.config_file", None, "missing path after --job.config_file")
    return None


def load_config(args: list[str]) -> Any:
    """Parse a recipe and CLI overrides into the merged JobConfig.

    Args:
        args: command-line arguments, e.g. ``["--job.config_file", "x.toml",
            "--training.steps", "10"]``.

    Returns:
        An instance of the merged JobConfig dataclass (TorchTitan's sections plus ours). With
        pipeline parallel, ``validation.local_batch_size`` and ``validation.seq_len`` are
        training's unless the recipe or the command line sets them.

    Raises:
        ConfigError: unknown TOML key, wrongly typed TOML value, missing or malformed file.
        SystemExit: tyro's exit for a malformed CLI override (it prints the offending flag).
    """
    manager = ConfigManager()
    cfg = manager.parse_args(args)
    if cfg.parallelism.pipeline_parallel_degree > 1:
        # Pipeline stages size their buffers at the first training step and evaluation reuses
        # them, so validation batches must be shaped like training ones: follow training's
        # unless the recipe or the command line set them (a mismatch set there is an error).
        for key in ("local_batch_size", "seq_len"):
            if not is_set(f"validation.{key}", manager.toml_data, args):
                setattr(cfg.validation, key, getattr(cfg.training, key))
    return cfg


def is_set(dotted: str, toml_data: dict[str, Any], args: list[str]) -> bool:
    """Whether ``dotted`` (``section.key``) is given in the recipe's TOML or on the command line
    (``--section.key`` / ``--section.key-with-dashes``, with or without ``=``)."""
    section, _, key = dotted.partition(".")
    table = toml_data.get(section)
    if isinstance(table, dict) and key in table:
        return True
    flags = {f"--{section}.{key}", f"--{section}.{key.replace('_', '-')}"}
    return any(arg.partition("=")[0] in flags for arg in args)


def check_toml_values(cls: Any, data: dict[str, Any], prefix: str = "") -> None:
    """Check that every TOML key exists in ``cls`` and every value has the declared type.

    Raises:
        ConfigError: naming the dotted key, its value, and the expected type or nearest key.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            where = f"section [{prefix[:-1]}]" if prefix else "the recipe"
            raise ConfigError(dotted, value, f"unknown key in {where}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(dotted, value, "expected a [section] table")
            check_toml_values(tp, value, prefix=f"{dotted}.")
        elif not _matches(value, tp):
            raise ConfigError(dotted, value, f"expected {_type_name(tp)}")


def _matches(value: object, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_matches(value, t) for t in typing.get_args(tp))
    if origin is Literal:
        return any(value == v and type(value) is type(v) for v in typing.get_args(tp))
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_matches(v, item_tp) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(item_tp)}"
    if tp is type(None):
        return "none"
    return {bool: "a bool", int: "an int", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as nested plain dicts (for printing and for metrics files)."""
    return dataclasses.asdict(cfg)


def format_toml(cfg: Any) -> str:
    """Render a (nested) config dataclass as TOML; None values become comments."""
    lines: list[str] = []

    def section(obj: Any, name: str) -> None:
        scalars = [
            f for f in dataclasses.fields(obj) if not dataclasses.is_dataclass(getattr(obj, f.name))
        ]
        subs = [
            f for f in dataclasses.fields(obj) if dataclasses.is_dataclass(getattr(obj, f.name))
        ]
        if name and scalars:
            lines.append(f"\n[{name}]")
        for f in scalars:
            value = getattr(obj, f.name)
            if value is None:
                lines.append(f"# {f.name} = (none)")
            else:
                lines.append(f"{f.name} = {json.dumps(value)}")
        for f in subs:
            section(getattr(obj, f.name), f"{name}.{f.name}" if name else f.name)

    section(cfg, "")
    return "\n".join(lines).lstrip("\n") + "\n"


def pop_world_size_arg(args: list[str]) -> tuple[list[str], int | None]:
    """Remove ``--world_size N`` / ``--world-size=N`` from ``args`` (it is not a recipe key)."""
    out: list[str] = []
    world_size: int | None = None
    it = iter(range(len(args)))
    for i in it:
        key, eq, value = args[i].partition("=")
        if key in ("--world_size", "--world-size"):
            raw = value if eq else (args[i + 1] if i + 1 < len(args) else "")
            if not eq:
                next(it, None)
            try:
                world_size = int(raw)
            except ValueError:
                raise ConfigError("world_size", raw, "expected an int") from None
            if world_size < 1:
                raise ConfigError("world_size", world_size, "must be >= 1")
            continue
        out.append(args[i])
    return out, world_size
