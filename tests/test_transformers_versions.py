"""What changed between the transformers releases the project supports (5.17 to the newest): the cache's name
(`past_key_values` -> `cache` in 5.24), the output conventions transformers' own models follow, and the names of
the activation-checkpointing API (tests/test_model.py::test_gradient_checkpointing_gives_the_same_gradients goes
through `compat.enable_activation_checkpointing`). These run on both ends of the range (scripts/run_tests.sh)."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from modeling_fwp import FWPCache, FWPConfig, FWPForCausalLM, FWPModel
from modeling_fwp.compat import CACHE_NAME, TRANSFORMERS_VERSION, output_cache

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 50


def tiny(cls=FWPForCausalLM, **overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_heads=2, intermediate_size=32,
                  initializer_range=0.3, pad_token_id=0)
    fields.update(overrides)
    torch.manual_seed(0)
    return cls(FWPConfig(**fields)).double().eval()


def ids(batch, length, seed=0):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_the_cache_name_follows_the_installed_release():
    assert CACHE_NAME == ("cache" if TRANSFORMERS_VERSION >= (5, 24) else "past_key_values")
    out = tiny()(ids(1, 4), use_cache=True)
    assert isinstance(getattr(out, CACHE_NAME), FWPCache) and output_cache(out) is getattr(out, CACHE_NAME)
    assert CACHE_NAME in out.keys()


@pytest.mark.parametrize("cls", [FWPForCausalLM, FWPModel])
@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_forward_continues_from_a_cache_given_under_either_name(cls, name):
    model = tiny(cls)
    x = ids(2, 9)
    whole = model(x).last_hidden_state if cls is FWPModel else model(x).logits
    first = model(x[:, :5], use_cache=True)
    rest = model(x[:, 5:], **{name: output_cache(first)})
    rest = rest.last_hidden_state if cls is FWPModel else rest.logits
    torch.testing.assert_close(rest, whole[:, 5:], rtol=1e-10, atol=1e-10)


def test_generate_hands_the_state_over_step_by_step():
    """The 5.24 break: generate() passed `cache`, forward read only `past_key_values`, every step started empty."""
    model = tiny()
    x = ids(2, 6)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                             output_logits=True)
        full = model(out.sequences[:, :-1], use_cache=False).logits[:, -5:]
    torch.testing.assert_close(torch.stack(out.logits, 1), full.float(), rtol=1e-5, atol=1e-5)
    assert output_cache(out).get_seq_length() == 6 + 5 - 1


def test_generate_takes_a_user_cache_under_the_current_name():
    model = tiny()
    x = ids(1, 6)
    with torch.no_grad():
        first = model.generate(x, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        history = torch.cat([first.sequences, ids(1, 2, seed=3)], dim=1)
        second = model.generate(history, max_new_tokens=3, do_sample=False, pad_token_id=0,
                                return_dict_in_generate=True, output_logits=True, cache=output_cache(first))
        full = model(second.sequences[:, :-1], use_cache=False).logits[:, -3:]
    torch.testing.assert_close(torch.stack(second.logits, 1), full.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["offloaded", "quantized", "sliding_window"])
def test_cache_implementations_other_than_the_default_are_refused(implementation):
    with pytest.raises(ValueError, match=rf"cache_implementation='{implementation}' is not supported"):
        tiny().generate(ids(1, 4), max_new_tokens=2, cache_implementation=implementation, pad_token_id=0)


def test_return_dict_false_returns_a_tuple():
    model = tiny()
    x = ids(2, 5)
    out = model(x, labels=x, return_dict=False)
    assert isinstance(out, tuple)
    reference = model(x, labels=x)
    torch.testing.assert_close(out[0], reference.loss)
    torch.testing.assert_close(out[1], reference.logits)
    base = tiny(FWPModel)(x, return_dict=False, use_cache=False)
    assert isinstance(base, tuple) and base[0].shape == (2, 5, 16)


def test_shift_labels_are_the_targets():
    """Sequence / context parallelism passes targets already shifted (a shard's last target is on the next shard)."""
    model = tiny()
    x = ids(2, 7)
    shifted = torch.full_like(x, -100)
    shifted[:, :-1] = x[:, 1:]
    torch.testing.assert_close(model(x, shift_labels=shifted).loss, model(x, labels=x).loss)
    other = ids(2, 7, seed=5)  # labels are ignored when shift_labels are given
    torch.testing.assert_close(model(x, labels=other, shift_labels=shifted).loss, model(x, labels=x).loss)


def test_hidden_states_under_padding_are_part_of_the_graph():
    model = tiny(block_style="pre_norm")
    x = ids(2, 6)
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    out = model(x, attention_mask=mask, output_hidden_states=True)
    for hidden in out.hidden_states:
        hidden.retain_grad()
    out.logits.sum().backward()
    assert len(out.hidden_states) == 3
    assert all(h.grad is not None for h in out.hidden_states)
    # the pads' positions get no gradient: they never reach the layers
    assert torch.equal(out.hidden_states[0].grad[1, :2], torch.zeros_like(out.hidden_states[0].grad[1, :2]))


def test_trainer_predictions_leave_the_state_out(tmp_path):
    """keys_to_ignore_at_inference names the state under both names, so predictions are logits only."""
    import datasets

    model = tiny()
    rows = ids(4, 6)
    dataset = datasets.Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to="none", use_cpu=True,
                             dataloader_pin_memory=False)
    prediction = Trainer(model=model, args=args).predict(dataset)
    logits = prediction.predictions
    assert not isinstance(logits, tuple) and logits.shape == (4, 6, VOCAB)
    assert prediction.metrics["test_loss"] == pytest.approx(model(rows, labels=rows).loss.item(), rel=1e-5)
