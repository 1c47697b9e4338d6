"""Checks modeling_fwp.convert_fla against fla itself: random fla DeltaNets of several configurations are saved,
converted and run side by side on the same input, with and without left padding.

    PYTHONPATH=/path/to/unzipped/fla/wheels python scripts/checks/check_fla_conversion.py --out results/fla_conversion
    TRITON_INTERPRET=1 python scripts/checks/check_fla_conversion.py --out /tmp/fla_check --device cpu   # tiny, slow

For each configuration it reports the largest logit difference over the real (unpadded) tokens: ours in fp32 vs fla
in fp32, ours in bf16 vs fla in bf16, and fla in bf16 vs fla in fp32 (the noise floor of bf16 itself). fla's chunk
kernels refuse fp32 (fla 0.6.0 asserts it), so fla's fp32 runs use its fused_recurrent kernels (the same maths, and
what fla itself runs for inputs of <= 64 tokens); its bf16 runs use chunk for longer inputs. Writes
--out/fla_conversion.json and --out/fla_conversion.md, and --out/fla_fixture/<name>/ (tiny fla folders saved by fla's
save_pretrained with fla's fp32 logits for a fixed input in fla_reference.safetensors) for tests/data/fla_fixture/.
One failing configuration does not stop the others: its error is recorded. modeling_fwp comes from this checkout.
"""

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # scripts/checks/ -> the repository root
sys.path.insert(0, str(REPO))
os.environ.setdefault("FWP_TRITON_AUTOTUNE", "0")  # fixed launch settings: the check is about maths, not speed

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

BASE = dict(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_heads=4, fuse_cross_entropy=False)
TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2, fuse_cross_entropy=False)
CONFIGS = {  # DeltaNetConfig overrides; "refused" ones must be refused by the converter
    "default": {},
    "use_gate": dict(use_gate=True),
    "allow_neg_eigval": dict(allow_neg_eigval=True),
    "no_beta_conv2": dict(use_beta=False, conv_size=2),
    "no_short_conv": dict(use_short_conv=False),
    "tied": dict(tie_word_embeddings=True),
    "no_short_conv_elu_sum": dict(use_short_conv=False, qk_activation="elu", qk_norm="sum", refused=True),
}
FIXTURES = {  # tiny folders for tests/test_convert_fla.py, fla's fp32 logits stored with them
    "default": dict(intermediate_size=64),
    "gate_negeig_tied": dict(intermediate_size=64, use_gate=True, allow_neg_eigval=True, tie_word_embeddings=True,
                             conv_size=3),
}


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def untimed_autotune():
    """fla's autotuners take their first config untimed: the check is about maths, and timing every config of every
    fla kernel costs minutes on a GPU (Triton's interpreter on CPU has no benchmarker at all)."""
    import triton.runtime.autotuner as autotuner

    autotuner.Autotuner._bench = lambda self, *args, config=None, **kwargs: [0.0, 0.0, 0.0]


def fp32_mode(model):
    """A float32 copy of an fla model that runs fused_recurrent kernels (chunk_delta_rule refuses fp32)."""
    model = copy.deepcopy(model).float()
    for layer in model.model.layers:
        layer.attn.mode = "fused_recurrent"
    return model


def build_fla(fields, seed):
    from fla.models import DeltaNetConfig, DeltaNetForCausalLM

    torch.manual_seed(seed)
    model = DeltaNetForCausalLM(DeltaNetConfig(**fields)).float().eval()
    with torch.no_grad():  # norm weights away from 1, so a misplaced or missing norm weight shows
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                parameter.add_(0.2 * torch.randn_like(parameter))
    return model


def inputs(vocab, batch, length, pads, seed=0):
    ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, length, dtype=torch.long)
    ids[-1, :pads], mask[-1, :pads] = 0, 0
    return ids, mask


def logits(model, ids, mask, device):
    with torch.no_grad():
        out = model(input_ids=ids.to(device), attention_mask=None if mask is None else mask.to(device), use_cache=False)
    return out.logits.float().cpu()


def compare(models, ids, mask, device):
    """models: {(who, dtype): model} for who in fla, ours and dtype in fp32, bf16."""
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()  # pads' logits mean nothing
    fla32, fla16, ours32, ours16 = (logits(models[key], ids, mask, device) for key in
                                    [("fla", "fp32"), ("fla", "bf16"), ("ours", "fp32"), ("ours", "bf16")])
    diff = lambda a, b: float((a - b)[real].abs().max())  # noqa: E731
    return {"ours_fp32_vs_fla_fp32": diff(ours32, fla32), "ours_bf16_vs_fla_bf16": diff(ours16, fla16),
            "fla_bf16_vs_fla_fp32": diff(fla16, fla32), "max_abs_logit": float(fla32[real].abs().max())}


def check(name, overrides, base, lengths, device, work):
    from transformers import AutoModelForCausalLM

    from modeling_fwp.convert_fla import convert_fla

    overrides = dict(overrides)
    refused = overrides.pop("refused", False)
    fields = {**base, **overrides}
    fla_model = build_fla(fields, seed=len(name))
    fla_model.save_pretrained(work / f"{name}-fla")
    try:
        convert_fla(work / f"{name}-fla", work / f"{name}-fwp")
    except ValueError as error:
        if refused:
            return {"fla_config": fields, "status": "refused (expected)", "message": str(error)}
        raise
    if refused:
        raise AssertionError("converted, but this configuration should have been refused")
    models = {("fla", "fp32"): fp32_mode(fla_model).to(device),
              ("fla", "bf16"): copy.deepcopy(fla_model).to(device=device, dtype=torch.bfloat16)}
    for key, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):  # the folder's own code (remote code)
        models["ours", key] = AutoModelForCausalLM.from_pretrained(work / f"{name}-fwp", trust_remote_code=True,
                                                                   dtype=dtype).to(device).eval()
    results = {}
    for length in lengths:
        for padded in (False, True):
            ids, mask = inputs(fields["vocab_size"], 2, length, pads=7 if padded else 0)
            key = f"T={length}" + (", left-padded" if padded else "")
            results[key] = compare(models, ids, mask if padded else None, device)
            log(f"  {name} {key}: " + ", ".join(f"{k} {v:.2e}" for k, v in results[key].items()))
    return {"fla_config": fields, "status": "ok", "results": results}


def write_fixture(name, overrides, folder, device):
    import fla

    fields = {**TINY, **overrides}
    model = build_fla(fields, seed=100 + len(name))
    model.save_pretrained(folder)
    ids, mask = inputs(fields["vocab_size"], 2, 40, pads=5, seed=1)
    save_file({"input_ids": ids, "attention_mask": mask, "logits": logits(fp32_mode(model).to(device), ids, mask, device)},
              str(folder / "fla_reference.safetensors"))
    (folder / "fla_reference.json").write_text(json.dumps({
        "fla": fla.__version__, "torch": torch.__version__, "device": str(device), "dtype": "float32",
        "kernels": "fused_recurrent (fla's chunk kernels refuse fp32)",
        "note": "logits of fla's DeltaNetForCausalLM(input_ids, attention_mask) in fp32; pads' logits are meaningless",
    }, indent=2) + "\n")


def markdown(report):
    lines = ["| configuration | input | ours fp32 vs fla fp32 | ours bf16 vs fla bf16 | fla bf16 vs fla fp32 | max abs logit |",
             "|---|---|---|---|---|---|"]
    for name, entry in report["configs"].items():
        if entry["status"] != "ok":
            lines.append(f"| {name} | | {entry['status']}: {entry.get('message', entry.get('error', ''))[:160]} | | | |")
            continue
        for key, r in entry["results"].items():
            lines.append(f"| {name} | {key} | {r['ours_fp32_vs_fla_fp32']:.2e} | {r['ours_bf16_vs_fla_bf16']:.2e} | "
                         f"{r['fla_bf16_vs_fla_fp32']:.2e} | {r['max_abs_logit']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the JSON, the markdown table and fla_fixture/")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda, or cpu under TRITON_INTERPRET=1 (tiny sizes)")
    parser.add_argument("--configs", help="comma-separated subset of: " + ", ".join(CONFIGS))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("fla's kernels need a GPU, or TRITON_INTERPRET=1 on CPU")
    untimed_autotune()
    # fla runs fused_recurrent for <= 64 tokens, chunk above; its chunk kernels fail under the interpreter
    base, lengths = (BASE, (48, 160)) if device.type == "cuda" else (TINY, (12, 40))
    import fla
    import transformers

    report = {"environment": {"fla": fla.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"},
              "configs": {}, "fixtures": {}}
    names = args.configs.split(",") if args.configs else list(CONFIGS)
    start = time.time()
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            log(f"{name} ...")
            try:
                report["configs"][name] = check(name, CONFIGS[name], base, lengths, device, Path(work))
            except Exception as error:  # recorded; the other configurations still run
                report["configs"][name] = {"status": "error", "error": f"{type(error).__name__}: {error}",
                                           "traceback": traceback.format_exc()}
            log(f"{name}: {report['configs'][name]['status']}")
            (out / "fla_conversion.json").write_text(json.dumps(report, indent=2) + "\n")  # kept if a limit cuts the run
    for name, overrides in FIXTURES.items():
        try:
            write_fixture(name, overrides, out / "fla_fixture" / name, device)
            report["fixtures"][name] = "written"
        except Exception as error:
            report["fixtures"][name] = f"error: {type(error).__name__}: {error}"
        log(f"fixture {name}: {report['fixtures'][name]}")
    report["seconds"] = round(time.time() - start, 1)
    (out / "fla_conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "fla_conversion.md").write_text(markdown(report))
    print(markdown(report), flush=True)
    failed = [n for n, e in report["configs"].items() if e["status"] == "error"]
    failed += [n for n, s in report["fixtures"].items() if s != "written"]
    log(f"done in {report['seconds']} s; " + (f"FAILED: {', '.join(failed)}" if failed else "all configurations ran"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
