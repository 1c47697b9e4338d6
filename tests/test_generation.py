"""Constant-state generation: FWPCache with generate(), exact in float64 on tiny models.

Every cached path (generate, chunked prefill, multi-turn continuation, left padding, beams, sampling) is compared to
full forwards over the whole sequence without any cache, which is the definition of the model's output: each step's
logits (`output_logits=True`), not only the tokens. The test models use a large init (HISTORY_INIT) so that their
next-token logits depend strongly on the history: with the default init a decode that dropped the state would still
pick the same tokens (test_a_dropped_state_is_caught shows the check catches one).
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
    StoppingCriteria,
    StoppingCriteriaList,
    TextStreamer,
    pipeline,
)

from modeling_fwp import FWPCache, FWPConfig, FWPForCausalLM, ops
from modeling_fwp.compat import output_cache

REPO = Path(__file__).resolve().parent.parent
VOCAB = 60
PAD = 0

VARIANTS = {
    "delta_net": dict(),
    "sum_attnorm": dict(update_rule="sum", attention_normalization=True),
    "delta_attnorm": dict(attention_normalization=True),
    "conv_rotary_prenorm": dict(use_short_conv=True, position_embedding="rotary", block_style="pre_norm"),
    "dpfp": dict(feature_map="dpfp"),
    "sinusoidal": dict(position_embedding="sinusoidal"),
}
POSITIONAL = ["conv_rotary_prenorm", "sinusoidal"]  # outputs depend on each token's position
HISTORY_INIT = 0.5  # initializer_range of the test models: changing the early tokens moves the last logits by ~1-3


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(variant="delta_net", vocab_size=VOCAB, seed=0, **overrides) -> FWPForCausalLM:
    fields = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=64,
                  chunk_size=16, pad_token_id=PAD, initializer_range=HISTORY_INIT)
    fields.update(VARIANTS[variant])
    fields.update(overrides)
    torch.manual_seed(seed)
    return FWPForCausalLM(FWPConfig(**fields)).double().eval()


def random_ids(batch, length, seed=1, low=1):
    return torch.randint(low, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def full_logits(model, ids):
    """Logits of a full forward without cache: the reference for every cached path."""
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def argmax_loop(model, ids, new_tokens):
    for _ in range(new_tokens):
        ids = torch.cat([ids, full_logits(model, ids)[:, -1:].argmax(-1)], dim=1)
    return ids


def assert_steps_equal_full_forward(model, out, histories, new_tokens=None):
    """Each step's logits of a generate() output (`output_logits=True, return_dict_in_generate=True`) equal those of
    a full forward without cache over the row's real tokens so far. `histories[row]` holds the row's real tokens
    before this generate() (no pads); the generated tokens are the last columns of `out.sequences`. generate()
    keeps its step logits in float32, so the float64 reference is compared at float32 precision."""
    new_tokens = new_tokens or len(out.logits)
    assert len(out.logits) == new_tokens
    for row, history in enumerate(histories):
        generated = out.sequences[row, -new_tokens:]
        reference = full_logits(model, torch.cat([history, generated[:-1]])[None])[0, -new_tokens:]
        steps = torch.stack([out.logits[step][row] for step in range(new_tokens)])
        torch.testing.assert_close(steps, reference.float(), rtol=1e-5, atol=1e-5, msg=f"row {row}")


def greedy(model, ids, new_tokens, **kwargs):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD, **kwargs)


def left_pad(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def cache_tensors(cache):
    return [(i, name, getattr(layer, name)) for i, layer in enumerate(cache.layers)
            for name in ("fast_weights", "z", "conv_tail", "row_tokens") if getattr(layer, name) is not None]


def assert_same_state(cache_a, cache_b, rows_a=slice(None), rows_b=slice(None)):
    a, b = cache_tensors(cache_a), cache_tensors(cache_b)
    assert [(i, n) for i, n, _ in a] == [(i, n) for i, n, _ in b]
    for (layer, name, ta), (_, _, tb) in zip(a, b):
        torch.testing.assert_close(ta[rows_a], tb[rows_b], rtol=1e-10, atol=1e-10, msg=f"layer {layer} {name}")


# ------------------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generate_equals_argmax_loop_without_cache(variant):
    model = make_model(variant)
    ids = random_ids(2, 9)
    out = greedy(model, ids, 12, return_dict_in_generate=True, output_logits=True)
    assert isinstance(output_cache(out), FWPCache)  # never a DynamicCache
    assert torch.equal(out.sequences, argmax_loop(model, ids, 12))
    assert_steps_equal_full_forward(model, out, ids)


@pytest.mark.parametrize("variant", VARIANTS)
def test_test_models_depend_on_their_history(variant):
    """What makes the step-logit checks able to fail: other early tokens move the last logits by a lot."""
    model = make_model(variant)
    ids = random_ids(4, 12)
    other = ids.clone()
    other[:, :6] = random_ids(4, 6, seed=99)
    change = (full_logits(model, ids)[:, -1] - full_logits(model, other)[:, -1]).abs().amax(-1)
    assert (change > 0.3).all(), change


def test_a_dropped_state_is_caught(monkeypatch):
    """A decode that forgets the state (transformers 5.24 passing `cache` to a forward that only read
    `past_key_values` did exactly that) fails the step-logit check, even where the tokens happen to agree."""
    from modeling_fwp.cache_fwp import FWPLayerState

    model = make_model("delta_net")
    ids = random_ids(2, 9)
    monkeypatch.setattr(FWPCache, "__getitem__", lambda self, index: FWPLayerState())  # every layer reads nothing
    out = greedy(model, ids, 6, return_dict_in_generate=True, output_logits=True)
    with pytest.raises(AssertionError):
        assert_steps_equal_full_forward(model, out, ids)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_forward_over_several_tokens_continues_the_state(variant):
    model = make_model(variant)
    ids = random_ids(2, 50)
    whole = model(ids, use_cache=True)
    cache, pieces = None, []
    for start, stop in ((0, 7), (7, 37), (37, 38), (38, 50)):  # crosses the 16-token chunks of the chunk backend
        out = model(ids[:, start:stop], cache=cache, use_cache=True)
        cache = output_cache(out)
        pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, 1), whole.logits, rtol=1e-10, atol=1e-10)
    assert_same_state(cache, output_cache(whole))
    assert cache.get_seq_length() == 50


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_chunk_size_in_generation_config(variant):
    model = make_model(variant)
    ids, mask = left_pad([random_ids(1, 21, seed=2)[0], random_ids(1, 6, seed=3)[0]])
    histories = [ids[0, -21:], ids[1, -6:]]
    # chunk of 5: the first chunk of row 1 is only pads (a zero-length sequence in that forward)
    chunked = greedy(model, ids, 8, attention_mask=mask, prefill_chunk_size=5, return_dict_in_generate=True,
                     output_logits=True)
    assert_steps_equal_full_forward(model, chunked, histories)
    model.generation_config.prefill_chunk_size = 7
    default = greedy(model, ids, 8, attention_mask=mask, return_dict_in_generate=True, output_logits=True)
    assert_steps_equal_full_forward(model, default, histories)
    assert torch.equal(default.sequences, chunked.sequences)


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_continues_a_previous_generate_exactly(variant):
    """The multi-turn chat pattern: feed the whole history back with the previous cache."""
    model = make_model(variant)
    first = greedy(model, random_ids(1, 8), 6, return_dict_in_generate=True)
    history = torch.cat([first.sequences, random_ids(1, 5, seed=4)], dim=1)
    seen_before = output_cache(first).get_seq_length()
    assert seen_before == 8 + 6 - 1  # the last generated token has not been fed yet
    second = greedy(model, history, 7, cache=output_cache(first), return_dict_in_generate=True, output_logits=True)
    assert torch.equal(second.sequences, argmax_loop(model, history, 7))
    assert_steps_equal_full_forward(model, second, history)
    assert output_cache(second).get_seq_length() == history.shape[1] + 7 - 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_multi_turn_continuation_of_a_left_padded_batch(variant):
    """Conversations of different lengths whose new turns differ in length too: the new turns are left-padded, so
    pads sit in the middle of each history, and must still never reach the state or the positions."""
    model = make_model(variant)
    prompts = [random_ids(1, 10, seed=5)[0], random_ids(1, 3, seed=6)[0]]
    ids, mask = left_pad(prompts)
    first = greedy(model, ids, 4, attention_mask=mask, return_dict_in_generate=True)
    turns = [random_ids(1, 3, seed=7)[0], random_ids(1, 1, seed=8)[0]]
    turn_ids, turn_mask = left_pad(turns)
    history = torch.cat([first.sequences, turn_ids], dim=1)
    history_mask = torch.cat([mask, torch.ones(2, 4, dtype=torch.long), turn_mask], dim=1)
    second = greedy(model, history, 5, attention_mask=history_mask, cache=output_cache(first), return_dict_in_generate=True,
                    output_logits=True, prefill_chunk_size=2)  # the new turn is prefilled in chunks on the old state
    alone = [torch.cat([prompt, first.sequences[row, -4:], turn]) for row, (prompt, turn) in enumerate(zip(prompts, turns))]
    assert_steps_equal_full_forward(model, second, alone)
    for row in range(2):
        assert torch.equal(second.sequences[row, -5:], argmax_loop(model, alone[row][None], 5)[0, -5:])


def test_continuation_with_more_rows_needs_the_cache_repeated():
    """generate() expands the inputs for num_return_sequences but not a cache it is handed (for any cache class):
    a clear error, and after `batch_repeat_interleave` the same draws as a repeated batch."""
    model = make_model("conv_rotary_prenorm")
    first = greedy(model, random_ids(2, 6, seed=9), 3, return_dict_in_generate=True)
    history = torch.cat([first.sequences, random_ids(2, 2, seed=10)], dim=1)
    with pytest.raises(ValueError, match="holds 2 sequences but this input has 4"):
        sample(model, history, 0, cache=copy.deepcopy(output_cache(first)), num_return_sequences=2,
               max_new_tokens=3)
    repeated = copy.deepcopy(output_cache(first))
    repeated.batch_repeat_interleave(2)
    expanded = sample(model, history, 0, cache=repeated, num_return_sequences=2, max_new_tokens=3)
    # the same random draws as sampling the repeated histories from scratch, without any cache
    assert torch.equal(expanded, sample(model, history.repeat_interleave(2, dim=0), 0, max_new_tokens=3))


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_generates_what_each_prompt_generates_alone(variant):
    model = make_model(variant)
    prompts = [random_ids(1, n, seed=10 + n)[0] for n in (11, 4, 1, 7)]
    ids, mask = left_pad(prompts)
    out = greedy(model, ids, 9, attention_mask=mask, output_scores=True, output_logits=True,
                 return_dict_in_generate=True)
    assert_steps_equal_full_forward(model, out, prompts)
    for row, prompt in enumerate(prompts):
        alone = greedy(model, prompt[None], 9, output_scores=True, return_dict_in_generate=True)
        assert torch.equal(out.sequences[row, -9:], alone.sequences[0, -9:]), f"row {row}"
        for step in range(9):
            torch.testing.assert_close(out.scores[step][row], alone.scores[step][0], rtol=1e-10, atol=1e-10)
        # positions continue per row from the row's own real tokens, not from the padded width
        assert output_cache(out).row_tokens(1)[row] == len(prompt) + 9 - 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_of_one_with_padding_is_masked(variant):
    """transformers #46773: a padding mask must not be skipped for a batch of one row."""
    model = make_model(variant)
    prompt = random_ids(1, 6, seed=20)
    padded = torch.cat([torch.full((1, 3), PAD), prompt], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
    out = greedy(model, padded, 6, attention_mask=mask, return_dict_in_generate=True, output_logits=True)
    assert_steps_equal_full_forward(model, out, prompt)


@pytest.mark.parametrize("variant", VARIANTS)
def test_right_padded_forward_equals_unpadded(variant):
    """transformers #48256: right pads must leave the state (and the conv tail) as the last real token left it."""
    model = make_model(variant)
    lengths = (9, 4)
    ids = random_ids(2, 9, seed=21)
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    ids = ids.masked_fill(mask == 0, PAD)
    out = model(ids, attention_mask=mask, use_cache=True)
    for row, length in enumerate(lengths):
        alone = model(ids[row:row + 1, :length], use_cache=True)
        torch.testing.assert_close(out.logits[row, :length], alone.logits[0], rtol=1e-10, atol=1e-10)
        assert_same_state(output_cache(out), output_cache(alone), rows_a=slice(row, row + 1))
    # and the next token continues each row from its last real token
    nxt = random_ids(2, 1, seed=22)
    step = model(nxt, cache=output_cache(out), use_cache=True)
    for row, length in enumerate(lengths):
        reference = full_logits(model, torch.cat([ids[row:row + 1, :length], nxt[row:row + 1]], dim=1))[:, -1]
        torch.testing.assert_close(step.logits[row, -1], reference[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", POSITIONAL)
def test_positions_continue_per_row_under_left_padding(variant):
    model = make_model(variant)
    prompts = [random_ids(1, 8, seed=30)[0], random_ids(1, 2, seed=31)[0]]
    ids, mask = left_pad(prompts)
    out = model(ids, attention_mask=mask, use_cache=True)
    cache = output_cache(out)
    assert cache.row_tokens(0).tolist() == [8, 2] and cache.get_seq_length() == 8
    nxt = random_ids(2, 3, seed=32)
    step = model(nxt, attention_mask=torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1), cache=cache)
    for row, prompt in enumerate(prompts):
        reference = full_logits(model, torch.cat([prompt[None], nxt[row:row + 1]], dim=1))[0, -3:]
        torch.testing.assert_close(step.logits[row], reference, rtol=1e-10, atol=1e-10)
    # The check can fail: the same tokens and state read at positions shifted by the pad count give other logits.
    shifted = FWPCache(config=model.config)
    for layer in shifted.layers:
        layer.row_tokens = torch.tensor([6])  # a position offset only: the state itself starts empty
    wrong = model(torch.cat([prompts[1][None], nxt[1:2]], dim=1), cache=shifted, use_cache=True).logits
    assert not torch.allclose(wrong[0, -3:], step.logits[1], atol=1e-6)


def test_generate_without_cache_and_from_inputs_embeds():
    model = make_model("conv_rotary_prenorm", attention_normalization=True)
    ids, mask = left_pad([random_ids(1, 7)[0], random_ids(1, 3, seed=4)[0]])
    histories = [ids[0], ids[1, -3:]]
    reference = greedy(model, ids, 6, attention_mask=mask, return_dict_in_generate=True, output_logits=True)
    assert_steps_equal_full_forward(model, reference, histories)
    uncached = greedy(model, ids, 6, attention_mask=mask, use_cache=False, return_dict_in_generate=True,
                      output_logits=True)
    assert_steps_equal_full_forward(model, uncached, histories)
    with torch.no_grad():
        embedded = model.generate(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask,
                                  max_new_tokens=6, do_sample=False, pad_token_id=PAD, return_dict_in_generate=True,
                                  output_logits=True)
    assert_steps_equal_full_forward(model, embedded, histories)  # only the new tokens come back for embeddings
    assert torch.equal(embedded.sequences, reference.sequences[:, -6:])


def test_low_precision_model_keeps_a_float32_state():
    """ollama #15865: a state written in bf16 drifts; the fast weights and z must stay float32."""
    model = make_model("conv_rotary_prenorm", attention_normalization=True).to(torch.bfloat16)
    ids = random_ids(2, 20)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=PAD, return_dict_in_generate=True)
    for layer in output_cache(out).layers:
        assert layer.fast_weights.dtype == torch.float32 and layer.z.dtype == torch.float32


@pytest.mark.allow_deprecation  # transformers 5.25's assistant candidate generator passes generation_config with kwargs
def test_assisted_generation_is_refused_clearly():
    """It needs to roll the cache back, which a fast-weight state cannot do.  transformers < 5.25 refuses the
    `_is_stateful` model up front; 5.25 asks the cache (`is_croppable`) after the prefill."""
    model = make_model("delta_net")
    with pytest.raises(ValueError, match="stateful|cache that can be cropped"):
        greedy(model, random_ids(1, 4), 3, assistant_model=make_model("delta_net", seed=1))
    with torch.no_grad():
        cache = output_cache(model(random_ids(1, 4), use_cache=True))
    assert all(layer.is_croppable is False for layer in cache.layers)


# ----------------------------------------------------------------------------------------------- constant state
def test_decode_state_is_constant_in_context_length():
    model = make_model("conv_rotary_prenorm", attention_normalization=True)  # every kind of cached tensor
    sizes, shapes = [], []
    for length in (16, 4096):
        with torch.no_grad():
            cache = output_cache(model(random_ids(2, length, seed=length), use_cache=True))
            cache = output_cache(model(random_ids(2, 1, seed=3), cache=cache, use_cache=True))
        assert cache.get_seq_length() == length + 1
        assert all(cache.get_seq_length(i) == length + 1 for i in range(2))  # per layer, not global
        sizes.append(cache.state_nbytes())
        shapes.append([(i, n, tuple(t.shape)) for i, n, t in cache_tensors(cache)])
    assert sizes[0] == sizes[1] > 0
    assert shapes[0] == shapes[1]
    assert {n for _, n, _ in shapes[0]} == {"fast_weights", "z", "conv_tail", "row_tokens"}
    heads, key_dim = model.config.num_heads, model.config.key_dim
    assert ("fast_weights", (2, heads, key_dim, model.config.head_dim)) in [(n, s) for _, n, s in shapes[0]]


def test_prefill_computes_logits_of_the_last_position_only():
    """generate() asks for one position of logits (logits_to_keep): [batch, 32768, vocab] would dwarf the state."""
    model = make_model("delta_net")
    shapes = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(inputs[0].shape)))
    greedy(model, random_ids(2, 30), 3)
    assert shapes == [(2, 1, 32)] * 3


def test_decode_step_takes_the_single_token_path(monkeypatch):
    """A decode step runs the recurrent one-token update, never the chunkwise kernel (O(1) per token)."""
    model = make_model("delta_net")
    with torch.no_grad():
        cache = output_cache(model(random_ids(1, 40), use_cache=True))

    def refuse(*args, **kwargs):
        raise AssertionError("the chunk kernel ran during a decode step")

    monkeypatch.setattr(ops, "delta_rule_chunk", refuse)
    monkeypatch.setattr(ops, "sum_rule_chunk", refuse)
    with torch.no_grad():
        for seed in range(3):
            cache = output_cache(model(random_ids(1, 1, seed=seed), cache=cache, use_cache=True))
    assert cache.get_seq_length() == 43


# ----------------------------------------------------------------------------------------------- cache API
def test_get_seq_length_and_crop():
    model = make_model("delta_net")
    cache = FWPCache(config=model.config)
    assert cache.get_seq_length() == 0
    cache.crop(0)  # an empty cache loses nothing
    ids, mask = left_pad([random_ids(1, 7)[0], random_ids(1, 3)[0]])
    cache = output_cache(model(ids, attention_mask=mask, use_cache=True))
    assert cache.get_seq_length() == 7  # input columns, what generate() slices the next inputs by
    assert [cache.get_seq_length(i) for i in range(2)] == [7, 7]
    before = [t.clone() for _, _, t in cache_tensors(cache)]
    cache.crop(7)
    cache.crop(100)  # crops that remove nothing are allowed
    assert all(torch.equal(a, t) for a, (_, _, t) in zip(before, cache_tensors(cache)))
    for bad in (6, 0, -1):
        with pytest.raises(ValueError, match="cannot be cropped"):
            cache.crop(bad)
    assert cache.get_seq_length() == 7


def _three_row_cache(model):
    ids = random_ids(3, 6, seed=40)
    return ids, output_cache(model(ids, use_cache=True))


@pytest.mark.parametrize("variant", ["conv_rotary_prenorm", "sum_attnorm"])
def test_reorder_repeat_and_select_rows(variant):
    model = make_model(variant)
    nxt = random_ids(1, 2, seed=41)

    def check(cache, rows):
        """After the row operation, row j of the cache must continue sequence rows[j]."""
        ids, _ = _three_row_cache(model)
        out = model(nxt.expand(len(rows), -1), cache=cache, use_cache=True)
        for j, r in enumerate(rows):
            reference = full_logits(model, torch.cat([ids[r:r + 1], nxt], dim=1))[0, -2:]
            torch.testing.assert_close(out.logits[j], reference, rtol=1e-10, atol=1e-10)

    _, cache = _three_row_cache(model)
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    check(cache, [2, 0, 0])
    _, cache = _three_row_cache(model)
    cache.batch_repeat_interleave(2)
    check(cache, [0, 0, 1, 1, 2, 2])
    _, cache = _three_row_cache(model)
    cache.batch_select_indices(torch.tensor([0, 2]))
    check(cache, [0, 2])


# ----------------------------------------------------------------------------------------------- search & sampling
def brute_force_beam_search(model, ids, num_beams, new_tokens):
    """Keeps the num_beams best continuations by total log-probability (no EOS), from full forwards only."""
    beams = [(ids[0], 0.0)]
    for _ in range(new_tokens):
        candidates = []
        for seq, score in beams:
            logprobs = torch.log_softmax(full_logits(model, seq[None])[0, -1], dim=-1)
            candidates += [(torch.cat([seq, torch.tensor([tok])]), score + logprobs[tok].item()) for tok in range(VOCAB)]
        beams = sorted(candidates, key=lambda c: -c[1])[:num_beams]
    return beams


@pytest.mark.parametrize("variant", ["delta_net", "conv_rotary_prenorm"])
def test_beam_search_equals_brute_force(variant):
    model = make_model(variant)
    ids = random_ids(1, 5, seed=50)
    out = greedy(model, ids, 5, num_beams=3, num_return_sequences=3, length_penalty=0.0,
                 output_scores=True, return_dict_in_generate=True)
    expected = brute_force_beam_search(model, ids, 3, 5)
    assert torch.equal(out.sequences, torch.stack([seq for seq, _ in expected]))
    # generate() reports beam scores in float32
    torch.testing.assert_close(out.sequences_scores, torch.tensor([s for _, s in expected], dtype=torch.float32))
    # deterministic, and the same with the step-by-step backend
    assert torch.equal(greedy(model, ids, 5, num_beams=3, length_penalty=0.0), out.sequences[:1])
    model.config.kernel_backend = "recurrent"
    assert torch.equal(greedy(model, ids, 5, num_beams=3, num_return_sequences=3, length_penalty=0.0), out.sequences)


def test_beam_search_on_a_left_padded_batch():
    model = make_model("conv_rotary_prenorm")
    prompts = [random_ids(1, 7, seed=51)[0], random_ids(1, 3, seed=52)[0]]
    ids, mask = left_pad(prompts)
    batched = greedy(model, ids, 5, attention_mask=mask, num_beams=3)
    for row, prompt in enumerate(prompts):
        assert torch.equal(batched[row, -5:], greedy(model, prompt[None], 5, num_beams=3)[0, -5:])


def sample(model, ids, seed, **kwargs):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(ids, do_sample=True, pad_token_id=PAD, **kwargs)


@pytest.mark.parametrize("variant", ["delta_net", "sum_attnorm"])
def test_num_return_sequences_sampling_same_for_chunk_and_recurrent(variant):
    model = make_model(variant)
    ids = random_ids(2, 20, seed=60)
    kwargs = dict(max_new_tokens=10, num_return_sequences=3)
    model.config.kernel_backend = "chunk"
    chunk = sample(model, ids, 123, **kwargs)
    model.config.kernel_backend = "recurrent"
    recurrent = sample(model, ids, 123, **kwargs)
    assert chunk.shape == (6, 30) and torch.equal(chunk, recurrent)
    # the cache rows were repeated with the inputs: same draws as passing every prompt three times
    assert torch.equal(sample(model, ids.repeat_interleave(3, dim=0), 123, max_new_tokens=10), chunk)
    assert not torch.equal(sample(model, ids, 124, **kwargs), chunk), "sampling should depend on the seed"


def test_top_k_and_top_p_sampling():
    model = make_model("conv_rotary_prenorm")
    ids = random_ids(2, 6, seed=61)
    reference = greedy(model, ids, 8)
    assert torch.equal(sample(model, ids, 1, max_new_tokens=8, top_k=1), reference)
    assert torch.equal(sample(model, ids, 2, max_new_tokens=8, top_p=1e-6, top_k=0), reference)
    drawn = sample(model, ids, 3, max_new_tokens=8, top_k=4, temperature=1.5)
    logits = full_logits(model, drawn)
    for step in range(8):
        position = 6 + step
        top = logits[:, position - 1].topk(4).indices
        assert (top == drawn[:, position:position + 1]).any(-1).all(), f"token outside top-4 at step {step}"
    nucleus = sample(model, ids, 4, max_new_tokens=8, top_p=0.5, top_k=0)
    probs = torch.softmax(full_logits(model, nucleus), -1)
    for step in range(8):
        p = probs[:, 5 + step]
        chosen = p.gather(-1, nucleus[:, 6 + step:7 + step])
        mass_above = (p * (p > chosen)).sum(-1, keepdim=True)
        assert (mass_above < 0.5 + 1e-9).all(), f"token outside the top-p nucleus at step {step}"


class StopAfterToken(StoppingCriteria):
    """Stops each row, on its own, once it has generated `token`."""

    def __init__(self, token, prompt_length):
        self.token, self.prompt_length = token, prompt_length

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids[:, self.prompt_length:] == self.token).any(-1)


def test_custom_stopping_criterion_stops_rows_independently():
    model = make_model("delta_net")
    ids = random_ids(2, 5, seed=70)
    free = greedy(model, ids, 12)
    token = free[0, 5 + 3].item()  # row 0 produces it at step 3
    first_hit = [next((i for i, t in enumerate(free[r, 5:].tolist()) if t == token), 12) for r in range(2)]
    assert first_hit[0] <= 3 and first_hit[1] != first_hit[0], "pick a seed where the rows stop at different steps"
    criteria = StoppingCriteriaList([StopAfterToken(token, 5)])
    stopped = greedy(model, ids, 12, stopping_criteria=criteria)
    assert stopped.shape[1] == 5 + min(max(first_hit) + 1, 12)  # generation ends when every row has stopped
    assert torch.equal(stopped, free[:, :stopped.shape[1]])
    # with an EOS token, a row that stopped receives only pads while the other goes on
    with_eos = greedy(model, ids, 12, stopping_criteria=criteria, eos_token_id=VOCAB - 1)
    for r in range(2):
        n = min(first_hit[r] + 1, 12)
        assert torch.equal(with_eos[r, :5 + n], free[r, :5 + n])
        assert (with_eos[r, 5 + n:] == PAD).all()


class ForbidToken(LogitsProcessor):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores):
        scores[:, self.token] = -float("inf")
        return scores


def test_custom_logits_processor_applies_at_every_step():
    model = make_model("delta_net")
    ids = random_ids(1, 5, seed=71)
    free = greedy(model, ids, 10)
    banned = free[0, 5].item()
    out = greedy(model, ids, 10, logits_processor=LogitsProcessorList([ForbidToken(banned)]))
    assert banned not in out[0, 5:].tolist()


# ----------------------------------------------------------------------------------------------- tokenizer, pipeline
SENTENCES = [
    "fast weight programmers write keys and values into a matrix",
    "the delta rule corrects the value stored under a key",
    "linear transformers are fast weight programmers",
    "a constant size state makes generation cheap for long contexts",
    "hello world, hello fast weights",
]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 3, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   padding_side="left")


def text_model(tokenizer):
    model = make_model("conv_rotary_prenorm", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def test_text_streamer_prints_the_generated_text(tokenizer, capsys):
    model = text_model(tokenizer)
    ids = tokenizer("hello fast weights", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False, streamer=TextStreamer(tokenizer, skip_prompt=True))
    printed = capsys.readouterr().out
    assert printed.rstrip("\n") == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert torch.equal(out, argmax_loop(model, ids, out.shape[1] - ids.shape[1]))


@pytest.mark.allow_deprecation  # transformers 5.17's pipeline itself passes generation_config with generation kwargs
def test_text_generation_pipeline(tokenizer):
    model = text_model(tokenizer)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompts = ["the delta rule", "linear transformers are fast weight"]
    results = generator(prompts, max_new_tokens=8, do_sample=False, batch_size=2, return_full_text=False)
    for prompt, result in zip(prompts, results):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        expected = greedy(model, ids, 8, eos_token_id=tokenizer.eos_token_id)  # alone, no padding
        assert result[0]["generated_text"] == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------- scripts/generate.py
def _load_script(path):
    """The script at scripts/`path` (without .py) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).name, REPO / "scripts" / f"{path}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _expected_text(model, tokenizer, prompt, new_tokens):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    return tokenizer.decode(greedy(model, ids, new_tokens, eos_token_id=tokenizer.eos_token_id)[0],
                            skip_special_tokens=True)


@pytest.fixture(scope="module")
def saved_folder(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "model"
    model = text_model(tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def test_generate_script_command_line_batch_from_a_saved_folder(tokenizer, saved_folder, tmp_path):
    """The real command line, in a subprocess: a prompt file generated as one left-padded batch."""
    folder, model = saved_folder
    prompts = ["the delta rule", "hello world, hello"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "generate.py"), str(folder), "--prompt_file",
                             str(tmp_path / "prompts.txt"), "--max_new_tokens", "6", "--dtype", "float64",
                             "--prefill_chunk_size", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    for prompt in prompts:
        assert _expected_text(model, tokenizer, prompt, 6) in result.stdout


def test_generate_script_streams_one_prompt_and_takes_the_flags(tokenizer, saved_folder, capsys):
    folder, model = saved_folder
    script = _load_script("generate")
    script.main([str(folder), "--prompt", "the delta rule", "--max_new_tokens", "5", "--dtype", "float64"])
    assert capsys.readouterr().out.strip() == _expected_text(model, tokenizer, "the delta rule", 5)
    script.main([str(folder), "--prompt", "hello", "--max_new_tokens", "4", "--dtype", "float64", "--num_beams", "2"])
    script.main([str(folder), "--prompt", "hello", "--max_new_tokens", "4", "--do_sample", "--top_k", "5",
                 "--top_p", "0.9", "--temperature", "0.7", "--seed", "3", "--repetition_penalty", "1.2"])
    script.main([str(folder), "--prompt", "hello", "--max_new_tokens", "3", "--trust_remote_code"])
    assert capsys.readouterr().out.startswith("hello")


def test_generate_script_errors_and_preset(tmp_path, capsys):
    script = _load_script("generate")
    for argv, named in (([str(tmp_path / "nowhere"), "--prompt", "hi"], "nowhere"),
                        (["tiny", "--prompt_file", str(tmp_path / "none.txt")], "none.txt"),
                        (["no-such-preset", "--prompt", "hi"], "no-such-preset"),
                        ([str(tmp_path), "--prompt", "hi"], "config.json")):
        with pytest.raises(SystemExit) as stop:
            script.main(argv)
        assert stop.value.code != 0 and named in capsys.readouterr().err
    with pytest.warns(UserWarning, match="RANDOM weights"):
        script.main(["tiny", "--prompt_ids", "5,6,7", "--max_new_tokens", "3"])
    assert capsys.readouterr().out.split()[:3] == ["5", "6", "7"]


# ------------------------------------------------------------------------------------- scripts/bench/bench_generate.py
def test_bench_generate_runs_at_tiny_size_on_cpu(tmp_path):
    """Only that the script runs and reports every case (its numbers are for the GPU, not for a test)."""
    import json

    bench = _load_script("bench/bench_generate")
    out = tmp_path / "bench.json"
    bench.main(["--tiny", "--device", "cpu", "--models", "fwp,fla,llama", "--batch_sizes", "1,2", "--prompt_lengths",
                "20", "--new_tokens", "3", "--json", str(out), "--markdown", str(tmp_path / "bench.md")])
    results = json.loads(out.read_text())
    cases = {(c["model"], c["batch"]): c for c in results["cases"]}
    assert len(cases) == 6
    for model in ("fwp", "llama"):
        for batch in (1, 2):
            assert cases[(model, batch)]["status"] == "ok" and cases[(model, batch)]["ms_per_token"] is not None
    assert cases[("fla", 1)]["status"] == "skipped"  # fla's kernels need CUDA
    # FWP's cache is a fixed-size state; Llama's KV cache holds all 20 + 3 - 1 positions
    assert cases[("fwp", 2)]["cache_mb"] > 0 and cases[("llama", 2)]["cache_mb"] > 0
    assert "| batch | prompt |" in (tmp_path / "bench.md").read_text()
