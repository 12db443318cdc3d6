"""A context-parallel pattern's shape, and what torch's CP dispatch hands the pattern kernels.

``CPPattern`` is a pattern over ``cp = outer x inner`` ranks (``cp_patterns.make_pattern``
builds it from the recipe); ``_Groups`` holds the outer and inner process groups that
``cp_patterns.register`` makes for it; ``_Bwd`` the tensors of one attention backward, in the
argument order of torch's ``_templated_ring_attention_backward``; ``_options`` reads torch's
process-wide ring options (``_cp_options``: load balancing, ``convert_to_f32``, rotate method).

The bottom of the patterns' modules: ``cp_ulysses`` and ``cp_double_ring`` run on these,
``cp_patterns`` dispatches to them and ``cp_comm`` models their traffic. The ``outer x inner``
factorisation is USP's (arXiv 2405.07719) and LoongTrain's (arXiv 2406.18485); the dispatch
data follow torch's ``torch/distributed/tensor/experimental/_context_parallel/_attention.py``.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class CPPattern:
    """A context-parallel pattern over ``cp`` ranks, factored as ``outer x inner``.

    Attributes:
        name: one of ``cp_patterns.PATTERNS``.
        cp: the context-parallel degree.
        inner: size of the inner group (adjacent ranks): the Ulysses degree of ``ulysses``
            (= cp) and ``hybrid``, the inner ring of ``double_ring``; 1 for ``ring``.
    """

    name: str
    cp: int
    inner: int = 1

    @property
    def outer(self) -> int:
        """Number of inner groups: the ring size of ``hybrid``, the outer ring of
        ``double_ring``, 1 for ``ulysses``, cp for ``ring``."""
        return self.cp // self.inner

    def __str__(self) -> str:
        """E.g. "hybrid (ulysses 2 x ring 4)", "double_ring (inner ring 4 x outer ring 2)"."""
        if self.name == "hybrid":
            return f"hybrid (ulysses {self.inner} x ring {self.outer})"
        if self.name == "double_ring":
            return f"double_ring (inner ring {self.inner} x outer ring {self.outer})"
        return f"{self.name} ({self.cp})"

    @property
    def ulysses_degree(self) -> int:
        """Ranks each all-to-all spans (1: no all-to-all)."""
        return self.inner if self.name in ("ulysses", "hybrid") else 1

    @property
    def ring_degree(self) -> int:
        """Ranks a K/V block visits in ring steps (1: no ring)."""
        return self.outer if self.name in ("ulysses", "hybrid") else self.cp


@dataclass
class _Groups:
    """The process groups ``cp_patterns.register`` made for ``pattern`` on a cp group."""

    pattern: CPPattern
    outer: dist.ProcessGroup
    inner: dist.ProcessGroup
    cp: dist.ProcessGroup | None = None  # the group registered (names repeat across PGs)


@dataclass
class _Bwd:
    """The tensors of one attention backward (torch's argument order)."""

    grad_out: torch.Tensor
    grad_out_name: str
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    out: torch.Tensor
    logsumexp: torch.Tensor


def _options() -> Any:
    from torch.distributed.tensor.experimental._context_parallel import _attention

    return _attention._cp_options
