"""Running a test file's CPU cases under Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported, and another test file may already have imported
triton in the pytest process. So each Triton test file runs its CPU cases in ONE subprocess: the file itself run
as a script with --worker, which calls `run_cases` and prints the results; its module fixture calls `worker_results`
and each test checks its own case's entry.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import traceback

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def launch_settings(module, overrides: dict):
    """A kernel module's launch-setting overrides (`module.TUNE`) for one case, cleared afterwards even when the case
    fails, so no setting leaks into the next case."""
    module.TUNE.clear()
    module.TUNE.update(overrides)
    try:
        yield
    finally:
        module.TUNE.clear()


def run_cases(cases: dict, run_case, **extra) -> None:
    """Worker side: run every case, add the `extra` entries (name -> function returning JSON-able data) and print
    the results for `worker_results`. An exception becomes that entry's {"error": traceback}, so one broken case
    fails its own test, not the whole file."""
    results = {}
    runs = {name: (lambda spec=spec: run_case(spec)) for name, spec in cases.items()} | extra
    for name, fn in runs.items():
        try:
            results[name] = fn()
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    print("RESULTS " + json.dumps(results))


def value_error_messages(tries: dict) -> dict:
    """{name: the ValueError message of calling tries[name]() (None when it raised nothing)}, for bad-input cases
    that must run in the worker too."""
    out = {}
    for name, fn in tries.items():
        try:
            fn()
            out[name] = None
        except ValueError as error:
            out[name] = str(error)
    return out


def worker_results(test_file: str, timeout: int = 900) -> dict:
    """Pytest side: run `test_file --worker` under the interpreter (no GPU visible) and return its results."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(test_file), "--worker"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreter worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULTS "):])
