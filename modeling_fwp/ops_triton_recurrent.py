"""The token-by-token Triton kernel of the delta rule and sum rule: decoding, a few tokens per call, no gradient.

One program per (sequence, head, V block) walks the tokens with its [K, BV] state in fp32 registers, in one launch
instead of the chunkwise path's several. `_token_by_token` is the pick between the two, which `ops_triton._run` and
the compiled operator (`ops_triton_compile.py`) share.

Names with a leading underscore are private to the ops_triton_* files. This module raises ImportError without
triton.
"""
from __future__ import annotations

import torch

try:  # guarded, so transformers' import check of a Hub folder does not demand triton from CPU users
    import triton
    import triton.language as tl
except ImportError as error:  # ops.py treats this as "no triton backend"
    raise ImportError(f"modeling_fwp.ops_triton_recurrent needs triton: {error}") from error

from .ops_triton_launch import TUNE, _pow2
from .ops_triton_tiles import _ld_state, _seq_of_program, _st_state


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



def _token_by_token(q, cu_seqlens) -> bool:
    """Whether a call without gradient runs `_recurrent` rather than the chunk kernels: sequences of at most
    TUNE["recurrent_max_len"] (16) tokens on average."""
    n_seq = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    max_len = TUNE.get("recurrent_max_len", 16)
    return q.shape[0] * q.shape[1] <= max_len * max(n_seq, 1)


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
