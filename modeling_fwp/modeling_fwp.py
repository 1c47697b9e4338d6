"""Delta-rule Fast Weight Programmers (Schlag, Irie & Schmidhuber, ICML 2021) for Hugging Face Transformers.

A layer turns each token into a key, a value, a query and (delta rule) a learning rate beta, maps keys and queries
through a feature map phi, normalises them, and writes/reads a per-head fast-weight matrix with the update rule in
`ops.py`. This file holds the layers (norm, short convolution, the fast weight layer, feed-forward, block) and the
models, top to bottom. Beside it: the sequence layout and positions (`sequence_layout.py`: padding and packed
documents are unpadded, so a pad token never reaches the fast weights, the convolution tail or the positions), the
generation glue and captured decode step (`generation_fwp.py`), the input checks (`safeguards.py`) and the cache
(`cache_fwp.py`).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import can_return_tuple

from .cache_fwp import FWPCache
from .compat import CACHE_NAME, output_cache, resolve_cache_argument
from .configuration_fwp import FWPConfig
from .decode_triton import rule_step_
from .feature_maps import build_feature_map, normalize_qk
from .generation_fwp import FWPGenerationMixin
from .losses import causal_lm_loss
from .ops import delta_rule, sum_rule
from .safeguards import (check_attention_mask, check_inputs, check_keywords, file_stamps, give_umask_modes,
                         is_plain_linear, warn_non_finite_weights)
from .sequence_layout import (SequenceLayout, add_sinusoidal_positions, build_layout, cu_seqlens_from_position_ids,
                              rotary_embed, use_masked_layout)

try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover
    GradientCheckpointingLayer = nn.Module

try:  # fused Triton layer kernels; without triton every layer op runs in plain PyTorch (the reference)
    from .conv_triton import HAS_TRITON as HAS_FUSED_CONV
    from .conv_triton import short_conv_triton
    from .norm_triton import HAS_TRITON as HAS_FUSED_NORMS
    from .norm_triton import l2_norm_triton, rms_norm_triton, swiglu_linear_triton, swiglu_triton
except ImportError:  # pragma: no cover
    HAS_FUSED_CONV = HAS_FUSED_NORMS = False


FUSED_MIN_TOKENS = 64


def use_fused_kernels(x: torch.Tensor, config: FWPConfig) -> bool:
    """The Triton layer kernels (RMSNorm, l2 norm, SwiGLU, short convolution; `norm_triton.py`, `conv_triton.py`)
    run where the Triton update rule runs: CUDA tensors with kernel_backend "auto" or "triton". The "chunk" and
    "recurrent" backends keep every op in plain PyTorch, the reference the kernels are tested against. A decode
    step (few tokens, no gradient) also takes the PyTorch ops: it is bound by launch cost, and a Triton launch
    costs more host time than the few small aten kernels it replaces. Under torch.compile the PyTorch ops too: the
    compiler fuses them itself (only the update rule stays a Triton operator, `ops_triton_compile.py`)."""
    if torch.compiler.is_compiling():
        return False
    if not (x.is_cuda and x.dtype != torch.float64 and config.kernel_backend in ("auto", "triton")):
        return False
    return torch.is_grad_enabled() or x.numel() >= FUSED_MIN_TOKENS * x.shape[-1]


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the next matmul computes in: autocast's when it is on, so a norm can hand over its output already
    cast (the matmul would cast it anyway, at the price of another pass and a saved copy)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# ----------------------------------------------------------------------------------------------------------------------
# Small modules
# ----------------------------------------------------------------------------------------------------------------------
class FWPRMSNorm(nn.Module):
    """RMSNorm over the last dim in (at least) fp32. With a config whose backend allows it, CUDA inputs go through
    the fused Triton kernel (`norm_triton.rms_norm_triton`), which saves only x and the per-row scale for backward."""

    def __init__(self, dim: int, eps: float = 1e-6, config: FWPConfig | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.config = config

    def forward(self, x, out_dtype: torch.dtype | None = None, fused: bool | None = None):
        out_dtype = out_dtype or x.dtype
        if fused is None:  # the attention passes its own decision for the per-head norm (rows = tokens x heads)
            fused = self.config is not None and use_fused_kernels(x, self.config)
        if HAS_FUSED_NORMS and fused:
            return rms_norm_triton(x, self.weight, self.eps, out_dtype=out_dtype)
        dtype = torch.promote_types(x.dtype, torch.float32)
        x32 = x.to(dtype)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(dtype) * x32).to(out_dtype)


class ShortConvolution(nn.Module):
    """Causal depthwise convolution over time with SiLU. Each sequence sees only its own past tokens and, when
    decoding, its own cached tail of the last `kernel_size - 1` inputs."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.zeros(channels, kernel_size))

    def forward(self, x, cu_seqlens=None, tail=None, row_tokens=None):
        """`row_tokens` [B] (the masked layout: each row's real tokens first, then pads): the new tail is the last
        inputs before a row's pads instead of its last columns."""
        width = self.kernel_size - 1
        if cu_seqlens is None:
            if tail is None:
                tail = x.new_zeros(x.shape[0], width, x.shape[2])
            extended = torch.cat([tail.to(x.dtype), x], dim=1)
            if x.shape[1] == 1:  # a decode step: one dot product per channel, which compilers fuse with the SiLU
                acc = torch.promote_types(x.dtype, torch.float32)  # as conv1d accumulates
                y = (extended.to(acc) * self.weight.t().to(acc)).sum(1, keepdim=True).to(x.dtype)
            else:
                y = self._conv(extended)
            if row_tokens is not None:
                return F.silu(y), _tail_after(x, tail, row_tokens, width)
            return F.silu(y), extended[:, -width:].clone()  # a copy: a view would pin the whole input in the cache
        # Packed: give every sequence its own `width` tail slots, convolve the whole stream once, drop the slots.
        num_seqs = cu_seqlens.numel() - 1
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        token_seq = torch.repeat_interleave(torch.arange(num_seqs, device=x.device), lengths)
        token_slot = torch.arange(x.shape[1], device=x.device) + width * (token_seq + 1)
        tail_start = cu_seqlens[:-1].long() + width * torch.arange(num_seqs, device=x.device)
        tail_slot = (tail_start[:, None] + torch.arange(width, device=x.device)[None]).flatten()
        extended = x.new_zeros(1, x.shape[1] + width * num_seqs, x.shape[2])
        if tail is not None:
            extended[0, tail_slot] = tail.reshape(-1, x.shape[2]).to(x.dtype)
        extended[0, token_slot] = x[0]
        y = self._conv(extended)  # y[j] is the output for the input at slot j + width
        out = y[:, token_slot - width]
        end = tail_start + width + lengths  # one past each sequence's last slot
        new_tail = extended[0, (end[:, None] - width + torch.arange(width, device=x.device)[None]).flatten()]
        return F.silu(out), new_tail.view(num_seqs, width, x.shape[2])

    def forward_parts(self, parts, cu_seqlens=None, tail=None, fused=False, row_tokens=None):
        """Convolves `parts` (q, k, v: consecutive channel groups of this convolution) and returns them separately
        with the joint new tail. The fused path runs the Triton kernel per part, which reads a part in place even
        when it is a channel slice of one joint projection, so q, k and v are neither copied nor concatenated; the
        reference path concatenates and calls `forward`."""
        sizes = [part.shape[-1] for part in parts]
        if not (fused and HAS_FUSED_CONV) or (tail is not None and tail.requires_grad):
            y, new_tail = self.forward(torch.cat(parts, dim=-1), cu_seqlens, tail, row_tokens)
            return y.split(sizes, dim=-1), new_tail
        outputs, tails, start = [], [], 0
        for part, size in zip(parts, sizes):
            part_tail = None if tail is None else tail[..., start:start + size].contiguous()
            y, new_tail = short_conv_triton(part, self.weight[start:start + size], cu_seqlens, part_tail)
            if row_tokens is not None:
                new_tail = _tail_after(part, part_tail, row_tokens, self.kernel_size - 1)
            outputs.append(y)
            tails.append(new_tail)
            start += size
        return outputs, torch.cat(tails, dim=-1)

    def _conv(self, extended):
        weight = self.weight.to(extended.dtype).unsqueeze(1)  # [C, 1, k]
        return F.conv1d(extended.transpose(1, 2), weight, groups=weight.shape[0]).transpose(1, 2)


def _tail_after(x, tail, row_tokens, width):
    """The `width` inputs of the sequence [tail; x[b, :row_tokens[b]]] that end it, per row b: the convolution tail
    of a row whose pads follow its real tokens (zeros stand for a missing tail)."""
    index = row_tokens[:, None] + torch.arange(width, device=x.device)  # columns of [tail; x]
    expand = lambda i: i[..., None].expand(-1, -1, x.shape[2])  # noqa: E731
    from_x = x.gather(1, expand((index - width).clamp(min=0)))
    if tail is None:
        from_tail = torch.zeros((), dtype=x.dtype, device=x.device)
    else:
        from_tail = tail.to(x.dtype).gather(1, expand(index.clamp(max=width - 1)))
    return torch.where((index >= width)[..., None], from_x, from_tail)


# ----------------------------------------------------------------------------------------------------------------------
# The fast weight layer
# ----------------------------------------------------------------------------------------------------------------------
class FWPAttention(nn.Module):
    """One fast weight programmer layer: the slow projections program the per-head fast weights with the update rule
    (delta or sum), and the queries read them. Replaces softmax attention; its state has a fixed size."""

    def __init__(self, config: FWPConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, inner, bias=False)
        if config.update_rule == "delta" and config.use_beta:
            self.b_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)
        if config.use_short_conv:
            self.conv = ShortConvolution(3 * inner, config.conv_size)
        self.feature_map = build_feature_map(config.feature_map, self.head_dim, config.dpfp_nu, config.favor_features)
        if config.use_output_norm:
            self.o_norm = FWPRMSNorm(self.head_dim, eps=config.layer_norm_eps, config=config)
        if config.use_gate:
            self.g_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=False)

    def projection_modules(self) -> list[nn.Module]:
        """Every projection of x, in the order `forward` splits a `joint_weight` product."""
        extra = [self.b_proj] if hasattr(self, "b_proj") else []
        extra += [self.g_proj] if self.config.use_gate else []
        return [self.q_proj, self.k_proj, self.v_proj] + extra

    def _projections(self, x, joint_weight):
        """q, k, v, beta's logits and the gate's (None where unused). With `joint_weight` (the rows of
        `projection_weights()` concatenated: the captured decode step's copy) one matmul makes them all, instead of
        up to five small ones, each of which costs a launch at one token per row."""
        with_beta, with_gate = hasattr(self, "b_proj"), self.config.use_gate
        if joint_weight is None:
            return (self.q_proj(x), self.k_proj(x), self.v_proj(x), self.b_proj(x) if with_beta else None,
                    self.g_proj(x) if with_gate else None)
        sizes = [module.out_features for module in self.projection_modules()]
        parts = list(F.linear(x, joint_weight).split(sizes, dim=-1))
        gate = parts.pop() if with_gate else None
        beta = parts.pop() if with_beta else None
        return (*parts, beta, gate)

    def forward(self, x, layout: SequenceLayout, fast_weights=None, z=None, conv_tail=None, want_state=False,
                joint_weight=None):
        b, t, _ = x.shape
        cfg = self.config
        acc = torch.promote_types(x.dtype, torch.float32)  # beta and the normalisers never go below fp32
        fused = use_fused_kernels(x, cfg)
        q, k, v, beta_logits, gate_logits = self._projections(x, joint_weight)
        new_tail = None
        if cfg.use_short_conv:
            (q, k, v), new_tail = self.conv.forward_parts(
                [q, k, v], layout.cu_seqlens, conv_tail, fused, None if layout.order is None else layout.row_tokens)
        q, k, v = (y.view(b, t, self.num_heads, self.head_dim) for y in (q, k, v))
        if cfg.position_embedding == "rotary":
            q, k = rotary_embed(q, layout.positions, cfg.rope_theta), rotary_embed(k, layout.positions, cfg.rope_theta)
        q, k = self._normalize(self.feature_map(q), fused), self._normalize(self.feature_map(k), fused)
        k = layout.mask_tokens(k)  # after phi (phi(0) need not be 0): a pad's key writes nothing to S or z
        scale = self.head_dim ** -0.5  # the paper scales the read-out by 1/sqrt(d_head), whatever phi's size
        common = dict(cu_seqlens=layout.cu_seqlens, backend=layout.backend or cfg.kernel_backend, chunk_size=cfg.chunk_size)

        new_z = None
        if cfg.attention_normalization:
            q_denominator, k_denominator, new_z = self._z_denominators(q, k, z, want_state, common, acc)
        if cfg.update_rule == "delta":
            beta = torch.sigmoid(beta_logits.to(acc)) if cfg.use_beta else x.new_ones(b, t, self.num_heads, dtype=acc)
            if cfg.allow_neg_eigval:  # beta in (0, 2): I - beta k k^T may have a negative eigenvalue
                beta = 2.0 * beta
            beta = layout.mask_tokens(beta)
            if cfg.attention_normalization:
                # Normalised retrieval v_bar = S^T k / d with d = z_{t-1}.k_t (Eqs. 26-28; d = 1 at a sequence's first
                # token). u = beta (v - S^T k / d) = (beta / d) (d v - S^T k): the plain delta rule with those inputs.
                d = torch.where(layout.positions[..., None] == 0, torch.ones_like(k_denominator),
                                k_denominator + cfg.qk_norm_eps)
                beta, v = beta / d, v * d.to(v.dtype)[..., None]
        if layout.state_in_place:  # one token per row: fast_weights (a cache buffer) is written where it lies
            step_beta = beta[:, 0] if cfg.update_rule == "delta" else None
            o = rule_step_(q[:, 0], k[:, 0], v[:, 0], step_beta, fast_weights, scale)[:, None]
        elif cfg.update_rule == "delta":
            o, fast_weights = delta_rule(q, k, v, beta, scale=scale, initial_state=fast_weights,
                                         output_final_state=want_state, **common)
        else:
            o, fast_weights = sum_rule(q, k, v, scale=scale, initial_state=fast_weights,
                                       output_final_state=want_state, **common)
        if cfg.attention_normalization:
            o = (o.to(acc) / (q_denominator[..., None] + cfg.qk_norm_eps)).to(o.dtype)
        if cfg.use_gate:  # fla's FusedRMSNormGated order: norm, then * silu(g), in fp32 with one final rounding
            gate = F.silu(gate_logits.view(b, t, self.num_heads, self.head_dim).to(acc))
            normed = self.o_norm(o, out_dtype=acc, fused=fused) if cfg.use_output_norm else o.to(acc)
            o = (normed * gate).to(o.dtype)
        elif cfg.use_output_norm:
            o = self.o_norm(o, fused=fused)
        return self.o_proj(o.reshape(b, t, -1)), fast_weights, new_z, new_tail

    def _normalize(self, x, fused):
        if fused and HAS_FUSED_NORMS and self.config.qk_norm == "l2":
            return l2_norm_triton(x, self.config.qk_norm_eps)
        return normalize_qk(x, self.config.qk_norm, self.config.qk_norm_eps)

    @staticmethod
    def _z_denominators(q, k, z, want_state, common, acc):
        """z_t . q_t and z_{t-1} . k_t for the attention normalisation. z_t = z_0 + sum_{j<=t} k_j is a sum-rule fast
        weight whose value is the constant 1, so the same op (and its packing and cache handling) computes it."""
        ones = torch.ones(*k.shape[:-1], 1, dtype=k.dtype, device=k.device)
        z0 = None if z is None else z[..., None]
        both_q = torch.cat([q, k], dim=2)  # read with q and with k in one call
        both_k, both_ones = torch.cat([k, k], dim=2), torch.cat([ones, ones], dim=2)
        z0_both = None if z0 is None else torch.cat([z0, z0], dim=1)
        reads, z_state = sum_rule(both_q, both_k, both_ones, scale=1.0, initial_state=z0_both,
                                  output_final_state=want_state, **common)
        heads = q.shape[2]
        q_den = reads[:, :, :heads, 0].to(acc)
        k_den = reads[:, :, heads:, 0].to(acc) - (k.to(acc) ** 2).sum(-1)  # z_t.k_t - k_t.k_t = z_{t-1}.k_t
        new_z = None if z_state is None else z_state[:, :heads, :, 0]
        return q_den, k_den, new_z


class FWPFeedForward(nn.Module):
    """post_ln: the paper's Transformer-XL position-wise ReLU network; pre_norm: SwiGLU as in modern DeltaNet."""

    def __init__(self, config: FWPConfig):
        super().__init__()
        self.config = config
        self.gated = config.block_style == "pre_norm"
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=not self.gated)
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=not self.gated)
        self.dropout = nn.Dropout(config.dropout)

    def projection_modules(self) -> list[nn.Module]:
        """The input projections, in the order `forward` splits a `joint_weight` product (SwiGLU only)."""
        return [self.gate_proj, self.up_proj] if self.gated else []

    def forward(self, x, joint_weight=None):
        if not self.gated:
            hidden = F.relu(self.up_proj(x))
        else:  # joint_weight: the captured decode step's [gate; up] copy, one matmul instead of two
            gate, up = ((self.gate_proj(x), self.up_proj(x)) if joint_weight is None else
                        F.linear(x, joint_weight).chunk(2, dim=-1))
            if HAS_FUSED_NORMS and use_fused_kernels(x, self.config):
                if self._recompute_swiglu():
                    return swiglu_linear_triton(gate, up, self.down_proj.weight)
                hidden = swiglu_triton(gate, up)
            else:
                hidden = F.silu(gate) * up
        return self.down_proj(self.dropout(hidden))

    def _recompute_swiglu(self) -> bool:
        """Training with the fused kernels: SwiGLU and the down projection in one autograd op that recomputes
        silu(gate) * up in the backward instead of keeping it (the largest activation of the layer). Only where
        that is exactly `down_proj(dropout(hidden))`: a plain down_proj (not wrapped by PEFT, not hooked) and no
        active dropout."""
        return (torch.is_grad_enabled() and is_plain_linear(self.down_proj)
                and not (self.dropout.p > 0 and self.training))


class FWPBlock(GradientCheckpointingLayer):
    """A fast weight layer and a feed-forward network, with post-LayerNorm (the paper) or pre-RMSNorm residuals.

    The states go in and come out as plain tensors (the model writes them to the cache), so gradient checkpointing
    can recompute the block without touching the cache."""

    def __init__(self, config: FWPConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = config.block_style == "pre_norm"
        self.attn = FWPAttention(config, layer_idx)
        self.mlp = FWPFeedForward(config)
        if self.pre_norm:
            self.attn_norm = FWPRMSNorm(config.hidden_size, eps=config.layer_norm_eps, config=config)
            self.mlp_norm = FWPRMSNorm(config.hidden_size, eps=config.layer_norm_eps, config=config)
        else:
            self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden, layout=None, fast_weights=None, z=None, conv_tail=None, want_state=False,
                joint_weights=(None, None)):
        """`joint_weights`: the captured decode step's concatenated projection weights (attention, feed-forward)."""
        attn_weight, mlp_weight = joint_weights
        if self.pre_norm:  # the normed copies only feed matmuls: hand them over in the matmul's dtype
            normed = self.attn_norm(hidden, out_dtype=matmul_dtype(hidden))
            out, fast_weights, z, conv_tail = self.attn(normed, layout, fast_weights, z, conv_tail, want_state,
                                                        attn_weight)
            hidden = hidden + self.dropout(out)
            hidden = hidden + self.dropout(self.mlp(self.mlp_norm(hidden, out_dtype=matmul_dtype(hidden)), mlp_weight))
        else:
            out, fast_weights, z, conv_tail = self.attn(hidden, layout, fast_weights, z, conv_tail, want_state,
                                                        attn_weight)
            hidden = self.attn_norm(hidden + self.dropout(out))
            hidden = self.mlp_norm(hidden + self.dropout(self.mlp(hidden, mlp_weight)))
        return hidden, fast_weights, z, conv_tail


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------
class FWPPreTrainedModel(PreTrainedModel):
    config_class = FWPConfig
    config: FWPConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["FWPBlock"]
    _is_stateful = True
    _supports_cache_class = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ShortConvolution) and not getattr(module.weight, "_is_hf_initialized", False):
            # Start as (almost) the identity on the current token so q, k, v keep their scale. (Skipped for weights
            # that were loaded, which transformers flags.)
            with torch.no_grad():
                module.weight.normal_(0.0, self.config.initializer_range)
                module.weight[:, -1] += 1.0

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own FWPCache

    def save_pretrained(self, save_directory, *args, **kwargs):
        # transformers' auto_map records only the class being saved; a causal-LM folder should also load as the base
        # model (AutoModel, with trust_remote_code), as in-tree models do through their mappings. FWPModel lives in
        # the same code file that travels with the weights.
        if getattr(self, "_auto_class", None) is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": "modeling_fwp.FWPModel"}
        before = file_stamps(save_directory)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        give_umask_modes(save_directory, only_changed_since=before)  # safetensors writes 0600 whatever the umask
        return result

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)  # (model, loading_info) with output_loading_info=True
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        warn_non_finite_weights(loaded[0] if isinstance(loaded, tuple) else loaded, source)
        return loaded


class FWPModel(FWPPreTrainedModel):
    def __init__(self, config: FWPConfig):
        config.validate_fields()  # again: a field set after the config was made (config.num_heads = 0) is checked here
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([FWPBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = (FWPRMSNorm(config.hidden_size, config.layer_norm_eps, config=config)
                     if config.block_style == "pre_norm" else None)
        self.gradient_checkpointing = False
        self._favor_draws = 0
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @torch.compiler.disable
    def _redraw_random_features(self):
        """FAVOR+ draws a new random matrix for every training batch (PAPER.md 1d). The draw is seeded by a counter so
        every data-parallel replica draws the same matrix. Under torch.compile it runs outside the graph (a graph
        cannot create the seeded generator): one graph break per training forward with the redraw on, so
        fullgraph=True needs favor_redraw=False or eval mode."""
        self._favor_draws += 1
        for layer in self.layers:
            generator = torch.Generator().manual_seed(1_000_003 * self._favor_draws + layer.attn.layer_idx)
            layer.attn.feature_map.redraw(generator)

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, cu_seqlens=None, cu_seq_lens_q=None,
                keep_last_hidden: int = 0, past_key_values=None, **kwargs):
        r"""
        cache / past_key_values (`FWPCache`, *optional*):
            The fast-weight state to continue from; it is updated in place. transformers 5.24 renamed the argument
            `past_key_values` to `cache`: both names are accepted on every supported release (not both at once).
        keep_last_hidden (`int`, *optional*, defaults to 0):
            When > 0, `last_hidden_state` holds only the last `keep_last_hidden` positions (the causal LM passes
            `logits_to_keep`). With the segmented inference forward this keeps a long prompt's memory independent of
            its length: only one segment's activations exist at a time.
        """
        check_keywords(self.forward, kwargs)
        check_attention_mask(attention_mask)
        past_key_values = resolve_cache_argument(cache, past_key_values)
        attention_mask = check_inputs(self.config, input_ids, inputs_embeds, attention_mask, past_key_values)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        batch_size, seq_len = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = FWPCache(config=self.config)
        # A graph (torch.compile / torch.export) runs the whole input: no branch on a dynamic length.
        segment = 0 if torch.compiler.is_compiling() else self.config.inference_segment_size
        packed = cu_seqlens is not None or cu_seq_lens_q is not None or (
            position_ids is not None and batch_size == 1 and attention_mask is None
            and cu_seqlens_from_position_ids(position_ids) is not None)
        if segment and seq_len > segment and not torch.is_grad_enabled() and not packed:
            return self._forward_in_segments(input_ids, inputs_embeds, attention_mask, past_key_values, use_cache,
                                             output_hidden_states, segment, keep_last_hidden)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if self.training and torch.is_grad_enabled() and self.config.feature_map == "favor" and self.config.favor_redraw:
            self._redraw_random_features()

        layout = build_layout(batch_size, seq_len, inputs_embeds.device, attention_mask,
                              cu_seqlens if cu_seqlens is not None else cu_seq_lens_q, position_ids,
                              past_key_values.row_tokens(0) if past_key_values is not None else None,
                              masked=attention_mask is not None and use_masked_layout(attention_mask))
        num_rows = layout.row_tokens.numel()
        if past_key_values is not None and past_key_values.batch_size not in (-1, num_rows):
            raise ValueError(f"The cache (past_key_values) holds {past_key_values.batch_size} sequences but this input "
                             f"has {num_rows}.")

        hidden = self.dropout(add_sinusoidal_positions(layout.pack(inputs_embeds), layout.positions, self.config))
        all_hidden = [] if output_hidden_states else None
        new_states = []
        for idx, block in enumerate(self.layers):
            if output_hidden_states:  # the returned copy is what the next layer reads, so it stays in the graph
                all_hidden.append(layout.unpack(hidden))
                hidden = layout.pack(all_hidden[-1])
            state = past_key_values[idx] if past_key_values is not None else None
            hidden, fast_weights, z, conv_tail = block(
                hidden, layout=layout, want_state=past_key_values is not None,
                fast_weights=state.fast_weights if state else None, z=state.z if state else None,
                conv_tail=state.conv_tail if state else None,
            )
            new_states.append((fast_weights, z, conv_tail))
        if past_key_values is not None:  # commit only once every layer ran: a failed forward leaves the cache intact
            for idx, (fast_weights, z, conv_tail) in enumerate(new_states):
                past_key_values.write(idx, fast_weights, z, conv_tail, seq_len, layout.row_tokens)
        if self.norm is not None:
            hidden = self.norm(hidden)
        hidden = layout.unpack(hidden)
        if output_hidden_states:  # the last entry is the final (normed) output, as in transformers' models
            all_hidden.append(hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden[:, -keep_last_hidden:] if keep_last_hidden > 0 else hidden,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            **{CACHE_NAME: past_key_values if use_cache else None},
        )


    def _forward_in_segments(self, input_ids, inputs_embeds, attention_mask, cache, use_cache, output_hidden_states,
                             segment, keep_last_hidden):
        """A long inference forward as consecutive segments that carry the state: the same result as one forward,
        with activation memory bounded by the segment instead of the prompt. Tokens are embedded segment by
        segment, and with `keep_last_hidden` only the last positions are kept, so nothing grows with the prompt."""
        cache = cache if cache is not None else FWPCache(config=self.config)
        inputs = input_ids if inputs_embeds is None else inputs_embeds
        kept, hidden_states = [], []
        before = cache.snapshot()  # a segment that fails must not leave the earlier ones committed
        try:
            for start in range(0, inputs.shape[1], segment):
                part = slice(start, start + segment)
                out = self.forward(
                    input_ids=None if input_ids is None else input_ids[:, part],
                    inputs_embeds=None if inputs_embeds is None else inputs_embeds[:, part],
                    attention_mask=None if attention_mask is None else attention_mask[:, part],
                    cache=cache, use_cache=True, output_hidden_states=output_hidden_states, return_dict=True,
                )
                kept.append(out.last_hidden_state)
                if keep_last_hidden > 0:  # only the tail that can still be among the last positions
                    kept = [torch.cat(kept, dim=1)[:, -keep_last_hidden:]]
                hidden_states.append(out.hidden_states)
        except BaseException:
            cache.restore(before)
            raise
        if output_hidden_states:
            hidden_states = tuple(torch.cat(layer, dim=1) for layer in zip(*hidden_states))
        return BaseModelOutputWithPast(
            last_hidden_state=torch.cat(kept, dim=1),
            hidden_states=hidden_states if output_hidden_states else None,
            **{CACHE_NAME: cache if use_cache else None},
        )


class FWPForCausalLM(FWPGenerationMixin, FWPPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _can_compile_fullgraph = True  # the decode step over an FWPStaticCache (get_compiled_call)

    def __init__(self, config: FWPConfig):
        super().__init__(config)
        self.model = FWPModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def push_to_hub(self, repo_id, card_kwargs=None, **kwargs):
        """Uploads like `PreTrainedModel.push_to_hub`, with the FWP model card (variant, state size, paper) instead of
        the generic one; `card_kwargs` go to `modeling_fwp.hub_card.render_model_card` (e.g. `run_dir=output_dir`)."""
        try:  # absolute and guarded: a relative import would ship hub_card.py to the Hub with the model code
            from modeling_fwp.hub_card import push_to_hub_with_card
        except ImportError:  # loaded as remote code without the package: transformers' own card
            return super().push_to_hub(repo_id, **kwargs)
        return push_to_hub_with_card(self, repo_id, card_kwargs=card_kwargs, **kwargs)

    def set_output_embeddings(self, value):
        self.lm_head = value

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, output_hidden_states=None, logits_to_keep=0, cu_seqlens=None,
                cu_seq_lens_q=None, past_key_values=None, num_items_in_batch=None, **kwargs):
        r"""
        cache / past_key_values (`FWPCache`, *optional*):
            The fast-weight state to continue from (updated in place); either name, as in `FWPModel.forward`.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets (shifted inside the model); -100 is ignored. `num_items_in_batch` (a kwarg the Trainer
            passes) makes the loss a sum divided by it, so gradient accumulation is exact. The loss is computed in
            fp32 without a full fp32 copy of the logits (`losses.causal_lm_loss`: fused Triton kernels on CUDA,
            chunk by chunk in PyTorch elsewhere).
        shift_labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*, a keyword argument):
            Targets already aligned with the logits (sequence / context-parallel training passes them); used instead
            of shifting `labels`.
        cu_seqlens / cu_seq_lens_q (`torch.IntTensor`, *optional*):
            Boundaries of packed documents in a batch of one row; no state crosses a boundary. Packed position_ids
            that restart at 0 (transformers' `DataCollatorWithFlattening`) are understood too.
        position_ids (`torch.LongTensor`, *optional*):
            Only read to find packed documents. Positions (rotary / sinusoidal) are counted per sequence from the
            cache and the attention_mask, so they stay exact under padding, chunked prefill and continuation.
        """
        # Read from kwargs, as in transformers' models: a `*label*` parameter in the signature would make the Trainer
        # treat it as a required label column.
        shift_labels = kwargs.pop("shift_labels", None)
        check_keywords(self.forward, kwargs)
        with_loss = labels is not None or shift_labels is not None
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_hidden_states=output_hidden_states, cu_seqlens=cu_seqlens, cu_seq_lens_q=cu_seq_lens_q,
            keep_last_hidden=logits_to_keep if isinstance(logits_to_keep, int) and not with_loss else 0,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if with_loss:
            loss = causal_lm_loss(logits, labels, num_items_in_batch=num_items_in_batch, shift_labels=shift_labels)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{CACHE_NAME: output_cache(outputs)}
        )


__all__ = ["FWPPreTrainedModel", "FWPModel", "FWPForCausalLM", "FWPCache", "SequenceLayout"]
