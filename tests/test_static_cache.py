"""Captured decode: `cache_implementation="static"` gives an FWPStaticCache whose decode steps torch.compile
captures whole (fullgraph=True: no graph break, no host sync). On CPU the steps compile with the aot_eager backend
(and once with inductor); every generate() here is compared step by step (logits) with full forwards in float64.
On CUDA, CUDA graphs replay the same step (scripts/bench/bench_generate.py measures it)."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import CompileConfig

from modeling_fwp import FWPConfig, FWPForCausalLM
from modeling_fwp.cache_fwp import FWPStaticCache
from modeling_fwp.compat import output_cache
from test_generation import PAD, VARIANTS, assert_steps_equal_full_forward, left_pad, make_model, random_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def captured(backend="aot_eager"):
    """A CompileConfig that generate() honours on CPU too, and a counter of the graphs compiled with it."""
    counter = CompileCounterWithBackend(backend)
    config = CompileConfig(fullgraph=True, backend=counter, mode=None)
    config._compile_all_devices = True  # generate() compiles only on accelerators unless told otherwise
    return config, counter


def static_generate(model, ids, new_tokens, compile_config, **kwargs):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD,
                              cache_implementation="static", compile_config=compile_config,
                              return_dict_in_generate=True, output_logits=True, **kwargs)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", VARIANTS)
def test_captured_greedy_generate_equals_full_forwards(variant):
    model = make_model(variant)
    prompts = [random_ids(1, 9, seed=2)[0], random_ids(1, 4, seed=3)[0]]
    ids, mask = left_pad(prompts)
    config, counter = captured()
    out = static_generate(model, ids, 7, config, attention_mask=mask)
    assert isinstance(output_cache(out), FWPStaticCache)
    assert counter.frame_count == 1  # one graph for every decode step (fullgraph: a break would raise)
    assert_steps_equal_full_forward(model, out, prompts)


MORE_VARIANTS = {  # beyond test_generation's: fla's DeltaNet options (gate, beta in (0, 2)) and FAVOR+
    "gated_neg_eigval": ("conv_rotary_prenorm", dict(use_gate=True, allow_neg_eigval=True, feature_map="identity",
                                                     qk_norm="l2")),
    "favor": ("delta_net", dict(feature_map="favor")),
}


@pytest.mark.parametrize("variant", MORE_VARIANTS)
def test_captured_generate_of_more_variants(variant):
    base, overrides = MORE_VARIANTS[variant]
    model = make_model(base, **overrides)
    prompts = [random_ids(1, 8, seed=4)[0], random_ids(1, 5, seed=5)[0]]
    ids, mask = left_pad(prompts)
    config, counter = captured()
    out = static_generate(model, ids, 6, config, attention_mask=mask)
    assert counter.frame_count == 1
    assert_steps_equal_full_forward(model, out, prompts)


def test_each_batch_size_gets_a_static_graph():
    """transformers' CompileConfig leaves `dynamic` unset, so dynamo would recompile the step with a symbolic batch
    size at the second size seen (and inductor tune that graph from scratch); a cache has one size, so each gets
    its own static graph."""
    model = make_model("delta_net")
    config, counter = captured()
    config.dynamic = None
    for rows in (1, 3):
        static_generate(model, random_ids(rows, 5), 3, config)
    assert counter.frame_count == 2
    placeholders = [node.meta.get("example_value") for graph in counter.graphs for node in graph.graph.nodes
                    if node.op == "placeholder"]
    assert not any(isinstance(value, torch.SymInt) for value in placeholders)


def test_joint_projection_weights_follow_a_weight_change():
    """The captured step multiplies with a concatenated copy of the projection weights: a training step between
    two generate() calls must reach it (the copy is rebuilt when a parameter's version counter moves)."""
    model = make_model("conv_rotary_prenorm", use_gate=True)
    config, _ = captured()
    prompts = [random_ids(1, 6, seed=7)[0]]
    static_generate(model, prompts[0][None], 3, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(prompts[0][None], labels=prompts[0][None]).loss.backward()
    optimizer.step()
    model.eval()
    out = static_generate(model, prompts[0][None], 4, config)
    assert_steps_equal_full_forward(model, out, prompts)


def test_a_hooked_projection_is_not_folded_into_the_joint_weight():
    """A projection something wraps (a PEFT adapter, a forward hook) keeps running itself in the captured step."""
    model = make_model("conv_rotary_prenorm")
    model.model.layers[0].attn.k_proj.register_forward_hook(lambda module, args, out: 1.5 * out)
    model.model.layers[1].mlp.up_proj.register_forward_hook(lambda module, args, out: out - 0.2)
    config, _ = captured()
    prompts = [random_ids(1, 6, seed=8)[0]]
    out = static_generate(model, prompts[0][None], 4, config)
    assert_steps_equal_full_forward(model, out, prompts)
    joint = model._joint_decode_weights()
    assert joint[0][0] is None and joint[0][1] is not None and joint[1][0] is not None and joint[1][1] is None


def test_a_change_between_two_generates_is_caught_by_the_first_steps_guards():
    """Later steps of a generate() skip dynamo's guards (nothing they check can change inside one generate()); the
    first step of each generate() checks them all, so a model changed in between is recompiled, not replayed
    stale. Here a hook that rescales the logits is added after the first generate(): the step's graph must
    change (a stale one would give the unhooked logits, which the full forwards would not)."""
    model = make_model("conv_rotary_prenorm")
    config, counter = captured()
    prompts = [random_ids(1, 6, seed=9)[0]]
    static_generate(model, prompts[0][None], 4, config)
    assert counter.frame_count == 1
    model.lm_head.register_forward_hook(lambda module, args, out: 3.0 * out - 1.0)
    out = static_generate(model, prompts[0][None], 4, config)
    assert counter.frame_count == 2
    assert_steps_equal_full_forward(model, out, prompts)


def test_later_steps_of_a_generate_skip_the_guards(monkeypatch):
    """Each later step runs under the stance that skips guard evaluation, the first one under the default."""
    import modeling_fwp.generation_fwp as generation

    if not generation._SKIP_GUARDS_SUPPORTED:
        pytest.skip("this torch has no skip_guard_eval_unsafe")
    stances = []
    original = generation._guards_checked_once
    monkeypatch.setattr(generation, "_guards_checked_once", lambda first: stances.append(first) or original(first))
    model = make_model("delta_net")
    config, _ = captured()
    static_generate(model, random_ids(1, 5, seed=10), 5, config)
    assert stances == [True, False, False, False]  # 5 new tokens: the prefill makes the first, 4 captured steps


def test_captured_steps_update_the_same_buffers_and_a_second_generate_reuses_the_graph():
    model = make_model("conv_rotary_prenorm", attention_normalization=True)
    config, counter = captured()
    first = static_generate(model, random_ids(2, 6), 4, config)
    cache = output_cache(first)
    addresses = [t.data_ptr() for layer in cache.layers for t in layer.tensors()]
    second = static_generate(model, random_ids(2, 8, seed=5), 5, config)
    assert output_cache(second) is cache  # reset and reused, as transformers reuses its StaticCache
    assert [t.data_ptr() for layer in cache.layers for t in layer.tensors()] == addresses
    assert counter.frame_count == 1
    assert_steps_equal_full_forward(model, second, random_ids(2, 8, seed=5))


@pytest.mark.parametrize("variant", ["delta_net", "conv_rotary_prenorm"])
def test_captured_continuation_of_a_previous_generate(variant):
    """Multi-turn: the whole history back in with the previous (static) cache; prefill of the new turn is eager,
    the decode steps are captured."""
    model = make_model(variant)
    config, counter = captured()
    first = static_generate(model, random_ids(1, 8), 5, config)
    history = torch.cat([first.sequences, random_ids(1, 4, seed=4)], dim=1)
    with torch.no_grad():
        second = model.generate(history, max_new_tokens=6, do_sample=False, pad_token_id=PAD, compile_config=config,
                                cache=output_cache(first), return_dict_in_generate=True, output_logits=True)
    assert output_cache(second) is output_cache(first)
    assert_steps_equal_full_forward(model, second, history)
    assert counter.frame_count == 1


def test_captured_sampling_with_several_return_sequences():
    model = make_model("delta_net")
    ids = random_ids(2, 6, seed=7)
    config, _ = captured()
    torch.manual_seed(11)
    with torch.no_grad():
        eager = model.generate(ids, do_sample=True, max_new_tokens=6, num_return_sequences=3, pad_token_id=PAD)
    torch.manual_seed(11)
    with torch.no_grad():
        static = model.generate(ids, do_sample=True, max_new_tokens=6, num_return_sequences=3, pad_token_id=PAD,
                                cache_implementation="static", compile_config=config, return_dict_in_generate=True,
                                output_logits=True)
    assert output_cache(static).batch_size == 6
    assert torch.equal(static.sequences, eager)
    assert_steps_equal_full_forward(model, static, ids.repeat_interleave(3, dim=0))


def test_beam_search_with_a_static_cache_reorders_the_buffers_in_place():
    model = make_model("conv_rotary_prenorm")
    ids = random_ids(1, 5, seed=50)
    config, counter = captured()
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=5, num_beams=3, num_return_sequences=3, do_sample=False,
                               length_penalty=0.0, pad_token_id=PAD)
        static = model.generate(ids, max_new_tokens=5, num_beams=3, num_return_sequences=3, do_sample=False,
                                length_penalty=0.0, pad_token_id=PAD, cache_implementation="static",
                                compile_config=config)
    assert torch.equal(static, eager)
    assert counter.frame_count == 0  # transformers' beam search calls the eager forward; the reordering is in place


def test_static_cache_refuses_row_operations_that_change_its_size():
    cache = FWPStaticCache(make_model("delta_net").config, 2)
    with pytest.raises(ValueError, match="fixed number of rows"):
        cache.batch_repeat_interleave(2)
    with pytest.raises(ValueError, match="fixed number of rows"):
        cache.batch_select_indices(torch.tensor([0]))


def test_static_cache_starts_as_the_empty_state():
    """Zero buffers are exactly the empty state: a forward into a fresh static cache equals one without a cache."""
    model = make_model("conv_rotary_prenorm", attention_normalization=True)
    ids = random_ids(2, 7)
    cache = FWPStaticCache(model.config, 2, dtype=torch.float64)
    with torch.no_grad():
        into_static = model(ids, cache=cache).logits
        plain = model(ids, use_cache=False).logits
    torch.testing.assert_close(into_static, plain, rtol=1e-12, atol=1e-12)
    assert cache.get_seq_length() == 7 and cache.layers[0].row_tokens.tolist() == [7, 7]


@pytest.mark.slow
def test_captured_decode_compiles_with_inductor_on_cpu():
    torch.manual_seed(0)
    model = FWPForCausalLM(FWPConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_heads=2,
                                     intermediate_size=64, use_short_conv=True, initializer_range=0.5,
                                     pad_token_id=PAD)).eval()
    ids = random_ids(2, 6)
    config, counter = captured("inductor")
    out = static_generate(model, ids, 4, config)
    assert counter.frame_count == 1
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=PAD, return_dict_in_generate=True,
                               output_logits=True)
    assert torch.equal(out.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(eager.logits), rtol=1e-4, atol=1e-4)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["delta_net", "conv_rotary_prenorm", "gated_neg_eigval"])
def test_cuda_graph_generate_matches_eager(variant, dtype):
    """The default compile config on CUDA: inductor with CUDA graphs (mode="reduce-overhead"), with the Triton
    one-token step (decode_triton.py) inside the graph."""
    base, overrides = MORE_VARIANTS.get(variant, (variant, {}))
    model = make_model(base, vocab_size=64, **overrides).to("cuda", dtype)
    prompts = [random_ids(1, 40, seed=2)[0], random_ids(1, 17, seed=3)[0]]
    ids, mask = left_pad(prompts)
    ids, mask = ids.cuda(), mask.cuda()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD,
                  return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        eager = model.generate(ids, **kwargs)
        captured = model.generate(ids, cache_implementation="static", **kwargs)
        again = model.generate(ids, cache_implementation="static", **kwargs)  # replays the captured graphs
    assert isinstance(output_cache(captured), FWPStaticCache)
    steps = lambda out: torch.stack(out.logits)  # noqa: E731
    if dtype == torch.float32:
        assert torch.equal(captured.sequences, eager.sequences)
        torch.testing.assert_close(steps(captured), steps(eager), rtol=1e-4, atol=1e-4)
    else:  # bf16 rounding differs between fused and eager kernels; compare the first steps before any divergence
        torch.testing.assert_close(steps(captured)[:1], steps(eager)[:1], rtol=0.05, atol=0.1)
    assert torch.equal(again.sequences, captured.sequences)
