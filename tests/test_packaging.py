"""A plain (non-editable) install from the wheel works: presets, recipes, the embedded corpus, the model code, the
model-card template and the scripts behind the console commands (fwp-train, fwp-generate, fwp-publish,
fwp-convert-fla) all travel in it, the commands run from another folder, and building it prints no setuptools
warning."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(out), str(REPO)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    log = build.stdout + build.stderr
    for warning in ("SetuptoolsDeprecationWarning", "would be ignored", "_Warning"):
        assert warning not in log, log[log.index(warning) - 500:log.index(warning) + 1500]
    (path,) = out.glob("modeling_fwp-*.whl")
    return path


COMMANDS = {"fwp-train": "train.py", "fwp-generate": "generate.py", "fwp-publish": "publish.py",
            "fwp-convert-fla": "convert_fla.py"}


def test_wheel_holds_code_presets_recipes_corpus_card_and_command_scripts(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("modeling_fwp/modeling_fwp.py", "modeling_fwp/compat.py", "modeling_fwp/configuration/models/tiny.json",
                 "modeling_fwp/configuration/recipes/tiny_cpu.json", "modeling_fwp/configuration/accelerate/fsdp.yaml",
                 "modeling_fwp/corpus/shakespeare-train.jsonl.xz", "modeling_fwp/cli.py",
                 "modeling_fwp/hub_cards/fwp_model_card.md",
                 *(f"modeling_fwp/scripts/{n}" for n in ("train_checkpoints.py", "train_fsdp.py", *COMMANDS.values()))):
        assert name in names, name
    assert not any(name.startswith(("tests/", "scripts/")) for name in names)
    # only what the commands run: benchmarks and the test tools need the checkout
    assert sorted(n for n in names if n.startswith("modeling_fwp/scripts/")) == sorted(
        f"modeling_fwp/scripts/{n}" for n in ("train_checkpoints.py", "train_fsdp.py", *COMMANDS.values()))
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for command in COMMANDS:
        assert f"{command} = modeling_fwp.cli:" in text, text


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """A new environment with the wheel installed (not editable) and a folder outside the checkout to run in."""
    root = tmp_path_factory.mktemp("installed")
    env_dir = root / "venv"
    # A new environment that sees this interpreter's packages (torch, transformers, ...) through a .pth file (which,
    # unlike --system-site-packages, also works when this interpreter is itself a virtual environment), with the
    # wheel's modeling_fwp installed in front of them.
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)
    python = env_dir / "bin" / "python"
    site_of = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    parent = subprocess.run([sys.executable, "-c", site_of], capture_output=True, text=True, check=True).stdout.strip()
    own = subprocess.run([str(python), "-c", site_of], capture_output=True, text=True, check=True).stdout.strip()
    Path(own, "_parent_environment.pth").write_text(f"import site; site.addsitedir({parent!r})\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": str(env_dir / "bin"), "HOME": str(root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MODELING_FWP_CACHE": str(root / "cache")}
    return {"python": python, "bin": env_dir / "bin", "cwd": elsewhere, "env": env}


def test_installed_wheel_loads_presets_and_the_corpus_from_another_folder(installed):
    python, elsewhere = installed["python"], installed["cwd"]
    probe = (
        "import pathlib, modeling_fwp\n"
        "from modeling_fwp import data, presets\n"
        "assert 'site-packages' in modeling_fwp.__file__, modeling_fwp.__file__\n"
        "assert 'tiny' in modeling_fwp.list_presets()\n"
        "config = modeling_fwp.load_preset('tiny')\n"
        "assert (presets.configuration_dir() / 'recipes' / 'tiny_cpu.json').is_file()\n"
        "assert all(pathlib.Path(f).is_file() for f in data.corpus_files().values())\n"
        "print(config.model_type, len(modeling_fwp.list_presets()))\n"
    )
    run = subprocess.run([str(python), "-c", probe], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                         env=installed["env"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[0] == "fwp"


def _command(installed, *args, timeout=300):
    return subprocess.run([str(installed["bin"] / args[0]), *map(str, args[1:])], cwd=installed["cwd"],
                          capture_output=True, text=True, timeout=timeout, env=installed["env"],
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_installed_commands_show_their_help(installed, command):
    run = _command(installed, command, "--help")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith(f"usage: {command}"), run.stdout[:500]


def test_installed_commands_run_the_installed_code(installed):
    """fwp-generate samples from a preset, fwp-publish builds a Hub folder (its card template comes from the wheel),
    fwp-convert-fla refuses a folder without weights: each with the wheel's modeling_fwp, from outside the checkout."""
    cwd = installed["cwd"]
    run = _command(installed, "fwp-generate", "tiny", "--prompt_ids", "1,2,3", "--max_new_tokens", "3")
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(run.stdout.split()) == 6 and run.stdout.split()[:3] == ["1", "2", "3"], run.stdout
    make_run = (
        "import json, modeling_fwp, pathlib, torch\n"
        "assert 'site-packages' in modeling_fwp.__file__, modeling_fwp.__file__\n"
        "from tokenizers import Tokenizer, models, pre_tokenizers, trainers\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "tok = Tokenizer(models.BPE(unk_token='<unk>'))\n"
        "tok.pre_tokenizer = pre_tokenizers.Whitespace()\n"
        "tok.train_from_iterator(['To be, or not to be, that is the question'] * 4,\n"
        "                        trainers.BpeTrainer(vocab_size=60, special_tokens=['<unk>', '<eos>']))\n"
        "tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token='<unk>', eos_token='<eos>')\n"
        "config = modeling_fwp.FWPConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_heads=2)\n"
        "modeling_fwp.FWPForCausalLM(config).save_pretrained('run')\n"
        "tokenizer.save_pretrained('run')\n"
    )
    made = subprocess.run([str(installed["python"]), "-c", make_run], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=installed["env"])
    assert made.returncode == 0, made.stderr[-3000:]
    run = _command(installed, "fwp-publish", "run", "--out", "hub", "--skip-load-check")
    assert run.returncode == 0, run.stderr[-3000:]
    assert (cwd / "hub" / "README.md").is_file() and (cwd / "hub" / "model.safetensors").is_file()
    assert "Fast Weight Programmer" in (cwd / "hub" / "README.md").read_text()
    run = _command(installed, "fwp-convert-fla", "hub", "converted")  # an FWP folder is no fla folder
    assert run.returncode == 1 and "convert_fla:" in run.stderr, run.stderr[-3000:]
