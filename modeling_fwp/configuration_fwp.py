"""Configuration of the delta-rule Fast Weight Programmer (Schlag, Irie & Schmidhuber, ICML 2021)."""

import difflib
import inspect
import math
import warnings

from transformers import PretrainedConfig

UPDATE_RULES = ("delta", "sum")
FEATURE_MAPS = ("elu_plus_one", "dpfp", "favor", "silu", "relu", "identity")
QK_NORMS = ("sum", "l2", "none")
POSITION_EMBEDDINGS = ("none", "sinusoidal", "rotary")
BLOCK_STYLES = ("post_ln", "pre_norm")
KERNEL_BACKENDS = ("auto", "recurrent", "chunk", "triton", "fla")
CHUNK_SIZES = (16, 32, 64, 128)


class FWPConfig(PretrainedConfig):
    r"""
    Configuration of an [`FWPModel`] / [`FWPForCausalLM`]: a stack of fast weight programmer layers. Each layer keeps
    a fast-weight matrix per head, written by the update rule and read by the queries. Every paper variant is one field
    away; the defaults are the paper's Delta Net (delta rule, ELU+1, sum normalisation, post-LN blocks, no positions).

    Args:
        vocab_size (`int`, *optional*, defaults to 8192): Vocabulary size.
        hidden_size (`int`, *optional*, defaults to 256): Model width D.
        num_hidden_layers (`int`, *optional*, defaults to 4): Number of blocks.
        num_heads (`int`, *optional*, defaults to 4): Fast-weight heads per layer.
        head_dim (`int`, *optional*): Size of each head's key/query/value before the feature map. Defaults to
            `hidden_size // num_heads`, which must then divide exactly.
        intermediate_size (`int`, *optional*): Feed-forward width. Defaults to `4 * hidden_size` for "post_ln"
            blocks and to the SwiGLU size `256 * ceil(8/3 * hidden_size / 256)` for "pre_norm" blocks.
        update_rule (`str`, *optional*, defaults to `"delta"`): `"delta"` (retrieve, then write a beta-weighted
            correction, Eqs. 20-25) or `"sum"` (purely additive write, the Linear Transformer).
        feature_map (`str`, *optional*, defaults to `"elu_plus_one"`): phi applied to keys and queries: one of
            `"elu_plus_one"` (Eq. 30), `"dpfp"` (Eqs. 33-37), `"favor"` (FAVOR+, Eqs. 31-32), `"silu"`, `"relu"`,
            `"identity"`.
        dpfp_nu (`int`, *optional*, defaults to 1): DPFP's nu; the key size becomes `2 * head_dim * nu`.
            Allowed: 1 <= nu < 2 * head_dim.
        favor_features (`int`, *optional*, defaults to 64): FAVOR+'s number of random features m (key size 2m).
        favor_redraw (`bool`, *optional*, defaults to `True`): redraw FAVOR+'s random matrix at every training
            forward with gradients (the paper); it stays fixed in eval and is saved with the weights either way.
        qk_norm (`str`, *optional*, defaults to `"sum"`): normalisation of phi(k) and phi(q): `"sum"` (divide by the
            sum of the features, Eq. 29), `"l2"` (unit L2 norm, modern DeltaNet) or `"none"`.
        qk_norm_eps (`float`, *optional*, defaults to 1e-5): epsilon of the sum / l2 normalisation, so an all-zero
            DPFP vector cannot divide by zero.
        attention_normalization (`bool`, *optional*, defaults to `False`): the z accumulator of Eqs. 26-28. With the
            sum rule it divides each output by z_t . phi(q_t) (the Linear Transformer of Katharopoulos et al.); with
            the delta rule it also normalises the retrieval by z_{t-1} . phi(k_t) (the paper's types 44-46).
        use_beta (`bool`, *optional*, defaults to `True`): learned per-head learning rate beta = sigmoid(W_beta x);
            `False` means beta = 1. Only used by the delta rule.
        allow_neg_eigval (`bool`, *optional*, defaults to `False`): doubles beta, so it lies in (0, 2) (2 without
            use_beta) and the update I - beta k k^T can have a negative eigenvalue (Grazzi et al. 2024; fla's
            `allow_neg_eigval`). Only used by the delta rule.
        use_gate (`bool`, *optional*, defaults to `False`): output gate: the read-out (after the output norm, if
            any) is multiplied by SiLU(W_g x) per channel before the output projection, computed in fp32 (fla's
            `use_gate`, whose FusedRMSNormGated computes rmsnorm(o) * silu(g)).
        position_embedding (`str`, *optional*, defaults to `"none"`): `"none"` (the paper's best setting),
            `"sinusoidal"` (absolute, added to the embeddings) or `"rotary"` (applied to q and k before phi).
        rope_theta (`float`, *optional*, defaults to 10000.0): base of the rotary and sinusoidal frequencies.
        block_style (`str`, *optional*, defaults to `"post_ln"`): `"post_ln"` (the paper: residual, then LayerNorm,
            ReLU feed-forward) or `"pre_norm"` (RMSNorm before each sub-layer, SwiGLU feed-forward, modern DeltaNet).
        use_output_norm (`bool`, *optional*): per-head RMSNorm of the fast-weight read-out before the output
            projection. Defaults to `True` for "pre_norm" and `False` for "post_ln".
        use_short_conv (`bool`, *optional*, defaults to `False`): causal depthwise convolution (SiLU) on q, k, v.
        conv_size (`int`, *optional*, defaults to 4): kernel size of the short convolution (>= 2).
        dropout (`float`, *optional*, defaults to 0.0): dropout on the residual branches and inside the feed-forward.
        kernel_backend (`str`, *optional*, defaults to `"auto"`): update-rule implementation: `"auto"` (Triton on
            CUDA, chunkwise PyTorch on CPU), `"recurrent"` (step by step, the reference), `"chunk"` (chunkwise
            PyTorch), `"triton"` or `"fla"`. With `"auto"` / `"triton"` on CUDA the norms, SwiGLU and short
            convolution run as fused Triton kernels too; `"chunk"` / `"recurrent"` keep every op in PyTorch. May be
            changed on a live model; it applies from the next call.
        chunk_size (`int`, *optional*, defaults to 64): chunk length of the chunkwise backends (16, 32, 64 or 128).
            It changes only rounding, not the result; the CPU chunk backend's delta rule uses at most 32, faster there.
        inference_segment_size (`int`, *optional*, defaults to 8192): a forward without gradients over more tokens
            than this runs in segments of this many, carrying the state (exact), so prefill memory stays flat in the
            prompt length. 0 turns it off.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5): epsilon of LayerNorm / RMSNorm.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the normal weight init.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`): share input embeddings and LM head.
        use_cache (`bool`, *optional*, defaults to `True`): return the fast-weight state for generation.
    """

    model_type = "fwp"
    # Output keys the Trainer leaves out of predictions: the state, under its name before and after transformers 5.24.
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size=8192,
        hidden_size=256,
        num_hidden_layers=4,
        num_heads=4,
        head_dim=None,
        intermediate_size=None,
        update_rule="delta",
        feature_map="elu_plus_one",
        dpfp_nu=1,
        favor_features=64,
        favor_redraw=True,
        qk_norm="sum",
        qk_norm_eps=1e-5,
        attention_normalization=False,
        use_beta=True,
        allow_neg_eigval=False,
        use_gate=False,
        position_embedding="none",
        rope_theta=10000.0,
        block_style="post_ln",
        use_output_norm=None,
        use_short_conv=False,
        conv_size=4,
        dropout=0.0,
        kernel_backend="auto",
        chunk_size=64,
        inference_segment_size=8192,
        layer_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,
        use_cache=True,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.update_rule = update_rule
        self.feature_map = feature_map
        self.dpfp_nu = dpfp_nu
        self.favor_features = favor_features
        self.favor_redraw = favor_redraw
        self.qk_norm = qk_norm
        self.qk_norm_eps = qk_norm_eps
        self.attention_normalization = attention_normalization
        self.use_beta = use_beta
        self.allow_neg_eigval = allow_neg_eigval
        self.use_gate = use_gate
        self.position_embedding = position_embedding
        self.rope_theta = rope_theta
        self.block_style = block_style
        self.use_output_norm = use_output_norm
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.dropout = dropout
        self.kernel_backend = kernel_backend
        self.chunk_size = chunk_size
        self.inference_segment_size = inference_segment_size
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings  # set again by PretrainedConfig; here so it is validated
        self._fill_defaults()
        self.validate_fields()
        self._check_special_tokens(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
        warn_unknown_keys(kwargs)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _check_special_tokens(self, **ids):
        """pad / bos / eos ids index the embedding: out of range they would silently pick another row (-1 is the
        last token) or fail deep inside the model."""
        for field, value in ids.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            for token in values:
                if token is None and not isinstance(value, (list, tuple)):
                    continue
                if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < self.vocab_size:
                    raise ValueError(f"FWPConfig.{field}={value!r} is not valid; it must be None or a token id in "
                                     f"[0, vocab_size={self.vocab_size}).")

    def _fill_defaults(self):
        # Only from integers (not bools: True would be read as 1); a bad value is named by validate_fields.
        if self.head_dim is None and _is_int(self.hidden_size) and _is_int(self.num_heads):
            if self.num_heads > 0 and self.hidden_size % self.num_heads != 0:
                raise ValueError(
                    f"FWPConfig: hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}) "
                    "when head_dim is not given; set head_dim explicitly or change num_heads."
                )
            self.head_dim = self.hidden_size // max(self.num_heads, 1)
        if self.intermediate_size is None and _is_int(self.hidden_size):
            if self.block_style == "pre_norm":
                self.intermediate_size = 256 * -(-int(8 * self.hidden_size / 3) // 256)
            else:
                self.intermediate_size = 4 * self.hidden_size
        if self.use_output_norm is None:
            self.use_output_norm = self.block_style == "pre_norm"

    def validate_fields(self):
        """Refuses every bad value or type with a ValueError that names the field and what is allowed. Run when the
        config is made, when a model is built from it (a field may have been set since) and when it is saved."""
        choices = {
            "update_rule": UPDATE_RULES,
            "feature_map": FEATURE_MAPS,
            "qk_norm": QK_NORMS,
            "position_embedding": POSITION_EMBEDDINGS,
            "block_style": BLOCK_STYLES,
            "kernel_backend": KERNEL_BACKENDS,
            "chunk_size": CHUNK_SIZES,
        }
        for field, allowed in choices.items():
            value = getattr(self, field)
            if type(value) is not type(allowed[0]) or value not in allowed:  # 64.0 and True are no chunk sizes
                raise ValueError(f"FWPConfig.{field}={value!r} is not valid; allowed values: {', '.join(map(repr, allowed))}.")
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim", "intermediate_size",
                    "dpfp_nu", "favor_features")
        for field in positive:
            value = getattr(self, field)
            if not _is_int(value) or value < 1:
                raise ValueError(f"FWPConfig.{field}={value!r} is not valid; it must be an integer >= 1.")
        if self.dpfp_nu >= 2 * self.head_dim:
            raise ValueError(
                f"FWPConfig.dpfp_nu={self.dpfp_nu} is not valid; DPFP allows 1 <= dpfp_nu <= {2 * self.head_dim - 1} "
                f"(2 * head_dim - 1) for head_dim={self.head_dim}."
            )
        if self.position_embedding == "rotary" and self.head_dim % 2:
            raise ValueError(f"FWPConfig.head_dim={self.head_dim} must be even with position_embedding='rotary'.")
        if self.position_embedding == "sinusoidal" and self.hidden_size % 2:
            raise ValueError(f"FWPConfig.hidden_size={self.hidden_size} must be even with position_embedding='sinusoidal'.")
        if not isinstance(self.inference_segment_size, int) or isinstance(self.inference_segment_size, bool) \
                or self.inference_segment_size < 0:
            raise ValueError(f"FWPConfig.inference_segment_size={self.inference_segment_size!r} is not valid; it must "
                             "be an integer >= 0 (0 turns segmenting off).")
        if not isinstance(self.conv_size, int) or isinstance(self.conv_size, bool) or self.conv_size < 2:
            raise ValueError(f"FWPConfig.conv_size={self.conv_size!r} is not valid; it must be an integer >= 2.")
        if not (isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
                and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"FWPConfig.dropout={self.dropout!r} is not valid; it must be a float in [0, 1).")
        for field in ("qk_norm_eps", "layer_norm_eps", "initializer_range", "rope_theta"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"FWPConfig.{field}={value!r} is not valid; it must be a finite number > 0.")
        # A string would be read as true ("no", "false"): use_cache would stay on, tie_word_embeddings tied.
        for field in ("favor_redraw", "attention_normalization", "use_beta", "allow_neg_eigval", "use_gate",
                      "use_output_norm", "use_short_conv", "use_cache", "tie_word_embeddings"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"FWPConfig.{field}={getattr(self, field)!r} is not valid; it must be True or False.")

    def validate(self):
        """What `save_pretrained` runs before writing (transformers' strict configs define it): a field set to a bad
        value after the config was made is refused there too, not written to config.json."""
        parent = getattr(super(), "validate", None)
        if parent is not None:
            parent()
        self.validate_fields()

    @property
    def key_dim(self) -> int:
        """Size of a key / query after the feature map: the rows of each head's fast-weight matrix."""
        if self.feature_map == "dpfp":
            return 2 * self.head_dim * self.dpfp_nu
        if self.feature_map == "favor":
            return 2 * self.favor_features
        return self.head_dim

    @property
    def state_size_per_layer(self) -> int:
        """Numbers held per layer and sequence: num_heads fast-weight matrices of key_dim x head_dim."""
        return self.num_heads * self.key_dim * self.head_dim


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def config_field_names() -> list[str]:
    """The fields FWPConfig itself defines (what presets and --config_overrides may set)."""
    return [name for name in inspect.signature(FWPConfig.__init__).parameters if name not in ("self", "kwargs")]


# Keys any transformers config (of this or another release) may carry besides a model's own fields.
GENERIC_CONFIG_KEYS = set(inspect.signature(PretrainedConfig.__init__).parameters) | {
    "architectures", "auto_map", "model_type", "transformers_version", "dtype", "torch_dtype", "output_attentions",
    "output_hidden_states", "return_dict", "use_return_dict", "attn_implementation", "num_labels", "id2label",
    "label2id", "problem_type", "tokenizer_class", "task_specific_params", "finetuning_task", "prefix", "is_decoder",
    "is_encoder_decoder", "add_cross_attention", "tie_encoder_decoder", "decoder_start_token_id", "sep_token_id",
    "chunk_size_feed_forward", "custom_pipelines", "torchscript", "pruned_heads", "cross_attention_hidden_size",
    "base_model_tp_plan", "base_model_pp_plan", "base_model_ep_plan", "trust_remote_code", "name_or_path",
    "experts_implementation", "per_layer_config", "quantization_config",
}


def warn_unknown_keys(kwargs: dict):
    """transformers configs keep unknown keys, so a typo in a config.json (`hiden_size`, `num_layers`) would silently
    change nothing: warn and name the closest field."""
    fields = config_field_names()
    for key in kwargs:
        if key.startswith("_") or key in GENERIC_CONFIG_KEYS:
            continue
        closest = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
        hint = f"; did you mean {closest[0]!r}?" if closest else f"; FWPConfig's fields are: {', '.join(fields)}."
        warnings.warn(f"FWPConfig: unknown key {key!r} is kept but not used by the model{hint}", UserWarning,
                      stacklevel=3)


__all__ = ["FWPConfig", "config_field_names"]
