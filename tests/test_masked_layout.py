"""The masked layout of a padded batch (pads kept in the batch, moved after each row's real tokens and masked in the
layers: fixed shapes, what torch.compile and torch.export run) against the unpadded one (pads removed before the
layers) and against the float64 reference of each row alone. Both layouts must give the same logits, hidden states,
gradients and cache state (fast weights, z, convolution tail, token counts) for every variant family and any mask:
left, right or inner padding, an empty row, and a continuation from the cache."""

import pytest
import torch
from reference_fwp import reference_logits
from test_model import VARIANTS, tiny_model
from test_reference_model import PADDED_FAMILIES, build

import modeling_fwp.modeling_fwp as modeling
from modeling_fwp.compat import output_cache

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = dict(VARIANTS,  # plus the parts VARIANTS leaves out: a convolution with z, DPFP and rotary; sinusoidal
                conv_norm_dpfp_rotary=dict(use_short_conv=True, attention_normalization=True, feature_map="dpfp",
                                           dpfp_nu=2, position_embedding="rotary", conv_size=3),
                sum_conv_sinusoidal=dict(update_rule="sum", use_short_conv=True, position_embedding="sinusoidal",
                                         attention_normalization=True, qk_norm="none"),
                fla_gated=dict(block_style="pre_norm", feature_map="identity", qk_norm="l2", use_short_conv=True,
                               use_gate=True, allow_neg_eigval=True))


def masks(width=11):
    """Row 0 full, 1 left-padded, 2 right-padded, 3 with holes, 4 empty, 5 a single token at the end."""
    mask = torch.zeros(6, width, dtype=torch.long)
    mask[0] = 1
    mask[1, 4:] = 1
    mask[2, :6] = 1
    mask[3, [1, 2, 5, 9]] = 1
    mask[5, -1] = 1
    return mask


def run(model, masked, monkeypatch, **inputs):
    monkeypatch.setattr(modeling, "use_masked_layout", lambda attention_mask: masked)
    return model(**inputs, output_hidden_states=True)


def assert_same(a, b):
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-10, atol=1e-12)
    for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    for x, y in zip(output_cache(a).layers, output_cache(b).layers, strict=True):
        assert x.seen_tokens == y.seen_tokens
        for s, t in zip(x.tensors(), y.tensors(), strict=True):
            torch.testing.assert_close(s, t, rtol=1e-10, atol=1e-12)


def test_eager_keeps_the_unpadded_layout_and_a_graph_takes_the_masked_one(monkeypatch):
    assert not modeling.use_masked_layout(torch.ones(1, 2))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert modeling.use_masked_layout(torch.ones(1, 2))


@pytest.mark.parametrize("name", FAMILIES)
def test_masked_equals_unpadded_with_cache_continuation(name, monkeypatch):
    model = tiny_model(**FAMILIES[name])
    mask = masks()
    ids = torch.randint(1, 61, mask.shape, generator=torch.Generator().manual_seed(3))  # pads hold real ids too
    first = {masked: run(model, masked, monkeypatch, input_ids=ids, attention_mask=mask) for masked in (False, True)}
    assert_same(first[True], first[False])
    assert (first[True].logits[mask == 0] == 0).all()  # a pad's output is zero, as the unpadded path leaves it
    # A continuation from each layout's own cache, itself padded (rows 1 and 3 add tokens after a gap).
    more = torch.randint(1, 61, (6, 5), generator=torch.Generator().manual_seed(4))
    more_mask = torch.ones_like(more)
    more_mask[1, :2] = more_mask[3, 3:] = more_mask[4] = 0
    second = {masked: run(model, masked, monkeypatch, input_ids=more, attention_mask=more_mask,
                          cache=output_cache(first[masked])) for masked in (False, True)}
    assert_same(second[True], second[False])


@pytest.mark.parametrize("name", ["delta_net", "linear_transformer", "modern", "favor_sum", "conv_norm_dpfp_rotary"])
def test_masked_gradients_equal_unpadded(name, monkeypatch):
    model = tiny_model(**FAMILIES[name])
    mask = masks()
    ids = torch.randint(1, 61, mask.shape, generator=torch.Generator().manual_seed(5))
    labels = ids.masked_fill(mask == 0, -100)
    grads = {}
    for masked in (False, True):
        model.zero_grad()
        run(model, masked, monkeypatch, input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads[masked] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", PADDED_FAMILIES)
def test_masked_rows_equal_reference_of_each_row_alone(name, side, monkeypatch):
    """The float64 reference (tests/reference_fwp.py) of each row on its own; the pad token's embedding is not
    zero, so a pad that leaked into the state, the convolution or the positions would show."""
    model = build(PADDED_FAMILIES[name], "chunk")
    ids = torch.randint(1, 50, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    span = slice(0, 7) if side == "left" else slice(13, 20)
    ids[1, span], mask[1, span] = 0, 0
    with torch.no_grad():
        logits = run(model, True, monkeypatch, input_ids=ids, attention_mask=mask, use_cache=False).logits
    real = mask[1] == 1
    torch.testing.assert_close(logits[0], reference_logits(model.state_dict(), model.config, ids[0]),
                               rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(logits[1, real], reference_logits(model.state_dict(), model.config, ids[1, real]),
                               rtol=1e-9, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the fused Triton layer kernels)")
@pytest.mark.parametrize("name", ["modern", "conv_norm_dpfp_rotary", "fla_gated"])
def test_cuda_masked_equals_unpadded_with_the_fused_kernels(name, monkeypatch):
    """On CUDA in eager the layers run the fused Triton kernels (norms, the short convolution per part, whose tail
    the masked layout takes after the last real token) and the Triton update rule, in float32."""
    from test_model import tiny_config

    from modeling_fwp import FWPForCausalLM

    torch.manual_seed(0)
    model = FWPForCausalLM(tiny_config(**FAMILIES[name], hidden_size=64, num_heads=2, head_dim=32)).cuda().eval()
    mask = masks(width=70).cuda()
    ids = torch.randint(1, 61, mask.shape, generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        first = {masked: run(model, masked, monkeypatch, input_ids=ids, attention_mask=mask)
                 for masked in (False, True)}
        more = ids[:, :5]
        second = {masked: run(model, masked, monkeypatch, input_ids=more, attention_mask=torch.ones_like(more),
                              cache=output_cache(first[masked])) for masked in (False, True)}
    for out in (first, second):
        torch.testing.assert_close(out[True].logits, out[False].logits, rtol=1e-4, atol=1e-5)
        for x, y in zip(output_cache(out[True]).layers, output_cache(out[False]).layers, strict=True):
            for s, t in zip(x.tensors(), y.tensors(), strict=True):
                torch.testing.assert_close(s, t, rtol=1e-4, atol=1e-5)
