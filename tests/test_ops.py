"""Update-rule ops: every CPU backend against the step-by-step reference, in float64 (outputs, states, gradients)."""

import os
from pathlib import Path

import pytest
import torch

from modeling_fwp import ops, ops_chunk
from modeling_fwp.ops import BACKENDS, available_backends, delta_rule, delta_rule_recurrent, sum_rule, sum_rule_recurrent
from modeling_fwp.ops_chunk import block_chunks, unit_lower_inverse

# Triton runs on CPU only through its interpreter; its own tests live with the triton helper's files.
_TRITON_ON_CPU = (Path(ops.__file__).with_name("ops_triton.py").exists() and os.environ.get("TRITON_INTERPRET") == "1"
                  and ops.HAS_TRITON_OPS)
FAST_BACKENDS = ["chunk"] + (["triton"] if _TRITON_ON_CPU else [])


pytestmark = pytest.mark.usefixtures("one_thread")


def _tolerance(backend):
    # Triton kernels compute in fp32 whatever the input; the PyTorch backends honour float64.
    return dict(rtol=1e-3, atol=1e-3) if backend == "triton" else dict(rtol=1e-9, atol=1e-9)


def _inputs(batch, length, heads, key_dim, value_dim, with_state, dtype=torch.float64, num_states=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    q = rand(batch, length, heads, key_dim)
    # Unit-norm keys and beta in (0, 1) keep the delta-rule transitions contractive, as in the model.
    k = torch.nn.functional.normalize(rand(batch, length, heads, key_dim), dim=-1)
    v = rand(batch, length, heads, value_dim)
    beta = torch.rand(batch, length, heads, generator=gen, dtype=dtype)
    state = rand(num_states or batch, heads, key_dim, value_dim) if with_state else None
    return q, k, v, beta, state


def _run_with_grads(rule, backend, q, k, v, beta, state, seed=1, **kwargs):
    """Outputs, final state and gradients (random upstream gradients on o AND the final state)."""
    used = (q, k, v, beta) if rule == "delta" else (q, k, v)
    leaves = [x.detach().clone().requires_grad_() for x in used]
    state_leaf = None if state is None else state.detach().clone().requires_grad_()
    if rule == "delta":
        o, final = delta_rule(*leaves, initial_state=state_leaf, output_final_state=True, backend=backend, **kwargs)
    else:
        o, final = sum_rule(*leaves, initial_state=state_leaf, output_final_state=True, backend=backend, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    grad_o = torch.randn(o.shape, generator=gen, dtype=o.dtype)
    grad_state = torch.randn(final.shape, generator=gen, dtype=final.dtype)
    inputs = leaves + ([state_leaf] if state_leaf is not None else [])
    grads = torch.autograd.grad((o * grad_o).sum() + (final * grad_state).sum(), inputs)
    return [o.detach(), final.detach(), *grads]


def _assert_all_close(actual, expected, **tol):
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected)):  # o, then final state and/or input gradients
        torch.testing.assert_close(a, e, msg=lambda m, i=index: f"result {i} of {len(actual)}: {m}", **tol)


# ----------------------------------------------------------------------------------------------- backends vs reference


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("length", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("dims", [(32, 32), (32, 16), (48, 8)], ids=lambda d: f"K{d[0]}V{d[1]}")
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
def test_backend_matches_recurrent(backend, rule, length, dims, with_state):
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v, beta, state = _inputs(2, length, 2, *dims, with_state, dtype=dtype)
    expected = _run_with_grads(rule, "recurrent", q, k, v, beta, state)
    actual = _run_with_grads(rule, backend, q, k, v, beta, state)
    _assert_all_close(actual, expected, **_tolerance(backend))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("chunk_size", [16, 32])
def test_small_chunks_match_recurrent(backend, chunk_size):
    """Many chunks per sequence and a ragged tail exercise the chunk-to-chunk state recurrence."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v, beta, state = _inputs(1, 77, 3, 16, 24, True, dtype=dtype)
    expected = _run_with_grads("delta", "recurrent", q, k, v, beta, state)
    actual = _run_with_grads("delta", backend, q, k, v, beta, state, chunk_size=chunk_size)
    _assert_all_close(actual, expected, **_tolerance(backend))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_large_key_dim(backend, rule):
    """K up to 512 (DPFP feature maps) with a small V."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v, beta, state = _inputs(1, 70, 1, 512, 16, True, dtype=dtype)
    expected = _run_with_grads(rule, "recurrent", q, k, v, beta, state)
    actual = _run_with_grads(rule, backend, q, k, v, beta, state)
    _assert_all_close(actual, expected, **_tolerance(backend))


@pytest.mark.parametrize("backend", ["recurrent"] + FAST_BACKENDS)
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_packed_sequences_match_separate_runs(backend, rule):
    """One packed call = each sequence run on its own (outputs, states and gradients of the same leaves)."""
    lengths = [5, 0, 70, 64, 1]  # includes a zero-length sequence, whose state must pass through unchanged
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v, beta, state = _inputs(1, sum(lengths), 2, 16, 8, True, dtype=dtype, num_states=len(lengths))
    leaves = [x.requires_grad_() for x in ((q, k, v, beta, state) if rule == "delta" else (q, k, v, state))]
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    offsets = cu_seqlens.tolist()
    gen = torch.Generator().manual_seed(3)
    grad_o = torch.randn(1, sum(lengths), 2, 8, generator=gen, dtype=dtype)
    grad_state = torch.randn(len(lengths), 2, 16, 8, generator=gen, dtype=dtype)

    def call(q, k, v, beta, state, cu_seqlens=None):
        if rule == "delta":
            return delta_rule(q, k, v, beta, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens,
                              backend=backend)
        return sum_rule(q, k, v, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens, backend=backend)

    o, final = call(q, k, v, beta, state, cu_seqlens)
    packed = [o, final, *torch.autograd.grad((o * grad_o).sum() + (final * grad_state).sum(), leaves)]

    outputs, finals, loss = [], [], 0.0
    for index, (start, end) in enumerate(zip(offsets, offsets[1:])):
        o_i, s_i = call(q[:, start:end], k[:, start:end], v[:, start:end], beta[:, start:end], state[index : index + 1])
        outputs.append(o_i)
        finals.append(s_i)
        loss = loss + (o_i * grad_o[:, start:end]).sum() + (s_i * grad_state[index : index + 1]).sum()
    separate = [torch.cat(outputs, dim=1), torch.cat(finals), *torch.autograd.grad(loss, leaves)]
    _assert_all_close(packed, separate, **_tolerance(backend))
    torch.testing.assert_close(final[1], state[1], **_tolerance(backend))  # the empty sequence


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_packed_gradients_match_recurrent(backend, rule):
    lengths = [3, 0, 66, 40]
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v, beta, state = _inputs(1, sum(lengths), 2, 16, 8, True, dtype=dtype, num_states=len(lengths))
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0)  # int64 offsets are accepted too
    expected = _run_with_grads(rule, "recurrent", q, k, v, beta, state, cu_seqlens=cu_seqlens)
    actual = _run_with_grads(rule, backend, q, k, v, beta, state, cu_seqlens=cu_seqlens)
    _assert_all_close(actual, expected, **_tolerance(backend))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_two_segments_equal_one_run(backend):
    """State carry-over (truncated BPTT): run 0..100 then 100..150 from the carried state = run 0..150."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v, beta, _ = _inputs(2, 150, 2, 16, 16, False, dtype=dtype)
    o_full, s_full = delta_rule(q, k, v, beta, output_final_state=True, backend=backend)
    o_a, s_a = delta_rule(q[:, :100], k[:, :100], v[:, :100], beta[:, :100], output_final_state=True, backend=backend)
    o_b, s_b = delta_rule(q[:, 100:], k[:, 100:], v[:, 100:], beta[:, 100:], initial_state=s_a,
                          output_final_state=True, backend=backend)
    torch.testing.assert_close(torch.cat([o_a, o_b], dim=1), o_full, **_tolerance(backend))
    torch.testing.assert_close(s_b, s_full, **_tolerance(backend))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_strided_inputs_and_output_only_gradients(backend):
    """q, k, v as slices of one fused projection (non-contiguous), loss on o only (no final state returned)."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    gen = torch.Generator().manual_seed(5)
    fused = torch.randn(2, 70, 3, 16 + 16 + 8, generator=gen, dtype=dtype, requires_grad=True)
    beta = torch.rand(2, 70, 3, generator=gen, dtype=dtype).requires_grad_()
    state = torch.randn(2, 3, 16, 8, generator=gen, dtype=dtype).requires_grad_()
    grad_o = torch.randn(2, 70, 3, 8, generator=gen, dtype=dtype)
    results = {}
    for name in ("recurrent", backend):
        q, k, v = fused[..., :16], torch.nn.functional.normalize(fused[..., 16:32], dim=-1), fused[..., 32:]
        o, final = delta_rule(q, k, v, beta, initial_state=state, backend=name)
        assert final is None
        results[name] = [o, *torch.autograd.grad((o * grad_o).sum(), (fused, beta, state))]
    _assert_all_close(results[backend], results["recurrent"], **_tolerance(backend))


# ----------------------------------------------------------------------------------------------- blocks of chunks
# The chunk backend's forward and backward run in blocks of block_chunks(B*H, C, n) consecutive chunks (about
# ops_chunk.BLOCK_ROWS token-head rows each, T for groups of blocks of up to OUTER_ROWS rows); the tests above fit
# in one block. These force several blocks and groups, with a ragged last block and a ragged last chunk, so the
# state carried from block to block (forward), dL/dS carried back (backward) and the block- and group-sized
# buffers reused without a graph are all exercised.


def _blocks_of(monkeypatch, chunks, batch_heads, size):
    """Blocks of `chunks` chunks in the forward (T computed for groups of two blocks), and of one chunk fewer (at
    least one) in the backward."""
    monkeypatch.setattr(ops_chunk, "BLOCK_ROWS", chunks * batch_heads * size)
    monkeypatch.setattr(ops_chunk, "OUTER_ROWS", 2 * chunks * batch_heads * size)
    monkeypatch.setattr(ops_chunk, "BACKWARD_BLOCK_ROWS", max(1, chunks - 1) * batch_heads * size)
    assert block_chunks(batch_heads, size, 1000) == chunks


@pytest.mark.parametrize("chunks_per_block", [1, 3, 1000], ids=["1", "3", "all"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
def test_blocks_of_chunks_match_recurrent(monkeypatch, chunks_per_block, with_state):
    """B = 1 and many chunks (13 chunks of 16 tokens, the last one ragged): outputs, final state, every gradient."""
    _blocks_of(monkeypatch, chunks_per_block, 2, 16)
    q, k, v, beta, state = _inputs(1, 16 * 12 + 5, 2, 16, 12, with_state)
    expected = _run_with_grads("delta", "recurrent", q, k, v, beta, state)
    actual = _run_with_grads("delta", "chunk", q, k, v, beta, state, chunk_size=16)
    _assert_all_close(actual, expected, **_tolerance("chunk"))


@pytest.mark.parametrize("chunks_per_block", [1, 2, 1000], ids=["1", "2", "all"])
def test_blocks_of_chunks_without_graph(monkeypatch, chunks_per_block):
    """no_grad (and inputs that require grad under no_grad): block-sized buffers, reused block after block."""
    _blocks_of(monkeypatch, chunks_per_block, 6, 8)
    q, k, v, beta, state = _inputs(2, 8 * 7 + 3, 3, 8, 5, True)
    o_ref, s_ref = delta_rule_recurrent(q, k, v, beta, initial_state=state, output_final_state=True)
    for requires_grad in (False, True):
        leaves = [x.clone().requires_grad_(requires_grad) for x in (q, k, v, beta, state)]
        with torch.no_grad():
            o, final = delta_rule(*leaves[:4], initial_state=leaves[4], output_final_state=True, backend="chunk",
                                  chunk_size=8)
        assert o.is_contiguous() and not o.requires_grad
        _assert_all_close([o, final], [o_ref, s_ref], **_tolerance("chunk"))


@pytest.mark.parametrize("chunks_per_block", [1, 2])
def test_blocks_of_chunks_packed(monkeypatch, chunks_per_block):
    """Packed sequences (cu_seqlens) across several blocks, with one initial state per sequence."""
    lengths = [37, 0, 70, 16, 3]
    _blocks_of(monkeypatch, chunks_per_block, 2 * len(lengths), 16)
    q, k, v, beta, state = _inputs(1, sum(lengths), 2, 16, 8, True, num_states=len(lengths))
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    expected = _run_with_grads("delta", "recurrent", q, k, v, beta, state, cu_seqlens=cu_seqlens)
    actual = _run_with_grads("delta", "chunk", q, k, v, beta, state, cu_seqlens=cu_seqlens, chunk_size=16)
    _assert_all_close(actual, expected, **_tolerance("chunk"))


def test_long_single_sequence_default_blocks():
    """B = 1, T = 2400 at the default chunk size (on CPU: CPU_MAX_CHUNK_SIZE, 32) and block sizes: 75 chunks (the
    last one ragged) in several blocks (32 and 16 chunks forward and backward at the defaults), the last block
    ragged in both, against the float64 recurrent reference with an initial state (outputs, final state, all
    gradients)."""
    q, k, v, beta, state = _inputs(1, 2400, 4, 16, 16, True)
    size = ops_chunk.CPU_MAX_CHUNK_SIZE
    chunks = -(-2400 // size)
    for rows in (ops_chunk.BLOCK_ROWS, ops_chunk.BACKWARD_BLOCK_ROWS):
        assert 1 < block_chunks(4, size, chunks, rows) < chunks and chunks % block_chunks(4, size, chunks, rows)
    expected = _run_with_grads("delta", "recurrent", q, k, v, beta, state)
    actual = _run_with_grads("delta", "chunk", q, k, v, beta, state)
    _assert_all_close(actual, expected, **_tolerance("chunk"))


def test_cpu_chunks_are_at_most_cpu_max_chunk_size():
    """On CPU a chunk size above CPU_MAX_CHUNK_SIZE runs as CPU_MAX_CHUNK_SIZE (the same arithmetic, bit for bit),
    one below it as given."""
    q, k, v, beta, state = _inputs(2, 100, 3, 16, 16, True)
    at = {size: ops_chunk.delta_rule_chunk(q, k, v, beta, initial_state=state, output_final_state=True,
                                           chunk_size=size) for size in (16, 32, 64)}
    assert ops_chunk.CPU_MAX_CHUNK_SIZE == 32
    assert torch.equal(at[64][0], at[32][0]) and torch.equal(at[64][1], at[32][1])
    assert not torch.equal(at[16][0], at[32][0])  # another chunk size does round differently


def test_block_chunks():
    assert block_chunks(8, 64, 128) == ops_chunk.BLOCK_ROWS // (8 * 64)
    assert block_chunks(8, 64, 128, 1024) == 2
    assert block_chunks(8, 64, 3) == 3  # never more chunks than there are
    assert block_chunks(4096, 64, 10) == 1  # at least one chunk, however many rows one chunk has


# ----------------------------------------------------------------------------------------------- dtypes and edge cases


@pytest.mark.parametrize("backend", ["recurrent"] + FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_low_precision_inputs_keep_fp32_state(backend, dtype, rule):
    q, k, v, beta, state = _inputs(2, 70, 2, 16, 8, True)
    cast = [x.to(dtype) for x in (q, k, v, beta)]
    if rule == "delta":
        o, final = delta_rule(*cast, initial_state=state.float(), output_final_state=True, backend=backend)
        o_ref, s_ref = delta_rule_recurrent(*[x.double() for x in cast], initial_state=state, output_final_state=True)
    else:
        o, final = sum_rule(*cast[:3], initial_state=state.float(), output_final_state=True, backend=backend)
        o_ref, s_ref = sum_rule_recurrent(*[x.double() for x in cast[:3]], initial_state=state, output_final_state=True)
    assert o.dtype == dtype and final.dtype == torch.float32
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(o.double(), o_ref, **tol)
    torch.testing.assert_close(final.double(), s_ref, rtol=1e-4, atol=1e-4)  # accumulated in fp32 either way


@pytest.mark.parametrize("backend", ["auto", "recurrent", "chunk"])
def test_final_state_only_when_asked_and_empty_input(backend):
    q, k, v, beta, state = _inputs(2, 0, 2, 8, 4, True)
    o, final = delta_rule(q, k, v, beta, initial_state=state, output_final_state=True, backend=backend)
    assert o.shape == (2, 0, 2, 4)
    torch.testing.assert_close(final, state)
    q, k, v, beta, _ = _inputs(2, 5, 2, 8, 4, False)
    assert delta_rule(q, k, v, beta, backend=backend)[1] is None
    assert sum_rule(q, k, v, backend=backend)[1] is None


@pytest.mark.parametrize("lengths", [None, [1, 0, 1, 1], [0, 0], [3, 1, 0]], ids=["batch", "decode", "empty", "mixed"])
@pytest.mark.parametrize("backend", ["auto", "chunk"])
def test_one_token_per_sequence_and_empty_packs(backend, lengths):
    """Generation steps: one token per sequence, also packed (T == N, where "auto" takes the loop), and T == 0."""
    total = 1 if lengths is None else sum(lengths)
    states = 2 if lengths is None else len(lengths)
    cu_seqlens = None if lengths is None else torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v, beta, state = _inputs(1 if lengths else 2, total, 2, 8, 4, True, num_states=states)
    for rule, reference in (("delta", delta_rule_recurrent), ("sum", sum_rule_recurrent)):
        extra = (beta,) if rule == "delta" else ()
        function = delta_rule if rule == "delta" else sum_rule
        o, final = function(q, k, v, *extra, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens,
                            backend=backend)
        o_ref, s_ref = reference(q, k, v, *extra, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens)
        assert o.shape == o_ref.shape == v.shape
        torch.testing.assert_close(o, o_ref)
        torch.testing.assert_close(final, s_ref)


def test_auto_matches_reference_for_one_step_and_many():
    for length in (1, 40):
        q, k, v, beta, state = _inputs(2, length, 2, 8, 4, True)
        o, final = delta_rule(q, k, v, beta, initial_state=state, output_final_state=True)
        o_ref, s_ref = delta_rule_recurrent(q, k, v, beta, initial_state=state, output_final_state=True)
        torch.testing.assert_close(o, o_ref)
        torch.testing.assert_close(final, s_ref)


def test_explicit_scale_is_applied_to_output():
    q, k, v, beta, _ = _inputs(1, 9, 1, 8, 4, False)
    o_default, _ = delta_rule(q, k, v, beta, backend="chunk")
    o_scaled, _ = delta_rule(q, k, v, beta, scale=0.5, backend="chunk")
    torch.testing.assert_close(o_scaled, o_default * (0.5 / 8**-0.5))


# ----------------------------------------------------------------------------------------------- the reference itself


def test_reference_against_hand_computation():
    """T = 2 written out by hand, with an initial state, for both rules."""
    q, k, v, beta, s0 = _inputs(1, 2, 1, 3, 2, True)
    scale = 0.7
    q1, q2, k1, k2 = q[0, 0, 0], q[0, 1, 0], k[0, 0, 0], k[0, 1, 0]
    v1, v2, b1, b2, S0 = v[0, 0, 0], v[0, 1, 0], beta[0, 0, 0], beta[0, 1, 0], s0[0, 0]
    # Delta rule: retrieve with the old memory, write the scaled difference, read after the write.
    u1 = b1 * (v1 - S0.T @ k1)
    S1 = S0 + torch.outer(k1, u1)
    u2 = b2 * (v2 - S1.T @ k2)
    S2 = S1 + torch.outer(k2, u2)
    expected_o = torch.stack([scale * (S0.T @ q1 + (k1 @ q1) * u1), scale * (S1.T @ q2 + (k2 @ q2) * u2)])
    o, final = delta_rule_recurrent(q, k, v, beta, scale=scale, initial_state=s0, output_final_state=True)
    torch.testing.assert_close(o[0, :, 0], expected_o)
    torch.testing.assert_close(final[0, 0], S2)
    # Sum rule: plain accumulation of outer products.
    expected_o = torch.stack([scale * (S0.T @ q1 + (k1 @ q1) * v1),
                              scale * (S0.T @ q2 + (k1 @ q2) * v1 + (k2 @ q2) * v2)])
    o, final = sum_rule_recurrent(q, k, v, scale=scale, initial_state=s0, output_final_state=True)
    torch.testing.assert_close(o[0, :, 0], expected_o)
    torch.testing.assert_close(final[0, 0], S0 + torch.outer(k1, v1) + torch.outer(k2, v2))


def test_delta_rule_overwrites_a_stored_association():
    """beta = 1 and a unit key: writing (k, v2) after (k, v1) leaves exactly v2 retrievable (Widrow-Hoff)."""
    k = torch.nn.functional.normalize(torch.randn(1, 1, 1, 4, dtype=torch.float64), dim=-1).expand(1, 2, 1, 4)
    v = torch.randn(1, 2, 1, 3, dtype=torch.float64)
    o, _ = delta_rule_recurrent(k, k, v, torch.ones(1, 2, 1, dtype=torch.float64), scale=1.0)
    torch.testing.assert_close(o[0, 1, 0], v[0, 1, 0])


@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_reference_gradcheck(rule):
    q, k, v, beta, state = _inputs(1, 3, 1, 2, 3, True)
    leaves = [x.requires_grad_() for x in (q, k, v, beta, state)]

    def both_outputs(q, k, v, beta, state):
        if rule == "delta":
            return delta_rule_recurrent(q, k, v, beta, initial_state=state, output_final_state=True)
        return sum_rule_recurrent(q, k, v, initial_state=state, output_final_state=True)

    assert torch.autograd.gradcheck(both_outputs, leaves)


def test_chunk_backward_gradcheck():
    """The hand-written chunk backward against finite differences (independent of the reference)."""
    q, k, v, beta, state = _inputs(1, 5, 1, 3, 2, True)
    leaves = [x.requires_grad_() for x in (q, k, v, beta, state)]

    def both_outputs(q, k, v, beta, state):
        return delta_rule(q, k, v, beta, initial_state=state, output_final_state=True, backend="chunk", chunk_size=2)

    assert torch.autograd.gradcheck(both_outputs, leaves)


@pytest.mark.parametrize("size", [1, 5, 8, 12, 16, 32, 63, 64, 77, 128])
def test_unit_lower_inverse_matches_dense_inverse(size):
    strict_lower = 0.3 * torch.randn(3, size, size, dtype=torch.float64).tril(-1)
    expected = torch.linalg.inv(strict_lower + torch.eye(size, dtype=torch.float64))
    torch.testing.assert_close(unit_lower_inverse(strict_lower), expected)
    torch.testing.assert_close(unit_lower_inverse(strict_lower.transpose(-1, -2).contiguous().transpose(-1, -2)),
                               expected)  # a non-contiguous input
    out = torch.full_like(strict_lower, float("nan"))
    assert unit_lower_inverse(strict_lower, out=out) is out
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("block", [1, 2, 4, 16])
def test_unit_lower_inverse_block_sizes(block):
    """Other diagonal block sizes for the forward substitution (the merges then double from there)."""
    strict_lower = 0.3 * torch.randn(4, 64, 64, dtype=torch.float64).tril(-1)
    expected = torch.linalg.inv(strict_lower + torch.eye(64, dtype=torch.float64))
    torch.testing.assert_close(unit_lower_inverse(strict_lower, block), expected)


def test_unit_lower_inverse_fp32_with_identical_keys():
    """Worst case for the power-product form: all keys equal (A = all ones below the diagonal)."""
    keys = torch.nn.functional.normalize(torch.randn(2, 1, 64), dim=-1).expand(2, 64, 64)
    strict_lower = (keys @ keys.transpose(-1, -2)).tril(-1)
    expected = torch.linalg.inv(strict_lower.double() + torch.eye(64, dtype=torch.float64))
    torch.testing.assert_close(unit_lower_inverse(strict_lower).double(), expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- bad inputs


def _good_arguments():
    q, k, v, beta, state = _inputs(2, 6, 3, 8, 4, True)
    return dict(q=q, k=k, v=v, beta=beta, initial_state=state)


@pytest.mark.parametrize(
    "change, argument",
    [
        (lambda a: a.update(q=a["q"][..., :4]), "q"),
        (lambda a: a.update(k=a["k"][0]), "k"),
        (lambda a: a.update(v=a["v"][:, :5]), "v"),
        (lambda a: a.update(beta=a["beta"][..., None]), "beta"),
        (lambda a: a.update(beta=None), "beta"),
        (lambda a: a.update(initial_state=a["initial_state"][..., :3]), "initial_state"),  # wrong V
        (lambda a: a.update(initial_state=a["initial_state"][:, :2]), "initial_state"),  # wrong H
        (lambda a: a.update(initial_state=a["initial_state"][:1]), "initial_state"),  # wrong N
        (lambda a: a.update(cu_seqlens=torch.tensor([0, 3, 6])), "cu_seqlens"),  # B = 2
        (lambda a: a.update(chunk_size=0), "chunk_size"),
        (lambda a: a.update(scale="big"), "scale"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(change, argument):
    arguments = _good_arguments()
    change(arguments)
    with pytest.raises(ValueError, match=argument):
        delta_rule(**arguments)


@pytest.mark.parametrize("offsets", [[0, 3, 5], [1, 6], [0, 4, 2, 6]], ids=["short", "no_zero", "decreasing"])
def test_bad_cu_seqlens_values(offsets):
    q, k, v, beta, _ = _inputs(1, 6, 2, 8, 4, False)
    with pytest.raises(ValueError, match="cu_seqlens"):
        delta_rule(q, k, v, beta, cu_seqlens=torch.tensor(offsets, dtype=torch.int32), backend="chunk")
    with pytest.raises(ValueError, match="cu_seqlens"):
        sum_rule(q, k, v, cu_seqlens=torch.tensor(offsets, dtype=torch.float32))  # wrong dtype as well


def test_packed_initial_state_needs_one_state_per_sequence():
    q, k, v, beta, state = _inputs(1, 6, 2, 8, 4, True)  # one state, but three sequences
    with pytest.raises(ValueError, match="initial_state"):
        delta_rule(q, k, v, beta, initial_state=state, cu_seqlens=torch.tensor([0, 2, 4, 6]))


def test_unknown_and_unavailable_backends():
    q, k, v, beta, _ = _inputs(1, 4, 1, 8, 4, False)
    with pytest.raises(ValueError, match="backend"):
        delta_rule(q, k, v, beta, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        sum_rule(q, k, v, backend="Chunk")
    assert set(available_backends()) <= set(BACKENDS)
    assert {"auto", "recurrent", "chunk"} <= set(available_backends())
    if not ops.HAS_FLA_OPS:
        with pytest.raises(RuntimeError, match="fla"):
            delta_rule(q, k, v, beta, backend="fla")
    if not ops.HAS_TRITON_OPS:
        with pytest.raises(RuntimeError, match="triton"):
            delta_rule(q, k, v, beta, backend="triton")
