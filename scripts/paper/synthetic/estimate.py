"""The GPU time estimate of the full synthetic retrieval run (`--estimate`), from work counted on the meta device."""

from __future__ import annotations

import time

import torch

from .experiments import buckets, plan
from .models import RunBank
from .training import bank_loss, evaluate, make_optimizer, sample_bank_batch


def estimate(cfg, tflops=100.0, launch_us=8.0):
    """Worst-case GPU time of the full run from counted work: one training step and one evaluation of every
    bucket run on the meta device (shapes only, no compute) under a FLOP counter and an op counter; then
    per step max(FLOPs / (tflops * 1e12), ops * launch_us) with every run going to the step cap (no early stop,
    no compaction). A CPU step of the smallest bucket is timed as a sanity check of the FLOP count."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class CountOps(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountOps.count += 1
            return func(*args, **(kwargs or {}))

    def one_step(bank, optimizer, generator):
        bank.redraw()
        losses = bank_loss(bank, *sample_bank_batch(bank, cfg.batch_size, generator, all_queries=False))
        optimizer.zero_grad()
        losses.sum().backward()
        optimizer.step()

    groups = buckets(plan("full"), cfg.bucket_size)
    total = 0.0
    print(f"{'bucket':>24} {'runs':>4} {'GFLOP/step':>10} {'ops/step':>8} {'GPU ms/step':>11} {'GFLOP/eval':>10}")
    for group in groups:
        bank = RunBank(group, "meta", backend=cfg.backend, chunk_size=cfg.chunk_size)
        optimizer = torch.optim.Adam(list(bank.params.values()), lr=cfg.lr, foreach=True)
        with FlopCounterMode(display=False) as flops:
            CountOps.count = 0
            with CountOps():
                one_step(bank, optimizer, None)
        with FlopCounterMode(display=False) as eval_flops:
            evaluate(bank, None, cfg.eval_sequences)
        gpu_step = max(flops.get_total_flops() / (tflops * 1e12), CountOps.count * launch_us * 1e-6)
        gpu_eval = eval_flops.get_total_flops() / (tflops * 1e12)
        seconds = cfg.max_steps * gpu_step + cfg.max_steps // cfg.eval_every * gpu_eval
        total += seconds
        name = f"setting {group[0].setting}, S {group[0].S}-{group[-1].S}"
        print(f"{name:>24} {len(group):>4} {flops.get_total_flops() / 1e9:>10.0f} {CountOps.count:>8d} "
              f"{gpu_step * 1e3:>11.1f} {eval_flops.get_total_flops() / 1e9:>10.0f}  -> {seconds:.0f} s", flush=True)
    small = RunBank(groups[0], "cpu", backend=cfg.backend, chunk_size=cfg.chunk_size)
    optimizer, generator = make_optimizer(small.params, cfg.lr, "cpu"), torch.Generator().manual_seed(0)
    one_step(small, optimizer, generator)
    start = time.time()
    one_step(small, optimizer, generator)
    seconds = time.time() - start
    with FlopCounterMode(display=False) as cpu_flops:
        one_step(small, optimizer, generator)
    print(f"CPU check: one step of the first bucket takes {seconds:.2f} s here "
          f"({cpu_flops.get_total_flops() / seconds / 1e9:.1f} GFLOP/s on {torch.get_num_threads()} threads)")
    print(f"worst-case GPU estimate: {total:.0f} s of training for {cfg.max_steps} steps per bucket "
          f"(assumes {tflops:.0f} TFLOP/s with TF32 and {launch_us:.0f} us per op; the run stops at --time-budget)")
    return total

