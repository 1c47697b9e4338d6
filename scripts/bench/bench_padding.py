#!/usr/bin/env python
"""Padded batches, the two exact layouts side by side: unpadded into cu_seqlens (the pads removed before the
layers) against masked (pads kept, moved after each row's real tokens, masked inside the layers; fixed shapes,
what torch.compile and torch.export run). Times a training step (forward + backward) and a no-grad forward per
padding pattern and prints a markdown table; `modeling_fwp.modeling_fwp.use_masked_layout` picks the layout.

    OMP_NUM_THREADS=2 python scripts/bench/bench_padding.py                        # CPU, the tiny preset
    python scripts/bench/bench_padding.py --preset deltanet-370m --batch_size 8 --seq_len 2048 --dtype bf16   # one GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import modeling_fwp.modeling_fwp as modeling  # noqa: E402
from modeling_fwp import FWPForCausalLM  # noqa: E402
from modeling_fwp.presets import load_preset, parse_config_overrides  # noqa: E402

# Padding patterns: the fraction of each row that is padding, as (side, fractions of the rows).
PATTERNS = {
    "none (all-ones mask)": ("left", [0.0]),
    "left, 0-25 %": ("left", [0.0, 0.05, 0.1, 0.15, 0.2, 0.25]),
    "left, 0-75 %": ("left", [0.0, 0.15, 0.3, 0.45, 0.6, 0.75]),
    "right, 0-75 %": ("right", [0.0, 0.15, 0.3, 0.45, 0.6, 0.75]),
}


def padding_mask(batch_size, seq_len, side, fractions, device):
    mask = torch.ones(batch_size, seq_len, dtype=torch.long, device=device)
    for row in range(batch_size):
        pads = int(seq_len * fractions[row % len(fractions)])
        if pads:
            mask[row, slice(0, pads) if side == "left" else slice(seq_len - pads, seq_len)] = 0
    return mask


def timed(calls, repeats, device):
    """Minimum ms per call of each of `calls`, run in turn (A, B, A, B, ...) so that a machine's load changes
    reach both alike; the minimum is the least disturbed run."""
    best = [float("inf")] * len(calls)
    for repeat in range(repeats + 1):  # the first round warms up
        for index, fn in enumerate(calls):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if repeat:
                best[index] = min(best[index], 1000 * (time.perf_counter() - start))
    return best


def run_with_layout(masked, fn):
    def call():
        original = modeling.use_masked_layout
        modeling.use_masked_layout = lambda attention_mask: masked
        try:
            fn()
        finally:
            modeling.use_masked_layout = original
    return call


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--config_overrides", default="dropout=0.0")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="autocast dtype on GPU")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = load_preset(args.preset, **parse_config_overrides(args.config_overrides))
    model = FWPForCausalLM(config).to(device).train()
    ids = torch.randint(1, config.vocab_size, (args.batch_size, args.seq_len), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.preset}, {args.batch_size} x {args.seq_len} tokens, {args.dtype}, {name}: ms per call "
          f"(least of {args.repeats}, the layouts in turn)\n")
    print("| padding | real tokens | train step unpadded | train step masked | forward unpadded | forward masked |")
    print("|---|---|---|---|---|---|")
    for label, (side, fractions) in PATTERNS.items():
        mask = padding_mask(args.batch_size, args.seq_len, side, fractions, device)
        labels = ids.masked_fill(mask == 0, -100)

        def train_step():
            with autocast:
                loss = model(ids, attention_mask=mask, labels=labels, use_cache=False).loss
            loss.backward()
            model.zero_grad(set_to_none=True)

        def forward():
            with torch.no_grad(), autocast:
                model(ids, attention_mask=mask, use_cache=False)

        times = timed([run_with_layout(masked, fn) for fn in (train_step, forward) for masked in (False, True)],
                      args.repeats, device)
        print(f"| {label} | {mask.float().mean().item():.0%} | " + " | ".join(f"{t:.1f}" for t in times) + " |",
              flush=True)

if __name__ == "__main__":
    main()
