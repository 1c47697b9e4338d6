"""The chunkwise backward of the Triton delta rule and sum rule: it mirrors the forward (`ops_triton_forward.py`).

Recompute W, U (from the L^-1 the forward kept, or with the inversion again) and the chunk states, run the state
gradient backwards over the chunks (`_state_bwd_kernel`, sequential), then the per-chunk gradients of q and k
(`_dqk_kernel`) and, for the delta rule, the gradients through W, U and L^-1 into k, v and beta (`_wy_bwd_kernel`).

Names with a leading underscore are private to the ops_triton_* files. This module raises ImportError without
triton.
"""
from __future__ import annotations

import torch

try:  # guarded, so transformers' import check of a Hub folder does not demand triton from CPU users
    import triton
    import triton.language as tl
except ImportError as error:  # ops.py treats this as "no triton backend"
    raise ImportError(f"modeling_fwp.ops_triton_backward needs triton: {error}") from error

from .ops_triton_forward import _state_fwd, _wy_fwd
from .ops_triton_launch import _Plan
from .ops_triton_tiles import _chunk_of_program, _ld_state, _ld_tok, _seq_of_program, _st_state_blocks, _st_tok


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
