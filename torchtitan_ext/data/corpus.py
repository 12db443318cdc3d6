"""Text corpora: the interpreter's standard library (embedded, no download) and local files.

Both return documents in a deterministic order, independent of rank and mesh.
"""

import contextlib
import json
import os
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torchtitan_ext.errors import ConfigError

EMBEDDED_DATASET = "python_stdlib"
_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_DATASET_KEY = "training.dataset_path"
_FIELD_KEY = "data.text_field"
_BATCH_ROWS = 10_000  # rows per batch read from datasets (batches are much faster than rows)


def python_stdlib_documents(root: str | None = None, max_doc_chars: int = 2_000_000) -> list[str]:
    """The ``.py`` files of the running interpreter's standard library, as documents.

    A package directory's files (non-recursive) form one document, each file preceded by a
    ``# file: <path>`` line, so documents are genuinely long (up to ``max_doc_chars``, after
    which a directory continues in a new document); a top-level module is a document of its
    own. ``site-packages`` and caches are skipped. Order: sorted by relative path.

    Args:
        root: the stdlib folder; default ``sysconfig.get_paths()["stdlib"]``.
        max_doc_chars: a directory's files start a new document past this many characters
            (whole files only).

    Returns:
        About 300 documents, about 31 MB of text on CPython 3.11.
    """
    base = Path(root or sysconfig.get_paths()["stdlib"])
    groups: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        rel_dir = Path(dirpath).relative_to(base)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            key = str(rel_dir / name) if rel_dir == Path(".") else str(rel_dir)
            groups.setdefault(key, []).append(Path(dirpath) / name)
    docs: list[str] = []
    for key in sorted(groups):
        parts: list[str] = []
        size = 0
        for path in groups[key]:
            text = path.read_text(encoding="utf-8", errors="replace")
            if parts and size + len(text) > max_doc_chars:
                docs.append("\n".join(parts))
                parts, size = [], 0
            parts.append(f"# file: {path.relative_to(base)}\n{text}")
            size += len(text)
        docs.append("\n".join(parts))
    return docs


class _Unreadable(Exception):
    """Our own reading found a file malformed; the message is the reason (no file name)."""


def local_documents(path: str, text_field: str) -> list[str]:
    """Documents from local files, loaded through Hugging Face ``datasets`` file by file.

    Files are read in sorted path order, the rows of a file in file order; one file per
    ``load_dataset`` call so that a problem is attributed to its file (a folder of .txt files,
    one document each, is loaded in one call first, and file by file only if that fails; a call
    costs about 5 ms). Each file is streamed (``streaming=True``) with a temporary
    ``cache_dir``, so nothing is cached or left under ``~/.cache/huggingface``: the
    non-streaming cache is keyed by path and modification time, so it serves a stale copy of a
    file rewritten with the same mtime (and it keeps an Arrow copy of every version of the
    data). ``datasets``' progress bars, error logs and download-count requests are off while
    loading (see ``_quiet_datasets``).

    Args:
        path: a .jsonl/.json/.parquet/.txt file, or a folder of files of one of these kinds
            (.jsonl and .json mix). A .txt file is one document (UTF-8); jsonl/json/parquet
            rows are documents.
        text_field: the column holding the text in jsonl/json/parquet.

    Returns:
        The documents of all files, concatenated.

    Raises:
        ConfigError: key ``training.dataset_path`` for a missing path, unsupported or mixed
            file kinds, or a file that cannot be opened, is empty, has no documents, is
            malformed (with the 1-based line of a bad jsonl line, the byte offset of
            undecodable text) or otherwise fails to load; key ``data.text_field`` for a column
            missing from a file, or a row whose text is missing, null or not a string (with its
            1-based jsonl line, or its 0-based json/parquet row index). The reason names the
            offending file by its absolute path.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(
            str(f) for f in p.rglob("*") if f.suffix in _LOCAL_BUILDERS and not f.is_dir()
        )
    elif p.is_file():
        files = [str(p)]
    else:
        raise ConfigError(_DATASET_KEY, path, "no such file or folder")
    kinds = {_LOCAL_BUILDERS.get(Path(f).suffix) for f in files}
    if not files or None in kinds:
        raise ConfigError(
            _DATASET_KEY, path, f"expected files ending in {', '.join(_LOCAL_BUILDERS)}"
        )
    if len(kinds) > 1:
        raise ConfigError(_DATASET_KEY, path, f"mixes file kinds {sorted(kinds)}")  # type: ignore[type-var]
    builder = kinds.pop()
    assert builder is not None
    for file in files:
        _check_file(path, file)
    docs: list[str] = []
    with _quiet_datasets(), tempfile.TemporaryDirectory(prefix="torchtitan_ext_data_") as cache:
        if builder == "text" and len(files) > 1:
            # One document per file: one call for all (a call costs ~5 ms, many .txt files are
            # common); any failure is then attributed by loading file by file.
            try:
                docs = [t for b in _stream("text", files, cache) for t in b["text"]]
                if len(docs) == len(files):
                    return docs
            except Exception:
                pass
            docs = []
        for file in files:
            docs += _file_documents(path, file, builder, text_field, cache)
    return docs


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Inside, ``datasets`` shows no progress bars, logs no errors and makes no network call
    (all restored after): every rank loads the data, and a failure is reported as one
    ``ConfigError`` line per rank. ``load_dataset`` otherwise sends a download-count HEAD
    request to the Hub for each call, even for local files (``HF_UPDATE_DOWNLOAD_COUNTS``,
    read at import): about 0.1 s a file here, where DNS fails fast, and up to its 3 s timeout
    or longer (DNS) on a cluster without network."""
    import datasets
    from datasets.utils import logging as datasets_logging

    bars = datasets.is_progress_bar_enabled()
    verbosity = datasets_logging.get_verbosity()
    counts = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.disable_progress_bars()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = counts
        datasets_logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _check_file(path: str, file: str) -> None:
    """The cheap checks before ``datasets``: the file can be opened and is not empty.

    Raises:
        ConfigError: ``training.dataset_path`` (``path``), the reason naming ``file``.
    """
    name = os.path.abspath(file)
    try:
        size = os.stat(file).st_size
        with open(file, "rb"):
            pass
    except OSError as e:
        reason = f"{name}: cannot be opened: {e.strerror or e}"
        raise ConfigError(_DATASET_KEY, path, reason) from None
    if size == 0:
        raise ConfigError(_DATASET_KEY, path, f"{name}: empty file (0 bytes), no documents")


def _stream(builder: str, files: list[str], cache_dir: str) -> Iterator[dict[str, list[Any]]]:
    """The rows of ``files`` from ``datasets.load_dataset`` (streaming), in batches of columns.

    Raises:
        Exception: whatever ``datasets`` raises, when called or while iterating.
    """
    import datasets

    kwargs: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
    ds = datasets.load_dataset(
        builder, data_files=files, split="train", streaming=True, cache_dir=cache_dir, **kwargs
    )
    return ds.iter(batch_size=_BATCH_ROWS)


def _file_documents(
    path: str, file: str, builder: str, text_field: str, cache_dir: str
) -> list[str]:
    """The documents of one file (already through ``_check_file``): ``datasets`` loads it, and
    our own reading of the file says precisely what is wrong with it if that fails.

    Args:
        path: ``training.dataset_path`` as configured (the value of a ``ConfigError``).
        file: the file to load.
        builder: its ``datasets`` builder: "json", "parquet" or "text".
        text_field: the text column of json/parquet rows.
        cache_dir: ``datasets``' cache folder (streaming only puts a lock file there).

    Raises:
        ConfigError: see ``local_documents``.
    """
    name = os.path.abspath(file)
    column = "text" if builder == "text" else text_field
    docs: list[str] = []
    columns: list[str] = []
    rows = 0
    column_seen = False
    first_bad: tuple[int, Any] | None = None  # row index and text of the first non-string text
    try:
        for batch in _stream(builder, [file], cache_dir):
            n = len(next(iter(batch.values()), []))
            columns = columns or list(batch)
            values = batch.get(column)
            column_seen = column_seen or values is not None
            if first_bad is None:
                values = values if values is not None else [None] * n
                for i, value in enumerate(values):
                    if not isinstance(value, str):
                        first_bad = (rows + i, value)
                        break
                docs += values if first_bad is None else values[: first_bad[0] - rows]
            rows += n
            if first_bad is not None and column_seen:
                break  # enough to report the first bad row
    except Exception as e:
        failure = f"datasets' {builder} loader failed: {_first_line(e)}"
        raise _diagnosed(path, file, builder, text_field, failure) from None
    if rows == 0:  # e.g. only blank lines, "[]", or rows without any column ("{}")
        raise _diagnosed(path, file, builder, text_field, "no documents (0 rows)")
    if not column_seen:
        reason = f"no such column in {name}; its columns are {columns}"
        raise ConfigError(_FIELD_KEY, text_field, reason)
    if first_bad is not None:
        reason = f"{name}: {_bad_row(file, builder, column, *first_bad)}"
        raise ConfigError(_FIELD_KEY, text_field, reason)
    return docs


def _first_line(e: BaseException) -> str:
    """``Type: first line of the message`` of an exception (just the type if no message)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _text_problem(row: Any, column: str) -> str | None:
    """What is wrong with a json row's text; None if it is a string."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if column not in row:
        return f"no {column!r} field"
    value = row[column]
    if value is None:
        return f"{column!r} is null"
    if not isinstance(value, str):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        return f"{column!r} is {type(value).__name__} {shown}, not a string"
    return None


def _bad_row(file: str, builder: str, column: str, index: int, value: Any) -> str:
    """Where and what the first row without a string text is. A json file is re-read with
    ``json.loads`` for the line number (``datasets`` skips blank lines, so its row index is not
    the line) and to tell a missing field from a null.

    Args:
        file, builder, column: as in ``_file_documents``.
        index, value: the 0-based row index and the text ``datasets`` gave for that row.
    """
    if builder == "json":
        try:
            for where, row in _json_rows(file):
                problem = _text_problem(row, column)
                if problem is not None:
                    return f"{where}: {problem}"
        except _Unreadable:
            pass  # datasets read what json.loads cannot: report datasets' view of the row
    return f"row index {index}: {_text_problem({column: value}, column)}"


def _diagnosed(path: str, file: str, builder: str, text_field: str, otherwise: str) -> ConfigError:
    """The error for a file that ``datasets`` failed to load (or found no rows in), from our own
    reading of it: ``otherwise`` is the reason if that reading finds nothing wrong."""
    column = "text" if builder == "text" else text_field
    key, found = _diagnose(file, builder, column)
    reason = f"{os.path.abspath(file)}: {found or otherwise}"
    return ConfigError(key, path if key == _DATASET_KEY else text_field, reason)


def _diagnose(file: str, builder: str, column: str) -> tuple[str, str | None]:
    """What is wrong with ``file``, from our own reading of it (the text decoded as UTF-8, each
    json row parsed with ``json.loads``, a parquet file opened with pyarrow).

    Returns:
        The ``ConfigError`` key and its reason (without the file name); the reason is None
        when our reading finds nothing wrong.
    """
    try:
        if builder == "text":
            _decode(file)
        elif builder == "json":
            rows = 0
            for where, row in _json_rows(file):
                rows += 1
                problem = _text_problem(row, column)
                if problem is not None:  # e.g. a first row's null that typed the column
                    return _FIELD_KEY, f"{where}: {problem}"
            if rows == 0:
                return _DATASET_KEY, "no documents (0 rows)"
        else:
            return _DATASET_KEY, _diagnose_parquet(file)
    except _Unreadable as e:
        return _DATASET_KEY, str(e)
    return _DATASET_KEY, None


def _diagnose_parquet(file: str) -> str | None:
    """What pyarrow finds wrong with a parquet file (None if it reads every row group)."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except Exception as e:
        return f"not a readable parquet file: {_first_line(e)}"
    if parquet.metadata.num_rows == 0:
        return "no documents (0 rows)"
    for group in range(parquet.num_row_groups):
        try:
            parquet.read_row_group(group)
        except Exception as e:
            return f"parquet row group {group} cannot be read: {_first_line(e)}"
    return None


def _decode(file: str) -> str:
    """The file's text, decoded as UTF-8 (as ``datasets`` reads text and json).

    Raises:
        _Unreadable: undecodable bytes, naming the byte offset (and line) of the first.
    """
    data = Path(file).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise _Unreadable(
            f"not UTF-8 text: byte 0x{data[e.start]:02x} at byte offset {e.start} "
            f"(line {line}): {e.reason}"
        ) from None


def _json_rows(file: str) -> Iterator[tuple[str, Any]]:
    """The rows of a json file as ``(where, row)``: "line N" (1-based) for JSON lines, skipping
    blank lines as ``datasets`` does; "row index N" (0-based) for a .json file holding one
    array.

    Raises:
        _Unreadable: undecodable bytes, invalid JSON, or a row that is not an object.
    """
    text = _decode(file)
    if file.endswith(".json") and text.lstrip().startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as e:
            reason = f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
            raise _Unreadable(reason) from None
        for i, row in enumerate(array):
            if not isinstance(row, dict):
                raise _Unreadable(f"row index {i}: {_text_problem(row, '')}")
            yield f"row index {i}", row
        return
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _Unreadable(f"line {n}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise _Unreadable(f"line {n}: {_text_problem(row, '')}")
        yield f"line {n}", row


def load_documents(cfg: Any) -> list[str]:
    """The documents of ``training.dataset`` / ``training.dataset_path``.

    Raises:
        ConfigError: a dataset that needs a download (e.g. TorchTitan's "c4") without a local
            ``training.dataset_path``; any problem with the local files (see
            ``local_documents``), named by file.
    """
    t = cfg.training
    if t.dataset_path:
        return local_documents(t.dataset_path, cfg.data.text_field)
    if t.dataset == EMBEDDED_DATASET:
        return python_stdlib_documents()
    raise ConfigError(
        "training.dataset",
        t.dataset,
        f"not available offline; use '{EMBEDDED_DATASET}' or set training.dataset_path to "
        "local .jsonl/.parquet/.txt files",
    )
