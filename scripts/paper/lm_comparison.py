#!/usr/bin/env python
"""The paper's language-modelling comparison at small scale (PAPER.md 3b, Tables 2-5; issue 24).

Trains every model of the paper's small WikiText-103 setting on the embedded Shakespeare corpus with one
tokenizer, the same token budget, optimizer, schedule and batch, several seeds each, beside a softmax Transformer
from transformers itself (GPT-2), then judges the paper's orderings (C1-C7) with the spread over seeds:

    python scripts/paper/lm_comparison.py --scale cpu --out results/lm_comparison/cpu            # 2-core CPU, < 30 min
    python scripts/paper/lm_comparison.py --scale gpu --out $OUT/lm --parallel 12 --deadline-minutes 9   # one GPU
    python scripts/paper/lm_comparison.py --scale quick --out /tmp/lm                               # CI smoke run
    python scripts/paper/lm_comparison.py --report-only --out results/lm_comparison/gpu --results-md RESULTS.md

How a run is made (one subprocess each, `--parallel` at a time, so several small models share one GPU):
- the data are train.py's: the embedded corpus through `modeling_fwp.data`, a byte-level BPE trained on the
  training split (`tokenizer_utils`), the validation and test splits as fixed blocks of `context` tokens; the
  Table 4 models see contiguous streams whose fast-weight state is carried from segment to segment;
- the training loop is train.py's `FWPTrainer` (a transformers Trainer that also carries the state);
- the learning rate is picked once per family (softmax, sum rule, delta rule): the family's Table 2 model
  (GPT-2, Linear Transformer, Delta Net) trains with seed 0 at every rate of the scale's grid and the rate with the
  lowest validation perplexity is used by every model of the family (that seed-0 run is kept as a result).

results.csv and curves.csv are appended as each run ends, so a cut-off call keeps what finished and a rerun skips
it. scripts/paper/lm_comparison_report.py turns them into the tables, the figure and the claims (also at the end here).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # scripts/paper/ -> the repository root
# This checkout's modeling_fwp, train.py's FWPTrainer (scripts/) and the report beside this file (scripts/paper/).
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "scripts"), str(Path(__file__).resolve().parent)]

# name -> preset (None: the softmax Transformer), config overrides, family (learning-rate group), carry_state.
# The FWP models run without positional encoding, the paper's best setting (Table 3) and its Table 4 setting:
# with the sinusoidal encoding added to the embeddings they stayed at the unigram perplexity for the whole budget
# (RESULTS.md, "Positions"); "delta-pos" is the Delta Net with it, for C7.
NO_POSITIONS = {"position_embedding": "none"}
MODELS = {
    "transformer": (None, {}, "softmax", False),
    "linear": ("wt103-small-linear-transformer", NO_POSITIONS, "sum", False),
    "delta": ("wt103-small-delta-net", NO_POSITIONS, "delta", False),
    "performer8-sum": ("wt103-small-performer-sum", NO_POSITIONS, "sum", False),
    "performer8-delta": ("wt103-small-performer-delta", NO_POSITIONS, "delta", False),
    "performer16-sum": ("wt103-small-performer16-sum", NO_POSITIONS, "sum", False),
    "performer16-delta": ("wt103-small-performer16-delta", NO_POSITIONS, "delta", False),
    "dpfp-sum": ("wt103-small-dpfp-sum", NO_POSITIONS, "sum", False),
    "dpfp-delta": ("wt103-small-dpfp-delta", NO_POSITIONS, "delta", False),
    "delta-pos": ("wt103-small-delta-net", {}, "delta", False),  # sinusoidal positions, as the preset
    # Table 4: trained and evaluated with the state carried from segment to segment (no attention normalisation
    # for the Delta Net; the Linear Transformer keeps its z normalisation).
    "linear-carry": ("wt103-small-linear-transformer", NO_POSITIONS, "sum", True),
    "delta-carry": ("wt103-small-delta-net", NO_POSITIONS, "delta", True),
}
FAMILY_REPRESENTATIVE = {"softmax": "transformer", "sum": "linear", "delta": "delta"}
# Also evaluated on the contiguous validation/test streams without carry-over: the truncated-context numbers the
# carried models are compared with (C6), on exactly the tokens their carried evaluation scores.
STREAM_EVALUATED = {"linear", "delta", "linear-carry", "delta-carry"}

# The paper's small setting is 16 layers, D = 128, 8 heads of 16, feed-forward 2048, context 256, dropout 0.1.
# Every scale keeps heads of 16, so the feature maps' state sizes relate as in the paper (Performer m = 8: 16 per
# head, m = 16 and DPFP nu = 1: 32). train_tokens = steps x batch x context.
SCALES = {
    "gpu": dict(layers=16, hidden=128, heads=8, ffn=2048, context=256, batch=32, steps=600, warmup=60, vocab=8192,
                eval_every=60, curve_eval_tokens=None, learning_rates=(5e-4, 1e-3, 2e-3), threads=1),
    "cpu": dict(layers=4, hidden=64, heads=4, ffn=256, context=128, batch=16, steps=160, warmup=16, vocab=2048,
                eval_every=40, curve_eval_tokens=8192, learning_rates=(1e-3, 2e-3, 4e-3), threads=1),
    "quick": dict(layers=1, hidden=32, heads=2, ffn=64, context=32, batch=4, steps=6, warmup=1, vocab=320,
                  eval_every=3, curve_eval_tokens=512, learning_rates=(1e-3, 3e-3), threads=1,
                  corpus_slice=dict(train=(6, 5000), validation=(2, 2000), test=(2, 2000))),
}
COMMON = dict(dropout=0.1, weight_decay=0.01, max_grad_norm=0.25, eval_batch=32, eval_streams=8)
RESULT_FIELDS = ["run", "model", "family", "seed", "learning_rate", "sweep", "status", "params", "train_tokens",
                 "train_seconds", "tokens_per_second", "peak_memory_mib", "memory_kind", "valid_ppl", "test_ppl",
                 "valid_nocarry_ppl", "test_nocarry_ppl", "device", "parallel", "seconds", "error"]
CURVE_FIELDS = ["run", "model", "seed", "learning_rate", "step", "tokens", "valid_ppl"]


def run_name(model: str, seed: int, lr: float) -> str:
    return f"{model}-s{seed}-lr{lr:g}"


# ------------------------------------------------------------------------------------------------------- data

def prepare_data(scale: dict, data_dir: Path, log=print) -> None:
    """Tokenizer and tokenized splits, made once per output folder and loaded by every run."""
    if (data_dir / "tokenized" / "dataset_dict.json").is_file():
        return
    from modeling_fwp import data as fwp_data
    from modeling_fwp import tokenizer_utils

    raw = fwp_data.load_raw_datasets()
    for split, (docs, chars) in scale.get("corpus_slice", {}).items():
        raw[split] = raw[split].select(range(docs)).map(lambda row: {"text": row["text"][:chars]})
    tokenizer = tokenizer_utils.load_or_train_tokenizer(raw["train"]["text"], vocab_size=scale["vocab"], log=log)
    tokenized = fwp_data.tokenize_documents(raw, tokenizer)
    staging = Path(tempfile.mkdtemp(prefix=".data-", dir=data_dir.parent))
    tokenizer.save_pretrained(staging / "tokenizer")
    tokenized.save_to_disk(str(staging / "tokenized"))
    os.replace(staging, data_dir)  # runs only ever see a complete folder


def load_data(data_dir: Path):
    import datasets
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(data_dir / "tokenizer"), datasets.load_from_disk(
        str(data_dir / "tokenized"))


# ------------------------------------------------------------------------------------------------------ models

def build_model(name: str, scale: dict, tokenizer, extra: dict | None = None):
    """The model `name` at this scale: a wt103-small preset with the scale's depth and width, or GPT-2 of the same
    depth, width, heads and feed-forward (ReLU, as the FWP blocks; learned positions; tied embeddings)."""
    import modeling_fwp
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    preset, overrides, _, _ = MODELS[name]
    vocab = len(tokenizer)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if preset is None:
        config = GPT2Config(vocab_size=vocab, n_positions=scale["context"], n_embd=scale["hidden"],
                            n_layer=scale["layers"], n_head=scale["heads"], n_inner=scale["ffn"],
                            activation_function="relu", resid_pdrop=COMMON["dropout"], embd_pdrop=COMMON["dropout"],
                            attn_pdrop=COMMON["dropout"], tie_word_embeddings=True, **ids)
        return GPT2LMHeadModel(config)
    config = modeling_fwp.load_preset(
        preset, vocab_size=vocab, num_hidden_layers=scale["layers"], hidden_size=scale["hidden"],
        num_heads=scale["heads"], head_dim=scale["hidden"] // scale["heads"], intermediate_size=scale["ffn"],
        dropout=COMMON["dropout"], **{**overrides, **(extra or {})}, **ids)
    return AutoModelForCausalLM.from_config(config)


# ------------------------------------------------------------------------------------------------- one run

def append_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    """Appends rows to a CSV in one write (a header first if the file is new), so parallel runs never interleave
    inside a line."""
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    if not path.exists():
        writer.writeheader()
    writer.writerows(rows)
    with open(path, "a", encoding="utf-8") as out:
        out.write(buffer.getvalue())
        out.flush()
        os.fsync(out.fileno())


def perplexity(metrics: dict, prefix: str) -> float:
    loss = metrics.get(f"{prefix}_loss", math.nan)
    return math.exp(min(loss, 50.0)) if math.isfinite(loss) else math.nan


def train_one(spec: dict) -> dict:
    """Trains and evaluates one (model, seed, learning rate); returns its results row and curve."""
    import numpy as np
    import torch
    from modeling_fwp import data as fwp_data
    from train import FWPTrainer
    from transformers import TrainingArguments, default_data_collator, set_seed

    scale, name, seed, lr = SCALES[spec["scale"]], spec["model"], spec["seed"], spec["learning_rate"]
    carry = MODELS[name][3]
    torch.set_num_threads(scale["threads"])
    cuda = spec["device"] == "cuda"
    tokenizer, tokenized = load_data(Path(spec["data_dir"]))
    context, batch = scale["context"], scale["batch"]
    blocks = fwp_data.group_into_blocks(tokenized, context)

    def streams(split, count, max_tokens=None):
        return fwp_data.contiguous_streams(tokenized[split], context, streams_per_process=count, max_tokens=max_tokens)

    curve_tokens = scale["curve_eval_tokens"]
    eval_streams = spec.get("eval_streams") or COMMON["eval_streams"]
    if carry:
        train_data = streams("train", batch)
        curve_data = streams("validation", COMMON["eval_streams"], curve_tokens)
    else:
        train_data = blocks["train"]
        curve_data = blocks["validation"]
        if curve_tokens:
            curve_data = curve_data.select(range(min(len(curve_data), max(1, curve_tokens // context))))

    set_seed(seed)
    model = build_model(name, scale, tokenizer, spec.get("config_overrides"))
    params = sum(p.numel() for p in model.parameters())
    bf16 = cuda and torch.cuda.is_bf16_supported()
    with tempfile.TemporaryDirectory(prefix="lm-run-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, per_device_train_batch_size=batch, per_device_eval_batch_size=COMMON["eval_batch"],
            max_steps=scale["steps"], learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=scale["warmup"],
            weight_decay=COMMON["weight_decay"], max_grad_norm=COMMON["max_grad_norm"], eval_strategy="steps",
            eval_steps=scale["eval_every"], logging_steps=scale["eval_every"], save_strategy="no", report_to="none",
            seed=seed, bf16=bf16, use_cpu=not cuda, dataloader_pin_memory=cuda, disable_tqdm=True)
        if carry:  # row i of every stream batch continues stream i, also in evaluation
            args.per_device_eval_batch_size = COMMON["eval_streams"]
        trainer = FWPTrainer(model=model, args=args, train_dataset=train_data, eval_dataset=curve_data,
                             data_collator=default_data_collator, carry_state=carry)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        result = trainer.train()
        if cuda:
            torch.cuda.synchronize()
            peak, memory_kind = torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
        else:
            import resource

            peak, memory_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"
        history = trainer.state.log_history
        eval_seconds = sum(entry.get("eval_runtime", 0.0) for entry in history)
        train_seconds = result.metrics["train_runtime"] - eval_seconds
        tokens = scale["steps"] * batch * context

        row = dict(run=spec["run"], model=name, family=MODELS[name][2], seed=seed, learning_rate=lr,
                   sweep=int(spec["sweep"]), status="ok", params=params, train_tokens=tokens,
                   train_seconds=round(train_seconds, 2), tokens_per_second=round(tokens / train_seconds, 1),
                   peak_memory_mib=round(peak, 1), memory_kind=memory_kind, device=spec["device_name"],
                   parallel=spec["parallel"])
        if carry:  # the layout trained on: every segment starts from the previous one's state
            args.per_device_eval_batch_size = eval_streams
            row["valid_ppl"] = perplexity(trainer.evaluate(streams("validation", eval_streams)), "eval")
            row["test_ppl"] = perplexity(trainer.evaluate(streams("test", eval_streams),
                                                          metric_key_prefix="test"), "test")
        else:
            row["valid_ppl"] = perplexity(trainer.evaluate(blocks["validation"]), "eval")
            row["test_ppl"] = perplexity(trainer.evaluate(blocks["test"], metric_key_prefix="test"), "test")
        if name in STREAM_EVALUATED:  # the same streams, every segment from an empty state
            trainer.carry_state = False
            args.per_device_eval_batch_size = eval_streams
            row["valid_nocarry_ppl"] = perplexity(trainer.evaluate(streams("validation", eval_streams)),
                                                  "eval")
            row["test_nocarry_ppl"] = perplexity(trainer.evaluate(streams("test", eval_streams),
                                                                  metric_key_prefix="test"), "test")
    if not all(np.isfinite([row["valid_ppl"], row["test_ppl"]])):
        row["status"] = "diverged"
    curve = [dict(run=spec["run"], model=name, seed=seed, learning_rate=lr, step=entry["step"],
                  tokens=entry["step"] * batch * context, valid_ppl=perplexity(entry, "eval"))
             for entry in history if "eval_loss" in entry]
    return row, curve


def worker_main(spec_json: str) -> int:
    """One run in its own process: appends its row (and curve) to the CSVs, also when it fails."""
    spec = json.loads(spec_json)
    out = Path(spec["out"])
    start = time.monotonic()
    try:
        row, curve = train_one(spec)
    except Exception as error:  # recorded, so the report says which run failed and why
        import traceback

        traceback.print_exc()
        row = dict(run=spec["run"], model=spec["model"], family=MODELS[spec["model"]][2], seed=spec["seed"],
                   learning_rate=spec["learning_rate"], sweep=int(spec["sweep"]), status="failed",
                   device=spec["device_name"], parallel=spec["parallel"],
                   error=f"{type(error).__name__}: {error}"[:300])
        curve = []
    row["seconds"] = round(time.monotonic() - start, 1)
    append_rows(out / "curves.csv", CURVE_FIELDS, curve)
    append_rows(out / "results.csv", RESULT_FIELDS, [row])
    print(f"{row['run']}: {row['status']} valid {row.get('valid_ppl')} test {row.get('test_ppl')} "
          f"({row['seconds']} s)", flush=True)
    return 0 if row["status"] != "failed" else 1


# ------------------------------------------------------------------------------------------------ scheduling

def read_results(out: Path) -> list[dict]:
    path = out / "results.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as source:
        return list(csv.DictReader(source))


def pick_learning_rates(rows: list[dict], scale: dict, fixed: dict) -> dict:
    """Per family: the fixed rate if given, else the grid rate whose seed-0 run of the family's representative
    reached the lowest validation perplexity (None while a grid run is missing)."""
    picked = {}
    for family, model in FAMILY_REPRESENTATIVE.items():
        if family in fixed:
            picked[family] = fixed[family]
            continue
        scores = {}
        for row in rows:
            if row["model"] == model and row["sweep"] == "1" and row["status"] in ("ok", "diverged"):
                value = float(row["valid_ppl"]) if row["valid_ppl"] else math.nan
                scores[float(row["learning_rate"])] = value if math.isfinite(value) else math.inf
        if all(lr in scores for lr in scale["learning_rates"]):
            picked[family] = min(scale["learning_rates"], key=lambda lr: scores[lr])
        else:
            picked[family] = None
    return picked


def plan_runs(args, scale: dict, rows: list[dict]) -> list[dict]:
    """The runs still to do, in order: the learning-rate grid first, then every model and seed whose family's rate
    is known. A run already in results.csv (any status but 'failed') is not repeated."""
    done = {row["run"] for row in rows if row["status"] != "failed"}
    picked = pick_learning_rates(rows, scale, args.fixed_lr)
    runs = []
    models = args.models or list(MODELS)
    for family, model in FAMILY_REPRESENTATIVE.items():
        if family in args.fixed_lr or not any(MODELS[m][2] == family for m in models):
            continue
        for lr in scale["learning_rates"]:
            runs.append(dict(model=model, seed=args.seeds[0], learning_rate=lr, sweep=True))
    for seed in args.seeds:
        for model in models:
            lr = picked[MODELS[model][2]]
            if lr is not None:
                runs.append(dict(model=model, seed=seed, learning_rate=lr, sweep=False))
    unique = {}
    for run in runs:
        run["run"] = run_name(run["model"], run["seed"], run["learning_rate"])
        if run["run"] not in done and run["run"] not in unique:
            unique[run["run"]] = run
    return list(unique.values())


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    import platform

    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def run_all(args) -> None:
    scale = SCALES[args.scale]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.scratch) if args.scratch else out  # tokenized data and per-run logs
    data_dir, logs = scratch / "data", scratch / "logs"
    scratch.mkdir(parents=True, exist_ok=True)
    logs.mkdir(exist_ok=True)
    prepare_data(scale, data_dir)
    hard_end = time.monotonic() + 60 * args.deadline_minutes if args.deadline_minutes else math.inf
    base = dict(scale=args.scale, out=str(out), data_dir=str(data_dir), device=args.device,
                device_name=device_name(args.device), parallel=args.parallel, eval_streams=args.eval_streams,
                config_overrides=args.config_overrides)
    meta = out / "meta.json"
    if not meta.exists():
        meta.write_text(json.dumps(dict(scale=args.scale, settings=scale, common=COMMON, device=base["device_name"],
                                        final_eval_streams=args.eval_streams or COMMON["eval_streams"],
                                        config_overrides=args.config_overrides,
                                        commit=os.environ.get("FWP_COMMIT") or git_commit(), seeds=args.seeds,
                                        started=time.strftime("%Y-%m-%dT%H:%M:%S")), indent=1))
    running = {}  # run name -> (process, log file, start time)
    started, durations = set(), []
    env = {**os.environ, "OMP_NUM_THREADS": str(scale["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    while True:
        # A run starts only if it can end before the deadline, judged by the longest run so far; and once per call:
        # one that fails is recorded as failed (or, if it dies before it can write, left for the next call)
        # instead of being restarted in a loop.
        expected = 1.1 * max(durations) if durations else 0.0
        todo = [run for run in plan_runs(args, scale, read_results(out)) if run["run"] not in started]
        while todo and len(running) < args.parallel and time.monotonic() + expected < hard_end:
            run = todo.pop(0)
            spec = json.dumps({**base, **run})
            log = open(logs / f"{run['run']}.log", "w")
            process = subprocess.Popen([sys.executable, __file__, "--out", str(out), "--worker", spec], stdout=log,
                                       stderr=subprocess.STDOUT, env=env, cwd=str(REPO_ROOT))
            running[run["run"]] = (process, log, time.monotonic())
            started.add(run["run"])
            print(f"[{time.strftime('%H:%M:%S')}] started {run['run']}{' (lr grid)' if run['sweep'] else ''}",
                  flush=True)
        for name, (process, log, begun) in list(running.items()):
            if process.poll() is not None:
                log.close()
                del running[name]
                durations.append(time.monotonic() - begun)
                print(f"[{time.strftime('%H:%M:%S')}] finished {name} (exit {process.returncode}, "
                      f"{durations[-1]:.0f} s)", flush=True)
                if process.returncode:
                    print((logs / f"{name}.log").read_text()[-2000:], flush=True)
        if time.monotonic() >= hard_end:
            for name, (process, log, _) in running.items():
                process.kill()
                log.close()
                print(f"deadline: stopped {name} (not recorded; a rerun does it)", flush=True)
            break
        if not running and not (todo and time.monotonic() + expected < hard_end):
            break
        time.sleep(1.0)
    left = plan_runs(args, scale, read_results(out))
    print(f"{len(left)} runs left{': ' + ', '.join(r['run'] for r in left) if left else ''}", flush=True)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--out", required=True, help="Folder of results.csv, curves.csv, logs/, the report.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="Default: cuda if available.")
    parser.add_argument("--parallel", type=int, default=2, help="Runs at a time (processes).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=None)
    parser.add_argument("--eval-streams", type=int, default=None, help="Streams of the final stream evaluations "
                        f"(default {COMMON['eval_streams']}; 1: each split read as one stream, as the paper's carried "
                        "evaluation with batch size 1).")
    parser.add_argument("--config-overrides", default=None, help="FWPConfig fields changed in every FWP model of "
                        "this call, as train.py's --config_overrides (e.g. attention_normalization=false); use "
                        "another --out, since the run names do not show them.")
    parser.add_argument("--lr", dest="fixed_lr", default="", help="Fixed learning rates instead of the grid, e.g. "
                        "'softmax=1e-3,sum=2e-3,delta=2e-3' (families: softmax, sum, delta).")
    parser.add_argument("--deadline-minutes", type=float, default=None,
                        help="End by then (a GPU call's limit): a run starts only if the longest run so far would "
                        "still end in time, and runs still going then are stopped (a rerun does them).")
    parser.add_argument("--scratch", default=None, help="Folder for the tokenized data and run logs (default: --out).")
    parser.add_argument("--report-only", action="store_true", help="Only rebuild the report from the CSVs.")
    parser.add_argument("--results-md", default=None, help="Also replace this scale's section of RESULTS.md.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    fixed = {}
    for item in filter(None, (part.strip() for part in args.fixed_lr.split(","))):
        family, _, value = item.partition("=")
        if family not in FAMILY_REPRESENTATIVE:
            parser.error(f"--lr {item!r}: the family must be one of {', '.join(FAMILY_REPRESENTATIVE)}.")
        try:
            fixed[family] = float(value)
        except ValueError:
            parser.error(f"--lr {item!r}: {value!r} is not a number.")
    args.fixed_lr = fixed
    if args.config_overrides:
        from modeling_fwp import presets

        args.config_overrides = presets.parse_config_overrides(args.config_overrides)
    if args.parallel < 1:
        parser.error("--parallel must be >= 1.")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        raise SystemExit(worker_main(args.worker))
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.report_only:
        run_all(args)
    import lm_comparison_report

    print(lm_comparison_report.write_report(Path(args.out), results_md=args.results_md))


if __name__ == "__main__":
    main()
