"""ONNX: `torch.onnx.export(..., dynamo=True)` of the model with a padding mask, dynamic batch and length, run by
onnxruntime on CPU against eager logits; and the form of the update rule it exports (one `scan` over time, which
becomes an ONNX Scan node) against the float64 step-by-step definition. The custom operators of torch.compile /
torch.export have no ONNX translation, so `auto` picks that scan while `torch.onnx.is_in_onnx_export()`."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_compile import FAMILIES, batch, new_shapes
from test_model import tiny_model
from torch.export import Dim

from modeling_fwp import ops

MISSING = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
needs_onnx = pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} (pip install onnx onnxscript "
                                                      "onnxruntime; the dev extra has them)")


@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_scan_form_equals_the_step_by_step_definition(rule):
    gen = torch.Generator().manual_seed(0)
    q, v = torch.randn(2, 13, 3, 8, generator=gen), torch.randn(2, 13, 3, 5, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(2, 13, 3, 8, generator=gen), dim=-1)
    beta = torch.rand(2, 13, 3, generator=gen) if rule == "delta" else None
    state = torch.randn(2, 3, 8, 5, generator=gen)
    o, final = ops._recurrent_scan(q, k, v, beta, 0.3, state, True)
    want_o, want_final = ops.reference_float64(q, k, v, beta, scale=0.3, initial_state=state)
    torch.testing.assert_close(o.double(), want_o, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(final.double(), want_final, rtol=1e-5, atol=1e-6)
    assert final.dtype == torch.float32  # the state in fp32


def test_auto_picks_the_scan_only_inside_an_onnx_export(monkeypatch):
    q = torch.zeros(1, 4, 1, 2)
    assert ops._pick_backend("auto", q, None) == "chunk"
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert ops._pick_backend("auto", q, None) == "scan"


@needs_onnx
@pytest.mark.filterwarnings("ignore::FutureWarning:copyreg")  # torch's own pytree pickling (LeafSpec), not ours
@pytest.mark.filterwarnings("ignore:# ONNX model has different number of inputs:UserWarning")  # (use_cache: no input)
@pytest.mark.parametrize("name, padded", [("delta_net", True), ("linear_transformer", False), ("fla_gated", True),
                                          ("favor_sum", True)])
def test_onnx_runtime_gives_the_eager_logits(name, padded, tmp_path):
    """Exported once with a 2 x 20 batch, run on other batch sizes and lengths (a sequence shorter than a chunk and
    one spanning three), left and right padding: onnxruntime's logits equal eager's (fp32)."""
    import onnxruntime

    model = tiny_model(**FAMILIES[name]).float().eval()
    x, mask = batch(padded, rows=2, length=20)
    rows, length = Dim("batch", min=1, max=64), Dim("seq", min=2, max=4096)
    shapes = {"input_ids": {0: rows, 1: length}, "attention_mask": {0: rows, 1: length} if padded else None,
              "use_cache": None}
    path = tmp_path / "fwp.onnx"
    torch.onnx.export(model, (), kwargs=dict(input_ids=x, attention_mask=mask, use_cache=False),
                      dynamic_shapes=shapes, dynamo=True, f=str(path), verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == (["input_ids", "attention_mask"] if padded else ["input_ids"])
    for x, mask in new_shapes(padded):
        feeds = {"input_ids": x.numpy()} | ({"attention_mask": mask.numpy()} if padded else {})
        got = torch.from_numpy(session.run(None, feeds)[0])
        with torch.no_grad():
            want = model(x, attention_mask=mask, use_cache=False).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
