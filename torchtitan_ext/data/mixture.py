"""Data mixtures for curriculum stages: several sources with weights and a minimum document
length (long-document upsampling for the long stages, as ProLong does, arXiv 2410.02660).

A stage's ``mixture`` is a string ``"SRC=WEIGHT[@MIN_DOC_TOKENS], ..."``: SRC is ``train``
(the run's own training split) or a prepared corpus folder (``python -m
torchtitan_ext.data.prepare``, all its documents); WEIGHT > 0 (normalized to sum 1); documents
shorter than MIN_DOC_TOKENS (default: the stage's ``min_doc_tokens``) are left out of that
source, from the document index, without reading any text.

``MixedWindows`` has ``PackedWindows``' interface, so ``GlobalBatchLoader`` (its mesh-
independent global batch, its small state and exact resume) is unchanged: the mixture's units
come in blocks of ``BLOCK`` units, each block holding exactly ``round(w_s x BLOCK)`` units of
source s, interleaved so that every prefix of a block is within one unit per source of the
weights (a stage shorter than a block still gets its proportions), and the k-th unit of source
s in the mixture is unit k of that source's own ``PackedWindows`` (its own seeded per-epoch
permutation, which does the shuffling; it repeats after its ``num_units``).
"""

from typing import Any

import numpy as np
import torch

from torchtitan_ext.data.loader import PackedWindows, stack_windows
from torchtitan_ext.data.prepared import is_prepared, open_prepared
from torchtitan_ext.data.stream import Tokens
from torchtitan_ext.errors import ConfigError

BLOCK = 1000
"""Units per block of a mixture: weights resolve to 1/BLOCK."""
TRAIN = "train"

Mixture = tuple[tuple[str, float, int], ...]
"""Parsed mixture: ``(source, weight normalized to sum 1, min_doc_tokens)`` per source."""


def parse_mixture(key: str, value: str, min_doc_tokens: int = 0) -> Mixture:
    """Parse ``"SRC=WEIGHT[@MIN_DOC_TOKENS], ..."`` (see the module docstring).

    Raises:
        ConfigError: ``key``: an entry without ``=``, an empty source, a weight that is not a
            number or not > 0, a minimum that is not an int >= 0, a source named twice, or a
            weight below 1/BLOCK of the total.
    """
    entries: list[tuple[str, float, int]] = []
    for part in (p.strip() for p in value.split(",")):
        src, eq, rest = part.rpartition("=")
        src = src.strip()
        if not eq or not src:
            raise ConfigError(key, value, f"{part!r}: expected SRC=WEIGHT[@MIN_DOC_TOKENS]")
        weight_text, _, min_text = rest.partition("@")
        try:
            weight = float(weight_text)
        except ValueError:
            raise ConfigError(
                key, value, f"{src}: weight {weight_text!r} is not a number"
            ) from None
        if not weight > 0:  # also NaN
            raise ConfigError(key, value, f"{src}: weight {weight_text.strip()} must be > 0")
        try:
            minimum = int(min_text) if min_text else min_doc_tokens
        except ValueError:
            minimum = -1
        if minimum < 0:
            raise ConfigError(key, value, f"{src}: min_doc_tokens {min_text!r} is not an int >= 0")
        if any(e[0] == src for e in entries):
            raise ConfigError(key, value, f"{src}: named twice")
        entries.append((src, weight, minimum))
    total = sum(w for _, w, _ in entries)
    mixture = tuple((s, w / total, m) for s, w, m in entries)
    if np.any(block_counts([w for _, w, _ in mixture]) == 0):
        raise ConfigError(key, value, f"a weight below 1/{BLOCK} of the total")
    return mixture


def block_counts(weights: list[float]) -> np.ndarray:
    """Units of each source per block: ``weights`` x BLOCK rounded by largest remainder, so
    they sum to BLOCK exactly. (k,) int64."""
    raw = np.asarray(weights, dtype=np.float64) * BLOCK
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: BLOCK - int(counts.sum())]] += 1
    return counts


def open_sources(
    key: str,
    mixture: Mixture,
    train: Tokens,
    train_offsets: np.ndarray,
    identity: dict[str, Any],
    verify: bool = False,
) -> list[Tokens]:
    """The token stream of each source of ``mixture`` (its long documents only, where it has a
    minimum), memory-mapped for prepared corpora.

    Args:
        key: the recipe key of the mixture (in errors).
        train, train_offsets: the run's training stream and its document offsets (``train``).
        identity: the recipe's ``tokenizer_identity`` (a prepared source must match it).
        verify: hash every shard of prepared sources (``data.verify_corpus``).

    Raises:
        ConfigError: ``key``, naming the source: neither ``train`` nor a prepared corpus, or any
            problem ``open_prepared`` finds in it.
    """
    from torchtitan_ext.data.loader import long_documents

    streams: list[Tokens] = []
    for src, _, minimum in mixture:
        tokens: Tokens
        if src == TRAIN:
            tokens, offsets = train, train_offsets
        elif is_prepared(src):
            corpus = open_prepared(src, identity, verify, key=key)
            tokens, offsets = corpus.stream, np.asarray(corpus.offsets)
        else:
            raise ConfigError(
                key, src, "names no source: neither 'train' nor a prepared corpus folder"
            )
        if minimum:
            tokens = long_documents(tokens, offsets, minimum)
        streams.append(tokens)
    return streams


class MixedWindows:
    """Windows drawn from several ``PackedWindows`` in fixed proportions (module docstring).

    Args:
        sources: one ``PackedWindows`` per source, all of one ``seq_len`` and ``unit_len``.
        weights: (k,) weights summing to 1 (``parse_mixture``).
        seed: recorded in the loader state (each source's ``PackedWindows`` has its own).

    Attributes match ``PackedWindows``' (``seq_len``, ``unit_len``, ``per_unit``, ``seed``,
    ``num_units``: the sum of the sources', ``num_windows``).
    """

    def __init__(self, sources: list[PackedWindows], weights: list[float], seed: int) -> None:
        self.sources = sources
        self.weights = list(weights)
        self.seed = seed
        self.seq_len = sources[0].seq_len
        self.unit_len = sources[0].unit_len
        self.per_unit = sources[0].per_unit
        self.shuffle = True
        if any(s.seq_len != self.seq_len or s.unit_len != self.unit_len for s in sources):
            raise ValueError("mixture sources differ in seq_len or unit_len")
        self.counts = block_counts(self.weights)
        self.num_units = sum(s.num_units for s in sources)
        self.num_windows = self.num_units * self.per_unit
        # The source of each position of a block and its rank among that source's units: each
        # position goes to the source furthest behind its share (largest-deficit interleave).
        self._source = np.zeros(BLOCK, np.int64)
        self._rank = np.zeros(BLOCK, np.int64)
        taken = np.zeros(len(sources), np.int64)
        for pos in range(BLOCK):
            s = int(np.argmax(self.counts * (pos + 1) / BLOCK - taken))
            self._source[pos], self._rank[pos] = s, taken[s]
            taken[s] += 1

    def source_of(self, global_unit: int) -> int:
        """The source index of unit ``global_unit`` (counted over the whole mixture)."""
        return int(self._source[global_unit % BLOCK])

    def unit_window(self, global_unit: int, sub: int) -> np.ndarray:
        """Window ``sub`` of mixture unit ``global_unit``: (seq_len + 1,) tokens."""
        block, pos = divmod(global_unit, BLOCK)
        s = int(self._source[pos])
        unit = block * int(self.counts[s]) + int(self._rank[pos])
        return self.sources[s].unit_window(unit, sub)

    def window(self, index: int) -> np.ndarray:
        """Window number ``index`` (a unit's windows in a row): (seq_len + 1,) tokens."""
        return self.unit_window(*divmod(index, self.per_unit))

    def batch(self, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows ``[start, start + size)`` as (inputs, labels), each (size, seq_len) int64."""
        return stack_windows([self.window(start + j) for j in range(size)])

    def supply(self) -> list[tuple[int, int]]:
        """Per source: (its tokens in units, tokens of the mixture before it repeats)."""
        unit = self.unit_len + 1
        return [
            (s.num_units * unit, int(s.num_units / w) * unit)
            for s, w in zip(self.sources, self.weights, strict=True)
        ]


def format_supply(mixture: Mixture, streams: list[Tokens], unit_len: int) -> str:
    """Per source: its weight, the tokens it holds (whole units of ``unit_len + 1``) and the
    tokens of the stage's stream drawn before it repeats (its tokens / its weight)."""
    unit = unit_len + 1
    parts = []
    for (src, w, minimum), stream in zip(mixture, streams, strict=True):
        have = len(stream) // unit * unit
        at = f" (documents >= {minimum} tokens)" if minimum else ""
        parts.append(
            f"{src}{at}: {100 * w:.3g}%, {have:,} tokens, repeats after {int(have / w):,} "
            "tokens of the stage"
        )
    return "; ".join(parts)


def describe_mixture(mixture: Mixture) -> str:
    """``"train 60%, books 40% (>= 32768)"``: a mixture for the plan table."""
    parts = []
    for src, w, minimum in mixture:
        name = src if src == TRAIN else src.rstrip("/").rsplit("/", 1)[-1]
        parts.append(f"{name} {100 * w:.3g}%" + (f" (>= {minimum})" if minimum else ""))
    return ", ".join(parts)


__all__ = [
    "BLOCK",
    "MixedWindows",
    "Mixture",
    "block_counts",
    "describe_mixture",
    "format_supply",
    "open_sources",
    "parse_mixture",
]
