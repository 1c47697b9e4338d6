"""Where a captured decode step's time goes (GPU): the step alone against generate()'s ms per token, whether CUDA
graphs were used (inductor's skip counters), and the kernels one step launches.

    python scripts/bench/profile_captured_decode.py --json captured_profile.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import modeling_fwp  # noqa: E402
from modeling_fwp.cache_fwp import FWPStaticCache  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="deltanet-370m")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = modeling_fwp.FWPForCausalLM(modeling_fwp.load_preset(args.preset)).to(torch.bfloat16).eval()
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt), device="cuda")
    report = {}
    with torch.inference_mode():
        cache = FWPStaticCache(model.config, args.batch, device="cuda", dtype=torch.bfloat16)
        model(ids, cache=cache, logits_to_keep=1)
        call = model.get_compiled_call(None)
        token = ids[:, -1:]
        start = time.perf_counter()
        for _ in range(3):  # compile and capture
            call(input_ids=token, cache=cache)
        torch.cuda.synchronize()
        report["warmup_s"] = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(args.steps):
            call(input_ids=token, cache=cache)
        torch.cuda.synchronize()
        report["step_ms"] = 1000 * (time.perf_counter() - start) / args.steps
        from torch._dynamo.utils import counters

        report["counters"] = {group: dict(values) for group, values in counters.items() if values}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                call(input_ids=token, cache=cache)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        report["cuda_kernels_per_step"] = sum(e.count for e in events) / 5
        report["cuda_ms_per_step"] = sum(e.device_time_total for e in events) / 5 / 1000
        report["top_kernels"] = [(e.key[:80], e.count // 5, round(e.device_time_total / 5 / 1000, 3))
                                 for e in sorted(events, key=lambda e: -e.device_time_total)[:12]]
        report["top_cpu"] = [(e.key[:80], e.count // 5, round(e.cpu_time_total / 5 / 1000, 3))
                             for e in sorted(prof.key_averages(), key=lambda e: -e.cpu_time_total)[:12]]
        kwargs = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0,
                      cache_implementation="static")
        model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, **dict(kwargs, max_new_tokens=1, min_new_tokens=1))
        torch.cuda.synchronize()
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        report["generate_ms_per_token"] = 1000 * (time.perf_counter() - start - prefill) / 63
    print(json.dumps(report, indent=1, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
