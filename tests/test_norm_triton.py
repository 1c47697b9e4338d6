"""Fused norm / SwiGLU kernels (modeling_fwp/norm_triton.py) against their PyTorch references in float64.

References: FWPRMSNorm (random weight), feature_maps.normalize_qk(x, "l2", eps), F.silu(gate) * up and
F.linear(F.silu(gate) * up, weight); outputs and every gradient (random upstream gradient) are compared by
relative norm of the difference. What the memory-saving ops keep for backward is checked too.

On CPU the kernels run under Triton's interpreter.  TRITON_INTERPRET=1 must be set before triton is first
imported, and another test file may already have imported triton in this pytest process, so all CPU cases
run in ONE subprocess (this file, run as a script with --worker) and each test checks its case's errors.
On CUDA, realistic shapes also run in-process.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from triton_interpreter import REPO, launch_settings, run_cases, value_error_messages, worker_results

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
RMS_EPS, L2_EPS = 1e-6, 1e-5


def tolerance(spec):
    """fp32 kernels vs float64: 1e-5; anything stored in 16 bits: 1e-2; float64 end to end: 1e-12."""
    dts = {spec["dtype"], spec.get("out", spec["dtype"])}
    if dts & {"bf16", "fp16"}:
        return 1e-2
    return 1e-12 if dts == {"fp64"} else 1e-5


# name -> op ("rms" | "l2" | "swiglu"), shape, input dtype; optional: out (rms out_dtype), wdtype (rms weight),
# tune (launch overrides reaching the multi-tile backward loop at tiny shapes), strided (input is a row-strided
# view: a slice of a wider tensor, or for swiglu the two halves of one fused projection), xgrad / wgrad
# (which inputs require grad), grad=False (forward under no_grad only).
_LOOP = dict(block_m=8, programs=2)  # 37 rows -> 5 tiles, 2 programs of 3 tiles (the last one past the end)
CASES = {}
for _op in ("rms", "l2", "swiglu"):
    for _n in (64, 40, 1024, 200):
        CASES[f"{_op}_37x{_n}_fp32"] = dict(op=_op, shape=[37, _n], dtype="fp32")
    CASES[f"{_op}_2x5x3x64_fp32"] = dict(op=_op, shape=[2, 5, 3, 64], dtype="fp32")
    CASES[f"{_op}_37x40_fp64"] = dict(op=_op, shape=[37, 40], dtype="fp64", wdtype="fp64")
    CASES[f"{_op}_2x5x3x64_bf16"] = dict(op=_op, shape=[2, 5, 3, 64], dtype="bf16", out="bf16")
    CASES[f"{_op}_37x200_bf16"] = dict(op=_op, shape=[37, 200], dtype="bf16", out="bf16")
    CASES[f"{_op}_37x64_fp16"] = dict(op=_op, shape=[37, 64], dtype="fp16")
    CASES[f"{_op}_strided_37x40"] = dict(op=_op, shape=[37, 40], dtype="fp32", strided=True)
    CASES[f"{_op}_nograd_37x64"] = dict(op=_op, shape=[37, 64], dtype="fp32", grad=False)
    CASES[f"{_op}_empty"] = dict(op=_op, shape=[0, 3, 64], dtype="fp32")
for _n in (64, 200):
    CASES[f"l2_loop_37x{_n}"] = dict(op="l2", shape=[37, _n], dtype="fp32", tune=_LOOP)
    CASES[f"swiglu_tiles_37x{_n}"] = dict(op="swiglu", shape=[37, _n], dtype="fp32", tune=dict(block_m=4, block_n=32))
for _name, _spec in {"37x40_fp32": dict(shape=[37, 40], dtype="fp32"),
                     "2x5x200_fp32": dict(shape=[2, 5, 200], dtype="fp32"),
                     "2x5x64_bf16": dict(shape=[2, 5, 64], dtype="bf16"),
                     "37x40_fp64": dict(shape=[37, 40], dtype="fp64"),
                     "halves_37x40": dict(shape=[37, 40], dtype="fp32", strided=True),
                     "frozen_weight_37x40": dict(shape=[37, 40], dtype="fp32", wgrad=False),
                     "tiles_37x64": dict(shape=[37, 64], dtype="fp32", tune=dict(block_m=4, block_n=32)),
                     "nograd_37x40": dict(shape=[37, 40], dtype="fp32", grad=False)}.items():
    CASES["swiglu_linear_" + _name] = dict(op="swiglu_linear", **_spec)
CASES.update({
    "rms_37x1024_fp32_to_bf16": dict(op="rms", shape=[37, 1024], dtype="fp32", out="bf16"),
    "rms_2x5x3x64_fp32_to_bf16": dict(op="rms", shape=[2, 5, 3, 64], dtype="fp32", out="bf16"),
    "rms_loop_37x64": dict(op="rms", shape=[37, 64], dtype="fp32", tune=_LOOP),
    "rms_loop_37x200": dict(op="rms", shape=[37, 200], dtype="fp32", tune=_LOOP),
    "rms_loop_bf16_weight_37x40": dict(op="rms", shape=[37, 40], dtype="bf16", out="bf16", wdtype="bf16",
                                       tune=_LOOP),
    "rms_frozen_weight_37x64": dict(op="rms", shape=[37, 64], dtype="fp32", wgrad=False),
    "rms_only_weight_grad_37x64": dict(op="rms", shape=[37, 64], dtype="fp32", xgrad=False, tune=_LOOP),
    "rms_1x3": dict(op="rms", shape=[1, 3], dtype="fp32"),  # (N = 1 is ill-conditioned: dx ~ eps)
    "swiglu_scalar": dict(op="swiglu", shape=[], dtype="fp32"),
})


def run_case(spec, seed=0, device="cpu"):
    """Relative errors of y and every gradient against the float64 reference; dtype checks as 0/1 entries."""
    from modeling_fwp import norm_triton

    with launch_settings(norm_triton, spec.get("tune", {})):
        return _run_case(spec, seed, device)


def _run_case(spec, seed, device):
    import torch.nn.functional as F

    from modeling_fwp import norm_triton
    from modeling_fwp.feature_maps import normalize_qk
    from modeling_fwp.modeling_fwp import FWPRMSNorm

    gen = torch.Generator().manual_seed(seed)
    op, shape, dtype = spec["op"], list(spec["shape"]), DTYPES[spec["dtype"]]
    grad = spec.get("grad", True)
    n = shape[-1] if shape else 1

    def rnd(*s, dt=dtype):
        return torch.randn(tuple(s), generator=gen).to(device=device, dtype=dt)

    # leaves: what requires grad; inputs: what the kernel gets (views of the leaves when strided)
    if op in ("swiglu", "swiglu_linear"):
        if spec.get("strided"):
            fused = rnd(*shape[:-1], 2 * n)
            leaves = {"gate_up": fused}
            inputs = lambda lv: lv["gate_up"].chunk(2, dim=-1)  # noqa: E731
        else:
            leaves = {"gate": rnd(*shape), "up": rnd(*shape)}
            inputs = lambda lv: (lv["gate"], lv["up"])  # noqa: E731
        if op == "swiglu_linear":  # a down projection of 24 outputs, its weight in fp32 as a model's would be
            leaves["weight"] = rnd(24, n, dt=torch.float64 if dtype == torch.float64 else torch.float32) / n ** 0.5
            pair = inputs
            inputs = lambda lv: (*pair(lv), lv["weight"])  # noqa: E731
    else:
        x = rnd(*shape[:-1], 2 * n)[..., :n] if spec.get("strided") else rnd(*shape)
        leaves = {"x": x}
        if op == "rms":
            leaves["weight"] = rnd(n, dt=DTYPES[spec.get("wdtype", "fp32")])
        inputs = lambda lv: (lv["x"],) + ((lv["weight"],) if op == "rms" else ())  # noqa: E731
    wants = {name: grad and spec.get(name[0] + "grad", True) for name in leaves}
    for name, t in leaves.items():
        t.requires_grad_(wants[name])

    def forward(lv, ref):
        args = inputs(lv)
        if op == "rms":
            if ref:
                m = FWPRMSNorm(n, eps=RMS_EPS).to(device=device, dtype=torch.float64)
                del m.weight
                m.weight = args[1]  # the float64 leaf itself, so its gradient is reachable
                return m(args[0])
            out = DTYPES[spec["out"]] if "out" in spec else None
            return norm_triton.rms_norm_triton(args[0], args[1], RMS_EPS, out_dtype=out)
        if op == "l2":
            return normalize_qk(args[0], "l2", L2_EPS) if ref else norm_triton.l2_norm_triton(args[0], L2_EPS)
        if op == "swiglu_linear":
            if ref:
                return F.linear(F.silu(args[0]) * args[1], args[2])
            return norm_triton.swiglu_linear_triton(*args)
        return F.silu(args[0]) * args[1] if ref else norm_triton.swiglu_triton(*args)

    with torch.set_grad_enabled(grad):
        y = forward(leaves, ref=False)
    ref_leaves = {k: t.detach().double().requires_grad_(wants[k]) for k, t in leaves.items()}
    with torch.set_grad_enabled(grad):
        ry = forward(ref_leaves, ref=True)

    def rel(a, b):
        if b.numel() == 0:
            return 0.0 if a.shape == b.shape else float("inf")
        return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()

    want_y = DTYPES[spec["out"]] if "out" in spec else dtype
    want_shape = shape[:-1] + [24] if op == "swiglu_linear" else shape
    errs = {"y": rel(y, ry), "y_dtype_ok": float(y.dtype == want_y and list(y.shape) == want_shape)}
    if grad:
        gy = torch.randn(ry.shape, generator=gen, dtype=torch.float64).to(device)
        names = [k for k in leaves if wants[k]]
        got = torch.autograd.grad((y.double() * gy).sum(), [leaves[k] for k in names])  # (under TUNE too)
        ref = torch.autograd.grad((ry * gy).sum(), [ref_leaves[k] for k in names])
        ok = 1.0
        for k, a, b in zip(names, got, ref):
            errs["d" + k] = rel(a, b)
            ok *= float(a.dtype == leaves[k].dtype and a.shape == leaves[k].shape)
        errs["grad_dtypes_ok"] = ok
    return errs


def saved_for_backward():
    """What each memory-saving op keeps for backward, as {op: {"numel": elements saved, "<tensor>": 0/1 saved}}:
    the L2 norm keeps its output (which the update rule keeps anyway), not its input; SwiGLU + down projection
    keeps gate, up and the weight, not the [rows, n] SwiGLU output."""
    from modeling_fwp import norm_triton

    def record(fn, named):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = fn()
        ptrs = {t.untyped_storage().data_ptr() for t in saved}
        named = dict(named, out=out)
        result = {name: float(t.untyped_storage().data_ptr() in ptrs) for name, t in named.items()}
        result["numel"] = float(sum(t.numel() for t in saved))
        return result

    x = torch.randn(37, 64, requires_grad=True)
    gate, up = torch.randn(37, 40, requires_grad=True), torch.randn(37, 40, requires_grad=True)
    weight = torch.randn(24, 40, requires_grad=True)
    return {"l2": record(lambda: norm_triton.l2_norm_triton(x, L2_EPS), {"x": x}),
            "swiglu_linear": record(lambda: norm_triton.swiglu_linear_triton(gate, up, weight),
                                    {"gate": gate, "up": up, "weight": weight})}


def bad_input_messages():
    """ValueErrors (message text) for inputs the kernels must refuse."""
    from modeling_fwp.norm_triton import MAX_N, l2_norm_triton, rms_norm_triton, swiglu_linear_triton, swiglu_triton

    x = torch.randn(3, 8)
    tries = {
        "weight_shape": lambda: rms_norm_triton(x, torch.ones(7), 1e-6),
        "N_too_large": lambda: rms_norm_triton(torch.zeros(1, MAX_N + 1), torch.ones(MAX_N + 1), 1e-6),
        "N_zero": lambda: l2_norm_triton(torch.zeros(3, 0), 1e-6),
        "int_dtype": lambda: l2_norm_triton(torch.ones(3, 8, dtype=torch.int32), 1e-6),
        "out_dtype": lambda: rms_norm_triton(x, torch.ones(8), 1e-6, out_dtype=torch.int8),
        "swiglu_shapes": lambda: swiglu_triton(x, torch.randn(3, 9)),
        "swiglu_linear_weight": lambda: swiglu_linear_triton(x, x, torch.randn(4, 9)),
    }
    return value_error_messages(tries)


def _worker():
    torch.set_num_threads(1)  # tiny tensors: extra intra-op threads only add sync cost
    run_cases(CASES, run_case, _bad_inputs=bad_input_messages, _saved=saved_for_backward)


@pytest.fixture(scope="module")
def interpreter_results():
    return worker_results(__file__)


def _assert_small(name, errs, spec, tol=None):
    tol = tolerance(spec) if tol is None else tol
    errs = dict(errs)
    assert errs.pop("y_dtype_ok") == 1.0, "wrong output dtype or shape"
    if spec.get("grad", True):
        assert errs.pop("grad_dtypes_ok") == 1.0, "gradients must come back in their input's dtype and shape"
        pair = ["gate_up"] if spec.get("strided") else ["gate", "up"]
        leaves = {"rms": ["x", "weight"], "l2": ["x"], "swiglu": pair, "swiglu_linear": pair + ["weight"]}
        expected = {"d" + k for k in leaves[spec["op"]] if spec.get(k[0] + "grad", True)}
        assert expected <= set(errs), f"missing gradients: {expected - set(errs)}"
    bad = {k: v for k, v in errs.items() if not v < tol}  # `not <` also catches NaN
    assert not bad, f"{name}: relative errors above {tol}: {bad}"


@pytest.mark.parametrize("name", list(CASES))
def test_interpreter_matches_float64_reference(name, interpreter_results):
    errs = interpreter_results[name]
    assert "error" not in errs, errs.get("error")
    _assert_small(name, errs, CASES[name])


@pytest.mark.parametrize("what,needle", [("weight_shape", "weight"), ("N_too_large", "N="), ("N_zero", "N="),
                                         ("int_dtype", "dtype"), ("out_dtype", "out_dtype"),
                                         ("swiglu_shapes", "shape"), ("swiglu_linear_weight", "weight")])
def test_interpreter_rejects_bad_input(what, needle, interpreter_results):
    msg = interpreter_results["_bad_inputs"][what]
    assert msg is not None, f"{what}: no ValueError"
    assert needle in msg


def test_memory_saving_ops_keep_only_what_backward_needs(interpreter_results):
    saved = interpreter_results["_saved"]
    assert "error" not in saved, saved.get("error")
    l2 = saved["l2"]
    assert l2["out"] == 1.0 and l2["x"] == 0.0, f"the L2 norm must keep its output, not its input: {l2}"
    assert l2["numel"] == 37 * 64 + 37, l2  # y and one rstd per row
    fused = saved["swiglu_linear"]
    assert fused["gate"] == fused["up"] == fused["weight"] == 1.0, fused
    assert fused["numel"] == 2 * 37 * 40 + 24 * 40, f"the SwiGLU output must not be kept: {fused}"


def test_imports_without_triton(monkeypatch):
    """The module must import where triton is missing (HAS_TRITON False) and raise ImportError on use."""
    for mod in ("triton", "triton.language"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import triton` now raises ImportError
    path = os.path.join(REPO, "modeling_fwp", "norm_triton.py")
    spec = importlib.util.spec_from_file_location("_norm_triton_without_triton", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.HAS_TRITON is False
    with pytest.raises(ImportError, match="triton"):
        module.l2_norm_triton(torch.randn(2, 4), 1e-6)


# ---------------------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA_CASES = {
    "rms_residual_fp32_to_bf16": dict(op="rms", shape=[16384, 1024], dtype="fp32", out="bf16"),
    "rms_residual_fp32": dict(op="rms", shape=[16384, 1024], dtype="fp32"),
    "rms_heads_bf16": dict(op="rms", shape=[16384, 16, 64], dtype="bf16", out="bf16"),
    "l2_heads_bf16": dict(op="l2", shape=[16384, 16, 64], dtype="bf16"),
    "l2_heads_fp32": dict(op="l2", shape=[4096, 16, 64], dtype="fp32"),
    "l2_K512_bf16": dict(op="l2", shape=[2048, 16, 512], dtype="bf16"),
    "swiglu_bf16": dict(op="swiglu", shape=[16384, 2816], dtype="bf16"),
    "swiglu_fused_halves_bf16": dict(op="swiglu", shape=[4096, 2816], dtype="bf16", strided=True),
    "swiglu_fp32": dict(op="swiglu", shape=[4096, 2816], dtype="fp32"),
    "swiglu_linear_bf16": dict(op="swiglu_linear", shape=[16384, 2816], dtype="bf16"),
    "swiglu_linear_halves_bf16": dict(op="swiglu_linear", shape=[4096, 2816], dtype="bf16", strided=True),
    "rms_N8192_fp32": dict(op="rms", shape=[1000, 8192], dtype="fp32"),
    "rms_N200_rows_odd": dict(op="rms", shape=[3001, 200], dtype="fp32"),
}


@cuda
@pytest.mark.parametrize("name", list(CUDA_CASES))
def test_cuda_matches_float64_reference(name):
    _assert_small(name, run_case(CUDA_CASES[name], seed=1, device="cuda"), CUDA_CASES[name])


@cuda
def test_cuda_weight_grad_is_deterministic():
    from modeling_fwp.norm_triton import rms_norm_triton

    x = torch.randn(16384, 1024, device="cuda", requires_grad=True)
    w = torch.randn(1024, device="cuda", requires_grad=True)
    dy = torch.randn(16384, 1024, device="cuda", dtype=torch.bfloat16)
    grads = [torch.autograd.grad(rms_norm_triton(x, w, 1e-6, torch.bfloat16), [x, w], dy) for _ in range(2)]
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, REPO)
    _worker()
