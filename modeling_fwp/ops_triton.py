"""Triton kernels for the delta rule and the sum rule (chunkwise WY/UT form, Yang et al. 2024).

Public entry points (same arguments as ``ops.delta_rule`` / ``ops.sum_rule`` minus ``backend``):

    o, state = delta_rule_triton(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size)
    o, state = sum_rule_triton(q, k, v, scale, initial_state, output_final_state, cu_seqlens, chunk_size)

q, k [B,T,H,K]; v [B,T,H,V]; beta [B,T,H]; state [N,H,K,V] float32; o [B,T,H,V] in v.dtype.
Per head and step:  u_t = beta_t (v_t - S_{t-1}^T k_t),  S_t = S_{t-1} + k_t u_t^T,  o_t = scale S_t^T q_t.

Per chunk of C tokens (rows of Q, K, V; S0 = state entering the chunk):
    A  = tril(diag(beta) K K^T, -1),  L^-1 = (I + A)^-1,  T = L^-1 diag(beta)
    W  = T K,  U = T V                       (kernel _wy_fwd_kernel: parallel over chunks)
    U~ = U - W S0                            (the pseudo-values given the incoming state)
    O  = scale (Q S0 + tril(Q K^T) U~),  S1 = S0 + K^T U~   (_state_fwd_kernel: sequential over chunks)
The sum rule is the same with U~ = V (no W).  The backward mirrors it (see _ChunkRule.backward): recompute
W, U, L^-1 and the chunk states, run the state gradient backwards over chunks, then per-chunk gradients.

Kernels tile K into at most 4 register blocks (K <= 512) and V over the grid.  Everything also runs under
TRITON_INTERPRET=1 on CPU (that is how CI tests it).  This module raises ImportError without triton.
"""
from __future__ import annotations

import inspect
import os
import warnings

import torch

from .ops_chunk import packed_sequence_count

try:  # guarded, so transformers' import check of a Hub folder does not demand triton from CPU users
    import triton
    import triton.language as tl
except ImportError as error:  # ops.py treats this as "no triton backend"
    raise ImportError(f"modeling_fwp.ops_triton needs triton: {error}") from error

__all__ = ["delta_rule_triton", "sum_rule_triton"]

# Block-size overrides, for tests (to reach the multi-block code paths at tiny shapes) and for the
# benchmark's sweeps.  Keys: "BK_state", "BV_state" (sequential kernels), "BK", "BV" (parallel kernels),
# "fused_output" (bool), "warps_state", "stages_state", "warps", "recurrent_max_len".
TUNE: dict = {}

MAX_K = 512
MAX_V = 512


# ----------------------------------------------------------------------------------------------------------
# small jit helpers
# ----------------------------------------------------------------------------------------------------------
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


@triton.jit
def _inv_unit_lower16(a):
    """(I + a)^-1 for a strictly lower-triangular 16x16 fp32 tile, by forward substitution.

    Row i of the inverse is e_i - sum_{j<i} a_ij x_j, and rows j < i are final when row i is formed."""
    r = tl.arange(0, 16)
    x = tl.where(r[:, None] == r[None, :], 1.0, 0.0)
    for i in range(1, 16):
        a_i = tl.sum(tl.where(r[:, None] == i, a, 0.0), 0)
        x_i = tl.sum(a_i[:, None] * x, 0)
        x = tl.where(r[:, None] == i, x - x_i[None, :], x)
    return x


# ----------------------------------------------------------------------------------------------------------
# forward kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _wy_fwd_kernel(k, v, beta, w, u, linv, cu_seqlens, chunk_indices, T,
                   H, K, V, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr,
                   STORE_LINV: tl.constexpr, PREC: tl.constexpr):
    """Per chunk: L^-1 = (I + tril(diag(beta) K K^T, -1))^-1 in 16-row blocks, then W = L^-1 diag(beta) K
    and U = L^-1 diag(beta) V.  Diagonal 16x16 blocks are inverted by forward substitution and the
    off-diagonal blocks of the inverse follow from X_ij = -X_ii sum_{j<=m<i} A_im X_mj (small tensor-core
    products instead of a 64-step substitution)."""
    i_h, t0, eos, g = _chunk_of_program(cu_seqlens, chunk_indices, tl.program_id(0), tl.program_id(1),
                                        T, H, BT, IS_VARLEN)
    NB: tl.constexpr = BT // 16
    dt = k.dtype.element_ty
    r16 = tl.arange(0, 16)
    strict = r16[:, None] > r16[None, :]
    rows0 = t0 + r16
    rows1 = rows0 + 16
    rows2 = rows0 + 32
    rows3 = rows0 + 48
    m0 = rows0 < eos
    m1 = rows1 < eos
    m2 = rows2 < eos
    m3 = rows3 < eos
    b0 = tl.load(beta + rows0.to(tl.int64) * H + i_h, mask=m0, other=0.0).to(tl.float32)
    b1 = tl.load(beta + rows1.to(tl.int64) * H + i_h, mask=m1, other=0.0).to(tl.float32)
    b2 = tl.load(beta + rows2.to(tl.int64) * H + i_h, mask=m2, other=0.0).to(tl.float32)
    b3 = tl.load(beta + rows3.to(tl.int64) * H + i_h, mask=m3, other=0.0).to(tl.float32)

    # Gram blocks a_ij = K_i K_j^T (i >= j) over all K columns.
    a00 = tl.zeros([16, 16], dtype=tl.float32)
    a10 = tl.zeros([16, 16], dtype=tl.float32)
    a11 = tl.zeros([16, 16], dtype=tl.float32)
    a20 = tl.zeros([16, 16], dtype=tl.float32)
    a21 = tl.zeros([16, 16], dtype=tl.float32)
    a22 = tl.zeros([16, 16], dtype=tl.float32)
    a30 = tl.zeros([16, 16], dtype=tl.float32)
    a31 = tl.zeros([16, 16], dtype=tl.float32)
    a32 = tl.zeros([16, 16], dtype=tl.float32)
    a33 = tl.zeros([16, 16], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        k0 = _ld_tok(k, rows0, m0, i_h, H, K, i_k * BK, BK)
        a00 += tl.dot(k0, tl.trans(k0), input_precision=PREC)
        if NB > 1:
            k1 = _ld_tok(k, rows1, m1, i_h, H, K, i_k * BK, BK)
            a10 += tl.dot(k1, tl.trans(k0), input_precision=PREC)
            a11 += tl.dot(k1, tl.trans(k1), input_precision=PREC)
        if NB > 2:
            k2 = _ld_tok(k, rows2, m2, i_h, H, K, i_k * BK, BK)
            k3 = _ld_tok(k, rows3, m3, i_h, H, K, i_k * BK, BK)
            a20 += tl.dot(k2, tl.trans(k0), input_precision=PREC)
            a21 += tl.dot(k2, tl.trans(k1), input_precision=PREC)
            a22 += tl.dot(k2, tl.trans(k2), input_precision=PREC)
            a30 += tl.dot(k3, tl.trans(k0), input_precision=PREC)
            a31 += tl.dot(k3, tl.trans(k1), input_precision=PREC)
            a32 += tl.dot(k3, tl.trans(k2), input_precision=PREC)
            a33 += tl.dot(k3, tl.trans(k3), input_precision=PREC)

    # Blocks of X = (I + A)^-1, A = rows scaled by beta, diagonal blocks strictly lower.
    x00 = _inv_unit_lower16(tl.where(strict, a00 * b0[:, None], 0.0))
    x10 = tl.zeros([16, 16], dtype=tl.float32)
    x11 = tl.zeros([16, 16], dtype=tl.float32)
    x20 = tl.zeros([16, 16], dtype=tl.float32)
    x21 = tl.zeros([16, 16], dtype=tl.float32)
    x22 = tl.zeros([16, 16], dtype=tl.float32)
    x30 = tl.zeros([16, 16], dtype=tl.float32)
    x31 = tl.zeros([16, 16], dtype=tl.float32)
    x32 = tl.zeros([16, 16], dtype=tl.float32)
    x33 = tl.zeros([16, 16], dtype=tl.float32)
    if NB > 1:
        a10 = a10 * b1[:, None]
        x11 = _inv_unit_lower16(tl.where(strict, a11 * b1[:, None], 0.0))
        x10 = -tl.dot(x11, tl.dot(a10, x00, input_precision=PREC), input_precision=PREC)
    if NB > 2:
        a20 = a20 * b2[:, None]
        a21 = a21 * b2[:, None]
        a30 = a30 * b3[:, None]
        a31 = a31 * b3[:, None]
        a32 = a32 * b3[:, None]
        x22 = _inv_unit_lower16(tl.where(strict, a22 * b2[:, None], 0.0))
        x33 = _inv_unit_lower16(tl.where(strict, a33 * b3[:, None], 0.0))
        x21 = -tl.dot(x22, tl.dot(a21, x11, input_precision=PREC), input_precision=PREC)
        x20 = -tl.dot(x22, tl.dot(a20, x00, input_precision=PREC) + tl.dot(a21, x10, input_precision=PREC),
                      input_precision=PREC)
        x32 = -tl.dot(x33, tl.dot(a32, x22, input_precision=PREC), input_precision=PREC)
        x31 = -tl.dot(x33, tl.dot(a31, x11, input_precision=PREC) + tl.dot(a32, x21, input_precision=PREC),
                      input_precision=PREC)
        x30 = -tl.dot(x33, tl.dot(a30, x00, input_precision=PREC) + tl.dot(a31, x10, input_precision=PREC)
                      + tl.dot(a32, x20, input_precision=PREC), input_precision=PREC)

    if STORE_LINV:
        _st_tok(linv, x00, rows0, m0, i_h, H, BT, 0, 16)
        if NB > 1:
            _st_tok(linv, x10, rows1, m1, i_h, H, BT, 0, 16)
            _st_tok(linv, x11, rows1, m1, i_h, H, BT, 16, 16)
        if NB > 2:
            _st_tok(linv, x20, rows2, m2, i_h, H, BT, 0, 16)
            _st_tok(linv, x21, rows2, m2, i_h, H, BT, 16, 16)
            _st_tok(linv, x22, rows2, m2, i_h, H, BT, 32, 16)
            _st_tok(linv, x30, rows3, m3, i_h, H, BT, 0, 16)
            _st_tok(linv, x31, rows3, m3, i_h, H, BT, 16, 16)
            _st_tok(linv, x32, rows3, m3, i_h, H, BT, 32, 16)
            _st_tok(linv, x33, rows3, m3, i_h, H, BT, 48, 16)

    # W = X diag(beta) K and U = X diag(beta) V, block row by block row.
    y00 = x00.to(dt)
    y10 = x10.to(dt)
    y11 = x11.to(dt)
    y20 = x20.to(dt)
    y21 = x21.to(dt)
    y22 = x22.to(dt)
    y30 = x30.to(dt)
    y31 = x31.to(dt)
    y32 = x32.to(dt)
    y33 = x33.to(dt)
    for i_k in range(0, tl.cdiv(K, BK)):
        c0 = (_ld_tok(k, rows0, m0, i_h, H, K, i_k * BK, BK) * b0[:, None]).to(dt)
        _st_tok(w, tl.dot(y00, c0, input_precision=PREC), rows0, m0, i_h, H, K, i_k * BK, BK)
        if NB > 1:
            c1 = (_ld_tok(k, rows1, m1, i_h, H, K, i_k * BK, BK) * b1[:, None]).to(dt)
            _st_tok(w, tl.dot(y10, c0, input_precision=PREC) + tl.dot(y11, c1, input_precision=PREC),
                    rows1, m1, i_h, H, K, i_k * BK, BK)
        if NB > 2:
            c2 = (_ld_tok(k, rows2, m2, i_h, H, K, i_k * BK, BK) * b2[:, None]).to(dt)
            c3 = (_ld_tok(k, rows3, m3, i_h, H, K, i_k * BK, BK) * b3[:, None]).to(dt)
            _st_tok(w, tl.dot(y20, c0, input_precision=PREC) + tl.dot(y21, c1, input_precision=PREC)
                    + tl.dot(y22, c2, input_precision=PREC), rows2, m2, i_h, H, K, i_k * BK, BK)
            _st_tok(w, tl.dot(y30, c0, input_precision=PREC) + tl.dot(y31, c1, input_precision=PREC)
                    + tl.dot(y32, c2, input_precision=PREC) + tl.dot(y33, c3, input_precision=PREC),
                    rows3, m3, i_h, H, K, i_k * BK, BK)
    for i_v in range(0, tl.cdiv(V, BV)):
        c0 = (_ld_tok(v, rows0, m0, i_h, H, V, i_v * BV, BV) * b0[:, None]).to(dt)
        _st_tok(u, tl.dot(y00, c0, input_precision=PREC), rows0, m0, i_h, H, V, i_v * BV, BV)
        if NB > 1:
            c1 = (_ld_tok(v, rows1, m1, i_h, H, V, i_v * BV, BV) * b1[:, None]).to(dt)
            _st_tok(u, tl.dot(y10, c0, input_precision=PREC) + tl.dot(y11, c1, input_precision=PREC),
                    rows1, m1, i_h, H, V, i_v * BV, BV)
        if NB > 2:
            c2 = (_ld_tok(v, rows2, m2, i_h, H, V, i_v * BV, BV) * b2[:, None]).to(dt)
            c3 = (_ld_tok(v, rows3, m3, i_h, H, V, i_v * BV, BV) * b3[:, None]).to(dt)
            _st_tok(u, tl.dot(y20, c0, input_precision=PREC) + tl.dot(y21, c1, input_precision=PREC)
                    + tl.dot(y22, c2, input_precision=PREC), rows2, m2, i_h, H, V, i_v * BV, BV)
            _st_tok(u, tl.dot(y30, c0, input_precision=PREC) + tl.dot(y31, c1, input_precision=PREC)
                    + tl.dot(y32, c2, input_precision=PREC) + tl.dot(y33, c3, input_precision=PREC),
                    rows3, m3, i_h, H, V, i_v * BV, BV)


@triton.jit
def _state_fwd_kernel(q, k, w, u, o, h, vnew, h0, ht, cu_seqlens, chunk_offsets, T, scale, NHB,
                      H, K, V, BT: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, NKB: tl.constexpr,
                      IS_DELTA: tl.constexpr, IS_VARLEN: tl.constexpr, USE_H0: tl.constexpr,
                      STORE_HT: tl.constexpr, STORE_H: tl.constexpr, STORE_VNEW: tl.constexpr,
                      WRITE_O: tl.constexpr, PREC: tl.constexpr):
    """Sequential over the chunks of one (sequence, head, V block).  The state S [K, BV] lives in up to
    four fp32 register blocks s0..s3 of BK rows.  Per chunk: U~ = U - W S, optionally
    O = scale (Q S + tril(Q K^T) U~), then S += K^T U~.  For the sum rule U~ = V (u points at v)."""
    i_v = tl.program_id(0)
    i_n, i_h, bos, eos, g0 = _seq_of_program(cu_seqlens, chunk_offsets, tl.program_id(1), T, H, BT, IS_VARLEN)
    dt = k.dtype.element_ty
    v0 = i_v * BV
    r = tl.arange(0, BT)
    causal = r[:, None] >= r[None, :]
    s0 = tl.zeros([BK, BV], dtype=tl.float32)
    s1 = tl.zeros([BK, BV], dtype=tl.float32)
    s2 = tl.zeros([BK, BV], dtype=tl.float32)
    s3 = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        s0 = _ld_state(h0, i_n, i_h, H, K, V, 0, v0, BK, BV)
        if NKB > 1:
            s1 = _ld_state(h0, i_n, i_h, H, K, V, BK, v0, BK, BV)
        if NKB > 2:
            s2 = _ld_state(h0, i_n, i_h, H, K, V, 2 * BK, v0, BK, BV)
        if NKB > 3:
            s3 = _ld_state(h0, i_n, i_h, H, K, V, 3 * BK, v0, BK, BV)

    for c in range(0, tl.cdiv(eos - bos, BT)):
        rows = bos + c * BT + r
        mrow = rows < eos
        if STORE_H:
            _st_state_blocks(h, s0, s1, s2, s3, g0 + c, i_h, H, K, V, v0, BK, BV, NKB)
        vn = _ld_tok(u, rows, mrow, i_h, H, V, v0, BV).to(tl.float32)
        k0 = _ld_tok(k, rows, mrow, i_h, H, K, 0, BK)
        if NKB > 1:
            k1 = _ld_tok(k, rows, mrow, i_h, H, K, BK, BK)
        if NKB > 2:
            k2 = _ld_tok(k, rows, mrow, i_h, H, K, 2 * BK, BK)
        if NKB > 3:
            k3 = _ld_tok(k, rows, mrow, i_h, H, K, 3 * BK, BK)
        if IS_DELTA:
            vn -= tl.dot(_ld_tok(w, rows, mrow, i_h, H, K, 0, BK), s0.to(dt), input_precision=PREC)
            if NKB > 1:
                vn -= tl.dot(_ld_tok(w, rows, mrow, i_h, H, K, BK, BK), s1.to(dt), input_precision=PREC)
            if NKB > 2:
                vn -= tl.dot(_ld_tok(w, rows, mrow, i_h, H, K, 2 * BK, BK), s2.to(dt), input_precision=PREC)
            if NKB > 3:
                vn -= tl.dot(_ld_tok(w, rows, mrow, i_h, H, K, 3 * BK, BK), s3.to(dt), input_precision=PREC)
        if STORE_VNEW:
            _st_tok(vnew, vn, rows, mrow, i_h, H, V, v0, BV)
        vn_dt = vn.to(dt)
        if WRITE_O:
            q0 = _ld_tok(q, rows, mrow, i_h, H, K, 0, BK)
            acc = tl.dot(q0, s0.to(dt), input_precision=PREC)
            qk = tl.dot(q0, tl.trans(k0), input_precision=PREC)
            if NKB > 1:
                q1 = _ld_tok(q, rows, mrow, i_h, H, K, BK, BK)
                acc += tl.dot(q1, s1.to(dt), input_precision=PREC)
                qk += tl.dot(q1, tl.trans(k1), input_precision=PREC)
            if NKB > 2:
                q2 = _ld_tok(q, rows, mrow, i_h, H, K, 2 * BK, BK)
                acc += tl.dot(q2, s2.to(dt), input_precision=PREC)
                qk += tl.dot(q2, tl.trans(k2), input_precision=PREC)
            if NKB > 3:
                q3 = _ld_tok(q, rows, mrow, i_h, H, K, 3 * BK, BK)
                acc += tl.dot(q3, s3.to(dt), input_precision=PREC)
                qk += tl.dot(q3, tl.trans(k3), input_precision=PREC)
            qk = tl.where(causal, qk, 0.0).to(dt)
            acc += tl.dot(qk, vn_dt, input_precision=PREC)
            _st_tok(o, acc * scale, rows, mrow, i_h, H, V, v0, BV)
        s0 += tl.dot(tl.trans(k0), vn_dt, input_precision=PREC)
        if NKB > 1:
            s1 += tl.dot(tl.trans(k1), vn_dt, input_precision=PREC)
        if NKB > 2:
            s2 += tl.dot(tl.trans(k2), vn_dt, input_precision=PREC)
        if NKB > 3:
            s3 += tl.dot(tl.trans(k3), vn_dt, input_precision=PREC)

    if STORE_HT:
        _st_state_blocks(ht, s0, s1, s2, s3, i_n, i_h, H, K, V, v0, BK, BV, NKB)


@triton.jit
def _output_kernel(q, k, vnew, h, o, cu_seqlens, chunk_indices, T, scale,
                   H, K, V, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    """O = scale (Q S0 + tril(Q K^T) U~) for one chunk and V block, from stored chunk states.  Used when
    the sequential kernel has too few programs to hide this parallel work (few sequences x heads)."""
    i_v = tl.program_id(2)
    i_h, t0, eos, g = _chunk_of_program(cu_seqlens, chunk_indices, tl.program_id(0), tl.program_id(1),
                                        T, H, BT, IS_VARLEN)
    dt = k.dtype.element_ty
    r = tl.arange(0, BT)
    rows = t0 + r
    mrow = rows < eos
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    qk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        qt = _ld_tok(q, rows, mrow, i_h, H, K, i_k * BK, BK)
        kt = _ld_tok(k, rows, mrow, i_h, H, K, i_k * BK, BK)
        ht = _ld_state(h, g, i_h, H, K, V, i_k * BK, i_v * BV, BK, BV).to(dt)
        acc += tl.dot(qt, ht, input_precision=PREC)
        qk += tl.dot(qt, tl.trans(kt), input_precision=PREC)
    qk = tl.where(r[:, None] >= r[None, :], qk, 0.0).to(dt)
    acc += tl.dot(qk, _ld_tok(vnew, rows, mrow, i_h, H, V, i_v * BV, BV), input_precision=PREC)
    _st_tok(o, acc * scale, rows, mrow, i_h, H, V, i_v * BV, BV)


@triton.jit
def _recurrent_fwd_kernel(q, k, v, beta, o, h0, ht, cu_seqlens, T, scale,
                          H, K, V, BKF: tl.constexpr,
                          BV: tl.constexpr, IS_DELTA: tl.constexpr, IS_VARLEN: tl.constexpr,
                          USE_H0: tl.constexpr, STORE_HT: tl.constexpr):
    """Token by token (decoding: a few tokens per call).  The [K, BV] state stays in fp32 registers."""
    i_v = tl.program_id(0)
    i_n, i_h, bos, eos, g0 = _seq_of_program(cu_seqlens, cu_seqlens, tl.program_id(1), T, H, 16, IS_VARLEN)
    rk = tl.arange(0, BKF)
    cv = i_v * BV + tl.arange(0, BV)
    mk = rk < K
    mv = cv < V
    s = tl.zeros([BKF, BV], dtype=tl.float32)
    if USE_H0:
        s = _ld_state(h0, i_n, i_h, H, K, V, 0, i_v * BV, BKF, BV)
    for t in range(bos, eos):
        base = (t * H + i_h).to(tl.int64)
        kt = tl.load(k + base * K + rk, mask=mk, other=0.0).to(tl.float32)
        qt = tl.load(q + base * K + rk, mask=mk, other=0.0).to(tl.float32)
        vt = tl.load(v + base * V + cv, mask=mv, other=0.0).to(tl.float32)
        if IS_DELTA:
            bt = tl.load(beta + base).to(tl.float32)
            vt = bt * (vt - tl.sum(s * kt[:, None], 0))
        s += kt[:, None] * vt[None, :]
        ot = tl.sum(s * qt[:, None], 0) * scale
        tl.store(o + base * V + cv, ot.to(o.dtype.element_ty), mask=mv)
    if STORE_HT:
        _st_state(ht, s, i_n, i_h, H, K, V, 0, i_v * BV, BKF, BV)


# ----------------------------------------------------------------------------------------------------------
# backward kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _wu_from_linv_kernel(k, v, beta, linv, w, u, cu_seqlens, chunk_indices, T, H, K, V,
                         BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr,
                         PREC: tl.constexpr):
    """W = L^-1 diag(beta) K and U = L^-1 diag(beta) V from the L^-1 the forward saved (no re-inversion)."""
    i_h, t0, eos, g = _chunk_of_program(cu_seqlens, chunk_indices, tl.program_id(0), tl.program_id(1),
                                        T, H, BT, IS_VARLEN)
    dt = k.dtype.element_ty
    r = tl.arange(0, BT)
    rows = t0 + r
    mrow = rows < eos
    b = tl.load(beta + rows.to(tl.int64) * H + i_h, mask=mrow, other=0.0).to(tl.float32)
    x = _ld_tok(linv, rows, mrow, i_h, H, BT, 0, BT).to(tl.float32)
    tm = (tl.where(r[:, None] >= r[None, :], x, 0.0) * b[None, :]).to(dt)
    for i_k in range(0, tl.cdiv(K, BK)):
        _st_tok(w, tl.dot(tm, _ld_tok(k, rows, mrow, i_h, H, K, i_k * BK, BK), input_precision=PREC),
                rows, mrow, i_h, H, K, i_k * BK, BK)
    for i_v in range(0, tl.cdiv(V, BV)):
        _st_tok(u, tl.dot(tm, _ld_tok(v, rows, mrow, i_h, H, V, i_v * BV, BV), input_precision=PREC),
                rows, mrow, i_h, H, V, i_v * BV, BV)


@triton.jit
def _state_bwd_kernel(q, k, w, do, dh, dvnew, dht, dh0, cu_seqlens, chunk_offsets, T, scale, NHB,
                      H, K, V, BT: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, NKB: tl.constexpr,
                      IS_DELTA: tl.constexpr, IS_VARLEN: tl.constexpr, USE_DHT: tl.constexpr,
                      STORE_DH0: tl.constexpr, PREC: tl.constexpr):
    """Reverse over chunks: dS holds the gradient of the state leaving the chunk.  Per chunk it stores dS,
    dU~ = scale tril(Q K^T)^T dO + K dS, then dS += scale Q^T dO - W^T dU~ (delta) / scale Q^T dO (sum)."""
    i_v = tl.program_id(0)
    i_n, i_h, bos, eos, g0 = _seq_of_program(cu_seqlens, chunk_offsets, tl.program_id(1), T, H, BT, IS_VARLEN)
    dt = k.dtype.element_ty
    v0 = i_v * BV
    r = tl.arange(0, BT)
    causal = r[:, None] >= r[None, :]
    d0 = tl.zeros([BK, BV], dtype=tl.float32)
    d1 = tl.zeros([BK, BV], dtype=tl.float32)
    d2 = tl.zeros([BK, BV], dtype=tl.float32)
    d3 = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        d0 = _ld_state(dht, i_n, i_h, H, K, V, 0, v0, BK, BV)
        if NKB > 1:
            d1 = _ld_state(dht, i_n, i_h, H, K, V, BK, v0, BK, BV)
        if NKB > 2:
            d2 = _ld_state(dht, i_n, i_h, H, K, V, 2 * BK, v0, BK, BV)
        if NKB > 3:
            d3 = _ld_state(dht, i_n, i_h, H, K, V, 3 * BK, v0, BK, BV)
    nch = tl.cdiv(eos - bos, BT)
    for cc in range(0, nch):
        c = nch - 1 - cc
        rows = bos + c * BT + r
        mrow = rows < eos
        _st_state_blocks(dh, d0, d1, d2, d3, g0 + c, i_h, H, K, V, v0, BK, BV, NKB)
        dot_ = _ld_tok(do, rows, mrow, i_h, H, V, v0, BV)
        q0 = _ld_tok(q, rows, mrow, i_h, H, K, 0, BK)
        k0 = _ld_tok(k, rows, mrow, i_h, H, K, 0, BK)
        qk = tl.dot(q0, tl.trans(k0), input_precision=PREC)
        dvn = tl.dot(k0, d0.to(dt), input_precision=PREC)
        if NKB > 1:
            q1 = _ld_tok(q, rows, mrow, i_h, H, K, BK, BK)
            k1 = _ld_tok(k, rows, mrow, i_h, H, K, BK, BK)
            qk += tl.dot(q1, tl.trans(k1), input_precision=PREC)
            dvn += tl.dot(k1, d1.to(dt), input_precision=PREC)
        if NKB > 2:
            q2 = _ld_tok(q, rows, mrow, i_h, H, K, 2 * BK, BK)
            k2 = _ld_tok(k, rows, mrow, i_h, H, K, 2 * BK, BK)
            qk += tl.dot(q2, tl.trans(k2), input_precision=PREC)
            dvn += tl.dot(k2, d2.to(dt), input_precision=PREC)
        if NKB > 3:
            q3 = _ld_tok(q, rows, mrow, i_h, H, K, 3 * BK, BK)
            k3 = _ld_tok(k, rows, mrow, i_h, H, K, 3 * BK, BK)
            qk += tl.dot(q3, tl.trans(k3), input_precision=PREC)
            dvn += tl.dot(k3, d3.to(dt), input_precision=PREC)
        pt = tl.trans(tl.where(causal, qk * scale, 0.0)).to(dt)
        dvn += tl.dot(pt, dot_, input_precision=PREC)
        _st_tok(dvnew, dvn, rows, mrow, i_h, H, V, v0, BV)
        dvn_dt = dvn.to(dt)
        d0 += scale * tl.dot(tl.trans(q0), dot_, input_precision=PREC)
        if IS_DELTA:
            d0 -= tl.dot(tl.trans(_ld_tok(w, rows, mrow, i_h, H, K, 0, BK)), dvn_dt, input_precision=PREC)
        if NKB > 1:
            d1 += scale * tl.dot(tl.trans(q1), dot_, input_precision=PREC)
            if IS_DELTA:
                d1 -= tl.dot(tl.trans(_ld_tok(w, rows, mrow, i_h, H, K, BK, BK)), dvn_dt, input_precision=PREC)
        if NKB > 2:
            d2 += scale * tl.dot(tl.trans(q2), dot_, input_precision=PREC)
            if IS_DELTA:
                d2 -= tl.dot(tl.trans(_ld_tok(w, rows, mrow, i_h, H, K, 2 * BK, BK)), dvn_dt,
                             input_precision=PREC)
        if NKB > 3:
            d3 += scale * tl.dot(tl.trans(q3), dot_, input_precision=PREC)
            if IS_DELTA:
                d3 -= tl.dot(tl.trans(_ld_tok(w, rows, mrow, i_h, H, K, 3 * BK, BK)), dvn_dt,
                             input_precision=PREC)

    if STORE_DH0:
        _st_state_blocks(dh0, d0, d1, d2, d3, i_n, i_h, H, K, V, v0, BK, BV, NKB)


@triton.jit
def _dqk_kernel(q, k, vnew, h, do, dh, dvnew, dq, dk, dw, cu_seqlens, chunk_indices, T, scale,
                H, K, V, BT: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, IS_DELTA: tl.constexpr, IS_VARLEN: tl.constexpr,
                PREC: tl.constexpr):
    """Per chunk and K block (S0 = chunk state, dS1 = gradient of the state leaving the chunk):
        dQ = scale (dO S0^T + tril(dO U~^T) K),   dK = scale tril(dO U~^T)^T Q + U~ dS1^T,   dW = -dU~ S0^T.
    For the delta rule dK is only its direct part; _wy_bwd_kernel adds the part through W, U, L^-1."""
    i_k = tl.program_id(2)
    i_h, t0, eos, g = _chunk_of_program(cu_seqlens, chunk_indices, tl.program_id(0), tl.program_id(1),
                                        T, H, BT, IS_VARLEN)
    dt = k.dtype.element_ty
    r = tl.arange(0, BT)
    rows = t0 + r
    mrow = rows < eos
    k0 = i_k * BK
    dp = tl.zeros([BT, BT], dtype=tl.float32)
    dq_acc = tl.zeros([BT, BK], dtype=tl.float32)
    dk_acc = tl.zeros([BT, BK], dtype=tl.float32)
    dw_acc = tl.zeros([BT, BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        do_t = _ld_tok(do, rows, mrow, i_h, H, V, i_v * BV, BV)
        vn_t = _ld_tok(vnew, rows, mrow, i_h, H, V, i_v * BV, BV)
        h_t = _ld_state(h, g, i_h, H, K, V, k0, i_v * BV, BK, BV).to(dt)
        dh_t = _ld_state(dh, g, i_h, H, K, V, k0, i_v * BV, BK, BV).to(dt)
        dp += tl.dot(do_t, tl.trans(vn_t), input_precision=PREC)
        dq_acc += tl.dot(do_t, tl.trans(h_t), input_precision=PREC)
        dk_acc += tl.dot(vn_t, tl.trans(dh_t), input_precision=PREC)
        if IS_DELTA:
            dvn_t = _ld_tok(dvnew, rows, mrow, i_h, H, V, i_v * BV, BV)
            dw_acc += tl.dot(dvn_t, tl.trans(h_t), input_precision=PREC)
    dp = tl.where(r[:, None] >= r[None, :], dp * scale, 0.0).to(dt)
    q_t = _ld_tok(q, rows, mrow, i_h, H, K, k0, BK)
    k_t = _ld_tok(k, rows, mrow, i_h, H, K, k0, BK)
    dq_acc = dq_acc * scale + tl.dot(dp, k_t, input_precision=PREC)
    dk_acc += tl.dot(tl.trans(dp), q_t, input_precision=PREC)
    _st_tok(dq, dq_acc, rows, mrow, i_h, H, K, k0, BK)
    _st_tok(dk, dk_acc, rows, mrow, i_h, H, K, k0, BK)
    if IS_DELTA:
        _st_tok(dw, -dw_acc, rows, mrow, i_h, H, K, k0, BK)


@triton.jit
def _wy_bwd_kernel(k, v, beta, linv, dw, dvnew, dk_direct, dk, dv, dbeta, cu_seqlens, chunk_indices, T,
                   H, K, V, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    """Through W = T K, U = T V, T = L^-1 diag(beta), L = I + tril(diag(beta) K K^T, -1)  (dU = dU~):
        dT = dW K^T + dU V^T;  dK += T^T dW;  dV = T^T dU;  dbeta_j += sum_i dT_ij L^-1_ij;
        dA = -L^-T (dT diag(beta)) L^-T (strictly lower);  dbeta_i += sum_j dA_ij k_i.k_j;
        dK += (diag(beta) dA + dA^T diag(beta)) K."""
    i_h, t0, eos, g = _chunk_of_program(cu_seqlens, chunk_indices, tl.program_id(0), tl.program_id(1),
                                        T, H, BT, IS_VARLEN)
    dt = k.dtype.element_ty
    r = tl.arange(0, BT)
    rows = t0 + r
    mrow = rows < eos
    lower = r[:, None] >= r[None, :]
    b = tl.load(beta + rows.to(tl.int64) * H + i_h, mask=mrow, other=0.0).to(tl.float32)
    x = _ld_tok(linv, rows, mrow, i_h, H, BT, 0, BT).to(tl.float32)
    x = tl.where(lower, x, 0.0)
    tm = x * b[None, :]
    tm_t = tl.trans(tm).to(dt)
    d_t = tl.zeros([BT, BT], dtype=tl.float32)
    kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        k_t = _ld_tok(k, rows, mrow, i_h, H, K, i_k * BK, BK)
        dw_t = _ld_tok(dw, rows, mrow, i_h, H, K, i_k * BK, BK)
        d_t += tl.dot(dw_t, tl.trans(k_t), input_precision=PREC)
        kk += tl.dot(k_t, tl.trans(k_t), input_precision=PREC)
    for i_v in range(0, tl.cdiv(V, BV)):
        v_t = _ld_tok(v, rows, mrow, i_h, H, V, i_v * BV, BV)
        du_t = _ld_tok(dvnew, rows, mrow, i_h, H, V, i_v * BV, BV)
        d_t += tl.dot(du_t, tl.trans(v_t), input_precision=PREC)
        _st_tok(dv, tl.dot(tm_t, du_t, input_precision=PREC), rows, mrow, i_h, H, V, i_v * BV, BV)
    d_t = tl.where(lower, d_t, 0.0)
    db = tl.sum(d_t * x, 0)
    xt = tl.trans(x)
    da = -tl.dot(tl.dot(xt, d_t * b[None, :], input_precision=PREC), xt, input_precision=PREC)
    da = tl.where(r[:, None] > r[None, :], da, 0.0)
    db += tl.sum(da * kk, 1)
    da = da * b[:, None]
    gm = (da + tl.trans(da)).to(dt)
    for i_k in range(0, tl.cdiv(K, BK)):
        k_t = _ld_tok(k, rows, mrow, i_h, H, K, i_k * BK, BK)
        dw_t = _ld_tok(dw, rows, mrow, i_h, H, K, i_k * BK, BK)
        acc = _ld_tok(dk_direct, rows, mrow, i_h, H, K, i_k * BK, BK).to(tl.float32)
        acc += tl.dot(tm_t, dw_t, input_precision=PREC) + tl.dot(gm, k_t, input_precision=PREC)
        _st_tok(dk, acc, rows, mrow, i_h, H, K, i_k * BK, BK)
    tl.store(dbeta + rows.to(tl.int64) * H + i_h, db.to(dbeta.dtype.element_ty), mask=mrow)


# ----------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------
def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TUNED: dict = {}
_AUTOTUNE_NOTICE = (
    "modeling_fwp: tuning the Triton delta-rule kernels for a new shape. The first call of each new shape class "
    "takes up to a minute (on an H100: first training step 53 s instead of 21 s, then steps about 15 % faster); "
    "Triton's disk cache keeps the picks for later runs on this machine. FWP_TRITON_AUTOTUNE=0 skips the tuning "
    "and launches with fixed settings."
)


_announced = False


def _announce_autotuning() -> None:
    """Say once per process why a first call is slow (a silent minute looks like a hang)."""
    global _announced
    if not _announced:
        _announced = True
        warnings.warn(_AUTOTUNE_NOTICE, stacklevel=3)


def _launch(kernel, grid, args, kwargs, configs, key, plain):
    """Launch `kernel`.  On a GPU its num_warps / num_stages (and BV for the sequential kernels) are picked
    by triton.autotune over `configs` (once per `key` values and dtypes); under the interpreter or with
    TUNE overrides it runs with the fixed meta-parameters `plain`.  grid: function of the meta-parameters."""
    if configs is None:
        meta = dict(kwargs, **plain)
        kernel[grid(meta)](*args, **meta)
        return
    ident = (id(kernel), tuple(key), tuple((tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
                                           for c in configs))
    tuned = _TUNED.get(ident)
    if tuned is None:
        _announce_autotuning()
        # cache_results (triton >= 3.2) stores the pick in triton's on-disk cache, so only the first process on a
        # machine pays the tuning time (DDP ranks, later runs, tests), not every process.
        extra = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
        tuned = _TUNED[ident] = triton.autotune(configs=configs, key=list(key), **extra)(kernel)
    tuned[grid](*args, **kwargs)


def _cfgs(pairs, **meta):
    return [triton.Config(dict(meta), num_warps=w, num_stages=st) for w, st in pairs]


def plan_chunk_size(chunk_size: int, key_dim: int, item: int) -> int:
    """The chunk size a call runs with. It changes only rounding, not the result.  The sequential kernels keep a
    chunk's q, k and w tiles ([BT, K] each) on chip: shrink the chunk where those would overflow shared memory
    (K = 512 in bf16, K >= 256 in fp32)."""
    kp = max(16, _pow2(key_dim))
    while chunk_size > 16 and chunk_size * kp * item * 3 > 96 * 1024:
        chunk_size //= 2
    return chunk_size


class _Plan:
    """Shapes, block sizes and chunk bookkeeping shared by the launches of one call."""

    def __init__(self, q, v, cu_seqlens, chunk_size):
        B, T, H, K = q.shape
        V = v.shape[-1]
        kp = max(16, _pow2(K))
        vp = max(16, _pow2(V))
        item = v.element_size()
        chunk_size = plan_chunk_size(chunk_size, K, item)
        self.B, self.T, self.H, self.K, self.V, self.BT = B, T, H, K, V, chunk_size
        self.kp = kp
        self.dtype = v.dtype
        self.prec = "ieee" if v.dtype == torch.float32 else "tf32"
        self.varlen = cu_seqlens is not None
        # FWP_TRITON_AUTOTUNE=0 skips the autotuner (about a minute per new shape class on an H100) and launches
        # with the fixed settings below (at K <= 64 the H200 autotuner's picks), ready at once.
        self.autotune = q.is_cuda and not _interpreting() and not TUNE and os.environ.get("FWP_TRITON_AUTOTUNE") != "0"
        # Sequential kernels: the state is NKB register blocks of [BK, BV] fp32.
        self.BK_s = TUNE.get("BK_state") or (kp if kp <= 64 else (64 if K <= 256 else 128))
        self.NKB = triton.cdiv(K, self.BK_s)
        if self.NKB > 4:
            raise ValueError(f"head dim K={K} needs more than 4 blocks of {self.BK_s}")
        bv_max = 64 if kp <= 128 else (32 if kp <= 256 else 16)  # state registers: kp * BV <= 8192 fp32
        self.bv_max, self.vp = bv_max, vp
        self.BV_s = min(TUNE.get("BV_state") or bv_max, vp)
        # Parallel kernels loop over K and V in blocks of BK / BV.
        self.BK = min(TUNE.get("BK") or 64, kp)
        self.BV = min(TUNE.get("BV") or 64, vp)
        self.warps_s = TUNE.get("warps_state") or (4 if kp * self.BV_s <= 8192 else 8)
        # Loads of the next chunk are software-pipelined; deeper where the tiles leave shared memory room.
        tile_bytes = chunk_size * kp * item * 3
        self.stages_s = TUNE.get("stages_state") or (3 if tile_bytes * 3 <= 200 * 1024 else 2)
        if self.varlen:
            cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
            self.N = cu.numel() - 1
            lens = cu[1:] - cu[:-1]
            nch = (lens + chunk_size - 1) // chunk_size
            ends = torch.cumsum(nch, 0)
            offs = ends - nch
            # Upper bound on the number of chunks that needs no host sync; surplus programs are masked off.
            self.G = T // chunk_size + self.N
            gid = torch.arange(self.G, device=q.device, dtype=torch.int32)
            seq = torch.searchsorted(ends, gid, right=True).clamp_(max=self.N - 1).to(torch.int32)
            local = gid - offs[seq]
            self.cu = cu
            self.chunk_offsets = offs.to(torch.int32).contiguous()
            self.chunk_indices = torch.stack([seq, local], 1).to(torch.int32).contiguous()
            self.grid_chunks = (self.G, H)
        else:
            self.N = B
            nt = triton.cdiv(T, chunk_size)
            self.G = B * nt
            self.cu = self.chunk_offsets = self.chunk_indices = None
            self.grid_chunks = (nt, B * H)
        # Autotuning key for the sequential kernels: how many (sequence, head) programs there are.
        self.NHB = min(_pow2(self.N * H), 1024)
        fused = TUNE.get("fused_output")
        if fused is None:
            # Folding the output into the sequential kernel saves storing and re-reading the chunk states;
            # a separate parallel kernel wins when very few (sequence, head) programs run (measured, H100).
            fused = self.N * H >= 32
        self.fused = fused

    def common(self):
        return dict(H=self.H, K=self.K, V=self.V, BT=self.BT, IS_VARLEN=self.varlen, PREC=self.prec)

    def fixed_bv_state(self, wide: bool) -> int:
        """BV of a sequential kernel when not autotuned: the H200 autotuner's picks (2026-12-02,
        results/bench/kernels_h200_autotuned_run5.json and kernels_h200_run8_*.json).  At K <= 64 half the widest
        block, i.e. twice the programs, except for the forward with the output fused in and the state backward
        (`wide`) at >= 256 sequence x head programs, where the SMs are busy anyway, and a quarter of it at
        <= 32 programs (one long sequence), where short per-chunk steps on more SMs win.  At K = 128 half."""
        if TUNE.get("BV_state") or self.kp > 128:
            return self.BV_s
        if self.kp > 64:
            return max(16, self.BV_s // 2)
        if self.NHB <= 32:
            return max(16, self.BV_s // 4)
        return self.BV_s if (wide and self.NHB >= 256) else max(16, self.BV_s // 2)

    def fixed_stages_state(self) -> int:
        """Pipelining depth of a sequential kernel when not autotuned: 4 at K <= 64 with <= 32 programs (the
        H200 autotuner's pick there, run 8), else as many as the tiles leave room for (stages_s)."""
        if TUNE.get("stages_state") or self.kp > 64 or self.NHB > 32:
            return self.stages_s
        return 4

    def run_seq(self, kernel, args, flags, key_flags, wide=False):
        """A chunk-sequential kernel, grid (V blocks, sequences x heads)."""
        nh = self.N * self.H

        def grid(meta):
            return (triton.cdiv(self.V, meta["BV"]), nh)
        kwargs = dict(self.common(), BK=self.BK_s, NKB=self.NKB, **flags)
        configs = None
        if self.autotune:
            # With few sequence x head programs (one long sequence) a quarter-width block puts more programs on the
            # SMs, each with a shorter per-chunk step: a candidate there.
            widths = (self.bv_max // 4, self.bv_max // 2, self.bv_max) if nh <= 32 else (self.bv_max // 2, self.bv_max)
            options = sorted({min(b, self.vp) for b in widths if b >= 16})
            configs = [triton.Config(dict(BV=bv), num_warps=4 if self.BK_s * self.NKB * bv <= 8192 else 8,
                                     num_stages=st) for bv in options for st in (2, 3, 4)]
        _launch(kernel, grid, args, kwargs, configs, ("K", "V", "BT", "NHB") + tuple(key_flags),
                dict(BV=self.fixed_bv_state(wide), num_warps=self.warps_s, num_stages=self.fixed_stages_state()))

    def run_par(self, kernel, args, extra, key_flags=(), nsplit=None, pairs=((2, 2), (4, 2), (4, 3), (8, 2)),
                plain=(4, 2)):
        """A chunk-parallel kernel, grid (chunks, heads[, nsplit]); `plain`: (num_warps, num_stages) when not
        autotuned (TUNE["warps"] overrides the warps)."""
        grid_c = self.grid_chunks if nsplit is None else self.grid_chunks + (nsplit,)
        kwargs = dict(self.common(), BK=self.BK, BV=self.BV, **extra)
        warps = TUNE.get("warps") or plain[0]
        _launch(kernel, lambda meta: grid_c, args, kwargs, _cfgs(pairs) if self.autotune else None,
                ("K", "V", "BT") + tuple(key_flags), dict(num_warps=warps, num_stages=plain[1]))


def _wy_fwd(p: _Plan, k, v, beta, store_linv):
    w = torch.empty_like(k)
    u = torch.empty_like(v)
    linv = k.new_empty(p.B, p.T, p.H, p.BT) if store_linv else w
    # One warp: the 16x16 substitutions and block merges pay for every cross-warp reduction (the H200 autotuner's
    # pick; at 4 warps the whole forward ran 2.6x slower there).
    p.run_par(_wy_fwd_kernel, (k, v, beta, w, u, linv, p.cu, p.chunk_indices, p.T), dict(STORE_LINV=store_linv),
              key_flags=("STORE_LINV",), pairs=((1, 1), (2, 1), (4, 1)), plain=(1, 1))
    return w, u, linv


def _state_fwd(p: _Plan, q, k, w, u, scale, h0, want_ht, store_h, write_o, is_delta):
    o = torch.empty_like(u) if write_o else None
    h = k.new_empty(p.G, p.H, p.K, p.V) if store_h else None
    vnew = torch.empty_like(u) if (store_h and is_delta) else None
    ht = q.new_empty(p.N, p.H, p.K, p.V, dtype=torch.float32) if want_ht else None
    dummy = u
    args = (q, k, w if is_delta else dummy, u, o if write_o else dummy, h if store_h else dummy,
            vnew if vnew is not None else dummy, h0 if h0 is not None else dummy, ht if want_ht else dummy,
            p.cu, p.chunk_offsets, p.T, scale, p.NHB)
    flags = dict(IS_DELTA=is_delta, USE_H0=h0 is not None, STORE_HT=want_ht, STORE_H=store_h,
                 STORE_VNEW=vnew is not None, WRITE_O=write_o)
    p.run_seq(_state_fwd_kernel, args, flags, ("IS_DELTA", "WRITE_O", "STORE_H"), wide=write_o)
    return o, h, (vnew if is_delta else u), ht


def _forward(p: _Plan, q, k, v, beta, scale, h0, want_ht, is_delta, keep_linv=False):
    """Returns o, the final state (or None) and L^-1 when keep_linv (the backward then skips the inversion)."""
    linv = None
    if is_delta:
        w, u, linv = _wy_fwd(p, k, v, beta, store_linv=keep_linv)
        linv = linv if keep_linv else None
    else:
        w, u = None, v
    if p.fused:
        o, _, _, ht = _state_fwd(p, q, k, w, u, scale, h0, want_ht, store_h=False, write_o=True,
                                 is_delta=is_delta)
        return o, ht, linv
    _, h, vnew, ht = _state_fwd(p, q, k, w, u, scale, h0, want_ht, store_h=True, write_o=False,
                               is_delta=is_delta)
    o = torch.empty_like(v)
    p.run_par(_output_kernel, (q, k, vnew, h, o, p.cu, p.chunk_indices, p.T, scale), {}, plain=(8, 2),
              nsplit=triton.cdiv(p.V, p.BV))
    return o, ht, linv


def _wu(p: _Plan, k, v, beta, linv):
    """W and U again from the L^-1 the forward kept."""
    w, u = torch.empty_like(k), torch.empty_like(v)
    p.run_par(_wu_from_linv_kernel, (k, v, beta, linv, w, u, p.cu, p.chunk_indices, p.T), {})
    return w, u


def _backward(p: _Plan, q, k, v, beta, scale, h0, do, dht, is_delta, linv=None):
    if is_delta and linv is None:
        w, u, linv = _wy_fwd(p, k, v, beta, store_linv=True)
    elif is_delta:
        w, u = _wu(p, k, v, beta, linv)
    else:
        w, u, linv = None, v, None
    _, h, vnew, _ = _state_fwd(p, q, k, w, u, scale, h0, False, store_h=True, write_o=False,
                               is_delta=is_delta)
    dh = torch.empty_like(h)
    dvnew = torch.empty_like(v)
    dh0 = torch.empty_like(h0, dtype=torch.float32) if h0 is not None else None
    args = (q, k, w if is_delta else q, do, dh, dvnew, dht if dht is not None else do,
            dh0 if dh0 is not None else do, p.cu, p.chunk_offsets, p.T, scale, p.NHB)
    flags = dict(IS_DELTA=is_delta, USE_DHT=dht is not None, STORE_DH0=dh0 is not None)
    p.run_seq(_state_bwd_kernel, args, flags, ("IS_DELTA",), wide=True)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k, dtype=torch.float32) if is_delta else torch.empty_like(k)
    dw = torch.empty_like(k) if is_delta else dk
    p.run_par(_dqk_kernel, (q, k, vnew, h, do, dh, dvnew, dq, dk, dw, p.cu, p.chunk_indices, p.T, scale),
              dict(IS_DELTA=is_delta), key_flags=("IS_DELTA",), nsplit=triton.cdiv(p.K, p.BK))
    if not is_delta:
        return dq, dk, dvnew, None, dh0
    dk_out = torch.empty_like(k)
    dv = torch.empty_like(v)
    dbeta = torch.empty_like(beta)
    p.run_par(_wy_bwd_kernel, (k, v, beta, linv, dw, dvnew, dk, dk_out, dv, dbeta, p.cu, p.chunk_indices, p.T),
              {})
    return dq, dk_out, dv, dbeta, dh0


class _ChunkRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, scale, h0, output_final_state, cu_seqlens, chunk_size, is_delta):
        p = _Plan(q, v, cu_seqlens, chunk_size)
        o, ht, linv = _forward(p, q, k, v, beta, scale, h0, output_final_state, is_delta,
                               keep_linv=is_delta and any(ctx.needs_input_grad))
        ctx.save_for_backward(q, k, v, beta, h0, cu_seqlens, linv)
        ctx.scale, ctx.chunk_size, ctx.is_delta = scale, chunk_size, is_delta
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, h0, cu_seqlens, linv = ctx.saved_tensors
        p = _Plan(q, v, cu_seqlens, ctx.chunk_size)
        dht = dht.float().contiguous() if dht is not None else None
        dq, dk, dv, dbeta, dh0 = _backward(p, q, k, v, beta, ctx.scale, h0, do.contiguous(), dht,
                                           ctx.is_delta, linv)
        if dh0 is not None:
            dh0 = dh0.to(h0.dtype)
        return dq, dk, dv, dbeta, None, dh0, None, None, None, None


def _recurrent(q, k, v, beta, scale, h0, want_ht, cu_seqlens, is_delta):
    B, T, H, K = q.shape
    V = v.shape[-1]
    varlen = cu_seqlens is not None
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32) if varlen else None
    N = cu.numel() - 1 if varlen else B
    bkf = max(16, _pow2(K))
    bv = min(max(16, _pow2(V)), 64 if bkf <= 128 else (32 if bkf <= 256 else 16))
    o = torch.empty_like(v)
    ht = q.new_empty(N, H, K, V, dtype=torch.float32) if want_ht else None
    grid = (triton.cdiv(V, bv), N * H)
    _recurrent_fwd_kernel[grid](q, k, v, beta if is_delta else v, o, h0 if h0 is not None else o,
                                ht if want_ht else o, cu, T, scale, H=H, K=K, V=V, BKF=bkf, BV=bv,
                                IS_DELTA=is_delta, IS_VARLEN=varlen, USE_H0=h0 is not None,
                                STORE_HT=want_ht, num_warps=4 if bkf * bv <= 8192 else 8)
    return o, ht


def _check(q, k, v, beta, initial_state, cu_seqlens, chunk_size, is_delta):
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must be [B,T,H,K] and v [B,T,H,V]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if v.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"v.dtype must be float32, float16 or bfloat16 for the triton backend, got {v.dtype}")
    if K > MAX_K or V > MAX_V:
        raise ValueError(f"triton backend supports K <= {MAX_K} and V <= {MAX_V}; got K={K}, V={V}")
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"chunk_size must be 16, 32 or 64 for the triton backend, got {chunk_size}")
    if is_delta and (beta is None or beta.shape != q.shape[:3]):
        raise ValueError(f"beta must be [B,T,H] = {tuple(q.shape[:3])}, got "
                         f"{None if beta is None else tuple(beta.shape)}")
    N = packed_sequence_count(B, cu_seqlens)
    if initial_state is not None and tuple(initial_state.shape) != (N, H, K, V):
        raise ValueError(f"initial_state must be [N,H,K,V] = {(N, H, K, V)}, got {tuple(initial_state.shape)}")


def _run(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size, is_delta):
    _check(q, k, v, beta, initial_state, cu_seqlens, chunk_size, is_delta)
    if q.shape[0] * q.shape[1] == 0:  # nothing to run: states pass through
        B, T, H, K = q.shape
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        ht = None
        if output_final_state:
            ht = (initial_state.float().clone() if initial_state is not None
                  else q.new_zeros(N, H, K, v.shape[-1], dtype=torch.float32))
        return v.new_zeros(v.shape), ht
    dt = v.dtype
    q, k, v = q.to(dt).contiguous(), k.to(dt).contiguous(), v.contiguous()
    beta = beta.contiguous() if is_delta else None
    h0 = initial_state.contiguous() if initial_state is not None else None
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, beta, initial_state))
    if torch.compiler.is_compiling():  # one opaque operator in the graph (ops_triton_compile.py)
        from .ops_triton_compile import rule_op

        return rule_op(q, k, v, beta, scale, h0, output_final_state, cu_seqlens, chunk_size, is_delta, needs_grad)
    n_seq = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    max_len = TUNE.get("recurrent_max_len", 16)
    if not needs_grad and q.shape[0] * q.shape[1] <= max_len * max(n_seq, 1):
        return _recurrent(q, k, v, beta, scale, h0, output_final_state, cu_seqlens, is_delta)
    return _ChunkRule.apply(q, k, v, beta, scale, h0, output_final_state, cu_seqlens, chunk_size, is_delta)


def delta_rule_triton(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                      cu_seqlens=None, chunk_size=64):
    """Delta rule (S_t = S_{t-1} + k_t beta_t (v_t - S_{t-1}^T k_t)^T, o_t = scale S_t^T q_t) in Triton.

    Chunkwise kernels with a hand-written backward; a token-by-token kernel when no gradient is needed and
    sequences are short (decoding).  Returns (o [B,T,H,V] in v.dtype, final state [N,H,K,V] fp32 or None)."""
    return _run(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size, True)


def sum_rule_triton(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                    chunk_size=64):
    """Sum rule / linear attention (S_t = S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t) in Triton."""
    return _run(q, k, v, None, scale, initial_state, output_final_state, cu_seqlens, chunk_size, False)
