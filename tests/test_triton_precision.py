"""The fp32 Triton path asks for full fp32 dot products (input_precision "ieee"), not tf32.

On a GPU, tf32 would put the fp32 kernels' errors near 1e-3 (scripts/checks/check_triton_precision.py measures it), and
test_ops_triton's CUDA cases would catch it there. On CPU, Triton's interpreter computes every dot product in the
operands' dtype whatever precision a kernel asks for, so a kernel that slipped into tf32 would pass every CPU test.
Here the interpreter is made to round fp32 operands to tf32 (10 mantissa bits, round to nearest) where a dot asks
for tf32, as the tensor cores do; the fp32 path must still match the float64 loop to FP32_TOLERANCE, and the same
run with the kernels' precision forced to tf32 must not (which shows that the check can fail).
"""
from __future__ import annotations

import importlib.util
import sys

import pytest
from test_ops_triton import CASES, FP32_TOLERANCE, run_case
from triton_interpreter import REPO, run_cases, worker_results

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# fp32 cases that reach every kernel with a dot product: the chunked forward and backward (delta, sum, packed with
# an empty sequence, several K/V blocks) and the separate output kernel.
PRECISION_CASES = {name: CASES[name] for name in (
    "delta_T65_C32", "delta_varlen_empty_seq", "delta_blocks_2x2", "delta_T130_C16_fused_noh0", "sum_T65_C32")}


def _emulate_tf32_in_the_interpreter(seen: set) -> None:
    """Makes the interpreter's dot round fp32 operands to tf32 where the kernel asks for tf32, and records the
    precisions asked for."""
    import numpy as np
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    real_dot = interpreter.InterpreterBuilder.create_dot

    def to_tf32(data):
        bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
        rounded = (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)  # 23 -> 10 mantissa bits, to nearest
        return rounded.view(np.float32).reshape(data.shape)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        seen.add(str(input_precision).rsplit(".", 1)[-1])
        if input_precision == ir.INPUT_PRECISION.TF32 and a.data.dtype == np.float32 and b.data.dtype == np.float32:
            a = interpreter.TensorHandle(to_tf32(a.data), a.dtype.scalar)
            b = interpreter.TensorHandle(to_tf32(b.data), b.dtype.scalar)
        return real_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


def _worker():
    from modeling_fwp import ops_triton_launch

    seen = set()
    _emulate_tf32_in_the_interpreter(seen)
    results = {}
    for name, spec in PRECISION_CASES.items():
        seen.clear()
        errors = run_case(spec)
        results[name] = dict(errors, precisions=sorted(seen))
    real_init = ops_triton_launch._Plan.__init__

    def tf32_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.prec = "tf32"

    ops_triton_launch._Plan.__init__ = tf32_init
    try:
        for name in ("delta_T65_C32", "sum_T65_C32"):
            results[f"{name}_forced_tf32"] = run_case(PRECISION_CASES[name])
    finally:
        ops_triton_launch._Plan.__init__ = real_init
    run_cases({}, None, **{name: (lambda value=value: value) for name, value in results.items()})


@pytest.fixture(scope="module")
def interpreter_results():
    return worker_results(__file__)


def _worst(errors: dict) -> float:
    return max(value for key, value in errors.items() if isinstance(value, float) and key not in ("o_dtype_ok",
                                                                                                    "state_fp32"))


@pytest.mark.parametrize("name", list(PRECISION_CASES))
def test_fp32_kernels_ask_for_full_fp32_dot_products(name, interpreter_results):
    errors = interpreter_results[name]
    assert "error" not in errors, errors.get("error")
    assert errors["precisions"] and set(errors["precisions"]) <= {"IEEE"}, errors["precisions"]
    assert _worst(errors) < FP32_TOLERANCE, errors


@pytest.mark.parametrize("name", ["delta_T65_C32", "sum_T65_C32"])
def test_the_emulated_tf32_would_be_caught(name, interpreter_results):
    errors = interpreter_results[f"{name}_forced_tf32"]
    assert "error" not in errors, errors.get("error")
    assert _worst(errors) > FP32_TOLERANCE, errors


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, REPO)
    _worker()
