"""Fused Triton cross-entropy (forward + hand-written backward) for the causal-LM loss.

Why: losses._ChunkedCrossEntropy upcasts each chunk of rows to fp32 and runs logsumexp, gather, sub, exp, mul and
scatter as separate PyTorch kernels, each a full pass over the [rows, vocab] chunk (~7.5 ms per step at 16384 x
32000 bf16 logits on an H200). Here the forward is one kernel that reads the logits once, and the backward one
kernel that reads them once and writes the gradient once; nothing of logits size is allocated in fp32.

    cross_entropy_sum_triton(logits, targets, ignore_index=-100)   reference: losses._ChunkedCrossEntropy
        logits [N, V], targets [N]; returns the 0-dim total over rows of lse(logits[i]) - logits[i, targets[i]]
        (rows whose target is ignore_index count 0), in fp32 (fp64 for fp64 logits)

Forward: per row, an online max / sum over vocabulary blocks gives the log-sum-exp; the loss is lse - logit[target].
Only the logits (untouched: the caller may keep them), the targets and the per-row lse are saved. Backward:
grad = (softmax - onehot(target)) * grad_total, zero on ignored rows, in the logits' dtype. The math is fp32 for
fp16 / bf16 / fp32 logits (fp64 for fp64). Tensors must be on a CUDA device, or on the CPU under
TRITON_INTERPRET=1 (that is how CI tests them). Like norm_triton.py this module imports without triton
(HAS_TRITON_LOSS is then False and the function raises ImportError), so losses.py can test the flag.
"""
from __future__ import annotations

import os

import torch
from torch.autograd.function import once_differentiable

try:  # guarded, so transformers' import check of a Hub folder does not demand triton from CPU users
    import triton
    import triton.language as tl

    HAS_TRITON_LOSS = True
    _TRITON_IMPORT_ERROR = None
except ImportError as error:
    HAS_TRITON_LOSS = False
    _TRITON_IMPORT_ERROR = repr(error)

__all__ = ["HAS_TRITON_LOSS", "TUNE", "cross_entropy_sum_triton"]

# Launch-parameter overrides, for tests (to reach the multi-block vocabulary loop at tiny shapes) and benchmark
# sweeps. Keys: "block_v" (vocabulary columns per step, a power of two), "warps".
TUNE: dict = {}

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------
if HAS_TRITON_LOSS:

    @triton.jit
    def _ce_fwd_kernel(LOGITS, TARGETS, LOSS, LSE, V, stride, ignore_index,
                       ACC: tl.constexpr, BLOCK_V: tl.constexpr):
        """One row: lse by an online max / sum over BLOCK_V-wide vocabulary blocks (one read of the logits), then
        loss = lse - logit[target]. An ignored row skips the loop: its loss is 0 and its lse is never used."""
        row = tl.program_id(0).to(tl.int64)
        base = LOGITS + row * stride
        target = tl.load(TARGETS + row)
        valid = target != ignore_index
        cols = tl.arange(0, BLOCK_V)
        m = tl.full((), float("-inf"), ACC)  # running max
        s = tl.zeros((), ACC)  # running sum of exp(x - m)
        for start in range(0, tl.where(valid, V, 0), BLOCK_V):
            c = start + cols
            x = tl.load(base + c, mask=c < V, other=float("-inf")).to(ACC)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # (first block: m = -inf, so the old sum 0 is scaled by exp(-inf) = 0; each block has a real column)
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = tl.where(valid, m + tl.log(tl.where(valid, s, 1.0)), 0.0)  # (no log(0) for an ignored row)
        picked = tl.load(base + tl.where(valid, target, 0)).to(ACC)
        tl.store(LOSS + row, tl.where(valid, lse - picked, 0.0))
        tl.store(LSE + row, lse)

    @triton.jit
    def _ce_bwd_kernel(LOGITS, TARGETS, LSE, GRAD_TOTAL, DLOGITS, V, stride, ignore_index,
                       ACC: tl.constexpr, BLOCK_V: tl.constexpr):
        """One BLOCK_V-wide block of one row: d = (exp(x - lse) - [col == target]) * grad_total, 0 on an ignored
        row (whose logits are then not read). grad_total is read from device memory: no host sync."""
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        mc = c < V
        target = tl.load(TARGETS + row)
        valid = target != ignore_index
        g = tl.load(GRAD_TOTAL).to(ACC)
        lse = tl.load(LSE + row)
        # (written as c < 0-or-V: Triton's interpreter refuses a mask `mc & valid` of a block and a scalar)
        x = tl.load(LOGITS + row * stride + c, mask=c < tl.where(valid, V, 0), other=0.0).to(ACC)
        p = tl.exp(x - lse)
        d = tl.where(c == target, p - 1.0, p) * g
        d = tl.where(valid, d, 0.0)
        tl.store(DLOGITS + row * V + c, d.to(DLOGITS.dtype.element_ty), mask=mc)


# ----------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _fwd_meta(v: int):
    """Vocabulary block of the forward loop and num_warps. H200, 16384 x 32000 bf16: 4096 columns on 4 warps read
    at ~4.6 TB/s (0.23 ms); 8 warps, or blocks of 1024 / 16384 and up, are 10-80% slower."""
    block = TUNE.get("block_v") or min(triton.next_power_of_2(v), 4096)
    return block, TUNE.get("warps") or max(1, min(8, block // 1024))


def _bwd_meta(v: int):
    """Columns per backward program (an elementwise pass: no loop, more programs) and num_warps. H200, same shape:
    2048 on 4 warps ~0.5 ms (one read, one write); 512 / 1024 columns or 8 warps are slower."""
    block = TUNE.get("block_v") or min(triton.next_power_of_2(v), 2048)
    return block, TUNE.get("warps") or max(1, min(8, block // 512))


def _check(logits: torch.Tensor, targets: torch.Tensor) -> None:
    name = "cross_entropy_sum_triton"
    if not HAS_TRITON_LOSS:
        raise ImportError(f"modeling_fwp.loss_triton.{name} needs triton: {_TRITON_IMPORT_ERROR}")
    if logits.dtype not in _FLOATS:
        raise ValueError(f"{name}: dtype {logits.dtype} is not supported (float16, bfloat16, float32, float64)")
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"{name}: logits must be [rows, vocab] with vocab >= 1; got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"{name}: targets shape {tuple(targets.shape)} != ({logits.shape[0]},)")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"{name}: targets must hold integer token ids; got dtype {targets.dtype}")
    if targets.device != logits.device:
        raise ValueError(f"{name}: logits and targets are on different devices")
    if not logits.is_cuda and not _interpreting():
        raise ValueError(f"{name}: tensors must be on a CUDA device (or set TRITON_INTERPRET=1 for CPU)")


class _TritonCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        rows, v = logits.shape
        x = logits
        if x.stride(1) != 1 or (rows > 1 and x.stride(0) < v):  # the kernels need unit column stride, no overlap
            x = x.contiguous()
        targets = targets.contiguous()
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        loss = torch.empty(rows, dtype=acc, device=x.device)
        lse = torch.empty(rows, dtype=acc, device=x.device)
        if rows > 0:
            block, warps = _fwd_meta(v)
            _ce_fwd_kernel[(rows,)](x, targets, loss, lse, v, x.stride(0), int(ignore_index),
                                    ACC=_acc(x.dtype), BLOCK_V=block, num_warps=warps)
        ctx.save_for_backward(x, targets, lse)
        ctx.ignore_index = int(ignore_index)
        return loss.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        x, targets, lse = ctx.saved_tensors
        rows, v = x.shape
        grad = torch.empty((rows, v), dtype=x.dtype, device=x.device)
        if rows > 0:
            block, warps = _bwd_meta(v)
            _ce_bwd_kernel[(rows, triton.cdiv(v, block))](
                x, targets, lse, grad_total.to(lse.dtype).reshape(1), grad, v, x.stride(0), ctx.ignore_index,
                ACC=_acc(x.dtype), BLOCK_V=block, num_warps=warps)
        return grad, None, None


def cross_entropy_sum_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
    """Sum over rows of -log softmax(logits[i])[targets[i]] (0 where targets[i] == ignore_index), as the 0-dim
    result of losses._ChunkedCrossEntropy: fp32 (fp64 for fp64 logits). logits [N, V] may be a row-strided view;
    they are not modified. Targets must be ids in [0, V) or ignore_index (losses.check_targets checks that: an
    out-of-range id here would read outside the row). The gradient comes back in the logits' dtype."""
    _check(logits, targets)
    return _TritonCrossEntropy.apply(logits, targets, ignore_index)
