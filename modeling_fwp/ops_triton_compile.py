"""The Triton update rule as custom operators, for torch.compile and torch.export.

`ops_triton._run` launches its kernels from Python (autotuning, cached launch plans, a host-side pick between the
token-by-token and the chunkwise kernels), which a graph cannot trace. Under torch.compile it calls `rule_op`
instead: one opaque operator for the forward and one for the backward, each running the same host code and kernels
as the eager path (`_recurrent` or `_forward`, and `_backward`), with fake implementations that give the tracer the
output shapes. The forward returns L^-1 for the backward (empty when no gradient is wanted), as `_ChunkRule` keeps
it. This module imports the kernel files, not `ops_triton.py`, which imports it (lazily, when compiling).
"""

from __future__ import annotations

import re

import torch

from .ops_triton_backward import _backward
from .ops_triton_forward import _forward
from .ops_triton_launch import _Plan, plan_chunk_size
from .ops_triton_recurrent import _recurrent, _token_by_token

# A library name of this module's own: the package and a trust_remote_code copy of it can be imported in one process.
_LIBRARY = "fwp_" + re.sub(r"\W", "_", __name__)


def _or_empty(x, like):
    return like.new_empty(0) if x is None else x


@torch.library.custom_op(f"{_LIBRARY}::rule", mutates_args=())
def _rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor | None, h0: torch.Tensor | None,
          cu_seqlens: torch.Tensor | None, scale: float, want_ht: bool, chunk_size: int, is_delta: bool,
          grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not grad and _token_by_token(q, cu_seqlens):  # the eager pick, as in ops_triton._run
        o, ht = _recurrent(q, k, v, beta, scale, h0, want_ht, cu_seqlens, is_delta)
        return o, _or_empty(ht, q), q.new_empty(0)
    plan = _Plan(q, v, cu_seqlens, chunk_size)
    o, ht, linv = _forward(plan, q, k, v, beta, scale, h0, want_ht, is_delta, keep_linv=grad and is_delta)
    return o, _or_empty(ht, q), _or_empty(linv, q)


@_rule.register_fake
def _(q, k, v, beta, h0, cu_seqlens, scale, want_ht, chunk_size, is_delta, grad):
    batch, length, heads, key_dim = q.shape
    rows = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    ht = q.new_empty(rows, heads, key_dim, v.shape[-1], dtype=torch.float32) if want_ht else q.new_empty(0)
    linv = q.new_empty(0)
    if grad and is_delta:
        linv = k.new_empty(batch, length, heads, plan_chunk_size(chunk_size, key_dim, v.element_size()))
    return torch.empty_like(v), ht, linv


@torch.library.custom_op(f"{_LIBRARY}::rule_backward", mutates_args=())
def _rule_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor | None,
                   h0: torch.Tensor | None, cu_seqlens: torch.Tensor | None, linv: torch.Tensor | None,
                   do: torch.Tensor, dht: torch.Tensor | None, scale: float, chunk_size: int,
                   is_delta: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _Plan(q, v, cu_seqlens, chunk_size)
    dht = dht.float().contiguous() if dht is not None else None
    dq, dk, dv, dbeta, dh0 = _backward(plan, q, k, v, beta, scale, h0, do.contiguous(), dht, is_delta, linv)
    return dq, dk, dv, _or_empty(dbeta, q), _or_empty(None if dh0 is None else dh0.to(h0.dtype), q)


@_rule_backward.register_fake
def _(q, k, v, beta, h0, cu_seqlens, linv, do, dht, scale, chunk_size, is_delta):
    dbeta = torch.empty_like(beta) if is_delta else q.new_empty(0)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbeta,
            q.new_empty(0) if h0 is None else torch.empty_like(h0))


def _setup(ctx, inputs, output):
    q, k, v, beta, h0, cu_seqlens, scale, want_ht, chunk_size, is_delta, _ = inputs
    ctx.save_for_backward(q, k, v, beta, h0, cu_seqlens, output[2] if is_delta else None)
    ctx.scale, ctx.want_ht, ctx.chunk_size, ctx.is_delta = scale, want_ht, chunk_size, is_delta


def _grad(ctx, do, dht, _):
    q, k, v, beta, h0, cu_seqlens, linv = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(v)
    dht = dht if ctx.want_ht else None  # (the empty placeholder's gradient)
    dq, dk, dv, dbeta, dh0 = _rule_backward(q, k, v, beta, h0, cu_seqlens, linv, do.contiguous(), dht, ctx.scale,
                                            ctx.chunk_size, ctx.is_delta)
    return (dq, dk, dv, dbeta if ctx.is_delta else None, dh0 if h0 is not None else None,
            None, None, None, None, None, None)


_rule.register_autograd(_grad, setup_context=_setup)


def rule_op(q, k, v, beta, scale, h0, output_final_state, cu_seqlens, chunk_size, is_delta, needs_grad):
    """`ops_triton._run`'s result (o, final state or None) through the operators (inputs already checked and
    made contiguous there)."""
    o, ht, _ = _rule(q, k, v, beta, h0, cu_seqlens, float(scale), bool(output_final_state), int(chunk_size),
                     bool(is_delta), bool(needs_grad))
    return o, (ht if output_final_state else None)
