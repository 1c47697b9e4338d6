"""One token of the update rule per row, with the fast weights updated in place: the step of captured decoding.

Per row n and head h, with the state S [K, V] (float32, float64 for float64 models) changed in place:

    delta rule:  u = beta (v - S^T k);  S <- S + k u^T;  o = scale * S^T q
    sum rule:    S <- S + k v^T;                          o = scale * S^T q

the same maths as one iteration of `ops.delta_rule_recurrent` / `sum_rule_recurrent` (read after the write). A
decode step is bound by launch cost, not arithmetic: in PyTorch this step is two batched mat-vecs, the pointwise
write and a copy back into the cache's buffer, four launches per layer; the Triton kernel does it in one, reading
and writing each state element once per pass. `rule_step_reference` is the PyTorch definition it is tested against
(and what runs on CPU, for float64, or without triton). Both write the state in place, so the cache's buffers keep
their addresses and a CUDA graph can replay the step.
"""

from __future__ import annotations

import os
import re

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON_STEP = True
except Exception:  # triton missing or broken: the reference runs instead
    HAS_TRITON_STEP = False

__all__ = ["HAS_TRITON_STEP", "rule_step_", "rule_step_reference", "rule_step_triton"]


def rule_step_reference(q, k, v, beta, state, scale: float):
    """q, k [N, H, K]; v [N, H, V]; beta [N, H] or None (sum rule); state [N, H, K, V], updated in place.
    Returns o [N, H, V] in v's dtype."""
    dtype = state.dtype
    k_, v_ = k.to(dtype), v.to(dtype)
    if beta is None:
        write = v_
    else:  # the old memory's answer to k, corrected towards v
        write = beta.to(dtype)[..., None] * (v_ - torch.einsum("nhk,nhkv->nhv", k_, state))
    state.add_(k_[..., :, None] * write[..., None, :])
    return (scale * torch.einsum("nhk,nhkv->nhv", q.to(dtype), state)).to(v.dtype)


if HAS_TRITON_STEP:

    @triton.jit
    def _rule_step_kernel(q, k, v, beta, state, o, scale, heads, q_sn, q_sh, k_sn, k_sh, v_sn, v_sh,
                          K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          HAS_BETA: tl.constexpr):
        # One program per (row, head): the whole [K, V] state, in K-blocks of BK rows by all V columns (BV >= V),
        # so the read-out of the new state needs no second kernel. Pass 1 reads S^T k, pass 2 writes and reads out.
        pid = tl.program_id(0)
        n, h = pid // heads, pid % heads
        offs_v = tl.arange(0, BV)
        mask_v = offs_v < V
        v_row = tl.load(v + n * v_sn + h * v_sh + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        s_base = state + pid.to(tl.int64) * K * V
        if HAS_BETA:
            retrieved = tl.zeros([BV], dtype=tl.float32)
            for start in range(0, K, BK):
                offs_k = start + tl.arange(0, BK)
                mask_k = offs_k < K
                k_block = tl.load(k + n * k_sn + h * k_sh + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                s = tl.load(s_base + offs_k[:, None] * V + offs_v[None, :], mask=mask_k[:, None] & mask_v[None, :],
                            other=0.0)
                retrieved += tl.sum(s * k_block[:, None], axis=0)
            b = tl.load(beta + n * heads + h).to(tl.float32)
            write = b * (v_row - retrieved)
        else:
            write = v_row
        out = tl.zeros([BV], dtype=tl.float32)
        for start in range(0, K, BK):
            offs_k = start + tl.arange(0, BK)
            mask_k = offs_k < K
            mask = mask_k[:, None] & mask_v[None, :]
            k_block = tl.load(k + n * k_sn + h * k_sh + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            q_block = tl.load(q + n * q_sn + h * q_sh + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            s = tl.load(s_base + offs_k[:, None] * V + offs_v[None, :], mask=mask, other=0.0)
            s = s + k_block[:, None] * write[None, :]
            tl.store(s_base + offs_k[:, None] * V + offs_v[None, :], s, mask=mask)
            out += tl.sum(s * q_block[:, None], axis=0)
        tl.store(o + pid * V + offs_v, (out * scale).to(o.dtype.element_ty), mask=mask_v)


def rule_step_triton(q, k, v, beta, state, scale: float):
    """The Triton kernel on the arguments of `rule_step_reference` (float32 state; q, k, v may be strided views
    of one projection, as long as their last dimension is contiguous)."""
    rows, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"rule_step_triton needs a contiguous float32 state, got {state.dtype}, strides "
                         f"{state.stride()}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    beta_arg = state if beta is None else beta.to(torch.float32).contiguous()  # unread without beta
    o = torch.empty(rows, heads, value_dim, dtype=v.dtype, device=v.device)
    block_v = triton.next_power_of_2(value_dim)
    block_k = max(1, min(triton.next_power_of_2(key_dim), 4096 // block_v))  # <= 4096 fp32 state values in flight
    _rule_step_kernel[(rows * heads,)](
        q, k, v, beta_arg, state, o, float(scale), heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), K=key_dim, V=value_dim, BK=block_k, BV=block_v, HAS_BETA=beta is not None,
        num_warps=4 if block_v * block_k >= 2048 else 2)
    return o


def _op_name() -> str:
    """A library name of this module's own: the package and a trust_remote_code copy of it (another module name)
    can be imported in one process, and an operator name can be registered once."""
    return "fwp_" + re.sub(r"\W", "_", __name__) + "::rule_step"


if HAS_TRITON_STEP:
    # A custom operator, so torch.compile treats the kernel as one opaque, in-place op on `state` (captured in the
    # CUDA graph as it is) instead of tracing into Triton.
    @torch.library.custom_op(_op_name(), mutates_args=("state",))
    def _rule_step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor | None,
                      state: torch.Tensor, scale: float) -> torch.Tensor:
        return rule_step_triton(q, k, v, beta, state, scale)

    @_rule_step_op.register_fake
    def _(q, k, v, beta, state, scale):
        return v.new_empty(v.shape)


def _use_triton(state: torch.Tensor) -> bool:
    if not HAS_TRITON_STEP or state.dtype != torch.float32:
        return False
    return state.is_cuda or (os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("FWP_STEP_TRITON") == "1")


def rule_step_(q, k, v, beta, state, scale: float):
    """One update-rule step per row with `state` updated in place (see the module docstring): the Triton kernel for
    float32 states on CUDA (and on CPU under TRITON_INTERPRET=1 with FWP_STEP_TRITON=1, how the tests run it
    inside the model), the PyTorch reference otherwise."""
    if _use_triton(state):
        return _rule_step_op(q, k, v, beta, state, float(scale))
    return rule_step_reference(q, k, v, beta, state, scale)
