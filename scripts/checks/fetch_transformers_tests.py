#!/usr/bin/env python
"""Puts transformers' own model-test harness where tests/test_transformers_common.py finds it (outside the repository).

tests/test_transformers_common.py runs transformers' `ModelTesterMixin` (tests/test_modeling_common.py) and
`GenerationTesterMixin` (tests/generation/test_utils.py) against FWP models. Those files are not copied into this
repository; they live in a cache directory, one folder per transformers version:

    $FWP_TRANSFORMERS_TESTS/<version>/tests/            (default: ~/.cache/modeling_fwp/transformers-tests)
        __init__.py, test_modeling_common.py, ...        <- the sdist of that transformers release on PyPI
        generation/__init__.py, generation/test_utils.py <- a public transformers source tree (not in the sdist)
        exporters/__init__.py, exporters/test_export.py  <- the same source tree (not in the sdist)

1. The sdist part needs only PyPI. The test module does it by itself when the folder is missing (and skips, saying
   why, when PyPI cannot be reached); this script does the same by hand:

       python scripts/checks/fetch_transformers_tests.py                 # the installed transformers version
       python scripts/checks/fetch_transformers_tests.py --version 5.17.0

   It runs `pip download --no-binary :all: --no-deps transformers==<version>`, checks the archive against the
   sha256 pinned in the test module (for the versions pinned there) and unpacks its tests/*.py.

2. The generation/exporters part is not in any sdist and CI has no GitHub access, so a developer places it once per
   machine, from a clone (or bare mirror) of https://github.com/huggingface/transformers that holds the commit pinned
   in the test module (UPSTREAM_COMMIT):

       git clone --filter=blob:none https://github.com/huggingface/transformers /tmp/transformers
       python scripts/checks/fetch_transformers_tests.py --git-dir /tmp/transformers/.git

   or from a folder holding tests/generation/test_utils.py and tests/exporters/test_export.py of that commit
   (`--from-dir`). Either way every file is checked against the sha256 pinned in the test module before it is
   written. Without this part the ModelTesterMixin tests still run (with a labelled stand-in for the
   ExportTesterMixin import) and the GenerationTesterMixin tests are skipped, saying why.

The pins (versions, commit, checksums) are constants in tests/test_transformers_common.py; this script reads them
from there, so there is one place to change them.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # scripts/checks/ -> the repository root
TEST_MODULE = REPO / "tests" / "test_transformers_common.py"
ENV_VAR = "FWP_TRANSFORMERS_TESTS"
# The files of the sdist's tests/ the harness needs are all at its top level; the sdist has no tests/__init__.py.
SDIST_MARKER = "test_modeling_common.py"


class Unavailable(RuntimeError):
    """The harness files cannot be had (no network, no such release, a checksum mismatch)."""


def cache_root() -> Path:
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "modeling_fwp" / "transformers-tests").expanduser()


def version_dir(version: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / version


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_pins(test_module: Path = TEST_MODULE) -> dict:
    """The literal constants of the test module (parsed, not imported: importing it would run the harness)."""
    pins = {}
    for node in ast.parse(test_module.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                pins[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return pins


# --- 1. the sdist part ----------------------------------------------------------------------------------------------
def ensure_sdist_tests(version: str, sha256: str | None = None, root: Path | None = None, timeout: int = 60) -> Path:
    """The version's folder with the sdist's tests/ in it, downloading and unpacking it first if it is missing.
    Raises `Unavailable` (with the reason) when it cannot be had."""
    target = version_dir(version, root)
    if (target / "tests" / SDIST_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"transformers-{version}-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                   "--disable-pip-version-check", "--quiet", "--timeout", "15", "--retries", "1",
                   f"transformers=={version}", "-d", str(tmp / "download")]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise Unavailable(f"`pip download` of the transformers {version} sdist did not finish: {error}") from error
        archives = sorted((tmp / "download").glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not archives:
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise Unavailable(f"`pip download` of the transformers {version} sdist failed (no network or no such "
                              f"release?): {last[0]}")
        archive = archives[0]
        if sha256 is not None and sha256_of(archive) != sha256:
            raise Unavailable(f"{archive.name} has sha256 {sha256_of(archive)}, not the pinned {sha256}.")
        staging = tmp / "tree"
        (staging / "tests").mkdir(parents=True)
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts  # transformers-<version>/tests/<file>.py
                if len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py") and member.isfile():
                    with tar.extractfile(member) as source, open(staging / "tests" / parts[2], "wb") as out:
                        shutil.copyfileobj(source, out)
        if not (staging / "tests" / SDIST_MARKER).is_file():
            raise Unavailable(f"{archive.name} has no tests/{SDIST_MARKER}.")
        (staging / "tests" / "__init__.py").touch()  # the harness uses relative imports: tests/ must be a package
        (staging / "tests" / "SDIST").write_text(f"{archive.name} sha256={sha256_of(archive)}\n")
        target.mkdir(exist_ok=True)
        if (target / "tests").exists():  # a half-populated folder (e.g. only the upstream part): merge into it
            for path in (staging / "tests").iterdir():
                os.replace(path, target / "tests" / path.name)
        else:
            os.replace(staging / "tests", target / "tests")
    return target


# --- 2. the upstream (git) part -------------------------------------------------------------------------------------
def upstream_status(folder: Path, files: dict[str, str]) -> dict[str, str | None]:
    """For each pinned upstream file: None when it is present with the pinned sha256, else why it is not usable."""
    status = {}
    for relative, digest in files.items():
        path = folder / relative
        if not path.is_file():
            status[relative] = f"{path} is missing"
        elif sha256_of(path) != digest:
            status[relative] = f"{path} has sha256 {sha256_of(path)}, not the pinned {digest}"
        else:
            status[relative] = None
    return status


def install_upstream(folder: Path, files: dict[str, str], commit: str, git_dir: Path | None = None,
                     from_dir: Path | None = None) -> None:
    for relative, digest in files.items():
        if git_dir is not None:
            result = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"{commit}:{relative}"],
                                    capture_output=True)
            if result.returncode != 0:
                raise Unavailable(f"git show {commit}:{relative} failed: {result.stderr.decode().strip()}")
            data = result.stdout
        else:
            data = (from_dir / relative).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise Unavailable(f"{relative} from {git_dir or from_dir} has sha256 {hashlib.sha256(data).hexdigest()}, "
                              f"not the pinned {digest} (commit {commit}).")
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        (target.parent / "__init__.py").touch()
        target.write_bytes(data)
        print(f"wrote {target}")
    (folder / "tests" / "UPSTREAM").write_text(f"https://github.com/huggingface/transformers commit {commit}\n")


def main(argv=None) -> int:
    import importlib.metadata

    pins = read_pins()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default=importlib.metadata.version("transformers"),
                        help="transformers release whose sdist tests/ to fetch (default: the installed one)")
    parser.add_argument("--root", type=Path, default=None, help=f"cache root (default: ${ENV_VAR} or ~/.cache/...)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--git-dir", type=Path, help="a transformers git directory holding the pinned commit")
    source.add_argument("--from-dir", type=Path, help="a folder holding the pinned upstream files under tests/")
    args = parser.parse_args(argv)

    tested = pins["SDIST_SHA256"]
    if args.version not in tested:
        print(f"note: transformers {args.version} is not among the pinned releases {sorted(tested)}; its sdist is "
              "used without a checksum and the skip list was not reviewed against it.")
    folder = ensure_sdist_tests(args.version, tested.get(args.version), root=args.root)
    print(f"sdist tests of transformers {args.version}: {folder / 'tests'}")
    files, commit = pins["UPSTREAM_FILES"], pins["UPSTREAM_COMMIT"]
    if args.git_dir or args.from_dir:
        install_upstream(folder, files, commit, git_dir=args.git_dir, from_dir=args.from_dir)
    missing = {k: v for k, v in upstream_status(folder, files).items() if v}
    if missing:
        print(f"upstream part missing ({'; '.join(missing.values())}).\nPlace it with --git-dir (a clone of "
              f"{pins['UPSTREAM_REPOSITORY']} holding commit {commit}) or --from-dir; until then the "
              "GenerationTesterMixin tests are skipped.")
    else:
        print(f"upstream part (commit {commit}) present and verified.")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Unavailable as error:
        sys.exit(f"error: {error}")
