import pytest

from modeling_fwp import FWPConfig, list_presets, load_preset


def test_defaults_are_the_papers_delta_net():
    config = FWPConfig()
    assert (config.update_rule, config.feature_map, config.qk_norm) == ("delta", "elu_plus_one", "sum")
    assert (config.block_style, config.position_embedding, config.attention_normalization) == ("post_ln", "none", False)
    assert config.head_dim == config.hidden_size // config.num_heads
    assert config.intermediate_size == 4 * config.hidden_size


@pytest.mark.parametrize(
    "fields, key_dim",
    [({"feature_map": "dpfp", "dpfp_nu": 3, "head_dim": 16}, 96), ({"feature_map": "favor", "favor_features": 32}, 64),
     ({"feature_map": "elu_plus_one", "head_dim": 24}, 24)],
)
def test_key_dim_follows_the_feature_map(fields, key_dim):
    config = FWPConfig(**fields)
    assert config.key_dim == key_dim
    assert config.state_size_per_layer == config.num_heads * key_dim * config.head_dim


@pytest.mark.parametrize(
    "field, value",
    [
        ("update_rule", "hebbian"), ("feature_map", "softmax"), ("qk_norm", "l1"), ("position_embedding", "alibi"),
        ("block_style", "sandwich"), ("kernel_backend", "cuda"), ("chunk_size", 48), ("dpfp_nu", 0),
        ("favor_features", 0), ("num_heads", 0), ("head_dim", -1), ("vocab_size", 2.5), ("conv_size", 1),
        ("dropout", 1.5), ("qk_norm_eps", 0.0), ("use_beta", "yes"), ("num_hidden_layers", 0),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        FWPConfig(**{field: value})


def test_bad_choice_lists_the_allowed_values():
    with pytest.raises(ValueError, match="'delta', 'sum'"):
        FWPConfig(update_rule="hebbian")


def test_sizes_that_do_not_divide_are_refused():
    with pytest.raises(ValueError, match="hidden_size"):
        FWPConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="dpfp_nu"):
        FWPConfig(head_dim=4, num_heads=2, hidden_size=8, dpfp_nu=8)  # nu must stay below 2 * head_dim
    with pytest.raises(ValueError, match="head_dim"):
        FWPConfig(hidden_size=30, num_heads=2, position_embedding="rotary")  # rotary needs an even head_dim


def test_round_trip_through_json(tmp_path):
    config = FWPConfig(feature_map="dpfp", dpfp_nu=2, block_style="pre_norm", use_short_conv=True)
    config.save_pretrained(tmp_path)
    loaded = FWPConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


def test_every_preset_is_a_valid_config():
    names = list_presets()
    assert {"tiny", "deltanet-370m", "wt103-small-delta-net", "wt103-medium-linear-transformer"} <= set(names)
    for name in names:
        config = load_preset(name)
        assert config.model_type == "fwp"
    big = load_preset("deltanet-370m")
    assert (big.num_hidden_layers, big.hidden_size, big.num_heads, big.head_dim) == (24, 1024, 16, 64)


def test_preset_overrides_are_validated():
    assert load_preset("tiny", num_hidden_layers=2).num_hidden_layers == 2
    with pytest.raises(ValueError, match="feature_map"):
        load_preset("tiny", feature_map="nope")
    with pytest.raises(ValueError, match="Unknown preset"):
        load_preset("no-such-preset")


# ------------------------------------------------------------------------------------------------- issue 26: types
@pytest.mark.parametrize("field, value, allowed", [
    ("use_cache", "no", "True or False"),  # a non-empty string is true: the cache would stay on
    ("tie_word_embeddings", "false", "True or False"),  # would stay tied
    ("use_cache", 0, "True or False"),
    ("hidden_size", True, "integer >= 1"),  # read as 1, then a misleading divisibility error
    ("num_heads", True, "integer >= 1"),
    ("chunk_size", 64.0, "16, 32, 64, 128"),
    ("chunk_size", True, "16, 32, 64, 128"),
    ("inference_segment_size", 1.5, "integer >= 0"),
    ("dropout", True, "float in"),
    ("rope_theta", "10000", "finite number"),
])
def test_values_of_the_wrong_type_are_refused_naming_the_field(field, value, allowed):
    with pytest.raises(ValueError, match=rf"FWPConfig\.{field}={value!r} is not valid.*{allowed}"):
        FWPConfig(**{field: value})


@pytest.mark.parametrize("field, value", [("num_heads", 0), ("use_cache", "no"), ("hidden_size", True),
                                          ("tie_word_embeddings", "false"), ("feature_map", "softmax"),
                                          ("chunk_size", 48), ("dropout", -0.1)])
def test_a_field_changed_after_construction_is_checked_when_the_model_is_built(field, value):
    from modeling_fwp import FWPForCausalLM, FWPModel

    config = FWPConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_heads=2)
    setattr(config, field, value)
    for model_class in (FWPForCausalLM, FWPModel):
        with pytest.raises(ValueError, match=rf"FWPConfig\.{field}="):
            model_class(config)


def test_saving_a_config_with_a_field_made_invalid_is_refused(tmp_path):
    config = FWPConfig()
    config.num_heads = 0
    with pytest.raises(ValueError, match=r"FWPConfig\.num_heads=0"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_the_boolean_fields_accept_booleans():
    config = FWPConfig(use_cache=False, tie_word_embeddings=True)
    assert config.use_cache is False and config.tie_word_embeddings is True
