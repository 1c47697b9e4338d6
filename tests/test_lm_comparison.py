"""scripts/paper/lm_comparison.py (the paper's language-modelling comparison): the claim verdicts and the learning-rate
pick on made-up results, the run plan (finished runs skipped, failed ones redone), and a --scale quick run end to
end on a slice of the embedded corpus."""

import csv
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts" / "paper"))
import lm_comparison  # noqa: E402
import lm_comparison_report as report  # noqa: E402


def rows_for(model, values, lr=1e-3, sweep=False, field="valid_ppl", **extra):
    family = lm_comparison.MODELS[model][2]
    return [dict(run=lm_comparison.run_name(model, seed, lr), model=model, family=family, seed=str(seed),
                 learning_rate=str(lr), sweep="1" if sweep else "0", status="ok", **{field: str(v)}, **extra)
            for seed, v in enumerate(values)]


@pytest.mark.parametrize("a, b, verdict", [
    ([10.0, 10.1, 9.9], [12.0, 12.1, 11.9], "holds"),
    ([12.0, 12.1, 11.9], [10.0, 10.1, 9.9], "opposite"),
    ([10.0, 11.0, 12.0], [10.5, 11.5, 12.5], "not separated"),
    ([10.0], [12.0], "too few seeds"),
])
def test_compare_uses_twice_the_standard_error(a, b, verdict):
    assert report.compare(report.Stat(a), report.Stat(b))[0] == verdict


def test_ratio_claim_scales_the_standard_error():
    delta = report.Stat([30.0, 31.0, 29.0])  # 3x: 90 +- 3 (sd of 3x is 3)
    assert report.compare(delta, report.Stat([100.0, 101.0, 99.0]), factor=3.0)[0] == "holds"
    assert report.compare(delta, report.Stat([91.0, 92.0, 90.0]), factor=3.0)[0] == "not separated"
    assert report.compare(delta, report.Stat([60.0, 61.0, 59.0]), factor=3.0)[0] == "opposite"


def test_claims_follow_the_numbers():
    """C1 holds where the Delta Net is clearly lower and is 'opposite' the other way round; C6's second part
    compares the carried Delta Net with the truncated one's number on the same streams."""
    values = {"delta": [30.0, 30.2, 29.8], "linear": [35.0, 35.3, 34.8], "delta-carry": [31.0, 31.1, 30.9],
              "linear-carry": [200.0, 210.0, 190.0], "delta-pos": [30.0, 30.1, 29.9]}
    per_model = {model: rows_for(model, v) for model, v in values.items()}
    for row, truncated in zip(per_model["delta"], (29.0, 29.1, 28.9)):
        row["valid_nocarry_ppl"] = str(truncated)
    verdicts = {claim[:2] + str(i): v for i, (claim, _, _, v, _) in enumerate(report.claims(per_model, "valid"))}
    assert [verdicts[k] for k in ("C10", "C66", "C67", "C78")] == ["holds", "holds", "holds",
                                                                   "holds (no worse: not separated)"]
    assert verdicts["C21"] == "too few seeds"  # no Performer runs
    per_model["delta-carry"] = rows_for("delta-carry", [33.0, 33.1, 32.9])  # > 1.1 x 29.0
    assert report.claims(per_model, "valid")[7][3] == "opposite"
    per_model["delta"], per_model["linear"] = per_model["linear"], per_model["delta"]
    assert report.claims(per_model, "valid")[0][3] == "opposite"


def test_learning_rate_is_picked_per_family_on_validation():
    scale = dict(learning_rates=(1e-3, 2e-3))
    rows = (rows_for("linear", [40.0], lr=1e-3, sweep=True) + rows_for("linear", [38.0], lr=2e-3, sweep=True)
            + rows_for("delta", [37.0], lr=1e-3, sweep=True))
    picked = lm_comparison.pick_learning_rates(rows, scale, fixed={"softmax": 5e-4})
    assert picked == {"softmax": 5e-4, "sum": 2e-3, "delta": None}  # delta's grid is unfinished
    diverged = rows + [dict(rows_for("delta", ["nan"], lr=2e-3, sweep=True)[0], status="diverged")]
    assert lm_comparison.pick_learning_rates(diverged, scale, fixed={})["delta"] == 1e-3


def test_plan_skips_finished_runs_and_redoes_failed_ones():
    args = lm_comparison.parse_args(["--scale", "quick", "--out", "unused", "--seeds", "0", "1",
                                     "--models", "linear", "dpfp-sum", "--lr", "softmax=1e-3,delta=1e-3,sum=2e-3"])
    done = rows_for("linear", [30.0], lr=2e-3) + [dict(rows_for("dpfp-sum", [0], lr=2e-3)[0], status="failed")]
    planned = [run["run"] for run in lm_comparison.plan_runs(args, lm_comparison.SCALES["quick"], done)]
    assert planned == ["dpfp-sum-s0-lr0.002", "linear-s1-lr0.002", "dpfp-sum-s1-lr0.002"]


def test_bad_learning_rate_argument_names_the_families():
    with pytest.raises(SystemExit):
        lm_comparison.parse_args(["--out", "x", "--lr", "fwp=1e-3"])


@pytest.mark.slow
def test_quick_scale_end_to_end(tmp_path, monkeypatch):
    """Each kind of model trains and is evaluated (grid, two seeds, carried state, stream evaluations);
    a second call finds nothing left to do; the report judges every claim and writes the figure."""
    monkeypatch.setenv("MODELING_FWP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "lm"
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Results\n")
    # One model of each kind (softmax, sum and delta rules, FAVOR+, DPFP, carried state): every path of a run.
    models = ["transformer", "linear", "delta", "performer8-delta", "dpfp-sum", "delta-pos", "delta-carry"]
    argv = ["--scale", "quick", "--out", str(out), "--seeds", "0", "1", "--parallel", "2", "--device", "cpu",
            "--results-md", str(results_md), "--models", *models]
    lm_comparison.main(argv)
    with open(out / "results.csv", newline="") as source:
        rows = list(csv.DictReader(source))
    assert {r["status"] for r in rows} == {"ok"}, [r["error"] for r in rows if r["status"] != "ok"]
    grid = len(lm_comparison.SCALES["quick"]["learning_rates"])
    assert len(rows) == 2 * len(models) + 3 * (grid - 1)
    for row in rows:
        assert 1.0 < float(row["valid_ppl"]) < 400 and 1.0 < float(row["test_ppl"]) < 400
        assert float(row["tokens_per_second"]) > 0 and float(row["peak_memory_mib"]) > 0
        has_streams = row["model"] in lm_comparison.STREAM_EVALUATED
        assert bool(row["valid_nocarry_ppl"]) == has_streams
    carried = [r for r in rows if r["model"] == "delta-carry"]
    assert all(not math.isclose(float(r["valid_ppl"]), float(r["valid_nocarry_ppl"])) for r in carried)
    with open(out / "curves.csv", newline="") as source:
        curve = list(csv.DictReader(source))
    assert {int(c["tokens"]) for c in curve} == {3 * 4 * 32, 6 * 4 * 32}

    lm_comparison.main(argv)  # resumes: nothing left, same rows
    with open(out / "results.csv", newline="") as source:
        assert len(list(csv.DictReader(source))) == len(rows)
    text = (out / "report.md").read_text()
    for claim in ("C1", "C2", "C3", "C4", "C5", "C6", "C7"):
        assert f"| {claim} " in text
    assert (out / "fig_valid_ppl.png").stat().st_size > 0
    assert "<!-- lm-comparison-quick:begin -->" in results_md.read_text()
