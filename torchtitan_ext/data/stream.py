"""A token stream read from memory-mapped shards: what ``PackedWindows`` slices, without the
stream ever being in memory.

A prepared corpus (``data.prepared``) stores its tokens in several shard files. Their
concatenation, in shard order, is the corpus's global token stream (the same stream the
in-memory path builds from the same documents). A ``TokenStream`` is a list of ranges of that
global stream, concatenated: one range for the training split, one per kept document for a
curriculum stage's long documents (``select_documents``). Slicing it reads only the pages the
slice covers, so a rank's memory holds its own windows (and the OS page cache the rest).
"""

from collections.abc import Sequence

import numpy as np


class TokenStream:
    """A read-only concatenation of ranges of the global stream of ``shards``.

    Args:
        shards: the shards' token arrays (usually ``np.memmap``, uint16 or uint32), in order.
        starts, ends: (n_ranges,) int64 global token positions: range i is
            ``[starts[i], ends[i])`` of the shards' concatenation. Default: all of it.

    ``len(stream)`` is its number of tokens; ``stream[a:b]`` is a (b - a,) array of the shards'
    dtype (a copy where it spans ranges or shards, a view otherwise). Memory: 16 bytes per
    range plus 8 per shard; a stream of whole shards or one split is a handful of ranges.
    """

    def __init__(
        self,
        shards: Sequence[np.ndarray],
        starts: np.ndarray | None = None,
        ends: np.ndarray | None = None,
    ) -> None:
        self.shards = list(shards)
        self.dtype = self.shards[0].dtype if self.shards else np.dtype(np.uint16)
        self.shard_starts = np.zeros(len(self.shards) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in self.shards], out=self.shard_starts[1:])
        total = int(self.shard_starts[-1])
        self.starts = np.zeros(1, np.int64) if starts is None else np.asarray(starts, np.int64)
        self.ends = np.full(1, total, np.int64) if ends is None else np.asarray(ends, np.int64)
        if len(self.starts) != len(self.ends) or np.any(self.ends < self.starts):
            raise ValueError("ranges: starts and ends differ in length or an end < start")
        if len(self.ends) and (self.starts.min() < 0 or self.ends.max() > total):
            raise ValueError(f"ranges outside the shards' {total} tokens")
        self.cum = np.zeros(len(self.starts) + 1, dtype=np.int64)
        np.cumsum(self.ends - self.starts, out=self.cum[1:])

    def __len__(self) -> int:
        return int(self.cum[-1])

    def _global(self, start: int, stop: int) -> np.ndarray:
        """Global positions ``[start, stop)`` of the shards' concatenation."""
        first = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        parts = []
        i = first
        while start < stop:
            base = int(self.shard_starts[i])
            end = min(stop, int(self.shard_starts[i + 1]))
            parts.append(self.shards[i][start - base : end - base])
            start, i = end, i + 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

    def __getitem__(self, key: slice) -> np.ndarray:
        """Tokens ``[key.start, key.stop)`` of this stream (step 1 only), clipped to its length
        like a numpy slice."""
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a TokenStream takes contiguous slices only")
        a, b, _ = key.indices(len(self))
        if b <= a:
            return np.zeros(0, self.dtype)
        first = int(np.searchsorted(self.cum, a, side="right")) - 1
        parts = []
        i = first
        while a < b:
            offset = int(self.cum[i])
            end = min(b, int(self.cum[i + 1]))
            g = int(self.starts[i]) + a - offset
            parts.append(self._global(g, g + end - a))
            a, i = end, i + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def select_documents(self, offsets: np.ndarray, keep: np.ndarray) -> "TokenStream":
        """The stream of the documents ``keep`` (indices into ``offsets``, in order).

        Args:
            offsets: (n_docs + 1,) int64 positions of the documents in this stream
                (document i is ``self[offsets[i]:offsets[i + 1]]``).
            keep: (k,) document indices.

        Returns:
            A stream of k ranges. Requires this stream to be one range (a split or a whole
            corpus), which it is wherever the trainer calls this.
        """
        if len(self.starts) != 1:
            raise ValueError("select_documents needs a stream of one range")
        base = int(self.starts[0])
        keep = np.asarray(keep, dtype=np.int64)
        return TokenStream(self.shards, base + offsets[keep], base + offsets[keep + 1])

    def range(self, start: int, stop: int) -> "TokenStream":
        """Tokens ``[start, stop)`` of this one-range stream, as a stream (no copy)."""
        if len(self.starts) != 1:
            raise ValueError("range needs a stream of one range")
        base = int(self.starts[0])
        return TokenStream(self.shards, np.array([base + start]), np.array([base + stop]))


Tokens = np.ndarray | TokenStream
"""A token stream: an in-memory (n,) int32 array, or a ``TokenStream`` over shards."""
