"""Fused Triton kernels (forward + hand-written backward) for the model's small memory-bound ops.

Why: in PyTorch each of these runs ~5 kernels forward and ~10 backward and autograd keeps several fp32
temporaries.  Here each is one kernel each way: the forward reads x once and writes y once, the backward
reads x and dy once and writes dx once, and only the inputs (plus one fp32 scalar per row for the norms)
are saved for backward (the L2 norm saves its output instead, which its consumer keeps anyway).

    rms_norm_triton(x, weight, eps, out_dtype=None)  reference: modeling_fwp.FWPRMSNorm.forward
        y = weight * (x * rsqrt(mean(x^2) + eps)) over the last dim, fp32 math, y in out_dtype (default x.dtype)
    l2_norm_triton(x, eps)                           reference: feature_maps.normalize_qk(x, "l2", eps)
        y = x * rsqrt(sum(x^2) + eps) over the last dim, fp32 math, y in x.dtype
    swiglu_triton(gate, up)                          reference: F.silu(gate) * up
        fp32 math, y in gate.dtype; the backward recomputes the sigmoid
    swiglu_linear_triton(gate, up, weight)           reference: F.linear(F.silu(gate) * up, weight)
        the same, then the down projection; silu(gate) * up is recomputed in the backward, not saved

Math is fp32 for fp16 / bf16 / fp32 inputs and fp64 for fp64 inputs.  Inputs must be CUDA tensors, or CPU
tensors under TRITON_INTERPRET=1 (that is how CI tests them).  Unlike ops_triton.py, this module imports
without triton (HAS_TRITON is then False and the functions raise ImportError), so callers can test the flag.
"""
from __future__ import annotations

import os

import torch
from torch.autograd.function import once_differentiable

try:  # guarded, so transformers' import check of a Hub folder does not demand triton from CPU users
    import triton
    import triton.language as tl

    HAS_TRITON = True
    _TRITON_IMPORT_ERROR = None
except ImportError as error:
    HAS_TRITON = False
    _TRITON_IMPORT_ERROR = repr(error)

__all__ = ["HAS_TRITON", "MAX_N", "TUNE", "l2_norm_triton", "rms_norm_triton", "swiglu_linear_triton",
           "swiglu_triton"]

# Widest normalised row: the whole row stays in registers (one block of next_pow2(N) columns).
MAX_N = 16384
# Launch-parameter overrides, for tests (to reach multi-tile loops at tiny shapes) and benchmark sweeps.
# Keys: "tile" (elements per program tile, default 4096), "block_m" (rows per tile), "warps",
# "programs" (programs of the norm backward, which loop over row tiles; default 4 per SM),
# "block_n" (SwiGLU column block).
TUNE: dict = {}

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _row_norm_fwd_kernel(X, W, Y, RSTD, rows, N, stride_x, eps,
                             HAS_W: tl.constexpr, MEAN: tl.constexpr, STORE_RSTD: tl.constexpr,
                             ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One [BLOCK_M, BLOCK_N] tile of rows, each row whole in registers: one read of x, one write of y."""
        r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        c = tl.arange(0, BLOCK_N)
        mr = r < rows
        mc = c < N
        m = mr[:, None] & mc[None, :]
        r64 = r.to(tl.int64)
        x = tl.load(X + r64[:, None] * stride_x + c[None, :], mask=m, other=0.0).to(ACC)
        ss = tl.sum(x * x, axis=1)
        if MEAN:
            ss = ss / N
        rstd = 1.0 / tl.sqrt(ss + eps)
        y = x * rstd[:, None]
        if HAS_W:
            w = tl.load(W + c, mask=mc, other=0.0).to(ACC)
            y = y * w[None, :]
        tl.store(Y + r64[:, None] * N + c[None, :], y.to(Y.dtype.element_ty), mask=m)
        if STORE_RSTD:
            tl.store(RSTD + r, rstd, mask=mr)

    @triton.jit
    def _row_norm_bwd_kernel(X, W, DY, DX, DW, RSTD, rows, N, stride_x, tiles_per_prog,
                             HAS_W: tl.constexpr, DO_DW: tl.constexpr, MEAN: tl.constexpr,
                             X_NORMED: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr):
        """dx = rstd * (g - xhat * <g, xhat> / n) with g = w * dy, xhat = x * rstd (n = N for RMS, 1 for L2);
        X_NORMED: X already holds xhat (the L2 norm's own output, which its consumer saves anyway).
        Each program walks `tiles_per_prog` consecutive row tiles and writes its partial sum of dy * xhat
        (the weight gradient) to row pid of DW [programs, N]; the host sums DW over programs (deterministic)."""
        pid = tl.program_id(0)
        c = tl.arange(0, BLOCK_N)
        mc = c < N
        if HAS_W:
            w = tl.load(W + c, mask=mc, other=0.0).to(ACC)
        if DO_DW:
            dw = tl.zeros([BLOCK_N], dtype=ACC)
        for i in range(tiles_per_prog):
            r = (pid * tiles_per_prog + i) * BLOCK_M + tl.arange(0, BLOCK_M)
            mr = r < rows
            m = mr[:, None] & mc[None, :]
            r64 = r.to(tl.int64)
            x = tl.load(X + r64[:, None] * stride_x + c[None, :], mask=m, other=0.0).to(ACC)
            dy = tl.load(DY + r64[:, None] * N + c[None, :], mask=m, other=0.0).to(ACC)
            rstd = tl.load(RSTD + r, mask=mr, other=0.0).to(ACC)
            if X_NORMED:
                xhat = x
            else:
                xhat = x * rstd[:, None]
            if HAS_W:
                g = dy * w[None, :]
            else:
                g = dy
            if DO_DW:
                dw += tl.sum(dy * xhat, axis=0)
            dot = tl.sum(g * xhat, axis=1)
            if MEAN:
                dot = dot / N
            dx = rstd[:, None] * (g - xhat * dot[:, None])
            tl.store(DX + r64[:, None] * N + c[None, :], dx.to(DX.dtype.element_ty), mask=m)
        if DO_DW:
            tl.store(DW + pid.to(tl.int64) * N + c, dw, mask=mc)

    @triton.jit
    def _swiglu_tile(G, U, rows, N, stride_g, stride_u, n_col_blocks,
                     ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's [BLOCK_M, BLOCK_N] tile: row offsets, columns, mask, and g and u loaded in ACC."""
        pid = tl.program_id(0)
        r = (pid // n_col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        c = (pid % n_col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = (r < rows)[:, None] & (c < N)[None, :]
        r64 = r.to(tl.int64)[:, None]
        g = tl.load(G + r64 * stride_g + c[None, :], mask=m, other=0.0).to(ACC)
        u = tl.load(U + r64 * stride_u + c[None, :], mask=m, other=0.0).to(ACC)
        return r64, c, m, g, u

    @triton.jit
    def _swiglu_fwd_kernel(G, U, Y, rows, N, stride_g, stride_u, n_col_blocks,
                           ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """y = silu(g) * u on one [BLOCK_M, BLOCK_N] tile (rows may be strided views, e.g. a chunk of a fused
        gate/up projection)."""
        r64, c, m, g, u = _swiglu_tile(G, U, rows, N, stride_g, stride_u, n_col_blocks, ACC, BLOCK_M, BLOCK_N)
        y = g / (1.0 + tl.exp(-g)) * u
        tl.store(Y + r64 * N + c[None, :], y.to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _swiglu_bwd_kernel(G, U, DY, DG, DU, Y, rows, N, stride_g, stride_u, n_col_blocks,
                           STORE_Y: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
        """s = sigmoid(g) recomputed;  dg = dy * u * s * (1 + g * (1 - s)),  du = dy * g * s.  STORE_Y also
        writes the recomputed y = g * s * u (for the weight gradient of the matmul that consumed it)."""
        r64, c, m, g, u = _swiglu_tile(G, U, rows, N, stride_g, stride_u, n_col_blocks, ACC, BLOCK_M, BLOCK_N)
        dy = tl.load(DY + r64 * N + c[None, :], mask=m, other=0.0).to(ACC)
        s = 1.0 / (1.0 + tl.exp(-g))
        gs = g * s
        dg = dy * u * (s + gs * (1.0 - s))
        du = dy * gs
        tl.store(DG + r64 * N + c[None, :], dg.to(DG.dtype.element_ty), mask=m)
        tl.store(DU + r64 * N + c[None, :], du.to(DU.dtype.element_ty), mask=m)
        if STORE_Y:
            tl.store(Y + r64 * N + c[None, :], (gs * u).to(Y.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------
def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # interpreter: a few programs, so the tests walk the multi-tile loop
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _check(name: str, *tensors: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise ImportError(f"modeling_fwp.norm_triton.{name} needs triton: {_TRITON_IMPORT_ERROR}")
    for t in tensors:
        if t.dtype not in _FLOATS:
            raise ValueError(f"{name}: dtype {t.dtype} is not supported (float16, bfloat16, float32, float64)")
        if not t.is_cuda and not _interpreting():
            raise ValueError(f"{name}: tensors must be on a CUDA device (or set TRITON_INTERPRET=1 for CPU)")


def _rows_view(x: torch.Tensor, n: int) -> torch.Tensor:
    """x as [rows, n] with unit column stride and any row stride (no copy where a view exists)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        v = x.view(-1, n)
    except RuntimeError:
        v = x.contiguous().view(-1, n)
    if v.shape[0] > 1 and v.stride(0) < n:  # overlapping rows (e.g. expand): copy
        v = v.contiguous()
    return v


def _row_stride(v: torch.Tensor) -> int:
    return v.stride(0) if v.shape[0] > 1 else v.shape[1]


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _row_meta(n: int, rows: int):
    """BLOCK_N (whole row), BLOCK_M (rows per tile, ~4096 elements per tile) and num_warps."""
    block_n = _pow2(n)
    tile = TUNE.get("tile", 4096)
    block_m = TUNE.get("block_m") or max(1, min(tile // block_n, _pow2(rows)))
    # ~16 elements per thread; rows of 16384 take 32 warps (16 would spill in the backward)
    warps = TUNE.get("warps") or (32 if block_n >= 16384 else max(4, min(16, block_m * block_n // 512)))
    return block_n, block_m, warps


def _row_norm_fwd(x, weight, eps, out_dtype, mean, store_rstd):
    n = x.shape[-1]
    x2 = _rows_view(x, n)
    rows = x2.shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(rows if store_rstd else 0, dtype=acc, device=x.device)
    if rows > 0 and n > 0:
        block_n, block_m, warps = _row_meta(n, rows)
        _row_norm_fwd_kernel[(triton.cdiv(rows, block_m),)](
            x2, weight if weight is not None else x2, y, rstd if store_rstd else x2, rows, n, _row_stride(x2),
            float(eps), HAS_W=weight is not None, MEAN=mean, STORE_RSTD=store_rstd, ACC=_acc(x.dtype),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return y, x2, rstd


def _row_norm_bwd(x2, weight, rstd, dy, x_shape, x_dtype, mean, need_dw, x_normed=False):
    n = x2.shape[1]
    rows = x2.shape[0]
    dy2 = dy.contiguous().view(-1, n)
    dx = torch.empty(x_shape, dtype=x_dtype, device=x2.device)
    acc = rstd.dtype
    if rows == 0 or n == 0:
        dw = torch.zeros(n, dtype=acc, device=x2.device) if need_dw else None
        return dx, dw
    block_n, block_m, warps = _row_meta(n, rows)
    tiles = triton.cdiv(rows, block_m)
    if need_dw:  # few programs, each looping over row tiles: a small [programs, N] partial-sum buffer
        programs = min(tiles, TUNE.get("programs") or 4 * _sm_count(x2.device))
    else:
        programs = min(tiles, TUNE.get("programs") or tiles)
    per_prog = triton.cdiv(tiles, programs)
    programs = triton.cdiv(tiles, per_prog)
    dw_part = torch.empty((programs, n) if need_dw else (0,), dtype=acc, device=x2.device)
    _row_norm_bwd_kernel[(programs,)](
        x2, weight if weight is not None else x2, dy2, dx, dw_part if need_dw else x2, rstd, rows, n,
        _row_stride(x2), per_prog, HAS_W=weight is not None, DO_DW=need_dw, MEAN=mean, X_NORMED=x_normed,
        ACC=_acc(x_dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return dx, (dw_part.sum(0) if need_dw else None)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype, store):
        y, x2, rstd = _row_norm_fwd(x, weight, eps, out_dtype, mean=True, store_rstd=store)
        if store:
            ctx.save_for_backward(x2, weight, rstd)
        ctx.x_meta = (x.shape, x.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        need_dw = ctx.needs_input_grad[1]
        dx, dw = _row_norm_bwd(x2, weight, rstd, dy, *ctx.x_meta, mean=True, need_dw=need_dw)
        return (dx if ctx.needs_input_grad[0] else None), (dw.to(weight.dtype) if need_dw else None), None, None, None


class _L2NormFunction(torch.autograd.Function):
    """Saves its output y = x * rstd, not x: the update rule saves the normalised q and k anyway, so x (the
    convolution's output) can be freed, one [tokens, heads * head_dim] tensor less per layer (fla does the same)."""

    @staticmethod
    def forward(ctx, x, eps, store):
        y, _, rstd = _row_norm_fwd(x, None, eps, x.dtype, mean=False, store_rstd=store)
        if store:
            ctx.save_for_backward(y, rstd)
        ctx.x_meta = (x.shape, x.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        y, rstd = ctx.saved_tensors
        n = y.shape[-1]
        dx, _ = _row_norm_bwd(y.view(-1, n), None, rstd, dy, *ctx.x_meta, mean=False, need_dw=False,
                              x_normed=True)
        return dx, None, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None):
    """FWPRMSNorm in one kernel each way.  x [..., N] (N <= MAX_N), weight [N]; y in `out_dtype` (default
    x.dtype; pass the autocast dtype so the next matmul needs no cast).  Gradients: dx in x.dtype, dweight in
    weight.dtype (fp32 partial sums per program, summed over programs: deterministic).  Saves x, weight and
    one rstd per row."""
    _check("rms_norm_triton", x, weight)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in _FLOATS:
        raise ValueError(f"rms_norm_triton: out_dtype {out_dtype} is not supported")
    n = x.shape[-1] if x.dim() else 0
    if x.dim() == 0 or not 1 <= n <= MAX_N:
        raise ValueError(f"rms_norm_triton: last dim N={n} must be in 1..{MAX_N}")
    if weight.dim() != 1 or weight.shape[0] != n:
        raise ValueError(f"rms_norm_triton: weight shape {tuple(weight.shape)} != ({n},)")
    if weight.device != x.device:
        raise ValueError("rms_norm_triton: x and weight are on different devices")
    # (grad mode is off inside Function.forward, so decide here whether backward will need rstd)
    store = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return _RMSNormFunction.apply(x, weight.contiguous(), eps, out_dtype, store)


def l2_norm_triton(x: torch.Tensor, eps: float):
    """normalize_qk(x, "l2", eps) in one kernel each way, fp32 math (the reference computes in x.dtype), y and
    dx in x.dtype.  x [..., N] with N <= MAX_N.  Saves its output y and one rstd per row; the backward uses
    dx = rstd * (dy - y * <dy, y>)."""
    _check("l2_norm_triton", x)
    n = x.shape[-1] if x.dim() else 0
    if x.dim() == 0 or not 1 <= n <= MAX_N:
        raise ValueError(f"l2_norm_triton: last dim N={n} must be in 1..{MAX_N}")
    return _L2NormFunction.apply(x, eps, torch.is_grad_enabled() and x.requires_grad)


# ------------------------------------------------------------------------------------------------- SwiGLU
def _ew_meta(n: int, rows: int):
    """Column block (a power of two dividing N where one >= 128 exists, so no lanes idle), rows per tile."""
    block_n = TUNE.get("block_n")
    if not block_n:
        block_n = min(_pow2(n), 1024)
        for b in (1024, 512, 256, 128):
            if n % b == 0:
                block_n = b
                break
    tile = TUNE.get("tile", 4096)
    block_m = TUNE.get("block_m") or max(1, min(tile // block_n, _pow2(rows)))
    warps = TUNE.get("warps") or max(1, min(8, block_m * block_n // 512))
    return block_n, block_m, warps


def _swiglu_fwd(g2, u2, shape, dtype):
    rows, n = g2.shape
    y = torch.empty(shape, dtype=dtype, device=g2.device)
    if rows > 0 and n > 0:
        block_n, block_m, warps = _ew_meta(n, rows)
        ncb = triton.cdiv(n, block_n)
        _swiglu_fwd_kernel[(triton.cdiv(rows, block_m) * ncb,)](
            g2, u2, y, rows, n, _row_stride(g2), _row_stride(u2), ncb,
            ACC=_acc(torch.promote_types(g2.dtype, u2.dtype)), BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=warps)
    return y


def _swiglu_bwd(g2, u2, dy, shape, g_dtype, u_dtype, want_y=False):
    """dgate, dup (and the recomputed y [rows, n] when want_y) from the saved inputs and dy."""
    rows, n = g2.shape
    dy2 = dy.contiguous().view(-1, n) if n > 0 else dy
    dg = torch.empty(shape, dtype=g_dtype, device=g2.device)
    du = torch.empty(shape, dtype=u_dtype, device=g2.device)
    y = torch.empty((rows, n), dtype=g_dtype, device=g2.device) if want_y else None
    if rows > 0 and n > 0:
        block_n, block_m, warps = _ew_meta(n, rows)
        ncb = triton.cdiv(n, block_n)
        _swiglu_bwd_kernel[(triton.cdiv(rows, block_m) * ncb,)](
            g2, u2, dy2, dg, du, y if want_y else dg, rows, n, _row_stride(g2), _row_stride(u2), ncb,
            STORE_Y=want_y, ACC=_acc(torch.promote_types(g_dtype, u_dtype)), BLOCK_M=block_m,
            BLOCK_N=block_n, num_warps=warps)
    return dg, du, y


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        n = gate.shape[-1]
        g2, u2 = _rows_view(gate, n), _rows_view(up, n)
        ctx.save_for_backward(g2, u2)
        ctx.meta = (gate.shape, gate.dtype, up.dtype)
        return _swiglu_fwd(g2, u2, gate.shape, gate.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        dg, du, _ = _swiglu_bwd(g2, u2, dy, *ctx.meta)
        return dg, du


class _SwiGLULinearFunction(torch.autograd.Function):
    """(silu(gate) * up) @ weight^T with the SwiGLU output freed after the matmul: the backward recomputes it
    (in the kernel that makes dgate and dup) for the weight gradient, so one [tokens, intermediate] tensor per
    layer is not kept (fla's SwiGLULinear does the same). The matmul runs in gate's dtype (autocast's)."""

    @staticmethod
    def forward(ctx, gate, up, weight):
        n = gate.shape[-1]
        g2, u2 = _rows_view(gate, n), _rows_view(up, n)
        hidden = _swiglu_fwd(g2, u2, g2.shape, gate.dtype)
        ctx.save_for_backward(g2, u2, weight)
        ctx.meta = (gate.shape, gate.dtype, up.dtype)
        out = torch.nn.functional.linear(hidden, weight.to(gate.dtype))
        return out.view(*gate.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        g2, u2, weight = ctx.saved_tensors
        g_dtype = ctx.meta[1]
        dout2 = dout.reshape(-1, weight.shape[0]).to(g_dtype)
        w = weight.to(g_dtype)
        dhidden = dout2 @ w
        need_w = ctx.needs_input_grad[2]
        dg, du, hidden = _swiglu_bwd(g2, u2, dhidden, *ctx.meta, want_y=need_w)
        dw = (dout2.t() @ hidden).to(weight.dtype) if need_w else None
        return dg, du, dw


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor):
    """F.silu(gate) * up in one kernel each way, fp32 math, y in gate.dtype; dgate in gate.dtype, dup in
    up.dtype.  gate and up may be row-strided views (e.g. the two halves of a fused projection): no copy."""
    _check("swiglu_triton", gate, up)
    if gate.shape != up.shape:
        raise ValueError(f"swiglu_triton: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    if gate.device != up.device:
        raise ValueError("swiglu_triton: gate and up are on different devices")
    if gate.numel() == 0:
        return (torch.nn.functional.silu(gate) * up).to(gate.dtype)  # nothing to launch; keeps autograd and dtypes
    if gate.dim() == 0:
        return _SwiGLUFunction.apply(gate.view(1), up.view(1)).view(())
    return _SwiGLUFunction.apply(gate, up)


def swiglu_linear_triton(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor):
    """F.linear(F.silu(gate) * up, weight) (a bias-free down projection) that does not keep the SwiGLU output for
    backward: it saves gate, up and weight and recomputes silu(gate) * up there. The matmul and the gradients of
    gate and up are in gate's dtype (under autocast, its dtype), the weight's gradient in weight's dtype."""
    _check("swiglu_linear_triton", gate, up, weight)
    if gate.shape != up.shape or weight.dim() != 2 or weight.shape[1] != gate.shape[-1]:
        raise ValueError(f"swiglu_linear_triton: gate {tuple(gate.shape)}, up {tuple(up.shape)} and weight "
                         f"{tuple(weight.shape)} do not fit (weight must be [out, gate.shape[-1]])")
    if not (gate.device == up.device == weight.device):
        raise ValueError("swiglu_linear_triton: gate, up and weight are on different devices")
    if gate.dim() < 2 or gate.numel() == 0:
        return torch.nn.functional.linear(swiglu_triton(gate, up), weight.to(gate.dtype))
    return _SwiGLULinearFunction.apply(gate, up, weight)
