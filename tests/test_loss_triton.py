"""Fused cross-entropy kernels (modeling_fwp/loss_triton.py) against the float64 PyTorch reference.

Reference: F.cross_entropy(logits.double(), targets, ignore_index=-100, reduction="sum"), the quantity
losses._ChunkedCrossEntropy returns; the loss (relative error) and the gradient of `loss * scale` (so the backward
sees a grad_output other than 1) are compared, and the logits must be bit-identical after forward and backward.
fp32: relative errors below 1e-5; float64 end to end: 1e-12; 16-bit gradients: within one unit in the last place
of the exact value (Triton's interpreter truncates fp32 -> bf16 where the GPU rounds to nearest, so a rounded
gradient may sit one ulp below; on CUDA half an ulp is required).

On CPU the kernels run under Triton's interpreter. TRITON_INTERPRET=1 must be set before triton is first imported,
and another test file may already have imported triton in this pytest process, so all CPU cases run in ONE
subprocess (this file, run as a script with --worker; tests/triton_interpreter.py) and each test checks its case.
On CUDA, `causal_lm_loss` must pick the kernels by itself and match the reference at a realistic shape.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from triton_interpreter import REPO, launch_settings, run_cases, value_error_messages, worker_results

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
SIGNIFICANT_BITS = {torch.bfloat16: 8, torch.float16: 11}
SMALLEST_ULP_EXP = {torch.bfloat16: -133, torch.float16: -24}  # spacing of the subnormals

# name -> rows, vocab, dtype; optional: ignore ("some" (default) | "none" | "all"), scale (the grad_output, default
# 3), tune (launch overrides: a small vocabulary block reaches the multi-block loop at tiny shapes), pattern
# ("ramp": logits rise along the vocabulary, so every block raises the running max; "offset": logits near 100,
# where exp without the max subtracted overflows fp32), strided (the logits are a row-strided slice of a wider
# tensor), lm (through causal_lm_loss [batch, seq, vocab] with num_items_in_batch, against backend="torch").
_BLOCK64 = dict(block_v=64)
CASES = {
    "fp32_37x200_block64": dict(rows=37, vocab=200, dtype="fp32", tune=_BLOCK64),  # 4 blocks, the last partial
    "fp32_37x256_block64": dict(rows=37, vocab=256, dtype="fp32", tune=_BLOCK64, ignore="none"),  # whole blocks
    "fp32_37x37": dict(rows=37, vocab=37, dtype="fp32"),  # one masked block
    "fp32_9x5000": dict(rows=9, vocab=5000, dtype="fp32"),  # default blocks: 2 forward (4096), 3 backward (2048)
    "fp32_ramp_37x200_block64": dict(rows=37, vocab=200, dtype="fp32", tune=_BLOCK64, pattern="ramp"),
    "fp32_offset_37x200_block64": dict(rows=37, vocab=200, dtype="fp32", tune=_BLOCK64, pattern="offset"),
    "fp32_strided_37x200_block64": dict(rows=37, vocab=200, dtype="fp32", tune=_BLOCK64, strided=True),
    "fp32_all_ignored_9x100": dict(rows=9, vocab=100, dtype="fp32", ignore="all"),
    "fp32_scale_half_37x100": dict(rows=37, vocab=100, dtype="fp32", scale=-0.5),
    "fp32_vocab1_5x1": dict(rows=5, vocab=1, dtype="fp32"),
    "fp32_empty": dict(rows=0, vocab=100, dtype="fp32"),
    "bf16_37x200_block64": dict(rows=37, vocab=200, dtype="bf16", tune=_BLOCK64),
    "bf16_9x5000": dict(rows=9, vocab=5000, dtype="bf16"),
    "bf16_all_ignored_9x100": dict(rows=9, vocab=100, dtype="bf16", ignore="all"),
    "fp16_37x200_block64": dict(rows=37, vocab=200, dtype="fp16", tune=_BLOCK64),
    "fp64_37x200_block64": dict(rows=37, vocab=200, dtype="fp64", tune=_BLOCK64),
    "lm_bf16_3x11x200": dict(rows=33, vocab=200, dtype="bf16", lm=True, tune=_BLOCK64),
    "lm_fp32_3x11x200_num_items": dict(rows=33, vocab=200, dtype="fp32", lm=True, num_items=17),
}


def tolerance(spec):
    return 1e-12 if spec["dtype"] == "fp64" else 1e-5


def grad_ulps(got: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest |got - exact| in units of the last place of `exact` in got's (16-bit) dtype."""
    _, exp = torch.frexp(exact)  # exact = m * 2**exp, 0.5 <= |m| < 1: the ulp is 2**(exp - significant bits)
    ulp_exp = (exp - SIGNIFICANT_BITS[got.dtype]).clamp(min=SMALLEST_ULP_EXP[got.dtype])
    return ((got.double() - exact).abs() / torch.ldexp(torch.ones_like(exact), ulp_exp)).max().item()


def make_case(spec, seed=0, device="cpu"):
    """Logits (requires grad; a row-strided view when spec says so) and targets [rows]."""
    gen = torch.Generator().manual_seed(seed)
    rows, vocab, dtype = spec["rows"], spec["vocab"], DTYPES[spec["dtype"]]
    base = 3 * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    if spec.get("pattern") == "ramp":
        base = base + torch.linspace(0, 40, vocab, dtype=torch.float64)
    if spec.get("pattern") == "offset":
        base = base + 100
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    ignore = spec.get("ignore", "some")
    if ignore == "some":
        targets[torch.rand(rows, generator=gen) < 0.3] = -100
    elif ignore == "all":
        targets[:] = -100
    if spec.get("strided"):
        wide = torch.randn(rows, vocab + 7, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        wide[:, :vocab] = base.to(dtype)
        leaf = wide.requires_grad_()
        logits = leaf[:, :vocab]
    else:
        leaf = logits = base.to(device=device, dtype=dtype).requires_grad_()
    return leaf, logits, targets.to(device)


def run_case(spec, seed=0, device="cpu"):
    from modeling_fwp import loss_triton

    with launch_settings(loss_triton, spec.get("tune", {})):
        return _run_case(spec, seed, device)


def _run_case(spec, seed, device):
    import torch.nn.functional as F

    from modeling_fwp import loss_triton
    from modeling_fwp.losses import causal_lm_loss

    leaf, logits, targets = make_case(spec, seed, device)
    dtype, scale = logits.dtype, spec.get("scale", 3.0)
    before = leaf.detach().clone()
    exact_leaf = leaf.detach().double().requires_grad_()
    exact_logits = exact_leaf[:, :logits.shape[1]] if spec.get("strided") else exact_leaf
    if spec.get("lm"):  # [3, 11, V] through the public loss; labels are shifted there, so targets serve as labels
        shape = (3, spec["rows"] // 3, spec["vocab"])
        labels = targets.view(shape[:2])
        loss = causal_lm_loss(logits.view(shape), labels, num_items_in_batch=spec.get("num_items"), backend="triton")
        exact = causal_lm_loss(exact_logits.view(shape), labels, num_items_in_batch=spec.get("num_items"),
                               backend="torch")
        want_loss_dtype = torch.float32
    else:
        loss = loss_triton.cross_entropy_sum_triton(logits, targets)
        exact = F.cross_entropy(exact_logits, targets, ignore_index=-100, reduction="sum")
        want_loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    (grad,) = torch.autograd.grad(loss * scale, leaf)
    (exact_grad,) = torch.autograd.grad(exact * scale, exact_leaf)

    def rel(a, b):
        if b.numel() == 0:
            return 0.0 if a.shape == b.shape else float("inf")
        return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()

    ignored = targets == -100
    if spec.get("lm"):
        ignored = torch.ones_like(ignored)
        ignored.view(3, -1)[:, :-1] = targets.view(3, -1)[:, 1:] == -100
    out = {
        "loss": rel(loss.detach(), exact.detach()),
        "loss_dtype_ok": float(loss.dtype == want_loss_dtype and loss.dim() == 0),
        "grad_dtype_ok": float(grad.dtype == dtype and grad.shape == leaf.shape),
        "logits_unchanged": float(torch.equal(leaf.detach(), before)),
        "ignored_rows_zero": float(bool((grad[:, :logits.shape[1]][ignored] == 0).all())),
    }
    if dtype in SIGNIFICANT_BITS:
        out["grad_ulps"] = grad_ulps(grad, exact_grad)
    else:
        out["grad"] = rel(grad, exact_grad)
    return out


def bad_input_messages():
    """ValueErrors (message text) for inputs the kernel must refuse."""
    from modeling_fwp.loss_triton import cross_entropy_sum_triton

    x, t = torch.randn(3, 8), torch.tensor([1, 2, -100])
    tries = {
        "int_logits": lambda: cross_entropy_sum_triton(torch.ones(3, 8, dtype=torch.int32), t),
        "logits_1d": lambda: cross_entropy_sum_triton(torch.randn(8), t),
        "vocab_0": lambda: cross_entropy_sum_triton(torch.randn(3, 0), t),
        "targets_shape": lambda: cross_entropy_sum_triton(x, t[:2]),
        "float_targets": lambda: cross_entropy_sum_triton(x, t.float()),
    }
    return value_error_messages(tries)


def _worker():
    torch.set_num_threads(1)  # tiny tensors: extra intra-op threads only add sync cost
    run_cases(CASES, run_case, _bad_inputs=bad_input_messages)


@pytest.fixture(scope="module")
def interpreter_results():
    return worker_results(__file__)


def _assert_matches(name, out, spec, max_ulps):
    out = dict(out)
    for flag in ("loss_dtype_ok", "grad_dtype_ok", "logits_unchanged", "ignored_rows_zero"):
        assert out.pop(flag) == 1.0, f"{name}: {flag} failed"
    tol = tolerance(spec)
    assert out["loss"] < tol, f"{name}: loss relative error {out['loss']} above {tol}"  # `<` also catches NaN
    if "grad_ulps" in out:
        assert out["grad_ulps"] <= max_ulps, f"{name}: gradient {out['grad_ulps']} ulps from the exact value"
    else:
        assert out["grad"] < tol, f"{name}: gradient relative error {out['grad']} above {tol}"


@pytest.mark.parametrize("name", list(CASES))
def test_interpreter_matches_float64_reference(name, interpreter_results):
    out = interpreter_results[name]
    assert "error" not in out, out.get("error")
    _assert_matches(name, out, CASES[name], max_ulps=1.01)


@pytest.mark.parametrize("what,needle", [("int_logits", "dtype"), ("logits_1d", "shape"), ("vocab_0", "vocab"),
                                         ("targets_shape", "targets shape"), ("float_targets", "integer")])
def test_interpreter_rejects_bad_input(what, needle, interpreter_results):
    msg = interpreter_results["_bad_inputs"][what]
    assert msg is not None, f"{what}: no ValueError"
    assert needle in msg


def test_auto_backend_picks_triton_only_for_16_and_32_bit_cuda_logits(monkeypatch):
    from modeling_fwp import losses

    def fake(dtype, cuda=True, vocab=5):  # loss_backend only reads these attributes
        return SimpleNamespace(is_cuda=cuda, dtype=dtype, shape=(2, 3, vocab))

    expected = "triton" if losses.HAS_TRITON_LOSS else "torch"
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert losses.loss_backend(fake(dtype)) == expected
    assert losses.loss_backend(fake(torch.float64)) == "torch"
    assert losses.loss_backend(fake(torch.float32, cuda=False)) == "torch"
    assert losses.loss_backend(torch.zeros(2, 3, 5)) == "torch"
    assert losses.loss_backend(fake(torch.float32), "torch") == "torch"
    monkeypatch.setattr(losses, "HAS_TRITON_LOSS", False)
    assert losses.loss_backend(fake(torch.bfloat16)) == "torch"
    with pytest.raises(ImportError, match="triton"):
        losses.loss_backend(fake(torch.bfloat16), "triton")
    with pytest.raises(ValueError, match="backend"):
        losses.causal_lm_loss(torch.zeros(1, 2, 5), torch.zeros(1, 2, dtype=torch.long), backend="fused")


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    from modeling_fwp.loss_triton import HAS_TRITON_LOSS, cross_entropy_sum_triton

    if not HAS_TRITON_LOSS:
        pytest.skip("triton does not import here")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # checked before any launch
    with pytest.raises(ValueError, match="CUDA"):
        cross_entropy_sum_triton(torch.randn(3, 8), torch.tensor([1, 2, 3]))


def test_imports_without_triton(monkeypatch):
    """The module must import where triton is missing (HAS_TRITON_LOSS False) and raise ImportError on use."""
    for mod in ("triton", "triton.language"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import triton` now raises ImportError
    path = os.path.join(REPO, "modeling_fwp", "loss_triton.py")
    spec = importlib.util.spec_from_file_location("_loss_triton_without_triton", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.HAS_TRITON_LOSS is False
    with pytest.raises(ImportError, match="triton"):
        module.cross_entropy_sum_triton(torch.randn(2, 4), torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_cuda_dispatch_picks_triton_and_matches_reference(dtype, monkeypatch):
    """causal_lm_loss on CUDA logits (the training shape's vocabulary) runs the kernels without being asked to."""
    from modeling_fwp import losses

    calls = []
    kernel = losses.cross_entropy_sum_triton
    monkeypatch.setattr(losses, "cross_entropy_sum_triton", lambda *a: calls.append(1) or kernel(*a))
    spec = dict(rows=2 * 2048, vocab=32000, dtype=dtype)
    leaf, logits, targets = make_case(spec, seed=1, device="cuda")
    labels = targets.view(2, 2048)
    before = logits.detach().clone()
    loss = losses.causal_lm_loss(logits.view(2, 2048, -1), labels, num_items_in_batch=3000)
    (grad,) = torch.autograd.grad(loss * 3, logits)
    exact_logits = logits.detach().double().requires_grad_()
    exact = losses.causal_lm_loss(exact_logits.view(2, 2048, -1), labels, num_items_in_batch=3000)
    (exact_grad,) = torch.autograd.grad(exact * 3, exact_logits)
    assert calls == [1], "auto did not pick the Triton kernels for CUDA logits"
    assert loss.dtype == torch.float32 and grad.dtype == logits.dtype
    assert torch.equal(logits.detach(), before)
    assert abs(loss.item() - exact.item()) < 1e-5 * abs(exact.item())
    if logits.dtype in SIGNIFICANT_BITS:
        assert grad_ulps(grad, exact_grad) <= 0.51  # the GPU rounds to nearest
    else:
        assert ((grad.double() - exact_grad).norm() / exact_grad.norm()).item() < 1e-5


@cuda
def test_cuda_fp64_logits_keep_the_chunked_loss(monkeypatch):
    from modeling_fwp import losses

    monkeypatch.setattr(losses, "cross_entropy_sum_triton", lambda *a: pytest.fail("fp64 must stay in PyTorch"))
    logits = torch.randn(2, 5, 11, device="cuda", dtype=torch.float64)
    losses.causal_lm_loss(logits, torch.randint(0, 11, (2, 5), device="cuda"))


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, REPO)
    _worker()
