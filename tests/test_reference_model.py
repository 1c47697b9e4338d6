"""The whole FWPForCausalLM against `reference_fwp`, an independent float64 re-derivation from PAPER.md.

Other tests compare backends and variants with each other; these compare the model's logits with maths written
separately, so what every backend shares (feature maps, normalisations, the layer, the blocks) is checked too.
Variants: every single-field deviation from the defaults, plus a greedy pairwise covering set of the fields."""

import functools

import pytest
import torch
from reference_fwp import reference_logits

from modeling_fwp import FWPConfig, FWPForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, LENGTH, PAD = 50, 20, 0
BACKENDS = ("recurrent", "chunk")

# The first value of each field is the default. "dpfpN" stands for feature_map="dpfp", dpfp_nu=N.
FIELDS = {
    "update_rule": ["delta", "sum"],
    "feature_map": ["elu_plus_one", "dpfp1", "dpfp2", "dpfp3", "favor", "silu", "relu", "identity"],
    "qk_norm": ["sum", "l2", "none"],
    "attention_normalization": [False, True],
    "use_beta": [True, False],
    "allow_neg_eigval": [False, True],
    "use_gate": [False, True],
    "position_embedding": ["none", "sinusoidal", "rotary"],
    "block_style": ["post_ln", "pre_norm"],
    "use_short_conv": [False, True],
    "use_output_norm": [False, True],
    "tie_word_embeddings": [False, True],
}


def well_conditioned(case):
    """Attention normalisation divides by z_t . phi(q_t), which a signed phi (silu, identity) can bring arbitrarily
    close to 0: the config allows it, but then no tolerance separates rounding from a bug."""
    return not (case.get("feature_map") in ("silu", "identity") and case.get("attention_normalization"))


def all_pairs():
    names = list(FIELDS)
    return {((f, x), (g, y)) for i, f in enumerate(names) for g in names[i + 1:] for x in FIELDS[f] for y in FIELDS[g]
            if well_conditioned({f: x, g: y})}


def pairs_of(case):
    names = [f for f in FIELDS if f in case]
    return {((f, case[f]), (g, case[g])) for i, f in enumerate(names) for g in names[i + 1:]}


def pairwise_cases():
    """Greedy all-pairs: each new case starts from an uncovered pair of values and fills the other fields, in order,
    with the value covering the most still-uncovered pairs. Deterministic, so the test ids are stable."""
    uncovered, cases = all_pairs(), []
    while uncovered:
        (f, x), (g, y) = min(uncovered, key=repr)
        case = {f: x, g: y}
        for field in FIELDS:
            if field not in case:
                case[field] = max(FIELDS[field], key=lambda value: (
                    well_conditioned({**case, field: value}), len(pairs_of({**case, field: value}) & uncovered)))
        uncovered -= pairs_of(case)
        cases.append(case)
    return cases


def case_name(case):
    return "-".join(f"{k}={case[k]}" for k in FIELDS if k in case and case[k] != FIELDS[k][0]) or "defaults"


SINGLE = [{field: value} for field, values in FIELDS.items() for value in values[1:]]
# Fields the covering set keeps fixed: an explicit head_dim (H * head_dim != D), conv_size and rope_theta; and a
# no-grad forward split into segments (inference_segment_size) that carry W, z, the conv tail and the positions.
EXTRA = {
    "head_dim6-conv2-theta100": dict(head_dim=6, use_short_conv=True, conv_size=2, position_embedding="rotary",
                                     rope_theta=100.0, attention_normalization=True),
    "segmented": dict(inference_segment_size=7, use_short_conv=True, position_embedding="rotary",
                      attention_normalization=True, feature_map="dpfp2"),
}
CASES = ({case_name(case): case for case in SINGLE}
         | {f"pair{i:02d}-{case_name(case)}": case for i, case in enumerate(pairwise_cases())} | EXTRA)


def config_fields(case):
    fields = dict(case)
    feature_map = fields.get("feature_map", "")
    if feature_map.startswith("dpfp"):
        fields.update(feature_map="dpfp", dpfp_nu=int(feature_map[4:]))
    return fields


def build(case, backend="recurrent", seed=0):
    """A tiny float64 model whose every parameter matters: a large init, random norm weights and biases (not 1 and
    0), larger eps values so their placement shows, and a pad token whose embedding is not zero."""
    config = FWPConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_heads=2, favor_features=4,
                       initializer_range=0.2, qk_norm_eps=1e-3, layer_norm_eps=1e-3, pad_token_id=PAD,
                       kernel_backend=backend, chunk_size=16, **config_fields(case))
    torch.manual_seed(seed)
    model = FWPForCausalLM(config).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:  # norm weights and biases
                parameter.add_(0.3 * torch.randn_like(parameter))
        model.model.embed_tokens.weight[PAD].normal_(0.0, 0.5)  # nn.Embedding(padding_idx) zeroed it
    return model


def tokens(batch, length, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def reference(model, input_ids):
    return torch.stack([reference_logits(model.state_dict(), model.config, row) for row in input_ids])


def tolerance(case):
    return dict(rtol=1e-9, atol=1e-10)  # float64 end to end


@functools.cache
def reference_for(name):
    """The reference logits depend only on the case (the build is seeded), so both backends share one run."""
    return reference(build(CASES[name]), tokens(2, LENGTH))


def test_covering_set_covers_every_pair():
    covered = set().union(*map(pairs_of, pairwise_cases()))
    assert covered >= all_pairs() and all(map(well_conditioned, pairwise_cases()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_logits_equal_reference(name, backend):
    model = build(CASES[name], backend)
    with torch.no_grad():
        logits = model(tokens(2, LENGTH), use_cache=False).logits
    torch.testing.assert_close(logits, reference_for(name), **tolerance(CASES[name]))


PADDED_FAMILIES = {  # one per family of layer maths
    "delta_net": {},
    "linear_transformer": dict(update_rule="sum", qk_norm="none", attention_normalization=True),
    "delta_attn_norm_rotary": dict(attention_normalization=True, position_embedding="rotary", use_beta=False),
    "dpfp3_sinusoidal": dict(feature_map="dpfp3", position_embedding="sinusoidal"),
    "favor_sum": dict(update_rule="sum", feature_map="favor", qk_norm="none", attention_normalization=True),
    "modern": dict(block_style="pre_norm", feature_map="silu", qk_norm="l2", use_short_conv=True,
                   position_embedding="rotary", tie_word_embeddings=True),
    "fla_gated": dict(block_style="pre_norm", feature_map="identity", qk_norm="l2", use_short_conv=True,
                      use_gate=True, allow_neg_eigval=True),  # what modeling_fwp.convert_fla makes of fla's options
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", PADDED_FAMILIES)
def test_left_padded_rows_equal_reference_of_each_row_alone(name, backend):
    case = PADDED_FAMILIES[name]
    model = build(case, backend)
    assert model.model.embed_tokens.weight[PAD].abs().sum() > 0  # a leaked pad token would change the result
    input_ids, mask = tokens(2, LENGTH), torch.ones(2, LENGTH, dtype=torch.long)
    pads = 7
    input_ids[1, :pads], mask[1, :pads] = PAD, 0
    with torch.no_grad():
        logits = model(input_ids, attention_mask=mask, use_cache=False).logits
    alone = [reference_logits(model.state_dict(), model.config, row) for row in (input_ids[0], input_ids[1, pads:])]
    torch.testing.assert_close(logits[0], alone[0], **tolerance(case))
    torch.testing.assert_close(logits[1, pads:], alone[1], **tolerance(case))


# ------------------------------------------------------------------------------------------------ FAVOR+ redraws
FAVOR = dict(feature_map="favor", qk_norm="none")


def projections(model):
    return [layer.attn.feature_map.projection.clone() for layer in model.model.layers]


@pytest.mark.parametrize("backend", BACKENDS)
def test_favor_redraws_each_training_step_and_uses_the_drawn_matrix(backend):
    model = build(FAVOR, backend).train()  # dropout is 0: train mode computes the same maths
    x = tokens(2, LENGTH)
    before = projections(model)
    drawn = []
    for _ in range(2):
        logits = model(x, use_cache=False).logits  # a training forward with gradients
        drawn.append(projections(model))
        # the state_dict now holds the matrix this forward used
        torch.testing.assert_close(logits.detach(), reference(model, x), rtol=1e-9, atol=1e-10)
    for a, b, c in zip(before, *drawn):
        assert not torch.equal(a, b) and not torch.equal(b, c)
    assert not torch.equal(drawn[0][0], drawn[0][1])  # each layer draws its own matrix


def test_favor_replicas_draw_the_same_matrices_step_by_step():
    """Data-parallel replicas must agree on R without communicating: the draw may not depend on the global RNG."""
    replicas = [build(FAVOR).train(), build(FAVOR).train()]
    x = tokens(2, 8)
    previous = projections(replicas[0])
    for _ in range(3):
        for index, replica in enumerate(replicas):
            torch.randn(5 + index)  # the replicas' global RNG streams diverge
            replica(x, use_cache=False)
        first, second = projections(replicas[0]), projections(replicas[1])
        for a, b, old in zip(first, second, previous):
            assert torch.equal(a, b) and not torch.equal(a, old)
        previous = first


def test_favor_matrix_stays_fixed_in_eval_without_gradients_and_with_redraw_off():
    x = tokens(2, 8)
    model, off = build(FAVOR), build(dict(FAVOR, favor_redraw=False))
    fixed, fixed_off = projections(model), projections(off)
    model.eval()(x, use_cache=False)  # eval, gradients on
    with torch.no_grad():
        model.train()(x, use_cache=False)  # train, no gradients
    off.train()(x, use_cache=False)  # train with gradients, redraw turned off
    for a, b in zip(fixed + fixed_off, projections(model) + projections(off)):
        assert torch.equal(a, b)


def test_favor_two_training_forwards_then_one_backward():
    """Preference losses run two forwards (chosen, rejected) before one backward: the redraw between them must not
    change the matrix the first forward's graph saved, and each forward's gradient is the one of its own matrix."""
    model = build(FAVOR).train()
    x = tokens(2, 8)
    first = model(x, use_cache=False).logits.sum()
    second = model(x, use_cache=False).logits.sum()
    (first + second).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
