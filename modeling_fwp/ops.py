"""Public fast-weight update-rule ops: input checks, backend dispatch and the step-by-step reference.

Per head, with state S in R^{K x V} (S_0 = initial_state or 0):

    delta rule:  u_t = beta_t (v_t - S_{t-1}^T k_t);  S_t = S_{t-1} + k_t u_t^T
    sum rule:    S_t = S_{t-1} + k_t v_t^T
    output:      o_t = scale * S_t^T q_t      (read AFTER the write; scale defaults to K**-0.5)

Shapes: q, k [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; states [N, H, K, V] with N = B, or the number of
packed sequences when `cu_seqlens` is given (then B must be 1). The state is kept in float32 (float64 when the
inputs are float64); o comes back in v.dtype.

Backends: "recurrent" (the loop below, the definition every other backend is tested against), "chunk" (pure
PyTorch chunkwise form, `ops_chunk.py`), "triton" (`ops_triton.py` and its kernel files), "fla" (`ops_fla.py`),
"auto". The helpers they all share (accumulation dtype, packed-sequence bookkeeping) are in `ops_common.py`.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .ops_chunk import delta_rule_chunk, sum_rule_chunk
from .ops_common import check_cu_seqlens_values, pack_to_padded, state_dtype_for

try:
    from .ops_triton import delta_rule_triton, sum_rule_triton

    HAS_TRITON_OPS = True
    _TRITON_IMPORT_ERROR = None
except Exception as error:  # triton missing or broken: the other backends still work
    HAS_TRITON_OPS = False
    _TRITON_IMPORT_ERROR = repr(error)

try:
    from .ops_fla import delta_rule_fla, sum_rule_fla

    HAS_FLA_OPS = True
    _FLA_IMPORT_ERROR = None
except Exception as error:  # flash-linear-attention not installed
    HAS_FLA_OPS = False
    _FLA_IMPORT_ERROR = repr(error)

__all__ = [
    "BACKENDS",
    "HAS_FLA_OPS",
    "HAS_TRITON_OPS",
    "available_backends",
    "delta_rule",
    "delta_rule_recurrent",
    "state_dtype_for",
    "sum_rule",
    "sum_rule_recurrent",
]

BACKENDS = ("auto", "recurrent", "chunk", "triton", "fla")


def available_backends() -> tuple[str, ...]:
    """Backends that can run in this environment (triton/fla only when their modules imported)."""
    names = ["auto", "recurrent", "chunk"]
    if HAS_TRITON_OPS:
        names.append("triton")
    if HAS_FLA_OPS:
        names.append("fla")
    return tuple(names)


# ----------------------------------------------------------------------------------------------- input checks


def _check_inputs(q, k, v, beta, initial_state, cu_seqlens, chunk_size) -> int:
    """Raise ValueError naming the offending argument; return N, the number of sequences."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, T, H, dim], got {_describe(tensor)}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, T, H, K], got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with B, T, H of k {tuple(k.shape[:3])}, got {tuple(v.shape)}")
    batch, _, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    if beta is not None:
        if not isinstance(beta, torch.Tensor) or beta.shape != k.shape[:3]:
            raise ValueError(f"beta must be a tensor of shape [B, T, H] = {tuple(k.shape[:3])}, got {_describe(beta)}")
        if not beta.is_floating_point():
            raise ValueError(f"beta must be a floating-point tensor, got dtype {beta.dtype}")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be a 1-D tensor [N + 1] of offsets, got {_describe(cu_seqlens)}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if batch != 1:
            raise ValueError(f"cu_seqlens needs packed inputs with batch size B == 1, got B = {batch}")
        num_sequences = cu_seqlens.numel() - 1
    else:
        num_sequences = batch
    if initial_state is not None:
        expected = (num_sequences, heads, key_dim, value_dim)
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != expected:
            raise ValueError(f"initial_state must have shape [N, H, K, V] = {expected}, got {_describe(initial_state)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return num_sequences


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return repr(value)


def _resolve_scale(scale, key_dim: int) -> float:
    if scale is None:
        return key_dim**-0.5
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a number, got a tensor of shape {tuple(scale.shape)}")
        return float(scale)
    if not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a number or None, got {scale!r}")
    return float(scale)


def _outside_autocast(q: torch.Tensor):
    """Every backend picks its own precision (fp32 state, o in v's dtype); an enclosing autocast region (Trainer's
    --bf16) would recast their internal products and mix dtypes, so it is switched off around them. Only when it is
    on: an exported graph then has no autocast region around the rule (ONNX's Scan cannot sit inside one)."""
    if not torch.is_autocast_enabled(q.device.type):
        return contextlib.nullcontext()
    return torch.autocast(q.device.type, enabled=False)


def _triton_interpreter() -> bool:
    """TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors (how CI tests their logic)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pick_backend(backend: str, q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if torch.onnx.is_in_onnx_export() and cu_seqlens is None:
            return "scan"  # ONNX has no translation of the custom operators; the step as one Scan node has one
        if q.is_cuda and HAS_TRITON_OPS and q.dtype != torch.float64:  # the kernels stop at fp32
            return "triton"
        # One step per sequence (a generation step, also packed: T == N): the loop has no chunk set-up cost.
        one_step = q.shape[1] <= 1 or (
            cu_seqlens is not None and q.shape[1] == cu_seqlens.numel() - 1
            and bool((cu_seqlens[1:] - cu_seqlens[:-1]).max() <= 1)
        )
        return "recurrent" if one_step else "chunk"
    if backend == "triton" and not HAS_TRITON_OPS:
        raise RuntimeError(
            f"backend='triton' needs modeling_fwp.ops_triton and a working triton install; import failed: "
            f"{_TRITON_IMPORT_ERROR}"
        )
    if backend == "fla" and not HAS_FLA_OPS:
        raise RuntimeError(
            "backend='fla' needs flash-linear-attention (pip install flash-linear-attention) and "
            f"modeling_fwp.ops_fla; import failed: {_FLA_IMPORT_ERROR}"
        )
    if backend in ("triton", "fla") and not q.is_cuda and not (backend == "triton" and _triton_interpreter()):
        raise ValueError(f"backend={backend!r} runs on CUDA tensors; these are on {q.device}. Use backend='auto' or "
                         "'chunk' (chunkwise PyTorch) there.")
    return backend


# ----------------------------------------------------------------------------------------------- public ops


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int = 64,
):
    """Delta-rule fast weights (Schlag et al. 2021, Eqs. 20-25). Returns (o [B,T,H,V], state [N,H,K,V] or None)."""
    if beta is None:
        raise ValueError("beta must be a tensor of shape [B, T, H], got None")
    _check_inputs(q, k, v, beta, initial_state, cu_seqlens, chunk_size)
    scale = _resolve_scale(scale, k.shape[-1])
    backend = _pick_backend(backend, q, cu_seqlens)
    args = (q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens)
    with _outside_autocast(q):
        if backend == "recurrent":
            return delta_rule_recurrent(*args)
        if backend == "scan":
            return _recurrent_scan(q, k, v, beta, scale, initial_state, output_final_state)
        if backend == "chunk":
            return delta_rule_chunk(*args, chunk_size=chunk_size)
        if backend == "triton":
            return delta_rule_triton(*args, chunk_size=chunk_size)
        return delta_rule_fla(*args, chunk_size=chunk_size)


def sum_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int = 64,
):
    """Sum-rule fast weights (linear attention, no denominator). Returns (o [B,T,H,V], state [N,H,K,V] or None)."""
    _check_inputs(q, k, v, None, initial_state, cu_seqlens, chunk_size)
    scale = _resolve_scale(scale, k.shape[-1])
    backend = _pick_backend(backend, q, cu_seqlens)
    args = (q, k, v, scale, initial_state, output_final_state, cu_seqlens)
    with _outside_autocast(q):
        if backend == "recurrent":
            return sum_rule_recurrent(*args)
        if backend == "scan":
            return _recurrent_scan(q, k, v, None, scale, initial_state, output_final_state)
        if backend == "chunk":
            return sum_rule_chunk(*args, chunk_size=chunk_size)
        if backend == "triton":
            return sum_rule_triton(*args, chunk_size=chunk_size)
        return sum_rule_fla(*args, chunk_size=chunk_size)


# ----------------------------------------------------------------------------------------------- reference


def reference_float64(q, k, v, beta=None, scale=None, initial_state=None, cu_seqlens=None):
    """The step-by-step definition in float64 (delta rule when beta is given, sum rule otherwise), returning
    (o, final state): what the tests and GPU checks compare every fast backend against."""
    q, k, v = q.double(), k.double(), v.double()
    initial_state = None if initial_state is None else initial_state.double()
    if cu_seqlens is not None:
        cu_seqlens = torch.as_tensor(cu_seqlens, dtype=torch.int64, device=q.device)
    if beta is None:
        return sum_rule_recurrent(q, k, v, scale, initial_state, True, cu_seqlens)
    return delta_rule_recurrent(q, k, v, beta.double(), scale, initial_state, True, cu_seqlens)


def delta_rule_recurrent(q, k, v, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Step-by-step reference for the delta rule: one loop iteration per token (differentiable by autograd)."""
    return _recurrent(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens)


def sum_rule_recurrent(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Step-by-step reference for the sum rule (linear attention without denominator)."""
    return _recurrent(q, k, v, None, scale, initial_state, output_final_state, cu_seqlens)


def _recurrent(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens):
    scale = _resolve_scale(scale, k.shape[-1])
    if cu_seqlens is None:
        return _recurrent_batch(q, k, v, beta, scale, initial_state, output_final_state)
    # Packed sequences: a zero-padded batch, one row per sequence from its own initial state (the zero padding at
    # the end of a row writes nothing). tests/test_ops.py checks this against running each sequence on its own.
    offsets = check_cu_seqlens_values(cu_seqlens, q.shape[1])
    (q, k, v, beta), index = pack_to_padded((q, k, v, beta), offsets)
    o, state = _recurrent_batch(q, k, v, beta, scale, initial_state, output_final_state)
    return o.flatten(0, 1)[index].unsqueeze(0), state


def _recurrent_scan(q, k, v, beta, scale, initial_state, output_final_state):
    """The step-by-step definition as one `scan` over time (torch's higher-order op): what `auto` runs under
    `torch.onnx.export`, which turns it into an ONNX Scan node. The same step as `_recurrent_batch`, which loops in
    Python instead (a graph can unroll that loop only for a fixed length)."""
    from torch._higher_order_ops.scan import scan

    batch, _, heads, key_dim = k.shape
    dtype = state_dtype_for(q, k, v)
    if initial_state is None:
        state = torch.zeros(batch, heads, key_dim, v.shape[-1], dtype=dtype, device=k.device)
    else:
        state = initial_state.detach().to(dtype)
    is_delta = beta is not None
    beta = beta if is_delta else torch.ones_like(k[..., 0])  # (a placeholder the sum rule's step does not read)

    def step(state, token):
        # Products and sums rather than einsum: einsum's decomposition into bmm inside a Scan body with a dynamic
        # batch size fails in torch.onnx's decomposition pass (torch 2.13).
        q_t, k_t, v_t, beta_t = token
        write = v_t
        if is_delta:
            write = beta_t[..., None] * (v_t - (k_t[..., :, None] * state).sum(-2))
        state = state + k_t[..., :, None] * write[..., None, :]
        return state, (q_t[..., :, None] * state).sum(-2)

    # Time first, and fresh copies: the scan checks its inputs for overlap, which it cannot decide for views with
    # symbolic strides (the short convolution's output); detached: ONNX is for inference, and the scan's autograd
    # form fails in torch.onnx's type-promotion pass (torch 2.13).
    tokens = [x.detach().to(dtype).transpose(0, 1).clone(memory_format=torch.contiguous_format)
              for x in (q, k, v, beta)]
    state, o = scan(step, state, tokens)
    # (scaled outside the body: torch.onnx's type-promotion pass fails on a Python number inside a Scan body)
    return (scale * o.transpose(0, 1)).to(v.dtype), (state if output_final_state else None)


def _recurrent_batch(q, k, v, beta, scale, initial_state, output_final_state):
    batch, length, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    dtype = state_dtype_for(q, k, v)
    out_dtype = v.dtype
    if initial_state is None:
        state = torch.zeros(batch, heads, key_dim, value_dim, dtype=dtype, device=k.device)
    else:
        state = initial_state.to(dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    beta = None if beta is None else beta.to(dtype)
    outputs = []
    for t in range(length):
        k_t, v_t = k[:, t], v[:, t]  # [B, H, K], [B, H, V]
        if beta is None:
            write = v_t
        else:
            retrieved = torch.einsum("bhk,bhkv->bhv", k_t, state)  # old memory's answer to k_t
            write = beta[:, t, :, None] * (v_t - retrieved)
        state = state + k_t[..., :, None] * write[..., None, :]
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))  # read after the write
    if outputs:
        o = torch.stack(outputs, dim=1)
    else:
        o = v.new_zeros(batch, 0, heads, value_dim)
    return o.to(out_dtype), (state if output_final_state else None)
