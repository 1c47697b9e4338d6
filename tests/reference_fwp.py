"""An independent float64 reference of FWPForCausalLM, written from /work/shared/PAPER.md.

It shares no code with `modeling_fwp`: it reads only a built model's weights (`state_dict()` names) and its config
fields, and recomputes the logits of ONE unpadded sequence with plain loops over its tokens. The backends are
tested against each other elsewhere; this checks what they all share (feature maps, normalisations, the layer).

Conventions the project chose, mirrored here (PAPER.md section numbers in brackets):
- Per head the fast weight is W in R^{d_value x d_dot} (paper orientation, [0]); W_0 = 0, z_0 = 0.
- Order in a layer: q, k, v projections -> optional short causal depthwise conv + SiLU on [q; k; v] -> rotary on
  q, k -> phi -> qk normalisation (sum or l2, with qk_norm_eps inside the denominator) -> update rule [1d, 5].
- Delta rule: v_bar = W_{t-1} phi(k_t); W_t = W_{t-1} + beta_t (v_t - v_bar) phi(k_t)^T; y_t = W_t phi(q_t)
  [1b], with beta_t = sigmoid(w_beta . x_t) per head (1 with use_beta=False), doubled with allow_neg_eigval (fla's
  option, beyond the paper). Sum rule: W_t = W_{t-1} + v_t phi(k_t)^T.
- Every read-out is scaled by 1/sqrt(head_dim), whatever phi's size [1c].
- Attention normalisation [1c, Eqs. 26-28]: z_t = z_{t-1} + phi(k_t); the output is
  y_t = (W_t phi(q_t) / sqrt(head_dim)) / (z_t . phi(q_t) + eps), eps = qk_norm_eps added after the scale. With
  the delta rule the retrieval is normalised too, v_bar = W_{t-1} phi(k_t) / (z_{t-1} . phi(k_t) + eps) (types
  44-46), and v_bar = 0 at a sequence's first token. (The model sets that denominator to 1 there instead; since
  W_0 = 0 the retrieval is 0 either way.)
- FAVOR+ [1d]: phi(x) = ([exp(Rx - |x|^2/2), exp(-Rx - |x|^2/2)] + 1e-4) / sqrt(2m), R the model's saved buffer
  `feature_map.projection` [m, head_dim] (the 1e-4 is the official LM code's).
- Rotary rotates pairs (i, i + d/2) by position * theta^(-2i/d); sinusoidal adds [sin(p w_i), cos(p w_i)] with
  w_i = theta^(-2i/D) to the embeddings. Positions count the sequence's tokens from 0.
- Blocks: post_ln (paper): h = LN(h + attn(h)); h = LN(h + FFN_relu(h)), FFN with biases, no final norm.
  pre_norm: h = h + attn(RMS(h)); h = h + SwiGLU(RMS(h)), no biases, final RMSNorm. The per-head output RMSNorm
  (weight shared by the heads) comes after the attention normalisation, before o_proj. use_gate (fla's output
  gate, beyond the paper) then multiplies each read-out channel by silu(w_g . x_t), x_t the layer's input.
"""

import math

import torch


# ------------------------------------------------------------------------------------------------ elementwise maths
def sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))


def silu(x):
    return x * sigmoid(x)


def relu(x):
    return torch.where(x > 0, x, torch.zeros_like(x))


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as LayerNorm
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def rms_norm(x, weight, eps):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * weight


# ------------------------------------------------------------------------------------------------ feature maps
def feature_map(x, config, projection=None):
    """phi of one head's key or query x [head_dim] (PAPER.md 1d)."""
    name = config.feature_map
    if name == "elu_plus_one":  # Eq. 30: x + 1 for x > 0, exp(x) otherwise
        return torch.where(x > 0, x + 1.0, torch.exp(torch.minimum(x, torch.zeros_like(x))))
    if name == "dpfp":  # Eqs. 33-37: r = [relu(x), relu(-x)], then r_i r_{(i-j) mod 2d} for the shifts j = 1..nu
        r = torch.cat([relu(x), relu(-x)])
        i = torch.arange(r.numel())
        return torch.cat([r * r[(i - j) % r.numel()] for j in range(1, config.dpfp_nu + 1)])
    if name == "favor":  # Eqs. 31-32 with the LM code's + 1e-4
        u = projection @ x
        half_sq = 0.5 * (x @ x)
        features = torch.cat([torch.exp(u - half_sq), torch.exp(-u - half_sq)]) + 1e-4
        return features / math.sqrt(features.numel())  # 1/sqrt(2m)
    if name == "silu":
        return silu(x)
    if name == "relu":
        return relu(x)
    assert name == "identity", name
    return x


def normalize(x, config):
    """Eq. 29 (sum) or unit L2 norm, eps inside the denominator."""
    if config.qk_norm == "sum":
        return x / (x.sum() + config.qk_norm_eps)
    if config.qk_norm == "l2":
        return x / torch.sqrt((x**2).sum() + config.qk_norm_eps)
    assert config.qk_norm == "none", config.qk_norm
    return x


# ------------------------------------------------------------------------------------------------ positions
def inverse_frequencies(dim, theta):
    return torch.tensor([theta ** (-2.0 * i / dim) for i in range(dim // 2)], dtype=torch.float64)


def rotary(x, position, theta):
    """Rotates each pair (x_i, x_{i+d/2}) by the angle position * theta^(-2i/d)."""
    half = x.numel() // 2
    angle = position * inverse_frequencies(x.numel(), theta)
    a, b = x[:half], x[half:]
    return torch.cat([a * torch.cos(angle) - b * torch.sin(angle), a * torch.sin(angle) + b * torch.cos(angle)])


def sinusoidal(position, dim, theta):
    angle = position * inverse_frequencies(dim, theta)
    return torch.cat([torch.sin(angle), torch.cos(angle)])


# ------------------------------------------------------------------------------------------------ the layer
def short_conv(x, weight):
    """Causal depthwise convolution + SiLU over x [T, C]; weight [C, K], its last tap on the current token."""
    taps = weight.shape[1]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(taps):  # tap j sees the token taps - 1 - j steps back (zeros before the sequence)
            s = t - (taps - 1 - j)
            if s >= 0:
                out[t] = out[t] + weight[:, j] * x[s]
    return silu(out)


def fast_weight_layer(x, w, config):
    """One FWP layer on one sequence x [T, D]; `w` maps this layer's parameter names (after `attn.`) to tensors."""
    heads, d = config.num_heads, config.head_dim
    q, k, v = x @ w["q_proj.weight"].T, x @ w["k_proj.weight"].T, x @ w["v_proj.weight"].T
    if config.use_short_conv:
        qkv = short_conv(torch.cat([q, k, v], dim=-1), w["conv.weight"])
        q, k, v = qkv.split(heads * d, dim=-1)
    delta = config.update_rule == "delta"
    if delta and config.use_beta:
        beta = sigmoid(x @ w["b_proj.weight"].T)  # [T, H]
    else:
        beta = torch.ones(x.shape[0], heads, dtype=x.dtype)
    if config.allow_neg_eigval:
        beta = 2.0 * beta
    projection = w.get("feature_map.projection")
    eps = config.qk_norm_eps
    outputs = torch.zeros(x.shape[0], heads, d, dtype=x.dtype)
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        W, z = None, None
        for t in range(x.shape[0]):
            q_t, k_t, v_t = q[t, cols], k[t, cols], v[t, cols]
            if config.position_embedding == "rotary":
                q_t, k_t = rotary(q_t, t, config.rope_theta), rotary(k_t, t, config.rope_theta)
            phi_q = normalize(feature_map(q_t, config, projection), config)
            phi_k = normalize(feature_map(k_t, config, projection), config)
            if W is None:
                W = torch.zeros(d, phi_k.numel(), dtype=x.dtype)
                z = torch.zeros(phi_k.numel(), dtype=x.dtype)
            if delta:
                v_bar = W @ phi_k  # retrieve with the old memory, before writing
                if config.attention_normalization:
                    v_bar = v_bar / (z @ phi_k + eps) if t > 0 else torch.zeros_like(v_bar)  # z_{t-1}
                W = W + beta[t, h] * torch.outer(v_t - v_bar, phi_k)
            else:
                W = W + torch.outer(v_t, phi_k)
            z = z + phi_k  # now z_t
            y = (W @ phi_q) / math.sqrt(d)  # read after the write
            if config.attention_normalization:
                y = y / (z @ phi_q + eps)
            outputs[t, h] = y
    if config.use_output_norm:
        outputs = rms_norm(outputs, w["o_norm.weight"], config.layer_norm_eps)
    if config.use_gate:
        outputs = outputs * silu(x @ w["g_proj.weight"].T).reshape(x.shape[0], heads, d)
    return outputs.reshape(x.shape[0], heads * d) @ w["o_proj.weight"].T


def feed_forward(x, w, config):
    if config.block_style == "pre_norm":  # SwiGLU, no biases
        return (silu(x @ w["gate_proj.weight"].T) * (x @ w["up_proj.weight"].T)) @ w["down_proj.weight"].T
    hidden = relu(x @ w["up_proj.weight"].T + w["up_proj.bias"])
    return hidden @ w["down_proj.weight"].T + w["down_proj.bias"]


def sub(weights, prefix):
    return {name[len(prefix):]: value for name, value in weights.items() if name.startswith(prefix)}


def reference_logits(weights, config, input_ids):
    """Logits [T, vocab] of one unpadded sequence `input_ids` [T]. `weights` is an FWPForCausalLM state_dict (any
    dtype; computed in float64)."""
    weights = {name: value.detach().to(torch.float64) for name, value in weights.items()}
    ids = [int(i) for i in input_ids]
    hidden = torch.stack([weights["model.embed_tokens.weight"][i] for i in ids])
    if config.position_embedding == "sinusoidal":
        hidden = hidden + torch.stack([sinusoidal(t, config.hidden_size, config.rope_theta) for t in range(len(ids))])
    eps = config.layer_norm_eps
    for layer in range(config.num_hidden_layers):
        w = sub(weights, f"model.layers.{layer}.")
        attn = sub(w, "attn.")
        if config.block_style == "pre_norm":
            hidden = hidden + fast_weight_layer(rms_norm(hidden, w["attn_norm.weight"], eps), attn, config)
            hidden = hidden + feed_forward(rms_norm(hidden, w["mlp_norm.weight"], eps), sub(w, "mlp."), config)
        else:
            hidden = layer_norm(hidden + fast_weight_layer(hidden, attn, config), w["attn_norm.weight"],
                                w["attn_norm.bias"], eps)
            hidden = layer_norm(hidden + feed_forward(hidden, sub(w, "mlp."), config), w["mlp_norm.weight"],
                                w["mlp_norm.bias"], eps)
    if config.block_style == "pre_norm":
        hidden = rms_norm(hidden, weights["model.norm.weight"], eps)
    head = weights["model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]
    return hidden @ head.T
