"""Bad input and faults at the model level: each mistake is a clear error naming the problem, and a failed call
leaves the cache and the weights exactly as they were. (The scripts' cases: tests/test_bad_input_scripts.py.)"""

import math

import pytest
import torch

from modeling_fwp import FWPCache, FWPConfig, FWPForCausalLM, delta_rule, load_preset
from modeling_fwp.compat import output_cache

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 40


def tiny(**overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_heads=2, intermediate_size=32,
                  chunk_size=16, initializer_range=0.3)
    fields.update(overrides)
    torch.manual_seed(0)
    return FWPForCausalLM(FWPConfig(**fields)).double().eval()


def ids(batch, length, seed=0):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def snapshot(cache):
    """Everything a cache holds, by value."""
    return [(layer.seen_tokens, [None if t is None else t.clone() for t in
                                 (layer.fast_weights, layer.z, layer.conv_tail, layer.row_tokens)])
            for layer in cache.layers]


def assert_unchanged(cache, before):
    for (seen, tensors), (seen_now, tensors_now) in zip(before, snapshot(cache)):
        assert seen == seen_now
        for a, b in zip(tensors, tensors_now):
            assert (a is None and b is None) or torch.equal(a, b)


def filled_cache(model, batch=2, length=5):
    with torch.no_grad():
        return output_cache(model(ids(batch, length), use_cache=True))


# ------------------------------------------------------------------------------------------------- the loss
def test_all_ignored_labels_give_zero_loss_and_keep_the_weights_finite():
    """Completion-only loss with long prompts, packed SFT: a batch may have no target at all."""
    model = tiny().train()
    x = ids(2, 8)
    out = model(x, labels=torch.full_like(x, -100))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters() if p.grad is not None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the Trainer's count over an all-ignored accumulated batch (0 with targets: test_num_items_in_batch_of_zero_...)
    assert model(x, labels=torch.full_like(x, -100), num_items_in_batch=torch.tensor(0)).loss.item() == 0.0
    assert model(x, labels=torch.full_like(x, -100), num_items_in_batch=0).loss.item() == 0.0


@pytest.mark.parametrize("labels, named", [
    (lambda x: x.double(), "integer token ids"),
    (lambda x: x.masked_fill(x > 20, VOCAB), f"{VOCAB}"),
    (lambda x: x.masked_fill(x > 20, -5), "-5"),
])
def test_bad_labels_are_refused(labels, named):
    model = tiny()
    x = ids(2, 8)
    with pytest.raises(ValueError, match=named) as error:
        model(x, labels=labels(x))
    assert "labels" in str(error.value)


# ------------------------------------------------------------------------------------------------- input ids
@pytest.mark.parametrize("bad_id", [-1, VOCAB, VOCAB + 7])
def test_token_ids_outside_the_vocabulary_are_named_and_leave_the_cache(bad_id):
    model = tiny()
    cache = filled_cache(model)
    before = snapshot(cache)
    x = ids(2, 3)
    x[1, 1] = bad_id
    with pytest.raises(ValueError, match=rf"token id {bad_id}\b.*vocab_size={VOCAB}"):
        model(x, cache=cache)
    assert_unchanged(cache, before)


@pytest.mark.parametrize("make, named", [
    (lambda: torch.zeros(2, 0, dtype=torch.long), "empty"),
    (lambda: torch.zeros(0, 4, dtype=torch.long), "empty"),
    (lambda: torch.tensor([1, 2, 3]), r"2-D.*input_ids\[None\]"),
    (lambda: torch.ones(1, 2, 3, dtype=torch.long), "2-D"),
    (lambda: torch.ones(1, 3), "integer token ids"),
])
def test_malformed_input_ids_are_refused(make, named):
    with pytest.raises(ValueError, match=named):
        tiny()(make())


def test_inputs_embeds_of_the_wrong_width_are_refused():
    with pytest.raises(ValueError, match="hidden_size=16"):
        tiny()(inputs_embeds=torch.zeros(1, 3, 8, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------- attention mask
@pytest.mark.parametrize("shape", [(1, 6), (3, 6), (2, 5), (2, 7), (2, 6, 6)])
def test_a_mask_that_does_not_fit_the_input_is_refused(shape):
    model = tiny()
    with pytest.raises(ValueError, match=r"attention_mask must be .*\[2, 6\]"):
        model(ids(2, 6), attention_mask=torch.ones(shape, dtype=torch.long))


def test_a_longer_mask_needs_the_history_in_the_cache():
    """generate() passes the mask of the whole history once the cache holds it; beyond that it is a mistake."""
    model = tiny()
    cache = filled_cache(model, length=5)
    before = snapshot(cache)
    with pytest.raises(ValueError, match=r"up to \[2, 7\]"):
        model(ids(2, 2), attention_mask=torch.ones(2, 8, dtype=torch.long), cache=cache)
    assert_unchanged(cache, before)
    model(ids(2, 2), attention_mask=torch.ones(2, 7, dtype=torch.long), cache=cache)  # the whole history: fine


# ------------------------------------------------------------------------------------------------- foreign caches
@pytest.mark.parametrize("other, named", [
    (dict(num_hidden_layers=3), "3 layers.*num_hidden_layers=2"),
    (dict(num_hidden_layers=1), "1 layers.*num_hidden_layers=2"),
    (dict(use_short_conv=True), "holds the short-convolution tail"),
    (dict(attention_normalization=True), "holds the z accumulator"),
    (dict(num_heads=4, head_dim=4), "fast_weights in layer 0 has shape"),
    (dict(feature_map="dpfp"), "fast_weights in layer 0 has shape"),
])
def test_a_cache_from_another_model_is_refused(other, named):
    model = tiny()
    foreign = filled_cache(tiny(**other))
    before = snapshot(foreign)
    with pytest.raises(ValueError, match=named):
        model(ids(2, 2), cache=foreign)
    assert_unchanged(foreign, before)


@pytest.mark.parametrize("needs", [dict(use_short_conv=True), dict(attention_normalization=True)])
def test_a_cache_lacking_a_part_the_model_needs_is_refused(needs):
    model = tiny(**needs)
    with pytest.raises(ValueError, match="lacks"):
        model(ids(2, 2), cache=filled_cache(tiny()))


def test_a_cache_of_another_type_is_refused():
    with pytest.raises(TypeError, match="FWPCache"):
        tiny()(ids(1, 2), cache=(torch.zeros(1),))


def test_cache_and_past_key_values_together_are_refused():
    model = tiny()
    with pytest.raises(ValueError, match="not both"):
        model(ids(1, 2), cache=FWPCache(config=model.config), past_key_values=FWPCache(config=model.config))


# ------------------------------------------------------------------------------------------------- faults
def test_a_failed_segmented_forward_leaves_the_cache_as_it_was(monkeypatch):
    """A long no-grad forward runs in segments; one failing late must not leave the earlier ones committed."""
    model = tiny(inference_segment_size=4)
    cache = filled_cache(model, length=3)
    before = snapshot(cache)
    calls = {"n": 0}
    real_forward = model.model.layers[-1].forward

    def fail_in_the_third_segment(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model.model.layers[-1], "forward", fail_in_the_third_segment)
    with torch.no_grad(), pytest.raises(RuntimeError, match="out of memory"):
        model(ids(2, 11), cache=cache)
    assert calls["n"] == 3  # two segments had run (and written) before the failure
    assert_unchanged(cache, before)
    monkeypatch.undo()
    with torch.no_grad():  # and the retry gives what one uninterrupted run gives
        retried = model(ids(2, 11), cache=cache).logits
        reference = model(torch.cat([ids(2, 3), ids(2, 11)], dim=1), use_cache=False).logits[:, 3:]
    torch.testing.assert_close(retried, reference, rtol=1e-10, atol=1e-10)


def test_triton_backend_on_cpu_tensors_names_the_problem(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = k = v = torch.rand(1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"backend='triton' runs on CUDA tensors.*cpu"):
        delta_rule(q, k, v, torch.rand(1, 4, 2), backend="triton")
    model = tiny(kernel_backend="triton")
    with pytest.raises(ValueError, match="backend='triton'"):
        model(ids(1, 3))


# ------------------------------------------------------------------------------------------------- config values
@pytest.mark.parametrize("field", ["rope_theta", "layer_norm_eps", "qk_norm_eps", "initializer_range"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_config_values_are_refused(field, value):
    with pytest.raises(ValueError, match=rf"FWPConfig\.{field}=.*finite"):
        FWPConfig(**{field: value})


@pytest.mark.parametrize("field", ["pad_token_id", "bos_token_id", "eos_token_id"])
@pytest.mark.parametrize("value", [-1, 100, 2.0, [3, 100]])
def test_special_token_ids_must_index_the_vocabulary(field, value):
    with pytest.raises(ValueError, match=rf"FWPConfig\.{field}=.*vocab_size=100"):
        FWPConfig(vocab_size=100, **{field: value})
    FWPConfig(vocab_size=100, **{field: 99})  # the last id is fine


@pytest.mark.parametrize("typo, closest", [("hiden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                                           ("feature_maps", "feature_map")])
def test_unknown_config_keys_warn_with_the_closest_field(typo, closest):
    with pytest.warns(UserWarning, match=rf"unknown key '{typo}'.*did you mean '{closest}'"):
        FWPConfig(**{typo: 3})


def test_a_saved_config_loads_without_unknown_key_warnings(tmp_path, recwarn):
    model = tiny(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model.save_pretrained(tmp_path)
    FWPConfig.from_pretrained(tmp_path)
    FWPForCausalLM.from_pretrained(tmp_path)
    assert not [w for w in recwarn if "unknown key" in str(w.message)]


def test_load_preset_refuses_an_unknown_override():
    with pytest.raises(ValueError, match=r"unknown FWPConfig field\(s\) \['hiden_size'\]"):
        load_preset("tiny", hiden_size=64)
    assert load_preset("tiny", hidden_size=64).hidden_size == 64


def test_the_mask_check_keeps_generate_working_on_padded_batches():
    """The refusals above must not catch what generate() itself passes (the history mask at every step)."""
    model = tiny(pad_token_id=0)
    x = ids(2, 6)
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    x[1, :2] = 0
    with torch.no_grad():
        out = model.generate(x, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                             prefill_chunk_size=3)
    assert out.shape == (2, 10)


# ------------------------------------------------------------------------------------------------- issue 26: silent wrong results
@pytest.mark.parametrize("pad_value", [-math.inf, torch.finfo(torch.float32).min, -1e4])
def test_an_additive_float_mask_is_refused(pad_value):
    """Some code builds masks for softmax attention: 0 where a token may be attended, -inf (or a large negative
    number) at the pads. Read as a 0/1 mask its pads would become tokens and its tokens pads."""
    model = tiny()
    cache = filled_cache(model)
    before = snapshot(cache)
    additive = torch.zeros(2, 3)
    additive[1, 0] = pad_value
    with pytest.raises(ValueError, match=r"attention_mask .*0/1.*additive") as error:
        model(ids(2, 3), attention_mask=additive, cache=cache)
    assert "(attention_mask == 0)" in str(error.value)  # how to convert it
    assert_unchanged(cache, before)


def test_an_all_zero_float_mask_is_refused():
    """An additive mask without padding is all zeros: as a 0/1 mask it would say that every token is a pad."""
    model = tiny()
    with pytest.raises(ValueError, match=r"attention_mask .*all 0"):
        model(ids(2, 3), attention_mask=torch.zeros(2, 3))


def test_float_and_integer_0_1_masks_still_work():
    model = tiny()
    mask = torch.ones(2, 4, dtype=torch.long)
    mask[0, 0] = 0
    expected = model(ids(2, 4), attention_mask=mask).logits
    for same in (mask.float(), mask.double(), mask.bool()):
        torch.testing.assert_close(model(ids(2, 4), attention_mask=same).logits, expected, rtol=0, atol=0)


def test_num_items_in_batch_of_zero_with_targets_is_refused():
    """The Trainer's num_items_in_batch counts the targets of the whole accumulated batch: 0 while this batch has
    targets is a caller's mistake, which used to return the undivided sum (what the docstring promised was 0)."""
    model = tiny().train()
    x = ids(2, 8)
    for zero in (0, torch.tensor(0)):
        with pytest.raises(ValueError, match=r"num_items_in_batch=0 .*14 targets"):
            model(x, labels=x, num_items_in_batch=zero)
    with pytest.raises(ValueError, match=r"num_items_in_batch=-3 .*>= 0"):
        model(x, labels=x, num_items_in_batch=-3)
    assert model(x, labels=x, num_items_in_batch=14).loss.item() == pytest.approx(model(x, labels=x).loss.item())


@pytest.mark.parametrize("typo, meant", [("atention_mask", "attention_mask"), ("position_id", "position_ids"),
                                         ("label", "labels"), ("past_key_value", "past_key_values")])
def test_a_misspelled_keyword_is_refused(typo, meant):
    """**kwargs would swallow it and the model would run without it (unmasked, unlabelled, without the cache)."""
    model = tiny()
    cache = filled_cache(model)
    before = snapshot(cache)
    with pytest.raises(TypeError, match=rf"unexpected keyword argument '{typo}'.*did you mean '{meant}'"):
        model(ids(2, 3), cache=cache, **{typo: torch.ones(2, 3, dtype=torch.long)})
    assert_unchanged(cache, before)
    with pytest.raises(TypeError, match=r"FWPModel.forward\(\) got an unexpected keyword argument 'atention_mask'"):
        model.model(ids(2, 3), atention_mask=torch.ones(2, 3, dtype=torch.long))


def test_keywords_that_transformers_passes_are_accepted():
    """generate(), the Trainer and DataCollatorWithFlattening pass these whatever the model: they must keep working."""
    model = tiny()
    x = ids(1, 6)
    expected = model(x).logits
    passed = dict(return_dict=True, output_attentions=False, output_hidden_states=False, use_cache=True,
                  cache_position=torch.arange(6), position_ids=torch.arange(6)[None], logits_to_keep=0,
                  num_items_in_batch=None, cu_seq_lens_k=None, max_length_q=6, max_length_k=6, is_causal=True,
                  seq_idx=None, output_router_logits=False)
    torch.testing.assert_close(model(x, **passed).logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(model.model(x, return_dict=True, output_attentions=False, cache_position=torch.arange(6),
                                           max_length_q=6).last_hidden_state,
                               model.model(x).last_hidden_state, rtol=0, atol=0)


def _corrupt_tensor(weights_file, name):
    """Overwrites the first values of tensor `name` in a safetensors file with 0xFF bytes (a NaN in float32/64)."""
    import json
    import struct

    with open(weights_file, "r+b") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
        start, end = header[name]["data_offsets"]
        handle.seek(8 + header_size + start)
        handle.write(b"\xff" * min(16, end - start))


def test_a_weights_file_with_non_finite_values_warns_at_load_naming_the_tensor(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    _corrupt_tensor(tmp_path / "model.safetensors", "model.layers.1.mlp.up_proj.weight")
    with pytest.warns(UserWarning, match=r"non-finite .*model\.layers\.1\.mlp\.up_proj\.weight"):
        loaded = FWPForCausalLM.from_pretrained(tmp_path)
    assert not torch.isfinite(loaded.model.layers[1].mlp.up_proj.weight).all()
    assert isinstance(loaded, FWPForCausalLM)  # a warning, not a refusal: the file may be inspected


def test_a_clean_weights_file_loads_without_the_warning(tmp_path, recwarn):
    tiny().save_pretrained(tmp_path)
    FWPForCausalLM.from_pretrained(tmp_path)
    assert not [w for w in recwarn if "non-finite" in str(w.message)]
