"""The Triton delta rule and sum rule (chunkwise WY/UT form, Yang et al. 2024): entry points, checks, kernel pick.

Public entry points (same arguments as ``ops.delta_rule`` / ``ops.sum_rule`` minus ``backend``):

    o, state = delta_rule_triton(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size)
    o, state = sum_rule_triton(q, k, v, scale, initial_state, output_final_state, cu_seqlens, chunk_size)

q, k [B,T,H,K]; v [B,T,H,V]; beta [B,T,H]; state [N,H,K,V] float32; o [B,T,H,V] in v.dtype.
Per head and step:  u_t = beta_t (v_t - S_{t-1}^T k_t),  S_t = S_{t-1} + k_t u_t^T,  o_t = scale S_t^T q_t.

Per chunk of C tokens (rows of Q, K, V; S0 = state entering the chunk):
    A  = tril(diag(beta) K K^T, -1),  L^-1 = (I + A)^-1,  T = L^-1 diag(beta)
    W  = T K,  U = T V                       (parallel over chunks)
    U~ = U - W S0                            (the pseudo-values given the incoming state)
    O  = scale (Q S0 + tril(Q K^T) U~),  S1 = S0 + K^T U~   (sequential over chunks)
The sum rule is the same with U~ = V (no W).  The backward mirrors it (see _ChunkRule.backward): recompute
W, U, L^-1 and the chunk states, run the state gradient backwards over chunks, then per-chunk gradients.
Kernels tile K into at most 4 register blocks (K <= 512) and V over the grid.  Everything also runs under
TRITON_INTERPRET=1 on CPU (that is how CI tests it).  This module raises ImportError without triton.

This file holds the entry points, their input checks, the pick between the kernels (`_run`) and the autograd
function of the chunkwise path (`_ChunkRule`). The kernels live beside it by family, each with its host code:
`ops_triton_forward.py` (the chunkwise forward), `ops_triton_backward.py` (its backward), `ops_triton_recurrent.py`
(token by token, for decoding); `ops_triton_tiles.py` holds their shared device helpers, `ops_triton_launch.py`
the block sizes, autotuning and `TUNE` overrides, and `ops_triton_compile.py` wraps the whole as custom operators
for torch.compile. The reference they are tested against is the float64 step-by-step loop of `ops.py`.
"""
from __future__ import annotations

import torch

from .ops_common import packed_sequence_count
from .ops_triton_backward import _backward
from .ops_triton_forward import _forward
from .ops_triton_launch import _Plan
from .ops_triton_recurrent import _recurrent, _token_by_token

__all__ = ["delta_rule_triton", "sum_rule_triton"]

MAX_K = 512
MAX_V = 512


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
    if not needs_grad and _token_by_token(q, cu_seqlens):
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
