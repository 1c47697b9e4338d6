"""Mutation testing as a habit (issue 16): the chosen one-line bugs of scripts/checks/mutation_test.py must still apply
to the source, and the CI subset of them must each make its tests fail.

The full list runs with `python scripts/checks/mutation_test.py --all` (~17 minutes on 2 busy CPU cores); here the 14
mutants of `--subset ci`, over 12 files, run in about 4 minutes. The subset runs without its baseline (the unmutated
selection): the suite runs those tests anyway, and a red baseline shows there.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts" / "checks"))
import mutation_test  # noqa: E402


def test_every_mutation_pattern_matches_the_current_source_once():
    assert mutation_test.problems_in_list(REPO) == []


def test_the_list_covers_every_module_and_the_ci_subset_a_spread_of_them():
    covered = {m.file for m in mutation_test.MUTATIONS}
    modules = {f"modeling_fwp/{name}.py" for name in (
        "modeling_fwp", "sequence_layout", "configuration_fwp", "cache_fwp", "feature_maps", "ops", "ops_chunk",
        "losses", "presets", "data", "tokenizer_utils", "compat", "ops_triton_forward", "ops_triton_launch",
        "norm_triton", "conv_triton", "__init__")}
    assert modules | {"scripts/train.py"} <= covered
    ci = [m for m in mutation_test.MUTATIONS if m.ci]
    assert 8 <= len(ci) <= 16 and len({m.file for m in ci}) >= 10


@pytest.mark.slow
def test_ci_subset_of_mutants_is_killed(tmp_path):
    results = tmp_path / "results.json"
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "checks" / "mutation_test.py"), "--subset", "ci",
                          "--no-baseline", "--json", str(results)], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    statuses = {r["id"]: r["status"] for r in json.loads(results.read_text())["results"]}
    assert statuses and set(statuses.values()) == {"killed"}, statuses  # a timeout is no proof of a catch
