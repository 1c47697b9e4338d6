"""Segmented state pass for few, long sequences (Triton): parallel along the sequence, not only across it.

ops_triton's sequential kernels walk every chunk of a sequence in one program per (sequence, head, V block).
One 32768-token sequence with 16 heads is then 16 x (V / BV) programs on 132 SMs, each walking 512 chunks,
and those passes are most of the op's time (BENCHMARKS.md, "H200, issue 15").  Over a segment of L chunks the
state map is affine, S_end = M S_enter + N, so the sequence is cut into segments that are treated as packed
sequences of their own:

  1. per segment, in parallel (ops_triton's state pass over the segment layout):  N = its end state from zero,
     and for the delta rule M = its end state from the identity with U = 0 (the product of the chunk
     transitions I - K^T W; the sum rule has M = I);
  2. per real sequence, sequentially over its segments (_segment_scan_kernel, fp32):  S_enter(j+1) =
     M_j S_enter(j) + N_j;
  3. ops_triton's forward over the segment layout with those entering states.
The backward is the same in reverse: the gradient of each segment's entering state with a zero gradient at its
end (parallel), the reverse scan dS_end(j) = dS_enter(j+1) = dS_direct(j+1) + M_{j+1}^T dS_end(j+1), then
ops_triton's backward over the segment layout with those end gradients.  The sequential chain is L + L + the
number of segments instead of the number of chunks.

Exact: every value is the two-matmul chunk form's; M and S_enter are fp32.  Opt-in (TUNE["segmented"] or
FWP_TRITON_SEGMENTED=1): on an H200 at one 32768-token sequence, H = 16, it took 3.4-4.2 ms forward+backward against
the default's 2.0 (BENCHMARKS.md, run 11).  Phases 1 and 3 cost about what the default's sequential passes do
(the M pass is a full K x K state pass), and phase 2, one program per head walking the segments with an fp32
K x K product each, adds 0.5-1 ms per call.  K <= 128 (M is one register block).
"""
from __future__ import annotations

import os

import torch

try:  # guarded like ops_triton's, so transformers' import check of a Hub folder does not demand triton
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError(f"modeling_fwp.ops_triton_segments needs triton: {error}") from error

from .ops_triton import (TUNE, _backward, _forward, _ld_state, _Plan, _st_state, _state_bwd_kernel, _state_fwd,
                         _state_offsets, _wu, _wy_fwd)

SEGMENT_CHUNKS = 32  # chunks per segment: 16 segments x 16 heads for one 32768-token sequence


def use_segments(B, T, H, K, cu_seqlens, chunk_size) -> bool:
    """Whether _run takes this path (opt-in; only where it can pay: few sequence x head programs)."""
    on = TUNE.get("segmented")
    if on is None:
        on = os.environ.get("FWP_TRITON_SEGMENTED") == "1"
    n = B if cu_seqlens is None else cu_seqlens.numel() - 1
    return bool(on) and K <= 128 and n * H < 32 and B * T > chunk_size * _segment_chunks()


def _segment_chunks() -> int:
    return int(TUNE.get("segment_chunks") or SEGMENT_CHUNKS)


@triton.jit
def _segment_scan_kernel(m, n, out, s0, s_last, seg_first, seg_count, H, K, V,
                         BK: tl.constexpr, BV: tl.constexpr, HAS_M: tl.constexpr, USE_S0: tl.constexpr,
                         STORE_LAST: tl.constexpr, REVERSE: tl.constexpr):
    """Per (real sequence, head, V block), over its segments j in order (REVERSE: backwards):
    out[j] = S, then S = M_j S + N_j (REVERSE: S = M_j^T S + N_j; HAS_M False: M = I).  fp32 throughout."""
    i_v = tl.program_id(0)
    i_n = tl.program_id(1) // H
    i_h = tl.program_id(1) % H
    v0 = i_v * BV
    first = tl.load(seg_first + i_n).to(tl.int32)
    count = tl.load(seg_count + i_n).to(tl.int32)
    s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_S0:
        s = _ld_state(s0, i_n, i_h, H, K, V, 0, v0, BK, BV)
    for jj in range(0, count):
        j = first + (count - 1 - jj if REVERSE else jj)
        _st_state(out, s, j, i_h, H, K, V, 0, v0, BK, BV)
        nj = _ld_state(n, j, i_h, H, K, V, 0, v0, BK, BV)
        if HAS_M:
            offs, mask = _state_offsets(j, i_h, H, K, K, 0, 0, BK, BK)
            mj = tl.load(m + offs, mask=mask, other=0.0)
            if REVERSE:
                mj = tl.trans(mj)
            s = tl.dot(mj, s, input_precision="ieee") + nj
        else:
            s = s + nj
    if STORE_LAST:
        _st_state(s_last, s, i_n, i_h, H, K, V, 0, v0, BK, BV)


class _Segments:
    """The segment layout: every real sequence cut into segments of `size` tokens (the last may be shorter),
    as packed-sequence boundaries cu [S+1] over the flattened tokens, with S an upper bound that needs no
    host sync (surplus segments are empty, at the end)."""

    def __init__(self, B, T, cu_seqlens, size, device):
        if cu_seqlens is None:
            cu = torch.arange(B + 1, device=device, dtype=torch.int64) * T
        else:
            cu = cu_seqlens.to(device=device, dtype=torch.int64)
        n = cu.numel() - 1
        total = B * T
        count = (cu[1:] - cu[:-1] + size - 1) // size
        ends = torch.cumsum(count, 0)
        first = ends - count
        self.S = total // size + n
        g = torch.arange(self.S, device=device, dtype=torch.int64)
        seq = torch.searchsorted(ends, g, right=True).clamp_(max=n - 1)
        starts = torch.where(g < ends[-1], cu[seq] + (g - first[seq]) * size, total)
        self.cu = torch.cat([starts, starts.new_full((1,), total)]).to(torch.int32)
        self.first = first.to(torch.int32)
        self.count = count.to(torch.int32)
        self.n = n


def _scan(p: _Plan, seg: _Segments, m, n, s0, reverse):
    """Phase 2 (forward) or its reverse: per segment the entering state (forward) or the gradient of its end
    state (reverse), and the last value (final state / gradient of the initial state), all fp32."""
    out = torch.zeros_like(n)  # surplus (empty) segments keep zeros
    last = n.new_empty(seg.n, p.H, p.K, p.V)
    # Narrow V blocks: a program holds all of M_j (K x K fp32) besides its S block, and at BV = 64 the fp32
    # dot spilled its registers (2.2 ms for 16 steps on an H200 instead of some microseconds).
    bv = min(TUNE.get("BV_scan") or 16, max(16, triton.next_power_of_2(p.V)))
    grid = (triton.cdiv(p.V, bv), seg.n * p.H)
    _segment_scan_kernel[grid](m if m is not None else n, n, out, s0 if s0 is not None else n, last,
                               seg.first, seg.count, p.H, p.K, p.V, BK=p.kp, BV=bv, HAS_M=m is not None,
                               USE_S0=s0 is not None, STORE_LAST=True, REVERSE=reverse,
                               num_warps=TUNE.get("warps_scan") or (4 if p.kp <= 64 else 8))
    return out, last


def _segment_maps(p: _Plan, q, k, w, u, is_delta, cu, chunk_size):
    """Phase 1: per segment N (end state from zero) and, for the delta rule, M (end state from I with U = 0)."""
    _, _, _, nmap = _state_fwd(p, q, k, w, u, 1.0, None, True, store_h=False, write_o=False, is_delta=is_delta)
    if not is_delta:
        return None, nmap
    pk = _Plan(q, k, cu, chunk_size)  # the same layout with V = K
    eye = torch.eye(p.K, device=q.device, dtype=torch.float32).expand(pk.N, p.H, p.K, p.K).contiguous()
    _, _, _, mmap = _state_fwd(pk, q, k, w, torch.zeros_like(k), 1.0, eye, True, store_h=False, write_o=False,
                               is_delta=True)
    return mmap, nmap


class _SegmentedRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, scale, h0, output_final_state, cu_seqlens, chunk_size, is_delta):
        B, T, H, K = q.shape
        seg = _Segments(B, T, cu_seqlens, chunk_size * _segment_chunks(), q.device)
        qf, kf, vf = (x.reshape(1, B * T, H, x.shape[-1]) for x in (q, k, v))
        bf = beta.reshape(1, B * T, H) if is_delta else None
        p = _Plan(qf, vf, seg.cu, chunk_size)
        keep = is_delta and any(ctx.needs_input_grad)
        w, u, linv = _wy_fwd(p, kf, vf, bf, store_linv=keep) if is_delta else (None, vf, None)
        mmap, nmap = _segment_maps(p, qf, kf, w, u, is_delta, seg.cu, chunk_size)
        s_enter, ht = _scan(p, seg, mmap, nmap, h0, reverse=False)
        o, _, _ = _forward(p, qf, kf, vf, bf, scale, s_enter, False, is_delta, keep_linv=keep,
                           wy=(w, u, linv if keep else None))
        ctx.save_for_backward(q, k, v, beta, h0, linv if keep else None, mmap, s_enter)
        ctx.scale, ctx.chunk_size, ctx.is_delta = scale, chunk_size, is_delta
        ctx.seg = seg  # the backward cuts the same segments (TUNE may have changed since): integer tensors only
        return o.reshape(v.shape), (ht if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, h0, linv, mmap, s_enter = ctx.saved_tensors
        B, T, H, K = q.shape
        is_delta = ctx.is_delta
        seg = ctx.seg
        qf, kf, vf = (x.reshape(1, B * T, H, x.shape[-1]) for x in (q, k, v))
        bf = beta.reshape(1, B * T, H) if is_delta else None
        dof = do.reshape(1, B * T, H, v.shape[-1]).contiguous()
        p = _Plan(qf, vf, seg.cu, ctx.chunk_size)
        w, u = _wu(p, kf, vf, bf, linv) if is_delta else (None, vf)
        # gradient of each segment's entering state from its own outputs alone (zero gradient at its end)
        direct = q.new_empty(seg.S, H, p.K, p.V, dtype=torch.float32)
        args = (qf, kf, w if is_delta else qf, dof, dof, dof, dof, direct, p.cu, p.chunk_offsets, p.T, ctx.scale,
                p.NHB)
        p.run_seq(_state_bwd_kernel, args, dict(IS_DELTA=is_delta, USE_DHT=False, STORE_DH0=True, STORE_DH=False),
                  ("IS_DELTA", "STORE_DH"), wide=True)
        dht = dht.float().contiguous() if dht is not None else None
        d_end, dh0 = _scan(p, seg, mmap, direct, dht, reverse=True)
        dq, dk, dv, dbeta, _ = _backward(p, qf, kf, vf, bf, ctx.scale, s_enter, dof, d_end, is_delta, linv,
                                         wu=(w, u) if is_delta else None)
        grads = [g.reshape(x.shape) if g is not None else None for g, x in ((dq, q), (dk, k), (dv, v))]
        dbeta = dbeta.reshape(beta.shape) if is_delta else None
        dh0 = dh0.to(h0.dtype) if h0 is not None else None
        return (*grads, dbeta, None, dh0, None, None, None, None)
