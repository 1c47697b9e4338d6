"""The console commands of an install (pyproject.toml [project.scripts]), each running one of the repository's scripts
as `python scripts/NAME.py` does, with the same flags:

    fwp-train         scripts/train.py        the main job, training and fine-tuning (any train.py flag)
    fwp-generate      scripts/generate.py     text from a saved model folder (or a preset with random weights)
    fwp-publish       scripts/publish.py      a Hub-ready folder from a training output_dir, optionally uploaded
    fwp-convert-fla   scripts/convert_fla.py  an fla DeltaNet checkpoint as an FWP folder

A wheel carries these script files (and train.py's helpers, train_checkpoints.py and train_fsdp.py) as
modeling_fwp/scripts/, so the commands work from a plain `pip install .`; in a checkout or an editable install
they run scripts/ beside the package. The other scripts (the benchmarks in scripts/bench/, the paper's experiments in
scripts/paper/, the checks and test tools in scripts/checks/, the test runner) need the checkout. Under
`accelerate launch`, pass the command's file: `accelerate launch --config_file CONFIG "$(which fwp-train)" ...`.

Not imported by the model code.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

COMMANDS = {"fwp-train": "train.py", "fwp-generate": "generate.py", "fwp-publish": "publish.py",
            "fwp-convert-fla": "convert_fla.py"}


def scripts_dir() -> Path:
    """The scripts the commands run: inside the package when installed from a wheel (modeling_fwp/scripts), beside
    the package in a repository checkout (scripts/)."""
    package = Path(__file__).resolve().parent
    installed = package / "scripts"
    return installed if installed.is_dir() else package.parent / "scripts"


def run_script(command: str) -> None:
    """Runs the script behind `command` as the program `python SCRIPT args` would: as `__main__`, its folder first
    on sys.path, with `command` as the program name its --help and errors show."""
    path = scripts_dir() / COMMANDS[command]
    if not path.is_file():
        sys.exit(f"{command}: {path} is missing; reinstall modeling_fwp (pip install .) or run it from a checkout.")
    main = types.ModuleType("__main__")
    main.__file__ = str(path)
    main.__builtins__ = __builtins__
    saved = sys.modules.get("__main__"), sys.argv[0], list(sys.path)
    sys.modules["__main__"], sys.argv[0] = main, command
    sys.path.insert(0, str(path.parent))
    try:
        exec(compile(path.read_bytes(), str(path), "exec"), main.__dict__)
    finally:
        if saved[0] is not None:
            sys.modules["__main__"] = saved[0]
        sys.argv[0] = saved[1]
        sys.path[:] = saved[2]


def train() -> None:
    run_script("fwp-train")


def generate() -> None:
    run_script("fwp-generate")


def publish() -> None:
    run_script("fwp-publish")


def convert_fla() -> None:
    run_script("fwp-convert-fla")


__all__ = ["COMMANDS", "convert_fla", "generate", "publish", "run_script", "scripts_dir", "train"]
