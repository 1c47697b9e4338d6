"""Report of scripts/paper/lm_comparison.py: per-model perplexity over seeds, the paper's claims C1-C7 judged with the
spread over seeds, the figure of validation perplexity against tokens seen, and the RESULTS.md section.

A claim "a below b" holds when mean(b) - mean(a) > 2 * SE, SE = sqrt(s_a^2 / n_a + s_b^2 / n_b) (s: the standard
deviation over seeds); it is "opposite" when the difference exceeds 2 SE the other way, otherwise "not separated".
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from pathlib import Path

# The paper's small-setting perplexities (valid, test), PAPER.md 3b; Tables 3 and 4 exist for the medium setting only.
PAPER = {
    "transformer": ((33.0, 34.1), "Table 2"),
    "linear": ((37.1, 38.3), "Table 2"),
    "delta": ((34.1, 35.5), "Table 2"),
    "performer8-sum": ((39.0, 39.6), "Table 2"),
    "performer8-delta": ((36.1, 37.2), "Table 2"),
    "performer16-sum": ((38.0, 38.8), "Table 5"),
    "performer16-delta": ((36.0, 37.0), "Table 5"),
    "dpfp-sum": ((37.7, 38.8), "Table 5"),
    "dpfp-delta": ((33.9, 35.0), "Table 5"),
    "delta-pos": ((29.7, 31.5), "Table 3, medium (without: 28.1 / 31.1)"),
    "linear-carry": ((260.0, 260.0), "Table 4, medium: > 260"),
    "delta-carry": ((27.8, 29.4), "Table 4, medium"),
}
LABELS = {
    "transformer": "Transformer (softmax, GPT-2)",
    "linear": "Linear Transformer (sum)",
    "delta": "Delta Net (delta)",
    "performer8-sum": "Performer m=8, sum",
    "performer8-delta": "Performer m=8, delta",
    "performer16-sum": "Performer m=16, sum",
    "performer16-delta": "Performer m=16, delta",
    "dpfp-sum": "DPFP nu=1, sum",
    "dpfp-delta": "DPFP nu=1, delta",
    "delta-pos": "Delta Net, sinusoidal positions",
    "linear-carry": "Linear Transformer, state carried",
    "delta-carry": "Delta Net, state carried",
}
TRUNCATED_FWP = ["linear", "delta", "performer8-sum", "performer8-delta", "performer16-sum", "performer16-delta",
                 "dpfp-sum", "dpfp-delta", "delta-pos"]


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as source:
        return list(csv.DictReader(source))


def number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


class Stat:
    """Mean, standard deviation and count of one metric over seeds."""

    def __init__(self, values):
        self.values = [v for v in values if math.isfinite(v)]
        self.n = len(self.values)
        self.mean = statistics.fmean(self.values) if self.values else math.nan
        self.std = statistics.stdev(self.values) if self.n > 1 else math.nan

    def __str__(self):
        if not self.n:
            return "-"
        return f"{self.mean:.2f} +- {self.std:.2f}" if self.n > 1 else f"{self.mean:.2f}"


def final_rows(rows: list[dict]) -> dict[str, list[dict]]:
    """Per model, the finished runs at its family's chosen learning rate (the grid's seed-0 run included)."""
    from lm_comparison import FAMILY_REPRESENTATIVE, MODELS, pick_learning_rates

    chosen = {}
    for family, model in FAMILY_REPRESENTATIVE.items():
        rates = {number(r["learning_rate"]) for r in rows if MODELS.get(r["model"], (0, 0, None))[2] == family
                 and r["sweep"] == "0"}
        if rates:  # the rate the main runs used (set by the grid, or fixed with --lr)
            chosen[family] = rates.pop() if len(rates) == 1 else None
        elif any(r["model"] == model and r["sweep"] == "1" for r in rows):  # only the grid so far: its pick
            grid = {"learning_rates": sorted({number(r["learning_rate"]) for r in rows
                                              if r["model"] == model and r["sweep"] == "1"})}
            chosen[family] = pick_learning_rates(rows, grid, fixed={})[family]
    per_model = {}
    for row in rows:
        family = MODELS.get(row["model"], (0, 0, None))[2]
        if row["status"] in ("ok", "diverged") and number(row["learning_rate"]) == chosen.get(family):
            per_model.setdefault(row["model"], []).append(row)
    return per_model


def stat(per_model, model, field) -> Stat:
    return Stat([number(r.get(field)) for r in per_model.get(model, [])])


def compare(a: Stat, b: Stat, factor: float = 1.0, margin: float = 0.0) -> tuple[str, str]:
    """Verdict on "factor * a + margin below b" ('holds' / 'opposite' / 'not separated') and its numbers."""
    if a.n < 2 or b.n < 2:
        return "too few seeds", f"n = {a.n}, {b.n}"
    diff = b.mean - (factor * a.mean + margin)
    se = math.sqrt(factor**2 * a.std**2 / a.n + b.std**2 / b.n)
    verdict = "holds" if diff > 2 * se else "opposite" if diff < -2 * se else "not separated"
    return verdict, f"difference {diff:+.2f}, 2 SE = {2 * se:.2f}"


def claims(per_model, split: str) -> list[tuple[str, str, str, str, str]]:
    """(claim, paper, ours, verdict, numbers) on the `split` ("valid" or "test") perplexities."""
    column = f"{split}_ppl"
    s = {model: stat(per_model, model, column) for model in PAPER}
    paper = {model: values[0][0 if split == "valid" else 1] for model, values in PAPER.items()}
    out = []

    def below(claim, a, b):
        verdict, detail = compare(s[a], s[b])
        out.append((claim, f"{paper[a]} vs {paper[b]}", f"{s[a]} vs {s[b]}", verdict, detail))

    below("C1 Delta Net below the Linear Transformer", "delta", "linear")
    below("C2 Performer (m=8) delta below sum", "performer8-delta", "performer8-sum")
    below("C2 Performer (m=16) delta below sum", "performer16-delta", "performer16-sum")
    below("C3 DPFP delta below DPFP sum", "dpfp-delta", "dpfp-sum")
    below("C4 DPFP delta below Performer (m=16) delta, d_dot 32 per head", "dpfp-delta", "performer16-delta")
    verdicts = [compare(s["transformer"], s[m]) for m in TRUNCATED_FWP]
    separated = sum(v == "holds" for v, _ in verdicts)
    best = min(TRUNCATED_FWP, key=lambda m: s[m].mean if s[m].n else math.inf)
    verdict = ("holds" if separated == len(TRUNCATED_FWP) else
               "opposite" if any(v == "opposite" for v, _ in verdicts) else "not separated")
    out.append(("C5 softmax Transformer below every FWP model", f"{paper['transformer']} vs >= 33.9",
                f"{s['transformer']} vs best FWP {best} {s[best]}", verdict,
                f"below {separated} of {len(TRUNCATED_FWP)} by > 2 SE; against {best}: "
                f"{compare(s['transformer'], s[best])[1]}"))
    verdict, detail = compare(s["delta-carry"], s["linear-carry"], factor=3.0)
    out.append(("C6 carried: Linear Transformer >= 3x the Delta Net", "> 260 vs 27.8 (medium)",
                f"{s['linear-carry']} vs {s['delta-carry']} (ratio "
                f"{s['linear-carry'].mean / s['delta-carry'].mean:.2f})", verdict, detail))
    truncated = stat(per_model, "delta", f"{split}_nocarry_ppl")
    carried = s["delta-carry"]
    if truncated.n >= 2 and carried.n >= 2:  # carried below 1.1 x truncated
        diff = 1.1 * truncated.mean - carried.mean
        se = math.sqrt(1.21 * truncated.std**2 / truncated.n + carried.std**2 / carried.n)
        verdict = "holds" if diff > 2 * se else "opposite" if diff < -2 * se else "not separated"
        detail = f"1.1 x truncated - carried = {diff:+.2f}, 2 SE = {2 * se:.2f}"
    else:
        verdict, detail = "too few seeds", f"n = {truncated.n}, {carried.n}"
    out.append(("C6 carried Delta Net within 10 % of its truncated-context value (same streams)",
                "27.8 vs 28.1 (medium)", f"{carried} vs {truncated}", verdict, detail))
    verdict, detail = compare(s["delta"], s["delta-pos"])
    if verdict == "not separated":
        verdict = "holds (no worse: not separated)"
    elif verdict == "holds":
        verdict = "holds (better)"
    out.append(("C7 Delta Net without positions no worse than with", "28.1 vs 29.7 (medium)",
                f"{s['delta']} vs {s['delta-pos']}", verdict, detail))
    return out


def figure(per_model, curves: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    kept = {r["run"] for rows in per_model.values() for r in rows}
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2])  # 12 lines, 12 colours
    for model in PAPER:
        points = {}
        for c in curves:
            if c["model"] == model and c["run"] in kept and math.isfinite(number(c["valid_ppl"])):
                points.setdefault(int(c["tokens"]), []).append(number(c["valid_ppl"]))
        if points:
            xs = sorted(points)
            style = "--" if model.endswith("-sum") or model.startswith("linear") else "-"
            ax.plot([x / 1e6 for x in xs], [statistics.fmean(points[x]) for x in xs], style, label=LABELS[model])
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation perplexity (mean over seeds)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(out: Path, results_md: str | None = None) -> str:
    """Writes out/report.md (and out/fig_valid_ppl.png); replaces this scale's section of results_md if given.
    Returns the report's text."""
    from lm_comparison import FAMILY_REPRESENTATIVE, MODELS

    rows = read_csv(out / "results.csv")
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").is_file() else {}
    per_model = final_rows(rows)
    scale = meta.get("scale", "?")
    settings = meta.get("settings", {})
    lines = [f"### Scale `{scale}`: {settings.get('layers')} layers, D = {settings.get('hidden')}, "
             f"{settings.get('heads')} heads of {settings.get('hidden', 0) // max(1, settings.get('heads', 1))}, "
             f"feed-forward {settings.get('ffn')}, context {settings.get('context')}",
             "",
             f"Device: {meta.get('device')}; commit `{meta.get('commit')}`; started {meta.get('started')}. "
             f"Budget: {settings.get('steps')} steps of {settings.get('batch')} x {settings.get('context')} tokens "
             f"({settings.get('steps', 0) * settings.get('batch', 0) * settings.get('context', 0) / 1e6:.2f}M "
             f"tokens), AdamW (weight decay {meta.get('common', {}).get('weight_decay')}), cosine schedule with "
             f"{settings.get('warmup')} warm-up steps, gradient clipping "
             f"{meta.get('common', {}).get('max_grad_norm')}, dropout 0.1, BPE vocabulary {settings.get('vocab')}.",
             ""]
    grid = [r for r in rows if r["sweep"] == "1"]
    if grid:
        lines.append("Learning rate, picked once per family on the validation split (seed 0 of the family's "
                     "Table 2 model at each rate of the grid):")
        lines.append("")
        for family, model in FAMILY_REPRESENTATIVE.items():
            tried = sorted((number(r["learning_rate"]), number(r["valid_ppl"])) for r in grid if r["model"] == model)
            chosen = {number(r["learning_rate"]) for r in per_model.get(model, [])}
            lines.append(f"- {family} ({model}): " + ", ".join(f"{lr:g} -> {ppl:.2f}" for lr, ppl in tried)
                         + f"; used {', '.join(f'{lr:g}' for lr in sorted(chosen)) or '-'}")
        lines.append("")
    lines += ["| model | rule | params | seeds | valid ppl | test ppl | paper valid / test | tokens/s | peak memory |",
              "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for model, ((pv, pt), where) in PAPER.items():
        rs = per_model.get(model, [])
        family = MODELS[model][2]
        params = f"{number(rs[0]['params']) / 1e6:.2f}M" if rs else "-"
        speed = stat(per_model, model, "tokens_per_second")
        memory = stat(per_model, model, "peak_memory_mib")
        paper = f"> 260 ({where})" if model == "linear-carry" else f"{pv} / {pt} ({where})"
        lines.append(f"| {LABELS[model]} | {family} | {params} | {len(rs)} | {stat(per_model, model, 'valid_ppl')} "
                     f"| {stat(per_model, model, 'test_ppl')} | {paper} | "
                     f"{speed.mean:,.0f} | {memory.mean:,.0f} MiB |" if rs else
                     f"| {LABELS[model]} | {family} | - | 0 | - | - | {paper} | - | - |")
    memory_kind = {r.get("memory_kind") for r in rows if r.get("memory_kind")}
    lines += ["", f"Peak memory: {', '.join(sorted(memory_kind)) or '-'} (process_max_rss: the whole process's "
              "resident memory, Python and libraries included; cuda_max_allocated: the tensors on the GPU). tokens/s: "
              "training tokens over training time (evaluations excluded) with "
              f"{'/'.join(sorted({r.get('parallel', '?') for r in rows}, key=str)) or '?'} runs at a time on the "
              "machine, so it compares models run together, not machines.",
              "", "Stream evaluations (the same validation / test streams, every segment from an empty state, and "
              "for the carried models with the state carried):", "",
              "| model | valid, truncated | test, truncated | valid, carried | test, carried |", "|---|---:|---:|---:|---:|"]
    for model in ("linear", "delta", "linear-carry", "delta-carry"):
        carried = model.endswith("-carry")
        lines.append(f"| {LABELS[model]} | {stat(per_model, model, 'valid_nocarry_ppl')} | "
                     f"{stat(per_model, model, 'test_nocarry_ppl')} | "
                     f"{stat(per_model, model, 'valid_ppl') if carried else '-'} | "
                     f"{stat(per_model, model, 'test_ppl') if carried else '-'} |")
    for split in ("test", "valid"):
        lines += ["", f"Claims on the {split} split (paper: small setting unless marked):", "",
                  "| claim | paper | ours | verdict | numbers |", "|---|---|---|---|---|"]
        lines += [f"| {c} | {p} | {o} | **{v}** | {d} |" for c, p, o, v, d in claims(per_model, split)]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed runs: " + "; ".join(f"{r['run']} ({r['error']})" for r in failed)]
    if figure(per_model, read_csv(out / "curves.csv"), out / "fig_valid_ppl.png"):
        lines += ["", f"![validation perplexity against tokens, scale {scale}]({out.as_posix()}/fig_valid_ppl.png)"]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    if results_md:
        replace_section(Path(results_md), f"lm-comparison-{scale}", text)
    return text


def replace_section(path: Path, marker: str, text: str) -> None:
    """Replaces the text between <!-- marker:begin --> and <!-- marker:end --> (appends the pair if missing)."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    old = path.read_text() if path.is_file() else ""
    block = f"{begin}\n{text}{end}"
    if begin in old and end in old:
        new = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, old, flags=re.S)
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)
