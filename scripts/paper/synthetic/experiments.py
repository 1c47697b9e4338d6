"""The experiment plans of the synthetic retrieval command: the runs of each mode, their buckets (runs that train
together) and shards (one GPU call each), the time budget shared between buckets, and the merge of sharded folders.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from .models import SETTING1_MODELS, SETTING2_MODELS, feature_dim
from .task import RunSpec
from .training import CURVE_FIELDS, RESULT_FIELDS, ResultWriter, train_bank

# The repository (scripts/paper/synthetic/ is three levels below it): git describes the code that made a result.
REPO_ROOT = str(Path(__file__).resolve().parents[3])


def plan(mode):
    """The runs of each mode: list of RunSpec."""
    if mode == "quick":
        s1, s2, m1, m2, seeds = [8, 16], [8], ["linear", "dpfp1", "favor64", "softmax"], ["dpfp1"], [0]
    elif mode == "capacity":  # DPFP-1 around its capacity, trained longer (RESULTS.md, "DPFP-1's capacity")
        s1, s2, m1, m2, seeds = [80, 100, 120, 140], [], ["dpfp1"], [], [0]
    elif mode == "medium":
        s1, s2 = [20, 40, 60, 80, 120], [20, 40]
        m1, m2, seeds = ["linear", "dpfp1", "favor64", "softmax"], ["linear", "dpfp1"], [0]
    else:
        s1, s2, m1, m2, seeds = list(range(20, 601, 20)), list(range(20, 201, 20)), SETTING1_MODELS, SETTING2_MODELS, [0]
    specs = [RunSpec(1, m, "softmax" if m == "softmax" else "sum", s, seed) for s in s1 for m in m1 for seed in seeds]
    specs += [RunSpec(2, m, rule, s, seed) for s in s2 for m in m2 for rule in ("sum", "delta") for seed in seeds]
    return specs


def buckets(specs, bucket_size):
    """Runs grouped by setting and by blocks of `bucket_size` consecutive S values (padding stays small)."""
    groups = []
    # Setting 2 first: its buckets are cheap, and the time they leave goes to the costly large-S buckets.
    for setting in sorted({s.setting for s in specs}, reverse=True):
        sizes = sorted({s.S for s in specs if s.setting == setting})
        for i in range(0, len(sizes), bucket_size):
            block = set(sizes[i : i + bucket_size])
            groups.append([s for s in specs if s.setting == setting and s.S in block])
    return groups


def bucket_cost(specs):
    """Rough relative cost of a bucket per step: sum over runs of L_pad * S_pad * d_dot (the memory writes)."""
    l_pad, s_pad = max(s.length for s in specs), max(s.S for s in specs)
    return sum(l_pad * s_pad * feature_dim(s.model) * (2 if s.rule == "delta" else 1) for s in specs)


MODES = {  # steps cap, evaluation interval, evaluation sequences, S bucket size, time budget (s)
    "quick": dict(max_steps=60, eval_every=20, eval_sequences=4, bucket_size=2, time_budget=120.0),
    "medium": dict(max_steps=1500, eval_every=100, eval_sequences=20, bucket_size=1, time_budget=3000.0),
    "full": dict(max_steps=5000, eval_every=100, eval_sequences=20, bucket_size=5, time_budget=420.0),
    "capacity": dict(max_steps=10000, eval_every=100, eval_sequences=20, bucket_size=1, time_budget=2400.0),
}


def git_commit():
    if os.environ.get("FWP_COMMIT"):  # set when the code runs from an exported copy (a GPU machine's snapshot)
        return os.environ["FWP_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        # the command, its parts and the package: the code that makes a result
        code = ["scripts/paper/synthetic_retrieval.py", "scripts/paper/synthetic", "modeling_fwp"]
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *code], cwd=REPO_ROOT, capture_output=True,
                               text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except Exception:  # no git on the GPU machine's copy
        return os.environ.get("FWP_COMMIT", "unknown")


def device_name(device):
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def shard_groups(groups, index, count):
    """Shard `index` (1-based) of `count`: buckets dealt out by cost, largest first, each to the lightest shard, so
    every shard (one GPU call each) carries about the same work. The bucket order within a shard is kept."""
    costs = [bucket_cost(g) for g in groups]
    load, owner = [0.0] * count, {}
    for i in sorted(range(len(groups)), key=lambda i: -costs[i]):
        shard = min(range(count), key=lambda j: load[j])
        owner[i], load[shard] = shard, load[shard] + costs[i]
    return [g for i, g in enumerate(groups) if owner[i] == index - 1]


def run_experiments(args, cfg):
    groups = buckets(plan(args.mode), cfg.bucket_size)
    if args.shard:
        groups = shard_groups(groups, *args.shard)
    specs = [spec for group in groups for spec in group]
    writer = ResultWriter(args.out)
    meta = {"mode": args.mode, "commit": git_commit(), "device": device_name(cfg.device), "backend": cfg.backend,
            "torch": torch.__version__, "tf32": bool(args.tf32) and str(cfg.device).startswith("cuda"), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "config": {k: v for k, v in vars(cfg).items() if k != "device"}, "runs": len(specs), "buckets": len(groups),
            "shard": "{}/{}".format(*args.shard) if args.shard else None}
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    start = time.time()
    end_by = start + cfg.time_budget
    # Bucket weights for sharing the time budget: small buckets are bound by per-op overhead, not FLOPs, so
    # every bucket gets a base share plus a share by FLOP proxy (GPU estimate: 7 to 16 ms per step).
    costs = [bucket_cost(g) for g in groups]
    costs = [1 + c / max(costs) for c in costs]
    for i, group in enumerate(groups):
        # Each bucket may use its share of the remaining time (by cost); time a bucket leaves goes to the later ones.
        now = time.time()
        deadline = now + (end_by - now) * costs[i] / sum(costs[i:])
        sizes = sorted({s.S for s in group})
        print(f"bucket {i + 1}/{len(groups)}: setting {group[0].setting}, S={sizes}, {len(group)} runs, "
              f"{deadline - now:.0f}s allowed", flush=True)
        train_bank(group, cfg, writer, deadline)
    meta["seconds"] = round(time.time() - start, 1)
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"trained {len(specs)} runs in {meta['seconds']}s", flush=True)


def merge_shards(shard_dirs, out_dir):
    """One result folder from the folders of a sharded run (`--shard K/N`, one per GPU call): the CSVs concatenated,
    meta.json from the first shard with the runs and training seconds summed over all of them."""
    metas = [json.load(open(os.path.join(d, "meta.json"))) for d in shard_dirs]
    if len({m.get("mode") for m in metas}) != 1:
        raise SystemExit(f"--merge: the shards come from different modes: {[m.get('mode') for m in metas]}")
    os.makedirs(out_dir, exist_ok=True)
    for name, fields in (("results.csv", RESULT_FIELDS), ("curves.csv", CURVE_FIELDS)):
        rows = []
        for d in shard_dirs:
            with open(os.path.join(d, name), newline="") as f:
                rows += list(csv.reader(f))[1:]
        with open(os.path.join(out_dir, name), "w", newline="") as f:
            csv.writer(f).writerows([fields] + rows)
    meta = dict(metas[0], runs=sum(m.get("runs", 0) for m in metas), buckets=sum(m.get("buckets", 0) for m in metas),
                seconds=round(sum(m.get("seconds", 0) for m in metas), 1), shard=None,
                shards=[{k: m.get(k) for k in ("shard", "commit", "device", "date", "seconds", "runs")} for m in metas])
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)

