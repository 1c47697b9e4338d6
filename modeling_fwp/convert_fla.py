"""Converts a DeltaNet checkpoint of flash-linear-attention (fla 0.6.0's `DeltaNetForCausalLM`, model_type
"delta_net") into an FWP folder that loads with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.

Reads config.json and the safetensors weights (one file or a sharded index) without importing fla. Not imported by the
model code. fla's layer (fla/layers/delta_net.py) in this package's terms, which is what the mapping rests on:

    q, k, v = q_proj x, k_proj x, v_proj x, each through its own causal depthwise conv with SiLU ([C, 1, K] weights;
        ours is one conv over [q; k; v] with [3C, K] weights), so phi is the identity (the conv's SiLU is fla's
        qk_activation "silu"); without the conv fla still applies SiLU to q, k and v: a conv of size 2 that passes
        the current token through keeps exactly that
    q, k l2-normalised in the kernel (x / sqrt(sum x^2 + 1e-6)); beta = sigmoid(b_proj x), doubled with
        allow_neg_eigval, 1 without use_beta; the delta rule with scale 1/sqrt(head_dim)
    o = RMSNorm(o) per head, always (fla 0.6.0's layer ignores use_output_norm), times silu(g_proj x) with use_gate
    blocks: x + attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)) (GatedMLP gate_proj / up_proj / down_proj), final norm

What cannot be expressed is refused with a ValueError that names the option (see `fwp_config_fields`).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .configuration_fwp import GENERIC_CONFIG_KEYS, FWPConfig
from .files import install_folder, temporary_sibling
from .modeling_fwp import FWPForCausalLM

# fla 0.6.0's DeltaNetConfig defaults, for keys a hand-written config.json leaves out.
FLA_DEFAULTS = {
    "attn_mode": "chunk", "hidden_size": 2048, "expand_k": 1.0, "expand_v": 1.0, "use_gate": False,
    "use_short_conv": True, "allow_neg_eigval": False, "conv_size": 4, "use_beta": True, "use_output_norm": True,
    "num_heads": 16, "qk_norm": "l2", "qk_activation": "silu", "max_position_embeddings": 2048, "hidden_ratio": 4,
    "intermediate_size": None, "hidden_act": "swish", "num_hidden_layers": 24, "norm_eps": 1e-6, "attn": None,
    "use_cache": True, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    "initializer_range": 0.02, "fuse_norm": True, "fuse_swiglu": True, "fuse_cross_entropy": True,
    "fuse_linear_cross_entropy": False, "use_l2warp": False, "vocab_size": 32000, "attnres_block_size": None,
}
FLA_L2_EPS = 1e-6  # fla's l2norm_fwd default, used by use_qk_l2norm_in_kernel
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                      "spiece.model", "chat_template.*", "generation_config.json")


def fwp_config_fields(fla: dict, ignore_keys=()) -> dict:
    """FWPConfig keyword arguments for an fla DeltaNet config.json; every option that cannot be expressed is named."""
    if fla.get("model_type") != "delta_net":
        raise ValueError(f"model_type={fla.get('model_type')!r}: only fla's DeltaNet (model_type 'delta_net') can be "
                         "converted.")
    c = {**FLA_DEFAULTS, **fla}
    problems = []
    unknown = sorted(set(fla) - set(FLA_DEFAULTS) - GENERIC_CONFIG_KEYS - set(ignore_keys))
    if unknown:
        problems.append(f"{', '.join(unknown)}: not options of fla 0.6.0's DeltaNetConfig (an older release's option "
                        "may change the maths; pass ignore_keys / --ignore-key to convert anyway)")
    if c["attn"] is not None:
        problems.append(f"attn={c['attn']!r}: hybrid layers of softmax attention cannot be expressed")
    if c["attnres_block_size"] is not None:
        problems.append(f"attnres_block_size={c['attnres_block_size']!r}: attention residuals cannot be expressed")
    if c["hidden_act"] != "swish":
        problems.append(f"hidden_act={c['hidden_act']!r}: only the SwiGLU feed-forward ('swish') can be expressed")
    if c["qk_activation"] != "silu":
        problems.append(f"qk_activation={c['qk_activation']!r}: fla then applies it to q, k without SiLU (their short "
                        "convolution has no activation) and still applies SiLU to v; this layer's short convolution "
                        "applies SiLU to q, k and v alike, so only qk_activation='silu' can be expressed")
    if c["qk_norm"] != "l2":
        problems.append(f"qk_norm={c['qk_norm']!r}: fla's 'sum' divides by the L1 norm clamped at 1e-6, which is not "
                        "this layer's sum normalisation for SiLU features (they can be negative)")
    key_dim, value_dim = c["hidden_size"] * c["expand_k"], c["hidden_size"] * c["expand_v"]
    if not math.isclose(key_dim, value_dim):
        problems.append(f"expand_k={c['expand_k']}, expand_v={c['expand_v']}: key size {key_dim:g} != value size "
                        f"{value_dim:g}; this layer has one head_dim for keys and values")
    elif not math.isclose(key_dim, round(key_dim)) or round(key_dim) % c["num_heads"]:
        problems.append(f"expand_k={c['expand_k']}: hidden_size * expand_k = {key_dim:g} is not a multiple of "
                        f"num_heads={c['num_heads']}")
    if problems:
        raise ValueError("Cannot convert this fla DeltaNet: " + "; ".join(problems) + ".")
    intermediate = c["intermediate_size"]
    if intermediate is None:  # fla's GatedMLP: 2/3 * hidden_ratio * hidden_size, rounded up to a multiple of 256
        intermediate = 256 * -(-int(c["hidden_size"] * (c["hidden_ratio"] or 4) * 2 / 3) // 256)
    return dict(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_hidden_layers=c["num_hidden_layers"],
        num_heads=c["num_heads"], head_dim=round(key_dim) // c["num_heads"], intermediate_size=intermediate,
        update_rule="delta", feature_map="identity", qk_norm="l2", qk_norm_eps=FLA_L2_EPS, use_beta=c["use_beta"],
        allow_neg_eigval=c["allow_neg_eigval"], use_gate=c["use_gate"], block_style="pre_norm", use_output_norm=True,
        use_short_conv=True, conv_size=max(c["conv_size"], 2) if c["use_short_conv"] else 2,
        position_embedding="none", layer_norm_eps=c["norm_eps"], initializer_range=c["initializer_range"],
        tie_word_embeddings=c["tie_word_embeddings"], use_cache=c["use_cache"], pad_token_id=c["pad_token_id"],
        bos_token_id=c["bos_token_id"], eos_token_id=c["eos_token_id"],
    )


def read_safetensors(folder: Path) -> dict:
    """Every tensor of model.safetensors, or of the shards a model.safetensors.index.json names."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".safetensors"))
        raise ValueError(f"{folder} has no model.safetensors or model.safetensors.index.json (found: {found or 'none'})"
                         "; re-save the fla model with save_pretrained (safetensors) first.")
    weights = {}
    for name in files:
        weights.update(load_file(str(folder / name)))
    return weights


def convert_weights(weights: dict, fla: dict, fields: dict) -> dict:
    """fla's tensors under this package's names; a tensor left over or missing is an error."""
    left, missing, out = dict(weights), [], {}

    def take(name):
        if name not in left:
            missing.append(name)
            return None
        return left.pop(name)

    c = {**FLA_DEFAULTS, **fla}
    out["model.embed_tokens.weight"] = take("model.embeddings.weight")
    out["model.norm.weight"] = take("model.norm.weight")
    same = ["attn_norm.weight", "mlp_norm.weight", "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
            "attn.o_norm.weight", "attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
            "mlp.down_proj.weight"] + ["attn.b_proj.weight"] * c["use_beta"] + ["attn.g_proj.weight"] * c["use_gate"]
    channels = fields["num_heads"] * fields["head_dim"]
    for layer in range(fields["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        out.update({prefix + name: take(prefix + name) for name in same})
        if c["use_short_conv"]:
            parts = [take(f"{prefix}attn.{part}_conv1d.weight") for part in "qkv"]
            if None not in parts:  # [C, 1, K] each -> [3C, K]; a leading zero tap brings K = 1 up to our minimum 2
                conv = torch.cat([part.squeeze(1) for part in parts])
                out[prefix + "attn.conv.weight"] = F.pad(conv, (fields["conv_size"] - conv.shape[1], 0))
        else:  # no conv in fla, but SiLU on q, k, v all the same: a size-2 conv that passes the current token through
            out[prefix + "attn.conv.weight"] = torch.stack([torch.zeros(3 * channels), torch.ones(3 * channels)], 1)
    head = left.pop("lm_head.weight", None) if c["tie_word_embeddings"] else take("lm_head.weight")
    if c["tie_word_embeddings"] and head is not None and not torch.equal(head, out["model.embed_tokens.weight"]):
        raise ValueError("tie_word_embeddings is true but the checkpoint's lm_head.weight differs from its embeddings.")
    if not c["tie_word_embeddings"]:
        out["lm_head.weight"] = head
    if missing or left:
        raise ValueError(f"The weights do not match the config: missing {sorted(missing) or 'none'}; not mapped "
                         f"{sorted(left) or 'none'}.")
    return out


def convert_fla(src_folder, out_folder, ignore_keys=()) -> Path:
    """Writes the FWP version of the fla DeltaNet folder `src_folder` to `out_folder` (config with auto_map and the
    model code, weights in safetensors, the tokenizer files); the folder appears complete or not at all."""
    src, out = Path(src_folder), Path(out_folder)
    fla = json.loads((src / "config.json").read_text())
    fields = fwp_config_fields(fla, ignore_keys)
    weights = convert_weights(read_safetensors(src), fla, fields)
    dtype = weights["model.embed_tokens.weight"].dtype  # one dtype for all (fla keeps o_norm in fp32 at init)
    with torch.device("meta"):
        model = FWPForCausalLM(FWPConfig(**fields))
    if fields["tie_word_embeddings"]:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert set(expected) == set(weights), set(expected) ^ set(weights)  # convert_weights names what the model has
    wrong = [f"{name} {tuple(weights[name].shape)} (expected {shape})" for name, shape in expected.items()
             if tuple(weights[name].shape) != shape]
    if wrong:
        raise ValueError(f"Tensor shapes do not match the config: {'; '.join(wrong)}.")
    model.load_state_dict({name: t.to(dtype) for name, t in weights.items()}, assign=True)
    model.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out, "converting")
    try:
        model.save_pretrained(tmp)
        for pattern in TOKENIZER_PATTERNS:
            for path in src.glob(pattern):
                if path.is_file():
                    shutil.copy2(path, tmp / path.name)
        install_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["convert_fla", "convert_weights", "fwp_config_fields", "read_safetensors"]
