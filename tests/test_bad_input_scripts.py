"""Issue 12, the scripts part: bad input and faults in scripts/train.py, scripts/generate.py and the data and tokenizer
helpers give a clear error that names the problem (or, where there is a sensible way on, take it and say so), never a
silent wrong result, and leave nothing changed or half-written on disk."""

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from modeling_fwp import FWPConfig, FWPForCausalLM, tokenizer_utils

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train  # noqa: E402
from test_train import MICRO, logged_losses, mini_corpus, run_args, tokenizer_cache, trained  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def snapshot(folder: Path) -> dict:
    """Every file under folder (relative path -> sha256 of its bytes)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_run(trained, destination: Path) -> Path:
    output_dir, _ = trained
    shutil.copytree(output_dir, destination)
    return destination


# ------------------------------------------------------------------------------------------------ 1. no tokenizer

def test_fine_tuning_a_folder_without_tokenizer_asks_for_one(trained, mini_corpus, tmp_path):
    """A fresh tokenizer trained for the fine-tuning data would give the model's ids other meanings."""
    model_dir = copy_run(trained, tmp_path / "no-tokenizer")
    for name in TOKENIZER_FILES:
        (model_dir / name).unlink(missing_ok=True)
    before = snapshot(model_dir)
    tuned = tmp_path / "tuned"
    with pytest.raises(ValueError, match=r"(?s)no-tokenizer.*no tokenizer.*--tokenizer") as refused:
        train.main(run_args(mini_corpus, tuned, "--model_name_or_path", str(model_dir), "--max_steps", "1",
                            "--save_strategy", "no"))
    assert str(model_dir) in str(refused.value)
    assert not tuned.exists() and snapshot(model_dir) == before
    # --tokenizer names the tokenizer to use (the same flag as in generate.py and publish.py)
    model_args, *_ = train.parse_arguments(["--model_name_or_path", str(model_dir), "--tokenizer", "some/tokenizer"])
    assert model_args.tokenizer_name_or_path == "some/tokenizer"


# ------------------------------------------------------------------------------ 2. resume with another config

def test_resume_with_other_config_overrides_is_refused(trained, mini_corpus, tmp_path):
    run_dir = copy_run(trained, tmp_path / "run")
    before = snapshot(run_dir)
    with pytest.raises(ValueError, match=r"(?s)checkpoint-12.*feature_map.*elu_plus_one.*relu") as refused:
        train.main(run_args(mini_corpus, run_dir, "--max_steps", "14", "--save_steps", "6", "--seed", "1",
                            "--resume_from_checkpoint", "last", "--config_overrides", MICRO + ",feature_map=relu"))
    message = str(refused.value)
    for bookkeeping in ("use_cache", "transformers_version", "architectures", "dtype"):
        assert bookkeeping not in message  # only the fields that change the model are named
    assert snapshot(run_dir) == before


# --------------------------------------------------------------------------- 3. half-written newest checkpoint

def test_resume_last_skips_a_half_written_checkpoint(trained, mini_corpus, tmp_path, capsys):
    """A run killed while saving checkpoint-12 left config.json and part of the weights, no trainer_state.json (the
    Trainer writes it last): "last" resumes from checkpoint-6, the newest complete one, and says so."""
    output_dir, _ = trained
    run_dir = copy_run(trained, tmp_path / "run")
    shutil.rmtree(run_dir / "checkpoint-12")
    half = run_dir / "checkpoint-12"
    half.mkdir()
    shutil.copy(run_dir / "checkpoint-6" / "config.json", half)
    weights = (run_dir / "checkpoint-6" / "model.safetensors").read_bytes()
    (half / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    capsys.readouterr()
    train.main(run_args(mini_corpus, run_dir, "--max_steps", "12", "--save_steps", "6", "--seed", "1",
                        "--resume_from_checkpoint", "last"))
    printed = capsys.readouterr().out
    assert "checkpoint-12" in printed and "incomplete" in printed and "trainer_state.json" in printed
    assert json.loads((run_dir / "trainer_state.json").read_text())["global_step"] == 12
    assert logged_losses(run_dir)[-6:] == pytest.approx(logged_losses(output_dir)[-6:], rel=1e-4)  # from step 6

    # With no complete checkpoint at all: an error naming the checkpoints and what each lacks.
    for name in ("checkpoint-6", "checkpoint-12"):
        (run_dir / name / "trainer_state.json").unlink()
    before = snapshot(run_dir)
    with pytest.raises(ValueError, match=r"(?s)no complete checkpoint.*checkpoint-12.*trainer_state.json"):
        train.main(run_args(mini_corpus, run_dir, "--max_steps", "12", "--resume_from_checkpoint", "true"))
    assert snapshot(run_dir) == before
    # An explicitly named incomplete checkpoint is refused the same way.
    with pytest.raises(ValueError, match=r"(?s)checkpoint-6.*incomplete.*trainer_state.json"):
        train.main(run_args(mini_corpus, run_dir, "--max_steps", "12",
                            "--resume_from_checkpoint", str(run_dir / "checkpoint-6")))
    assert snapshot(run_dir) == before


# ------------------------------------------------------------------------------------ 4. kill during final save

class SimulatedKill(BaseException):
    """Stands for SIGKILL / Ctrl-C: nothing may catch it."""


def test_a_kill_during_the_final_save_leaves_no_half_written_model(trained, mini_corpus, tmp_path, monkeypatch):
    from transformers import modeling_utils

    real_save_file = modeling_utils.safe_save_file

    def dies_half_way(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise SimulatedKill(filename)

    monkeypatch.setattr(modeling_utils, "safe_save_file", dies_half_way)

    # Over an existing model (--overwrite_output_dir): the old model stays whole.
    old = copy_run(trained, tmp_path / "over" / "run")
    before = snapshot(old)
    with pytest.raises(SimulatedKill):
        train.main(run_args(mini_corpus, old, "--overwrite_output_dir", "true", "--max_steps", "1",
                            "--save_strategy", "no"))
    assert snapshot(old) == before
    assert [p.name for p in old.parent.iterdir()] == ["run"]  # no temporary folder left beside it

    # Into a new folder: no model files appear (no config.json that would make it look like a saved model).
    new = tmp_path / "fresh" / "run"
    with pytest.raises(SimulatedKill):
        train.main(run_args(mini_corpus, new, "--max_steps", "1", "--save_strategy", "no"))
    assert not new.exists() or not any(new.iterdir())
    assert [p.name for p in new.parent.iterdir()] in ([], ["run"])


# ------------------------------------------------------------------------------------- 5. --max_train_minutes 0

@pytest.mark.parametrize("minutes", ["0", "-1", "nan", "soon"])
def test_max_train_minutes_must_be_positive(mini_corpus, tmp_path, minutes):
    output_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"--max_train_minutes.*{minutes}.*> 0.*omit"):
        train.main(run_args(mini_corpus, output_dir, "--max_train_minutes", minutes, "--max_steps", "1",
                            "--save_strategy", "no"))
    assert not output_dir.exists()
    assert "no limit" in train.RunArguments.__dataclass_fields__["max_train_minutes"].metadata["help"]
    # Absent means no limit; "none" lifts the limit a recipe sets (tiny_cpu: 8 minutes).
    assert train.parse_arguments(["--recipe", "none"])[2].max_train_minutes is None
    assert train.parse_arguments([])[2].max_train_minutes == 8.0
    assert train.parse_arguments(["--max_train_minutes", "none"])[2].max_train_minutes is None
    assert train.parse_arguments(["--max_train_minutes", "0.5"])[2].max_train_minutes == 0.5


# ------------------------------------------------------------------------------- 6. missing --model_name_or_path

def test_missing_model_folder_is_named(mini_corpus, tmp_path):
    missing = tmp_path / "no-such-model"
    output_dir = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=r"--model_name_or_path .*no-such-model.*no such") as refused:
        train.main(run_args(mini_corpus, output_dir, "--model_name_or_path", str(missing), "--max_steps", "1"))
    assert "Repo id" not in str(refused.value)
    for local in ("./no-such-model", "outputs/run/", "../model", "~/model", "C:\\models\\fwp"):
        with pytest.raises(FileNotFoundError, match="no such local folder"):
            train.build_config(train.ModelArguments(model_name_or_path=local))
    assert not output_dir.exists()
    # Hub ids are still looked up on the Hub (this machine has no network: only the classification is checked).
    for hub_id in ("someone/fwp-model", "gpt2", "org/model.v2"):
        assert not train.looks_like_local_path(hub_id)


# ------------------------------------------------------------------------------------------ 7. not UTF-8

@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_training_file_that_is_not_utf8_is_named(mini_corpus, tmp_path, suffix):
    lines = [json.dumps({"text": f"line {i} of a training document"}) for i in range(40)]
    bad_line = json.dumps({"text": "caf\u00e9 au lait"}, ensure_ascii=False)
    head, tail = "\n".join(lines[:30]) + "\n", "\n" + "\n".join(lines[30:])
    data = head.encode() + bad_line.encode("latin-1") + tail.encode()  # line 31 is Latin-1
    train_file = tmp_path / f"latin1{suffix}"
    train_file.write_bytes(data)
    validation = tmp_path / f"valid{suffix}"
    validation.write_text("\n".join(lines) + "\n", encoding="utf-8")
    output_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"(?s)train_file.*latin1.*not UTF-8.*0xe9.*line 31"):
        train.main(run_args(mini_corpus, output_dir, "--train_file", str(train_file), "--validation_file",
                            str(validation), "--text_sample_by", "line", "--max_steps", "1"))
    assert not output_dir.exists() and train_file.read_bytes() == data


# -------------------------------------------------------------------------------- 8. corrupt cached tokenizer

def test_corrupt_cached_tokenizer_is_rebuilt_with_a_message(tmp_path):
    texts = ["the delta rule writes into fast weights", "linear transformers are fast weight programmers"] * 20
    cache = tmp_path / "cache"
    first = tokenizer_utils.load_or_train_tokenizer(texts, vocab_size=270, cache_dir=cache, log=lambda _: None)
    (folder,) = cache.iterdir()
    good = (folder / "tokenizer.json").read_bytes()
    (folder / "tokenizer.json").write_bytes(good[: len(good) // 2])  # e.g. a disk that filled up
    said = []
    again = tokenizer_utils.load_or_train_tokenizer(texts, vocab_size=270, cache_dir=cache, log=said.append)
    message = " ".join(said)
    assert str(folder / "tokenizer.json") in message and "rebuild" in message
    assert again(texts[0])["input_ids"] == first(texts[0])["input_ids"]
    assert [p.name for p in cache.iterdir()] == [folder.name]  # replaced in place, nothing left beside it
    assert (folder / "tokenizer.json").read_bytes() == good  # whole again
    reused = []
    tokenizer_utils.load_or_train_tokenizer(texts, vocab_size=270, cache_dir=cache, log=reused.append)
    assert "Reusing" in reused[0]


# ---------------------------------------------------------------------------------- 9. generate.py prompts

def _load_generate():
    spec = importlib.util.spec_from_file_location("generate_script", REPO / "scripts" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def byte_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, hello fast weights", "the delta rule"] * 5, trainer=trainer)
    return tok


def _save(folder, tokenizer, vocab_size=300):
    torch.manual_seed(0)
    model = FWPForCausalLM(FWPConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_heads=2,
                                     head_dim=16, intermediate_size=64, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id, initializer_range=0.5))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval()


def test_generate_refuses_prompt_ids_outside_the_vocabulary(byte_bpe, tmp_path, capsys):
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_bpe, eos_token="<|endoftext|>", pad_token="<|pad|>")
    vocab_size = len(tokenizer)
    tokenizer.add_tokens([f"<x{i}>" for i in range(5)])  # 5 more tokens than the model has embedding rows
    _save(tmp_path / "model", tokenizer, vocab_size=vocab_size)
    script = _load_generate()
    for argv, named in ((["--prompt", "hello <x4>"], (str(vocab_size + 4), "<x4>", str(vocab_size))),
                        (["--prompt_ids", "5,400"], ("400", str(vocab_size)))):
        with pytest.raises(SystemExit) as stop:
            script.main([str(tmp_path / "model"), *argv, "--max_new_tokens", "2"])
        err = capsys.readouterr().err
        assert stop.value.code != 0 and all(word in err for word in named) and "vocab" in err, err


def test_generate_empty_prompt_starts_from_bos_or_is_refused(byte_bpe, tmp_path, capsys):
    script = _load_generate()
    # Without a BOS token there is nothing to start from: a clear error.
    plain = PreTrainedTokenizerFast(tokenizer_object=byte_bpe, eos_token="<|endoftext|>", pad_token="<|pad|>")
    _save(tmp_path / "plain", plain)
    with pytest.raises(SystemExit) as stop:
        script.main([str(tmp_path / "plain"), "--prompt", "", "--max_new_tokens", "2"])
    err = capsys.readouterr().err
    assert stop.value.code != 0 and "--prompt" in err and "empty" in err and "BOS" in err

    # With one (the tokenizers train.py makes), generation starts from it, as train.py's sample does.
    with_bos = PreTrainedTokenizerFast(tokenizer_object=byte_bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                       pad_token="<|pad|>")
    model = _save(tmp_path / "bos", with_bos)
    script.main([str(tmp_path / "bos"), "--prompt", "", "--max_new_tokens", "6"])
    with torch.no_grad():
        expected = model.generate(torch.tensor([[with_bos.bos_token_id]]), max_new_tokens=6, do_sample=False,
                                  eos_token_id=with_bos.eos_token_id, pad_token_id=with_bos.pad_token_id)
    printed = capsys.readouterr().out
    assert printed.strip() == with_bos.decode(expected[0], skip_special_tokens=True).strip() and printed.strip()
