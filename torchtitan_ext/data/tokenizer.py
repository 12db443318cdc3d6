"""Tokenizers: a byte-level one that needs no files, and TorchTitan's Hugging Face wrapper."""

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torchtitan.components.tokenizer import BaseTokenizer, HuggingFaceTokenizer

from torchtitan_ext.errors import ConfigError


class ByteTokenizer(BaseTokenizer):
    """UTF-8 bytes as token ids 0-255, plus BOS = 256 and EOS = 257 (vocab size 258).

    Needs no files, so a fresh machine trains on real text with no download. Follows the
    byte-level models of ByT5 (arXiv 2105.13626) without their extra special ids.
    """

    BOS_ID = 256
    EOS_ID = 257

    def __init__(self) -> None:
        super().__init__()
        self.bos_id = self.BOS_ID
        self.eos_id = self.EOS_ID

    def encode(self, *args: Any, **kwargs: Any) -> list[int]:
        """``encode(text, add_bos=True, add_eos=True) -> list[int]``."""
        return self.encode_array(*args, **kwargs).tolist()

    def encode_array(self, text: str, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
        """Token ids of ``text`` as a (n,) int32 array."""
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
        parts = [np.array([self.BOS_ID], dtype=np.int32)] if add_bos else []
        parts.append(ids)
        if add_eos:
            parts.append(np.array([self.EOS_ID], dtype=np.int32))
        return np.concatenate(parts)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        """``decode(ids) -> str``; special ids are dropped, invalid UTF-8 replaced."""
        ids = args[0] if args else kwargs["token_ids"]
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def get_vocab_size(self) -> int:
        return 258


def build_tokenizer(cfg: Any) -> BaseTokenizer:
    """The tokenizer chosen by ``model.tokenizer`` (see ``torchtitan_ext.config.schema``).

    Raises:
        ConfigError: ``model.tokenizer = "hf"`` without a tokenizer.json under
            ``model.hf_assets_path``.
    """
    path = cfg.model.hf_assets_path
    has_hf = os.path.isfile(os.path.join(path, "tokenizer.json"))
    mode = cfg.model.tokenizer
    if mode == "hf" and not has_hf:
        raise ConfigError(
            "model.hf_assets_path", path, "no tokenizer.json there (model.tokenizer = 'hf')"
        )
    if mode == "hf" or (mode == "auto" and has_hf):
        return HuggingFaceTokenizer(path)
    return ByteTokenizer()


def encode_document(tokenizer: BaseTokenizer, text: str) -> np.ndarray:
    """BOS + tokens of ``text`` + EOS as a (n,) int32 array (TorchTitan's packing convention:
    ``torchtitan/hf_datasets/text_datasets.py`` encodes each sample with add_bos/add_eos)."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode_array(text)
    return np.asarray(tokenizer.encode(text, add_bos=True, add_eos=True), dtype=np.int32)


BATCH_CHARS = 4_000_000
"""Characters per batched Hugging Face encode call at most (``encode_documents``): bounds the
transient memory of the batch's ``Encoding`` objects, about 100 bytes per token."""


def encode_documents(tokenizer: BaseTokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """``encode_document`` of each text: the same ids, in order.

    A Hugging Face tokenizer encodes the texts in batches of at most ``BATCH_CHARS``
    characters through ``tokenizers``' ``encode_batch_fast``, which spreads the documents over
    its thread pool (rayon; ``RAYON_NUM_THREADS`` caps it) and skips the character offsets
    that ``encode`` computes: 1.9x ``encode`` one by one on 2 cores, more with more cores. BOS
    and EOS are added as TorchTitan's ``HuggingFaceTokenizer.encode`` adds them (only where
    the tokenizer's own post-processor does not).

    Returns:
        One (n_i,) int32 array per text: BOS + tokens + EOS.
    """
    if not isinstance(tokenizer, HuggingFaceTokenizer):
        return [encode_document(tokenizer, t) for t in texts]
    hf = tokenizer.tokenizer
    encode = getattr(hf, "encode_batch_fast", hf.encode_batch)  # tokenizers < 0.21: no _fast
    bos = [] if tokenizer.hf_adds_bos or tokenizer.bos_id is None else [tokenizer.bos_id]
    eos = [] if tokenizer.hf_adds_eos or tokenizer.eos_id is None else [tokenizer.eos_id]
    out: list[np.ndarray] = []
    for batch in _char_batches(texts, BATCH_CHARS):
        out.extend(np.asarray(bos + e.ids + eos, dtype=np.int32) for e in encode(batch))
    return out


def _char_batches(texts: Sequence[str], chars: int) -> Iterator[list[str]]:
    """Consecutive runs of ``texts`` of at most ``chars`` characters (a longer text alone)."""
    batch: list[str] = []
    size = 0
    for t in texts:
        if batch and size + len(t) > chars:
            yield batch
            batch, size = [], 0
        batch.append(t)
        size += len(t)
    if batch:
        yield batch


def tokenizer_identity(cfg: Any, tokenizer: BaseTokenizer) -> dict[str, Any]:
    """What identifies the token ids ``tokenizer`` (``build_tokenizer(cfg)``) produces, as a
    prepared corpus's manifest records it: kind ("byte" or "hf"), vocab size, BOS and EOS ids,
    and for "hf" the xxh3-64 of ``tokenizer.json`` under ``model.hf_assets_path``.

    Returns:
        A JSON-serializable dict; two tokenizers with equal identities encode alike.
    """
    identity: dict[str, Any] = {
        "kind": "byte" if isinstance(tokenizer, ByteTokenizer) else "hf",
        "vocab_size": int(tokenizer.get_vocab_size()),
        "bos_id": getattr(tokenizer, "bos_id", None),
        "eos_id": getattr(tokenizer, "eos_id", None),
    }
    if identity["kind"] == "hf":
        from torchtitan_ext.data.prepared import file_hash

        identity["xxh3_64"] = file_hash(os.path.join(cfg.model.hf_assets_path, "tokenizer.json"))
    return identity
