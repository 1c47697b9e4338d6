"""modeling_fwp.convert_fla: fla DeltaNet folders (built here from fla 0.6.0's parameter names and shapes, without
fla) converted to FWP folders, checked against `fla_logits`, a float64 re-implementation of fla's DeltaNet forward
written from fla's code (fla/layers/delta_net.py, fla/ops/delta_rule/naive.py, fla/modules) that shares nothing with
the package. Real fla outputs come in through tests/data/fla_fixture/ (written by
scripts/checks/check_fla_conversion.py)."""

import json
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_generation import assert_steps_equal_full_forward
from test_static_cache import captured, fresh_dynamo, static_generate  # noqa: F401  (fresh_dynamo: autouse fixture)

from modeling_fwp import FWPForCausalLM
from modeling_fwp.convert_fla import convert_fla

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "data" / "fla_fixture"
VOCAB = 40
# config.json as fla 0.6.0's DeltaNetConfig.save_pretrained writes it (tiny sizes)
FLA_CONFIG = {
    "allow_neg_eigval": False, "architectures": ["DeltaNetForCausalLM"], "attn": None, "attn_mode": "chunk",
    "attnres_block_size": None, "bos_token_id": 1, "conv_size": 4, "dtype": "float32", "eos_token_id": 2,
    "expand_k": 1.0, "expand_v": 1.0, "fuse_cross_entropy": True, "fuse_linear_cross_entropy": False,
    "fuse_norm": True, "fuse_swiglu": True, "hidden_act": "swish", "hidden_ratio": 4, "hidden_size": 16,
    "initializer_range": 0.02, "intermediate_size": 24, "max_position_embeddings": 2048, "model_type": "delta_net",
    "norm_eps": 1e-06, "num_heads": 2, "num_hidden_layers": 2, "pad_token_id": None, "qk_activation": "silu",
    "qk_norm": "l2", "tie_word_embeddings": False, "transformers_version": "5.24.0", "use_beta": True,
    "use_cache": True, "use_gate": False, "use_l2warp": False, "use_output_norm": True, "use_short_conv": True,
    "vocab_size": VOCAB,
}


def fla_weights(c, seed=0):
    """Random tensors under fla's names and shapes; large enough that every one of them moves the logits."""
    gen = torch.Generator().manual_seed(seed)
    hidden, heads = c["hidden_size"], c["num_heads"]
    key, value = round(hidden * c["expand_k"]), round(hidden * c["expand_v"])
    inter = c["intermediate_size"] or 256 * -(-int(hidden * c["hidden_ratio"] * 2 / 3) // 256)
    shapes = {"model.embeddings.weight": (c["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "attn_norm.weight": (hidden,), p + "attn.q_proj.weight": (key, hidden),
                       p + "attn.k_proj.weight": (key, hidden), p + "attn.v_proj.weight": (value, hidden),
                       p + "attn.o_norm.weight": (value // heads,), p + "attn.o_proj.weight": (hidden, value),
                       p + "mlp_norm.weight": (hidden,), p + "mlp.gate_proj.weight": (inter, hidden),
                       p + "mlp.up_proj.weight": (inter, hidden), p + "mlp.down_proj.weight": (hidden, inter)})
        if c["use_beta"]:
            shapes[p + "attn.b_proj.weight"] = (heads, hidden)
        if c["use_gate"]:
            shapes[p + "attn.g_proj.weight"] = (value, hidden)
        if c["use_short_conv"]:
            for part, size in (("q", key), ("k", key), ("v", value)):
                shapes[f"{p}attn.{part}_conv1d.weight"] = (size, 1, c["conv_size"])
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], hidden)
    return {name: (1.0 + 0.3 * torch.randn(shape, generator=gen)) if len(shape) == 1 else
            0.4 * torch.randn(shape, generator=gen) for name, shape in shapes.items()}


def fake_fla_folder(folder, seed=0, **overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {**FLA_CONFIG, **overrides}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(fla_weights(config, seed), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


# ------------------------------------------------------------------ fla's DeltaNet forward, float64, one sequence
def silu(x):
    return x / (1.0 + torch.exp(-x))


def rms_norm(x, weight, eps):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * weight


def causal_conv(x, weight):
    """nn.Conv1d(groups=C, padding=K-1) cut to the first T outputs: y_t = sum_j w[:, 0, j] x_{t-K+1+j}."""
    taps = weight.shape[-1]
    padded = torch.cat([torch.zeros(taps - 1, x.shape[1], dtype=x.dtype), x])
    return torch.stack([(padded[t:t + taps].T * weight[:, 0]).sum(-1) for t in range(x.shape[0])])


def fla_layer(x, w, c):
    heads = c["num_heads"]
    q, k, v = x @ w["q_proj.weight"].T, x @ w["k_proj.weight"].T, x @ w["v_proj.weight"].T
    act = c["qk_activation"]
    if c["use_short_conv"]:  # the q, k convs carry SiLU only for qk_activation "silu"; v's always does
        q, k, v = causal_conv(q, w["q_conv1d.weight"]), causal_conv(k, w["k_conv1d.weight"]), causal_conv(v, w["v_conv1d.weight"])
        if act == "silu":
            q, k = silu(q), silu(k)
    elif act == "silu":
        q, k = silu(q), silu(k)
    v = silu(v)
    q, k, v = (y.reshape(x.shape[0], heads, -1) for y in (q, k, v))
    if act == "relu":
        q, k = q.clamp_min(0), k.clamp_min(0)
    elif act == "elu":  # elu_p1
        q, k = torch.where(q >= 0, q + 1, torch.exp(q)), torch.where(k >= 0, k + 1, torch.exp(k))
    if c["qk_norm"] == "sum":  # F.normalize(p=1, eps=1e-6)
        q, k = q / q.abs().sum(-1, keepdim=True).clamp_min(1e-6), k / k.abs().sum(-1, keepdim=True).clamp_min(1e-6)
    else:  # l2norm in the kernel, eps 1e-6
        q, k = q / torch.sqrt((q**2).sum(-1, keepdim=True) + 1e-6), k / torch.sqrt((k**2).sum(-1, keepdim=True) + 1e-6)
    beta = torch.sigmoid(x @ w["b_proj.weight"].T) if c["use_beta"] else torch.ones(x.shape[0], heads, dtype=x.dtype)
    if c["allow_neg_eigval"]:
        beta = beta * 2.0
    out = torch.zeros_like(v)
    for h in range(heads):  # delta_rule_recurrence: S [d_k, d_v], q scaled by d_k^-1/2, read after the write
        S = torch.zeros(q.shape[-1], v.shape[-1], dtype=x.dtype)
        for t in range(x.shape[0]):
            u = beta[t, h] * (v[t, h] - k[t, h] @ S)
            S = S + torch.outer(k[t, h], u)
            out[t, h] = (q[t, h] * q.shape[-1] ** -0.5) @ S
    out = rms_norm(out, w["o_norm.weight"], c["norm_eps"])  # fla always norms (use_output_norm is not read)
    if c["use_gate"]:  # FusedRMSNormGated, activation swish
        out = out * silu(x @ w["g_proj.weight"].T).reshape(out.shape)
    return out.reshape(x.shape[0], -1) @ w["o_proj.weight"].T


def fla_logits(folder, input_ids):
    c = json.loads((Path(folder) / "config.json").read_text())
    weights = {k: v.double() for k, v in load_file(str(Path(folder) / "model.safetensors")).items()}
    h = weights["model.embeddings.weight"][input_ids]
    for i in range(c["num_hidden_layers"]):
        w = {k[len(f"model.layers.{i}."):]: v for k, v in weights.items() if k.startswith(f"model.layers.{i}.")}
        h = h + fla_layer(rms_norm(h, w["attn_norm.weight"], c["norm_eps"]),
                          {k[5:]: v for k, v in w.items() if k.startswith("attn.")}, c)
        m = rms_norm(h, w["mlp_norm.weight"], c["norm_eps"])
        h = h + (silu(m @ w["mlp.gate_proj.weight"].T) * (m @ w["mlp.up_proj.weight"].T)) @ w["mlp.down_proj.weight"].T
    h = rms_norm(h, weights["model.norm.weight"], c["norm_eps"])
    return h @ weights["model.embeddings.weight" if c["tie_word_embeddings"] else "lm_head.weight"].T


def converted(folder, out, backend="chunk"):
    convert_fla(folder, out)
    model = FWPForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    model.config.kernel_backend = backend
    return model


def tokens(batch, length, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ every expressible option, against fla's maths
EXPRESSIBLE = {
    "default": {},
    "use_gate": dict(use_gate=True),
    "allow_neg_eigval": dict(allow_neg_eigval=True),
    "no_beta_neg_eigval": dict(use_beta=False, allow_neg_eigval=True),
    "no_short_conv": dict(use_short_conv=False),  # SiLU on q, k, v without a conv
    "conv_size1": dict(conv_size=1),
    "conv_size3_gate_tied": dict(conv_size=3, use_gate=True, tie_word_embeddings=True),
    "expand_half_hidden_ratio": dict(expand_k=0.5, expand_v=0.5, intermediate_size=None, hidden_ratio=2),
    "norm_eps_1e-2": dict(norm_eps=1e-2, use_output_norm=False),  # fla ignores use_output_norm
}


@pytest.mark.parametrize("backend", ["recurrent", "chunk"])
@pytest.mark.parametrize("name", EXPRESSIBLE)
def test_converted_logits_equal_flas_maths(name, backend, tmp_path):
    folder = fake_fla_folder(tmp_path / "fla", seed=len(name), **EXPRESSIBLE[name])
    model = converted(folder, tmp_path / "fwp", backend)
    ids, mask = tokens(2, 19), torch.ones(2, 19, dtype=torch.long)
    ids[1, :6], mask[1, :6] = 0, 0  # left padding: row 1 must equal its 13 real tokens alone
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(logits[0], fla_logits(folder, ids[0]), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logits[1, 6:], fla_logits(folder, ids[1, 6:]), rtol=1e-9, atol=1e-9)


def test_config_and_files_of_the_converted_folder(tmp_path):
    folder = fake_fla_folder(tmp_path / "fla", use_gate=True, allow_neg_eigval=True, conv_size=3)
    (folder / "notes.txt").write_text("not a tokenizer file")
    convert_fla(folder, tmp_path / "fwp")
    config = json.loads((tmp_path / "fwp" / "config.json").read_text())
    expected = dict(model_type="fwp", block_style="pre_norm", feature_map="identity", qk_norm="l2", qk_norm_eps=1e-6,
                    use_short_conv=True, conv_size=3, use_output_norm=True, use_gate=True, allow_neg_eigval=True,
                    head_dim=8, num_heads=2, intermediate_size=24, layer_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    assert {k: config[k] for k in expected} == expected
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_fwp.FWPForCausalLM"
    assert {"modeling_fwp.py", "configuration_fwp.py", "model.safetensors"} <= {p.name for p in (tmp_path / "fwp").iterdir()}
    assert not (tmp_path / "fwp" / "notes.txt").exists() and not (tmp_path / "fwp" / "convert_fla.py").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left behind


def test_sharded_checkpoint_converts_like_a_single_file(tmp_path):
    single = fake_fla_folder(tmp_path / "single")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((single / "config.json").read_text())
    weights = load_file(str(single / "model.safetensors"))
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: weights[n] for n in part}, str(sharded / file))
    weight_map = {n: file for file, part in shards.items() for n in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ids = tokens(1, 9)
    with torch.no_grad():
        a = converted(single, tmp_path / "a")(ids).logits
        b = converted(sharded, tmp_path / "b")(ids).logits
    assert torch.equal(a, b)


# ------------------------------------------------------------------ refusals
REFUSED = {  # overrides -> a word the error must contain (the option's name)
    "hybrid_attention": (dict(attn={"layers": [1], "num_heads": 2}), "attn="),
    "attnres": (dict(attnres_block_size=2), "attnres_block_size"),
    "powlu": (dict(hidden_act="powlu"), "hidden_act"),
    "relu": (dict(qk_activation="relu"), "qk_activation='relu'"),
    "elu": (dict(qk_activation="elu", use_short_conv=False), "qk_activation='elu'"),
    "identity": (dict(qk_activation="identity"), "qk_activation='identity'"),
    "sum_norm": (dict(qk_norm="sum"), "qk_norm='sum'"),
    "key_value_sizes": (dict(expand_k=0.5), "expand_k=0.5, expand_v=1.0"),
    "heads_do_not_divide": (dict(expand_k=0.75, expand_v=0.75, num_heads=5), "num_heads=5"),
    "unknown_key": (dict(use_rope=True), "use_rope"),
    "gated_deltanet": (dict(model_type="gated_deltanet"), "model_type='gated_deltanet'"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_inexpressible_options_are_refused_by_name(name, tmp_path):
    overrides, word = REFUSED[name]
    folder = tmp_path / "fla"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**FLA_CONFIG, **overrides}))
    with pytest.raises(ValueError, match="Cannot convert|model_type") as error:
        convert_fla(folder, tmp_path / "fwp")
    assert word in str(error.value)
    assert not (tmp_path / "fwp").exists()


def test_several_problems_are_named_at_once(tmp_path):
    folder = fake_fla_folder(tmp_path / "fla", qk_norm="sum", qk_activation="relu", attnres_block_size=2)
    with pytest.raises(ValueError) as error:
        convert_fla(folder, tmp_path / "fwp")
    assert all(word in str(error.value) for word in ("qk_norm", "qk_activation", "attnres_block_size"))


def test_ignore_keys_lets_an_unknown_key_through(tmp_path):
    folder = fake_fla_folder(tmp_path / "fla", share_conv_kernel=False)
    with pytest.raises(ValueError, match="share_conv_kernel"):
        convert_fla(folder, tmp_path / "fwp")
    convert_fla(folder, tmp_path / "fwp", ignore_keys=["share_conv_kernel"])


@pytest.mark.parametrize("change, message", [
    ("extra", r"not mapped \['model.layers.0.attn.q_conv1d.bias'\]"),
    ("missing", r"missing \['model.layers.1.mlp.up_proj.weight'\]"),
    ("shape", r"model.layers.0.attn.o_norm.weight \(3,\) \(expected \(8,\)\)"),
    ("untied_head", "lm_head.weight differs"),
])
def test_weights_that_do_not_match_the_config_are_refused(change, message, tmp_path):
    folder = fake_fla_folder(tmp_path / "fla", tie_word_embeddings=change == "untied_head")
    weights = load_file(str(folder / "model.safetensors"))
    if change == "extra":
        weights["model.layers.0.attn.q_conv1d.bias"] = torch.zeros(16)
    elif change == "missing":
        del weights["model.layers.1.mlp.up_proj.weight"]
    elif change == "shape":
        weights["model.layers.0.attn.o_norm.weight"] = torch.ones(3)
    else:
        weights["lm_head.weight"] = torch.randn(VOCAB, 16)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=message):
        convert_fla(folder, tmp_path / "fwp")
    assert not (tmp_path / "fwp").exists()


def test_a_folder_without_safetensors_is_refused(tmp_path):
    folder = tmp_path / "fla"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(FLA_CONFIG))
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no model.safetensors.*pytorch_model.bin"):
        convert_fla(folder, tmp_path / "fwp")


# ------------------------------------------------------------------ tokenizer, CLI, remote code, generation
def save_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<unk>").save_pretrained(folder)


def test_cli_converts_atomically_copies_the_tokenizer_and_reports_refusals(tmp_path, capsys):
    from transformers import AutoTokenizer

    folder = fake_fla_folder(tmp_path / "fla")
    save_tokenizer(folder)
    (tmp_path / "fwp").mkdir()
    (tmp_path / "fwp" / "stale.txt").write_text("from an earlier conversion")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "convert_fla.py"), str(folder), str(tmp_path / "fwp")],
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "fwp" / "stale.txt").exists()  # replaced whole, not merged
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "fwp" / name).read_bytes() == (folder / name).read_bytes()
    text = "w3 w5 w7 w11"
    assert AutoTokenizer.from_pretrained(tmp_path / "fwp")(text).input_ids == AutoTokenizer.from_pretrained(folder)(text).input_ids
    (folder / "config.json").write_text(json.dumps({**FLA_CONFIG, "qk_norm": "sum"}))
    cli = runpy.run_path(str(REPO / "scripts" / "convert_fla.py"))  # in process: a second interpreter costs ~10 s
    assert cli["main"]([str(folder), str(tmp_path / "refused")]) == 1
    assert "qk_norm='sum'" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


BLOCKED_LOAD = textwrap.dedent(r"""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):  # first on the meta path: beats sys.path and editable installs
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "modeling_fwp":
                raise ImportError("blocked by the test")
    sys.meta_path.insert(0, Block())
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float64).eval()
    ids = torch.tensor([[5, 9, 3, 17, 22, 8]])
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, do_sample=False, max_new_tokens=5, min_new_tokens=5, pad_token_id=0)
    assert not [m for m in sys.modules if m.split(".")[0] == "modeling_fwp"]
    torch.save({"logits": logits, "generated": generated, "module": type(model).__module__}, sys.argv[2])
""")


def test_converted_folder_loads_as_remote_code_without_the_package(tmp_path):
    folder = fake_fla_folder(tmp_path / "fla", use_gate=True, allow_neg_eigval=True)
    convert_fla(folder, tmp_path / "fwp")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",) and not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", BLOCKED_LOAD, str(tmp_path / "fwp"), str(tmp_path / "out.pt")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    assert remote["module"].startswith("transformers_modules")
    ids = torch.tensor([[5, 9, 3, 17, 22, 8]])
    torch.testing.assert_close(remote["logits"][0], fla_logits(folder, ids[0]), rtol=1e-9, atol=1e-9)
    assert remote["generated"].shape == (1, 11)


def test_generate_and_captured_decode_of_a_gated_model(tmp_path):
    folder = fake_fla_folder(tmp_path / "fla", use_gate=True, allow_neg_eigval=True, conv_size=3)
    model = converted(folder, tmp_path / "fwp")
    ids = tokens(2, 7)
    with torch.no_grad():
        eager = model.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=0, return_dict_in_generate=True,
                               output_logits=True)
    assert_steps_equal_full_forward(model, eager, ids)
    config, counter = captured()
    static = static_generate(model, ids, 6, config)  # the blocks in FWPForCausalLM._captured_decode_step
    assert counter.frame_count == 1 and torch.equal(static.sequences, eager.sequences)
    assert_steps_equal_full_forward(model, static, ids)


# ------------------------------------------------------------------ fla's own outputs (fixtures from a GPU run)
def fixture_folders():
    return sorted(p for p in FIXTURES.iterdir() if (p / "config.json").is_file()) if FIXTURES.is_dir() else []


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"no fla fixtures yet: {FIXTURES} is written by "
                    "scripts/checks/check_fla_conversion.py on a GPU machine (fla installed)")
@pytest.mark.parametrize("backend", ["recurrent", "chunk"])
def test_converted_fixtures_reproduce_flas_own_logits(backend, tmp_path):
    folders = fixture_folders()
    assert folders, f"{FIXTURES} holds no fixture folder"
    for folder in folders:
        stored = load_file(str(folder / "fla_reference.safetensors"))
        model = converted(folder, tmp_path / folder.name, backend).float()
        with torch.no_grad():
            logits = model(stored["input_ids"], attention_mask=stored["attention_mask"], use_cache=False).logits
        real = stored["attention_mask"].bool()
        # fla ran fp32 kernels on a GPU; both sides round in fp32, over 2 layers and 40 tokens
        torch.testing.assert_close(logits[real], stored["logits"][real], rtol=1e-4, atol=1e-4, msg=folder.name)
        # and the float64 re-implementation agrees with fla itself, so the tests above check against fla's maths
        for row in range(len(real)):
            reference = fla_logits(folder, stored["input_ids"][row][real[row]]).float()
            torch.testing.assert_close(reference, stored["logits"][row][real[row]], rtol=1e-4, atol=1e-4)
