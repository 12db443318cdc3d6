"""Packed windows and a global-batch loader whose batches do not depend on the mesh.

The token stream is every document as BOS + tokens + EOS, concatenated (TorchTitan's packing,
``torchtitan/hf_datasets/text_datasets.py``). It is cut into windows of ``seq_len + 1`` tokens;
a window gives ``input = w[:-1]`` and ``labels = w[1:]``. Each epoch visits the windows in a
seeded permutation.

The global batch of optimizer step k is the windows with global indices
``[k * G, (k + 1) * G)`` where G = ``global_batch_size`` (in sequences). Data-parallel ranks and
gradient-accumulation microbatches split that same set: microbatch m of dp rank r holds indices
``k * G + m * (B * dp) + r * B + [0, B)`` for local batch size B. So any mesh sees the same
tokens at every step, and the loader state is one integer (windows consumed), which stays valid
when a checkpoint is loaded into a different mesh.
"""

import logging
from dataclasses import dataclass
from typing import Any, Protocol, overload

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful
from torchtitan.components.tokenizer import BaseTokenizer

from torchtitan_ext.data.stream import Tokens, TokenStream
from torchtitan_ext.data.tokenizer import encode_documents
from torchtitan_ext.errors import ConfigError

logger = logging.getLogger("torchtitan_ext")


def split_documents(
    docs: list[str], validation_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Shuffle documents with ``seed`` and hold out the last ``validation_fraction`` of them.

    Returns:
        (train documents, validation documents); validation is empty when the fraction is 0 or
        there is a single document.
    """
    order = np.random.default_rng(seed).permutation(len(docs))
    shuffled = [docs[i] for i in order]
    n_val = round(validation_fraction * len(docs)) if len(docs) > 1 else 0
    if validation_fraction > 0 and len(docs) > 1:
        n_val = max(1, n_val)
    return shuffled[: len(docs) - n_val], shuffled[len(docs) - n_val :]


def tokenize(docs: list[str], tokenizer: BaseTokenizer) -> np.ndarray:
    """Concatenate BOS + tokens + EOS of every document: a (n_tokens,) int32 array."""
    return tokenize_with_offsets(docs, tokenizer)[0]


def tokenize_with_offsets(
    docs: list[str], tokenizer: BaseTokenizer
) -> tuple[np.ndarray, np.ndarray]:
    """Like ``tokenize``, plus (n_docs + 1,) int64 offsets: document i is
    ``tokens[offsets[i]:offsets[i + 1]]``."""
    if not docs:
        return np.zeros(0, dtype=np.int32), np.zeros(1, dtype=np.int64)
    encoded = encode_documents(tokenizer, docs)
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.concatenate(encoded), offsets


@overload
def long_documents(tokens: np.ndarray, offsets: np.ndarray, min_tokens: int) -> np.ndarray: ...
@overload
def long_documents(tokens: TokenStream, offsets: np.ndarray, min_tokens: int) -> TokenStream: ...
def long_documents(tokens: Tokens, offsets: np.ndarray, min_tokens: int) -> Tokens:
    """The token stream of the documents with at least ``min_tokens`` tokens (BOS and EOS
    included), in their order: a (n,) int32 array, or for a ``TokenStream`` (a prepared
    corpus) a ``TokenStream`` of those documents' ranges (nothing read or copied)."""
    lengths = np.diff(offsets)
    keep = np.flatnonzero(lengths >= min_tokens)
    if isinstance(tokens, TokenStream):
        return tokens.select_documents(offsets, keep)
    if len(keep) == 0:
        return np.zeros(0, dtype=np.int32)
    return np.concatenate([tokens[offsets[i] : offsets[i + 1]] for i in keep])


class PackedWindows:
    """Windows of ``seq_len + 1`` consecutive tokens, visited in a per-epoch permutation.

    The stream is cut into units of ``unit_len + 1`` tokens (``unit_len`` defaults to
    ``seq_len``: one window per unit); each epoch visits the units in a seeded permutation, and
    each unit gives ``unit_len // seq_len`` windows at stride ``seq_len`` (a window's last label
    is the next one's first input). A curriculum sets ``unit_len`` to its longest stage's
    seq_len, so every stage shares one grid of units: a stage that continues after the units
    the previous one touched sees none of their tokens again before the epoch ends
    (``GlobalBatchLoader``, which also spreads each global batch over distinct units).

    Args:
        tokens: (n_tokens,) int32 token stream, or a ``TokenStream`` of memory-mapped shards
            (a prepared corpus; windows are then read from the shards when asked for).
        seq_len: tokens per training sequence.
        seed: seed of the unit order; epoch e uses ``default_rng((seed, e))``.
        shuffle: False visits units in stream order (validation).
        key: the recipe section the windows are for ("training" or "validation"), named in
            the error.
        unit_len: tokens per unit minus one (>= seq_len); 0: seq_len.

    Raises:
        ConfigError: the stream holds less than one unit (names ``<key>.seq_len``).
    """

    def __init__(
        self,
        tokens: Tokens,
        seq_len: int,
        seed: int,
        shuffle: bool = True,
        key: str = "training",
        unit_len: int = 0,
    ) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.unit_len = unit_len or seq_len
        if self.unit_len < seq_len:
            raise ValueError(f"unit_len {self.unit_len} < seq_len {seq_len}")
        self.per_unit = self.unit_len // seq_len
        self.num_units = len(tokens) // (self.unit_len + 1)
        self.num_windows = self.num_units * self.per_unit
        if self.num_windows == 0:
            split = "validation split" if key == "validation" else "training set"
            raise ConfigError(
                f"{key}.seq_len",
                seq_len,
                f"the {split} has only {len(tokens)} tokens, less than one window of "
                f"{self.unit_len + 1}",
            )
        self._epoch = -1
        self._perm: np.ndarray = np.arange(self.num_units)

    def unit_window(self, global_unit: int, sub: int) -> np.ndarray:
        """Window ``sub`` of unit number ``global_unit`` (counted over all epochs, in visiting
        order): (seq_len + 1,) int32."""
        epoch, i = divmod(global_unit, self.num_units)
        if self.shuffle and epoch != self._epoch:
            self._perm = np.random.default_rng((self.seed, epoch)).permutation(self.num_units)
            self._epoch = epoch
        u = int(self._perm[i]) if self.shuffle else i
        start = u * (self.unit_len + 1) + sub * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]

    def window(self, index: int) -> np.ndarray:
        """Window number ``index`` (over all epochs; a unit's windows in a row):
        (seq_len + 1,) int32."""
        return self.unit_window(*divmod(index, self.per_unit))

    def batch(self, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows ``[start, start + size)`` as (inputs, labels), each (size, seq_len) int64."""
        return stack_windows([self.window(start + j) for j in range(size)])


class Windows(Protocol):
    """What ``GlobalBatchLoader`` reads windows from: ``PackedWindows``, or
    ``mixture.MixedWindows`` (several sources in fixed proportions)."""

    seq_len: int
    unit_len: int
    per_unit: int
    seed: int

    def unit_window(self, global_unit: int, sub: int) -> np.ndarray: ...


def stack_windows(windows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of equal-length windows (int32, or a prepared corpus's uint16/uint32),
    each (len(windows), seq_len) int64."""
    arr = torch.from_numpy(np.stack(windows).astype(np.int64))
    return arr[:, :-1], arr[:, 1:]


def _warn_once(message: str) -> None:
    """A warning on global rank 0 only (every rank reaches the same conclusion)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.warning(message)


@dataclass
class GlobalBatchLoader(Stateful):
    """Yields this rank's microbatches of each optimizer step (see the module docstring).

    Attributes:
        windows: the packed training windows (``PackedWindows``, or a curriculum stage's
            ``MixedWindows``).
        local_batch_size: sequences per microbatch per dp rank (B).
        dp_rank, dp_degree: this rank's index in the batch mesh and its size.
        grad_accum_steps: microbatches per optimizer step per rank.
        windows_consumed: windows consumed since ``origin_units``.
        origin_units: units (counted over all epochs) used before this stage (or before a
            change of global batch); with ``windows_consumed``, the whole loader state.
        continue_at_new_seq_len: loading a state saved at another seq_len (a curriculum
            stage boundary) continues after the units consumed (``PackedWindows``: the
            previous stage's partly used unit, if any, is skipped) instead of raising. With
            ``min_doc_tokens`` a stage's stream is a different one (its long documents), so
            it continues at the same unit count of its own stream.
        derived_global_batch: the recipe's ``training.global_batch_size`` is -1 (local batch
            x dp). Loading a state saved with another global batch (another dp degree) then
            keeps the checkpoint's global batch by changing ``grad_accum_steps``; otherwise
            the recipe's explicit global batch is used. Either way a warning says so.
    """

    windows: Windows
    local_batch_size: int
    dp_rank: int
    dp_degree: int
    grad_accum_steps: int
    windows_consumed: int = 0
    continue_at_new_seq_len: bool = False
    derived_global_batch: bool = False
    origin_units: int = 0

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step over all ranks (G)."""
        return self.local_batch_size * self.dp_degree * self.grad_accum_steps

    def _window(self, index: int) -> np.ndarray:
        """Window ``index`` (counted from ``origin_units``): units are taken G at a time,
        and a step's G windows are one window of each of G units (the units' first windows,
        then their second, ...), so a global batch spans G places of the stream even when a
        unit holds several windows. With one window per unit this is unit
        ``origin_units + index``."""
        g, per_unit = self.global_batch_size, self.windows.per_unit
        group, rest = divmod(index, g * per_unit)
        sub, k = divmod(rest, g)
        return self.windows.unit_window(self.origin_units + group * g + k, sub)

    def _units_touched(self, consumed: int, g: int, per_unit: int) -> int:
        """Units (from ``origin_units``) that ``consumed`` windows at global batch ``g`` and
        ``per_unit`` windows per unit have touched: whole groups of g units."""
        return -(-consumed // (g * per_unit)) * g

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's ``grad_accum_steps`` microbatches of the next step; each
        (inputs, labels) of shape (local_batch_size, seq_len), int64, on CPU."""
        base = self.windows_consumed
        b, dp = self.local_batch_size, self.dp_degree
        micro = []
        for m in range(self.grad_accum_steps):
            first = base + m * b * dp + self.dp_rank * b
            micro.append(stack_windows([self._window(first + j) for j in range(b)]))
        self.windows_consumed += self.global_batch_size
        return micro

    def state_dict(self) -> dict[str, Any]:
        return {
            "windows_consumed": self.windows_consumed,
            "seq_len": self.windows.seq_len,
            "seed": self.windows.seed,
            "global_batch_size": self.global_batch_size,
            "unit_len": self.windows.unit_len,
            "origin_units": self.origin_units,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position; see the class docstring for a changed seq_len or global
        batch.

        Raises:
            ConfigError: another seq_len outside a curriculum; or a derived global batch
                (``-1``) that must keep the checkpoint's G but local batch x dp does not
                divide G.
        """
        saved_seq_len = int(state_dict["seq_len"])
        consumed = int(state_dict["windows_consumed"])
        saved_g = int(state_dict["global_batch_size"])
        saved_origin = int(state_dict.get("origin_units", 0))
        saved_unit = int(state_dict.get("unit_len", saved_seq_len))
        if saved_seq_len != self.windows.seq_len and self.continue_at_new_seq_len:
            # A new curriculum stage: continue after the units already (partly) used.
            if saved_unit == self.windows.unit_len:
                touched = self._units_touched(consumed, saved_g, saved_unit // saved_seq_len)
            else:  # another grid (a checkpoint from before units, or changed stage lengths)
                touched = -(-consumed * (saved_seq_len + 1) // (self.windows.unit_len + 1))
                _warn_once(
                    f"the checkpoint's data position is in units of {saved_unit + 1} tokens, "
                    f"this curriculum's of {self.windows.unit_len + 1}: continuing after the "
                    "same number of tokens, so part of the epoch may repeat or be skipped"
                )
            self.origin_units, self.windows_consumed = saved_origin + touched, 0
            return
        if saved_seq_len != self.windows.seq_len:
            raise ConfigError(
                "training.seq_len",
                self.windows.seq_len,
                f"the checkpoint's data loader was at seq_len {int(state_dict['seq_len'])}",
            )
        self.windows_consumed, self.origin_units = consumed, saved_origin
        g = self.global_batch_size
        if saved_g == g:
            return
        if not self.derived_global_batch:
            # Windows are laid out per global batch: go on after the units touched so far.
            per_unit = self.windows.per_unit
            self.origin_units += self._units_touched(consumed, saved_g, per_unit)
            self.windows_consumed = 0
            _warn_once(
                f"global batch changes from the checkpoint's {saved_g} to {g} sequences "
                "(training.global_batch_size)"
            )
            return
        per_microbatch = self.local_batch_size * self.dp_degree
        if saved_g % per_microbatch != 0:
            raise ConfigError(
                "training.global_batch_size",
                -1,
                f"the checkpoint was trained with a global batch of {saved_g} sequences, "
                f"which local batch {self.local_batch_size} x dp {self.dp_degree} does not "
                f"divide; set training.global_batch_size (e.g. {saved_g}, or {g} to change it)",
            )
        self.grad_accum_steps = saved_g // per_microbatch
        _warn_once(
            f"kept the checkpoint's global batch of {saved_g} sequences (training."
            f"global_batch_size = -1 would give {g} at dp {self.dp_degree}): "
            f"{self.grad_accum_steps} microbatch(es) per step; set training.global_batch_size "
            "to change it"
        )
