"""Files and folders the package writes get the modes the umask gives any new file (0644 / 0755 under umask 022),
not the private 0600 / 0700 of safetensors' writer (0.8) and of `tempfile.mkdtemp`, which the atomic-write helpers
(modeling_fwp/files.py) build folders in: a saved model, the main job's output, the tokenizer cache, a converted fla
folder and a Hub folder must be readable by the other users a umask lets read them. (The main job's own output
folder: tests/test_train.py::test_the_saved_model_files_get_the_umask_modes.)"""

import os
import stat
from pathlib import Path

import pytest
import torch

from modeling_fwp import FWPConfig, FWPForCausalLM
from modeling_fwp.files import install_folder, move_files_into, temporary_sibling

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(Path(path).stat().st_mode)


def assert_umask_modes(root: Path, mask: int):
    """root and everything below it: folders 0777 & ~mask, files 0666 & ~mask."""
    paths = [root, *root.rglob("*")]
    wrong = {str(p.relative_to(root.parent)): oct(mode(p)) for p in paths
             if mode(p) != ((0o777 if p.is_dir() else 0o666) & ~mask)}
    assert not wrong, f"expected {oct(0o777 & ~mask)} / {oct(0o666 & ~mask)}: {wrong}"


def tiny_model():
    torch.manual_seed(0)
    return FWPForCausalLM(FWPConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_heads=2))


def test_save_pretrained_gives_its_files_the_umask_modes(tmp_path, umask):
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    assert_umask_modes(folder, umask)


def test_save_pretrained_leaves_the_other_files_of_the_folder_alone(tmp_path, umask):
    folder = tmp_path / "model"
    folder.mkdir()
    private = folder / "notes.txt"
    private.write_text("mine")
    private.chmod(0o600)
    tiny_model().save_pretrained(folder)
    assert mode(private) == 0o600
    assert mode(folder / "model.safetensors") == 0o666 & ~umask


def test_install_folder_puts_a_folder_with_the_umask_modes_in_place(tmp_path, umask):
    target = tmp_path / "out"
    tmp = temporary_sibling(target, "writing")
    (tmp / "sub").mkdir()
    for name in ("a.bin", "sub/b.json"):
        (tmp / name).write_text("x")
        (tmp / name).chmod(0o600)  # as safetensors writes its files
    install_folder(tmp, target)
    assert_umask_modes(target, umask)
    tmp = temporary_sibling(target, "writing")  # replacing an existing folder
    (tmp / "c.bin").write_text("y")
    install_folder(tmp, target)
    assert_umask_modes(target, umask)


def test_move_files_into_gives_the_moved_files_the_umask_modes(tmp_path, umask):
    target, staging = tmp_path / "out", tmp_path / "staging"
    target.mkdir()
    staging.mkdir()
    (staging / "config.json").write_text("{}")
    (staging / "model.safetensors").write_text("x")
    (staging / "model.safetensors").chmod(0o600)
    move_files_into(staging, target, commit="config.json")
    assert_umask_modes(target, umask)


def test_the_tokenizer_cache_gets_the_umask_modes(tmp_path, umask):
    from modeling_fwp.tokenizer_utils import load_or_train_tokenizer

    texts = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer"] * 8
    load_or_train_tokenizer(texts, vocab_size=300, cache_dir=tmp_path / "cache", kind="word", log=lambda _: None)
    (folder,) = (tmp_path / "cache").iterdir()
    assert_umask_modes(folder, umask)


def test_a_converted_fla_folder_gets_the_umask_modes(tmp_path, umask):
    from test_convert_fla import fake_fla_folder

    from modeling_fwp.convert_fla import convert_fla

    source = fake_fla_folder(tmp_path / "fla")
    convert_fla(source, tmp_path / "fwp")
    assert_umask_modes(tmp_path / "fwp", umask)


def test_a_published_folder_gets_the_umask_modes(tmp_path, umask):
    from test_publish import make_run, publish
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["To be, or not to be, that is the question"] * 4,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<eos>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    run_dir = make_run(tmp_path / "run", tokenizer)
    assert publish.main([str(run_dir), "--out", str(tmp_path / "hub"), "--skip-load-check"]) == 0
    assert_umask_modes(tmp_path / "hub", umask)
