#!/usr/bin/env python
"""Synthetic associative retrieval (Schlag, Irie & Schmidhuber 2021, Sec. 6.1, Figs. 2, 3, 5; PAPER.md 3a),
built on modeling_fwp's feature maps (`build_feature_map`, `normalize_qk`) and update-rule ops (`sum_rule`,
`delta_rule`).

Task: L (key, value) pairs over S symbols are written into one fast-weight memory, then a query key reads the
final memory; the target is that key's most recent value (one-hot in R^S). Loss 1/2 ||v* - v_hat||^2.
  Setting 1 (capacity):   keys and values sampled without replacement, L = S, sum rule (+ softmax baseline).
  Setting 2 (overwrites): sampled with replacement, L = 2S, sum rule vs delta rule.

Speed: many independent runs (model x S x seed) train in lockstep. Their parameters are stacked on a leading run
axis and each op call treats runs as heads, so a bucket of runs costs one set of kernel launches per step.
Runs with smaller S, L or feature size are zero-padded, which changes nothing: a zero key writes nothing, zero
embedding / one-hot / feature dimensions get no gradient, and Adam is elementwise, so every run follows the same
trajectory it would follow alone (up to float summation order).

This file is the command; its parts are in scripts/paper/synthetic/ (the task, the stacked models, training, the
experiment plans, the report and figures, the GPU estimate).

Usage:
  python scripts/paper/synthetic_retrieval.py --quick                         # CPU smoke test, seconds
  python scripts/paper/synthetic_retrieval.py --full --device cuda --out DIR  # the reproduction (one GPU, < 8 min)
  python scripts/paper/synthetic_retrieval.py --full --device cuda --shard 1/2 --time-budget 540 --out A  # half each,
  python scripts/paper/synthetic_retrieval.py --full --device cuda --shard 2/2 --time-budget 540 --out B  # twice the time
  python scripts/paper/synthetic_retrieval.py --merge A B --out DIR --results-md RESULTS.md
  python scripts/paper/synthetic_retrieval.py --report-only --out DIR --results-md RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/paper/ -> the root
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# The parts (scripts/paper/synthetic/) are found beside this file: its folder is first on sys.path when it runs.
from synthetic.estimate import estimate  # noqa: E402
from synthetic.experiments import MODES, merge_shards, run_experiments  # noqa: E402
from synthetic.report import write_report  # noqa: E402
from synthetic.training import MAX_STRIKES, Config  # noqa: E402


def parse_shard(text):
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes K/N (for example 1/2); got {text!r}") from None
    if not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"--shard K/N needs 1 <= K <= N; got {text!r}")
    return index, count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="CPU smoke test (seconds)")
    mode.add_argument("--medium", dest="mode", action="store_const", const="medium", help="CPU check of the trends")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="the reproduction (GPU)")
    mode.add_argument("--capacity", dest="mode", action="store_const", const="capacity",
                      help="DPFP-1 at S = 80..140 with a 10k-step cap (use with --patience)")
    parser.add_argument("--report-only", action="store_true", help="rebuild plots and report from --out's CSVs")
    parser.add_argument("--estimate", action="store_true", help="extrapolate the full run's GPU time from CPU steps")
    parser.add_argument("--out", default=None, help="output folder (default results/synthetic[_MODE])")
    parser.add_argument("--results-md", default=None, help="also write the report section into this RESULTS.md")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="chunk", help="op backend: chunk (default), recurrent, triton, auto")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--no-tf32", dest="tf32", action="store_false", help="CUDA: keep full fp32 matmuls")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--eval-sequences", type=int)
    parser.add_argument("--bucket-size", type=int)
    parser.add_argument("--time-budget", type=float, help="seconds for all training (buckets share it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard", type=parse_shard, help="K/N: run only the K-th of N equal shares of the buckets "
                        "(one GPU call each, with its own --time-budget); combine the folders with --merge")
    parser.add_argument("--merge", nargs="+", metavar="DIR", help="combine the folders of a sharded run into --out")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is faster on a busy machine)")
    parser.add_argument("--patience", type=int, default=MAX_STRIKES, help="stop a run after more than this many "
                        "evaluations without improvement (the paper's rule: 10)")
    parser.set_defaults(mode="quick")
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join(REPO_ROOT, "results", "synthetic" if args.mode == "full" else f"synthetic_{args.mode}")
    if args.merge:
        merge_shards(args.merge, args.out)
    if args.report_only or args.merge:
        print(write_report(args.out, args.results_md))
        return
    settings = dict(MODES["full" if args.estimate else args.mode])
    for key in ("max_steps", "eval_every", "eval_sequences", "bucket_size", "time_budget"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    cfg = Config(device=args.device, backend=args.backend, chunk_size=args.chunk_size, lr=1e-3, batch_size=32,
                 patience=args.patience, **settings)
    torch.manual_seed(args.seed)  # FAVOR+ redraws use the global generator
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
        # FAVOR+ redraws a QR every step; cuSOLVER runs it on the GPU without the host round trips of MAGMA.
        torch.backends.cuda.preferred_linalg_library("cusolver")
    if args.estimate:
        estimate(cfg)
        return
    run_experiments(args, cfg)
    write_report(args.out, args.results_md)
    print(f"wrote {args.out}/results.csv, curves.csv, report.md and the figures", flush=True)


if __name__ == "__main__":
    main()
