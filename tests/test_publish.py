"""Hub publishing: the model card, scripts/publish.py's folder, loading it without modeling_fwp, failures offline.

Nothing here touches the network: Hub calls go to a closed loopback port, to a stub server on 127.0.0.1, or to
monkeypatched HfApi methods.
"""

import hashlib
import http.server
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the modeling_fwp next to scripts/publish.py, which uses this checkout's too

import modeling_fwp  # noqa: E402  (registers the Auto classes)
from huggingface_hub import ModelCard  # noqa: E402
from modeling_fwp import FWPConfig, FWPForCausalLM  # noqa: E402
from modeling_fwp.hub_card import push_to_hub_with_card, render_model_card  # noqa: E402

PACKAGE_PARENT = str(Path(modeling_fwp.__file__).resolve().parents[1])
PUBLISH = REPO / "scripts" / "publish.py"
UNROUTABLE = "http://127.0.0.1:9"  # loopback, discard port: connection refused at once, never the internet

VARIANTS = {
    "paper": dict(),  # delta rule, ELU+1, sum normalisation, post-LN
    "modern": dict(update_rule="sum", feature_map="favor", favor_features=8, position_embedding="rotary",
                   block_style="pre_norm", use_short_conv=True, attention_normalization=True,
                   tie_word_embeddings=True, qk_norm="l2"),
}


def load_publish():
    spec = importlib.util.spec_from_file_location("publish_under_test", PUBLISH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


publish = load_publish()


# ---------------------------------------------------------------- fixtures: a tiny trained run, as train.py saves it


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
            "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles"] * 4
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def make_run(run_dir: Path, tokenizer, **overrides) -> Path:
    """What scripts/train.py leaves in output_dir: model, tokenizer, generation config, trainer state, metrics."""
    from transformers import GenerationConfig

    torch.manual_seed(0)
    config = FWPConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_heads=2,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **overrides)
    model = FWPForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the init, so logits and greedy choices are far from ties
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(run_dir)
    tokenizer.save_pretrained(run_dir)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     max_new_tokens=7).save_pretrained(run_dir)
    history = [{"step": 10, "loss": 4.5, "learning_rate": 3e-4, "epoch": 0.5},
               {"step": 20, "eval_loss": 3.25, "epoch": 1.0},
               {"step": 20, "train_runtime": 90.0, "train_loss": 4.1, "epoch": 1.0}]
    (run_dir / "trainer_state.json").write_text(json.dumps(
        {"global_step": 20, "epoch": 1.0, "train_batch_size": 8, "num_input_tokens_seen": 40960,
         "log_history": history}))
    # what scripts/train.py saves: eval with and without state carry-over, the unigram baseline, a summary
    (run_dir / "eval_results.json").write_text(json.dumps(
        {"eval_loss": 3.25, "eval_perplexity": math.exp(3.25), "eval_runtime": 1.5, "eval_carry_loss": 3.0,
         "eval_carry_perplexity": math.exp(3.0), "unigram_perplexity": 80.5, "epoch": 1.0}))
    (run_dir / "train_summary.json").write_text(json.dumps({"sample": "ROMEO.\nTo be ```` or not"}))
    (run_dir / "training_args.json").write_text(json.dumps(
        {"learning_rate": 3e-3, "lr_scheduler_type": "cosine", "warmup_steps": 0, "weight_decay": 0.0, "seed": 0}))
    (run_dir / "data_info.json").write_text(json.dumps({"dataset_name": "tiny Hamlet lines", "block_size": 16}))
    return run_dir


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("runs")
    return {name: make_run(root / name, tokenizer, **cfg) for name, cfg in VARIANTS.items()}


def snapshot(folder: Path) -> dict:
    """Every file's bytes and mtime: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list:
    return [p.name for p in parent.iterdir() if ".building-" in p.name or ".old-" in p.name]


def hub_env(**extra) -> dict:
    """No token, no saved login, no reachable Hub, modeling_fwp importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update({"PYTHONPATH": PACKAGE_PARENT, "HF_ENDPOINT": UNROUTABLE, "HF_HUB_DISABLE_TELEMETRY": "1", **extra})
    return env


def run_cli(args, env, cwd):
    return subprocess.run([sys.executable, str(PUBLISH), *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def build_folder(run_dir: Path, out: Path, *extra) -> Path:
    code = publish.main([str(run_dir), "--out", str(out), *extra])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def cli_build(run_dirs, tmp_path_factory):
    """The 'paper' run through the command line, dry run, with publish.py's own load check."""
    root = tmp_path_factory.mktemp("cli")
    run_dir = run_dirs["paper"]
    before = snapshot(run_dir)
    out = root / "hub"
    proc = run_cli([run_dir, "--out", out, "--repo-id", "someone/fwp-tiny"], hub_env(), root)
    return {"proc": proc, "out": out, "root": root, "before": before, "after": snapshot(run_dir)}


@pytest.fixture(scope="module")
def built(cli_build, run_dirs, tmp_path_factory):
    """Every variant's built folder: 'paper' from the command line, the others through publish.main in-process."""
    assert cli_build["proc"].returncode == 0, cli_build["proc"].stderr
    folders = {"paper": cli_build["out"]}
    for name in VARIANTS:
        if name != "paper":
            folders[name] = build_folder(run_dirs[name], tmp_path_factory.mktemp(name) / "hub", "--skip-load-check")
    return folders


# ---------------------------------------------------------------- the card


def test_card_metadata_and_sections(run_dirs):
    config = FWPConfig.from_pretrained(run_dirs["paper"])
    model = FWPForCausalLM.from_pretrained(run_dirs["paper"])
    card = render_model_card(config, num_parameters=model.num_parameters(), run_dir=run_dirs["paper"],
                             repo_id="someone/fwp-tiny")
    reparsed = ModelCard(str(card))  # the YAML must survive a round trip as the Hub reads it
    data = reparsed.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.license == "apache-2.0" and data.language == "en"
    for tag in ("fast-weight-programmer", "delta-rule", "linear-attention", "fwp-delta-elu-plus-one"):
        assert tag in data.tags
    metrics = {r.metric_name: r.metric_value for r in data.eval_results}
    assert metrics == {  # the unigram baseline is not this model's result: it stays out of the metadata
        "validation loss": 3.25, "validation perplexity": pytest.approx(math.exp(3.25), rel=1e-4),
        "validation loss (fast-weight state carried across segments)": 3.0,
        "validation perplexity (fast-weight state carried across segments)": pytest.approx(math.exp(3.0), rel=1e-4)}
    assert {r.dataset_split for r in data.eval_results} == {"validation"}
    assert {r.metric_type for r in data.eval_results} == {"loss", "perplexity"}
    text = card.text
    state = config.num_heads * config.key_dim * config.head_dim
    assert f"**{state:,} numbers**" in text and f"({model.num_parameters():,})" in text
    assert 'AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)' in text
    assert 'repo = "someone/fwp-tiny"' in text and "model.generate(" in text
    assert "| Optimizer steps | 20 |" in text and "| Batch size per device | 8 |" in text
    assert "| Learning rate | 0.003 |" in text and "| Seed | 0 |" in text and "| Weight decay | 0.0 |" in text
    assert "| unigram model (baseline, for reference) | 80.50 |" in text.replace("perplexity of a ", "")
    assert "ROMEO.\nTo be ` ` ` ` or not\n````" in text  # the sample, its fence unbroken
    assert "tiny Hamlet lines" in text and "## Limitations" in text
    assert "@inproceedings{schlag2021linear" in text and "2102.11174" in text


def test_card_names_the_sum_rule_variant_and_copes_without_a_run():
    config = FWPConfig(update_rule="sum", feature_map="dpfp", dpfp_nu=2, hidden_size=64, num_heads=2)
    card = render_model_card(config)
    assert "sum-rule" in card.data.tags and "delta-rule" not in card.data.tags
    assert "fwp-sum-dpfp" in card.data.tags
    assert card.data.eval_results is None and card.data.datasets is None
    assert f"{2 * (2 * 32 * 2) * 32:,} numbers" in card.text  # heads x key_dim (2 * head_dim * nu) x head_dim
    assert "No trainer state was found" in card.text and "No evaluation results" in card.text


def test_card_describes_the_gate_and_negative_eigenvalues():
    card = render_model_card(FWPConfig(use_gate=True, allow_neg_eigval=True, hidden_size=64, num_heads=2)).text
    assert "Output gate" in card and "in (0, 2)" in card
    plain = render_model_card(FWPConfig(hidden_size=64, num_heads=2)).text
    assert "Output gate" not in plain and "in (0, 2)" not in plain


def test_card_rejects_other_configs():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="config"):
        render_model_card(GPT2Config())


# ---------------------------------------------------------------- the built folder, loaded without modeling_fwp

BLOCKED_LOAD = textwrap.dedent(r"""
    import importlib.abc, json, sys

    class BlockModelingFwp(importlib.abc.MetaPathFinder):
        # first on the meta path: beats sys.path entries, .pth files and editable-install finders alike
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_fwp" or name.startswith("modeling_fwp."):
                raise ImportError("blocked by the test")

    sys.meta_path.insert(0, BlockModelingFwp())
    try:
        import modeling_fwp
        sys.exit("modeling_fwp is still importable")
    except ImportError:
        pass
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scratch = sys.argv[1]
    prompts = json.load(open(f"{scratch}/prompts.json"))
    for name, folder in json.load(open(f"{scratch}/jobs.json")).items():
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        ids = torch.tensor([row[:4] for row in AutoTokenizer.from_pretrained(folder, trust_remote_code=True)(prompts).input_ids])
        with torch.no_grad():
            logits = model(ids).logits
            generated = model.generate(ids, do_sample=False, max_new_tokens=7, min_new_tokens=7)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "modeling_fwp")
        torch.save({"logits": logits, "generated": generated, "module": type(model).__module__, "loaded": loaded},
                   f"{scratch}/{name}.pt")
""")


def test_cli_dry_run_lists_the_files_and_leaves_output_dir_alone(cli_build):
    proc, out = cli_build["proc"], cli_build["out"]
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bars or warnings burying the output
    assert "dry run: nothing uploaded" in proc.stdout
    for name in ("model.safetensors", "config.json", "configuration_fwp.py", "modeling_fwp.py",
                 "tokenizer.json", "generation_config.json", "README.md"):
        assert (out / name).is_file(), name
        size = (out / name).stat().st_size
        assert f"{size:>12,}  {name}\n" in proc.stdout  # listed with its size
    assert not (out / "hub_card.py").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_fwp.FWPForCausalLM"
    assert cli_build["after"] == cli_build["before"] and leftovers(cli_build["root"]) == []


def test_built_folders_load_without_the_package(built, run_dirs, tokenizer, tmp_path):
    """Same logits and greedy generations from the folder's own code, in a process where modeling_fwp is blocked."""
    prompts = ["To be, or not to be", "The slings and arrows of"]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "jobs.json").write_text(json.dumps({name: str(folder) for name, folder in built.items()}))
    (scratch / "prompts.json").write_text(json.dumps(prompts))
    env = {k: v for k, v in hub_env(HF_HUB_OFFLINE="1").items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    proc = subprocess.run([sys.executable, "-c", BLOCKED_LOAD, str(scratch)], env=env, cwd=scratch,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = torch.tensor([row[:4] for row in tokenizer(prompts).input_ids])  # same length: no padding involved
    for name in VARIANTS:
        remote = torch.load(scratch / f"{name}.pt")
        assert remote["module"].startswith("transformers_modules"), remote["module"]
        assert remote["loaded"] == []  # the package stayed out; the folder's copy did the work
        original = FWPForCausalLM.from_pretrained(run_dirs[name]).eval()
        with torch.no_grad():
            logits = original(ids).logits
            generated = original.generate(ids, do_sample=False, max_new_tokens=7, min_new_tokens=7)
        torch.testing.assert_close(remote["logits"], logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(remote["generated"], generated), name
        assert generated.shape[1] == ids.shape[1] + 7


def test_built_folder_has_card_and_run_metadata(built):
    built = built["paper"]
    card = ModelCard.load(built / "README.md")
    assert card.data.model_name == "fwp-tiny" and "fwp-delta-elu-plus-one" in card.data.tags
    assert 'repo = "someone/fwp-tiny"' in card.text
    gen = json.loads((built / "generation_config.json").read_text())
    assert gen["max_new_tokens"] == 7  # the run's own decoding defaults, not regenerated ones
    assert set(json.loads((built / "config.json").read_text())["auto_map"]) >= {"AutoConfig", "AutoModelForCausalLM"}


def test_verify_folder_catches_a_missing_sibling_module(built, tmp_path):
    import shutil

    from transformers.dynamic_module_utils import get_relative_imports

    built = built["paper"]
    broken = tmp_path / "broken"
    shutil.copytree(built, broken)
    siblings = sorted({m for f in built.glob("*.py") for m in get_relative_imports(f)} - {"configuration_fwp"})
    assert siblings, "the model code imports no sibling module?"
    for sibling in siblings:  # each one, even those imported only inside try/except, must ship
        (broken / f"{sibling}.py").unlink()
        with pytest.raises(publish.PublishError, match=f"{sibling}.py was not copied"):
            publish.verify_folder(broken)
        shutil.copy(built / f"{sibling}.py", broken)
    publish.verify_folder(broken)
    with open(broken / "modeling_fwp.py", "a") as f:
        f.write("\nimport modeling_fwp\n")
    with pytest.raises(publish.PublishError, match="absolutely"):
        publish.verify_folder(broken)


# ---------------------------------------------------------------- folders are never half-written


def test_refuses_a_non_empty_out_and_out_inside_output_dir(run_dirs, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert publish.main([str(run_dirs["paper"]), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine" and sorted(os.listdir(out)) == ["keep.txt"]

    before = snapshot(run_dirs["paper"])
    assert publish.main([str(run_dirs["paper"]), "--out", str(run_dirs["paper"] / "hub"), "--overwrite"]) == 1
    assert "outside OUTPUT_DIR" in capsys.readouterr().err
    assert snapshot(run_dirs["paper"]) == before

    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert publish.main([str(other), "--out", str(tmp_path / "hub")]) == 1
    assert "not an FWP model" in capsys.readouterr().err and not (tmp_path / "hub").exists()


def test_overwrite_replaces_whole_and_a_failed_build_keeps_the_old_folder(run_dirs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "hub"
    out.mkdir()
    (out / "stale.txt").write_text("old build")

    def broken_card(*args, **kwargs):
        raise RuntimeError("card exploded")

    monkeypatch.setattr("modeling_fwp.hub_card.render_model_card", broken_card)
    assert publish.main([str(run_dirs["paper"]), "--out", str(out), "--overwrite", "--skip-load-check"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "card exploded" in err
    assert sorted(os.listdir(out)) == ["stale.txt"] and leftovers(tmp_path) == []

    monkeypatch.undo()
    build_folder(run_dirs["paper"], out, "--overwrite", "--skip-load-check")
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- pushing: failures offline, one line each


def assert_one_error_line(proc, *needles):
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("publish.py: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_push_without_a_token_fails_before_building(run_dirs, tmp_path):
    empty_home = tmp_path / "hf_home"
    empty_home.mkdir()
    before = snapshot(run_dirs["paper"])
    proc = run_cli([run_dirs["paper"], "--out", tmp_path / "hub", "--push", "--repo-id", "someone/fwp"],
                   hub_env(HF_HOME=str(empty_home)), tmp_path)
    assert_one_error_line(proc, "no Hugging Face token", "HF_TOKEN")
    assert not (tmp_path / "hub").exists() and leftovers(tmp_path) == []
    assert snapshot(run_dirs["paper"]) == before


def test_push_without_network_fails_with_one_line(run_dirs, tmp_path):
    proc = run_cli([run_dirs["paper"], "--out", tmp_path / "hub", "--push", "--repo-id", "someone/fwp"],
                   hub_env(HF_HOME=str(tmp_path / "hf_home"), HF_TOKEN="hf_not_a_real_token"), tmp_path)
    assert_one_error_line(proc, "cannot reach the Hub at " + UNROUTABLE)
    assert not (tmp_path / "hub").exists() and leftovers(tmp_path) == []


class RefusingHub(http.server.BaseHTTPRequestHandler):
    """A Hub that refuses every token, on loopback."""

    def do_GET(self):
        body = b'{"error": "Invalid credentials in Authorization header"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_push_with_a_refused_login_fails_with_one_line(run_dirs, tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), RefusingHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        proc = run_cli([run_dirs["paper"], "--out", tmp_path / "hub", "--push", "--repo-id", "someone/fwp"],
                       hub_env(HF_HOME=str(tmp_path / "hf_home"), HF_TOKEN="hf_revoked", HF_ENDPOINT=endpoint),
                       tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert_one_error_line(proc, "refused the token (401)", "hf auth login")
    assert not (tmp_path / "hub").exists()


class FakeHub:
    """Records HfApi calls; upload_folder fails when told to (after reading the folder, as a real upload would)."""

    def __init__(self, monkeypatch, fail_upload=None):
        from huggingface_hub import HfApi

        self.calls, self.fail_upload, self.uploaded = [], fail_upload, None
        monkeypatch.setenv("HF_TOKEN", "hf_fake")
        monkeypatch.setattr(HfApi, "whoami", lambda api, *a, **k: {"name": "someone"})
        monkeypatch.setattr(HfApi, "create_repo", lambda api, *a, **k: self.create_repo(*a, **k))
        monkeypatch.setattr(HfApi, "create_branch", lambda api, repo_id, **k: self.calls.append(("branch", k)))
        monkeypatch.setattr(HfApi, "upload_folder", lambda api, **k: self.upload_folder(**k))

    def create_repo(self, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        self.calls.append(("create_repo", repo_id, kwargs))
        return RepoUrl(f"{UNROUTABLE}/{repo_id}", endpoint=UNROUTABLE)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload", repo_id, kwargs))
        self.uploaded = snapshot(Path(folder_path))
        self.readme = (Path(folder_path) / "README.md").read_text() if (Path(folder_path) / "README.md").exists() else None
        if self.fail_upload:
            raise self.fail_upload
        return "commit"


def test_failed_upload_leaves_the_built_folder_complete(run_dirs, tmp_path, monkeypatch, capsys):
    fake = FakeHub(monkeypatch, fail_upload=ConnectionResetError("connection reset by peer"))
    out = tmp_path / "hub"
    before = snapshot(run_dirs["paper"])
    code = publish.main([str(run_dirs["paper"]), "--out", str(out), "--push", "--repo-id", "someone/fwp",
                         "--skip-load-check"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "upload to someone/fwp failed" in err and "intact" in err and "cannot reach the Hub" in err
    assert fake.uploaded == snapshot(out)  # the folder is exactly what was being uploaded, complete
    assert snapshot(run_dirs["paper"]) == before and leftovers(tmp_path) == []


def test_push_calls_the_hub_with_the_options(run_dirs, tmp_path, monkeypatch, capsys):
    fake = FakeHub(monkeypatch)
    out = tmp_path / "hub"
    code = publish.main([str(run_dirs["paper"]), "--out", str(out), "--push", "--repo-id", "someone/fwp",
                         "--private", "--revision", "v1", "--commit-message", "first model", "--skip-load-check"])
    assert code == 0, capsys.readouterr().err
    kinds = [c[0] for c in fake.calls]
    assert kinds == ["create_repo", "branch", "upload"]
    assert fake.calls[0][2] == {"private": True, "exist_ok": True}
    assert fake.calls[1][1]["branch"] == "v1"
    assert fake.calls[2][2]["revision"] == "v1" and fake.calls[2][2]["commit_message"] == "first model"
    assert fake.uploaded == snapshot(out)
    assert "uploaded to" in capsys.readouterr().out


def test_push_to_hub_with_card_uploads_weights_code_and_the_fwp_card(run_dirs, monkeypatch):
    fake = FakeHub(monkeypatch)
    model = FWPForCausalLM.from_pretrained(run_dirs["paper"])
    push_to_hub_with_card(model, "someone/fwp", card_kwargs={"run_dir": run_dirs["paper"]}, commit_message="m")
    assert {"model.safetensors", "config.json", "modeling_fwp.py", "README.md"} <= set(fake.uploaded)
    assert "fast-weight-programmer" in fake.readme and "| Optimizer steps | 20 |" in fake.readme


def test_publish_load_check_notices_different_logits(built, run_dirs, tokenizer):
    """publish.py's own check compares logits for real: a model that differs from the folder fails it."""
    model = FWPForCausalLM.from_pretrained(run_dirs["paper"]).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)
    with pytest.raises(publish.PublishError, match="logits differ"):
        publish.check_loads_without_package(built["paper"], model, tokenizer)


@pytest.mark.xfail("push_to_hub" not in FWPForCausalLM.__dict__, strict=True,
                   reason="FWPForCausalLM.push_to_hub is not wired to modeling_fwp.hub_card yet")
def test_model_push_to_hub_carries_the_fwp_card(run_dirs, monkeypatch):
    def no_generic_card(*args, **kwargs):  # transformers' own path would fetch the remote card: never here
        raise AssertionError("transformers' generic card was used")

    monkeypatch.setattr("transformers.utils.hub.create_and_tag_model_card", no_generic_card)
    assert "push_to_hub" in FWPForCausalLM.__dict__
    fake = FakeHub(monkeypatch)
    model = FWPForCausalLM.from_pretrained(run_dirs["paper"])
    model.add_model_tags(["my-tag"])
    model.push_to_hub("someone/fwp", commit_message="m", revision="v2")
    assert {"model.safetensors", "config.json", "modeling_fwp.py", "README.md"} <= set(fake.uploaded)
    assert "hub_card.py" not in fake.uploaded
    card = ModelCard(fake.readme)
    assert {"fast-weight-programmer", "fwp-delta-elu-plus-one", "my-tag"} <= set(card.data.tags)
    assert [c[0] for c in fake.calls] == ["create_repo", "branch", "upload"]
