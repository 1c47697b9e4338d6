#!/usr/bin/env python
"""Training throughput of FWPForCausalLM, side by side with same-size fla DeltaNet and transformers Llama (sdpa).

Each model trains on random tokens with AdamW under bf16 autocast (parameters in float32, as the Trainer's --bf16
does): warm-up steps, then timed steps. Reports global tokens/s (all processes), peak GPU memory per process and
the last loss (a NaN would show). Prints a markdown table; --json writes the same numbers.

    python scripts/bench/bench_train.py                                   # deltanet-370m, 8 x 2048, one GPU
    python scripts/bench/bench_train.py --models fwp,fla,llama --json bench.json
    accelerate launch --config_file configuration/accelerate/multi_gpu_ddp.yaml --num_processes 2 \\
        scripts/bench/bench_train.py --json bench-2gpu.json                # DDP: batch 8 x 2048 per GPU
    accelerate launch --config_file configuration/accelerate/fsdp.yaml --num_processes 8 \\
        scripts/bench/bench_train.py --preset deltanet-1.3b --json bench-fsdp8.json   # FSDP2, sharded per block
    python scripts/bench/bench_train.py --preset tiny --batch_size 2 --seq_len 64 --steps 2   # CPU smoke run
    python scripts/bench/bench_train.py --models fwp,llama --compile                    # eager and torch.compile'd

--compile measures every model twice, eager and compiled (torch.compile with the default inductor backend, the
compile in the warm-up steps; its time is the "first step" column), in one process.

fla is optional: "fla" is skipped with a note when it does not import (or has no GPU to run on).

Under an FSDP config every model is sharded per block of its own (_no_split_modules: FWPBlock, DeltaNetBlock,
LlamaDecoderLayer). --fsdp_param_dtype fp32 (default) gathers fp32 parameters and computes under the bf16 autocast,
DDP's numerics; bf16 gathers bf16 parameters, the policy scripts/train.py trains with under fsdp.yaml.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]  # scripts/bench/ -> the repository root
sys.path.insert(0, str(REPO_ROOT))

import modeling_fwp  # noqa: E402,F401  registers "fwp"
from modeling_fwp import FWPForCausalLM  # noqa: E402
from modeling_fwp.compat import enable_activation_checkpointing  # noqa: E402
from modeling_fwp.presets import load_preset, parse_config_overrides  # noqa: E402

MODELS = ("fwp", "fla", "llama")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="deltanet-370m", help="configuration/models preset (name or path)")
    parser.add_argument("--config_overrides", default="", help='FWPConfig overrides, "k=v,k=v"')
    parser.add_argument("--models", default="fwp", help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per process and step")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="autocast dtype (bf16) or none")
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--fsdp_param_dtype", default="fp32", choices=("fp32", "bf16"),
                        help="under an FSDP config: the dtype parameters are gathered and used in (see above)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here (main process)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure the models in turn this many times (fwp, fla, llama, fwp, ...): a peer whose "
                             "speed swings between runs is compared with ours in every round")
    parser.add_argument("--compile", action="store_true",
                        help="measure each model eager and under torch.compile (inductor), side by side")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, profile 2 steps and print each model's N costliest kernels (GPU time)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; allowed: {', '.join(MODELS)}")
    for name in ("batch_size", "seq_len", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup_steps < 0:
        parser.error("--warmup_steps must be >= 0")
    return args


def build_model(name: str, config, seq_len: int):
    """The FWP model of `config`, or the same-size fla DeltaNet / Llama. Returns (model, note) or (None, reason)."""
    if name == "fwp":
        return FWPForCausalLM(config), f"backend {config.kernel_backend}"
    if name == "fla":
        try:
            from fla.models import DeltaNetConfig, DeltaNetForCausalLM
        except Exception as error:  # optional dependency
            return None, f"fla does not import ({type(error).__name__})"
        if not torch.cuda.is_available():
            return None, "fla kernels need a GPU"
        fla_config = DeltaNetConfig(
            hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers, num_heads=config.num_heads,
            expand_k=config.head_dim * config.num_heads / config.hidden_size,
            expand_v=config.head_dim * config.num_heads / config.hidden_size, intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size, use_short_conv=config.use_short_conv, conv_size=config.conv_size,
            use_beta=config.use_beta, qk_activation="silu", qk_norm="l2", norm_eps=config.layer_norm_eps,
            tie_word_embeddings=config.tie_word_embeddings)
        return DeltaNetForCausalLM(fla_config), "fla chunk kernels"
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads, head_dim=config.head_dim, vocab_size=config.vocab_size,
        max_position_embeddings=max(seq_len, 2048), rms_norm_eps=config.layer_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings)
    llama_config._attn_implementation = "sdpa"
    return LlamaForCausalLM(llama_config), "softmax attention, sdpa"


def bench_one(name, config, args, accelerator, profile_top=0, compiled=False):
    torch._dynamo.reset()  # each compiled model from a clean slate (no cache limit reached by an earlier one)
    torch.manual_seed(args.seed)
    model, note = build_model(name, config, args.seq_len)
    if model is None:
        return {"model": name, "skipped": note}
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    parameters = sum(p.numel() for p in model.parameters())
    model.to(accelerator.device)  # before the optimizer: fused AdamW wants its parameters on the GPU already
    if getattr(accelerator, "is_fsdp2", False):
        shard_per_block(accelerator, model, args.fsdp_param_dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, fused=torch.cuda.is_available())
    model, optimizer = accelerator.prepare(model, optimizer)
    if compiled:
        model = torch.compile(model)
        note += ", torch.compile"
    model.train()
    generator = torch.Generator().manual_seed(args.seed + accelerator.process_index)  # each rank its own batch
    batch = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    batch = batch.to(accelerator.device)
    autocast = (torch.autocast(accelerator.device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
                else torch.autocast(accelerator.device.type, enabled=False))

    def step():
        with autocast:
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def synchronize():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        accelerator.wait_for_everyone()

    first_step = time.perf_counter()
    for index in range(args.warmup_steps):
        step()
        if index == 0:
            synchronize()
            first_step = time.perf_counter() - first_step
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    last_loss = loss.item()  # also waits for the device
    synchronize()
    seconds = time.perf_counter() - start
    profile = profile_steps(step, profile_top) if profile_top else None
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    peak = accelerator.gather(torch.tensor([peak], device=accelerator.device)).max().item()
    tokens = args.batch_size * args.seq_len * args.steps * accelerator.num_processes
    result = {"model": name, "note": note, "parameters_M": parameters / 1e6, "tokens_per_s": tokens / seconds,
              "tokens_per_s_per_process": tokens / seconds / accelerator.num_processes,
              "step_ms": 1000 * seconds / args.steps, "peak_memory_GiB": peak, "last_loss": last_loss,
              "compiled": compiled, "first_step_s": first_step if args.warmup_steps else float("nan")}
    if profile is not None:
        result["profile"] = profile
    del model, optimizer, batch
    accelerator.free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def shard_per_block(accelerator, model, param_dtype: str) -> None:
    """FSDP2 (an FSDP accelerate config): shards this model per block of its own class, whatever the config's
    fsdp_transformer_layer_cls_to_wrap names, and sets the mixed precision policy of --fsdp_param_dtype (bf16: the
    one scripts/train.py uses, without casts of block inputs and outputs, which would round a carried state)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = accelerator.state.fsdp_plugin
    plugin.transformer_cls_names_to_wrap = list(model._no_split_modules)
    plugin.mixed_precision_policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16,
                                                          output_dtype=None, cast_forward_inputs=False)
                                     if param_dtype == "bf16" else None)


def profile_steps(step, top: int) -> dict:
    """Two steps under torch.profiler: the `top` kernels and the `top` operators (the kernels' time attributed to the
    operator that launched them) by device time per step, so a gap to a peer is traced to what costs it."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(2):
            step()
        if cuda:
            torch.cuda.synchronize()
    kernels, operators = [], []
    for event in prof.key_averages():
        if not cuda:
            operators.append((event.key, event.count, event.self_cpu_time_total))
        elif event.device_type == DeviceType.CUDA:
            kernels.append((event.key, event.count, event.self_device_time_total))
        else:
            operators.append((event.key, event.count, event.self_device_time_total))

    def table(rows):
        rows = [r for r in rows if r[2] > 0]
        total = sum(r[2] for r in rows)
        rows.sort(key=lambda r: -r[2])
        out = [{"name": name[:100], "calls_per_step": count / 2, "ms_per_step": us / 2e3, "share": us / total}
               for name, count, us in rows[:top]]
        return out + [{"name": "(all)", "calls_per_step": sum(r[1] for r in rows) / 2, "ms_per_step": total / 2e3,
                       "share": 1.0}]

    return {"kernels": table(kernels), "operators": table(operators)}


def profile_markdown(result) -> str:
    lines = []
    for kind, rows in result["profile"].items():
        if len(rows) <= 1:
            continue
        lines += ["", f"Profile of {result['model']}: {kind} by device time per step", "",
                  "| name | calls | ms | share |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['calls_per_step']:.0f} | {r['ms_per_step']:.2f} | {100 * r['share']:.1f}% |"
                  for r in rows]
    return "\n".join(lines)


def markdown(results, header) -> str:
    lines = [header, "", "| round | model | mode | params (M) | tokens/s (global) | tokens/s / GPU | step (ms) | "
             "first step (s) | peak memory / GPU (GiB) | last loss | note |", "|---" * 11 + "|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r.get('round', 1)} | {r['model']} | - | - | - | - | - | - | - | - | "
                         f"skipped: {r['skipped']} |")
            continue
        peak = "n/a" if math.isnan(r["peak_memory_GiB"]) else f"{r['peak_memory_GiB']:.1f}"
        mode = "compiled" if r.get("compiled") else "eager"
        lines.append(f"| {r.get('round', 1)} | {r['model']} | {mode} | {r['parameters_M']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_process']:,.0f} | {r['step_ms']:.0f} | "
                     f"{r.get('first_step_s', float('nan')):.1f} | {peak} | {r['last_loss']:.3f} | {r['note']} |")
    return "\n".join(lines)


def main(argv=None):
    from accelerate import Accelerator

    args = parse_args(argv)
    config = load_preset(args.preset, **parse_config_overrides(args.config_overrides))
    # mixed_precision="no": the autocast above is the only one, so --dtype means what it says even under an
    # accelerate config that asks for bf16.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    parallel = (f"FSDP2, {args.fsdp_param_dtype} parameters" if getattr(accelerator, "is_fsdp2", False) else
                accelerator.distributed_type.value)
    results = []
    info = {"preset": args.preset, "config_overrides": args.config_overrides, "device": device,
            "processes": accelerator.num_processes, "parallelism": parallel, "batch_size_per_process": args.batch_size,
            "seq_len": args.seq_len, "dtype": args.dtype, "warmup_steps": args.warmup_steps, "steps": args.steps,
            "gradient_checkpointing": args.gradient_checkpointing, "compile": args.compile, "torch": torch.__version__,
            "results": results}
    for round_index in range(args.rounds):
        for name in args.models:  # each model's line and the JSON so far as soon as it is measured: a run cut off
            profile = args.profile if round_index == 0 else 0  # by a time limit keeps what it measured
            modes = (False, True) if args.compile else (False,)
            for compiled in modes:
                results.append(dict(bench_one(name, config, args, accelerator, profile, compiled),
                                    round=round_index + 1))
            if accelerator.is_main_process:
                print(markdown(results[-len(modes):], f"{name} measured (round {round_index + 1})"), flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(info, indent=1))
    if accelerator.is_main_process:
        header = (f"Training throughput: preset {args.preset}, {accelerator.num_processes} x {device} ({parallel}), "
                  f"{args.batch_size} x {args.seq_len} tokens per process, {args.dtype} autocast, AdamW, "
                  f"{args.steps} timed steps after {args.warmup_steps} warm-up")
        print(markdown(results, header))
        for result in results:
            if "profile" in result:
                print(profile_markdown(result))
        if args.json:
            Path(args.json).write_text(json.dumps(info, indent=1))
    return info


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # under `accelerate launch`: every rank leaves the group before
        torch.distributed.destroy_process_group()  # exiting, not in gloo/NCCL teardown at interpreter exit
