"""Triton short convolution (modeling_fwp/conv_triton.py) against ShortConvolution's PyTorch path.

On CPU the kernels run under Triton's interpreter.  TRITON_INTERPRET=1 must be set before triton is first
imported, and another test file may already have imported triton in this pytest process, so all CPU cases
run in ONE subprocess (this file, run as a script with --worker) and each test checks its case's errors.
The reference runs in float64 on the same (rounded) inputs; activation=None cases (ShortConvolution always
applies SiLU) and T=0 (F.conv1d refuses it) use a per-sequence loop instead.  On CUDA, realistic shapes also run in-process.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from triton_interpreter import REPO, run_cases, value_error_messages, worker_results

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

TOL = {"float32": 1e-5, "float64": 1e-12, "bfloat16": 1e-2}  # relative norm of the difference

# name -> shape and options.  cu: packed sequence boundaries (B must be 1); tail: pass a cached tail;
# act: "silu" | None; dtype: x's dtype (weights fp32, or fp64 for fp64); tune: block-size overrides that
# reach the multi-tile paths (tiles straddling sequences, several tiles per backward program) at tiny sizes.
_SMALL = dict(BT=8, BC=16, BT_bwd=4, BC_bwd=16, tiles_bwd=3)
CASES = {
    "T1_tail": dict(B=2, T=1, C=40, K=4, tail=True),
    "T1_notail": dict(B=2, T=1, C=40, K=4, tail=False),
    "T3_tail": dict(B=2, T=3, C=40, K=4, tail=True),
    "T3_notail": dict(B=2, T=3, C=40, K=4, tail=False),
    "T5_tail": dict(B=2, T=5, C=40, K=4, tail=True),
    "T5_notail": dict(B=2, T=5, C=40, K=4, tail=False),
    "T70_tail_C200": dict(B=2, T=70, C=200, K=4, tail=True),
    "T70_notail_C40": dict(B=2, T=70, C=40, K=4, tail=False),
    "T0_tail": dict(B=2, T=0, C=40, K=4, tail=True),
    "K2_T5_tail": dict(B=2, T=5, C=40, K=2, tail=True),
    "K2_T1_notail": dict(B=2, T=1, C=40, K=2, tail=False),
    "K3_T9_tail": dict(B=2, T=9, C=24, K=3, tail=True),
    "packed_tail": dict(B=1, T=20, C=40, K=4, tail=True, cu=[0, 5, 5, 6, 8, 20]),
    "packed_notail": dict(B=1, T=20, C=40, K=4, tail=False, cu=[0, 5, 5, 6, 8, 20]),
    "packed_first_empty_C200": dict(B=1, T=9, C=200, K=4, tail=True, cu=[0, 0, 2, 9, 9]),
    "packed_decode": dict(B=1, T=3, C=40, K=4, tail=True, cu=[0, 1, 1, 2, 3]),
    "packed_K2_tail": dict(B=1, T=20, C=40, K=2, tail=True, cu=[0, 5, 5, 6, 8, 20]),
    "packed_small_blocks": dict(B=1, T=20, C=40, K=4, tail=True, cu=[0, 5, 5, 6, 8, 20], tune=_SMALL),
    "unpacked_small_blocks": dict(B=2, T=11, C=40, K=4, tail=True, tune=_SMALL),
    "act_none_unpacked": dict(B=2, T=5, C=40, K=4, tail=True, act=None),
    "act_none_packed": dict(B=1, T=20, C=40, K=4, tail=False, cu=[0, 5, 5, 6, 8, 20], act=None),
    "fp64_unpacked": dict(B=2, T=5, C=40, K=4, tail=True, dtype="float64"),
    "fp64_packed": dict(B=1, T=20, C=40, K=4, tail=True, cu=[0, 5, 5, 6, 8, 20], dtype="float64"),
    "bf16_packed": dict(B=1, T=20, C=40, K=4, tail=True, cu=[0, 5, 5, 6, 8, 20], dtype="bfloat16"),
    # x a view: a channel slice of a wider tensor, as of one joint q / k / v projection (read in place), and a
    # time slice whose batch rows are not evenly spaced (copied first)
    "channel_slice_unpacked": dict(B=2, T=70, C=40, K=4, tail=True, slice=(24, 8), tune=_SMALL),
    "channel_slice_T1": dict(B=3, T=1, C=40, K=4, tail=True, slice=(3, 0)),
    "channel_slice_packed": dict(B=1, T=20, C=40, K=4, tail=True, cu=[0, 5, 5, 6, 8, 20], slice=(0, 17)),
    "time_slice_unpacked": dict(B=2, T=9, C=40, K=4, tail=False, slice=(8, 8), extra_t=3),
}


def loop_reference(x, w, cu, tail, act):
    """Per-sequence loop: each sequence's tail (or zeros) in front of its tokens, then the K taps."""
    B, T, C = x.shape
    K = w.shape[1]
    seqs = ([(b, 0, T) for b in range(B)] if cu is None else [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)])
    ys, tails = [], []
    for n, (b, start, end) in enumerate(seqs):
        head = tail[n] if tail is not None else x.new_zeros(K - 1, C)
        ext = torch.cat([head, x[b, start:end]])
        pre = sum(w[:, j] * ext[j:j + end - start] for j in range(K))
        ys.append(torch.nn.functional.silu(pre) if act == "silu" else pre)
        tails.append(ext[ext.shape[0] - (K - 1):])
    y = torch.cat(ys).view(1, T, C) if cu is not None else torch.stack(ys)
    return y, torch.stack(tails)


def run_case(spec, seed=0, device="cpu", ref_dtype=torch.float64):
    """Relative errors of y, new_tail, dx and dw against the reference, and the output dtype checks."""
    from modeling_fwp import conv_triton
    from modeling_fwp.modeling_fwp import ShortConvolution

    conv_triton.TUNE.clear()
    conv_triton.TUNE.update(spec.get("tune", {}))
    gen = torch.Generator().manual_seed(seed)
    B, T, C, K = (spec[k] for k in ("B", "T", "C", "K"))
    cu, act = spec.get("cu"), spec.get("act", "silu")
    dtype = getattr(torch, spec.get("dtype", "float32"))
    N = B if cu is None else len(cu) - 1
    x = torch.randn(B, T, C, generator=gen).to(device, dtype).requires_grad_()
    if "slice" in spec:  # the same values inside a wider tensor; x is then a non-leaf view of it
        before, after = spec["slice"]
        extra_t = spec.get("extra_t", 0)
        wide = torch.randn(B, T + extra_t, before + C + after, generator=gen).to(device, dtype)
        wide[:, :T, before:before + C] = x.detach()
        x = wide.requires_grad_()[:, :T, before:before + C]
        in_place = conv_triton._rows_addressable(x)
        if in_place != (extra_t == 0 or B == 1):
            raise AssertionError(f"_rows_addressable({tuple(x.stride())}) = {in_place}")
    w_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = (0.5 * torch.randn(C, K, generator=gen)).to(device, w_dtype).requires_grad_()
    tail = torch.randn(N, K - 1, C, generator=gen).to(device, dtype) if spec["tail"] else None
    cut = torch.tensor(cu, dtype=torch.int32, device=device) if cu is not None else None
    try:
        y, new_tail = conv_triton.short_conv_triton(x, w, cut, tail, activation=act)
    finally:
        conv_triton.TUNE.clear()

    x_ref = x.detach().to(ref_dtype).requires_grad_()
    tail_ref = tail.to(ref_dtype) if tail is not None else None
    if act == "silu" and T > 0:  # F.conv1d refuses an input shorter than the kernel (T = 0 with a tail)
        ref = ShortConvolution(C, K).to(device, ref_dtype)
        with torch.no_grad():
            ref.weight.copy_(w)
        w_ref = ref.weight
        ry, rtail = ref(x_ref, cut, tail_ref)
    else:
        w_ref = w.detach().to(ref_dtype).requires_grad_()
        ry, rtail = loop_reference(x_ref, w_ref, cu, tail_ref, act)

    def rel(a, b):
        return ((a.to(ref_dtype) - b).norm() / b.norm().clamp_min(1e-30)).item()

    dy = torch.randn(y.shape, generator=gen).to(device)
    dx, dw = torch.autograd.grad((y.to(ref_dtype) * dy.to(ref_dtype)).sum(), [x, w], allow_unused=True)
    rdx, rdw = torch.autograd.grad((ry * dy.to(ref_dtype)).sum(), [x_ref, w_ref], allow_unused=True)
    rdx = torch.zeros_like(x_ref) if rdx is None else rdx
    rdw = torch.zeros_like(w_ref) if rdw is None else rdw
    return {
        "y": rel(y, ry), "new_tail": rel(new_tail, rtail), "dx": rel(dx, rdx), "dw": rel(dw, rdw),
        "y_dtype_ok": float(y.dtype == x.dtype and y.shape == x.shape),
        "tail_ok": float(new_tail.dtype == x.dtype and tuple(new_tail.shape) == (N, K - 1, C)
                         and not new_tail.requires_grad),
        "grad_dtypes_ok": float(dx.dtype == x.dtype and dw.dtype == w.dtype),
    }


def bad_input_messages():
    """ValueErrors (message text) for inputs short_conv_triton must refuse."""
    from modeling_fwp.conv_triton import short_conv_triton

    x, w = torch.randn(1, 4, 8), torch.randn(8, 4)
    tries = {
        "tail_grad": lambda: short_conv_triton(x, w, tail=torch.randn(1, 3, 8, requires_grad=True)),
        "activation": lambda: short_conv_triton(x, w, activation="gelu"),
        "weight_shape": lambda: short_conv_triton(x, torch.randn(7, 4)),
        "weight_K1": lambda: short_conv_triton(x, torch.randn(8, 1)),
        "tail_shape": lambda: short_conv_triton(x, w, tail=torch.randn(1, 2, 8)),
        "packed_batch": lambda: short_conv_triton(torch.randn(2, 4, 8), w,
                                                  cu_seqlens=torch.tensor([0, 4], dtype=torch.int32)),
        "int_dtype": lambda: short_conv_triton(x.long(), w),
    }
    return value_error_messages(tries)


def _worker():
    torch.set_num_threads(1)
    run_cases(CASES, run_case, _bad_inputs=bad_input_messages)


@pytest.fixture(scope="module")
def interpreter_results():
    return worker_results(__file__)


def _assert_small(name, errs, tol):
    assert errs.pop("y_dtype_ok") == 1.0, "y must come back in x.dtype and x's shape"
    assert errs.pop("tail_ok") == 1.0, "new_tail must be [N, K-1, C] in x.dtype, detached"
    assert errs.pop("grad_dtypes_ok") == 1.0, "dx must be in x.dtype and dw in weight.dtype"
    assert set(errs) == {"y", "new_tail", "dx", "dw"}
    bad = {k: v for k, v in errs.items() if not v < tol}  # `not <` also catches NaN
    assert not bad, f"{name}: relative errors above {tol}: {bad}"


@needs_triton
@pytest.mark.parametrize("name", list(CASES))
def test_interpreter_matches_reference(name, interpreter_results):
    errs = interpreter_results[name]
    assert "error" not in errs, errs.get("error")
    _assert_small(name, dict(errs), TOL[CASES[name].get("dtype", "float32")])


@needs_triton
@pytest.mark.parametrize("what,needle", [("tail_grad", "tail"), ("activation", "activation"),
                                         ("weight_shape", "weight"), ("weight_K1", "K >= 2"),
                                         ("tail_shape", "tail"), ("packed_batch", "cu_seqlens"),
                                         ("int_dtype", "dtype")])
def test_interpreter_rejects_bad_input(what, needle, interpreter_results):
    msg = interpreter_results["_bad_inputs"][what]
    assert msg is not None, f"{what}: no ValueError"
    assert needle in msg


def test_imports_without_triton(monkeypatch):
    """The module must load where triton is missing (HAS_TRITON False) and refuse calls with ImportError."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    import modeling_fwp.ops_common  # noqa: F401  the package its relative import needs (no triton in it)

    spec = importlib.util.spec_from_file_location("modeling_fwp._conv_triton_no_triton",
                                                  os.path.join(REPO, "modeling_fwp", "conv_triton.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.HAS_TRITON is False
    with pytest.raises(ImportError, match="triton"):
        module.short_conv_triton(torch.randn(1, 2, 4), torch.randn(4, 4))


# ---------------------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA_CASES = {
    "model_shape_bf16": dict(B=8, T=2048, C=3072, K=4, tail=False, dtype="bfloat16"),
    "model_shape_bf16_tail": dict(B=2, T=2048, C=3072, K=4, tail=True, dtype="bfloat16"),
    "packed_bf16": dict(B=1, T=4100, C=3072, K=4, tail=True, dtype="bfloat16",
                        cu=[0, 1000, 1000, 1001, 1003, 3000, 4100]),
    "decode_bf16": dict(B=1, T=4, C=3072, K=4, tail=True, dtype="bfloat16", cu=[0, 1, 2, 2, 3, 4]),
}
CUDA_FP32_CASES = {
    "fp32_unpacked": dict(B=2, T=300, C=3072, K=4, tail=True),
    "fp32_packed": dict(B=1, T=300, C=1000, K=4, tail=True, cu=[0, 0, 1, 3, 150, 300]),
    "fp32_act_none_K2": dict(B=2, T=257, C=520, K=2, tail=False, act=None),
}


@needs_triton
@cuda
@pytest.mark.parametrize("name", list(CUDA_CASES))
def test_cuda_bf16_close_to_fp32_reference(name):
    errs = run_case(CUDA_CASES[name], seed=1, device="cuda", ref_dtype=torch.float32)
    _assert_small(name, errs, 1e-2)


@needs_triton
@cuda
@pytest.mark.parametrize("name", list(CUDA_FP32_CASES))
def test_cuda_fp32_matches_float64_reference(name):
    _assert_small(name, run_case(CUDA_FP32_CASES[name], seed=2, device="cuda"), 1e-5)


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, REPO)
    _worker()
