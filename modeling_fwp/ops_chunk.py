"""Pure-PyTorch chunkwise-parallel delta rule (WY/UT transform, Yang et al. 2024) and chunked sum rule.

Per head and chunk of C tokens (rows of Q, K, V; beta a vector), state S [K, V] entering the chunk:

    A  = strict_lower(diag(beta) K K^T)           T = (I + A)^{-1}    (unit lower triangular)
    W  = T diag(beta) K,   U = T diag(beta) V      (WY factors of the C Householder-like updates)
    Un = U - W S                                    (the chunk's pseudo-values u_t given the incoming S)
    O  = Q S + lower_incl_diag(Q K^T) Un,           S_next = S + K^T Un

Everything except the S recurrence is batched over all chunks at once; the loop over chunks does three small
matmuls per step (Un is computed there as T diag(beta) (V - K S), so W and U are never materialised). The delta
rule has a hand-written backward (the same structure run in reverse), much faster than autograd through the loop.
Tails are padded with k = v = q = 0 and beta = 0, which leaves the state unchanged, so any T works; packed
sequences (cu_seqlens) are scattered into a zero-padded batch.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = [
    "check_cu_seqlens_values", "delta_rule_chunk", "pack_to_padded", "state_dtype_for", "sum_rule_chunk",
    "unit_lower_inverse",
]


def state_dtype_for(*tensors: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 if any input is float64, else float32 (also for bf16/fp16 inputs)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def packed_sequence_count(batch_size: int, cu_seqlens: torch.Tensor | None) -> int:
    """N: the batch rows, or the sequences that `cu_seqlens` marks in a batch of one packed row."""
    if cu_seqlens is None:
        return batch_size
    if batch_size != 1:
        raise ValueError(f"with cu_seqlens the batch size B must be 1, got {batch_size}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor [N+1] with N >= 1")
    return cu_seqlens.numel() - 1


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, total_length: int) -> list[int]:
    """Offsets as a Python list after checking 0 = cu[0] <= cu[1] <= ... <= cu[-1] = T (reads them on the host)."""
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != total_length or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing from 0 to T = {total_length}, got {offsets}")
    return offsets


def unit_lower_inverse(strict_lower: torch.Tensor, block: int = 8) -> torch.Tensor:
    """(I + A)^{-1} for a batch [N, C, C] of strictly lower triangular A, by block forward substitution.

    Batched LAPACK solves (torch.linalg.solve_triangular) cost ~2.5 matmuls' time here on CPU and scale badly
    over threads; this uses only batched matmuls. Diagonal blocks: A_ii is nilpotent, so
    (I + A_ii)^{-1} = (I - A_ii)(I + A_ii^2)(I + A_ii^4)... exactly; blocks of 8 keep the intermediate powers
    small (entries at most C(7, 3) times those of A) so fp32 stays accurate. Then block row i:
    T_i,<i = -T_ii A_i,<i T_<i,<i.
    """
    count, size, _ = strict_lower.shape
    if not strict_lower.is_contiguous():  # the block views below assume the contiguous layout
        return unit_lower_inverse(strict_lower.contiguous(), block)
    if size % block:  # ragged sizes (short sequences): zero-pad to whole blocks, the padding inverts to I
        pad = block - size % block
        padded = torch.nn.functional.pad(strict_lower, (0, pad, 0, pad))
        return unit_lower_inverse(padded, block)[:, :size, :size].contiguous()
    blocks = size // block
    diagonal_view = lambda x: x.as_strided(  # noqa: E731  [N, blocks, block, block] view of the diagonal blocks
        (count, blocks, block, block), (size * size, block * size + block, size, 1), x.storage_offset()
    )
    minus_a = diagonal_view(strict_lower).reshape(count * blocks, block, block).neg()
    inverse_diagonal = minus_a + torch.eye(block, dtype=minus_a.dtype, device=minus_a.device)
    power = minus_a
    for _ in range((block - 1).bit_length() - 1):  # powers 2, 4, ... below the block size
        power = torch.bmm(power, power)
        inverse_diagonal = torch.baddbmm(inverse_diagonal, inverse_diagonal, power)
    inverse_diagonal = inverse_diagonal.view(count, blocks, block, block)
    inverse = torch.zeros_like(strict_lower)
    diagonal_view(inverse).copy_(inverse_diagonal)
    for i in range(1, blocks):
        rows, done = slice(i * block, (i + 1) * block), i * block
        below = torch.bmm(strict_lower[:, rows, :done], inverse[:, :done, :done])
        inverse[:, rows, :done] = torch.bmm(inverse_diagonal[:, i], below).neg_()
    return inverse


# ----------------------------------------------------------------------------------------------- public entry points


def delta_rule_chunk(q, k, v, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                     chunk_size=64):
    """Chunkwise delta rule; same contract as `ops.delta_rule` (o in v.dtype, state in fp32/fp64)."""
    return _run(_delta_core, q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size)


def sum_rule_chunk(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                   chunk_size=64):
    """Chunked linear attention (sum rule); same contract as `ops.sum_rule`."""
    return _run(_sum_core, q, k, v, None, scale, initial_state, output_final_state, cu_seqlens, chunk_size)


# ----------------------------------------------------------------------------------------------- layout


def _run(core, q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
    key_dim = k.shape[-1]
    scale = key_dim**-0.5 if scale is None else float(scale)
    dtype = state_dtype_for(q, k, v)
    out_dtype = v.dtype
    beta_c = None if beta is None else beta.to(dtype)  # sum rule: no beta
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if initial_state is not None:
        initial_state = initial_state.to(dtype)

    gather = None  # packed case: where each packed token sits in the padded batch
    if cu_seqlens is not None:
        (q, k, v, beta_c), gather = pack_to_padded((q, k, v, beta_c), check_cu_seqlens_values(cu_seqlens, q.shape[1]))

    batch, length, heads, _ = k.shape
    value_dim = v.shape[-1]
    if length == 0:
        state = (initial_state if initial_state is not None
                 else q.new_zeros(batch, heads, key_dim, value_dim))
        o = v.new_zeros(1 if gather is not None else batch, 0 if gather is None else gather.numel(), heads, value_dim)
        return o.to(out_dtype), (state if output_final_state else None)

    size = min(chunk_size, length)
    q_c, k_c, v_c = (_to_chunks(x, size) for x in (q, k, v))
    beta_cc = None if beta_c is None else _to_chunks(beta_c[..., None], size)[..., 0]
    state0 = None if initial_state is None else initial_state.reshape(batch * heads, key_dim, value_dim)
    o_c, state = core(q_c, k_c, v_c, beta_cc, state0, scale)
    o = _from_chunks(o_c, batch, heads, length)
    if gather is not None:
        o = o.reshape(-1, heads, value_dim).index_select(0, gather).unsqueeze(0)
    state = state.reshape(batch, heads, key_dim, value_dim) if output_final_state else None
    return o.to(out_dtype), state


def _to_chunks(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, T, H, D] -> [n_chunks, B*H, size, D], zero-padding the tail; contiguous so each chunk is one slab."""
    batch, length, heads, dim = x.shape
    pad = (-length) % size
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
    n_chunks = (length + pad) // size
    x = x.reshape(batch, n_chunks, size, heads, dim).permute(1, 0, 3, 2, 4)
    return x.reshape(n_chunks, batch * heads, size, dim)  # reshape copies into the chunk-major layout


def _from_chunks(x: torch.Tensor, batch: int, heads: int, length: int) -> torch.Tensor:
    n_chunks, _, size, dim = x.shape
    x = x.reshape(n_chunks, batch, heads, size, dim).permute(1, 0, 3, 2, 4)
    return x.reshape(batch, n_chunks * size, heads, dim)[:, :length].contiguous()


def pack_to_padded(tensors, offsets):
    """Scatter packed [1, T, ...] sequences into zero-padded [N, max_len, ...] batches (padding at the end).

    Returns the padded tensors (None stays None) and `index`, the row of each packed token in the padded batch
    flattened to [N * max_len, ...]; `padded.flatten(0, 1)[index]` gives the packed tensor back. Zero padding at
    the end of a sequence (k = 0, beta = 0) never changes its state, so the padded batch runs as is.
    """
    device = next(t for t in tensors if t is not None).device
    starts = torch.tensor(offsets[:-1], device=device)
    lengths = torch.tensor(offsets[1:], device=device) - starts
    num, max_len = len(offsets) - 1, max(b - a for a, b in zip(offsets, offsets[1:]))
    sequence = torch.repeat_interleave(torch.arange(num, device=device), lengths)
    index = torch.arange(offsets[-1], device=device) - starts[sequence] + sequence * max_len

    def scatter(x):
        if x is None:
            return None
        flat = x.new_zeros(num * max_len, *x.shape[2:])
        return flat.index_copy(0, index, x[0]).reshape(num, max_len, *x.shape[2:])

    return [scatter(t) for t in tensors], index


# ----------------------------------------------------------------------------------------------- sum rule


def _sum_core(q, k, v, beta, state0, scale):
    """Chunked linear attention: chunk-boundary states by a cumulative sum, no sequential loop at all."""
    size = k.shape[2]
    increments = k.transpose(-1, -2) @ v  # [n, BH, K, V]: each chunk's total write
    totals = increments.cumsum(0)
    states = torch.cat([torch.zeros_like(totals[:1]), totals[:-1]])  # state entering each chunk
    final = totals[-1]
    if state0 is not None:
        states = states + state0
        final = final + state0
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0)
    return torch.bmm(_flat(scores), _flat(v)).baddbmm_(_flat(q), _flat(states)).mul_(scale).view_as(v), final


# ----------------------------------------------------------------------------------------------- delta rule


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[n, BH, ...] -> [n * BH, ...]: batch all chunks of all heads in one bmm."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _delta_core(q, k, v, beta, state0, scale):
    return _DeltaChunk.apply(q, k, v, beta, state0, scale)


class _DeltaChunk(torch.autograd.Function):
    """Inputs in chunk layout [n, BH, C, D], beta [n, BH, C], state0 [BH, K, V] or None; o is multiplied by scale.

    Per chunk, with T = (I + A)^{-1} and S the entering state, the pseudo-values are Un = T (diag(b) V - diag(b) K S)
    (the same as U - W S of the WY form, without materialising W = T diag(b) K and U = T diag(b) V: that saves two
    of the batched matmuls for one more matmul per step of the loop over chunks).
    """

    @staticmethod
    def forward(ctx, q, k, v, beta, state0, scale):
        n_chunks, bh, size, key_dim = k.shape
        value_dim = v.shape[-1]
        flat_q, flat_k, flat_beta = _flat(q), _flat(k), _flat(beta)

        gram = torch.bmm(flat_k, flat_k.transpose(-1, -2))  # k_i . k_j, kept for the backward
        lower = (gram * flat_beta[..., None]).tril_(-1)  # A = strict_lower(diag(beta) K K^T)
        inverse = unit_lower_inverse(lower).view(n_chunks, bh, size, size)  # T = (I + A)^{-1}
        del lower
        k_beta = k * beta[..., None]
        # X = diag(b) (V - K S): what each token would write, before T couples them. Built in place from diag(b) V.
        residual = v * beta[..., None]

        # Sequential part: states[c] is the state entering chunk c, states[n] the final one.
        states = k.new_empty(n_chunks + 1, bh, key_dim, value_dim)
        if state0 is None:
            states[0].zero_()
        else:
            states[0].copy_(state0)
        pseudo = torch.empty_like(v)  # Un = T X
        k_t = k.transpose(-1, -2)
        for c in range(n_chunks):
            residual[c].baddbmm_(k_beta[c], states[c], alpha=-1)
            torch.bmm(inverse[c], residual[c], out=pseudo[c])
            torch.baddbmm(states[c], k_t[c], pseudo[c], out=states[c + 1])

        scores = torch.bmm(flat_q, flat_k.transpose(-1, -2)).tril_()  # causal, diagonal included
        # o = scale (Q S + scores Un); beta != 1 in baddbmm is a slow path on CPU, so scale in place afterwards.
        o = torch.bmm(scores, _flat(pseudo)).baddbmm_(flat_q, _flat(states[:-1])).mul_(scale)
        ctx.save_for_backward(q, k, v, beta, gram, inverse, k_beta, states, residual, pseudo, scores)
        ctx.has_state0 = state0 is not None
        ctx.scale = scale
        return o.view(n_chunks, bh, size, value_dim), states[-1].clone()

    @staticmethod
    @once_differentiable  # a hand-written backward: no double backward (e.g. no gradient penalties)
    def backward(ctx, grad_o, grad_final):
        q, k, v, beta, gram, inverse, k_beta, states, residual, pseudo, scores = ctx.saved_tensors
        n_chunks, bh, size, key_dim = k.shape
        flat_q, flat_k, flat_v, flat_beta = _flat(q), _flat(k), _flat(v), _flat(beta)
        if grad_o is None:
            grad_o = torch.zeros_like(pseudo)
        grad_o = _flat(grad_o * ctx.scale)  # o = scale * (...): fold the scale into the incoming gradient once

        # Reverse sequential part. d_states[c] = dL/dS_c, d_pseudo[c] = dL/dUn_c, d_residual[c] = dL/dX_c.
        #   dUn_c = scores_c^T dO_c + K_c dS_{c+1};   dX_c = T_c^T dUn_c
        #   dS_c  = dS_{c+1} + Q_c^T dO_c - (diag(b) K_c)^T dX_c
        from_output = torch.bmm(scores.transpose(-1, -2), grad_o).view_as(pseudo)
        from_read = torch.bmm(flat_q.transpose(-1, -2), grad_o).view(n_chunks, bh, key_dim, -1)
        d_states = torch.empty_like(states)
        if grad_final is None:
            d_states[-1].zero_()
        else:
            d_states[-1].copy_(grad_final)
        d_pseudo = torch.empty_like(pseudo)
        d_residual = torch.empty_like(pseudo)
        inverse_t, k_beta_t = inverse.transpose(-1, -2), k_beta.transpose(-1, -2)
        for c in range(n_chunks - 1, -1, -1):
            torch.baddbmm(from_output[c], k[c], d_states[c + 1], out=d_pseudo[c])
            torch.bmm(inverse_t[c], d_pseudo[c], out=d_residual[c])
            torch.baddbmm(d_states[c + 1] + from_read[c], k_beta_t[c], d_residual[c], alpha=-1, out=d_states[c])
        del from_output, from_read

        # Batched over chunks: q, k from the output and the state write.
        flat_pseudo, flat_d_residual = _flat(pseudo), _flat(d_residual)
        entering = _flat(states[:-1]).transpose(-1, -2)
        d_scores = torch.bmm(grad_o, flat_pseudo.transpose(-1, -2)).tril_()
        d_q = torch.baddbmm(torch.bmm(grad_o, entering), d_scores, flat_k)
        d_k = torch.baddbmm(torch.bmm(d_scores.transpose(-1, -2), flat_q), flat_pseudo,
                            _flat(d_states[1:]).transpose(-1, -2))
        del d_scores
        # Through Un = T X with T = (I + A)^{-1}: dT = dUn X^T, so dA = -T^T dT T^T = -(T^T dUn)(T X)^T = -dX Un^T.
        d_lower = torch.bmm(flat_d_residual, flat_pseudo.transpose(-1, -2)).tril_(-1).neg_()
        # Through X = diag(b) V - diag(b) K S:  d(diag(b) K) = -dX S^T,  d(diag(b) V) = dX.
        d_k_beta = torch.bmm(flat_d_residual, entering).neg_()
        # A_ij = b_i k_i . k_j (i > j): with M = diag(b) dA, dK += (M + M^T) K and db_i += sum_j dA_ij k_i . k_j
        d_beta = (d_lower * gram).sum(-1) + (d_k_beta * flat_k).sum(-1) + (flat_d_residual * flat_v).sum(-1)
        scaled = d_lower.mul_(flat_beta[..., None])
        d_k = torch.baddbmm(d_k, scaled + scaled.transpose(-1, -2), flat_k)
        d_k.addcmul_(d_k_beta, flat_beta[..., None])
        d_v = flat_d_residual.mul_(flat_beta[..., None])

        shape_k, shape_v = k.shape, v.shape
        d_state0 = d_states[0] if ctx.has_state0 else None
        return (d_q.view(shape_k), d_k.view(shape_k), d_v.view(shape_v), d_beta.view(beta.shape), d_state0, None)
