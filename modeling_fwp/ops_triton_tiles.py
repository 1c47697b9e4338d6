"""Device-side helpers every Triton delta-rule kernel shares (`ops_triton_forward.py`, `ops_triton_backward.py`,
`ops_triton_recurrent.py`): loads and stores of token tiles ([rows, block] of a [tokens, H, D] tensor) and of
state blocks ([BK, BV] of a [*, H, K, V] tensor), masked at the edges, and which chunk or sequence a program of a
chunk-parallel or chunk-sequential grid works on (also for packed sequences, `cu_seqlens`).

Names with a leading underscore are private to the ops_triton_* files. This module raises ImportError without
triton.
"""
from __future__ import annotations

try:  # guarded, so transformers' import check of a Hub folder does not demand triton from CPU users
    import triton
    import triton.language as tl
except ImportError as error:  # ops.py treats this as "no triton backend"
    raise ImportError(f"modeling_fwp.ops_triton_tiles needs triton: {error}") from error


@triton.jit
def _tok_offsets(rows, mrow, i_h, H, D, col0, BC: tl.constexpr):
    """Offsets and mask of a [rows, BC] tile of a [tokens, H, D] tensor starting at column col0."""
    cols = col0 + tl.arange(0, BC)
    offs = (rows.to(tl.int64)[:, None] * H + i_h) * D + cols[None, :]
    mask = mrow[:, None] & (cols[None, :] < D)
    return offs, mask


@triton.jit
def _ld_tok(ptr, rows, mrow, i_h, H, D, col0, BC: tl.constexpr):
    offs, mask = _tok_offsets(rows, mrow, i_h, H, D, col0, BC)
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def _st_tok(ptr, val, rows, mrow, i_h, H, D, col0, BC: tl.constexpr):
    offs, mask = _tok_offsets(rows, mrow, i_h, H, D, col0, BC)
    tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _state_offsets(idx, i_h, H, K, V, k0, v0,
                   BK: tl.constexpr, BV: tl.constexpr):
    """Offsets and mask of a [BK, BV] block of a [*, H, K, V] state tensor (entry idx)."""
    rk = k0 + tl.arange(0, BK)
    cv = v0 + tl.arange(0, BV)
    offs = ((idx.to(tl.int64) * H + i_h) * K + rk[:, None]) * V + cv[None, :]
    mask = (rk[:, None] < K) & (cv[None, :] < V)
    return offs, mask


@triton.jit
def _ld_state(ptr, idx, i_h, H, K, V, k0, v0,
              BK: tl.constexpr, BV: tl.constexpr):
    offs, mask = _state_offsets(idx, i_h, H, K, V, k0, v0, BK, BV)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _st_state(ptr, val, idx, i_h, H, K, V, k0, v0,
              BK: tl.constexpr, BV: tl.constexpr):
    offs, mask = _state_offsets(idx, i_h, H, K, V, k0, v0, BK, BV)
    tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _st_state_blocks(ptr, b0, b1, b2, b3, idx, i_h, H, K, V, v0,
                     BK: tl.constexpr, BV: tl.constexpr, NKB: tl.constexpr):
    """Store a state held as NKB register blocks b0..b3 of BK rows (the sequential kernels' layout)."""
    _st_state(ptr, b0, idx, i_h, H, K, V, 0, v0, BK, BV)
    if NKB > 1:
        _st_state(ptr, b1, idx, i_h, H, K, V, BK, v0, BK, BV)
    if NKB > 2:
        _st_state(ptr, b2, idx, i_h, H, K, V, 2 * BK, v0, BK, BV)
    if NKB > 3:
        _st_state(ptr, b3, idx, i_h, H, K, V, 3 * BK, v0, BK, BV)


@triton.jit
def _chunk_of_program(cu_seqlens, chunk_indices, pid_t, pid_bh, T, H, BT: tl.constexpr,
                      IS_VARLEN: tl.constexpr):
    """For the chunk-parallel kernels: (head, first token row, end of its sequence, global chunk index).

    With cu_seqlens the grid has an upper bound of chunks; surplus programs get a chunk that starts at or
    after the end of its sequence, so every load and store of theirs is masked off."""
    if IS_VARLEN:
        i_h = pid_bh
        i_n = tl.load(chunk_indices + 2 * pid_t).to(tl.int32)
        i_c = tl.load(chunk_indices + 2 * pid_t + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int32)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
        # surplus programs read chunk 0's (written) states instead of unwritten memory
        g = tl.where(bos + i_c * BT < eos, pid_t, 0)
    else:
        i_h = pid_bh % H
        i_b = pid_bh // H
        i_c = pid_t
        bos = i_b * T
        eos = bos + T
        g = i_b * tl.cdiv(T, BT) + pid_t
    return i_h, bos + i_c * BT, eos, g


@triton.jit
def _seq_of_program(cu_seqlens, chunk_offsets, pid_nh, T, H, BT: tl.constexpr,
                    IS_VARLEN: tl.constexpr):
    """For the chunk-sequential kernels: (sequence, head, bos, eos, index of its first chunk)."""
    i_n = pid_nh // H
    i_h = pid_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int32)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
        g0 = tl.load(chunk_offsets + i_n).to(tl.int32)
    else:
        bos = i_n * T
        eos = bos + T
        g0 = i_n * tl.cdiv(T, BT)
    return i_n, i_h, bos, eos, g0
