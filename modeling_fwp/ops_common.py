"""Helpers every update-rule backend shares: the accumulation dtype, and packed sequences (`cu_seqlens`) counted,
checked and scattered into a zero-padded batch.

`ops.py` (the dispatcher and the step-by-step reference), `ops_chunk.py` (chunkwise PyTorch) and the Triton kernels
(`ops_triton.py`, `conv_triton.py`) import them from here, so no backend takes them from another.
"""

from __future__ import annotations

import torch

__all__ = ["check_cu_seqlens_values", "pack_to_padded", "packed_sequence_count", "state_dtype_for"]


def state_dtype_for(*tensors: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 if any input is float64, else float32 (also for bf16/fp16 inputs)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def packed_sequence_count(batch_size: int, cu_seqlens: torch.Tensor | None) -> int:
    """N: the batch rows, or the sequences that `cu_seqlens` marks in a batch of one packed row."""
    if cu_seqlens is None:
        return batch_size
    if batch_size != 1:
        raise ValueError(f"with cu_seqlens the batch size B must be 1, got {batch_size}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor [N+1] with N >= 1")
    return cu_seqlens.numel() - 1


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, total_length: int) -> list[int]:
    """Offsets as a Python list after checking 0 = cu[0] <= cu[1] <= ... <= cu[-1] = T (reads them on the host)."""
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != total_length or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing from 0 to T = {total_length}, got {offsets}")
    return offsets


def pack_to_padded(tensors, offsets):
    """Scatter packed [1, T, ...] sequences into zero-padded [N, max_len, ...] batches (padding at the end).

    Returns the padded tensors (None stays None) and `index`, the row of each packed token in the padded batch
    flattened to [N * max_len, ...]; `padded.flatten(0, 1)[index]` gives the packed tensor back. Zero padding at
    the end of a sequence (k = 0, beta = 0) never changes its state, so the padded batch runs as is.
    """
    device = next(t for t in tensors if t is not None).device
    starts = torch.tensor(offsets[:-1], device=device)
    lengths = torch.tensor(offsets[1:], device=device) - starts
    num, max_len = len(offsets) - 1, max(b - a for a, b in zip(offsets, offsets[1:]))
    sequence = torch.repeat_interleave(torch.arange(num, device=device), lengths)
    index = torch.arange(offsets[-1], device=device) - starts[sequence] + sequence * max_len

    def scatter(x):
        if x is None:
            return None
        flat = x.new_zeros(num * max_len, *x.shape[2:])
        return flat.index_copy(0, index, x[0]).reshape(num, max_len, *x.shape[2:])

    return [scatter(t) for t in tensors], index
