#!/usr/bin/env python
"""A user's first use of a fresh GPU machine, with the Triton autotuner (the default) and without it
(FWP_TRITON_AUTOTUNE=0): the first training step and the first generate(), each in a fresh process with empty
Triton and inductor caches, and the steady-state time of each. Prints a side-by-side table; --out writes JSON.

    python scripts/bench/bench_first_use.py --out results/bench/first_use_h100.json          # deltanet-370m, ~4 min on H100
    python scripts/bench/bench_first_use.py --modes fixed --what generate --out first.json   # one column, one job
    python scripts/bench/bench_first_use.py --device cpu --preset tiny --batch_size 2 --seq_len 64 --prompt_len 16 \\
        --new_tokens 4 --steps 3 --out smoke.json                                       # CPU smoke run of the plumbing

Per mode ("autotune": the default settings; "fixed": FWP_TRITON_AUTOTUNE=0) two child processes run, one per job,
each with its own empty TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR, so nothing compiled or tuned by an earlier run
(or by the other job) is reused: what a user meets on a new machine.

- train: the preset on random tokens, AdamW under bf16 autocast with fp32 parameters (as the Trainer's --bf16),
  batch x seq_len tokens per step. "first step" is the wall time of step 1 (compiling and tuning included);
  "steady step" the median of the steps after the first two.
- generate: the preset in bf16 (as scripts/generate.py loads a model on CUDA), greedy, one prompt of prompt_len
  random tokens and new_tokens new ones. "first generate" is the first call's wall time, "steady generate" the
  median of the next calls (same shapes).

Each child also reports its start-up (imports and building the model) separately. A child that runs past
--child_timeout is stopped and its row says so ("> N (stopped)": at least N seconds), with the phases it finished;
no child starts once --budget seconds have passed, and none runs past it. The defaults fit about 4 minutes in all,
which may stop the autotuned runs; `--child_timeout 280 --budget 560` gives them room within a 10-minute call.
The fixed-settings runs go first. The random weights are the preset's init (the times do not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # scripts/bench/ -> the repository root
MODES = {"autotune": {}, "fixed": {"FWP_TRITON_AUTOTUNE": "0"}}
JOBS = ("generate", "train")
ROWS = (  # (label, job, key, unit)
    ("start-up: imports + model (s)", "train", "startup_s", "s"),
    ("first training step (s)", "train", "first_step_s", "s"),
    ("steady training step (ms)", "train", "steady_step_s", "ms"),
    ("start-up: imports + model (s)", "generate", "startup_s", "s"),
    ("first generate() (s)", "generate", "first_generate_s", "s"),
    ("steady generate() (s)", "generate", "steady_generate_s", "s"),
    ("steady decode (ms / token)", "generate", "steady_ms_per_token", "raw"),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--preset", default="deltanet-370m", help="configuration/models preset (name or path)")
    parser.add_argument("--modes", default="autotune,fixed", help="comma-separated subset of autotune,fixed")
    parser.add_argument("--what", default="generate,train", help="comma-separated subset of generate,train, run in "
                        "this order per mode")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run of the plumbing")
    parser.add_argument("--batch_size", type=int, default=4, help="training sequences per step")
    parser.add_argument("--seq_len", type=int, default=2048, help="training tokens per sequence")
    parser.add_argument("--steps", type=int, default=8, help="training steps in all (>= 3: the first two are warm-up)")
    parser.add_argument("--prompt_len", type=int, default=512)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--generate_calls", type=int, default=3, help="generate() calls in all (>= 2)")
    parser.add_argument("--child_timeout", type=float, default=120.0, help="seconds before a child is stopped")
    parser.add_argument("--budget", type=float, default=230.0,
                        help="no child starts after this many seconds (the default fits ~4 minutes in all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: "train" or "generate"
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.what = [w.strip() for w in args.what.split(",") if w.strip()]
    bad = [m for m in args.modes if m not in MODES] + [w for w in args.what if w not in JOBS]
    if bad:
        parser.error(f"unknown mode or job {bad}; modes: {', '.join(MODES)}; jobs: {', '.join(JOBS)}")
    if args.steps < 3 or args.generate_calls < 2:
        parser.error("--steps must be >= 3 and --generate_calls >= 2 (a steady-state time needs them)")
    return args


# ---------------------------------------------------------------------------------------------------- child side

def report(kind: str, values: dict) -> None:
    print(f"{kind} {json.dumps(values)}", flush=True)


def child(args) -> None:
    started = time.perf_counter()
    result = {"job": args.child}
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    import modeling_fwp  # noqa: F401  registers "fwp"
    from modeling_fwp import FWPForCausalLM
    from modeling_fwp.presets import load_preset

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_first_use: no CUDA GPU here (use --device cpu for a smoke run)")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    config = load_preset(args.preset)
    with device:
        model = FWPForCausalLM(config)
    if args.device == "cuda":
        torch.cuda.synchronize()
    result.update(startup_s=time.perf_counter() - started, parameters=sum(p.numel() for p in model.parameters()))
    report("PARTIAL", result)

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    if args.child == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
        ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=device)
        times = []
        for step in range(args.steps):
            sync()
            tick = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.device == "cuda"):
                loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - tick)
            if step == 0:
                result.update(first_step_s=times[0], loss_first=float(loss))
                report("PARTIAL", result)
        result.update(steady_step_s=statistics.median(times[2:]), step_times_s=times, loss_last=float(loss),
                      tokens_per_step=args.batch_size * args.seq_len)
        if args.device == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        model = model.to(torch.bfloat16 if args.device == "cuda" else torch.float32).eval()
        prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len), device=device)
        times = []
        for call in range(args.generate_calls):
            sync()
            tick = time.perf_counter()
            with torch.no_grad():
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                                     min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
            sync()
            times.append(time.perf_counter() - tick)
            if call == 0:
                result.update(first_generate_s=times[0], new_tokens=int(out.shape[1] - args.prompt_len))
                report("PARTIAL", result)
        steady = statistics.median(times[1:])
        result.update(steady_generate_s=steady, generate_times_s=times,
                      steady_ms_per_token=1000 * steady / max(1, args.new_tokens))
    result["child_wall_s"] = time.perf_counter() - started
    report("RESULT", result)


# --------------------------------------------------------------------------------------------------- parent side

def run_child(args, mode: str, job: str, work: Path, timeout: float) -> dict:
    caches = work / f"{mode}-{job}"
    env = dict(os.environ, **MODES[mode], TRITON_CACHE_DIR=str(caches / "triton"),
               TORCHINDUCTOR_CACHE_DIR=str(caches / "inductor"), PYTHONUNBUFFERED="1")
    if mode == "autotune":
        env.pop("FWP_TRITON_AUTOTUNE", None)  # the default, whatever the caller's environment says
    argv = [sys.executable, str(Path(__file__).resolve()), "--out", "-", "--child", job, "--preset", args.preset,
            "--device", args.device, "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len),
            "--steps", str(args.steps), "--prompt_len", str(args.prompt_len), "--new_tokens", str(args.new_tokens),
            "--generate_calls", str(args.generate_calls), "--seed", str(args.seed)]
    tick = time.perf_counter()
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(REPO_ROOT))
        stdout, stderr, timed_out, code = proc.stdout, proc.stderr, False, proc.returncode
    except subprocess.TimeoutExpired as error:
        decode = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        stdout, stderr, timed_out, code = decode(error.stdout), decode(error.stderr), True, None
    lines = [line for line in stdout.splitlines() if line.startswith(("RESULT ", "PARTIAL "))]
    result = json.loads(lines[-1].split(" ", 1)[1]) if lines else {"job": job}
    result.update(mode=mode, wall_s=time.perf_counter() - tick, complete=bool(lines and lines[-1].startswith("RESULT")))
    if timed_out:
        result.update(timed_out=True, limit_s=timeout)
    elif code != 0:
        result.update(returncode=code, error=stderr.strip().splitlines()[-1:] or ["no output"])
    print(f"  {mode:8s} {job:8s} {result['wall_s']:7.1f} s  "
          + ("complete" if result["complete"] else "TIMED OUT" if timed_out else f"FAILED: {result.get('error')}"),
          flush=True)
    return result


def cell(result: dict | None, key: str, unit: str) -> str:
    if result is None or "not_run" in result:
        return "not run"
    value = result.get(key)
    if value is None:
        if result.get("timed_out"):  # stopped during this phase or before it
            began = result.get("startup_s")
            return f"> {result['limit_s'] - began:.0f} (stopped)" if key.startswith("first") and began else "stopped"
        return "failed" if "error" in result else "-"
    return f"{1000 * value:.1f}" if unit == "ms" else f"{value:.3g}" if unit == "raw" else f"{value:.2f}"


def table(runs: dict, modes: list[str], jobs: list[str]) -> str:
    names = {"autotune": "autotuned (default)", "fixed": "FWP_TRITON_AUTOTUNE=0"}
    header = "| | " + " | ".join(names[m] for m in modes) + " |"
    lines = [header, "|---|" + "---|" * len(modes)]
    for label, job, key, unit in ROWS:
        if job in jobs:
            lines.append(f"| {label} ({job}) | " if label.startswith("start-up") else f"| {label} | ")
            lines[-1] += " | ".join(cell(runs.get(m, {}).get(job), key, unit) for m in modes) + " |"
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    started = time.perf_counter()
    info = {"preset": args.preset, "device": args.device, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "steps": args.steps, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "generate_calls": args.generate_calls, "child_timeout_s": args.child_timeout, "budget_s": args.budget}
    probe = ("import json, torch, transformers; import importlib.util as u\n"
             "t = u.find_spec('triton') and __import__('triton').__version__\n"
             "print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__, 'triton': t,"
             " 'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None}))")
    versions = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    info.update(json.loads(versions.stdout.strip().splitlines()[-1]) if versions.returncode == 0 else {})
    if args.device == "cuda" and not info.get("gpu"):
        print("bench_first_use: no CUDA GPU here (use --device cpu for a smoke run)", file=sys.stderr)
        return 1
    print(f"{args.preset} on {info.get('gpu') or 'cpu'}: torch {info.get('torch')}, triton {info.get('triton')}",
          flush=True)
    runs: dict = {mode: {} for mode in args.modes}
    with tempfile.TemporaryDirectory(prefix="fwp-first-use-") as work:
        # fixed first: it is short, so a budget cut hits the long autotuned runs, whose stop is itself the answer
        for mode in sorted(args.modes, key=lambda m: m != "fixed"):
            for job in args.what:
                left = args.budget - (time.perf_counter() - started)
                if left <= 10:
                    print(f"  {mode:8s} {job:8s} not run: the --budget of {args.budget:.0f} s is spent", flush=True)
                    runs[mode][job] = {"job": job, "mode": mode, "not_run": "budget spent"}
                    continue
                runs[mode][job] = run_child(args, mode, job, Path(work), min(args.child_timeout, left))
    text = table(runs, args.modes, args.what)
    print("\n" + text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"info": info, "runs": runs, "table": text,
                                          "total_s": time.perf_counter() - started}, indent=1))
    print(f"\nwrote {args.out} ({time.perf_counter() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
