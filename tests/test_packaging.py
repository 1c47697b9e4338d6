"""A plain (non-editable) install from the wheel works: presets, recipes, the embedded corpus and the model code all
travel in it, and building it prints no setuptools warning."""

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


def test_wheel_holds_code_presets_recipes_and_corpus(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("modeling_fwp/modeling_fwp.py", "modeling_fwp/compat.py", "modeling_fwp/configuration/models/tiny.json",
                 "modeling_fwp/configuration/recipes/tiny_cpu.json", "modeling_fwp/configuration/accelerate/fsdp.yaml",
                 "modeling_fwp/corpus/shakespeare-train.jsonl.xz"):
        assert name in names, name
    assert not any(name.startswith(("tests/", "scripts/")) for name in names)


def test_installed_wheel_loads_presets_and_the_corpus_from_another_folder(wheel, tmp_path):
    env_dir = tmp_path / "venv"
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
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
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
                         env={"PATH": str(env_dir / "bin"), "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[0] == "fwp"
