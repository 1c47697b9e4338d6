"""The one-token update-rule step of captured decoding (modeling_fwp/decode_triton.py).

`rule_step_reference` is checked against one iteration of the step-by-step definition (ops._recurrent_batch) in
float64; the Triton kernel against the reference in float64, on CPU under Triton's interpreter (one subprocess for
the whole file, see triton_interpreter.py), and inside the model: a captured decode step run with the kernel gives
the logits of a full forward. On CUDA the kernel also runs in-process at a realistic size.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from triton_interpreter import REPO, run_cases, worker_results

from modeling_fwp.decode_triton import rule_step_reference
from modeling_fwp.ops import _recurrent_batch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# name -> rule, key dim K, value dim V, input dtype; several K-blocks where V is large (the kernel keeps <= 4096
# state values in flight: V = 128 gives blocks of 32 keys); q, k, v are strided views of one projection always.
CASES = {
    "delta_K16_V16": ("delta", 16, 16, "fp32"),
    "delta_K48_V40_not_powers_of_two": ("delta", 48, 40, "fp32"),
    "delta_K96_V128_three_key_blocks": ("delta", 96, 128, "fp32"),
    "delta_K384_V64_dpfp_size": ("delta", 384, 64, "fp32"),
    "delta_bf16_inputs": ("delta", 32, 32, "bf16"),
    "sum_K24_V128": ("sum", 24, 128, "fp32"),
}


def step_inputs(rule, key_dim, value_dim, dtype=torch.float64, rows=3, heads=2, seed=0):
    """q, k, v as views into one projection of x (what the model hands over), unit keys, beta in (0, 1), and a
    random nonzero state, so retrieval and write both matter."""
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(rows, 1, heads * (2 * key_dim + value_dim) + 3, generator=gen, dtype=torch.float64)
    q = proj[:, 0, :heads * key_dim].view(rows, heads, key_dim)
    k = proj[:, 0, heads * key_dim:2 * heads * key_dim].view(rows, heads, key_dim)
    k = k / k.norm(dim=-1, keepdim=True)
    v = proj[:, 0, 2 * heads * key_dim:heads * (2 * key_dim + value_dim)].view(rows, heads, value_dim)
    beta = torch.rand(rows, heads, generator=gen, dtype=torch.float64) if rule == "delta" else None
    state = torch.randn(rows, heads, key_dim, value_dim, generator=gen, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype), beta, state


@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_reference_is_one_step_of_the_definition_and_writes_in_place(rule):
    q, k, v, beta, state = step_inputs(rule, 8, 5)
    expected_o, expected_state = _recurrent_batch(q[:, None], k[:, None], v[:, None],
                                                  None if beta is None else beta[:, None], 0.3, state.clone(), True)
    address = state.data_ptr()
    o = rule_step_reference(q, k, v, beta, state, 0.3)
    assert state.data_ptr() == address
    torch.testing.assert_close(state, expected_state, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o, expected_o[:, 0], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------- interpreter worker


def run_case(spec):
    from modeling_fwp.decode_triton import rule_step_triton

    rule, key_dim, value_dim, dtype = spec
    q, k, v, beta, state = step_inputs(rule, key_dim, value_dim)
    ref_state = state.clone()
    ref_o = rule_step_reference(q, k, v, beta, ref_state, 0.25)  # float64: the truth
    kernel_state = state.float()
    q, k, v = (x.to(DTYPES[dtype]) for x in (q, k, v))
    address = kernel_state.data_ptr()
    o = rule_step_triton(q, k, v, beta, kernel_state, 0.25)
    relative = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
    return {"o": relative(o, ref_o), "state": relative(kernel_state, ref_state), "o_dtype": str(o.dtype),
            "in_place": kernel_state.data_ptr() == address}


def captured_step_in_model():
    """A decode step of the model with the Triton kernel (FWP_STEP_TRITON=1 under the interpreter) against the
    forward over the whole sequence, for a modern DeltaNet with gate and beta in (0, 2) and for the paper's
    normalised sum rule."""
    from modeling_fwp import FWPConfig, FWPForCausalLM
    from modeling_fwp.cache_fwp import FWPStaticCache

    os.environ["FWP_STEP_TRITON"] = "1"
    errors = {}
    for name, fields in {"gated_conv_prenorm": dict(block_style="pre_norm", use_short_conv=True, use_gate=True,
                                                    allow_neg_eigval=True, feature_map="identity", qk_norm="l2"),
                         "sum_attnorm": dict(update_rule="sum", attention_normalization=True)}.items():
        torch.manual_seed(0)
        model = FWPForCausalLM(FWPConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_heads=2,
                                         intermediate_size=48, initializer_range=0.5, **fields)).eval()
        ids = torch.randint(1, 40, (2, 7), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            full = model(ids).logits[:, -1]
            cache = FWPStaticCache(model.config, 2)
            model(ids[:, :-1], cache=cache)
            tensors = [layer.tensors() for layer in cache.layers]
            step = model._captured_decode_step(ids[:, -1:], tensors, model._joint_decode_weights())[:, -1]
        errors[name] = float((step - full).abs().max() / full.abs().max())
    return errors


@pytest.fixture(scope="module")
def interpreter():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    return worker_results(__file__)


@pytest.mark.parametrize("name", CASES)
def test_kernel_matches_the_float64_reference(interpreter, name):
    result = interpreter[name]
    assert "error" not in result, result.get("error")
    assert result["in_place"]
    bf16 = CASES[name][3] == "bf16"
    assert result["o"] < (1e-2 if bf16 else 1e-5), result  # bf16: o is returned in the inputs' dtype
    assert result["state"] < (1e-2 if bf16 else 1e-5), result
    assert result["o_dtype"] == str(DTYPES[CASES[name][3]])


def test_captured_step_with_the_kernel_equals_the_full_forward(interpreter):
    for name, error in interpreter["captured_step_in_model"].items():
        assert error < 1e-5, (name, error)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_cuda_kernel_at_model_size(rule):
    from modeling_fwp.decode_triton import rule_step_

    q, k, v, beta, state = step_inputs(rule, 64, 64, rows=8, heads=16)
    ref_state = state.clone()
    ref_o = rule_step_reference(q, k, v, beta, ref_state, 0.125)
    kernel_state = state.float().cuda()
    o = rule_step_(*(x.float().cuda() for x in (q, k, v)), None if beta is None else beta.cuda(), kernel_state, 0.125)
    torch.testing.assert_close(o.double().cpu(), ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernel_state.double().cpu(), ref_state, rtol=1e-5, atol=1e-5)


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, REPO)
    run_cases(CASES, run_case, captured_step_in_model=captured_step_in_model)
