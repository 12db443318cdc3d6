"""Load a recipe: TOML file + CLI overrides -> TorchTitan 0.2.2 ``JobConfig`` merged with ours.

TorchTitan's ``ConfigManager`` (``torchtitan/config/manager.py`` at v0.2.2) merges TOML values
into the dataclass defaults and then lets tyro apply the CLI (CLI > TOML > defaults). It rejects
unknown TOML keys only per section and without suggestions, and does not check TOML value
types (``seq_len = "abc"`` is accepted and fails much later). ``load_config`` adds both checks
before handing over to TorchTitan, and turns every problem into one ``ConfigError`` naming the
key and the value.
"""

import ast
import contextlib
import dataclasses
import difflib
import functools
import inspect
import io
import itertools
import json
import os
import re
import shutil
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal, Union

import tomli
import tyro
from torchtitan.config import ConfigManager as TitanConfigManager
from torchtitan.config import JobConfig as TitanJobConfig
from torchtitan.config.manager import custom_registry

from torchtitan_ext.config.schema import JobConfig as ExtJobConfig
from torchtitan_ext.config.tables import STAGE_KEYS, UNSUPPORTED
from torchtitan_ext.errors import ConfigError

_MISSING = object()


def merged_config_class() -> type:
    """TorchTitan's JobConfig with torchtitan_ext's sections and fields merged in."""
    return TitanConfigManager._merge_configs(TitanJobConfig, ExtJobConfig)


class ConfigManager(TitanConfigManager):
    """TorchTitan's ConfigManager over the merged JobConfig, with strict TOML checking.

    Differences from TorchTitan's: unknown keys and wrongly typed values in the TOML file raise
    ``ConfigError`` (with the nearest valid key name); an unreadable or malformed TOML file raises
    ``ConfigError`` instead of logging a traceback; and the HF-assets-path warnings of TorchTitan's
    ``_validate_config`` are dropped (the byte-level tokenizer needs no assets); ``-h`` /
    ``--help`` prints ``format_help`` (every option, with what the trainer does not support
    marked) instead of tyro's; and tyro's usage and error lines name ``prog``, not a file path.
    """

    def __init__(self, prog: str | None = None) -> None:
        super().__init__(config_cls=merged_config_class())
        self.toml_data: dict[str, Any] = {}
        """The recipe file's contents as parsed (empty without ``--job.config_file``)."""
        self.prog = prog or default_prog()
        """The command as typed, for the usage line (``train.py``)."""

    def parse_args(self, args: list[str] | None = None) -> Any:
        """TorchTitan's ``parse_args`` (TOML, then the CLI through tyro) with ``prog`` passed to
        tyro, and ``-h`` / ``--help`` answered by ``format_help`` (exits 0). ``args``: the
        command line without the program (default ``sys.argv[1:]``)."""
        if args is None:
            args = sys.argv[1:]
        if help_requested(args):
            sys.stdout.write(format_help(self.prog))
            raise SystemExit(0)
        args = bool_flags_to_tyro(self.config_cls, args)
        toml_values = self._maybe_load_toml(args)
        config_cls = self._maybe_add_custom_config(args, toml_values)
        base = self._dict_to_dataclass(config_cls, toml_values) if toml_values else config_cls()
        self.config = _tyro_cli_one_line(
            args,
            lambda: tyro.cli(
                config_cls, args=args, default=base, registry=custom_registry, prog=self.prog
            ),
        )
        self._validate_config()
        return self.config

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


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def bool_keys(root: Any) -> set[str]:
    """Dotted keys (``validation.enable``) of every ``bool`` field of the config class
    ``root``, nested sections included."""
    keys: set[str] = set()
    for section, cls, _ in _sections(root, None):
        hints = typing.get_type_hints(cls)
        keys |= {f"{section}.{f.name}" for f in dataclasses.fields(cls) if hints[f.name] is bool}
    return keys


def bool_flags_to_tyro(root: Any, args: list[str]) -> list[str]:
    """Accept ``--section.key true|false`` (and ``=true`` / ``=false``; also 1/0, yes/no,
    on/off, any case) for the boolean options of ``root``, as TorchTitan's users type them:
    rewritten to tyro's flag spellings ``--section.key`` / ``--section.no_key``. Other
    arguments, and a boolean flag not followed by one of those words, pass unchanged.

    Raises:
        ConfigError: ``--section.key=VALUE`` with a VALUE that is no boolean word.
    """
    keys = bool_keys(root)
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, inline = arg.partition("=")
        dotted = name[2:].replace("-", "_") if name.startswith("--") else ""
        if dotted not in keys:
            out.append(arg)
            i += 1
            continue
        value = inline if eq else (args[i + 1] if i + 1 < len(args) else "")
        word = value.lower()
        if word not in _TRUE + _FALSE:
            if eq:
                raise ConfigError(dotted, value, "expected true or false (command line)")
            out.append(arg)  # the bare flag: true
            i += 1
            continue
        section, _, key = dotted.rpartition(".")
        out.append(f"--{dotted}" if word in _TRUE else f"--{section}.no_{key}")
        i += 1 if eq else 2
    return out


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


_BOX = re.compile(r"^[\s│╭╰─┬┴┼╮╯]+|[\s│╭╰─╮╯]+$")


def _tyro_cli_one_line(args: list[str], parse: Callable[[], Any]) -> Any:
    """Run ``parse`` (tyro on the command line) and turn tyro's boxed error for a malformed
    override (a wrongly typed value, an unknown flag) into one ``ConfigError`` naming the
    flag's key and value, like a recipe file's; every rank would print the box otherwise.

    Raises:
        ConfigError: the override tyro rejected, with tyro's own reason.
    """
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            return parse()
    except SystemExit as e:
        if e.code in (0, None):
            raise
        # tyro draws a box (rich) or rules of "_" and "-" (plain): keep the text lines up to
        # the help part, without the box's title.
        lines = []
        for raw in buffer.getvalue().splitlines():
            line = _BOX.sub("", raw)
            if line.startswith(("Argument helptext", "For full helptext")):
                break
            if line and not set(line) <= set("─-_=│|╭╮╰╯ "):
                lines.append(line)
        if len(lines) > 1 and ":" not in lines[0]:
            lines = lines[1:]  # the title ("Value error", "Unrecognized options")
        reason = " ".join(lines[:2]) or "invalid"
        flag = re.search(r"--([A-Za-z][\w.-]*)", reason)
        key = flag.group(1).replace("-", "_") if flag else "command line"
        values: list[str | None] = []
        if flag is not None:
            for i, arg in enumerate(args):
                name, eq, inline = arg.partition("=")
                if name.lstrip("-").replace("-", "_") == key:
                    values.append(inline if eq else (args[i + 1] if i + 1 < len(args) else None))
        # A key given twice: tyro parses the last; name the value its reason quotes.
        quoted = [v for v in values if v is not None and repr(v) in reason]
        value = (quoted or values or [None])[-1]
        raise ConfigError(key, value, f"{reason} (command line)") from None


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
        ConfigError: also a malformed command-line override (tyro's reason, one line).
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


WORLD_SIZE_FLAGS: tuple[str, ...] = ("--world_size", "--world-size", "--nproc")
"""Spellings of the world-size option, the same in the config checker and every script that
takes one (``--world_size`` first; ``--nproc`` is the scripts' older spelling)."""


def pop_world_size_arg(args: list[str]) -> tuple[list[str], int | None]:
    """Remove ``--world_size N`` (or any spelling in ``WORLD_SIZE_FLAGS``, with or without
    ``=``) from ``args`` (it is not a recipe key)."""
    out: list[str] = []
    world_size: int | None = None
    it = iter(range(len(args)))
    for i in it:
        key, eq, value = args[i].partition("=")
        if key in WORLD_SIZE_FLAGS:
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


# --help: generated from the merged JobConfig (the schema that parses the recipe), so every
# option the parser accepts is listed with its docstring, type and default.

UNSUPPORTED_MARK = "not supported by torchtitan_ext's trainer"
"""The words ``--help`` marks an option with when ``validate.check_trainer_support`` rejects
(some of) its values; the same words start that check's error."""

_HELP_FALLBACK = {
    # TorchTitan 0.2.2 fields without a docstring.
    "optimizer.beta1": "Adam's beta1: decay of the first-moment (gradient) moving average",
    "compile.backend": "torch.compile backend",
}

_STAGE_KEY_HELP = {
    "seq_len": "Tokens per sequence in this stage (required): its training.seq_len.",
    "steps": "Optimizer steps of this stage (required); training.steps becomes the sum over "
    "the stages.",
    "context_parallel_degree": "This stage's parallelism.context_parallel_degree (unset: "
    "chosen by curriculum.max_tokens_per_cp_rank when that is > 0, else the recipe's); "
    "dp_shard takes the ranks it leaves.",
    "global_batch_size": "This stage's training.global_batch_size (unset: the recipe's; "
    "curriculum.tokens_per_step > 0 replaces it by tokens_per_step / seq_len).",
    "local_batch_size": "This stage's training.local_batch_size (unset: the recipe's, at most "
    "the stage's global batch / dp).",
    "lr": "Peak learning rate of this stage (unset: optimizer.lr); the run's one schedule "
    "(warmup, decay) multiplies it.",
    "warmup_steps": "A linear warmup over this stage's first steps, on top of the run's "
    "schedule (0 or unset: none).",
    "min_doc_tokens": "Train this stage only on documents of at least this many tokens "
    "(0 or unset: all documents).",
    "context_parallel_pattern": "This stage's parallelism.context_parallel_pattern (unset: the "
    "recipe's); a stage that sets it also sets the degree its pattern needs "
    "(hybrid: context_parallel_ulysses_degree; double_ring: context_parallel_inner_ring_degree, "
    "unset: its default, see parallelism.context_parallel_inner_ring_degree).",
    "mixture": 'This stage\'s data mixture, "SRC=WEIGHT[@MIN_DOC_TOKENS], ...": "train" (the '
    "recipe's training data) or a prepared corpus folder per source, weights > 0, an optional "
    "minimum document length per source (long-document upsampling); see docs/data.md (unset: "
    "the recipe's data).",
    "attn_mask_type": 'This stage\'s model.attn_mask_type: "causal" or "block_causal" '
    "(unset: the previous stage's; the first stage: the recipe's).",
    "auto_mesh": "true: the planner picks this stage's tp x cp x CP pattern (see "
    "curriculum.auto_mesh, whose value an unset key takes); the stage then sets none of "
    "context_parallel_degree and the pattern keys.",
}


def help_requested(args: Sequence[str]) -> bool:
    """Whether ``args`` ask for the help text (``-h`` or ``--help``, anywhere, as tyro and
    argparse take them)."""
    return any(a in ("-h", "--help") for a in args)


def default_prog() -> str:
    """The running command as a user types it, for usage lines: ``python -m <package>`` when
    started with ``-m`` (``python -m torchtitan_ext.config``), else the script's file name
    (``train.py``), never its path."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "train.py"


def format_help(
    prog: str,
    description: str = "",
    extra_options: Sequence[tuple[str, str]] = (),
) -> str:
    """The ``--help`` text of a command that takes a recipe: every option of the merged
    JobConfig (TorchTitan's and torchtitan_ext's) by section, with its docstring, type and
    default; the options ``validate.check_trainer_support`` rejects marked with
    ``UNSUPPORTED_MARK`` (from its own table); and a closing section on the
    ``[[curriculum.stages]]`` tables with every key of ``config.tables.STAGE_KEYS``.

    Args:
        prog: the command as typed, e.g. ``"train.py"`` (see ``default_prog``).
        description: paragraphs printed after the usage line.
        extra_options: ``(flags, help)`` of options that are not recipe keys, e.g.
            ``("--world_size N, --nproc N", "...")``; the first flag appears in the usage line.
    """
    width = max(60, min(100, shutil.get_terminal_size((100, 24)).columns))
    out: list[str] = []
    usage = f"usage: {prog} [-h] [--job.config_file RECIPE.toml]"
    usage += "".join(f" [{flags.split(',')[0].strip()}]" for flags, _ in extra_options)
    usage += " [--section.key VALUE ...]"
    out.append(usage)
    intro = (f"{description.strip()}\n\n" if description.strip() else "") + (
        "Every option is a key of the recipe: --section.key VALUE overrides [section] key of "
        "the recipe file (--job.config_file), which overrides the defaults below. Keys take _ "
        "or - (--training.seq_len, --training.seq-len). A boolean takes true or false "
        "(--validation.enable false) or is a flag: --section.key sets it, --section.no_key "
        "clears it. A list is comma-separated: "
        "--model.converters a,b."
    )
    for paragraph in intro.split("\n\n"):
        out.append("")
        # An indented paragraph is a command line: kept as written.
        out += paragraph.splitlines() if paragraph.startswith(" ") else _wrap(paragraph, width, "")
    out += ["", "options:"]
    out += _entry("-h, --help", "Show this help text and exit.", width)
    for flags, text in extra_options:
        out += _entry(flags, text, width)
    unsupported = _unsupported_reasons()
    root = merged_config_class()
    for section, cls, ext in _sections(root, ExtJobConfig):
        docs = {**_field_docs(cls), **(_field_docs(ext) if ext is not None else {})}
        hints = typing.get_type_hints(cls)
        leaves = [f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])]
        if not leaves:
            continue
        out += ["", f"[{section}]"]
        about = _class_description(cls) or (_class_description(ext) if ext else "")
        if about:
            out += _wrap(about, width, "  ")
        for f in leaves:
            key = f"{section}.{f.name}"
            tp = hints[f.name]
            text = docs.get(f.name) or _HELP_FALLBACK.get(key, "")
            if key in unsupported:
                text = f"({_unsupported_note(unsupported[key])}) {text}"
            if not _cli_settable(tp):
                out += _entry(
                    f"{key} (recipe only)",
                    f"{text}\n\nSet in the recipe file, not on the command line; see "
                    f"[[{key}]] below.",
                    width,
                )
                continue
            flags = (
                f"--{key} [true|false], --{section}.no_{f.name}"
                if tp is bool
                else f"--{key} {_metavar(tp)}"
            )
            out += _entry(flags, f"{text} (default: {_format_default(f)})", width)
    out += ["", *_stage_help(root, width)]
    return "\n".join(out) + "\n"


def _stage_help(root: Any, width: int) -> list[str]:
    """The closing ``[[curriculum.stages]]`` section: every key of ``config.tables.STAGE_KEYS``."""
    lines = ["[[curriculum.stages]]"]
    lines += _wrap(
        "The curriculum: one [[curriculum.stages]] table per context-length stage, in order, in "
        "the recipe file (not on the command line). Each stage continues from the previous "
        "one; a key a stage does not set keeps the recipe's value (the rope_* keys: the "
        "previous stage's). The keys of a stage:",
        width,
        "  ",
    )
    for key in STAGE_KEYS:
        lines += _entry(key, _stage_key_help(root, key), width)
    lines += [
        "",
        "  Example (two stages, the second at 4x the context with a larger RoPE base):",
        "      [[curriculum.stages]]",
        "      seq_len = 2048",
        "      steps = 200",
        "      [[curriculum.stages]]",
        "      seq_len = 8192",
        "      steps = 50",
        "      rope_theta = 2000000.0",
    ]
    return lines


def _stage_key_help(root: Any, key: str) -> str:
    """A stage key's text: its own, else the same-named recipe key's first paragraph."""
    if key in _STAGE_KEY_HELP:
        return _STAGE_KEY_HELP[key]
    hints = typing.get_type_hints(root)
    for section in ("model", "parallelism", "training"):
        cls = hints[section]
        if key in {f.name for f in dataclasses.fields(cls)}:
            ext = typing.get_type_hints(ExtJobConfig).get(section)
            docs = {**_field_docs(cls), **(_field_docs(ext) if ext is not None else {})}
            unset = "the previous stage's" if key.startswith("rope_") else "the recipe's"
            first = docs.get(key, "").split("\n\n")[0]
            return f"This stage's {section}.{key} (unset: {unset}). {first}".strip()
    return "(no description: see torchtitan_ext.curriculum)"


def _unsupported_reasons() -> dict[str, str]:
    """``dotted key -> why`` from the table ``validate.check_trainer_support`` checks."""
    return {key: why for key, _, why in UNSUPPORTED}


def _unsupported_note(why: str) -> str:
    """``UNSUPPORTED_MARK`` with the table's reason ("not supported yet" -> "... trainer yet")."""
    if why.startswith("not supported"):
        return UNSUPPORTED_MARK + why.removeprefix("not supported")
    return f"{UNSUPPORTED_MARK}: {why}"


def _sections(root: Any, ext: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted section, merged class, torchtitan_ext's class or None)`` of every section
    (nested ones too, e.g. ``training.dataloader``), in declaration order."""
    found: list[tuple[str, Any, Any]] = []
    hints = typing.get_type_hints(root)
    ext_hints = typing.get_type_hints(ext) if ext is not None else {}
    for f in dataclasses.fields(root):
        tp = hints[f.name]
        if not dataclasses.is_dataclass(tp):
            continue
        sub_ext = ext_hints.get(f.name)
        sub_ext = sub_ext if dataclasses.is_dataclass(sub_ext) else None
        name = f"{prefix}{f.name}"
        found.append((name, tp, sub_ext))
        found += _sections(tp, sub_ext, f"{name}.")
    return found


def _field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal after a field) of ``cls`` and its bases, as tyro
    reads them; a class without source (``make_dataclass``'s merged ones) contributes none."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        docs.update(_own_field_docs(klass))
    return docs


@functools.cache
def _own_field_docs(klass: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError, SyntaxError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _class_description(cls: Any) -> str:
    """A section class's docstring, its own or (a merged class) its base's; not the signature
    ``dataclass`` fills in."""
    for klass in cls.__mro__[:-1]:
        doc = inspect.cleandoc(klass.__doc__ or "")
        if doc and not doc.startswith(f"{klass.__name__}("):
            return doc
    return ""


def _cli_settable(tp: Any) -> bool:
    """Whether tyro takes the type on the command line (a ``dict`` anywhere: no)."""
    if typing.get_origin(tp) is dict or tp is dict:
        return False
    return all(_cli_settable(t) for t in typing.get_args(tp) if not isinstance(t, str))


def _metavar(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        parts = [_metavar(t) for t in args if t is not type(None)]
        return "|".join(parts + (["None"] if type(None) in args else []))
    if origin is Literal:
        return "{" + ",".join(str(v) for v in typing.get_args(tp)) + "}"
    if origin is list:
        return "A,B,..."
    return {int: "INT", float: "FLOAT", str: "STR", bool: "BOOL"}.get(tp, "VALUE")


def _format_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value: Any = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) if value else "empty"
    if value == "":
        return "''"
    return str(value)


def _entry(flags: str, text: str, width: int) -> list[str]:
    lines = [f"  {flags}"]
    for i, paragraph in enumerate(text.split("\n\n")):
        if i:
            lines.append("")
        lines += _wrap(paragraph, width, "      ")
    return lines


def _wrap(paragraph: str, width: int, indent: str) -> list[str]:
    """Reflow a docstring paragraph, keeping its list items (``- ...``) on lines of their
    own."""
    items: list[str] = []
    for line in paragraph.strip().splitlines():
        line = line.strip()
        if items and not line.startswith(("- ", "* ")):
            items[-1] += " " + line
        else:
            items.append(line)
    out: list[str] = []
    for item in items:
        out += textwrap.wrap(
            item, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False
        ) or [indent.rstrip()]
    return out
