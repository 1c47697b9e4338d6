"""FWPModel / FWPForCausalLM: every variant through the Auto classes, exact padding and packing, loss conventions,
backends against the recurrent reference, checkpointing, state carry-over, save/load."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import modeling_fwp.modeling_fwp as modeling
from modeling_fwp import FWPCache, FWPConfig, FWPForCausalLM, FWPModel
from modeling_fwp.compat import enable_activation_checkpointing, output_cache

VOCAB = 61
VARIANTS = {
    "delta_net": {},
    "linear_transformer": dict(update_rule="sum", qk_norm="none", attention_normalization=True),
    "delta_attn_norm": dict(attention_normalization=True),
    "dpfp2_delta": dict(feature_map="dpfp", dpfp_nu=2),
    "dpfp_sum": dict(update_rule="sum", feature_map="dpfp", qk_norm="none", attention_normalization=True),
    "favor_delta": dict(feature_map="favor", favor_features=6),
    "favor_sum": dict(update_rule="sum", feature_map="favor", favor_features=6, attention_normalization=True, qk_norm="none"),
    "modern": dict(block_style="pre_norm", feature_map="silu", qk_norm="l2", use_short_conv=True, position_embedding="rotary"),
    "relu_sinusoidal_nobeta": dict(feature_map="relu", position_embedding="sinusoidal", use_beta=False),
    "identity_tied": dict(feature_map="identity", qk_norm="l2", tie_word_embeddings=True),
}


def tiny_config(**fields):
    base = dict(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, num_heads=2, intermediate_size=32, pad_token_id=0)
    base.update(fields)
    return FWPConfig(**base)


def tiny_model(seed=0, **fields):
    torch.manual_seed(seed)
    return FWPForCausalLM(tiny_config(**fields)).double().eval()


def ids(batch, length, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_through_auto_classes_trains(name):
    config = tiny_config(**VARIANTS[name])
    fields = {k: v for k, v in config.to_diff_dict().items() if k not in ("model_type", "transformers_version")}
    config = AutoConfig.for_model("fwp", **fields)
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, FWPForCausalLM)
    assert isinstance(AutoModel.from_config(config), FWPModel)
    x = ids(2, 9)
    out = model(x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert out.logits.shape == (2, 9, VOCAB)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("name", ["delta_net", "linear_transformer", "delta_attn_norm", "modern", "dpfp2_delta"])
def test_chunk_backend_equals_recurrent_reference(name):
    model = tiny_model(**VARIANTS[name], chunk_size=16)
    x = ids(2, 40)
    results = {}
    for backend in ("recurrent", "chunk"):
        model.zero_grad()
        model.config.kernel_backend = backend  # a live switch applies to the next call
        out = model(x, labels=x)
        out.loss.backward()
        results[backend] = (out.logits.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(results["chunk"][0], results["recurrent"][0], rtol=1e-9, atol=1e-10)
    for a, b in zip(results["chunk"][1], results["recurrent"][1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_kernel_backend_switch_reaches_the_op(monkeypatch):
    seen = []
    real = modeling.delta_rule

    def spy(*args, **kwargs):
        seen.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling, "delta_rule", spy)
    model = tiny_model()
    model(ids(1, 5))
    model.config.kernel_backend = "recurrent"
    model(ids(1, 5))
    assert seen == ["auto", "auto", "recurrent", "recurrent"]


@pytest.mark.parametrize("name", ["delta_net", "linear_transformer", "delta_attn_norm", "modern", "relu_sinusoidal_nobeta"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_reaches_the_state(name, side):
    model = tiny_model(**VARIANTS[name])
    lengths = [9, 5, 1]
    rows = [ids(1, n, seed=10 + n)[0] for n in lengths]
    width = max(lengths)
    batch = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        batch[i, span], mask[i, span] = row, 1
    logits = model(batch, attention_mask=mask).logits
    for i, row in enumerate(rows):
        alone = model(row[None]).logits[0]
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        torch.testing.assert_close(logits[i, span], alone, rtol=1e-10, atol=1e-12)
        assert torch.all(model(batch, attention_mask=mask, output_hidden_states=True).hidden_states[-1][i][mask[i] == 0] == 0)


@pytest.mark.parametrize("name", ["delta_net", "modern", "delta_attn_norm"])
@pytest.mark.parametrize("how", ["cu_seq_lens_q", "position_ids"])
def test_packed_documents_equal_separate_forwards(name, how):
    model = tiny_model(**VARIANTS[name])
    docs = [ids(1, n, seed=n)[0] for n in (7, 3, 12)]
    packed = torch.cat(docs)[None]
    if how == "cu_seq_lens_q":
        cu = torch.tensor([0, 7, 10, 22], dtype=torch.int32)
        out = model(packed, cu_seq_lens_q=cu)
    else:
        position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
        out = model(packed, position_ids=position_ids)
    start = 0
    for doc in docs:
        torch.testing.assert_close(out.logits[0, start:start + len(doc)], model(doc[None]).logits[0], rtol=1e-10, atol=1e-12)
        start += len(doc)


def test_packed_loss_equals_per_document_losses():
    model = tiny_model()
    docs = [ids(1, n, seed=n)[0] for n in (6, 9)]
    packed = torch.cat(docs)[None]
    labels = packed.clone()
    labels[0, len(docs[0])] = -100  # what DataCollatorWithFlattening does at a document start
    cu = torch.tensor([0, 6, 15], dtype=torch.int32)
    packed_loss = model(packed, labels=labels, cu_seq_lens_q=cu).loss
    per_doc = [model(d[None], labels=d[None], num_items_in_batch=13).loss for d in docs]
    torch.testing.assert_close(packed_loss, sum(per_doc), rtol=1e-10, atol=1e-12)


def test_loss_shifts_labels_and_ignores_minus_100():
    model = tiny_model()
    x = ids(2, 8)
    labels = x.clone()
    labels[:, :3] = -100
    out = model(x, labels=labels)
    log_probs = out.logits[:, :-1].log_softmax(-1)
    targets = labels[:, 1:]
    keep = targets != -100
    expected = -log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0][keep].mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=1e-6)  # transformers' loss runs in fp32


def test_num_items_in_batch_makes_gradient_accumulation_exact():
    model = tiny_model()
    x = ids(4, 10)
    labels = x.clone()
    labels[0, 2:] = -100  # uneven token counts between the two micro-batches
    model(x, labels=labels).loss.backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total = int((labels[:, 1:] != -100).sum())
    for part in (slice(0, 2), slice(2, 4)):
        model(x[part], labels=labels[part], num_items_in_batch=total).loss.backward()
    for a, p in zip(full, model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-9, atol=1e-12)


def test_logits_to_keep():
    model = tiny_model()
    x = ids(2, 8)
    full = model(x).logits
    torch.testing.assert_close(model(x, logits_to_keep=1).logits, full[:, -1:])
    torch.testing.assert_close(model(x, logits_to_keep=3).logits, full[:, -3:])


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model(**VARIANTS["modern"])
    model.train()
    x = ids(2, 12)
    model(x, labels=x).loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    enable_activation_checkpointing(model)
    assert all(block.gradient_checkpointing for block in model.model.layers)
    model(x, labels=x).loss.backward()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, a)


@pytest.mark.parametrize("name", ["delta_net", "linear_transformer", "modern", "delta_attn_norm"])
def test_carried_segments_equal_one_long_forward(name):
    model = tiny_model(**VARIANTS[name])
    x = ids(2, 30)
    whole = model(x).logits
    first = model(x[:, :13], use_cache=True)
    carried = output_cache(first).detach()
    assert all(t.grad_fn is None for layer in carried.layers for t in layer.tensors())
    second = model(x[:, 13:], cache=carried)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("positions", ["rotary", "sinusoidal"])
@pytest.mark.parametrize("how", ["cu_seq_lens_q", "position_ids"])
def test_packed_batch_continues_each_document_from_its_cache_row(positions, how):
    """A packed batch (one row, documents marked by cu_seqlens or by position_ids that restart) continuing from a
    cache of as many rows: document i continues row i, its positions counting on from row i's tokens (5, 2 and 8
    here, so a position taken from another row or restarted at 0 would show). Each document must get exactly what
    it gets run alone from its row's state, and leave that row's state as it would."""
    model = tiny_model(position_embedding=positions, use_short_conv=True)
    prompts = [ids(1, n, seed=20 + n)[0] for n in (5, 2, 8)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, prompt in enumerate(prompts):  # left padding, as generate() pads a batch of prompts
        batch[i, width - len(prompt):], mask[i, width - len(prompt):] = prompt, 1
    with torch.no_grad():
        cache = output_cache(model(batch, attention_mask=mask, use_cache=True))
        assert cache.row_tokens(0).tolist() == [5, 2, 8]
        docs = [ids(1, n, seed=40 + n)[0] for n in (4, 3, 6)]
        packed = torch.cat(docs)[None]
        if how == "cu_seq_lens_q":
            out = model(packed, cu_seq_lens_q=torch.tensor([0, 4, 7, 13], dtype=torch.int32), cache=cache)
        else:
            out = model(packed, position_ids=torch.cat([torch.arange(len(d)) for d in docs])[None], cache=cache)
        start = 0
        for i, (prompt, doc) in enumerate(zip(prompts, docs)):
            alone_cache = output_cache(model(prompt[None], use_cache=True))
            alone = model(doc[None], cache=alone_cache).logits[0]
            torch.testing.assert_close(out.logits[0, start:start + len(doc)], alone, rtol=1e-10, atol=1e-12)
            for layer, alone_layer in zip(cache.layers, alone_cache.layers):
                torch.testing.assert_close(layer.fast_weights[i], alone_layer.fast_weights[0], rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(layer.conv_tail[i], alone_layer.conv_tail[0], rtol=1e-10, atol=1e-12)
                assert int(layer.row_tokens[i]) == len(prompt) + len(doc)
            start += len(doc)


def test_carried_state_is_detached_in_training():
    model = tiny_model()
    model.train()
    x = ids(2, 16)
    out = model(x[:, :8], labels=x[:, :8], use_cache=True)
    out.loss.backward()
    out2 = model(x[:, 8:], labels=x[:, 8:], cache=output_cache(out).detach())
    out2.loss.backward()  # would fail ("backward through the graph a second time") if the state were not cut


def test_state_is_fp32_for_half_models():
    model = FWPForCausalLM(tiny_config()).to(torch.bfloat16)
    cache = output_cache(model(ids(1, 6), use_cache=True))
    assert all(layer.fast_weights.dtype == torch.float32 for layer in cache.layers)


def test_init_follows_initializer_range():
    for std in (0.02, 0.2):
        torch.manual_seed(0)
        model = FWPForCausalLM(tiny_config(hidden_size=64, initializer_range=std, intermediate_size=256))
        weight = model.model.layers[0].mlp.up_proj.weight
        assert abs(weight.std().item() - std) < 0.1 * std
        assert torch.all(model.model.layers[0].mlp.up_proj.bias == 0)


def test_output_hidden_states_shapes():
    model = tiny_model(num_hidden_layers=3)
    out = model(ids(2, 5), output_hidden_states=True)
    assert len(out.hidden_states) == 4
    assert all(h.shape == (2, 5, 24) for h in out.hidden_states)


def test_favor_redraws_in_training_only_and_is_saved(tmp_path):
    model = tiny_model(**VARIANTS["favor_delta"])
    feature_map = model.model.layers[0].attn.feature_map
    before = feature_map.projection.clone()
    model.eval()
    model(ids(1, 5))
    assert torch.equal(feature_map.projection, before)
    model.train()
    model(ids(1, 5))
    assert not torch.equal(feature_map.projection, before)
    model.eval()
    model.save_pretrained(tmp_path)
    reloaded = FWPForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    torch.testing.assert_close(reloaded(ids(1, 7)).logits, model(ids(1, 7)).logits)


@pytest.mark.parametrize("name", ["delta_net", "modern", "favor_sum", "dpfp2_delta"])
def test_save_and_load_round_trip(tmp_path, name):
    model = tiny_model(**VARIANTS[name])
    model.save_pretrained(tmp_path)
    saved = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_fwp.py", "modeling_fwp.py", "ops.py"} <= saved
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.auto_map["AutoModelForCausalLM"] == "modeling_fwp.FWPForCausalLM"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    x = ids(2, 9)
    torch.testing.assert_close(reloaded(x).logits, model(x).logits)


def test_bad_inputs_are_refused_with_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids(2, 6), cu_seq_lens_q=torch.tensor([0, 3, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids(1, 6), cu_seq_lens_q=torch.tensor([0, 3, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids(1, 6), attention_mask=torch.ones(1, 1, 6, 6))
    cache = output_cache(model(ids(2, 4), use_cache=True))
    with pytest.raises(ValueError, match="past_key_values"):
        model(ids(3, 2), cache=cache)
    with pytest.raises(TypeError, match="FWPCache"):
        model(ids(1, 2), cache=(torch.zeros(1),))
    assert isinstance(cache, FWPCache)


def test_a_failed_forward_leaves_the_cache_untouched(monkeypatch):
    model = tiny_model()
    cache = output_cache(model(ids(1, 5), use_cache=True))
    before = [layer.fast_weights.clone() for layer in cache.layers]
    last_block = model.model.layers[-1]
    monkeypatch.setattr(last_block, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError):
        model(ids(1, 3), cache=cache)
    assert cache.get_seq_length() == 5
    assert all(torch.equal(a, layer.fast_weights) for a, layer in zip(before, cache.layers))


@pytest.mark.parametrize("name", ["delta_net", "modern", "delta_attn_norm"])
def test_segmented_inference_forward_equals_one_forward(name):
    model = tiny_model(**VARIANTS[name], inference_segment_size=4)
    x = ids(2, 23)
    mask = torch.ones_like(x)
    mask[0, :5] = 0  # left padding spanning a segment boundary
    whole = model(x, attention_mask=mask, use_cache=True)  # with gradients: one pass
    with torch.no_grad():
        segmented = model(x, attention_mask=mask, use_cache=True, output_hidden_states=True)
    torch.testing.assert_close(segmented.logits, whole.logits, rtol=1e-10, atol=1e-12)
    assert output_cache(segmented).get_seq_length() == 23
    for a, b in zip(output_cache(segmented).layers, output_cache(whole).layers):
        torch.testing.assert_close(a.fast_weights, b.fast_weights.detach())
    assert len(segmented.hidden_states) == 3 and segmented.hidden_states[0].shape == (2, 23, 24)


def test_segmented_prefill_embeds_and_keeps_one_segment_at_a_time():
    """generate()'s prefill asks for the last position only: no tensor of the prompt's length is made."""
    model = tiny_model(**VARIANTS["modern"], inference_segment_size=4)
    x = ids(2, 23)
    whole = model(x)  # with gradients: one pass
    embedded = []
    model.model.embed_tokens.register_forward_hook(lambda module, args, out: embedded.append(tuple(out.shape)))
    with torch.no_grad():
        out = model(x, logits_to_keep=1, use_cache=True)
        base = model.model(x, keep_last_hidden=3)
    assert out.logits.shape == (2, 1, model.config.vocab_size) and base.last_hidden_state.shape == (2, 3, 24)
    assert all(shape[1] <= 4 for shape in embedded)
    torch.testing.assert_close(out.logits, whole.logits[:, -1:], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.lm_head(base.last_hidden_state), whole.logits[:, -3:], rtol=1e-10, atol=1e-12)


def test_cache_holds_no_view_of_a_larger_buffer():
    model = tiny_model(**VARIANTS["modern"])
    cache = output_cache(model(ids(2, 50), use_cache=True))
    for layer in cache.layers:
        for t in layer.tensors():
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_generate_prefill_is_segmented_even_in_train_mode(monkeypatch):
    model = tiny_model(inference_segment_size=8)
    model.train()  # a model made with from_config starts in train mode; generate() must still bound its memory
    calls = []
    real = model.model._forward_in_segments
    monkeypatch.setattr(model.model, "_forward_in_segments", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = model.generate(ids(1, 30), max_new_tokens=2, do_sample=False)
    assert calls and out.shape == (1, 32)


def test_bf16_autocast_training_step_matches_fp32_closely():
    # Trainer's --bf16 runs the forward under autocast; the ops keep their own fp32 precision inside it.
    model = FWPForCausalLM(tiny_config(**VARIANTS["modern"]))
    x = ids(2, 70)
    reference = model(x, labels=x).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x, use_cache=True)
    out.loss.backward()
    assert output_cache(out).layers[0].fast_weights.dtype == torch.float32
    assert abs(out.loss.item() - reference.item()) < 0.05
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
