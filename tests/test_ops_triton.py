"""Triton kernels (modeling_fwp/ops_triton*.py) against a float64 per-token loop.

On CPU the kernels run under Triton's interpreter.  TRITON_INTERPRET=1 must be set before triton is first
imported, and another test file may already have imported triton in this pytest process, so all CPU cases
run in ONE subprocess (this file, run as a script with --worker) and each test checks its case's errors.
On CUDA, larger shapes also run in-process (fp32 against float64, bf16 with a looser bound).
"""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from triton_interpreter import REPO, run_cases, value_error_messages, worker_results

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

TOL = 1e-4  # fp32 kernels vs float64: relative norm of the difference

# name -> shape and options.  rule: "delta" | "sum"; grad: run backward too (else forward under no_grad,
# which takes the token-by-token kernel when sequences are short); tune: block-size overrides that reach
# the multi-block code paths at tiny sizes; fused: output inside the sequential kernel or a separate one.
_BLOCKS = dict(BK_state=16, BV_state=16, BK=16, BV=16)
CASES = {
    "delta_T1": dict(B=2, T=1, H=2, K=16, V=16, C=16, rule="delta", h0=True),
    "delta_T63_C16": dict(B=1, T=63, H=2, K=16, V=32, C=16, rule="delta", h0=False),
    "delta_T64_C64": dict(B=1, T=64, H=2, K=32, V=16, C=64, rule="delta", h0=True, fused=True),
    "delta_T65_C32": dict(B=2, T=65, H=2, K=16, V=16, C=32, rule="delta", h0=True),
    "delta_T130_C64": dict(B=1, T=130, H=2, K=32, V=32, C=64, rule="delta", h0=True),
    "delta_T130_C16_fused_noh0": dict(B=1, T=130, H=2, K=16, V=16, C=16, rule="delta", h0=False, fused=True),
    "delta_K_ne_V_odd": dict(B=1, T=33, H=2, K=24, V=20, C=16, rule="delta", h0=True),
    "delta_varlen_empty_seq": dict(B=1, T=70, H=2, K=16, V=32, C=16, rule="delta", h0=True,
                                   cu=[0, 5, 5, 40, 70]),
    "delta_varlen_fused": dict(B=1, T=70, H=2, K=16, V=16, C=32, rule="delta", h0=False,
                               cu=[0, 0, 33, 70], fused=True),
    "delta_blocks_2x2": dict(B=1, T=40, H=2, K=32, V=32, C=16, rule="delta", h0=True, tune=_BLOCKS),
    "delta_blocks_4": dict(B=1, T=20, H=1, K=64, V=16, C=16, rule="delta", h0=True, tune=_BLOCKS, fused=True),
    "sum_T1": dict(B=2, T=1, H=2, K=16, V=16, C=16, rule="sum", h0=True),
    "sum_T65_C32": dict(B=2, T=65, H=2, K=16, V=32, C=32, rule="sum", h0=True),
    "sum_T130_C64_fused": dict(B=1, T=130, H=2, K=32, V=16, C=64, rule="sum", h0=False, fused=True),
    "sum_varlen_empty_seq": dict(B=1, T=70, H=2, K=16, V=16, C=16, rule="sum", h0=True, cu=[0, 30, 30, 70]),
    "sum_blocks_2x2": dict(B=1, T=40, H=2, K=32, V=32, C=16, rule="sum", h0=True, tune=_BLOCKS),
    "decode_delta": dict(B=2, T=3, H=2, K=32, V=16, C=64, rule="delta", h0=True, grad=False),
    "decode_delta_varlen": dict(B=1, T=4, H=2, K=16, V=32, C=64, rule="delta", h0=True, grad=False,
                                cu=[0, 1, 2, 2, 4]),
    "decode_sum": dict(B=2, T=2, H=2, K=16, V=16, C=64, rule="sum", h0=False, grad=False),
    "nograd_chunk_delta": dict(B=1, T=50, H=2, K=16, V=16, C=16, rule="delta", h0=True, grad=False),
}


def reference(q, k, v, beta, scale, h0, cu, rule):
    from modeling_fwp.ops import reference_float64

    return reference_float64(q, k, v, beta if rule == "delta" else None, scale, h0, cu)


def _inputs(B, T, H, K, V, N, h0, dtype, device, gen):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device)
    q = rnd(B, T, H, K)
    # unit-norm keys and beta in (0, 1), as the model feeds them (keeps the recurrence bounded)
    k = torch.nn.functional.normalize(rnd(B, T, H, K), dim=-1)
    v = rnd(B, T, H, V)
    beta = torch.rand(B, T, H, generator=gen).to(device)
    s0 = rnd(N, H, K, V) if h0 else None
    return q.to(dtype), k.to(dtype), v.to(dtype), beta, s0


def run_case(spec, seed=0, device="cpu", dtype=torch.float32):
    """Relative errors of o, final state and every gradient against the float64 reference."""
    from modeling_fwp import ops_triton, ops_triton_launch

    ops_triton_launch.TUNE.clear()
    ops_triton_launch.TUNE.update(spec.get("tune", {}))
    if "fused" in spec:
        ops_triton_launch.TUNE["fused_output"] = spec["fused"]
    gen = torch.Generator().manual_seed(seed)
    B, T, H, K, V, C, rule = (spec[x] for x in ("B", "T", "H", "K", "V", "C", "rule"))
    cu = spec.get("cu")
    N = B if cu is None else len(cu) - 1
    q, k, v, beta, s0 = _inputs(B, T, H, K, V, N, spec["h0"], dtype, device, gen)
    leaves = {"q": q, "k": k, "v": v}
    if rule == "delta":
        leaves["beta"] = beta
    if s0 is not None:
        leaves["h0"] = s0
    grad = spec.get("grad", True)
    for t in leaves.values():
        t.requires_grad_(grad)
    cut = torch.tensor(cu, dtype=torch.int32, device=device) if cu is not None else None
    scale = K ** -0.5
    with torch.set_grad_enabled(grad):
        if rule == "delta":
            o, ht = ops_triton.delta_rule_triton(q, k, v, beta, scale, s0, True, cut, C)
        else:
            o, ht = ops_triton.sum_rule_triton(q, k, v, scale, s0, True, cut, C)
    ops_triton_launch.TUNE.clear()
    ref_leaves = {n: t.detach().double().requires_grad_(grad) for n, t in leaves.items()}
    with torch.set_grad_enabled(grad):
        ro, rh = reference(ref_leaves["q"], ref_leaves["k"], ref_leaves["v"], ref_leaves.get("beta"), scale,
                           ref_leaves.get("h0"), cu, rule)

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()

    errs = {"o": rel(o, ro), "state": rel(ht, rh), "o_dtype_ok": float(o.dtype == v.dtype),
            "state_fp32": float(ht.dtype == torch.float32)}
    if grad:
        go = torch.randn(o.shape, generator=gen).to(device)
        gh = torch.randn(ht.shape, generator=gen).to(device)
        got = torch.autograd.grad((o.float() * go).sum() + (ht * gh).sum(), list(leaves.values()))
        want = torch.autograd.grad((ro * go.double()).sum() + (rh * gh.double()).sum(), list(ref_leaves.values()))
        for name, a, b in zip(leaves, got, want):
            errs["d" + name] = rel(a, b)
    return errs


def bad_input_messages():
    """ValueErrors (message text) for inputs the triton backend must refuse."""
    from modeling_fwp.ops_triton import delta_rule_triton

    def x(*s, dtype=torch.float32):
        return torch.randn(*s, dtype=dtype)
    tries = {
        "chunk_size": lambda: delta_rule_triton(x(1, 4, 1, 16), x(1, 4, 1, 16), x(1, 4, 1, 16), x(1, 4, 1), 1.0,
                                                None, False, None, 48),
        "K_too_large": lambda: delta_rule_triton(x(1, 4, 1, 520), x(1, 4, 1, 520), x(1, 4, 1, 16), x(1, 4, 1),
                                                 1.0, None, False, None, 64),
        "float64": lambda: delta_rule_triton(x(1, 4, 1, 16, dtype=torch.float64), x(1, 4, 1, 16, dtype=torch.float64),
                                             x(1, 4, 1, 16, dtype=torch.float64), x(1, 4, 1), 1.0, None, False,
                                             None, 64),
        "beta_shape": lambda: delta_rule_triton(x(1, 4, 1, 16), x(1, 4, 1, 16), x(1, 4, 1, 16), x(1, 4), 1.0,
                                                None, False, None, 64),
        "varlen_batch": lambda: delta_rule_triton(x(2, 4, 1, 16), x(2, 4, 1, 16), x(2, 4, 1, 16), x(2, 4, 1), 1.0,
                                                  None, False, torch.tensor([0, 4], dtype=torch.int32), 64),
    }
    return value_error_messages(tries)


def _worker():
    run_cases(CASES, run_case, _bad_inputs=bad_input_messages)


@pytest.fixture(scope="module")
def interpreter_results():
    return worker_results(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_interpreter_matches_float64_loop(name, interpreter_results):
    errs = interpreter_results[name]
    assert "error" not in errs, errs.get("error")
    _assert_small(name, dict(errs), TOL, CASES[name])


def _assert_small(name, errs, tol, spec):
    assert errs.pop("o_dtype_ok") == 1.0, "o must come back in v.dtype"
    assert errs.pop("state_fp32") == 1.0, "the final state must be float32"
    expected = {"o", "state"} | ({"dq", "dk", "dv"} if spec.get("grad", True) else set())
    assert expected <= set(errs)
    bad = {k: v for k, v in errs.items() if not v < tol}  # `not <` also catches NaN
    assert not bad, f"{name}: relative errors above {tol}: {bad}"


@pytest.mark.parametrize("what,needle", [("chunk_size", "chunk_size"), ("K_too_large", "K"),
                                         ("float64", "dtype"), ("beta_shape", "beta"),
                                         ("varlen_batch", "cu_seqlens")])
def test_interpreter_rejects_bad_input(what, needle, interpreter_results):
    msg = interpreter_results["_bad_inputs"][what]
    assert msg is not None, f"{what}: no ValueError"
    assert needle in msg


def test_first_autotuned_launch_says_why_it_is_slow(monkeypatch):
    """The autotuner's first launch in a process warns once, naming FWP_TRITON_AUTOTUNE=0 (a silent minute looks
    like a hang); later new shapes do not repeat it. triton.autotune is replaced: no kernel runs here."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    from modeling_fwp import ops_triton_launch

    launched = []

    class Tuned:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(self.kernel)

    monkeypatch.setattr(ops_triton_launch.triton, "autotune", lambda configs, key, **extra: Tuned)
    monkeypatch.setattr(ops_triton_launch, "_TUNED", {})
    monkeypatch.setattr(ops_triton_launch, "_announced", False)
    configs = ops_triton_launch._cfgs([(4, 2)])
    with pytest.warns(UserWarning, match="FWP_TRITON_AUTOTUNE=0") as caught:
        for kernel in ("first", "second"):
            ops_triton_launch._launch(kernel, lambda meta: (1,), (), {}, configs, ("K",), {})
    assert launched == ["first", "second"]
    assert len([w for w in caught if "FWP_TRITON_AUTOTUNE" in str(w.message)]) == 1


# ---------------------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA_CASES = {
    "delta_K64": dict(B=2, T=300, H=4, K=64, V=64, C=64, rule="delta", h0=True),
    "delta_K128_V32": dict(B=2, T=200, H=2, K=128, V=32, C=64, rule="delta", h0=True),
    "delta_K256_V128": dict(B=1, T=200, H=2, K=256, V=128, C=64, rule="delta", h0=True),
    "delta_K512_V256": dict(B=1, T=130, H=2, K=512, V=256, C=64, rule="delta", h0=True),
    "delta_K512_fused": dict(B=1, T=130, H=2, K=512, V=64, C=32, rule="delta", h0=True, fused=True),
    "delta_varlen": dict(B=1, T=300, H=4, K=64, V=64, C=64, rule="delta", h0=True, cu=[0, 100, 100, 229, 300]),
    "delta_decode": dict(B=3, T=4, H=4, K=128, V=64, C=64, rule="delta", h0=True, grad=False),
    "sum_K64": dict(B=2, T=300, H=4, K=64, V=64, C=64, rule="sum", h0=True),
    "sum_K256": dict(B=1, T=200, H=2, K=256, V=64, C=64, rule="sum", h0=True, fused=True),
}


# fp32 inputs compute in fp32 (input_precision "ieee"); tf32 matmuls would put the errors near 1e-3.
# scripts/checks/check_triton_precision.py measures both on a GPU: fp32 must pass this and tf32 fail it.
FP32_TOLERANCE = 1e-4


@cuda
@pytest.mark.parametrize("name", list(CUDA_CASES))
def test_cuda_fp32_matches_float64_loop(name):
    _assert_small(name, run_case(CUDA_CASES[name], seed=1, device="cuda"), FP32_TOLERANCE, CUDA_CASES[name])


@cuda
@pytest.mark.parametrize("name", ["delta_K64", "delta_K256_V128", "sum_K64", "delta_varlen"])
def test_cuda_bf16_close_to_float64_loop(name):
    _assert_small(name, run_case(CUDA_CASES[name], seed=2, device="cuda", dtype=torch.bfloat16), 3e-2,
                  CUDA_CASES[name])


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, REPO)
    _worker()
