"""The short causal convolution (+ SiLU) alone on a GPU: ours (conv_triton.py) and fla's causal_conv1d side by side.

    python scripts/bench/bench_conv.py [--sweep] [--json out.json]

Shapes are the deltanet-370m training step's (16384 tokens, 1024 channels per q / k / v part, kernel 4), as
contiguous tensors (the training step's separate projections) and as a channel slice of a joint projection's
output (read in place), and all three parts at once.
--sweep also times our kernels at other block sizes (TUNE), forward and backward separately, to choose the
fixed launch settings.  The floor is the bytes a pass must move at the device's bandwidth.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

# The repository root (scripts/bench/ is two levels below it), so this checkout's modeling_fwp is imported.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from triton.testing import do_bench  # noqa: E402

from modeling_fwp import conv_triton  # noqa: E402

try:
    from fla.modules.causal_conv1d import causal_conv1d as fla_conv
except Exception:
    fla_conv = None

SHAPES = [  # (B, T, C, K, channel slice of a width-W joint tensor or None)
    (1, 16384, 1024, 4, 3 * 1024 + 16),
    (1, 16384, 1024, 4, None),
    (8, 2048, 3072, 4, None),
]
BANDWIDTH = 4.8e12


def inputs(B, T, C, K, width, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if width:
        leaf = torch.randn(B, T, width, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        x = leaf[..., :C]  # a channel slice, as of a joint q / k / v projection
    else:
        leaf = x = torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    w = (0.5 * torch.randn(C, K, device="cuda", generator=g)).requires_grad_()
    dy = torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16, generator=g)
    return leaf, x, w, dy


def ours(x, w):
    return conv_triton.short_conv_triton(x, w)[0]


def fla(x, w):
    return fla_conv(x, w.to(x.dtype), activation="silu")[0]


def time_pass(fn, leaf, x, w, dy, bwd):
    if not bwd:
        with torch.no_grad():
            return do_bench(lambda: fn(x, w))

    def step():
        leaf.grad = w.grad = None
        fn(x, w).backward(dy)
    return do_bench(step)


def floor_ms(B, T, C, bwd):
    n = B * T * C * 2
    return (5 if bwd else 2) * n / BANDWIDTH * 1e3  # fwd: x, y; fwd+bwd: that, then x, dy, dx again


def bench():
    rows = []
    for (B, T, C, K, width) in SHAPES:
        leaf, x, w, dy = inputs(B, T, C, K, width)
        for bwd in (False, True):
            row = dict(shape=[B, T, C, K], slice_of=width, pass_="fwd+bwd" if bwd else "fwd",
                       floor=floor_ms(B, T, C, bwd), ours=time_pass(ours, leaf, x, w, dy, bwd))
            if fla_conv is not None:
                row["fla"] = time_pass(fla, leaf, x, w, dy, bwd)
            rows.append(row)
            print(row, flush=True)
    return rows


def sweep():
    """Forward settings (BT, BC, warps) and backward settings (BT_bwd, BC_bwd, warps_bwd) at the first shape."""
    B, T, C, K, width = SHAPES[0]
    leaf, x, w, dy = inputs(B, T, C, K, width)
    out = []
    fwd = [dict(BT=bt, BC=bc, warps=nw) for bt, bc, nw in itertools.product((16, 32, 64, 128), (64, 128, 256),
                                                                             (2, 4, 8))]
    bwd = [dict(BT_bwd=bt, BC_bwd=bc, warps_bwd=nw) for bt, bc, nw in itertools.product((16, 32, 64),
                                                                                         (32, 64, 128), (2, 4, 8))]
    for st, is_bwd in [(s, False) for s in fwd] + [(s, True) for s in bwd]:
        conv_triton.TUNE.clear()
        conv_triton.TUNE.update(st)
        try:
            ms = time_pass(ours, leaf, x, w, dy, is_bwd)
        except Exception as e:  # out of registers / shared memory at some sizes
            ms = f"error: {type(e).__name__}"
        out.append(dict(tune=st, pass_="fwd+bwd" if is_bwd else "fwd", ms=ms))
        print(f"sweep {'fwd+bwd' if is_bwd else 'fwd'} {st}: {ms}", flush=True)
    conv_triton.TUNE.clear()
    return out


def print_table(rows):
    print(f"\n### {torch.cuda.get_device_name()}, bf16, SiLU, ms (floor at {BANDWIDTH / 1e12:.1f} TB/s)\n")
    print("| B x T x C | input | pass | floor | ours | fla | ours % floor | fla % floor | ours vs fla |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        B, T, C, K = r["shape"]
        fl = r.get("fla")
        layout = f"slice of {r['slice_of']}" if r["slice_of"] else "contiguous"
        ours_pct = f"{100 * r['floor'] / r['ours']:.0f}%"
        fla_cells = ["-", "-", "-"] if fl is None else [f"{fl:.3f}", f"{100 * r['floor'] / fl:.0f}%",
                                                        f"{fl / r['ours']:.2f}x"]
        print(f"| {B} x {T} x {C} | {layout} | {r['pass_']} | {r['floor']:.3f} | {r['ours']:.3f} | {fla_cells[0]} | "
              f"{ours_pct} | {fla_cells[1]} | {fla_cells[2]} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    if args.sweep:
        result["sweep"] = sweep()
    result["bench"] = bench()
    print_table(result["bench"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
