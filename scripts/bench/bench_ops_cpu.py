"""CPU timing of the delta-rule ops, side by side in one process:

- ours, backend="chunk" (pure PyTorch WY form with a hand-written backward),
- transformers' `torch_chunk_gated_delta_rule` (Qwen3-Next fallback) with log-decay g = 0, i.e. the plain delta rule,
- ours, backend="recurrent" (the step-by-step reference), at a shorter T, for information only.

Forward is timed under torch.no_grad (inference) and with inputs that require grad (the training forward, which
records the graph); forward+backward backpropagates o.sum(). The runs of the different implementations are
interleaved, so background load hits them alike; each table gives medians, or with --stat min the fastest round
(the better estimate when other jobs share the cores); the raw times go to --json.

By default two shapes with the same token count, one table each: B=4, T=2048 (several sequences: the per-chunk
state recursion has B*H independent matrices) and B=1, T=8192 (one long sequence: the recursion is a long serial
chain over 8 small matrices, the hard case on a 2-core CPU). --shape (repeatable) or --batch/--length/... pick
others.

    python scripts/bench/bench_ops_cpu.py --stat min --json bench_ops_cpu.json
    python scripts/bench/bench_ops_cpu.py --shape 1,8192,4,128,128 --shape 8,1024,8,64,64
    python scripts/bench/bench_ops_cpu.py --batch 1 --length 8192 --heads 4 --key-dim 128 --value-dim 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from modeling_fwp.ops import delta_rule  # noqa: E402


def make_inputs(batch, length, heads, key_dim, value_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, heads, key_dim, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(batch, length, heads, key_dim, generator=gen), dim=-1)
    v = torch.randn(batch, length, heads, value_dim, generator=gen)
    beta = torch.rand(batch, length, heads, generator=gen).sigmoid()
    return q, k, v, beta


def implementations(extra_chunk_sizes):
    """name -> function(q, k, v, beta) returning o; the peer is skipped when transformers lacks it."""
    impls = {"ours chunk": lambda q, k, v, beta: delta_rule(q, k, v, beta, backend="chunk")[0]}
    for size in extra_chunk_sizes:
        impls[f"ours chunk, chunk_size={size}"] = lambda q, k, v, beta, size=size: delta_rule(
            q, k, v, beta, backend="chunk", chunk_size=size
        )[0]
    impls["ours recurrent"] = lambda q, k, v, beta: delta_rule(q, k, v, beta, backend="recurrent")[0]
    try:
        from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule
    except ImportError as error:
        print(f"transformers' torch_chunk_gated_delta_rule not available: {error}", file=sys.stderr)
    else:
        impls["transformers torch_chunk_gated_delta_rule (g=0)"] = lambda q, k, v, beta: torch_chunk_gated_delta_rule(
            q, k, v, torch.zeros_like(beta), beta, chunk_size=64
        )[0]
    return impls


MODES = ("forward", "forward_grad", "forward+backward")
MODE_TITLES = {"forward": "forward (no_grad)", "forward_grad": "forward (inputs require grad)",
               "forward+backward": "forward+backward"}


def time_once(function, inputs, mode):
    if mode == "forward":
        with torch.no_grad():
            start = time.perf_counter()
            function(*inputs)
        return (time.perf_counter() - start) * 1e3
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    start = time.perf_counter()
    o = function(*leaves)
    if mode == "forward+backward":
        o.sum().backward()
    return (time.perf_counter() - start) * 1e3


DEFAULT_SHAPES = ((4, 2048, 8, 64, 64), (1, 8192, 8, 64, 64))  # (B, T, H, K, V)


def parse_shape(text):
    values = tuple(int(x) for x in text.split(","))
    if len(values) != 5 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"a shape is B,T,H,K,V (five positive ints), got {text!r}")
    return values


def bench_shape(shape, impls, args):
    """Times every implementation at one shape; returns (rows, raw times, max |o_ours - o_transformers|)."""
    batch, length, heads, key_dim, value_dim = shape
    inputs = make_inputs(*shape)
    short_inputs = make_inputs(batch, args.recurrent_length, heads, key_dim, value_dim)

    # Sanity: both chunkwise forms compute the same delta rule (the peer scales q by K**-0.5 like our default).
    peer_name = next((name for name in impls if name.startswith("transformers")), None)
    max_diff = None
    if peer_name:
        with torch.no_grad():
            max_diff = (impls["ours chunk"](*inputs) - impls[peer_name](*inputs)).abs().max().item()

    times = {(name, mode): [] for name in impls for mode in MODES}
    for repeat in range(args.repeats + 1):  # the first round warms up and is dropped
        for mode in MODES:
            for name, function in impls.items():
                data = short_inputs if name == "ours recurrent" else inputs
                elapsed = time_once(function, data, mode)
                if repeat:
                    times[(name, mode)].append(elapsed)

    # Median by default; --stat min gives the fastest round, the better estimate when other jobs share the cores.
    summary = statistics.median if args.stat == "median" else min
    medians = {key: summary(values) for key, values in times.items()}
    reference = {mode: medians.get((peer_name, mode)) for mode in MODES}
    rows = []
    for name in impls:
        row = {"implementation": name, "T": args.recurrent_length if name == "ours recurrent" else length}
        for mode in MODES:
            row[f"{mode}_ms"] = round(medians[(name, mode)], 1)
            same_shape = name != "ours recurrent" and reference[mode]
            row[f"{mode}_speedup_vs_transformers"] = round(reference[mode] / medians[(name, mode)], 2) if same_shape else None
        rows.append(row)
    return rows, times, max_diff


def print_table(shape, rows, max_diff, args):
    batch, length, heads, key_dim, value_dim = shape
    load = os.getloadavg()
    print(f"B={batch} T={length} H={heads} K={key_dim} V={value_dim} fp32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.stat} of {args.repeats}, "
          f"load average after the run {load[0]:.1f} on {os.cpu_count()} CPUs")
    print()
    header = "".join(f" {MODE_TITLES[mode]} ms | speed-up |" for mode in MODES)
    print(f"| implementation | B | T |{header}")
    print("|---|---|---|" + "---|---|" * len(MODES))
    for row in rows:
        cells = ""
        for mode in MODES:
            speed = row[f"{mode}_speedup_vs_transformers"]
            cells += f" {row[f'{mode}_ms']:.1f} | {f'{speed:.2f}x' if speed else '-'} |"
        print(f"| {row['implementation']} | {batch} | {row['T']} |{cells}")
    if max_diff is not None:
        print(f"\nmax |o_ours - o_transformers| = {max_diff:.2e}")
    print(flush=True)
    return load


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=parse_shape, action="append", default=None, metavar="B,T,H,K,V",
                        help="a shape to time (repeatable); default: " + " and ".join(
                            ",".join(map(str, shape)) for shape in DEFAULT_SHAPES))
    single = "one shape from these (unset dimensions from B=4, T=2048, H=8, K=V=64), instead of the defaults"
    parser.add_argument("--batch", type=int, default=None, help=single)
    parser.add_argument("--length", type=int, default=None, help=single)
    parser.add_argument("--heads", type=int, default=None, help=single)
    parser.add_argument("--key-dim", type=int, default=None, help=single)
    parser.add_argument("--value-dim", type=int, default=None, help=single)
    parser.add_argument("--recurrent-length", type=int, default=256, help="T for the (slow) recurrent reference")
    parser.add_argument("--extra-chunk-sizes", type=int, nargs="*", default=[16],
                        help="also time our chunk backend at these chunk sizes (the default chunk_size 64 runs as "
                             "ops_chunk.CPU_MAX_CHUNK_SIZE = 32 on CPU)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--stat", choices=("median", "min"), default="median", help="how rounds are summarised")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    shapes = list(args.shape or [])
    dims = (args.batch, args.length, args.heads, args.key_dim, args.value_dim)
    if any(d is not None for d in dims):
        shapes.append(tuple(d if d is not None else default for d, default in zip(dims, DEFAULT_SHAPES[0])))
    shapes = shapes or list(DEFAULT_SHAPES)
    impls = implementations(args.extra_chunk_sizes)

    results = []
    for shape in shapes:
        rows, times, max_diff = bench_shape(shape, impls, args)
        load = print_table(shape, rows, max_diff, args)
        results.append({
            "shape": dict(zip(("B", "T", "H", "K", "V"), shape)),
            "load_average_after": load,
            "max_abs_diff_vs_transformers": max_diff,
            "rows": rows,
            "raw_ms": {f"{name} | {mode}": values for (name, mode), values in times.items()},
        })

    if args.json:
        result = {
            "dtype": "float32",
            "repeats": args.repeats,
            "stat": args.stat,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "processor": platform.processor(),
            "shapes": results,
        }
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
