"""Kernel benchmark, side by side: our Triton kernels, our pure-PyTorch chunkwise form, fla's chunk_delta_rule
(if importable) and causal softmax attention (SDPA), forward and forward+backward, bf16.

    python scripts/bench/bench_kernels.py [--json out.json] [--check] [--sweep] [--rule delta|sum] [--quick]

Table columns: median ms per backend (triton.testing.do_bench) and, for ours and fla, the fraction of the
memory floor reached: floor = bytes that must move / bandwidth (3.0e12 B/s on an H100, 4.8e12 on an H200).
Forward floor = read q, k, v, beta + write o; forward+backward adds read q, k, v, beta, do + write dq, dk,
dv, dbeta (the state is never materialised in the floor).
--check: Triton vs the float64 token loop (outputs, final state, all gradients) at moderate sizes, and vs fla.
--sweep: time a few block-size / fusion settings of our kernels (for choosing defaults).
--profile: GPU time per kernel for one forward+backward, ours and fla.
--warm N: compile and autotune shape N only; run several at once before the timed run to save device time:
    for s in 0 1 2 3 4; do python3 scripts/bench/bench_kernels.py --warm $s --backends triton,fla & done; wait
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

# The repository root (scripts/bench/ is two levels below it), so this checkout's modeling_fwp is imported.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
if "--warm" in sys.argv:
    # Warm-up processes run side by side on one GPU: keep fla from saving autotune picks made under that
    # contention to its disk cache (FLA_CACHE_RESULTS defaults to 1), so the timed run tunes fla afresh.
    os.environ["FLA_CACHE_RESULTS"] = "0"

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from modeling_fwp import ops_triton, ops_triton_launch  # noqa: E402

try:
    from modeling_fwp.ops import delta_rule, sum_rule  # public dispatch (backend="chunk" / "triton")
except Exception:  # ops.py not there: the Triton entry points alone
    delta_rule = sum_rule = None
try:
    from fla.ops.delta_rule import chunk_delta_rule as fla_delta
    from fla.ops.simple_gla import chunk_simple_gla as fla_simple_gla
except Exception:
    fla_delta = fla_simple_gla = None

SHAPES = [  # (B, T, H, K, V)
    (16, 2048, 16, 64, 64),
    (4, 8192, 16, 64, 64),
    (1, 32768, 16, 64, 64),
    (4, 8192, 16, 128, 64),
    (4, 8192, 16, 256, 64),
]


def selected_shapes(args):
    return [SHAPES[i] for i in args.shapes] if args.shapes else SHAPES


def bandwidth():
    name = torch.cuda.get_device_name()
    return name, (4.8e12 if "H200" in name else 3.0e12)


def make_inputs(B, T, H, K, V, dtype=torch.bfloat16, grad=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, H, K, device="cuda", dtype=dtype, generator=g)
    k = F.normalize(torch.randn(B, T, H, K, device="cuda", dtype=torch.float32, generator=g), dim=-1).to(dtype)
    v = torch.randn(B, T, H, V, device="cuda", dtype=dtype, generator=g)
    beta = torch.rand(B, T, H, device="cuda", dtype=dtype, generator=g)
    for t in (q, k, v, beta):
        t.requires_grad_(grad)
    return q, k, v, beta


def runner(backend, rule):
    """fn(q, k, v, beta) -> o for one backend."""
    if backend == "triton":
        if rule == "delta":
            return lambda q, k, v, b: ops_triton.delta_rule_triton(q, k, v, b, q.shape[-1] ** -0.5)[0]
        return lambda q, k, v, b: ops_triton.sum_rule_triton(q, k, v, q.shape[-1] ** -0.5)[0]
    if backend == "chunk":
        if delta_rule is None:
            return None
        if rule == "delta":
            return lambda q, k, v, b: delta_rule(q, k, v, b, backend="chunk")[0]
        return lambda q, k, v, b: sum_rule(q, k, v, backend="chunk")[0]
    if backend == "fla":
        if fla_delta is None:
            return None
        if rule == "delta":
            return lambda q, k, v, b: fla_delta(q, k, v, b)[0]
        return lambda q, k, v, b: fla_simple_gla(q, k, v)[0]
    if backend == "sdpa":
        def sdpa(q, k, v, b):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return sdpa
    raise ValueError(backend)


def floor_bytes(B, T, H, K, V, elem=2, bwd=False):
    fwd = B * T * H * (2 * K + V + 1 + V) * elem
    if not bwd:
        return fwd
    return fwd + B * T * H * (2 * K + V + 1 + V) * elem + B * T * H * (2 * K + V + 1) * elem


def time_one(fn, B, T, H, K, V, bwd, backend):
    sdpa = backend == "sdpa"
    q, k, v, beta = make_inputs(B, T, H, K, V, grad=bwd)
    if sdpa:  # [B, H, T, D] layout, prepared outside the timed region
        q, k, v = (x.detach().transpose(1, 2).contiguous().requires_grad_(bwd) for x in (q, k, v))
    if not bwd:
        with torch.no_grad():
            return do_bench(lambda: fn(q, k, v, beta), warmup=25, rep=100, return_mode="median")
    o = fn(q, k, v, beta)
    do = torch.randn_like(o)
    leaves = [q, k, v] + ([] if sdpa else [beta])

    def step():
        fn(q, k, v, beta).backward(do)
    return do_bench(step, warmup=25, rep=100, grad_to_none=leaves, return_mode="median")


def bench(args):
    dev, bw = bandwidth()
    print(f"device: {dev}  torch {torch.__version__}  triton {triton.__version__}  "
          f"fla {'yes' if fla_delta else 'no'}  bandwidth for floor {bw:.1e} B/s", flush=True)
    shapes = SHAPES[:2] if args.quick else selected_shapes(args)
    backends = args.backends.split(",")
    rows = []
    for (B, T, H, K, V) in shapes:
        for bwd in (False, True):
            row = dict(B=B, T=T, H=H, K=K, V=V, pass_="fwd+bwd" if bwd else "fwd")
            floor_ms = floor_bytes(B, T, H, K, V, bwd=bwd) / bw * 1e3
            row["floor_ms"] = floor_ms
            for be in backends:
                if be == "sdpa" and K != V:
                    row[be] = None
                    continue
                if be == "chunk" and B * T * K * V * H > 4 * 8192 * 16 * 128 * 64:
                    row[be] = None  # the PyTorch form materialises too much at DPFP sizes; skip
                    continue
                fn = runner(be, args.rule)
                if fn is None:
                    row[be] = None
                    continue
                try:
                    row[be] = time_one(fn, B, T, H, K, V, bwd, be)
                except torch.cuda.OutOfMemoryError:
                    row[be] = "oom"
                    torch.cuda.empty_cache()
                except Exception as e:  # keep the table going; say what broke
                    row[be] = f"error: {type(e).__name__}: {str(e)[:200]}"
                print(f"  {B}x{T} K={K} {row['pass_']:8s} {be:7s} {row[be]}", flush=True)
            rows.append(row)
    print_table(rows, backends, dev)
    return dict(device=dev, torch=torch.__version__, triton=triton.__version__, rule=args.rule,
                bandwidth=bw, rows=rows)


def fmt(x):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x.split(":")[0]
    return f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"


def print_table(rows, backends, dev):
    head = ["B x T", "K", "pass", "floor ms"] + [f"{b} ms" for b in backends] + \
        [f"{b} % floor" for b in backends if b in ("triton", "fla")] + ["triton vs fla"]
    print(f"\n### {dev}, bf16, H=16\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [f"{r['B']} x {r['T']}", str(r["K"]), r["pass_"], f"{r['floor_ms']:.3f}"]
        cells += [fmt(r.get(b)) for b in backends]
        for b in backends:
            if b in ("triton", "fla"):
                x = r.get(b)
                cells.append(f"{100 * r['floor_ms'] / x:.0f}%" if isinstance(x, float) else "-")
        t, f = r.get("triton"), r.get("fla")
        cells.append(f"{f / t:.2f}x" if isinstance(t, float) and isinstance(f, float) else "-")
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------- correctness
def reference64(q, k, v, beta, scale, h0, cu, rule):
    from modeling_fwp.ops import reference_float64

    return reference_float64(q, k, v, beta if rule == "delta" else None, scale, h0, cu)


CHECK_CASES = [  # (B, T, H, K, V, cu_seqlens, dtype, rule)
    (2, 700, 4, 64, 64, None, torch.float32, "delta"),
    (2, 700, 4, 64, 64, None, torch.bfloat16, "delta"),
    (1, 600, 2, 256, 64, None, torch.float32, "delta"),
    (1, 300, 2, 512, 128, None, torch.float32, "delta"),
    (1, 900, 4, 64, 64, [0, 300, 300, 650, 900], torch.float32, "delta"),
    (2, 700, 4, 64, 64, None, torch.float32, "sum"),
    (2, 700, 4, 128, 64, None, torch.bfloat16, "sum"),
]


def check(args):
    torch.manual_seed(0)
    results = []
    cases = CHECK_CASES if args.check_case is None else [CHECK_CASES[args.check_case]]
    for case in cases:
        try:
            results.append(check_one(*case))
        except Exception as e:  # report and go on with the other cases
            print(f"check {case}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            results.append(dict(case=str(case), error=f"{type(e).__name__}: {str(e)[:300]}"))
    return results


def check_one(B, T, H, K, V, cu, dt, rule):
    N = B if cu is None else len(cu) - 1
    q, k, v, beta = make_inputs(B, T, H, K, V, dtype=dt, grad=True, seed=1)
    h0 = torch.randn(N, H, K, V, device="cuda", requires_grad=True)
    cut = torch.tensor(cu, device="cuda", dtype=torch.int32) if cu else None
    scale = K ** -0.5
    if rule == "delta":
        o, ht = ops_triton.delta_rule_triton(q, k, v, beta, scale, h0, True, cut, 64)
        leaves = [q, k, v, beta, h0]
    else:
        o, ht = ops_triton.sum_rule_triton(q, k, v, scale, h0, True, cut, 64)
        leaves = [q, k, v, h0]
    go, gh = torch.randn_like(o, dtype=torch.float32), torch.randn_like(ht)
    grads = torch.autograd.grad((o.float() * go).sum() + (ht * gh).sum(), leaves)
    ref_leaves = [x.detach().double().requires_grad_(True) for x in leaves]
    rq, rk, rv = ref_leaves[:3]
    rb = ref_leaves[3] if rule == "delta" else None
    ro, rh = reference64(rq, rk, rv, rb, scale, ref_leaves[-1], cu, rule)
    rgrads = torch.autograd.grad((ro * go.double()).sum() + (rh * gh.double()).sum(), ref_leaves)
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    errs = {"o": rel(o, ro), "state": rel(ht, rh)}
    for name, a, b in zip(["dq", "dk", "dv", "dbeta", "dh0"] if rule == "delta" else ["dq", "dk", "dv", "dh0"],
                          grads, rgrads):
        errs[name] = rel(a, b)
    entry = dict(case=f"{rule} B{B} T{T} H{H} K{K} V{V} cu={cu} {str(dt)[6:]}", vs="float64 loop", errs=errs)
    if fla_delta is not None and dt == torch.bfloat16 and cu is None:
        # fla on the same bf16 inputs: how far apart are two bf16 implementations (for scale)
        fq, fk, fv, fb, fh = [x.detach().clone().requires_grad_(True) for x in leaves[:4]] + \
            [h0.detach().clone().requires_grad_(True)]
        if rule == "delta":
            fo, fht = fla_delta(fq, fk, fv, fb, scale=scale, initial_state=fh, output_final_state=True)
            fl = [fq, fk, fv, fb, fh]
        else:
            fo, fht = fla_simple_gla(fq, fk, fv, scale=scale, initial_state=fh, output_final_state=True)
            fl = [fq, fk, fv, fh]
        fgr = torch.autograd.grad((fo.float() * go).sum() + (fht * gh).sum(), fl)
        entry["fla_vs_float64"] = {"o": rel(fo, ro), "state": rel(fht, rh)}
        names = ["dq", "dk", "dv", "dbeta", "dh0"] if rule == "delta" else ["dq", "dk", "dv", "dh0"]
        for n, a, b in zip(names, fgr, rgrads):
            entry["fla_vs_float64"][n] = rel(a, b)
    print(entry["case"], " ".join(f"{n}={e:.1e}" for n, e in errs.items()),
          ("| fla: " + " ".join(f"{n}={e:.1e}" for n, e in entry["fla_vs_float64"].items()))
          if "fla_vs_float64" in entry else "", flush=True)
    return entry


def sweep(args):
    """A few settings of our kernels at each shape; prints fwd and fwd+bwd ms per setting."""
    settings = [
        dict(),
        dict(fused_output=True),
        dict(fused_output=False),
        dict(BV_state=32),
        dict(warps_state=8),
        dict(stages_state=1),
        dict(stages_state=3),
        dict(warps=8),
    ]
    out = []
    shapes = [s for s in selected_shapes(args) if args.sweep_k is None or s[3] in args.sweep_k]
    for (B, T, H, K, V) in shapes:
        for st in settings:
            ops_triton_launch.TUNE.clear()
            ops_triton_launch.TUNE.update(st)
            fn = runner("triton", args.rule)
            try:
                f = time_one(fn, B, T, H, K, V, False, "triton")
                fb = time_one(fn, B, T, H, K, V, True, "triton")
            except Exception as e:
                f = fb = f"error: {type(e).__name__}: {str(e)[:200]}"
            out.append(dict(shape=[B, T, H, K, V], tune=st, fwd=f, fwdbwd=fb))
            print(f"sweep {B}x{T} K={K} {st}: fwd {fmt(f)}  fwd+bwd {fmt(fb)}", flush=True)
    ops_triton_launch.TUNE.clear()
    return out


def profile(args):
    """GPU time per kernel for one forward+backward (torch.profiler), ours and fla, at the K=64 shapes (or at
    the --shapes given)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    out = []
    for (B, T, H, K, V) in selected_shapes(args) if args.shapes else [s for s in SHAPES if s[3] == 64]:
        for be in [b for b in ("triton", "fla") if b in args.backends.split(",")]:
            fn = runner(be, args.rule)
            if fn is None:
                continue
            q, k, v, beta = make_inputs(B, T, H, K, V, grad=True)
            do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)

            def step():
                fn(q, k, v, beta).backward(do)
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            reps = 5
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(reps):
                    step()
                torch.cuda.synchronize()
            rows = []
            for e in prof.key_averages():
                t = getattr(e, "self_device_time_total", None)
                if t is None:
                    t = getattr(e, "self_cuda_time_total", 0)
                if t > 0:
                    rows.append((t / reps / 1e3, e.count // reps, e.key))
            rows.sort(reverse=True)
            total = sum(r[0] for r in rows)
            print(f"profile {be} {B}x{T} K={K} fwd+bwd: kernels sum {total:.3f} ms", flush=True)
            for ms, n, name in rows[:12]:
                print(f"    {ms:7.3f} ms  x{n:<3d} {name[:90]}", flush=True)
            out.append(dict(backend=be, shape=[B, T, H, K, V], total_ms=total,
                            kernels=[dict(ms=a, calls=b, name=c) for a, b, c in rows]))
    return out


def tuned_picks(quiet=False):
    """The autotuner's pick for every (kernel, key) our kernels were tuned for in this process: the data the
    fixed launch settings (FWP_TRITON_AUTOTUNE=0) are chosen from."""
    picks = []
    for tuned in ops_triton_launch._TUNED.values():
        name = getattr(getattr(tuned, "fn", None), "__name__", None) or str(tuned)
        for key, cfg in getattr(tuned, "cache", {}).items():
            picks.append(dict(kernel=name, key=[str(k) for k in key], meta=dict(cfg.kwargs),
                              num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    for p in [] if quiet else picks:
        print(f"tuned {p['kernel']:24s} key {p['key']}: {p['meta']} warps {p['num_warps']} "
              f"stages {p['num_stages']}", flush=True)
    return picks


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--check", action="store_true", help="correctness vs float64 loop and fla first")
    ap.add_argument("--check-case", type=int, default=None, help="with --check: only case #N of CHECK_CASES")
    ap.add_argument("--sweep", action="store_true", help="time a few kernel settings")
    ap.add_argument("--sweep-k", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--profile", action="store_true", help="per-kernel GPU time, ours and fla")
    ap.add_argument("--warm", type=int, default=None,
                    help="only run shape #WARM once per backend (fills triton's disk cache; run several at once)")
    ap.add_argument("--quick", action="store_true", help="first two shapes only")
    ap.add_argument("--shapes", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="indices into SHAPES to bench and sweep, e.g. 0,1,2,3")
    ap.add_argument("--rule", default="delta", choices=["delta", "sum"])
    ap.add_argument("--backends", default="triton,chunk,fla,sdpa")
    args = ap.parse_args()
    if args.warm is not None:  # compile (and autotune) one shape's kernels, so the timed run finds them cached
        B, T, H, K, V = SHAPES[args.warm]
        for be in args.backends.split(","):
            fn = runner(be, args.rule)
            if fn is None or be in ("chunk", "sdpa"):
                continue
            for bwd in (False, True):
                time_one(fn, B, T, H, K, V, bwd, be)
            print(f"warm {be} {SHAPES[args.warm]} done", flush=True)
        return
    result = {}
    t0 = time.time()

    def save():  # after every stage, so a run cut off by a time limit still leaves what it measured
        result["wall_s"] = time.time() - t0
        result["tuned"] = tuned_picks(quiet=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    if args.check:
        result["check"] = check(args)
        save()
    if args.profile:
        result["profile"] = profile(args)
        save()
    if args.sweep:
        result["sweep"] = sweep(args)
        save()
    if not args.no_bench:
        result["bench"] = bench(args)
    save()
    tuned_picks()

if __name__ == "__main__":
    main()
