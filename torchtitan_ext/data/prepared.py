"""A prepared corpus: token shards, a document index and a manifest, memory-mapped for training.

Layout of a prepared corpus folder (``python -m torchtitan_ext.data.prepare`` writes it; see
docs/data.md):

- ``shards/NNNNN.bin``: tokens, raw little-endian ``uint16`` (vocab <= 65536) or ``uint32``,
  every document as BOS + tokens + EOS (``tokenizer.encode_document``), documents back to back.
  The shards' concatenation in order is the corpus's global token stream.
- ``documents.npy``: (n_docs + 1,) int64 global offsets: document i is stream positions
  ``[offsets[i], offsets[i + 1])``; no document spans two shards.
- ``manifest.json``, written last and atomically (a temporary name, then ``os.replace``): the
  tokenizer's identity, the token dtype, the counts, each shard's size and xxh3-64 hash, and
  the sources (each local file's size and hash, or the hub dataset's name). A folder without it
  is incomplete (``prepare`` resumes it).

This is Megatron-LM's ``.bin`` + ``.idx`` layout (``megatron/core/datasets/indexed_dataset.py``)
with the index as a plain ``.npy`` file; docs/data.md says why no library's format was used.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from torchtitan_ext.data.stream import TokenStream
from torchtitan_ext.errors import ConfigError

FORMAT = "torchtitan_ext.prepared_corpus"
VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
DOCUMENTS = "documents.npy"
_KEY = "training.dataset_path"
_HASH_BLOCK = 16 << 20  # bytes read at a time when hashing


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every token id: uint16 up to 65536 ids, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def file_hash(path: str | Path) -> str:
    """The xxh3-64 hex digest of a file's bytes (read 16 MiB at a time; about 5 GB/s)."""
    import xxhash

    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _is_part(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.exists(os.path.join(path, MANIFEST)) or os.path.exists(os.path.join(path, PLAN))
    )


PART_PREFIX = "part-"
"""Subfolders of a folder of parts are named ``part-*`` (e.g. ``part-00017``)."""


def parts_of(path: str) -> list[str]:
    """The prepared corpora a folder of parts holds (its ``part-*`` subfolders that are
    prepared corpora, complete or not, in name order), or [] when ``path`` is itself one or
    holds none (other subfolders are not parts: a folder that merely contains a corpus is not
    read as one).

    A corpus prepared on a cluster is one ``prepare`` job per part of the source, each writing
    its own folder under one parent (``docs/data.md``: a Slurm array, or any executor that runs
    commands); training on the parent reads the parts as one corpus (``open_prepared``)."""
    if not os.path.isdir(path) or _is_part(path):
        return []
    subs = sorted(os.path.join(path, d) for d in os.listdir(path) if d.startswith(PART_PREFIX))
    return [d for d in subs if _is_part(d)]


def is_prepared(path: str) -> bool:
    """Whether ``path`` is a prepared corpus folder, complete or not (it holds a manifest or the
    plan ``prepare`` writes first), or a folder of such parts (``parts_of``)."""
    return _is_part(path) or bool(parts_of(path))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary name and ``os.replace``: a reader
    sees the old file or the whole new one, never part of it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class PreparedCorpus:
    """An opened (checked) prepared corpus.

    Attributes:
        path: its folder.
        manifest: ``manifest.json`` as read.
        stream: the whole global token stream (memory-mapped shards).
        offsets: (n_docs + 1,) int64 document offsets, memory-mapped.
    """

    path: str
    manifest: dict[str, Any]
    stream: TokenStream
    offsets: np.ndarray

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def split(self, validation_fraction: float) -> tuple[TokenStream, np.ndarray, TokenStream, int]:
        """Training and validation streams: the last ``round(fraction x n_docs)`` documents (at
        least one when the fraction is > 0 and there are two documents or more) are held out,
        in the prepared order (the corpus is not shuffled; windows are, per epoch).

        Returns:
            (training stream, its (n_train + 1,) int64 document offsets (memory-mapped),
            validation stream, number of validation documents).
        """
        n = self.num_documents
        n_val = round(validation_fraction * n) if n > 1 else 0
        if validation_fraction > 0 and n > 1:
            n_val = max(1, n_val)
        cut = int(self.offsets[n - n_val])
        train = self.stream.range(0, cut)
        val = self.stream.range(cut, len(self.stream))
        return train, self.offsets[: n - n_val + 1], val, n_val


def open_prepared(
    path: str, identity: dict[str, Any], verify: bool = False, key: str = _KEY
) -> PreparedCorpus:
    """Open and check a prepared corpus for a recipe whose tokenizer is ``identity``.

    Cheap checks always run (the manifest, each shard's and the index's size, the tokenizer);
    ``verify`` also hashes every shard (reads the whole corpus: about 5 GB/s from the page
    cache, the disk's speed otherwise). No collective.

    Args:
        path: the corpus folder.
        identity: ``tokenizer.tokenizer_identity`` of the recipe's tokenizer.
        verify: compare each shard's xxh3-64 with the manifest's.
        key: the recipe key that names ``path`` (in the errors).

    A folder of parts (``parts_of``: one ``prepare`` job's output each, e.g. prepared on a
    cluster) opens as one corpus, the parts in name order.

    Raises:
        ConfigError: ``key`` (``training.dataset_path``), naming the file: no manifest (an
            incomplete corpus, or not a prepared one), a manifest of another format or
            version, another tokenizer or vocabulary than the recipe's, a missing shard or
            index, a shard or index whose size differs from the manifest's (truncated or
            altered), a shard whose hash differs (``verify``).
    """
    parts = parts_of(path)
    if parts:
        return _open_parts(path, parts, identity, verify, key)
    folder = Path(path)
    manifest_file = folder / MANIFEST
    if not manifest_file.exists():
        raise _fail(
            key,
            path,
            f"{manifest_file.absolute()}: no such file: an incomplete prepared corpus (prepare "
            "was stopped or failed); run python -m torchtitan_ext.data.prepare again to resume",
        )
    try:
        manifest = json.loads(manifest_file.read_text())
        assert manifest["format"] == FORMAT
    except (ValueError, KeyError, TypeError, AssertionError):
        raise _fail(
            key, path, f"{manifest_file.absolute()}: not a prepared-corpus manifest"
        ) from None
    if manifest.get("version") != VERSION:
        raise _fail(
            key,
            path,
            f"{manifest_file.absolute()}: format version {manifest.get('version')}, this "
            f"trainer reads {VERSION}; prepare the corpus again",
        )
    theirs = manifest["tokenizer"]
    if theirs != identity:
        raise _fail(
            key,
            path,
            f"{manifest_file.absolute()}: prepared with tokenizer {_describe(theirs)}, but the "
            f"recipe's is {_describe(identity)} (model.tokenizer, model.hf_assets_path); "
            "prepare it again with this recipe",
        )
    dtype = np.dtype(manifest["dtype"])
    shards = []
    for shard in manifest["shards"]:
        file = folder / shard["file"]
        _check_size(key, path, file, shard["tokens"] * dtype.itemsize)
        if verify and file_hash(file) != shard["xxh3_64"]:
            raise _fail(
                key,
                path,
                f"{file.absolute()}: its xxh3-64 differs from the manifest's (altered); "
                "prepare the corpus again",
            )
        tokens = np.memmap(file, dtype=dtype, mode="r") if shard["tokens"] else None
        shards.append(tokens if tokens is not None else np.zeros(0, dtype))
    index = folder / DOCUMENTS
    n_docs = int(manifest["documents"])
    if not index.exists():
        raise _fail(key, path, f"{index.absolute()}: no such file (the document index)")
    try:
        offsets = np.load(index, mmap_mode="r")
    except (ValueError, OSError) as e:  # a truncated .npy cannot be mapped
        reason = f"{index.absolute()}: unreadable document index (truncated or altered): {e}"
        raise _fail(key, path, reason) from None
    stream = TokenStream(shards)
    if offsets.shape != (n_docs + 1,) or int(offsets[-1]) != len(stream):
        raise _fail(
            key,
            path,
            f"{index.absolute()}: {len(offsets) - 1} documents ending at token "
            f"{int(offsets[-1])}, the manifest says {n_docs} in {len(stream)} tokens",
        )
    return PreparedCorpus(path, manifest, stream, offsets)


def _open_parts(
    path: str, parts: list[str], identity: dict[str, Any], verify: bool, key: str
) -> PreparedCorpus:
    """A folder of prepared parts as one corpus: the parts' shards and documents in the parts'
    name order (each part checked as ``open_prepared`` checks a corpus, its errors naming it).
    The document offsets are concatenated in memory (8 bytes per document)."""
    opened = [open_prepared(p, identity, verify, key) for p in parts]
    shards = [s for c in opened for s in c.stream.shards]
    offsets = [np.zeros(1, np.int64)]
    base = 0
    for c in opened:
        offsets.append(np.asarray(c.offsets[1:], np.int64) + base)
        base += len(c.stream)
    manifest = {
        **{k: v for k, v in opened[0].manifest.items() if k not in ("shards", "sources")},
        "documents": sum(int(c.manifest["documents"]) for c in opened),
        "tokens": base,
        "parts": [os.path.basename(p) for p in parts],
        "shards": [s for c in opened for s in c.manifest["shards"]],
    }
    return PreparedCorpus(path, manifest, TokenStream(shards), np.concatenate(offsets))


def _fail(key: str, path: str, reason: str) -> ConfigError:
    return ConfigError(key, path, reason)


def _check_size(key: str, path: str, file: Path, expected: int) -> None:
    """Raise unless ``file`` exists with ``expected`` bytes."""
    try:
        size = file.stat().st_size
    except OSError as e:
        raise _fail(key, path, f"{file.absolute()}: cannot be read: {e.strerror or e}") from None
    if size != expected:
        raise _fail(
            key,
            path,
            f"{file.absolute()}: {size} bytes, the manifest says {expected} (truncated or "
            "altered); prepare the corpus again",
        )


def _describe(identity: dict[str, Any]) -> str:
    """A tokenizer identity in words."""
    text = f"{identity.get('kind')!r} (vocab {identity.get('vocab_size')}"
    if identity.get("xxh3_64"):
        text += f", tokenizer.json xxh3-64 {identity['xxh3_64']}"
    return text + ")"
