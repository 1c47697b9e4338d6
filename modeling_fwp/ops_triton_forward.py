"""The chunkwise forward of the Triton delta rule and sum rule (WY/UT form, Yang et al. 2024).

Per chunk of C tokens (rows of Q, K, V; S0 = state entering the chunk):
    A  = tril(diag(beta) K K^T, -1),  L^-1 = (I + A)^-1,  T = L^-1 diag(beta)
    W  = T K,  U = T V                       (_wy_fwd_kernel: parallel over chunks)
    U~ = U - W S0                            (the pseudo-values given the incoming state)
    O  = scale (Q S0 + tril(Q K^T) U~),  S1 = S0 + K^T U~   (_state_fwd_kernel: sequential over chunks)
The sum rule is the same with U~ = V (no W). The output is computed inside the sequential kernel, or, when few
(sequence, head) programs run, by the chunk-parallel `_output_kernel` from stored chunk states. `_forward` runs
them; the backward (`ops_triton_backward.py`) reuses `_wy_fwd` and `_state_fwd` to recompute what it needs.

Names with a leading underscore are private to the ops_triton_* files. This module raises ImportError without
triton.
"""
from __future__ import annotations

import torch

try:  # guarded, so transformers' import check of a Hub folder does not demand triton from CPU users
    import triton
    import triton.language as tl
except ImportError as error:  # ops.py treats this as "no triton backend"
    raise ImportError(f"modeling_fwp.ops_triton_forward needs triton: {error}") from error

from .ops_triton_launch import _Plan
from .ops_triton_tiles import _chunk_of_program, _ld_state, _ld_tok, _seq_of_program, _st_state_blocks, _st_tok


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
