"""The logsumexp layouts of the attention kernels that torch's CP dispatch reaches (``LseLayout``).

Each SDPA kernel returns its fp32 logsumexp in its own shape (torch's meta registrations,
``torch/_meta_registrations.py``; the memory-efficient kernel pads the sequence dim to
``kAlignLSE``, ``aten/src/ATen/native/transformers/cuda/mem_eff_attention``). ``LseLayout``
reads each as (B, H, T) and writes (B, H, T) back in that layout, so that a kernel's backward
gets the layout its forward returned. The Ulysses all-to-all moves the logsumexp through it
(``cp_ulysses._lse_to_heads`` / ``_lse_to_seq``), and ``cp_ulysses.check_kernel_lse`` checks a
real kernel's layout through that code on one device.
"""

from dataclasses import dataclass

import torch

LSE_ALIGN = 32
"""torch's memory-efficient kernel on CUDA (``kAlignLSE``) returns its logsumexp with the
sequence dim padded to a multiple of this, +inf in the padding (which its backward may read)."""


@dataclass(frozen=True)
class LseLayout:
    """How an attention kernel lays out the fp32 logsumexp of its ``T`` queries, as torch's CP
    dispatch hands it over (the shapes of torch's meta registrations,
    ``torch/_meta_registrations.py``):

    - plain (B, H, T): the CPU flash op (strided as (B, T, H) transposed) and CUDA flash;
    - ``unit_dim`` (B, H, T, 1): cuDNN;
    - ``padded`` (B, H, ceil(T / 32) x 32), +inf past T: memory-efficient on CUDA (plain on
      ROCm). A T that is a multiple of 32 reads as plain, which is the same tensor.

    A kernel's backward takes the layout its forward returned, so the patterns hand each kernel
    (and torch's ring) that layout and return it for the local shard.
    """

    unit_dim: bool = False
    padded: bool = False

    @classmethod
    def of(cls, lse: torch.Tensor, q_len: int) -> "LseLayout":
        """The layout of ``lse``, a kernel's logsumexp for ``q_len`` queries.

        Raises:
            RuntimeError: a shape none of torch's CP kernels returns (naming it).
        """
        shape = tuple(lse.shape)
        if len(shape) == 4 and shape[2:] == (q_len, 1):
            return cls(unit_dim=True)
        if len(shape) == 3 and shape[2] == q_len:
            return cls()
        if len(shape) == 3 and shape[2] == -(-q_len // LSE_ALIGN) * LSE_ALIGN:
            return cls(padded=True)
        raise RuntimeError(
            f"context-parallel pattern: unknown logsumexp layout {shape} for {q_len} queries "
            f"(known: (B, H, S), (B, H, S, 1), (B, H, S padded to a multiple of {LSE_ALIGN}))"
        )

    def plain(self, lse: torch.Tensor, q_len: int) -> torch.Tensor:
        """``lse`` in this layout -> (B, H, q_len)."""
        if self.unit_dim:
            return lse.squeeze(3)
        return lse.narrow(2, 0, q_len) if self.padded else lse

    def apply(self, lse: torch.Tensor) -> torch.Tensor:
        """(B, H, T) -> this layout for T queries (contiguous where the kernel reads it)."""
        if self.unit_dim:
            return lse.unsqueeze(3)
        if self.padded:
            pad = -lse.shape[2] % LSE_ALIGN
            return torch.nn.functional.pad(lse, (0, pad), value=float("inf"))
        return lse.contiguous()
