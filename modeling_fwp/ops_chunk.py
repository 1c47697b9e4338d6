"""Pure-PyTorch chunkwise-parallel delta rule (WY/UT transform, Yang et al. 2024) and chunked sum rule.

Per head and chunk of C tokens (rows of Q, K, V; beta a vector), state S [K, V] entering the chunk:

    A  = strict_lower(diag(beta) K K^T)           T = (I + A)^{-1}    (unit lower triangular)
    W  = T diag(beta) K,   U = T diag(beta) V      (WY factors of the C Householder-like updates)
    Un = U - W S                                    (the chunk's pseudo-values u_t given the incoming S)
    O  = Q S + lower_incl_diag(Q K^T) Un,           S_next = S + K^T Un

The delta rule runs in blocks of consecutive chunks (a few thousand token-head rows, so that a block's operands
stay in cache): per block, everything that does not depend on S (Gram matrices, T, scores) in batched matmuls over
all its chunks and heads, then the S recurrence over its chunks, three small matmuls per step for all heads at
once (Un is computed there as T diag(beta) (V - K S), so W and U are never materialised), then the block's
outputs. Its hand-written backward runs the same structure in reverse, much faster than autograd through the
loop. Tails are padded with k = v = q = 0 and beta = 0, which leaves the state unchanged, so any T works; packed
sequences (cu_seqlens) are scattered into a zero-padded batch (`ops_common.pack_to_padded`).
"""

from __future__ import annotations

import math
import re

import torch
from torch.autograd.function import once_differentiable

from .ops_common import check_cu_seqlens_values, pack_to_padded, state_dtype_for

__all__ = ["delta_rule_chunk", "sum_rule_chunk", "unit_lower_inverse"]


def _diagonal_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[N, C, C] (contiguous) -> [N, C / block, block, block] view of the diagonal blocks."""
    count, size, _ = x.shape
    return x.as_strided((count, size // block, block, block), (size * size, block * size + block, size, 1),
                        x.storage_offset())


def unit_lower_inverse(strict_lower: torch.Tensor, block: int = 8, out: torch.Tensor | None = None) -> torch.Tensor:
    """(I + A)^{-1} for a batch [N, C, C] of strictly lower triangular A, by blockwise doubling with matmuls.

    Batched LAPACK solves (torch.linalg.solve_triangular) cost ~2.5 matmuls' time here on CPU and scale badly
    over threads. Here: the diagonal blocks of 8 by forward substitution, vectorised over all N * C / 8 blocks at
    once (in a [8, 8, N * C / 8] layout, so each of the 7 steps is one long elementwise op: exact, and with the
    layout copies ~2.5x faster than the power series (I - A)(I + A^2)(I + A^4) in batched 8x8 matmuls, which MKL
    runs at a few GFLOP/s); then pairs of diagonal blocks merged,
    (I + [[A1, 0], [A21, A2]])^{-1} = [[T1, 0], [-T2 A21 T1, T2]], doubling the block size up to C, each merge two
    batched matmuls per block position on strided views (no gathers). C is padded to `block` times a power of
    two. `out`: a contiguous tensor shaped like `strict_lower` to write the result into (returned).
    """
    count, size, _ = strict_lower.shape
    if not strict_lower.is_contiguous():  # the block views below assume the contiguous layout
        return unit_lower_inverse(strict_lower.contiguous(), block, out)
    padded_size = block
    while padded_size < size:
        padded_size *= 2
    if padded_size != size and size > block:  # ragged sizes (short sequences): zero padding inverts to I
        pad = padded_size - size
        padded = torch.nn.functional.pad(strict_lower, (0, pad, 0, pad))
        inverse = unit_lower_inverse(padded, block)[:, :size, :size]
        return inverse.contiguous() if out is None else out.copy_(inverse)
    block = min(block, size)
    inverse = torch.zeros_like(strict_lower) if out is None else out.zero_()
    # Forward substitution in the diagonal blocks: once row j is final, subtract its multiples from the rows below.
    lower = _diagonal_blocks(strict_lower, block).permute(2, 3, 0, 1).reshape(block, block, -1)
    diagonal = torch.zeros_like(lower)
    diagonal.diagonal(0, 0, 1).fill_(1)
    for j in range(block - 1):
        diagonal[j + 1:, :j + 1].addcmul_(lower[j + 1:, j:j + 1], diagonal[j:j + 1, :j + 1], value=-1)
    _diagonal_blocks(inverse, block).copy_(diagonal.view(block, block, count, -1).permute(2, 3, 0, 1))
    while block < size:
        for start in range(0, size, 2 * block):
            mid, end = start + block, start + 2 * block
            below = torch.bmm(strict_lower[:, mid:end, start:mid], inverse[:, start:mid, start:mid])
            inverse[:, mid:end, start:mid] = torch.bmm(inverse[:, mid:end, mid:end], below).neg_()
        block *= 2
    return inverse


# ----------------------------------------------------------------------------------------------- public entry points


# On CPU the delta rule runs chunks of at most this many tokens: at 32, the forward and the backward are faster than
# at 64 in every pass scripts/bench/bench_ops_cpu.py times (e.g. B = 4, T = 2048 on 2 cores: 40.6 against 55.1 ms forward,
# 118 against 136 ms forward+backward; B = 1, T = 8192: 50.2 against 58.9 ms), as the C x C factors and a block's
# operands stay in cache. The chunk size changes only rounding, not the result.
CPU_MAX_CHUNK_SIZE = 32


def delta_rule_chunk(q, k, v, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                     chunk_size=64):
    """Chunkwise delta rule; same contract as `ops.delta_rule` (o in v.dtype, state in fp32/fp64). On CPU, chunks
    of at most CPU_MAX_CHUNK_SIZE tokens."""
    if q.device.type == "cpu":
        chunk_size = min(chunk_size, CPU_MAX_CHUNK_SIZE)
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

    # A graph keeps the chunk size fixed (a dynamic length may be shorter: zero padding changes nothing).
    size = chunk_size if torch.compiler.is_compiling() else min(chunk_size, length)
    state0 = None if initial_state is None else initial_state.reshape(batch * heads, key_dim, value_dim)
    o, state = core(q, k, v, beta_c, state0, scale, size)
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
    # Copy into the chunk-major layout. Not reshape alone: with B = 1 it merges B into H as a strided view, and every
    # per-chunk matmul downstream would then read (or copy) tokens H*D apart.
    return x.reshape(n_chunks, batch * heads, size, dim).contiguous()


def _from_chunks(x: torch.Tensor, batch: int, heads: int, length: int) -> torch.Tensor:
    n_chunks, _, size, dim = x.shape
    x = x.reshape(n_chunks, batch, heads, size, dim).permute(1, 0, 3, 2, 4)
    return x.reshape(batch, n_chunks * size, heads, dim)[:, :length].contiguous()


# ----------------------------------------------------------------------------------------------- sum rule


def _sum_core(q, k, v, beta, state0, scale, size):
    """[B, T, H, D] in and out; the work is in the chunk layout (`_sum_chunks`)."""
    if torch.compiler.is_compiling():
        return _sum_chunk_op(q, k, v, state0, float(scale), int(size))
    batch, length, heads, _ = k.shape
    o_c, final = _sum_chunks(*(_to_chunks(x, size) for x in (q, k, v)), state0, scale)
    return _from_chunks(o_c, batch, heads, length), final


def _sum_chunks(q, k, v, state0, scale):
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


def _delta_core(q, k, v, beta, state0, scale, size):
    # Save for the backward only when a graph is recorded: inside forward, needs_input_grad is also True under
    # no_grad for inputs that require grad, and saving costs full-length buffers instead of one block's.
    if torch.compiler.is_compiling():
        return _delta_core_op(q, k, v, beta, state0, scale, size)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, beta, state0))
    return _DeltaChunk.apply(q, k, v, beta, state0, scale, size, save)


# Chunks per block: blocks of about this many (token, head) rows, i.e. ~1 MiB per [rows, 64] fp32 operand, so a
# block's operands are still in cache when the chunk loop and the output products reread them (going through all
# chunks per step instead streams every intermediate through memory: ~1.5x slower forward on a 2-core CPU). The
# backward keeps about twice as many temporaries per row, hence its smaller blocks. The Gram matrices and T are
# computed for whole groups of blocks of up to OUTER_ROWS rows: unit_lower_inverse is ~35 small batched ops, each
# a thread barrier, which is what a busy second core punishes, so they are paid once per group instead of once per
# block (T and k for a group take 2 x OUTER_ROWS x 64 floats, 32 MiB at most, without a graph).
BLOCK_ROWS = 4096
BACKWARD_BLOCK_ROWS = 2048
OUTER_ROWS = 65536


def block_chunks(batch_heads: int, size: int, n_chunks: int, rows: int | None = None) -> int:
    """Chunks per block (at least 1, at most all of them) for blocks of about `rows` (default BLOCK_ROWS) rows."""
    return max(1, min(n_chunks, (BLOCK_ROWS if rows is None else rows) // (batch_heads * size)))


def _chunk_view(x: torch.Tensor, start: int, count: int, size: int) -> torch.Tensor:
    """[B, T, H, D] -> view [count, B, H, size, D] of chunks start .. start + count (no copy)."""
    batch, _, heads, dim = x.shape
    return x[:, start * size:(start + count) * size].view(batch, count, size, heads, dim).permute(1, 0, 3, 2, 4)


def _causal_scores(flat_q: torch.Tensor, flat_k: torch.Tensor) -> torch.Tensor:
    """q_i . k_j for j <= i within each chunk (the forward's and the backward's read-out weights)."""
    scores = torch.bmm(flat_q, flat_k.transpose(-1, -2)).tril_()  # causal, diagonal included
    return scores


class _DeltaChunk(torch.autograd.Function):
    """q, k, v [B, T, H, D], beta [B, T, H], state0 [B*H, K, V] or None; returns o [B, T, H, V] and the final state.

    Per chunk, with T = (I + A)^{-1} and S the entering state, the pseudo-values are Un = T diag(b) (V - K S) (the
    same as U - W S of the WY form, without materialising W = T diag(b) K and U = T diag(b) V: that saves two of the
    batched matmuls for one more matmul per step of the loop over chunks). The forward (see BLOCK_ROWS): for each
    group of blocks, the Gram matrices and T in batched matmuls; then block by block, the chunks in order and the
    block's scores and outputs in batched matmuls. Tensors kept for the backward: the chunked q * scale, k and
    beta, T, X = V - K S, Un and the states; the scores are recomputed there (one batched matmul, cheaper than
    writing and rereading them). The backward runs blocks of BACKWARD_BLOCK_ROWS rows in reverse.
    """

    @staticmethod
    def forward(ctx, q, k, v, beta, state0, scale, size, save):
        batch, length, heads, key_dim = k.shape
        value_dim = v.shape[-1]
        bh = batch * heads
        n_chunks = -(-length // size)
        pad = n_chunks * size - length
        if pad:  # zero tail: q = k = v = 0 and beta = 0 leave the state unchanged and read nothing
            q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
            beta = torch.nn.functional.pad(beta, (0, 0, 0, pad))
        group = block_chunks(bh, size, n_chunks)
        outer = max(1, min(n_chunks, OUTER_ROWS // (bh * size)) // group) * group  # chunks per group of blocks
        # With save, every buffer spans all chunks (kept for the backward); without, one block's or one outer
        # group's, reused.
        rows, outer_rows = (n_chunks, n_chunks) if save else (group, outer)
        new = q.new_empty
        q_c, k_c, beta_c = new(rows, bh, size, key_dim), new(outer_rows, bh, size, key_dim), new(outer_rows, bh, size)
        residual, pseudo = new(rows, bh, size, value_dim), new(rows, bh, size, value_dim)  # X, Un
        inverse = new(outer_rows, bh, size, size)
        states = new(rows + 1, bh, key_dim, value_dim)  # states[c]: the state entering chunk c
        if state0 is None:
            states[0].zero_()
        else:
            states[0].copy_(state0)
        o = new(batch, n_chunks * size, heads, value_dim)

        for outer_start in range(0, n_chunks, outer):
            outer_count = min(outer, n_chunks - outer_start)
            base = 0 if save else outer_start  # chunk index - base = row in the outer-sized buffers
            span = slice(outer_start - base, outer_start - base + outer_count)
            chunked = lambda buffer, dim: buffer[span].view(outer_count, batch, heads, size, dim)  # noqa: E731
            chunked(k_c, key_dim).copy_(_chunk_view(k, outer_start, outer_count, size))
            chunked(beta_c[..., None], 1).copy_(_chunk_view(beta[..., None], outer_start, outer_count, size))
            flat_k, flat_beta = _flat(k_c[span]), _flat(beta_c[span])
            lower = torch.bmm(flat_k, flat_k.transpose(-1, -2)).mul_(flat_beta[..., None]).tril_(-1)  # A
            unit_lower_inverse(lower, out=_flat(inverse[span]))  # T = (I + A)^{-1}
            del lower

            for start in range(outer_start, outer_start + outer_count, group):
                count = min(group, outer_start + outer_count - start)
                at = start if save else 0  # this block's first row in the block-sized buffers
                blk, outer_blk = slice(at, at + count), slice(start - base, start - base + count)
                chunked = lambda buffer, dim: buffer[blk].view(count, batch, heads, size, dim)  # noqa: E731
                # Chunk-layout copies from the (strided) inputs, the scale folded into q (o_t = scale S_t^T q_t).
                torch.mul(_chunk_view(q, start, count, size), scale, out=chunked(q_c, key_dim))
                chunked(residual, value_dim).copy_(_chunk_view(v, start, count, size))

                # Sequential part: X = V - K S in place over the copy of V, then Un = T diag(b) X, S += K^T Un
                # (beta applied once per chunk to the C x C factor instead of to both K and V).
                block_states = states[at:at + count + 1]
                block_k, block_x, block_un = k_c[outer_blk], residual[blk], pseudo[blk]
                block_t = inverse[outer_blk] * beta_c[outer_blk][:, :, None, :]
                k_t = block_k.transpose(-1, -2)
                for c in range(count):
                    block_x[c].baddbmm_(block_k[c], block_states[c], alpha=-1)
                    torch.bmm(block_t[c], block_x[c], out=block_un[c])
                    torch.baddbmm(block_states[c], k_t[c], block_un[c], out=block_states[c + 1])

                # o = (scale Q) S + scores Un, written straight into the [B, T, H, V] output.
                flat_q = _flat(q_c[blk])
                scores = _causal_scores(flat_q, _flat(block_k))
                o_blk = torch.bmm(flat_q, _flat(block_states[:-1])).baddbmm_(scores, _flat(block_un))
                del scores
                chunk_o = o[:, start * size:(start + count) * size].view(batch, count, size, heads, value_dim)
                chunk_o.copy_(o_blk.view(count, batch, heads, size, value_dim).permute(1, 0, 3, 2, 4))
                if not save and start + count < n_chunks:
                    states[0].copy_(block_states[-1])  # the next block starts where this one ended

        final = block_states[-1].clone()
        if save:
            ctx.save_for_backward(q_c, k_c, beta_c, inverse, residual, pseudo, states)
        ctx.has_state0 = state0 is not None
        ctx.scale, ctx.batch, ctx.length = scale, batch, length
        return (o[:, :length].contiguous() if pad else o), final

    @staticmethod
    @once_differentiable  # a hand-written backward: no double backward (e.g. no gradient penalties)
    def backward(ctx, grad_o, grad_final):
        q, k, beta, inverse, residual, pseudo, states = ctx.saved_tensors  # chunk layout; q holds scale * q
        n_chunks, bh, size, key_dim = k.shape
        value_dim = pseudo.shape[-1]
        batch, length = ctx.batch, ctx.length
        heads = bh // batch
        padded = n_chunks * size
        if grad_o is None:
            grad_o = q.new_zeros(batch, padded, heads, value_dim)
        elif padded != length:
            grad_o = torch.nn.functional.pad(grad_o, (0, 0, 0, 0, 0, padded - length))
        # The gradients, written block by block straight into the [B, T, H, D] layout.
        d_q_all, d_k_all = q.new_empty(batch, padded, heads, key_dim), q.new_empty(batch, padded, heads, key_dim)
        d_v_all, d_beta_all = q.new_empty(batch, padded, heads, value_dim), q.new_empty(batch, padded, heads, 1)
        d_state = q.new_zeros(bh, key_dim, value_dim) if grad_final is None else grad_final.clone()  # dL/dS_end

        # Blocks in reverse, like the forward's (see BLOCK_ROWS): their tensors stay in cache through the reverse
        # loop and the batched gradient products.
        group = block_chunks(bh, size, n_chunks, BACKWARD_BLOCK_ROWS)
        grad_o_c = q.new_empty(group, bh, size, value_dim)
        for start in reversed(range(0, n_chunks, group)):
            count = min(group, n_chunks - start)
            blk = slice(start, start + count)
            tokens = slice(start * size, (start + count) * size)
            grad_o_c[:count].view(count, batch, heads, size, value_dim).copy_(_chunk_view(grad_o, start, count, size))
            flat_q, flat_k, flat_beta, flat_do = _flat(q[blk]), _flat(k[blk]), _flat(beta[blk]), _flat(grad_o_c[:count])
            flat_pseudo, flat_residual = _flat(pseudo[blk]), _flat(residual[blk])
            block_k, k_beta = k[blk], k[blk] * beta[blk][..., None]
            scores = _causal_scores(flat_q, flat_k)

            # Reverse sequential part, d_states[c] = dL/dS_c (S_c entering chunk c of the block):
            #   dUn_c = scores_c^T dO_c + K_c dS_{c+1};   dX~_c = T_c^T dUn_c (d_residual)
            #   dS_c  = dS_{c+1} + Q_c^T dO_c - (diag(b) K_c)^T dX~_c
            d_pseudo = torch.bmm(scores.transpose(-1, -2), flat_do).view(count, bh, size, value_dim)
            d_states = q.new_empty(count + 1, bh, key_dim, value_dim)
            torch.bmm(flat_q.transpose(-1, -2), flat_do, out=_flat(d_states[:count]))
            d_states[count].copy_(d_state)
            d_residual = torch.empty_like(d_pseudo)
            inverse_t, k_beta_t = inverse[blk].transpose(-1, -2), k_beta.transpose(-1, -2)
            for c in range(count - 1, -1, -1):
                d_pseudo[c].baddbmm_(block_k[c], d_states[c + 1])
                torch.bmm(inverse_t[c], d_pseudo[c], out=d_residual[c])
                d_states[c].add_(d_states[c + 1]).baddbmm_(k_beta_t[c], d_residual[c], alpha=-1)
            d_state.copy_(d_states[0])
            del d_pseudo

            # Batched over the block: q, k from the output and the state write.
            flat_d_residual = _flat(d_residual)
            entering = _flat(states[blk]).transpose(-1, -2)
            d_scores = torch.bmm(flat_do, flat_pseudo.transpose(-1, -2)).tril_()
            d_q = torch.baddbmm(torch.bmm(flat_do, entering), d_scores, flat_k).mul_(ctx.scale)
            d_k = torch.baddbmm(torch.bmm(d_scores.transpose(-1, -2), flat_q), flat_pseudo,
                                _flat(d_states[1:]).transpose(-1, -2))
            del d_scores, scores, d_states
            # Un = T diag(b) X with T = (I + A)^{-1}: with dX~ = T^T dUn (d_residual), dA = -dX~ (T diag(b) X)^T =
            # -dX~ Un^T, d(diag(b) X) = dX~, so through X = V - K S: dV = diag(b) dX~, dK = -diag(b) dX~ S^T and
            # db = rowsum(dX~ * X).
            d_lower = torch.bmm(flat_d_residual, flat_pseudo.transpose(-1, -2)).tril_(-1).neg_()
            d_k_beta = torch.bmm(flat_d_residual, entering).neg_()
            # A_ij = b_i k_i . k_j (i > j): dK += diag(b) dA K + dA^T diag(b) K and db_i += k_i . (dA K)_i
            d_lower_k = torch.bmm(d_lower, flat_k)
            d_beta = (d_lower_k * flat_k).sum(-1).add_((flat_d_residual * flat_residual).sum(-1))
            d_k.addcmul_(d_lower_k, flat_beta[..., None]).baddbmm_(d_lower.transpose(-1, -2), _flat(k_beta))
            del d_lower, d_lower_k
            d_k.addcmul_(d_k_beta, flat_beta[..., None])
            d_v = flat_d_residual.mul_(flat_beta[..., None])

            for grad, out, dim in ((d_q, d_q_all, key_dim), (d_k, d_k_all, key_dim), (d_v, d_v_all, value_dim),
                                   (d_beta, d_beta_all, 1)):
                out[:, tokens].view(batch, count, size, heads, dim).copy_(
                    grad.view(count, batch, heads, size, dim).permute(1, 0, 3, 2, 4))

        trim = (lambda x: x) if padded == length else (lambda x: x[:, :length])  # noqa: E731
        d_state0 = d_state if ctx.has_state0 else None
        return (trim(d_q_all), trim(d_k_all), trim(d_v_all), trim(d_beta_all[..., 0]), d_state0, None, None, None)


# ----------------------------------------------------------------------------------------------- as a custom op
# torch.compile and torch.export see the chunkwise delta rule as one opaque operator per call: its Python loops
# run over a number of chunks that depends on the sequence length, which a graph cannot hold for a dynamic length.
# The forward also returns what the backward needs (empty when no gradient is wanted), flattened to 1-D: a
# [n_chunks, ...] shape would make the tracer guard on n_chunks != 1. The backward is the same hand-written one.
# The library name carries this module's name: the package and a trust_remote_code copy of it can be imported in
# one process, and an operator name can be registered once.
_LIBRARY = "fwp_" + re.sub(r"\W", "_", __name__)


def _saved_shapes(batch, length, heads, key_dim, value_dim, size):
    """Shapes of the tensors `_DeltaChunk.forward` saves: chunked q, k, beta, T, X, Un and the states."""
    n, bh = (length + size - 1) // size, batch * heads
    return [(n, bh, size, key_dim), (n, bh, size, key_dim), (n, bh, size), (n, bh, size, size),
            (n, bh, size, value_dim), (n, bh, size, value_dim), (n + 1, bh, key_dim, value_dim)]


class _Context:
    """Stands in for the autograd context that `_DeltaChunk.forward` / `backward` read and write."""

    def __init__(self, saved_tensors=(), **fields):
        self.saved_tensors = saved_tensors
        self.__dict__.update(fields)

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


# (The operators' types are spelt out, not aliased: older torch releases may evaluate a postponed annotation
# outside this module.)
@torch.library.custom_op(f"{_LIBRARY}::delta_chunk", mutates_args=())
def _delta_chunk_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                    state0: torch.Tensor | None, scale: float, size: int, save: bool,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor, torch.Tensor, torch.Tensor]:
    ctx = _Context()
    o, final = _DeltaChunk.forward(ctx, q, k, v, beta, state0, scale, size, save)
    saved = [t.reshape(-1) for t in ctx.saved_tensors] if save else [q.new_empty(0)] * 7
    return (o, final, *saved)


@_delta_chunk_op.register_fake
def _(q, k, v, beta, state0, scale, size, save):
    batch, length, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    shapes = _saved_shapes(batch, length, heads, key_dim, value_dim, size)
    saved = [q.new_empty(math.prod(shape) if save else 0) for shape in shapes]
    return (q.new_empty(batch, length, heads, value_dim), q.new_empty(batch * heads, key_dim, value_dim), *saved)


@torch.library.custom_op(f"{_LIBRARY}::delta_chunk_backward", mutates_args=())
def _delta_chunk_backward_op(grad_o: torch.Tensor | None, grad_final: torch.Tensor | None,
                             saved: list[torch.Tensor], scale: float, batch: int, length: int, heads: int,
                             key_dim: int, value_dim: int, size: int,
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    shapes = _saved_shapes(batch, length, heads, key_dim, value_dim, size)
    ctx = _Context(tuple(t.view(shape) for t, shape in zip(saved, shapes)), has_state0=True, scale=scale,
                   batch=batch, length=length)
    return tuple(grad.contiguous() for grad in _DeltaChunk.backward(ctx, grad_o, grad_final)[:5])  # as the fake


@_delta_chunk_backward_op.register_fake
def _(grad_o, grad_final, saved, scale, batch, length, heads, key_dim, value_dim, size):
    new = saved[0].new_empty
    return (new(batch, length, heads, key_dim), new(batch, length, heads, key_dim),
            new(batch, length, heads, value_dim), new(batch, length, heads), new(batch * heads, key_dim, value_dim))


def _delta_chunk_setup(ctx, inputs, output):
    q, v, state0, scale, size = inputs[0], inputs[2], inputs[4], inputs[5], inputs[6]
    ctx.save_for_backward(*output[2:])
    ctx.arguments = (scale, *q.shape, v.shape[-1], size)
    ctx.has_state0 = state0 is not None


def _delta_chunk_grad(ctx, grad_o, grad_final, *unused):
    contiguous = lambda x: None if x is None else x.contiguous()  # noqa: E731
    d_q, d_k, d_v, d_beta, d_state0 = _delta_chunk_backward_op(
        contiguous(grad_o), contiguous(grad_final), list(ctx.saved_tensors), *ctx.arguments)
    return d_q, d_k, d_v, d_beta, (d_state0 if ctx.has_state0 else None), None, None, None


_delta_chunk_op.register_autograd(_delta_chunk_grad, setup_context=_delta_chunk_setup)


def _delta_core_op(q, k, v, beta, state0, scale, size):
    """`_delta_core` as the custom operator (under torch.compile / torch.export)."""
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, beta, state0))
    o, final = _delta_chunk_op(q, k, v, beta, state0, float(scale), int(size), save)[:2]
    return o, final


@torch.library.custom_op(f"{_LIBRARY}::sum_chunk", mutates_args=())
def _sum_chunk_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state0: torch.Tensor | None, scale: float,
                  size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked sum rule as one operator: its chunk reshapes would make the tracer guard on the chunk count."""
    o, final = _sum_core(q, k, v, None, state0, scale, size)
    return o, final.clone()  # (an operator's outputs may not alias each other: o and final never do, but to be sure)


@_sum_chunk_op.register_fake
def _(q, k, v, state0, scale, size):
    batch, length, heads, key_dim = k.shape
    return q.new_empty(batch, length, heads, v.shape[-1]), q.new_empty(batch * heads, key_dim, v.shape[-1])


def _sum_chunk_setup(ctx, inputs, output):
    q, k, v, state0, ctx.scale, ctx.size = inputs
    ctx.save_for_backward(q, k, v, state0)
    ctx.has_state0 = state0 is not None


def _sum_chunk_grad(ctx, grad_o, grad_final):
    """The sum rule's gradients are sum rules again, so the backward is three calls of the operator. With
    G_j = dS_end + scale sum_{t >= j} q_t do_t^T (what S_j's gradient is): dq_t = scale S_t do_t (forward in time,
    writing v_t k_t^T from S_0^T), dk_j = G_j v_j and dv_j = G_j^T k_j (backward in time, from dS_end), dS_0 = G_0."""
    q, k, v, state0 = ctx.saved_tensors
    batch, _, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    if grad_o is None:
        grad_o = torch.zeros_like(v)
    if grad_final is None:
        grad_final = q.new_zeros(batch * heads, key_dim, value_dim)
    if state0 is None:
        state0 = q.new_zeros(batch * heads, key_dim, value_dim)
    d_q = _sum_chunk_op(grad_o, v, k, state0.transpose(-1, -2).contiguous(), ctx.scale, ctx.size)[0]
    flip = lambda x: x.flip(1)  # noqa: E731
    scaled_q, grad_o_r = flip(q) * ctx.scale, flip(grad_o)
    d_k = _sum_chunk_op(flip(v), grad_o_r, scaled_q, grad_final.transpose(-1, -2).contiguous(), 1.0, ctx.size)[0]
    d_v, d_state0 = _sum_chunk_op(flip(k), scaled_q, grad_o_r, grad_final.contiguous(), 1.0, ctx.size)
    return d_q, flip(d_k), flip(d_v), (d_state0 if ctx.has_state0 else None), None, None


_sum_chunk_op.register_autograd(_sum_chunk_grad, setup_context=_sum_chunk_setup)
