"""The chunked next-token loss against transformers' ForCausalLMLoss, which it replaces."""

import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from modeling_fwp.losses import causal_lm_loss


def _case(dtype, seed=0, B=3, T=11, V=37):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :4] = -100
    labels[2, -3:] = -100
    return logits, labels


def _definition(logits, labels, num_items=None):
    """-log softmax(logits[:, t])[labels[:, t + 1]] summed over non-ignored targets, in the logits' dtype."""
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
    return total / (num_items if num_items is not None else (labels[:, 1:] != -100).sum())


@pytest.mark.parametrize("chunk_rows", [1, 5, 4096])
@pytest.mark.parametrize("num_items", [None, 17])
def test_loss_and_gradient_equal_the_definition_in_float64(chunk_rows, num_items):
    logits, labels = _case(torch.float64)
    ours = causal_lm_loss(logits, labels, num_items_in_batch=num_items, chunk_rows=chunk_rows)
    (grad_ours,) = torch.autograd.grad(ours * 1.7, logits)
    reference = _definition(logits, labels, num_items)
    (grad_ref,) = torch.autograd.grad(reference * 1.7, logits)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_items", [None, 17])
def test_same_semantics_as_transformers_loss(num_items):
    """Shift, ignore_index and num_items_in_batch as transformers' ForCausalLMLoss (which runs in fp32)."""
    logits, labels = _case(torch.float32)
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    ours = causal_lm_loss(logits, labels, chunk_rows=7, **kwargs)
    theirs = ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1], **kwargs)
    grads = [torch.autograd.grad(x, logits)[0] for x in (ours, theirs)]
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_bf16_logits_are_computed_in_fp32_and_left_unchanged():
    logits, labels = _case(torch.bfloat16)
    before = logits.detach().clone()
    ours = causal_lm_loss(logits, labels, chunk_rows=4)
    (grad,) = torch.autograd.grad(ours, logits)
    reference = logits.detach().double().requires_grad_()
    theirs = ForCausalLMLoss(reference, labels, vocab_size=logits.shape[-1])
    (grad_ref,) = torch.autograd.grad(theirs, reference)
    assert ours.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert abs(ours.item() - theirs.item()) < 1e-5 * abs(theirs.item())
    assert ((grad.double() - grad_ref).norm() / grad_ref.norm()).item() < 1e-2
    assert torch.equal(logits.detach(), before)


def test_bad_label_shape_is_refused():
    logits, labels = _case(torch.float32)
    with pytest.raises(ValueError, match="labels must have the shape"):
        causal_lm_loss(logits, labels[:, :-1])
