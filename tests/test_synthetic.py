"""Tests of scripts/paper/synthetic_retrieval.py and its parts (scripts/paper/synthetic/): the task generator, the
stacked models against a direct float64 loop, the exactness of padding/compaction, the report logic, and the --quick
mode end to end (CI smoke test)."""

import csv
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from modeling_fwp.feature_maps import build_feature_map

# The command and its parts (scripts/paper/synthetic/), imported as the command imports them.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "paper"))
import synthetic_retrieval as command  # noqa: E402
from synthetic import experiments, models, report, task, training  # noqa: E402


# ----------------------------------------------------------------------------------------------- task generator


def test_targets_are_the_most_recent_value_of_the_queried_key():
    gen = torch.Generator().manual_seed(0)
    keys, values = task.sample_sequences(16, [5, 7], [10, 14], True, gen)
    table = task.latest_values(keys, values, 7)
    for d, (size, length) in enumerate(((5, 10), (7, 14))):
        for b in range(16):
            expected = [-1] * 7
            for t in range(length):  # later writes win
                expected[keys[d, b, t]] = int(values[d, b, t])
            assert table[d, b].tolist() == expected
            assert (keys[d, b, length:] == 7).all()  # padding is the sentinel key, never a real one
    query, target = task.sample_queries(keys, table, [10, 14], gen)
    for d, length in enumerate((10, 14)):
        for b in range(16):
            q = int(query[d, b, 0])
            assert q in keys[d, b, :length].tolist()
            last = max(t for t in range(length) if keys[d, b, t] == q)
            assert int(target[d, b, 0]) == int(values[d, b, last])


def test_with_replacement_keys_repeat_and_without_they_do_not():
    gen = torch.Generator().manual_seed(1)
    keys, values = task.sample_sequences(32, [6], [12], True, gen)  # L = 2S: every sequence must repeat a key
    assert all(len(set(row.tolist())) < 12 for row in keys[0])
    assert keys.min() >= 0 and keys.max() < 6 and values.max() < 6
    keys, values = task.sample_sequences(32, [6, 9], [6, 9], False, gen)
    for d, size in enumerate((6, 9)):
        for row_k, row_v in zip(keys[d, :, :size], values[d, :, :size]):
            assert sorted(row_k.tolist()) == list(range(size))  # L = S without replacement: a permutation
            assert sorted(row_v.tolist()) == list(range(size))
    with pytest.raises(ValueError):
        task.sample_sequences(2, [4], [5], False, gen)


# ----------------------------------------------------------------------------------------------- model vs loop


def unpadded_parameters(bank, r):
    """Run r's own parameters, cut out of the bank's padded stacks (float64)."""
    run = bank.specs[r]
    e, s, e_pad = run.d_emb, run.S, bank.e_pad
    p = {n: t[r].detach().double() for n, t in bank.params.items()}
    rows = lambda w: torch.cat([w[:e], w[e_pad : e_pad + s]])  # noqa: E731  embedding rows, one-hot rows
    return {"emb": p["emb"][:s, :e], "w_k": rows(p["w_k"]), "b_k": p["b_k"], "w_q": p["w_q"][:e], "b_q": p["b_q"],
            "w_beta": rows(p["w_beta"])[:, 0], "b_beta": p["b_beta"][0]}


def direct_loop(run, p, keys, values, queries, phi):
    """One run, float64, token by token from the paper's equations (no ops, no padding, no batching)."""
    outputs = []
    for b in range(keys.shape[0]):
        q = p["emb"][queries[b]] @ p["w_q"] + p["b_q"]
        xs = [torch.cat([p["emb"][keys[b, t]], F.one_hot(values[b, t], run.S).double()]) for t in range(run.length)]
        ks = [x @ p["w_k"] + p["b_k"] for x in xs]
        vs = [F.one_hot(values[b, t], run.S).double() for t in range(run.length)]
        if run.rule == "softmax":
            weights = torch.softmax(torch.stack([k @ q for k in ks]) / math.sqrt(models.D_KEY), 0)
            outputs.append(sum(w * v for w, v in zip(weights, vs)))
            continue
        memory = torch.zeros(phi.out_dim, run.S, dtype=torch.float64)
        z = torch.zeros(phi.out_dim, dtype=torch.float64)
        for x, k, v in zip(xs, ks, vs):
            f = phi(k)
            if run.rule == "sum":
                memory, z = memory + torch.outer(f, v), z + f
            else:
                f = f / (f.sum() + 1e-6)
                beta = torch.sigmoid(x @ p["w_beta"] + p["b_beta"])
                memory = memory + torch.outer(f, beta * (v - memory.T @ f))  # read before write, then write
        f = phi(q)
        if run.rule == "sum":
            outputs.append(memory.T @ f / (z @ f + 1e-6))
        else:
            outputs.append(memory.T @ (f / (f.sum() + 1e-6)))
    return torch.stack(outputs)


@pytest.mark.parametrize("backend, split", [("recurrent", False), ("chunk", False), ("chunk", True)])
@pytest.mark.parametrize("setting", [1, 2])
def test_bank_reads_equal_a_direct_float64_loop(backend, split, setting):
    """split: one op call per d_dot; otherwise DPFP-1 and -2 share DPFP-2's map (masked) in one padded call."""
    rules = ["sum"] if setting == 1 else ["sum", "delta"]
    specs = [task.RunSpec(setting, m, r, size) for size in (4, 6) for m in ("linear", "dpfp1", "dpfp2") for r in rules]
    if setting == 1:
        specs += [task.RunSpec(1, "softmax", "softmax", 5), task.RunSpec(1, "favor64", "sum", 6)]
    bank = models.RunBank(specs, "cpu", dtype=torch.float64, backend=backend, chunk_size=4, split_features=split)
    calls = len({(s.rule, models.feature_dim(s.model)) for s in specs}) if split else len(rules) + (setting == 1)
    assert len(bank.op_calls) == calls
    keys, values, query_ids, targets = training.sample_bank_batch(bank, 3, torch.Generator().manual_seed(2), False)
    with torch.no_grad():
        q_pre = bank.query_inputs(query_ids.reshape(len(specs), -1)).view(len(specs), 3, 1, -1)
        y = bank.retrieve(keys, values, q_pre)[:, :, 0]
    for r, run in enumerate(bank.specs):
        name, kwargs = models.MODELS[run.model]
        phi = None
        if name == "favor":  # the bank's own random matrix
            phi = bank.feature_maps[run.model]
        elif name is not None:
            phi = build_feature_map(name, models.D_KEY, **kwargs).double()
        expected = direct_loop(run, unpadded_parameters(bank, r), keys[r, :, : run.length], values[r, :, : run.length],
                               query_ids[r, :, 0], phi)
        torch.testing.assert_close(y[r, :, : run.S], expected, rtol=1e-9, atol=1e-9)
        assert (y[r, :, run.S :] == 0).all()  # padded value dims stay empty


def test_padding_and_compaction_are_exact():
    """A run trained inside a padded bank follows the trajectory it follows alone, also across a compaction."""
    specs = [task.RunSpec(2, m, r, s) for s in (4, 7) for m in ("linear", "dpfp1", "dpfp2") for r in ("sum", "delta")]

    def batch_for(bank, data):
        """The same per-S data laid out for any bank: keys/values padded to its L_pad."""
        rows = [data[run.S] for run in bank.specs]
        pad = lambda t: F.pad(t, (0, bank.l_pad - t.shape[-1]))  # noqa: E731
        return (torch.stack([pad(k) for k, _, _, _ in rows]), torch.stack([pad(v) for _, v, _, _ in rows]),
                torch.stack([q for _, _, q, _ in rows]), torch.stack([t for _, _, _, t in rows]))

    def train(bank_specs, steps=5, compact_after=None):
        bank = models.RunBank(bank_specs, "cpu", dtype=torch.float64, chunk_size=4)
        opt = training.make_optimizer(bank.params, 1e-2, "cpu")
        gen = torch.Generator().manual_seed(3)
        for step in range(steps):
            data = {}
            for size in (4, 7):
                keys, values = task.sample_sequences(4, [size], [2 * size], True, gen)
                queries, targets = task.sample_queries(keys, task.latest_values(keys, values, size), [2 * size], gen)
                data[size] = (keys[0], values[0], queries[0], targets[0])
            losses = training.bank_loss(bank, *batch_for(bank, data))
            opt.zero_grad()
            losses.sum().backward()
            opt.step()
            if step == compact_after:  # keep every S = 7 run and the S = 4 delta runs: padding stays
                keep = [i for i, x in enumerate(bank.specs) if x.S == 7 or x.rule == "delta"]
                bank, opt = training.compact(bank, opt, keep, 1e-2)
        return bank

    together = train(specs, compact_after=2)
    assert len(together.specs) == 9
    checked = [task.RunSpec(2, "linear", "delta", 4), task.RunSpec(2, "dpfp1", "delta", 4),  # padded in S, L, d_dot
               task.RunSpec(2, "dpfp1", "delta", 7), task.RunSpec(2, "dpfp2", "sum", 7)]
    for run in checked:
        r = together.specs.index(run)
        alone = train([run])
        mine, reference = unpadded_parameters(together, r), unpadded_parameters(alone, 0)
        for name in mine:
            torch.testing.assert_close(mine[name], reference[name], rtol=1e-9, atol=1e-12, msg=f"{run} {name}")
    # Compaction to the S = 4 runs only shrinks the padding and keeps the parameters.
    small = together.select([i for i, x in enumerate(together.specs) if x.S == 4])
    assert small.s_pad == 4 and small.l_pad == 8
    for i, run in enumerate(small.specs):
        r = together.specs.index(run)
        for name, value in unpadded_parameters(small, i).items():
            torch.testing.assert_close(value, unpadded_parameters(together, r)[name])


# ----------------------------------------------------------------------------------------------- report and CLI


def verdicts(tmp_path, failures):
    """The claims' verdicts for a results.csv in which each model errs from S = failures[model] on."""
    with open(tmp_path / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(training.RESULT_FIELDS)
        for model, fail in failures.items():
            for s in range(20, 601, 20):
                loss = 0.2 if s >= fail else 0.0005
                writer.writerow([1, model, "softmax" if model == "softmax" else "sum", s, s, 0, loss, loss, 100,
                                 "solved", 1.0])
    results = report.load_csv(tmp_path / "results.csv")
    return {claim: held.split(" ")[0] for claim, _, held in report.claims(results, [])}


def find(verdict, start):
    return next(v for claim, v in verdict.items() if claim.startswith(start))


def test_claims_follow_the_stated_criteria(tmp_path):
    verdict = verdicts(tmp_path, {"linear": 60, "dpfp1": 140, "dpfp2": 400, "favor64": 20, "softmax": 520})
    assert find(verdict, "Linear") == "yes"
    assert find(verdict, "DPFP-1") == "yes"  # 140 is within +-25.6 of 128
    assert find(verdict, "DPFP-2") == "no"  # 400 is far from 256
    assert find(verdict, "FAVOR+") == "yes"
    assert find(verdict, "Softmax is") == "yes"
    assert find(verdict, "Softmax struggles") == "yes"
    verdict = verdicts(tmp_path, {"linear": 40, "dpfp1": 300, "favor64": 40, "softmax": 100})
    assert find(verdict, "Linear") == "yes"  # 40 is within +-20 of 60
    assert find(verdict, "DPFP-1") == "no"
    assert find(verdict, "Softmax is") == "no"  # DPFP-1 beats it at 100..280
    assert find(verdict, "Softmax struggles") == "no"
    verdict = verdicts(tmp_path, {"favor64": 800})  # solves everything: it did reach zero loss
    assert find(verdict, "FAVOR+") == "no"


def test_quick_mode_end_to_end(tmp_path):
    out = tmp_path / "quick"
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Results\n\nother section\n")
    threads = torch.get_num_threads()
    try:  # one thread: the tiny ops of --quick gain nothing from more, and lose a lot on a busy machine
        command.main(["--quick", "--out", str(out), "--max-steps", "40", "--eval-every", "20", "--results-md",
                      str(results_md), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    rows = report.load_csv(out / "results.csv")
    planned = experiments.plan("quick")
    assert len(rows) == len(planned)  # one row per run: finished runs are not reported again
    assert {(r["setting"], r["model"], r["rule"], r["S"]) for r in rows} == {s.key()[:4] for s in planned}
    assert all(math.isfinite(r["final_eval_loss"]) and r["steps"] in (20, 40) for r in rows)
    for name in ("curves.csv", "report.md", "fig2_capacity.png", "fig3_learning_curves.png", "fig5_update_rules.png"):
        assert (out / name).exists(), name
    text = results_md.read_text()
    assert "other section" in text and text.count(report.BEGIN) == 1
    command.main(["--report-only", "--out", str(out), "--results-md", str(results_md)])  # rebuild replaces the section
    assert results_md.read_text().count(report.BEGIN) == 1


def test_shards_cover_the_plan_once_and_merge(tmp_path):
    groups = experiments.buckets(experiments.plan("full"), 5)
    shards = [experiments.shard_groups(groups, k, 3) for k in (1, 2, 3)]
    keys = [s.key() for shard in shards for group in shard for s in group]
    assert sorted(keys) == sorted(s.key() for s in experiments.plan("full"))  # every run in exactly one shard
    costs = [sum(experiments.bucket_cost(g) for g in shard) for shard in shards]
    assert max(costs) < 1.5 * min(costs)  # balanced by cost

    threads = torch.get_num_threads()
    try:
        for k in (1, 2):
            command.main(["--quick", "--out", str(tmp_path / f"s{k}"), "--shard", f"{k}/2", "--max-steps", "20",
                          "--eval-every", "20", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    command.main(["--merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "all")])
    rows = report.load_csv(tmp_path / "all" / "results.csv")
    assert sorted((r["setting"], r["model"], r["rule"], r["S"]) for r in rows) == sorted(
        s.key()[:4] for s in experiments.plan("quick"))
    meta = json.load(open(tmp_path / "all" / "meta.json"))
    assert [m["shard"] for m in meta["shards"]] == ["1/2", "2/2"] and meta["runs"] == len(experiments.plan("quick"))
    assert "2 shards" in (tmp_path / "all" / "report.md").read_text()
    with pytest.raises(SystemExit):
        command.main(["--quick", "--shard", "3/2"])


@pytest.mark.parametrize("patience", [0, 2])
def test_patience_sets_when_a_run_stops_without_progress(tmp_path, monkeypatch, patience):
    """A run whose evaluation loss never improves stops after patience + 1 evaluations past its first (the paper's
    rule is patience 10; --capacity runs use a longer one)."""
    monkeypatch.setattr(training, "evaluate", lambda bank, generator, sequences: torch.full((len(bank.specs),), 0.5))
    specs = [s for s in experiments.plan("capacity") if s.S == 80]
    assert [(s.model, s.rule, s.setting) for s in specs] == [("dpfp1", "sum", 1)]
    cfg = training.Config(device="cpu", backend="chunk", chunk_size=64, lr=1e-3, batch_size=2, max_steps=100,
                          eval_every=5, eval_sequences=1, bucket_size=1, time_budget=60.0, patience=patience)
    writer = training.ResultWriter(str(tmp_path / "out"))
    training.train_bank(specs, cfg, writer, deadline=math.inf, log=lambda *a, **k: None)
    (row,) = report.load_csv(tmp_path / "out" / "results.csv")
    assert (row["stop_reason"], row["steps"]) == ("no_progress", 5 * (patience + 2))
