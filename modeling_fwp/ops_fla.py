"""Adaptor to flash-linear-attention (fla) kernels, used only when fla is installed (never a hard dependency).

    o, state = delta_rule_fla(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size)
    o, state = sum_rule_fla(q, k, v, scale, initial_state, output_final_state, cu_seqlens, chunk_size)

Same arguments and meaning as ops.delta_rule / ops.sum_rule (minus `backend`); layout [B,T,H,K] is fla's own.
- Delta rule -> fla.ops.delta_rule.chunk_delta_rule (WY/UT chunkwise, fla >= 0.5).
- Sum rule -> fla.ops.simple_gla.chunk_simple_gla with no gate (g=None): plain linear attention, state
  [N,H,K,V] and o_t = scale S_t^T q_t, which is our definition.  (fla's chunk_linear_attn adds a normaliser
  by default, so it is not used.)
- dtype: fla's chunk_delta_rule refuses float32.  We cast float32 inputs to bfloat16 for the call, warn once,
  and return o in float32 again (the state stays float32, as fla keeps it).  That loses precision: pick
  backend="triton" or "chunk" for float32 work.  float64 raises ValueError.

Importing this module raises ImportError when fla (fla-core) is missing; ops.py guards the import.
"""
from __future__ import annotations

import warnings

import torch

try:
    from fla.ops.delta_rule import chunk_delta_rule as _fla_chunk_delta_rule
    from fla.ops.simple_gla import chunk_simple_gla as _fla_chunk_simple_gla
except Exception as e:  # fla absent or broken: the backend is unavailable
    raise ImportError(f"flash-linear-attention (fla) kernels are unavailable: {e}") from e

__all__ = ["delta_rule_fla", "sum_rule_fla"]

_warned_fp32 = False


def _prepare(q, k, v, cu_seqlens, chunk_size, cast_fp32):
    global _warned_fp32
    dt = v.dtype
    if dt == torch.float64:
        raise ValueError("v.dtype float64 is not supported by the fla backend; use backend='chunk' or 'recurrent'")
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"chunk_size must be 16, 32 or 64 for the fla backend, got {chunk_size}")
    run_dt = dt
    if cast_fp32 and dt == torch.float32:
        run_dt = torch.bfloat16
        if not _warned_fp32:
            warnings.warn("fla's chunk_delta_rule does not accept float32: inputs are cast to bfloat16 for the "
                          "call (o is returned in float32). Use backend='triton' or 'chunk' for float32 accuracy.",
                          stacklevel=3)
            _warned_fp32 = True
    q, k, v = (x.to(run_dt).contiguous() for x in (q, k, v))
    cu = cu_seqlens.to(device=q.device, dtype=torch.long) if cu_seqlens is not None else None
    return q, k, v, cu, dt


def delta_rule_fla(q, k, v, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                   chunk_size=64):
    """Delta rule through fla's chunk_delta_rule.  Returns (o in v.dtype, final state fp32 or None)."""
    q, k, v, cu, out_dt = _prepare(q, k, v, cu_seqlens, chunk_size, cast_fp32=True)
    h0 = initial_state.float() if initial_state is not None else None
    o, ht = _fla_chunk_delta_rule(q, k, v, beta.to(q.dtype).contiguous(), scale=scale, initial_state=h0,
                                  output_final_state=output_final_state, cu_seqlens=cu,
                                  cu_seqlens_cpu=cu.cpu() if cu is not None else None, chunk_size=chunk_size)
    return o.to(out_dt), (ht.float() if ht is not None else None)


def sum_rule_fla(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                 chunk_size=64):
    """Sum rule (linear attention without normaliser) through fla's ungated chunk_simple_gla."""
    q, k, v, cu, out_dt = _prepare(q, k, v, cu_seqlens, chunk_size, cast_fp32=False)
    h0 = initial_state.float() if initial_state is not None else None
    o, ht = _fla_chunk_simple_gla(q, k, v, g=None, scale=scale, initial_state=h0,
                                  output_final_state=output_final_state, cu_seqlens=cu,
                                  cu_seqlens_cpu=cu.cpu() if cu is not None else None, chunk_size=chunk_size)
    return o.to(out_dt), (ht.float() if ht is not None else None)
