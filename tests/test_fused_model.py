"""The model with its fused Triton layer kernels (norms, l2 norm, SwiGLU, short convolution) against the same model
in plain PyTorch (kernel_backend="chunk", the reference): logits, loss, every parameter gradient and the cache.

On CPU the kernels run under Triton's interpreter in ONE subprocess (TRITON_INTERPRET must be set before triton is
first imported), with the fused path forced on for CPU tensors; on CUDA the real kernels run in-process.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from triton_interpreter import REPO, run_cases, worker_results

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# The modern DeltaNet layer (every fused kernel is used) and the same with padding or packing.
MODERN = dict(block_style="pre_norm", feature_map="identity", qk_norm="l2", use_short_conv=True,
              use_output_norm=True, position_embedding="none")
CASES = {
    "plain": dict(batch=2, length=37),
    "left_padded": dict(batch=2, length=37, pad=5),
    "packed": dict(batch=1, length=41, cu=[0, 2, 2, 19, 41]),
    "cached_continuation": dict(batch=2, length=23, continue_with=3),
}


def _model(device, dtype, backend):
    from modeling_fwp import FWPConfig, FWPForCausalLM

    torch.manual_seed(0)
    config = FWPConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_heads=3, head_dim=16,
                       intermediate_size=80, kernel_backend=backend, chunk_size=16, dropout=0.0, **MODERN)
    return FWPForCausalLM(config).to(device=device, dtype=dtype)


def run_case(spec, device="cpu", dtype=torch.float32):
    """Relative errors of the fused model against the reference (same weights) for one case."""
    from modeling_fwp.compat import output_cache

    gen = torch.Generator().manual_seed(1)
    x = torch.randint(1, 97, (spec["batch"], spec["length"]), generator=gen).to(device)
    kwargs = {}
    if "pad" in spec:
        mask = torch.ones_like(x)
        mask[0, : spec["pad"]] = 0
        kwargs["attention_mask"] = mask
    if "cu" in spec:
        kwargs["cu_seqlens"] = torch.tensor(spec["cu"], dtype=torch.int32, device=device)
    fused, reference = _model(device, dtype, "auto"), _model(device, dtype, "chunk")
    errs = {}

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    labels = x.clone()
    if "pad" in spec:
        labels[kwargs["attention_mask"] == 0] = -100
    outs = [m(x, labels=labels, use_cache=True, **kwargs) for m in (fused, reference)]
    errs["logits"] = rel(outs[0].logits, outs[1].logits)
    errs["loss"] = rel(outs[0].loss, outs[1].loss)
    for out in outs:
        out.loss.backward()
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (fused, reference)]
    errs["grads"] = rel(*grads)
    for i, (a, b) in enumerate(zip(output_cache(outs[0]).layers, output_cache(outs[1]).layers)):
        errs[f"state{i}"] = rel(a.fast_weights, b.fast_weights)
        errs[f"conv_tail{i}"] = rel(a.conv_tail, b.conv_tail)
    if "continue_with" in spec:
        more = torch.randint(1, 97, (spec["batch"], spec["continue_with"]), generator=gen).to(device)
        with torch.no_grad():
            nxt = [m(more, cache=output_cache(o)) for m, o in zip((fused, reference), outs)]
        errs["continued_logits"] = rel(nxt[0].logits, nxt[1].logits)
    return errs


def _worker():
    import modeling_fwp.modeling_fwp as modeling

    modeling.use_fused_kernels = lambda x, config: config.kernel_backend in ("auto", "triton")  # CPU tensors too
    run_cases(CASES, run_case)


@pytest.fixture(scope="module")
def interpreter_results():
    return worker_results(__file__)


def _assert_small(errs, tol):
    assert "error" not in errs, errs.get("error")
    assert {"logits", "loss", "grads", "state0", "conv_tail0"} <= set(errs)
    bad = {k: v for k, v in errs.items() if not v < tol}  # `not <` also catches NaN
    assert not bad, f"relative errors above {tol}: {bad}"


@pytest.mark.parametrize("name", list(CASES))
def test_interpreter_fused_model_equals_pytorch_model(name, interpreter_results):
    _assert_small(interpreter_results[name], 1e-5)


def test_fused_kernels_stay_off_on_cpu_and_for_the_reference_backends():
    import modeling_fwp.modeling_fwp as modeling
    from modeling_fwp import FWPConfig

    cpu = torch.zeros(1)
    assert not modeling.use_fused_kernels(cpu, FWPConfig(kernel_backend="auto"))
    if torch.cuda.is_available():
        gpu = cpu.cuda()
        assert modeling.use_fused_kernels(gpu, FWPConfig(kernel_backend="auto"))
        assert not modeling.use_fused_kernels(gpu, FWPConfig(kernel_backend="chunk"))
        assert not modeling.use_fused_kernels(gpu.double(), FWPConfig(kernel_backend="auto"))
        decode_step, prefill = torch.zeros(8, 1, 32, device="cuda"), torch.zeros(1, 64, 32, device="cuda")
        with torch.no_grad():  # a decode step is launch-bound: the PyTorch ops; a prefill: the kernels
            assert not modeling.use_fused_kernels(decode_step, FWPConfig(kernel_backend="auto"))
            assert modeling.use_fused_kernels(prefill, FWPConfig(kernel_backend="auto"))
        assert modeling.use_fused_kernels(decode_step, FWPConfig(kernel_backend="auto"))  # training: always


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_fused_model_equals_pytorch_model(name):
    _assert_small(run_case(CASES[name], device="cuda"), 2e-4)  # fp32; the Triton update rule reads with tf32-free dots


@cuda
def test_cuda_bf16_autocast_training_matches_fp32():
    fused = _model("cuda", torch.float32, "auto")
    x = torch.randint(1, 97, (2, 300), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    reference = fused(x, labels=x).loss
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = fused(x, labels=x).loss
    loss.backward()
    assert abs(loss.item() - reference.item()) < 0.02 * reference.item()
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters())


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, REPO)
    _worker()
