"""Generation benchmark: prefill time, ms per new token and peak memory against the prompt length.

Our FWP model (the "deltanet-370m" preset) side by side, in the same run, with fla's DeltaNetForCausalLM of the same
size (when `fla` imports) and transformers' LlamaForCausalLM (sdpa) of the same size. Weights are random (speed and
memory do not depend on them), in bf16; decoding is greedy `generate()` with a fixed number of new tokens: eager for
"fwp", "fla" and "llama"; captured for "fwp_static" and "llama_static" (`cache_implementation="static"`, which on
CUDA compiles the decode step and replays it with CUDA graphs).

    python scripts/bench/bench_generate.py --json bench_generate.json                # GPU, the full grid
    python scripts/bench/bench_generate.py --tiny --device cpu                       # smoke test of the script itself

Per case (model, batch, prompt length), after a warm-up run of the same shape:
  prefill_s     generate(max_new_tokens=1): the prompt forward and the first token
  total_s       generate(max_new_tokens=N) with min_new_tokens=N (no early stop)
  ms_per_token  (total_s - prefill_s) / (N - 1): the cost of one decode step (N - 1 forwards of one token)
  peak_gb       torch.cuda.max_memory_allocated during the timed runs, reset per case (weights included)
  cache_mb      bytes held by the returned cache (a constant-size state for FWP and fla, the KV cache for Llama)
  warmup_s      the first generate() of the shape: kernel autotuning, and for the captured models compile + capture
A case that runs out of memory is recorded as "OOM" and the grid goes on; results are rewritten to --json after every
case so an interrupted run keeps what it measured.
"""

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

MODELS = ("fwp", "fwp_static", "fla", "llama", "llama_static")
STATIC = ("fwp_static", "llama_static")  # generate(cache_implementation="static"): the captured decode step


def generated_cache(out):
    """The cache of a generate() output: `cache` from transformers 5.24 on, `past_key_values` before."""
    return out.get("cache", None) if "cache" in out.keys() else out.get("past_key_values", None)
# The ~370M size shared by the three models (the fla DeltaNet anchor): 24 layers of width 1024, 16 heads of 64,
# SwiGLU width 2816 (what fla derives from hidden_ratio=4), vocabulary 32000, untied embeddings.
FULL = dict(hidden=1024, layers=24, heads=16, head_dim=64, intermediate=2816, vocab=32000)
TINY = dict(hidden=64, layers=2, heads=4, head_dim=16, intermediate=128, vocab=256)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--batch_sizes", default=None, help="comma-separated (default 1,8; tiny: 1,2)")
    parser.add_argument("--prompt_lengths", default=None,
                        help="comma-separated (default 512,2048,16384,32768; tiny: 32,128)")
    parser.add_argument("--new_tokens", type=int, default=None, help="new tokens per case (default 64; tiny: 8)")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats per case (the median is kept)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--tiny", action="store_true", help="tiny models and sizes (checks the script on a CPU)")
    parser.add_argument("--fwp_preset", default="deltanet-370m", help="modeling_fwp preset of our model")
    parser.add_argument("--fwp_backend", default=None, help="override FWPConfig.kernel_backend (default: preset's)")
    parser.add_argument("--prefill_chunk_size", type=int, default=None,
                        help="generation_config.prefill_chunk_size for every model (default: one prefill forward)")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="wall-clock budget: each model gets an equal share of what is left, and cases that "
                             "would start past its share are marked 'not run' (fits a run under a time limit)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--markdown", default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; allowed: {', '.join(MODELS)}")
    args.batch_sizes = _ints(parser, "batch_sizes", args.batch_sizes or ("1,2" if args.tiny else "1,8"))
    args.prompt_lengths = _ints(parser, "prompt_lengths",
                                args.prompt_lengths or ("32,128" if args.tiny else "512,2048,16384,32768"))
    args.new_tokens = args.new_tokens or (8 if args.tiny else 64)
    if args.new_tokens < 2:
        parser.error("--new_tokens must be >= 2 (one prefill token plus at least one decode step)")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def _ints(parser, name, text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--{name} must be comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        parser.error(f"--{name} must hold integers >= 1, got {text!r}")
    return values


# ------------------------------------------------------------------------------------------------ the three models
def build_fwp(size, args):
    import modeling_fwp

    overrides = {}
    if args.tiny:
        overrides = dict(hidden_size=size["hidden"], num_hidden_layers=size["layers"], num_heads=size["heads"],
                         head_dim=size["head_dim"], intermediate_size=size["intermediate"], vocab_size=size["vocab"])
    if args.fwp_backend:
        overrides["kernel_backend"] = args.fwp_backend
    return modeling_fwp.FWPForCausalLM(modeling_fwp.load_preset(args.fwp_preset, **overrides))


def build_fla(size, args):
    from fla.models import DeltaNetConfig, DeltaNetForCausalLM

    config = DeltaNetConfig(
        hidden_size=size["hidden"], num_hidden_layers=size["layers"], num_heads=size["heads"],
        expand_k=size["heads"] * size["head_dim"] / size["hidden"], expand_v=size["heads"] * size["head_dim"] / size["hidden"],
        hidden_ratio=4, intermediate_size=size["intermediate"], vocab_size=size["vocab"], use_short_conv=True,
        conv_size=4, use_beta=True, use_output_norm=True, qk_norm="l2", qk_activation="silu", norm_eps=1e-6,
        tie_word_embeddings=False, fuse_cross_entropy=False,
    )
    return DeltaNetForCausalLM(config)


def build_llama(size, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    longest = max(args.prompt_lengths) + args.new_tokens
    config = LlamaConfig(
        hidden_size=size["hidden"], num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
        num_key_value_heads=size["heads"], head_dim=size["head_dim"], intermediate_size=size["intermediate"],
        vocab_size=size["vocab"], max_position_embeddings=max(longest, 4096), tie_word_embeddings=False,
        rms_norm_eps=1e-6, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


BUILDERS = {"fwp": build_fwp, "fwp_static": build_fwp, "fla": build_fla, "llama": build_llama,
            "llama_static": build_llama}


def unavailable_reason(name, device):
    """Why a model cannot run here (None when it can)."""
    if name == "fla":
        try:
            import fla  # noqa: F401
        except Exception as error:  # not installed, or its import fails
            return f"fla does not import ({type(error).__name__})"
        if device.type != "cuda":
            return "fla's kernels need CUDA"
    return None


# ------------------------------------------------------------------------------------------------ measuring
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_nbytes(cache, depth=0, seen=None):
    """Bytes of every tensor reachable from a cache object (any cache class: FWPCache, DynamicCache, fla's)."""
    seen = set() if seen is None else seen
    if cache is None or depth > 6 or id(cache) in seen:
        return 0
    seen.add(id(cache))
    if isinstance(cache, torch.Tensor):
        return cache.numel() * cache.element_size()
    if isinstance(cache, dict):
        return sum(cache_nbytes(v, depth + 1, seen) for v in cache.values())
    if isinstance(cache, (list, tuple)):
        return sum(cache_nbytes(v, depth + 1, seen) for v in cache)
    if hasattr(cache, "__dict__"):
        return sum(cache_nbytes(v, depth + 1, seen) for v in vars(cache).values())
    return 0


def timed_generate(model, input_ids, new_tokens, args, device, static=False):
    kwargs = dict(attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, num_beams=1, pad_token_id=0, return_dict_in_generate=True)
    if static:
        kwargs["cache_implementation"] = "static"
        kwargs["max_cache_len"] = input_ids.shape[1] + args.new_tokens  # one Llama cache size per case
    if args.prefill_chunk_size:
        kwargs["prefill_chunk_size"] = args.prefill_chunk_size
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, **kwargs)
    sync(device)
    elapsed = time.perf_counter() - start
    if out.sequences.shape[1] != input_ids.shape[1] + new_tokens:
        raise RuntimeError(f"generated {out.sequences.shape[1] - input_ids.shape[1]} tokens, expected {new_tokens}")
    return elapsed, out


def is_oom(error):
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def run_case(model, name, batch, length, args, device):
    generator = torch.Generator().manual_seed(batch * 100_003 + length)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=generator).to(device)
    row = dict(model=name, batch=batch, prompt_len=length, new_tokens=args.new_tokens)
    static = name in STATIC
    try:
        # warm-up of this shape (kernel autotuning, allocator; compile and capture for the static models)
        row["warmup_s"] = round(timed_generate(model, ids, 4, args, device, static)[0], 2)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        prefills, totals = [], []
        for _ in range(args.repeats):
            prefills.append(timed_generate(model, ids, 1, args, device, static)[0])
            total, out = timed_generate(model, ids, args.new_tokens, args, device, static)
            totals.append(total)
        row["cache_mb"] = round(cache_nbytes(generated_cache(out)) / 2**20, 2)
        del out
        prefill, total = statistics.median(prefills), statistics.median(totals)
        row.update(status="ok", prefill_s=round(prefill, 4), total_s=round(total, 4),
                   ms_per_token=round(1000 * (total - prefill) / (args.new_tokens - 1), 3))
        row["decode_tokens_per_s"] = round(batch * 1000 / row["ms_per_token"], 1) if row["ms_per_token"] > 0 else None
        row["peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3) if device.type == "cuda" else None
    except Exception as error:  # noqa: BLE001 - one failing case must not stop the grid
        row["status"] = "OOM" if is_oom(error) else f"error: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def environment(args, device):
    info = dict(device=str(device), dtype=args.dtype, torch=torch.__version__, python=platform.python_version(),
                new_tokens=args.new_tokens, repeats=args.repeats, tiny=args.tiny, fwp_preset=args.fwp_preset,
                fwp_backend=args.fwp_backend, prefill_chunk_size=args.prefill_chunk_size)
    import transformers

    info["transformers"] = transformers.__version__
    try:
        import fla

        info["fla"] = getattr(fla, "__version__", "unknown")
    except Exception:  # noqa: BLE001
        info["fla"] = None
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ------------------------------------------------------------------------------------------------ reporting
def markdown_table(results, models):
    ok = lambda row, key, fmt: (fmt.format(row[key]) if row.get("status") == "ok" and row.get(key) is not None  # noqa: E731
                                else ("n/a" if row.get("status") == "ok" else row.get("status", "-").split(":")[0].split(" (")[0]))
    by_key = {(r["model"], r["batch"], r["prompt_len"]): r for r in results["cases"]}
    shapes = sorted({(r["batch"], r["prompt_len"]) for r in results["cases"]})
    header = ["batch", "prompt"]
    metrics = (("prefill s", "prefill_s", "{:.3f}"), ("ms/token", "ms_per_token", "{:.2f}"),
               ("peak GB", "peak_gb", "{:.2f}"), ("cache MB", "cache_mb", "{:.1f}"), ("warm-up s", "warmup_s", "{:.1f}"))
    for title, _, _ in metrics:
        header += [f"{m} {title}" for m in models]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for batch, length in shapes:
        cells = [str(batch), str(length)]
        for _, key, fmt in metrics:
            cells += [ok(by_key.get((m, batch, length), {}), key, fmt) for m in models]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {m}: {results['models'][m]}" for m in models if m in results["models"]]
    return "\n".join(lines + [""] + notes)


def write_outputs(results, args):
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(results, args.models) + "\n")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is visible (use --device cpu --tiny to check the script)")
    dtype = getattr(torch, args.dtype)
    size = TINY if args.tiny else FULL
    results = dict(environment=environment(args, device), size=size, models={}, cases=[])
    started = time.perf_counter()
    for index, name in enumerate(args.models):
        deadline = None
        if args.budget_s is not None:
            left = args.budget_s - (time.perf_counter() - started)
            deadline = time.perf_counter() + left / (len(args.models) - index)
        reason = unavailable_reason(name, device)
        if reason is not None:
            results["models"][name] = f"skipped: {reason}"
            for batch in args.batch_sizes:
                for length in args.prompt_lengths:
                    results["cases"].append(dict(model=name, batch=batch, prompt_len=length, status="skipped"))
            print(f"[{name}] skipped: {reason}", file=sys.stderr)
            continue
        # One model on the device at a time, so each peak counts only its own weights.
        torch.manual_seed(0)
        with torch.device(device):
            model = BUILDERS[name](size, args)
        model = model.to(dtype).eval()
        params = sum(p.numel() for p in model.parameters())
        results["models"][name] = f"{type(model).__name__}, {params / 1e6:.1f}M parameters"
        print(f"[{name}] {results['models'][name]}", file=sys.stderr)
        for batch in args.batch_sizes:
            for length in args.prompt_lengths:
                if deadline is not None and time.perf_counter() > deadline:
                    row = dict(model=name, batch=batch, prompt_len=length, status="not run (--budget_s)")
                else:
                    row = run_case(model, name, batch, length, args, device)
                results["cases"].append(row)
                print(f"[{name}] batch {batch} prompt {length}: {json.dumps(row)}", file=sys.stderr)
                write_outputs(results, args)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_outputs(results, args)
    env = results["environment"]
    print(f"\n{env.get('gpu', env['device'])}, {env['dtype']}, {args.new_tokens} new tokens, greedy generate() "
          "(*_static: captured decode)\n")
    print(markdown_table(results, args.models))


if __name__ == "__main__":
    main()
