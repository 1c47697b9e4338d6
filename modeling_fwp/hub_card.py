"""Hub model card of a trained FWP model, rendered from its config and the files its training run left behind.

Kept apart from modeling_fwp.py on purpose: nothing the model code imports may import this module, so that
`save_pretrained` does not copy it to the Hub (it needs huggingface_hub's card machinery and the template in
hub_cards/, which remote-code users do not have).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

# Inside the package when installed from a wheel (pyproject.toml ships hub_cards/ as modeling_fwp/hub_cards), beside
# the package in a repository checkout.
_PACKAGE = Path(__file__).resolve().parent
DEFAULT_TEMPLATE = next((folder / "fwp_model_card.md" for folder in (_PACKAGE / "hub_cards", _PACKAGE.parent / "hub_cards")
                         if (folder / "fwp_model_card.md").is_file()), _PACKAGE.parent / "hub_cards" / "fwp_model_card.md")
DEFAULT_LICENSE = "apache-2.0"
# Files Trainer writes with save_metrics / save_state; later ones win for keys they share.
RESULT_FILES = ("all_results.json", "train_results.json", "eval_results.json", "test_results.json")
# Optional description of the training data, written by scripts/train.py when it knows it.
DATA_INFO_FILE = "data_info.json"
# Optional: TrainingArguments.to_json_string(), for the optimiser settings trainer_state.json does not hold.
TRAINING_ARGS_FILE = "training_args.json"
# scripts/train.py's closing summary; its "sample" is shown in the card.
SUMMARY_FILE = "train_summary.json"
BASE_TAGS = ["fast-weight-programmer", "linear-attention"]

BIBTEX = """@inproceedings{schlag2021linear,
  title     = {Linear Transformers Are Secretly Fast Weight Programmers},
  author    = {Schlag, Imanol and Irie, Kazuki and Schmidhuber, J{\\"u}rgen},
  booktitle = {Proceedings of the 38th International Conference on Machine Learning},
  series    = {Proceedings of Machine Learning Research},
  volume    = {139},
  pages     = {9355--9366},
  year      = {2021},
  eprint    = {2102.11174},
  archivePrefix = {arXiv}
}"""

FEATURE_MAP_LABELS = {
    "elu_plus_one": "ELU+1",
    "dpfp": "DPFP",
    "favor": "FAVOR+",
    "silu": "SiLU",
    "relu": "ReLU",
    "identity": "identity",
}


def format_count(n: int) -> str:
    """1234567 -> '1.23M': short enough for a table, exact count given next to it where it matters."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return str(n)


def format_bytes(n: int) -> str:
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.3g} {suffix}"
    return f"{n} B"


def _number(value, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err


def read_run_info(run_dir) -> dict:
    """What a training output_dir tells about its run: Trainer's state and arguments, the saved metrics, the data
    description and scripts/train.py's summary (with its generated sample). Missing files give empty entries."""
    def read(name):
        return _read_json(Path(run_dir) / name) if run_dir is not None else None

    results = {}
    for name in RESULT_FILES:
        results.update(read(name) or {})
    return {
        "trainer_state": read("trainer_state.json"),
        "training_args": read(TRAINING_ARGS_FILE) or {},
        "results": results,
        "data": read(DATA_INFO_FILE) or {},
        "summary": read(SUMMARY_FILE) or {},
    }


def variant_name(config) -> str:
    rule = "Delta-rule" if config.update_rule == "delta" else "Sum-rule"
    return f"{rule} FWP with {FEATURE_MAP_LABELS[config.feature_map]} features"


def variant_tag(config) -> str:
    """e.g. 'fwp-delta-elu-plus-one': one Hub tag per (update rule, feature map) pair."""
    return f"fwp-{config.update_rule}-{config.feature_map.replace('_', '-')}"


def describe_variant(config) -> dict:
    if config.update_rule == "delta":
        beta = "a learned per-head learning rate β_t = σ(W_β x_t)" if config.use_beta else "β_t = 1"
        if config.allow_neg_eigval:
            beta = ("β_t = 2σ(W_β x_t), in (0, 2), so I − β_t k k^T may have a negative eigenvalue" if config.use_beta
                    else "β_t = 2")
        update = (
            "delta rule (Eqs. 20-25). Each step retrieves what the fast weights hold for the key, "
            "v̄_t = W_{t-1} φ(k_t), then writes the correction: W_t = W_{t-1} + β_t (v_t − v̄_t) ⊗ φ(k_t), with "
            f"{beta}. Old associations are overwritten rather than piled up."
        )
    else:
        update = (
            "sum rule, the Linear Transformer (Eqs. 16-19): W_t = W_{t-1} + v_t ⊗ φ(k_t). Purely additive; "
            "nothing is ever erased."
        )
    fm = config.feature_map
    feature_map = {
        "elu_plus_one": f"ELU+1 (Eq. 30): φ(x) = elu(x) + 1, key_dim = head_dim = {config.key_dim}.",
        "dpfp": f"DPFP with ν = {config.dpfp_nu} (Eqs. 33-37), deterministic and parameter-free: "
        f"key_dim = 2 · head_dim · ν = {config.key_dim}.",
        "favor": f"FAVOR+ (Eqs. 31-32) with m = {config.favor_features} random features: key_dim = 2m = "
        f"{config.key_dim}. The random matrix is saved with the weights"
        + (" and redrawn at every training step." if config.favor_redraw else " and never redrawn."),
        "silu": f"SiLU, key_dim = head_dim = {config.key_dim}.",
        "relu": f"ReLU, key_dim = head_dim = {config.key_dim}.",
        "identity": f"none (identity), key_dim = head_dim = {config.key_dim}.",
    }[fm]
    qk_norm = {
        "sum": "each divided by the sum of its features (Eq. 29).",
        "l2": "each scaled to unit L2 norm (as in modern DeltaNet).",
        "none": "none.",
    }[config.qk_norm]
    positions = {
        "none": "none: no positional encoding (the paper's best setting; the recurrence is order-aware).",
        "sinusoidal": "absolute sinusoidal encodings added to the embeddings.",
        "rotary": f"rotary embeddings on q and k before φ (θ = {_number(config.rope_theta)}).",
    }[config.position_embedding]
    blocks = {
        "post_ln": "post-LayerNorm residual blocks with a ReLU feed-forward (as in the paper).",
        "pre_norm": "pre-RMSNorm residual blocks with a SwiGLU feed-forward (modern DeltaNet style).",
    }[config.block_style]
    extras = []
    if config.use_output_norm:
        extras.append("**Output norm:** per-head RMSNorm of the fast-weight read-out before the output projection.")
    if config.use_short_conv:
        extras.append(f"**Short convolution:** causal depthwise convolution (kernel {config.conv_size}, SiLU) on q, k, v.")
    if config.use_gate:
        extras.append("**Output gate:** the read-out is multiplied by SiLU(W_g x) per channel (fla's gated RMSNorm).")
    read_out_extra = ""
    if config.attention_normalization:
        read_out_extra = ", divided by the accumulated key sum z_t · φ(q_t) (Eqs. 26-28)"
    return {
        "name": variant_name(config),
        "update_rule": update,
        "read_out_extra": read_out_extra,
        "feature_map": feature_map,
        "qk_norm": qk_norm,
        "positions": positions,
        "blocks": blocks,
        "extras": extras,
    }


def describe_state(config) -> dict:
    per_layer = config.num_heads * config.key_dim * config.head_dim
    if per_layer != config.state_size_per_layer:  # the config's own formula is the contract; say so if it moved
        raise ValueError(f"state size mismatch: {per_layer} != FWPConfig.state_size_per_layer {config.state_size_per_layer}")
    layers = config.num_hidden_layers
    extra = []
    if config.attention_normalization:
        extra.append(f"plus the z accumulator, num_heads × key_dim = {config.num_heads * config.key_dim} per layer")
    if config.use_short_conv:
        extra.append(f"plus the short convolution's last {config.conv_size - 1} inputs")
    return {
        "formula": f"{config.num_heads} × {config.key_dim} × {config.head_dim}",
        "per_layer": f"{per_layer:,}",
        "per_layer_bytes": format_bytes(4 * per_layer),
        "all_layers": f"{per_layer * layers:,}",
        "all_layers_bytes": format_bytes(4 * per_layer * layers),
        "num_layers": layers,
        "extra": "".join(f"; {e}" for e in extra),
    }


def size_rows(config, num_parameters) -> list:
    rows = []
    if num_parameters is not None:
        rows.append(("Parameters", f"{format_count(num_parameters)} ({num_parameters:,})"))
    rows += [
        ("Layers", config.num_hidden_layers),
        ("Hidden size", config.hidden_size),
        ("Heads × head_dim", f"{config.num_heads} × {config.head_dim}"),
        ("key_dim (after φ)", config.key_dim),
        ("Feed-forward size", config.intermediate_size),
        ("Vocabulary", config.vocab_size),
        ("Tied embeddings", "yes" if config.tie_word_embeddings else "no"),
        ("Weights dtype", str(getattr(config, "dtype", None) or "float32").replace("torch.", "")),
    ]
    return rows


def training_rows(trainer_state, results, training_args=None) -> tuple[list, list]:
    """Table rows of the training procedure and the eval-loss history, from Trainer's trainer_state.json (and the
    TrainingArguments, when saved as JSON)."""
    if not trainer_state and not results and not training_args:
        return [], []
    args = training_args or {}
    state = trainer_state or {}
    history = state.get("log_history") or []
    rows = []

    def add(name, value):
        if value is not None and value != "":
            rows.append((name, value))

    add("Optimizer steps", state.get("global_step"))
    add("Epochs", _number(state["epoch"], 3) if state.get("epoch") else None)
    add("Batch size per device", state.get("train_batch_size"))
    tokens = state.get("num_input_tokens_seen")
    add("Tokens seen", f"{format_count(tokens)} ({tokens:,})" if tokens else None)
    rates = [e["learning_rate"] for e in history if isinstance(e.get("learning_rate"), (int, float))]
    if "learning_rate" in args:
        add("Learning rate", _number(args["learning_rate"], 3))
    else:
        add("Peak logged learning rate", _number(max(rates), 3) if rates else None)
    train_losses = [e["loss"] for e in history if isinstance(e.get("loss"), (int, float))]
    add("Last logged training loss", _number(train_losses[-1]) if train_losses else None)
    train_loss = results.get("train_loss", next((e["train_loss"] for e in reversed(history) if "train_loss" in e), None))
    add("Mean training loss", _number(train_loss) if train_loss is not None else None)
    runtime = results.get("train_runtime") or next(
        (e["train_runtime"] for e in reversed(history) if "train_runtime" in e), None
    )
    add("Training time", f"{runtime / 60:.1f} min" if runtime else None)
    flos = state.get("total_flos")
    add("Total FLOs (Trainer's estimate)", f"{flos:.3g}" if flos else None)
    add("Gradient accumulation steps", args.get("gradient_accumulation_steps") if args.get("gradient_accumulation_steps", 1) > 1 else None)
    add("Optimizer", args.get("optim"))
    add("Learning-rate schedule", args.get("lr_scheduler_type"))
    warmup = args.get("warmup_steps") or (f"{args['warmup_ratio']:.3g} of the steps" if args.get("warmup_ratio") else None)
    add("Warm-up", warmup)
    add("Weight decay", args.get("weight_decay"))
    precision = "bf16 mixed" if args.get("bf16") else "fp16 mixed" if args.get("fp16") else ("fp32" if args else None)
    add("Precision", precision)
    add("Seed", args.get("seed") if "seed" in args else None)

    evals = [e for e in history if isinstance(e.get("eval_loss"), (int, float))]
    eval_history = [
        (e.get("step", "?"), f"{e['eval_loss']:.4f}", f"{math.exp(min(e['eval_loss'], 700)):.2f}") for e in evals
    ]
    if len(eval_history) > 12:  # keep the card readable: first, a spread, last
        keep = sorted({round(i * (len(eval_history) - 1) / 11) for i in range(12)})
        eval_history = [eval_history[i] for i in keep]
    return rows, eval_history


# Evaluation variants scripts/train.py reports next to the plain validation loss (eval_<variant>_loss).
EVAL_VARIANTS = {
    "carry": "fast-weight state carried across segments",
    "streams": "contiguous segments, state reset at each",
    "nocarry": "contiguous segments, state reset at each",
}
METRIC_WORDS = ("loss", "perplexity", "ppl", "accuracy")


def _metric_type(name: str) -> str:
    if "perplexity" in name or "ppl" in name:
        return "perplexity"
    return "accuracy" if "accuracy" in name else "loss"


def eval_metrics(results) -> list[dict]:
    """Loss / perplexity / accuracy metrics of Trainer's eval_* and test_* keys, each as
    {split, type, setting, value}; perplexity is derived as exp(loss) where a loss has none."""
    splits = {"eval_": "validation", "test_": "test"}
    found = {}
    for key, value in results.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        prefix = next((p for p in splits if key.startswith(p)), None)
        name = key[len(prefix):] if prefix else ""
        word = next((w for w in METRIC_WORDS if name == w or name.endswith("_" + w)), None)
        if word is None:
            continue
        setting = name[: -len(word)].rstrip("_")
        found[(splits[prefix], setting, _metric_type(word))] = float(value)
    for (split, setting, kind), value in list(found.items()):
        if kind == "loss" and (split, setting, "perplexity") not in found:
            found[(split, setting, "perplexity")] = math.exp(min(value, 700))
    order = {"loss": 0, "perplexity": 1, "accuracy": 2}
    keys = sorted(found, key=lambda k: (k[0] != "validation", k[1] != "", k[1], order[k[2]]))
    return [
        {"split": split, "type": kind, "setting": EVAL_VARIANTS.get(setting, setting.replace("_", " ")),
         "value": found[(split, setting, kind)]}
        for split, setting, kind in keys
    ]


def _format_metric(metric: dict) -> str:
    return f"{metric['value']:.4f}" if metric["type"] == "loss" else f"{metric['value']:.2f}"


def _fenced_text(text):
    """Text safe inside a ```` fence (a sample may contain anything)."""
    if not isinstance(text, str) or not text.strip():
        return None
    return text.replace("````", "` ` ` `").rstrip()


def data_description(data: dict) -> str:
    if not data:
        return "The training data was not recorded with this run."
    parts = []
    name = data.get("dataset_name") or data.get("dataset_id") or "the training corpus"
    parts.append(f"Trained on **{name}**")
    if data.get("dataset_id") and data.get("dataset_id") != name:
        parts[-1] += f" (`{data['dataset_id']}`" + (f", config `{data['dataset_config']}`)" if data.get("dataset_config") else ")")
    parts[-1] += "."
    for key, label in (("description", None), ("license", "License"), ("splits", "Splits"),
                       ("block_size", "Block size"), ("tokenizer", "Tokenizer"), ("train_tokens", "Training tokens")):
        value = data.get(key)
        if value in (None, "", [], {}):
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        elif isinstance(value, int) and key == "train_tokens":
            value = f"{format_count(value)} ({value:,})"
        parts.append(f"{label}: {value}." if label else str(value))
    return " ".join(parts)


def render_model_card(
    config,
    *,
    num_parameters: int | None = None,
    run_dir=None,
    repo_id: str | None = None,
    license: str = DEFAULT_LICENSE,
    data: dict | None = None,
    results: dict | None = None,
    language: str = "en",
    prompt: str = "To be, or not to be",
    template_path=None,
) -> ModelCard:
    """The README.md card of an FWP model.

    config: an FWPConfig. run_dir: a training output_dir whose trainer_state.json, *_results.json and data_info.json
    fill the training and evaluation sections. data / results override what run_dir says. repo_id names the model
    in the usage snippet (defaults to a placeholder the reader replaces).
    """
    if getattr(config, "model_type", None) != "fwp":
        raise ValueError(f"config: expected an FWPConfig (model_type 'fwp'), got {type(config).__name__}")
    template_path = Path(template_path or DEFAULT_TEMPLATE)
    if not template_path.is_file():
        raise ValueError(
            f"template_path: model card template {template_path} not found; pass template_path= "
            "(the default is hub_cards/fwp_model_card.md of a modeling_fwp checkout, modeling_fwp/hub_cards/ when "
            "installed from a wheel)"
        )
    run = read_run_info(run_dir) if run_dir is not None else read_run_info(None)
    run_results = {**run["results"], **(results or {})}
    run_data = {**run["data"], **(data or {})}
    model_name = (repo_id or "").split("/")[-1] or (Path(run_dir).name if run_dir else "fwp-model")
    dataset_id = run_data.get("dataset_id")
    metrics = eval_metrics(run_results)
    eval_results = [
        EvalResult(
            task_type="text-generation",
            task_name="Causal language modelling",
            dataset_type=dataset_id or "custom",
            dataset_name=run_data.get("dataset_name") or dataset_id or "training corpus",
            dataset_config=run_data.get("dataset_config"),
            dataset_split=m["split"],
            metric_type=m["type"],
            metric_name=f"{m['split']} {m['type']}" + (f" ({m['setting']})" if m["setting"] else ""),
            metric_value=round(m["value"], 4),
        )
        for m in metrics
    ]
    eval_rows = [(m["split"], m["type"] + (f" ({m['setting']})" if m["setting"] else ""), _format_metric(m))
                 for m in metrics]
    unigram = run_results.get("unigram_perplexity") or run_results.get("eval_unigram_perplexity")
    if isinstance(unigram, (int, float)):  # a reference point, not a result of this model: table only
        eval_rows.append(("validation", "perplexity of a unigram model (baseline, for reference)", f"{unigram:.2f}"))
    rule_tag = "delta-rule" if config.update_rule == "delta" else "sum-rule"
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        language=language,
        tags=BASE_TAGS[:1] + [rule_tag] + BASE_TAGS[1:] + [variant_tag(config), "custom_code"],
        pipeline_tag="text-generation",
        datasets=[dataset_id] if dataset_id else None,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    rows, eval_history = training_rows(run["trainer_state"], run_results, run["training_args"])
    big = num_parameters is not None and num_parameters >= 100_000_000
    size_limitation = (
        "Trained on a single corpus: outside its domain the text it writes degrades quickly."
        if big
        else "A small model trained on a small corpus: it writes locally plausible text but knows little and loses "
        "coherence over long spans."
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        repo_id=repo_id or "<user>/<this-repo>",
        variant=describe_variant(config),
        size_rows=size_rows(config, num_parameters),
        state=describe_state(config),
        data_text=data_description(run_data),
        training_rows=rows,
        eval_history=eval_history,
        eval_rows=eval_rows,
        sample=_fenced_text(run["summary"].get("sample")),
        size_limitation=size_limitation,
        prompt=prompt.replace("\\", "\\\\").replace('"', '\\"'),
        bibtex=BIBTEX,
    )


def push_to_hub_with_card(model, repo_id: str, *, card_kwargs: dict | None = None, commit_message=None,
                          commit_description=None, private=None, token=None, revision=None, create_pr=False,
                          max_shard_size="50GB", tags=None):
    """What `FWPForCausalLM.push_to_hub` does when modeling_fwp is installed: the same upload as transformers',
    but with this package's card (rendered from the model's config) instead of the generic one.

    card_kwargs go to render_model_card (e.g. run_dir=output_dir to describe the training run).
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):  # as transformers does: a PR ref exists already
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    kwargs = {"num_parameters": model.num_parameters(), **(card_kwargs or {})}
    card = render_model_card(model.config, repo_id=repo_id, **kwargs)
    for tag in [*(getattr(model, "model_tags", None) or []), *(tags or [])]:
        if tag not in card.data.tags:
            card.data.tags.append(tag)
    with tempfile.TemporaryDirectory() as work_dir:
        model.save_pretrained(work_dir, max_shard_size=max_shard_size)
        card.save(os.path.join(work_dir, "README.md"))
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=work_dir,
            revision=revision,
            commit_message=commit_message or "Upload model",
            commit_description=commit_description,
            create_pr=create_pr,
        )
