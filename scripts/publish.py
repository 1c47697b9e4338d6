#!/usr/bin/env python
"""Build a Hub-ready folder from a trained FWP output_dir and, with --push, upload it.

    python scripts/publish.py OUTPUT_DIR --out BUILD_DIR                      # dry run: build, list what would go up
    python scripts/publish.py OUTPUT_DIR --out BUILD_DIR --push --repo-id me/fwp-tiny [--private] [--revision REV]

The folder holds safetensors weights, config.json with auto_map, the model code (so that
`AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)` works without modeling_fwp installed), the
tokenizer, generation_config.json and a README.md model card. OUTPUT_DIR is only read. BUILD_DIR appears complete or
not at all: the build happens in a temporary sibling folder renamed into place at the end. Every failure ends with one
`publish.py: error: ...` line on stderr and exit status 1 (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if (REPO_ROOT / "modeling_fwp" / "__init__.py").is_file():  # not when installed as modeling_fwp/scripts/ (fwp-publish)
    sys.path.insert(0, str(REPO_ROOT))  # this checkout's modeling_fwp, installed or not (as scripts/train.py does)

CODE_FILES = ("configuration_fwp.py", "modeling_fwp.py")
TOKENIZER_FILES = ("tokenizer_config.json",)
# The card machinery must stay out of the Hub copy: remote-code users lack the template it needs.
MUST_NOT_SHIP = ("hub_card.py",)


class PublishError(Exception):
    """A failure the user can act on; its message is the one line printed."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output_dir", type=Path, help="a training output_dir (model, tokenizer, trainer_state.json)")
    p.add_argument("--out", dest="build_dir", type=Path, required=True, help="where to build the Hub-ready folder")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty BUILD_DIR (atomically)")
    p.add_argument("--tokenizer", help="tokenizer name or path, when OUTPUT_DIR has none")
    p.add_argument("--repo-id", help="Hub repository, e.g. user/fwp-tiny (also named in the card's usage snippet)")
    p.add_argument("--push", action="store_true", help="upload BUILD_DIR to --repo-id (default: dry run)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", help="branch to push to (created from main if missing)")
    p.add_argument("--commit-message", default="Upload FWP model", help="commit message of the upload")
    p.add_argument("--license", default="apache-2.0", help="license id in the card metadata")
    p.add_argument("--dataset-id", help="Hub dataset id the model was trained on (card metadata)")
    p.add_argument("--dataset-name", help="readable name of the training data (card text)")
    p.add_argument("--skip-load-check", action="store_true",
                   help="skip loading the built folder in a fresh process without modeling_fwp")
    args = p.parse_args(argv)
    if args.push and not args.repo_id:
        p.error("--push needs --repo-id NAME")
    if args.private and not args.push:
        p.error("--private only applies with --push")
    return args


# ---------------------------------------------------------------- paths


def is_within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_paths(output_dir: Path, build_dir: Path, overwrite: bool) -> tuple[Path, Path]:
    output_dir, build_dir = output_dir.resolve(), build_dir.resolve()
    if not (output_dir / "config.json").is_file():
        raise PublishError(f"OUTPUT_DIR {output_dir} has no config.json: pass the output_dir a training run saved to")
    try:
        model_type = json.loads((output_dir / "config.json").read_text()).get("model_type")
    except ValueError as err:
        raise PublishError(f"OUTPUT_DIR {output_dir}: config.json is not valid JSON ({one_line(err)})") from err
    if model_type != "fwp":
        raise PublishError(f"OUTPUT_DIR {output_dir} holds a {model_type!r} model, not an FWP model (model_type 'fwp')")
    if is_within(build_dir, output_dir) or is_within(output_dir, build_dir):
        raise PublishError(f"--out {build_dir} must lie outside OUTPUT_DIR {output_dir} (which is never modified)")
    if build_dir.exists():
        if not build_dir.is_dir():
            raise PublishError(f"--out {build_dir} exists and is not a folder")
        if any(build_dir.iterdir()) and not overwrite:
            raise PublishError(f"--out {build_dir} exists and is not empty; pass --overwrite to replace it")
    if not build_dir.parent.is_dir():
        raise PublishError(f"--out {build_dir}: parent folder {build_dir.parent} does not exist")
    return output_dir, build_dir


def list_files(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def human_size(n: int) -> str:
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {suffix}"
    return f"{n} B"


# ---------------------------------------------------------------- build


def build_into(folder: Path, output_dir: Path, args) -> None:
    """Re-save the model through transformers so that auto_map and every code file it needs are written, then add
    tokenizer, generation config and card."""
    import modeling_fwp  # registers the Auto classes and register_for_auto_class
    from transformers import AutoTokenizer, GenerationConfig

    from modeling_fwp.hub_card import render_model_card

    try:
        model = modeling_fwp.FWPForCausalLM.from_pretrained(output_dir, dtype="auto")
    except Exception as err:
        raise PublishError(f"cannot load the model in {output_dir}: {one_line(err)}") from err
    model.save_pretrained(folder, safe_serialization=True)
    if (output_dir / "generation_config.json").is_file():  # the run's own decoding defaults win over the model's
        GenerationConfig.from_pretrained(output_dir).save_pretrained(folder)

    tokenizer_source = args.tokenizer or str(output_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    except Exception as err:
        hint = "" if args.tokenizer else "; pass --tokenizer NAME_OR_PATH"
        raise PublishError(f"cannot load a tokenizer from {tokenizer_source}: {one_line(err)}{hint}") from err
    if len(tokenizer) > model.config.vocab_size:
        raise PublishError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}"
        )
    tokenizer.save_pretrained(folder)

    data = {k: v for k, v in (("dataset_id", args.dataset_id), ("dataset_name", args.dataset_name)) if v}
    card = render_model_card(
        model.config,
        num_parameters=model.num_parameters(),
        run_dir=output_dir,
        repo_id=args.repo_id,
        license=args.license,
        data=data,
    )
    card.save(folder / "README.md")
    verify_folder(folder)
    if not args.skip_load_check:
        check_loads_without_package(folder, model, tokenizer)


def verify_folder(folder: Path) -> None:
    """What a remote-code user needs, checked file by file."""
    from transformers.dynamic_module_utils import get_imports, get_relative_imports

    config = json.loads((folder / "config.json").read_text())
    auto_map = config.get("auto_map") or {}
    for auto_class in ("AutoConfig", "AutoModelForCausalLM"):
        if auto_class not in auto_map:
            raise PublishError(f"config.json lacks auto_map['{auto_class}']: is register_for_auto_class called?")
    needed = set(CODE_FILES) | {ref.split(".")[0] + ".py" for ref in auto_map.values()}
    for name in sorted(needed):
        if not (folder / name).is_file():
            raise PublishError(f"code file {name} was not written next to the weights")
    for path in folder.glob("*.py"):
        for module in get_relative_imports(path):
            if not (folder / f"{module}.py").is_file():
                raise PublishError(f"{path.name} imports .{module} but {module}.py was not copied")
        if "modeling_fwp" in get_imports(path):
            raise PublishError(f"{path.name} imports the modeling_fwp package absolutely; use a relative import")
    for name in MUST_NOT_SHIP:
        if (folder / name).exists():
            raise PublishError(f"{name} was copied with the model code: the model must not import it")
    if not list(folder.glob("*.safetensors")):
        raise PublishError("no .safetensors weights were written")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise PublishError("no tokenizer files were written")


LOAD_CHECK = r"""
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "modeling_fwp" or name.startswith("modeling_fwp."):
            raise ImportError("modeling_fwp is blocked: the folder must load on its own")
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModelForCausalLM
folder, ids_path, logits_path = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
ids = torch.load(ids_path)
with torch.no_grad():
    logits = model(ids).logits
expected = torch.load(logits_path)
err = (logits.double() - expected.double()).abs().max().item()
print(json.dumps({"max_abs_diff": err, "module": type(model).__module__}))
"""


def check_loads_without_package(folder: Path, model, tokenizer) -> None:
    """Load the folder in a fresh Python where `import modeling_fwp` fails; it must give the same logits."""
    import torch

    model.eval()
    text = "To be, or not to be, that is the question"
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :32]
    if ids.shape[1] == 0:
        ids = torch.tensor([[0, 1, 2]])
    with torch.no_grad():
        expected = model(ids).logits
    with tempfile.TemporaryDirectory() as scratch:
        torch.save(ids, f"{scratch}/ids.pt")
        torch.save(expected, f"{scratch}/logits.pt")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        env.update(HF_MODULES_CACHE=f"{scratch}/modules", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
                   HF_HUB_DISABLE_PROGRESS_BARS="1")
        proc = subprocess.run(
            [sys.executable, "-c", LOAD_CHECK, str(folder), f"{scratch}/ids.pt", f"{scratch}/logits.pt"],
            cwd=scratch, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
        )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PublishError(f"the built folder does not load without modeling_fwp installed: {last}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["module"].startswith("transformers_modules"):
        raise PublishError(f"load check used {result['module']}, not the folder's code")
    tolerance = 1e-5 * max(1.0, expected.abs().max().item())
    if not result["max_abs_diff"] <= tolerance:
        raise PublishError(f"the built folder's logits differ from the original by {result['max_abs_diff']:.3g}")


@contextlib.contextmanager
def quiet_transformers():
    """Progress bars and warnings would bury the lines that matter; restored after, for callers in-process."""
    from transformers.utils import logging as transformers_logging

    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def build(output_dir: Path, build_dir: Path, args) -> None:
    from modeling_fwp.files import install_folder, temporary_sibling  # shared with scripts/train.py

    tmp = temporary_sibling(build_dir, "building")
    try:
        with quiet_transformers():
            build_into(tmp, output_dir, args)
        install_folder(tmp, build_dir)  # build_dir holds the old folder or the complete new one, never a mix
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- hub


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def is_network_error(err: BaseException) -> bool:
    names = {cls.__name__ for cls in type(err).__mro__}
    return isinstance(err, (ConnectionError, TimeoutError)) or bool(
        names & {"ConnectError", "NetworkError", "TransportError", "TimeoutException", "ConnectionError"}
    )


def hub_error(err: BaseException, action: str) -> PublishError:
    """One actionable line for a failed Hub call."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return PublishError(f"{action}: HF_HUB_OFFLINE is set; unset it to push")
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        if status == 401:
            return PublishError(f"{action}: the Hub refused the token (401); run `hf auth login` or set HF_TOKEN "
                                "to a valid token with write access")
        if status == 403:
            return PublishError(f"{action}: permission denied (403); the token needs write access to this repository")
        return PublishError(f"{action}: the Hub answered {status}: {one_line(err)}")
    if is_network_error(err):
        return PublishError(f"{action}: cannot reach the Hub at {constants.ENDPOINT} ({one_line(err)})")
    return PublishError(f"{action}: {type(err).__name__}: {one_line(err)}")


def resolve_token() -> str:
    from huggingface_hub import get_token

    token = get_token()  # HF_TOKEN, then the login saved under HF_HOME
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    return token


def check_login(api) -> str:
    try:
        return api.whoami()["name"]
    except Exception as err:
        raise hub_error(err, "login check failed") from err


def push(api, folder: Path, args) -> str:
    try:
        repo_id = api.create_repo(args.repo_id, private=args.private or None, exist_ok=True).repo_id
        if args.revision:
            api.create_branch(repo_id, branch=args.revision, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=args.revision,
                          commit_message=args.commit_message)
    except Exception as err:
        raise hub_error(err, f"upload to {args.repo_id} failed (the built folder {folder} is intact; rerun to retry)") from err
    return repo_id


# ---------------------------------------------------------------- main


def run(args) -> None:
    output_dir, build_dir = check_paths(args.output_dir, args.build_dir, args.overwrite)
    api = None
    if args.push:  # fail before building when the upload cannot work
        from huggingface_hub import HfApi

        api = HfApi(token=resolve_token())
        user = check_login(api)
        print(f"logged in to the Hub as {user}")
    build(output_dir, build_dir, args)
    files = list_files(build_dir)
    print(f"built {build_dir} ({len(files)} files, {human_size(sum(size for _, size in files))}):")
    for name, size in files:
        print(f"  {size:>12,}  {name}")
    if not args.push:
        target = args.repo_id or "REPO_ID"
        branch = f" --revision {args.revision}" if args.revision else ""
        print(f"dry run: nothing uploaded; these files go to the Hub with: "
              f"python scripts/publish.py {args.output_dir} --out {args.build_dir} --overwrite --push --repo-id {target}{branch}")
        return
    repo_id = push(api, build_dir, args)
    from huggingface_hub import constants

    suffix = f"/tree/{args.revision}" if args.revision else ""
    print(f"uploaded to {constants.ENDPOINT}/{repo_id}{suffix}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except PublishError as err:
        print(f"publish.py: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("publish.py: error: interrupted; BUILD_DIR was left as it was", file=sys.stderr)
        return 130
    except Exception as err:  # unexpected: still one line, the type says where to look
        print(f"publish.py: error: {type(err).__name__}: {one_line(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
