"""Triton kernels for the short causal depthwise convolution (+ SiLU) that precedes the fast weight layer.

Public entry point:

    y, new_tail = short_conv_triton(x, weight, cu_seqlens=None, tail=None, activation="silu")

Reference: ``ShortConvolution.forward`` in ``modeling_fwp.py`` (its PyTorch path: F.conv1d over a copy of
the input with every sequence's tail concatenated in front).  Same semantics, without those copies and
without cuDNN's slow depthwise backward:

    y[s, c] = act(sum_j w[c, j] * src(s - (K-1) + j, c)),   j = 0 .. K-1

where a source position before the start of s's sequence reads that sequence's tail (the K-1 inputs that
preceded it, from the cache; zeros without one) and never another sequence's tokens.  new_tail holds each
sequence's last K-1 inputs (taken partly from the old tail when the sequence is shorter than K-1).

Layouts: x [B,T,C] with one sequence per row and tail [B,K-1,C]; or packed, B == 1 and cu_seqlens [N+1]
(empty sequences allowed) with tail [N,K-1,C].  x may be a view with unit channel stride and evenly spaced
token rows (a channel slice of a wider tensor, such as one joint projection's output), which is read in place.
Each kernel program owns a tile of (tokens, channels) of the flattened [B*T, C] input; a tile may straddle
sequences, so every row looks up its own sequence.

Backward (hand-written, recomputes the pre-activation instead of saving it):
    dpre[r] = dy[r] * act'(pre[r]),   dx[s] = sum_j w[j] * dpre[s + (K-1) - j]  (same sequence only),
    dw[j]   = sum_r dpre[r] * src(r - (K-1) + j).
A backward tile loads the 2K-1 shifted source tiles once and rebuilds pre at rows s .. s+K-1 from them;
dw goes through a per-tile fp32 partial buffer summed with torch (deterministic, no atomics).

Everything also runs under TRITON_INTERPRET=1 on CPU (that is how CI tests it).  Unlike ops_triton, this
module imports without triton (HAS_TRITON is then False and short_conv_triton raises ImportError).
"""
from __future__ import annotations

import os

import torch

from .ops_common import packed_sequence_count

try:  # guarded, so the model file and transformers' import check of a Hub folder work without triton
    import triton
    import triton.language as tl

    HAS_TRITON = True
    _TRITON_IMPORT_ERROR = None
except ImportError as error:  # the model falls back to ShortConvolution's PyTorch path
    triton = tl = None
    HAS_TRITON = False
    _TRITON_IMPORT_ERROR = repr(error)

__all__ = ["HAS_TRITON", "short_conv_triton"]

# Block-size overrides, for tests (to reach the multi-tile code paths at tiny shapes) and benchmarks.
# Keys: "BT", "BC", "warps" (forward), "BT_bwd", "BC_bwd", "warps_bwd", "tiles_bwd" (token tiles per
# backward program, whose dw is summed in registers before its partial row is written).
TUNE: dict = {}

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_ACTIVATIONS = ("silu", None)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


if HAS_TRITON:

    @triton.jit
    def _row_seq(seq_ids, cu_seqlens, rows, mrow, T, IS_VARLEN: tl.constexpr):
        """(sequence index, first row, one past the last row) of each flattened token row."""
        if IS_VARLEN:
            seq = tl.load(seq_ids + rows, mask=mrow, other=0)
            bos = tl.load(cu_seqlens + seq, mask=mrow, other=0)
            eos = tl.load(cu_seqlens + seq + 1, mask=mrow, other=0)
        else:
            seq = rows // T
            bos = seq * T
            eos = bos + T
        return seq, bos, eos

    @triton.jit
    def _src(x, tail, rows, mrow, seq, bos, eos, cols, mcol, C, SX, m, near_start,
             K: tl.constexpr, HAS_TAIL: tl.constexpr, ACC: tl.constexpr):
        """Source tile for shift m: row s reads position s - (K-1) + m of its own sequence, or before the
        sequence's start its tail (index s - bos + m), or 0 without a tail.  The tail load runs only in
        tiles that hold a sequence's first K-1 rows (near_start), so other tiles issue one load."""
        rel = rows - bos + (m - (K - 1))  # source position relative to the sequence start
        src = rows + (m - (K - 1))
        in_x = mrow & (rel >= 0) & (src < eos)  # src >= eos only feeds rows that are masked later
        v = tl.load(x + src.to(tl.int64)[:, None] * SX + cols[None, :], mask=in_x[:, None] & mcol[None, :],
                    other=0.0).to(ACC)
        if HAS_TAIL:
            if near_start:
                in_tail = mrow & (rel < 0)
                toffs = (seq.to(tl.int64) * (K - 1) + (rel + (K - 1)))[:, None] * C + cols[None, :]
                v += tl.load(tail + toffs, mask=in_tail[:, None] & mcol[None, :], other=0.0).to(ACC)
        return v

    @triton.jit
    def _conv_fwd_kernel(x, w, tail, y, seq_ids, cu_seqlens, R, T, C, SX,
                         K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr,
                         SILU: tl.constexpr, HAS_TAIL: tl.constexpr, IS_VARLEN: tl.constexpr):
        """One pass over x: a (BT tokens, BC channels) tile of y from K shifted loads (cache hits)."""
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        mrow, mcol = rows < R, cols < C
        seq, bos, eos = _row_seq(seq_ids, cu_seqlens, rows, mrow, T, IS_VARLEN)
        near_start = tl.min(tl.where(mrow, rows - bos, K)) < K - 1  # some row reads the tail
        acc = tl.zeros([BT, BC], dtype=ACC)
        for j in tl.static_range(K):
            wj = tl.load(w + cols * K + j, mask=mcol, other=0.0).to(ACC)
            v = _src(x, tail, rows, mrow, seq, bos, eos, cols, mcol, C, SX, j, near_start, K, HAS_TAIL, ACC)
            acc += wj[None, :] * v
        if SILU:
            acc = acc * tl.sigmoid(acc)
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        tl.store(y + offs, acc.to(y.dtype.element_ty), mask=mrow[:, None] & mcol[None, :])

    @triton.jit
    def _conv_bwd_kernel(x, w, tail, dy, dx, dw_part, seq_ids, cu_seqlens, R, T, C, SX,
                         K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                         TILES: tl.constexpr, ACC: tl.constexpr, SILU: tl.constexpr, HAS_TAIL: tl.constexpr,
                         IS_VARLEN: tl.constexpr):
        """dx for TILES consecutive (BT, BC) tiles and their summed dw (one fp32 partial row per program).

        Rows s + d (d < K) of s's own sequence need dpre, so pre is rebuilt there from the source tiles of
        shifts m = d + j in [0, 2K-2], each loaded once: for rows of s's sequence the source of (s + d, j)
        is the source of (s, d + j).  pre at rows s + d is complete after shift d + K - 1, so it is used
        and dropped at once (fewer live registers)."""
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        mcol = cols < C
        ws = ()
        for j in tl.static_range(K):
            ws = ws + (tl.load(w + cols * K + j, mask=mcol, other=0.0).to(ACC)[None, :],)
        jdx = tl.arange(0, KP)[:, None]
        dw = tl.zeros([KP, BC], dtype=ACC)
        for i in range(TILES):
            rows = (tl.program_id(0) * TILES + i) * BT + tl.arange(0, BT)
            mrow = rows < R
            seq, bos, eos = _row_seq(seq_ids, cu_seqlens, rows, mrow, T, IS_VARLEN)
            near_start = tl.min(tl.where(mrow, rows - bos, K)) < K - 1  # some row reads the tail
            srcs = ()  # sources of the rows s themselves (shifts 0 .. K-1), for dw
            pres = ()  # pres[d]: pre at rows s + d, accumulated over the shifts
            for d in tl.static_range(K):
                pres = pres + (tl.zeros([BT, BC], dtype=ACC),)
            dxa = tl.zeros([BT, BC], dtype=ACC)
            for m in tl.static_range(2 * K - 1):
                v = _src(x, tail, rows, mrow, seq, bos, eos, cols, mcol, C, SX, m, near_start, K, HAS_TAIL, ACC)
                if m < K:
                    srcs = srcs + (v,)
                new_pres = ()
                for d in tl.static_range(K):
                    if m - d >= 0 and m - d < K:
                        new_pres = new_pres + (pres[d] + ws[m - d] * v,)
                    else:
                        new_pres = new_pres + (pres[d],)
                pres = new_pres
                if m >= K - 1:  # pre at rows s + d (d = m - K + 1) is complete: dpre there, its dx (and dw) terms
                    r = rows + (m - (K - 1))
                    ok = mrow & (r < eos)  # only rows of s's own sequence feed dx[s]
                    g = tl.load(dy + r.to(tl.int64)[:, None] * C + cols[None, :],
                                mask=ok[:, None] & mcol[None, :], other=0.0).to(ACC)
                    if SILU:
                        p = pres[m - (K - 1)]
                        sg = tl.sigmoid(p)
                        g = g * sg * (1.0 + p * (1.0 - sg))
                    dxa += ws[2 * (K - 1) - m] * g
                    if m == K - 1:
                        for j in tl.static_range(K):
                            dw += tl.where(jdx == j, tl.sum(g * srcs[j], axis=0)[None, :], 0.0)
            tl.store(dx + rows.to(tl.int64)[:, None] * C + cols[None, :], dxa.to(dx.dtype.element_ty),
                     mask=mrow[:, None] & mcol[None, :])
        offs = (tl.program_id(0).to(tl.int64) * K + jdx) * C + cols[None, :]
        tl.store(dw_part + offs, dw.to(dw_part.dtype.element_ty), mask=(jdx < K) & mcol[None, :])

    @triton.jit
    def _new_tail_kernel(x, tail, new_tail, cu_seqlens, T, C, SX,
                         K: tl.constexpr, KP: tl.constexpr, BC: tl.constexpr,
                         HAS_TAIL: tl.constexpr, IS_VARLEN: tl.constexpr):
        """new_tail[n, i] = input at position len - (K-1) + i of sequence n (its old tail before its start)."""
        n = tl.program_id(0)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        mcol = cols < C
        if IS_VARLEN:
            bos = tl.load(cu_seqlens + n).to(tl.int64)
            length = tl.load(cu_seqlens + n + 1).to(tl.int64) - bos
        else:
            bos = n.to(tl.int64) * T
            length = T + 0 * bos
        i = tl.arange(0, KP)
        mi = i < K - 1
        rel = length - (K - 1) + i
        in_x = mi & (rel >= 0)
        v = tl.load(x + (bos + rel)[:, None] * SX + cols[None, :], mask=in_x[:, None] & mcol[None, :], other=0.0)
        v = v.to(new_tail.dtype.element_ty)
        toffs = (n.to(tl.int64) * (K - 1) + i)
        if HAS_TAIL:
            in_tail = mi & (rel < 0)
            old = tl.load(tail + (toffs + length)[:, None] * C + cols[None, :],
                          mask=in_tail[:, None] & mcol[None, :], other=0.0)
            v += old.to(new_tail.dtype.element_ty)
        tl.store(new_tail + toffs[:, None] * C + cols[None, :], v, mask=mi[:, None] & mcol[None, :])


def _acc_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _layout(x, cu_seqlens):
    """(seq_ids int32 [T] or None, cu int32 [N+1] or None, N).  No host sync: searchsorted puts token r in
    the first sequence whose end exceeds r, which skips empty sequences."""
    if cu_seqlens is None:
        return None, None, x.shape[0]
    cu = cu_seqlens.to(device=x.device, dtype=torch.int32).contiguous()
    n = cu.numel() - 1
    rows = torch.arange(x.shape[1], device=x.device, dtype=torch.int32)
    seq_ids = torch.searchsorted(cu[1:], rows, right=True, out_int32=True).clamp_max_(max(n - 1, 0))
    return seq_ids, cu, n


def _check(x, weight, cu_seqlens, tail, activation):
    if not HAS_TRITON:
        raise ImportError(f"modeling_fwp.conv_triton needs triton: {_TRITON_IMPORT_ERROR}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    if x.dim() != 3:
        raise ValueError(f"x must be [B,T,C], got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x.dtype must be one of {_DTYPES}, got {x.dtype}")
    if x.dtype == torch.float64 and not _INTERPRET:
        raise ValueError("float64 runs only under TRITON_INTERPRET=1 (tests)")
    if not x.is_cuda and not _INTERPRET:
        raise ValueError("short_conv_triton needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    B, T, C = x.shape
    if weight.dim() != 2 or weight.shape[0] != C or weight.shape[1] < 2:
        raise ValueError(f"weight must be [C, K] with C={C} and K >= 2, got {tuple(weight.shape)}")
    if weight.dtype not in (torch.float32, x.dtype):
        raise ValueError(f"weight.dtype must be float32 or x.dtype ({x.dtype}), got {weight.dtype}")
    K = weight.shape[1]
    N = packed_sequence_count(B, cu_seqlens)
    if tail is not None:
        if tuple(tail.shape) != (N, K - 1, C):
            raise ValueError(f"tail must be [N, K-1, C] = {(N, K - 1, C)}, got {tuple(tail.shape)}")
        if tail.requires_grad and torch.is_grad_enabled():
            raise ValueError("short_conv_triton gives no gradient for tail: pass tail.detach() (cached tails "
                             "carry no gradient)")


def _blocks(C, bwd):
    """(BT, BC, warps), from `scripts/bench/bench_conv.py --sweep` on an H200 (bf16, 16384 tokens, a 1024-channel
    slice of a 3088-wide input, K = 4; results/bench/conv_sweep_h200.json): the forward at BT 32, BC 256, 4 warps
    took 0.048 ms against 0.094 at the earlier 32 / 128 / 8 (35 other settings 0.057-0.79); the backward at
    BT 16, BC 128, 2 warps 0.44 ms forward+backward against 0.75 at the earlier 64 / 64 / 4 (an H100 sweep's pick,
    which had not tried 2 warps)."""
    suffix = "_bwd" if bwd else ""
    bt = TUNE.get("BT" + suffix, 16 if bwd else 32)
    bc = TUNE.get("BC" + suffix, min(128 if bwd else 256, max(16, triton.next_power_of_2(C))))
    warps = TUNE.get("warps" + suffix, 2 if bwd else 4)
    return bt, bc, warps


def _row_stride(x):
    """Elements between consecutive flattened [B*T] token rows of x (any value where there is one row)."""
    B, T, C = x.shape
    return x.stride(1) if T > 1 else (x.stride(0) if B > 1 else C)


def _rows_addressable(x):
    """Whether the kernels can read x in place: unit channel stride and evenly spaced token rows, as in a channel
    slice of a wider tensor, whose copy would cost a whole extra pass."""
    B, T, C = x.shape
    sx = _row_stride(x)
    return (C <= 1 or x.stride(2) == 1) and sx >= C and (B == 1 or T == 1 or x.stride(0) == T * sx)


def _new_tail(x, tail, cu, N, K):
    B, T, C = x.shape
    new_tail = x.new_empty(N, K - 1, C)
    if N == 0 or C == 0:
        return new_tail
    bc = min(128, max(16, triton.next_power_of_2(C)))
    grid = (N, triton.cdiv(C, bc))
    _new_tail_kernel[grid](x, tail if tail is not None else x, new_tail, cu, T, C, _row_stride(x), K=K,
                           KP=triton.next_power_of_2(K - 1), BC=bc, HAS_TAIL=tail is not None,
                           IS_VARLEN=cu is not None, num_warps=4)
    return new_tail


class _ShortConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, seq_ids, cu, tail, silu):
        B, T, C = x.shape
        K = weight.shape[1]
        R = B * T
        y = x.new_empty(B, T, C)
        if R > 0 and C > 0:
            bt, bc, warps = _blocks(C, bwd=False)
            grid = (triton.cdiv(R, bt), triton.cdiv(C, bc))
            _conv_fwd_kernel[grid](x, weight, tail if tail is not None else x, y, seq_ids, cu, R, T, C,
                                   _row_stride(x), K=K, BT=bt, BC=bc, ACC=_acc_dtype(x.dtype), SILU=silu,
                                   HAS_TAIL=tail is not None, IS_VARLEN=cu is not None, num_warps=warps)
        ctx.save_for_backward(x, weight, seq_ids, cu, tail)
        ctx.silu = silu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, seq_ids, cu, tail = ctx.saved_tensors
        B, T, C = x.shape
        K = weight.shape[1]
        R = B * T
        dy = dy.contiguous()
        dx = x.new_empty(B, T, C)
        if R == 0 or C == 0:
            return dx.zero_(), torch.zeros_like(weight), None, None, None, None
        bt, bc, warps = _blocks(C, bwd=True)
        tiles = TUNE.get("tiles_bwd", 1)  # tiles per program: more shrink the dw partial buffer, but ran slower
        n_prog = triton.cdiv(triton.cdiv(R, bt), tiles)
        acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
        dw_part = x.new_empty(n_prog, K, C, dtype=acc_t)
        _conv_bwd_kernel[(n_prog, triton.cdiv(C, bc))](
            x, weight, tail if tail is not None else x, dy, dx, dw_part, seq_ids, cu, R, T, C, _row_stride(x),
            K=K, KP=triton.next_power_of_2(K), BT=bt, BC=bc, TILES=tiles, ACC=_acc_dtype(x.dtype),
            SILU=ctx.silu, HAS_TAIL=tail is not None, IS_VARLEN=cu is not None, num_warps=warps)
        dw = dw_part.sum(0).t().to(weight.dtype).contiguous()
        return (dx if ctx.needs_input_grad[0] else None), (dw if ctx.needs_input_grad[1] else None), \
            None, None, None, None


def short_conv_triton(x, weight, cu_seqlens=None, tail=None, activation="silu"):
    """Causal depthwise convolution over time (+ SiLU) in Triton; drop-in for ShortConvolution.forward.

    x [B,T,C] (fp32/bf16/fp16; fp64 under the interpreter only); weight [C,K] fp32 or x.dtype; cu_seqlens
    int [N+1] with B == 1 for packed sequences; tail [N,K-1,C] (any float dtype, no gradient) or None.
    Arithmetic in fp32 (fp64 for fp64 inputs), the weight is not rounded to x.dtype.  Returns (y [B,T,C] in
    x.dtype, new_tail [N,K-1,C] in x.dtype, detached).  Gradients flow to x and weight (weight's dtype)."""
    _check(x, weight, cu_seqlens, tail, activation)
    K = weight.shape[1]
    x = x if _rows_addressable(x) else x.contiguous()
    weight = weight.contiguous()
    tail = tail.to(x.dtype).contiguous() if tail is not None else None  # as the reference: tail.to(x.dtype)
    seq_ids, cu, N = _layout(x, cu_seqlens)
    y = _ShortConv.apply(x, weight, seq_ids, cu, tail, activation == "silu")
    with torch.no_grad():
        new_tail = _new_tail(x, tail, cu, N, K)
    return y, new_tail
