"""Prepare a corpus for training: tokenize it once, in parallel, into memory-mappable shards.

``python -m torchtitan_ext.data.prepare --source SRC --out DIR --job.config_file RECIPE``

SRC is local files (a .jsonl/.json/.parquet/.txt file, a folder of them, or a glob) or a
Hugging Face hub dataset by name (streamed; ``--hub`` also streams a local dataset folder).
The tokenizer is the recipe's (``model.tokenizer``, ``model.hf_assets_path``); any recipe
override (``--section.key value``) applies. The result is the layout of ``data.prepared``;
train on it with ``training.dataset_path = DIR``.

How it runs (docs/data.md):

- Local files are read by Hugging Face ``datasets`` into its Arrow cache (under
  ``DIR/.cache``, removed at the end), cut into contiguous row ranges (at least 16 shards, at
  most 64 MiB of text each), and a ``multiprocessing`` pool of ``--num-proc`` processes
  tokenizes one shard per task. A hub dataset is streamed (``streaming=True``), one task per
  shard of the dataset (``IterableDataset.shard``: its files).
- Each shard is written under temporary names, renamed, and then marked done by its own
  ``NNNNN.json``; ``plan.json`` (the sources, their hashes, the tokenizer, the shards) is
  written first. Run the same command again after a failure or Ctrl-C: done shards are kept.
- ``documents.npy`` and then ``manifest.json`` are written last, atomically: a folder without
  the manifest is never read as a corpus.
- A progress bar (tqdm) shows tokens, tokens/s and the ETA.
"""

import argparse
import glob
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from torchtitan_ext.data.corpus import (
    _LOCAL_BUILDERS,
    _check_file,
    _file_documents,
    _first_line,
    _quiet_datasets,
)
from torchtitan_ext.data.prepared import (
    DOCUMENTS,
    FORMAT,
    MANIFEST,
    PLAN,
    VERSION,
    file_hash,
    open_prepared,
    token_dtype,
    write_json_atomic,
)
from torchtitan_ext.data.tokenizer import encode_document, tokenizer_identity
from torchtitan_ext.errors import ConfigError

MIN_SHARDS = 16
"""Local sources are cut into at least this many shards (so every core of a machine with up to
16 has work), whatever ``--num-proc`` is: the shards, and so a resume, do not depend on it."""
SHARD_BYTES = 64 << 20
"""At most about this much text (Arrow bytes) per shard of local files."""
_BATCH_ROWS = 1_000
_SOURCE_KEY = "--source"

# Set in each worker process by _init_worker (fork inherits the dataset, the tokenizer is built
# there from the recipe arguments).
_WORKER: dict[str, Any] = {}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m torchtitan_ext.data.prepare",
        description=(
            "Tokenize a corpus once, in parallel, into a prepared corpus: token shards "
            "(shards/*.bin, uint16 or uint32 by vocab size), a document index (documents.npy) "
            "and a manifest (manifest.json, written last). Train on it with "
            "--training.dataset_path DIR. Resumable: run the same command again."
        ),
        epilog=(
            "Every other argument is the recipe's: --job.config_file RECIPE (required: its "
            "tokenizer, model.tokenizer and model.hf_assets_path, is the corpus's) and any "
            "--section.key value override (e.g. --model.tokenizer byte). See docs/data.md."
        ),
    )
    p.add_argument(
        "--source",
        help="(required unless --verify) a .jsonl/.json/.parquet/.txt file, a folder of them "
        "(searched recursively), a quoted glob, or a Hugging Face hub dataset name (streamed; "
        "e.g. allenai/c4)",
    )
    p.add_argument("--out", required=True, help="the prepared corpus folder (created)")
    p.add_argument(
        "--num-proc",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="tokenizing processes (default: the CPUs this process may use)",
    )
    p.add_argument(
        "--text-field",
        default=None,
        help="the column holding the text in jsonl/json/parquet rows (default: the recipe's "
        "data.text_field); a .txt file is one document",
    )
    p.add_argument(
        "--hub",
        action="store_true",
        help="treat --source as a datasets.load_dataset path and stream it, even when it is a "
        "local folder (a downloaded hub dataset); a name that is no local path is a hub "
        "dataset anyway",
    )
    p.add_argument("--name", default=None, help="hub dataset configuration (e.g. en for c4)")
    p.add_argument("--split", default="train", help="hub dataset split (default: train)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete what --out holds (complete or partial) and prepare from scratch",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="only check the prepared corpus at --out against its manifest (sizes and every "
        "shard's xxh3-64) and the recipe's tokenizer, then exit (0: intact)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (2 on a ``ConfigError``, printed as one line)."""
    args, recipe_args = _parser().parse_known_args(argv)
    try:
        return _main(args, recipe_args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, recipe_args: list[str]) -> int:
    from torchtitan_ext.config.manager import load_config
    from torchtitan_ext.data.tokenizer import build_tokenizer

    if not any(a == "--job.config_file" or a.startswith("--job.config_file=") for a in recipe_args):
        raise ConfigError("job.config_file", None, "required: the recipe whose tokenizer to use")
    cfg = load_config(recipe_args)
    tokenizer = build_tokenizer(cfg)
    identity = tokenizer_identity(cfg, tokenizer)
    out = Path(args.out)
    if args.verify:
        corpus = open_prepared(str(out), identity, verify=True)
        m = corpus.manifest
        print(f"{out}: intact: {m['documents']} documents, {m['tokens']} tokens")
        return 0
    if not args.source:
        raise ConfigError("--source", None, "required (what to prepare)")
    if args.num_proc < 1:
        raise ConfigError("--num-proc", args.num_proc, "must be >= 1")
    text_field = args.text_field or cfg.data.text_field
    source = _Source.resolve(args.source, args.hub, args.name, args.split, text_field)
    if args.overwrite and out.exists():
        (out / MANIFEST).unlink(missing_ok=True)  # first: never a complete-looking folder
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shards").mkdir(exist_ok=True)
    dtype = token_dtype(identity["vocab_size"])
    started = time.perf_counter()
    with _quiet_datasets():
        source.load(out / ".cache")
        plan = {
            "format": FORMAT,
            "version": VERSION,
            "tokenizer": identity,
            "dtype": dtype.name,
            "text_field": text_field,
            "sources": source.describe(),
            "shards": source.shards(),
        }
        _check_plan(out, plan)
        if (out / MANIFEST).exists():
            print(f"{out}: already prepared (use --overwrite to prepare it again)")
            return 0
        write_json_atomic(out / PLAN, plan)
        done = _run_shards(out, source, plan, recipe_args, args.num_proc)
    _finish(out, plan, done)
    shutil.rmtree(out / ".cache", ignore_errors=True)
    seconds = time.perf_counter() - started
    tokens = sum(d["tokens"] for d in done)
    rate = tokens / max(seconds, 1e-9)
    print(
        f"prepared {sum(d['documents'] for d in done)} documents, {tokens} tokens ({dtype.name}) "
        f"in {len(done)} shards: {seconds:.1f} s, {rate:.0f} tokens/s, "
        f"{rate / min(args.num_proc, len(done)):.0f} tokens/s per process -> {out}"
    )
    return 0


class _Source:
    """Where the documents come from: local files (Arrow, row-range shards) or a streamed
    dataset (its own shards)."""

    def __init__(
        self, spec: str, files: list[str], builder: str, hub: bool, name: str | None, split: str
    ) -> None:
        self.spec, self.files, self.builder, self.hub = spec, files, builder, hub
        self.name, self.split = name, split
        self.text_field = ""
        self.dataset: Any = None

    @classmethod
    def resolve(
        cls, spec: str, hub: bool, name: str | None, split: str, text_field: str
    ) -> "_Source":
        """The files of ``spec`` (sorted), or a hub dataset when ``hub`` or nothing local
        matches.

        Raises:
            ConfigError: ``--source`` with no supported files, mixed kinds, an unreadable or
                empty file.
        """
        files: list[str] = []
        if not hub:
            p = Path(spec)
            if p.is_dir():
                files = [str(f) for f in p.rglob("*") if f.suffix in _LOCAL_BUILDERS]
            elif p.is_file():
                files = [spec]
            elif glob.has_magic(spec):
                files = [f for f in glob.glob(spec, recursive=True) if os.path.isfile(f)]
                if not files:
                    raise ConfigError(_SOURCE_KEY, spec, "the glob matches no file")
            files = sorted(os.path.abspath(f) for f in files)
            if (p.exists() or files) and not files:
                raise ConfigError(
                    _SOURCE_KEY, spec, f"no files ending in {', '.join(_LOCAL_BUILDERS)}"
                )
        source = cls(spec, files, "", hub or not files, name, split)
        source.text_field = text_field
        if files:
            kinds = {_LOCAL_BUILDERS.get(Path(f).suffix) for f in files}
            if None in kinds:
                raise ConfigError(
                    _SOURCE_KEY, spec, f"expected files ending in {', '.join(_LOCAL_BUILDERS)}"
                )
            if len(kinds) > 1:
                raise ConfigError(_SOURCE_KEY, spec, f"mixes file kinds {sorted(map(str, kinds))}")
            source.builder = str(kinds.pop())
            for f in files:
                _as_source_error(spec, _check_file, spec, f)
        return source

    def load(self, cache: Path) -> None:
        """Open the data: local files into ``datasets``' Arrow cache under ``cache`` (reused
        by a resume), or the hub dataset as a stream.

        Raises:
            ConfigError: naming the file (and line or row) that ``datasets`` cannot load, or
                ``data.text_field`` for a missing column.
        """
        import datasets

        if self.hub:
            try:
                self.dataset = datasets.load_dataset(
                    self.spec, name=self.name, split=self.split, streaming=True
                )
            except Exception as e:
                reason = f"neither local files nor a dataset datasets can load: {_first_line(e)}"
                raise ConfigError(_SOURCE_KEY, self.spec, reason) from None
            self.dataset = self.dataset.select_columns([self.text_field])
            return
        kwargs: dict[str, Any] = {"sample_by": "document"} if self.builder == "text" else {}
        try:
            ds = datasets.load_dataset(
                self.builder,
                data_files=self.files,
                split="train",
                cache_dir=str(cache),
                num_proc=None,
                **kwargs,
            )
        except Exception:
            self.diagnose()
            raise ConfigError(_SOURCE_KEY, self.spec, "datasets cannot load it") from None
        column = "text" if self.builder == "text" else self.text_field
        if column not in ds.column_names:
            self.diagnose()
            raise ConfigError(
                "data.text_field", column, f"no such column; the columns are {ds.column_names}"
            )
        self.dataset = ds.select_columns([column])

    def diagnose(self) -> None:
        """Raise the precise error of the first bad file (our own reading, file by file)."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="torchtitan_ext_data_") as cache:
            for f in self.files:
                _as_source_error(
                    self.spec,
                    _file_documents,
                    self.spec,
                    f,
                    self.builder,
                    self.text_field,
                    cache,
                )

    def describe(self) -> dict[str, Any]:
        """The sources as the manifest records them (local files with size and xxh3-64)."""
        if self.hub:
            return {"hub": self.spec, "name": self.name, "split": self.split}
        return {
            "builder": self.builder,
            "files": [
                {"file": f, "bytes": os.path.getsize(f), "xxh3_64": file_hash(f)}
                for f in self.files
            ],
        }

    def shards(self) -> list[list[int]]:
        """Each shard's work: ``[first_row, end_row]`` of local files, ``[i, n]`` (shard i of
        n) of a streamed dataset."""
        if self.hub:
            n = max(1, int(getattr(self.dataset, "num_shards", 1)))
            return [[i, n] for i in range(n)]
        rows = len(self.dataset)
        n = max(MIN_SHARDS, -(-self.dataset.data.nbytes // SHARD_BYTES))
        n = max(1, min(n, rows))
        bounds = [rows * i // n for i in range(n + 1)]
        return [[bounds[i], bounds[i + 1]] for i in range(n)]

    def batches(self, work: list[int]) -> Iterator[list[Any]]:
        """The texts of one shard, ``_BATCH_ROWS`` rows at a time."""
        if self.hub:
            shard = self.dataset.shard(num_shards=work[1], index=work[0])
            for batch in shard.iter(batch_size=_BATCH_ROWS):
                yield batch[self.text_field]
            return
        column = self.dataset.column_names[0]
        for a in range(work[0], work[1], _BATCH_ROWS):
            yield self.dataset[a : min(a + _BATCH_ROWS, work[1])][column]


def _as_source_error(spec: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)``, with a ``training.dataset_path`` error re-keyed as ``--source``."""
    try:
        return fn(*args)
    except ConfigError as e:
        if e.key == "training.dataset_path":
            raise ConfigError(_SOURCE_KEY, spec, e.reason) from None
        raise


def _check_plan(out: Path, plan: dict[str, Any]) -> None:
    """Raise unless ``out`` is empty or holds (part of) a corpus of this same ``plan``.

    Raises:
        ConfigError: ``--out``, when its plan.json differs (other sources, another tokenizer
            or text field, changed files).
    """
    import json

    existing = out / PLAN
    if not existing.exists():
        if (out / MANIFEST).exists() or any((out / "shards").iterdir()):
            raise ConfigError("--out", str(out), "holds files but no plan.json; use --overwrite")
        return
    old = json.loads(existing.read_text())
    if old != plan:
        what = [k for k in plan if old.get(k) != plan[k]]
        raise ConfigError(
            "--out",
            str(out),
            f"holds a corpus prepared with other {', '.join(what)} ({existing.absolute()}); "
            "use --overwrite or another folder",
        )


def _shard_paths(out: Path, i: int) -> tuple[Path, Path, Path]:
    """(tokens .bin, document lengths .npy, done marker .json) of shard ``i``."""
    base = out / "shards" / f"{i:05d}"
    return base.with_suffix(".bin"), Path(f"{base}.lengths.npy"), base.with_suffix(".json")


def _done(out: Path, i: int, dtype: np.dtype) -> dict[str, Any] | None:
    """Shard ``i``'s record if it is complete (its marker, and files of the sizes it says)."""
    import json

    bin_path, lengths_path, marker = _shard_paths(out, i)
    if not marker.exists():
        return None
    record: dict[str, Any] = json.loads(marker.read_text())
    ok = (
        bin_path.exists()
        and bin_path.stat().st_size == record["tokens"] * dtype.itemsize
        and lengths_path.exists()
    )
    return record if ok else None


def _init_worker(recipe_args: list[str], source: _Source, out: str, dtype: str) -> None:
    from torchtitan_ext.config.manager import load_config
    from torchtitan_ext.data.tokenizer import build_tokenizer

    _WORKER.update(
        tokenizer=build_tokenizer(load_config(recipe_args)),
        source=source,
        out=Path(out),
        dtype=np.dtype(dtype),
    )


def _tokenize_shard(task: tuple[int, list[int]]) -> tuple[int, dict[str, Any]]:
    """Tokenize shard ``task = (i, work)`` into its files (temporary names, renamed, then the
    marker). Returns ``i`` and its record, or ``{"error": (key, value, reason)}`` for a row
    without text (a ``ConfigError`` does not survive pickling)."""
    import xxhash

    i, work = task
    tokenizer, source, out, dtype = (_WORKER[k] for k in ("tokenizer", "source", "out", "dtype"))
    bin_path, lengths_path, marker = _shard_paths(out, i)
    h = xxhash.xxh3_64()
    lengths: list[int] = []
    row = work[0] if not source.hub else 0
    tmp_bin = bin_path.with_name(bin_path.name + ".tmp")
    with open(tmp_bin, "wb") as f:
        for texts in source.batches(work):
            encoded = []
            for text in texts:
                if not isinstance(text, str):
                    where = f"row index {row}" if not source.hub else f"shard {i}"
                    got = "null" if text is None else type(text).__name__
                    reason = f"{source.spec}: {where}: the text is {got}, not a string"
                    return i, {"error": ("data.text_field", source.text_field, reason)}
                encoded.append(encode_document(tokenizer, text))
                row += 1
            if not encoded:
                continue
            chunk = np.concatenate(encoded).astype(dtype).tobytes()
            f.write(chunk)
            h.update(chunk)
            lengths += [len(e) for e in encoded]
        f.flush()
        os.fsync(f.fileno())
    tmp_lengths = lengths_path.with_name(lengths_path.name + ".tmp")
    with open(tmp_lengths, "wb") as lf:
        np.save(lf, np.asarray(lengths, dtype=np.int64))
    os.replace(tmp_bin, bin_path)
    os.replace(tmp_lengths, lengths_path)
    record = {
        "tokens": int(sum(lengths)),
        "documents": len(lengths),
        "xxh3_64": h.hexdigest(),
        "work": work,
    }
    write_json_atomic(marker, record)
    return i, record


def _run_shards(
    out: Path, source: _Source, plan: dict[str, Any], recipe_args: list[str], num_proc: int
) -> list[dict[str, Any]]:
    """Tokenize every shard not done yet on a pool of ``num_proc`` processes, with a progress
    bar; returns every shard's record, in order.

    Raises:
        ConfigError: a row without text (naming the source and row).
    """
    from tqdm import tqdm

    dtype = np.dtype(plan["dtype"])
    shards = plan["shards"]
    records: list[dict[str, Any] | None] = [_done(out, i, dtype) for i in range(len(shards))]
    todo = [(i, w) for i, w in enumerate(shards) if records[i] is None]
    total_rows = None if source.hub else len(source.dataset)

    def estimate(bar: Any) -> None:
        done = [r for r in records if r is not None]
        tokens = sum(r["tokens"] for r in done)
        if not done or tokens == 0:
            return
        if total_rows:
            rows = sum(r["work"][1] - r["work"][0] for r in done)
            bar.total = max(tokens, round(tokens * total_rows / max(rows, 1)))
        else:
            bar.total = max(tokens, round(tokens * len(shards) / len(done)))

    already = sum(r["tokens"] for r in records if r is not None)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per process
    bar = tqdm(
        desc="prepare",
        unit="tok",
        unit_scale=True,
        initial=already,
        dynamic_ncols=True,
        smoothing=0,
    )
    estimate(bar)
    procs = max(1, min(num_proc, len(todo)))
    ctx = mp.get_context("fork")
    init = (recipe_args, source, str(out), dtype.name)
    with ctx.Pool(procs, initializer=_init_worker, initargs=init) as pool:
        for i, result in pool.imap_unordered(_tokenize_shard, todo):
            if "error" in result:
                pool.terminate()
                bar.close()
                if not source.hub:
                    source.diagnose()  # the precise file and line when our reading finds it
                raise ConfigError(*result["error"])
            records[i] = result
            bar.update(result["tokens"])
            estimate(bar)
            bar.refresh()
    bar.close()
    assert all(r is not None for r in records)
    return [r for r in records if r is not None]


def _finish(out: Path, plan: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Write the document index, then the manifest (last, atomically)."""
    parts = [np.load(_shard_paths(out, i)[1]) for i in range(len(records))]
    lengths = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tmp = out / (DOCUMENTS + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, offsets)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / DOCUMENTS)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": plan["tokenizer"],
        "dtype": plan["dtype"],
        "text_field": plan["text_field"],
        "tokens": int(offsets[-1]),
        "documents": len(lengths),
        "shards": [
            {
                "file": f"shards/{i:05d}.bin",
                "tokens": r["tokens"],
                "documents": r["documents"],
                "xxh3_64": r["xxh3_64"],
            }
            for i, r in enumerate(records)
        ],
        "sources": plan["sources"],
    }
    write_json_atomic(out / MANIFEST, manifest)


if __name__ == "__main__":
    sys.exit(main())
