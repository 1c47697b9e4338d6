"""The delta rule's chunk-state recursion as one matmul per chunk (Triton), for few (sequence, head) programs.

ops_triton's sequential kernel walks the chunks of one (sequence, head, V block) with two dependent matmuls
per chunk:  U~ = U - W S,  S <- S + K^T U~.  Written as a transition of the state,

    S <- S - P S + N,    P = K^T W  [K, K],   N = K^T U  [K, V]      (P, N: parallel over chunks, beforehand)

it is ONE dependent matmul per chunk.  When one long sequence gives only 16 (sequence, head) programs for 132
SMs, the sequential passes are latency-bound and that chain is their cost.  The backward is the same transition
transposed:  dS <- dS - P^T dS + G,  G = scale Q^T dO - W^T (scale tril(Q K^T)^T dO)  (parallel beforehand).
The state stays fp32 and is added to in fp32; P, like W in the two-matmul form, multiplies it in the
input dtype.  The outputs, U~ and dU~ then come from the stored chunk states in parallel kernels.

Kernels here: _transition_kernel (P, N), _transition_state_kernel (both directions), _transition_grad_kernel
(G, then dU~).  The output kernel, the per-chunk gradients and the WY kernels are ops_triton's.  The state is
one [BKF, BV] register block, so K <= 128 (ops_triton.transition_supported).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ops_triton import (_chunk_of_program, _ld_state, _ld_tok, _Plan, _seq_of_program, _st_state, _st_tok,
                         _state_offsets)


@triton.jit
def _transition_kernel(k, w, u, pm, nm, cu_seqlens, chunk_indices, T, H, K, V, BT: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    """P = K^T W and N = K^T U of one chunk (BK >= K: one block)."""
    i_h, t0, eos, g = _chunk_of_program(cu_seqlens, chunk_indices, tl.program_id(0), tl.program_id(1),
                                        T, H, BT, IS_VARLEN)
    if t0 < eos:  # surplus programs of a packed batch point at chunk 0 and must not write there
        rows = t0 + tl.arange(0, BT)
        mrow = rows < eos
        kt_t = tl.trans(_ld_tok(k, rows, mrow, i_h, H, K, 0, BK))
        _st_state(pm, tl.dot(kt_t, _ld_tok(w, rows, mrow, i_h, H, K, 0, BK), input_precision=PREC),
                  g, i_h, H, K, K, 0, 0, BK, BK)
        for i_v in range(0, tl.cdiv(V, BV)):
            _st_state(nm, tl.dot(kt_t, _ld_tok(u, rows, mrow, i_h, H, V, i_v * BV, BV), input_precision=PREC),
                      g, i_h, H, K, V, 0, i_v * BV, BK, BV)


@triton.jit
def _transition_state_kernel(pm, nm, h, h0, ht, cu_seqlens, chunk_offsets, T, NHB,
                             H, K, V, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                             IS_VARLEN: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
                             REVERSE: tl.constexpr, PREC: tl.constexpr):
    """Sequential over the chunks of one (sequence, head, V block).  Forward: store S as the chunk's
    entering state, then S += N - P S.  REVERSE (the backward, nm = G, h = dh, h0 = dS of the final state):
    store dS as the gradient of the state leaving the chunk, then dS += G - P^T dS."""
    i_v = tl.program_id(0)
    i_n, i_h, bos, eos, g0 = _seq_of_program(cu_seqlens, chunk_offsets, tl.program_id(1), T, H, BT, IS_VARLEN)
    dt = pm.dtype.element_ty
    v0 = i_v * BV
    s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        s = _ld_state(h0, i_n, i_h, H, K, V, 0, v0, BK, BV)
    nch = tl.cdiv(eos - bos, BT)
    for cc in range(0, nch):
        c = nch - 1 - cc if REVERSE else cc
        _st_state(h, s, g0 + c, i_h, H, K, V, 0, v0, BK, BV)
        offs, mask = _state_offsets(g0 + c, i_h, H, K, K, 0, 0, BK, BK)
        p = tl.load(pm + offs, mask=mask, other=0.0)
        if REVERSE:
            p = tl.trans(p)
        s += _ld_state(nm, g0 + c, i_h, H, K, V, 0, v0, BK, BV) - tl.dot(p, s.to(dt), input_precision=PREC)
    if STORE_HT:
        _st_state(ht, s, i_n, i_h, H, K, V, 0, v0, BK, BV)


@triton.jit
def _transition_grad_kernel(q, k, w, do, dh, gm, dvnew, cu_seqlens, chunk_indices, T, scale,
                            H, K, V, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                            IS_VARLEN: tl.constexpr, STAGE_G: tl.constexpr, PREC: tl.constexpr):
    """Per chunk and V block, with X = scale tril(Q K^T)^T dO:  STAGE_G: G = scale Q^T dO - W^T X (before the
    reverse state pass);  else dU~ = X + K dS1 (after it; dS1 = gradient of the state leaving the chunk)."""
    i_v = tl.program_id(2)
    i_h, t0, eos, g = _chunk_of_program(cu_seqlens, chunk_indices, tl.program_id(0), tl.program_id(1),
                                        T, H, BT, IS_VARLEN)
    dt = k.dtype.element_ty
    r = tl.arange(0, BT)
    rows = t0 + r
    mrow = rows < eos
    v0 = i_v * BV
    q_t = _ld_tok(q, rows, mrow, i_h, H, K, 0, BK)
    k_t = _ld_tok(k, rows, mrow, i_h, H, K, 0, BK)
    do_t = _ld_tok(do, rows, mrow, i_h, H, V, v0, BV)
    qk = tl.dot(q_t, tl.trans(k_t), input_precision=PREC)
    pt = tl.trans(tl.where(r[:, None] >= r[None, :], qk * scale, 0.0)).to(dt)
    x = tl.dot(pt, do_t, input_precision=PREC)
    if STAGE_G:
        if t0 < eos:  # surplus programs of a packed batch point at chunk 0 and must not write there
            w_t = _ld_tok(w, rows, mrow, i_h, H, K, 0, BK)
            gv = scale * tl.dot(tl.trans(q_t), do_t, input_precision=PREC)
            gv -= tl.dot(tl.trans(w_t), x.to(dt), input_precision=PREC)
            _st_state(gm, gv, g, i_h, H, K, V, 0, v0, BK, BV)
    else:
        x += tl.dot(k_t, _ld_state(dh, g, i_h, H, K, V, 0, v0, BK, BV).to(dt), input_precision=PREC)
        _st_tok(dvnew, x, rows, mrow, i_h, H, V, v0, BV)


def transition_products(p: _Plan, k, w, u):
    """P [G, H, K, K] in the input dtype and N [G, H, K, V] in fp32, one pair per chunk."""
    pm = k.new_empty(p.G, p.H, p.K, p.K)
    nm = k.new_empty(p.G, p.H, p.K, p.V, dtype=torch.float32)
    p.run_par(_transition_kernel, (k, w, u, pm, nm, p.cu, p.chunk_indices, p.T), dict(BK=p.kp), plain=(4, 2))
    return pm, nm


def transition_states(p: _Plan, pm, nm, s0, want_last, reverse):
    """The chunk states (forward) or state gradients (reverse) [G, H, K, V] in the input dtype, and the
    last one (final state / gradient of the initial state) in fp32 when want_last."""
    hs = pm.new_empty(p.G, p.H, p.K, p.V)
    last = nm.new_empty(p.N, p.H, p.K, p.V) if want_last else None
    args = (pm, nm, hs, s0 if s0 is not None else nm, last if want_last else nm, p.cu, p.chunk_offsets, p.T,
            p.NHB)
    flags = dict(USE_H0=s0 is not None, STORE_HT=want_last, REVERSE=reverse)
    p.run_seq(_transition_state_kernel, args, flags, ("REVERSE",), single_block=True)
    return hs, last


def transition_grads(p: _Plan, q, k, w, do, scale, pm, dht, want_dh0):
    """The reverse state pass and dU~: returns dh (gradient of each chunk's leaving state), dU~ and, when
    want_dh0, the gradient of the initial state (fp32)."""
    nsplit = triton.cdiv(p.V, p.BV)
    gm = q.new_empty(p.G, p.H, p.K, p.V, dtype=torch.float32)
    p.run_par(_transition_grad_kernel, (q, k, w, do, gm, gm, do, p.cu, p.chunk_indices, p.T, scale),
              dict(STAGE_G=True, BK=p.kp), key_flags=("STAGE_G",), nsplit=nsplit, plain=(4, 2))
    dh, dh0 = transition_states(p, pm, gm, dht, want_dh0, reverse=True)
    dvnew = torch.empty_like(do)
    p.run_par(_transition_grad_kernel, (q, k, w, do, dh, gm, dvnew, p.cu, p.chunk_indices, p.T, scale),
              dict(STAGE_G=False, BK=p.kp), key_flags=("STAGE_G",), nsplit=nsplit, plain=(4, 2))
    return dh, dvnew, dh0
