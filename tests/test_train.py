"""scripts/train.py: state carry-over through the trainer, the end-to-end run on a micro model (save, load,
resume, fine-tune, packing, carry-over, gradient checkpointing, bf16), and refusals of bad input before training."""

import json
import lzma
import os
import sys
from pathlib import Path

import pytest
import torch

from modeling_fwp import FWPConfig, FWPForCausalLM
from modeling_fwp import data as fwp_data
from modeling_fwp.compat import activation_checkpointing_flag

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import train  # noqa: E402

MICRO = "num_hidden_layers=2,hidden_size=32,num_heads=2,head_dim=16,intermediate_size=64,vocab_size=320,dropout=0"


@pytest.fixture(scope="module")
def mini_corpus(tmp_path_factory):
    """A slice of the embedded corpus as local JSON-lines files: 6 training works, 2 validation works."""
    folder = tmp_path_factory.mktemp("corpus")
    for split, name, num_docs, chars in (("train", "train.jsonl", 6, 5000), ("validation", "valid.jsonl", 2, 2000)):
        path = Path(fwp_data.corpus_files()[split])
        with lzma.open(path, "rt") as source, open(folder / name, "w") as out:
            for line in list(source)[:num_docs]:
                out.write(json.dumps({"text": json.loads(line)["text"][:chars]}) + "\n")
    return folder


@pytest.fixture(autouse=True)
def tokenizer_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MODELING_FWP_CACHE", str(tmp_path_factory.getbasetemp() / "fwp-cache"))


def run_args(corpus, output_dir, *extra):
    return ["--recipe", "none", "--config_overrides", MICRO, "--train_file", str(corpus / "train.jsonl"),
            "--validation_file", str(corpus / "valid.jsonl"), "--block_size", "32",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--learning_rate", "3e-3",
            "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true",
            "--dataloader_pin_memory", "false", "--max_eval_samples", "24", "--sample_max_new_tokens", "12",
            "--sample_prompt", "ROMEO.", "--output_dir", str(output_dir), *extra]


def logged_losses(output_dir):
    history = json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


# ------------------------------------------------------------------------------------------------ state carry-over

def test_carried_segments_equal_one_long_forward(tmp_path):
    """Evaluation with carry-over scores every stream exactly as one forward over the whole stream; in training, a
    segment starts from the previous segment's detached state. Without carry-over the scores differ."""
    import datasets
    from transformers import TrainingArguments, default_data_collator

    torch.manual_seed(0)
    config = FWPConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=16,
                       intermediate_size=64, dropout=0.0, use_short_conv=True, initializer_range=0.3)
    model = FWPForCausalLM(config).double()
    docs = [torch.randint(1, 50, (n,)).tolist() for n in (70, 30, 101)]
    split = datasets.Dataset.from_dict({"input_ids": docs})
    streams = fwp_data.contiguous_streams(split, segment_length=16, streams_per_process=2)  # 2 streams x 6 segments
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to="none", use_cpu=True,
                             dataloader_pin_memory=False)
    trainer = train.FWPTrainer(model=model, args=args, eval_dataset=streams, data_collator=default_data_collator,
                               carry_state=True)
    carried = trainer.evaluate()["eval_loss"]
    trainer.carry_state = False
    fresh = trainer.evaluate()["eval_loss"]

    # Reference: each stream in one forward pass.
    num_segments = len(streams) // 2
    inputs = torch.tensor(streams["input_ids"]).view(num_segments, 2, 16).transpose(0, 1).reshape(2, -1)
    targets = torch.tensor(streams["shift_labels"]).view(num_segments, 2, 16).transpose(0, 1).reshape(2, -1)
    model.eval()
    with torch.no_grad():
        logits = model(inputs).logits
    reference = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    assert carried == pytest.approx(reference, rel=1e-6)
    assert abs(fresh - reference) > 1e-3

    # Training path: two consecutive segments through compute_loss (model.train(), dropout 0) give the two halves
    # of one long forward; the carried state is cut from the graph.
    model.train()
    trainer.carry_state = True
    losses = []
    for j in range(2):
        batch = default_data_collator([streams[n] for n in (2 * j, 2 * j + 1)])
        loss = trainer.compute_loss(model, batch)
        loss.backward()  # would fail ("backward through the graph a second time") if the state were not detached
        losses.append(loss.item())
    segment, cache = trainer._carried[True]
    assert segment == 1 and not any(t.requires_grad for layer in range(2) for t in cache[layer].tensors())
    per_token = torch.nn.functional.cross_entropy(logits[:, :32].flatten(0, 1), targets[:, :32].flatten(),
                                                  reduction="none").view(2, 2, 16)
    assert losses == pytest.approx([per_token[:, 0].mean().item(), per_token[:, 1].mean().item()], rel=1e-6)


# -------------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def trained(mini_corpus, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run") / "micro"
    summary = train.main(run_args(mini_corpus, output_dir, "--max_steps", "12", "--save_steps", "6",
                                  "--eval_strategy", "steps", "--eval_steps", "6", "--seed", "1"))
    return output_dir, summary


def test_train_saves_a_loadable_model_and_reports_perplexity(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    output_dir, summary = trained
    losses = logged_losses(output_dir)
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])  # the loss fell
    metrics = json.loads((output_dir / "eval_results.json").read_text())
    assert summary["validation_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item())
    for key in ("validation_perplexity_carry_over", "validation_perplexity_no_carry_over", "unigram_perplexity"):
        assert 1 < summary[key] < 320
    assert summary["sample"].startswith("ROMEO.") and len(summary["sample"]) > len("ROMEO.")

    assert json.loads((output_dir / "config.json").read_text())["use_cache"] is True  # generation needs the state
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert isinstance(model, FWPForCausalLM) and len(tokenizer) == model.config.vocab_size == 320
    assert model.config.eos_token_id == tokenizer.eos_token_id
    generation = GenerationConfig.from_pretrained(output_dir)
    assert generation.do_sample and generation.eos_token_id in (tokenizer.eos_token_id, [tokenizer.eos_token_id])
    reloaded = train.parameter_checksum(model)
    original = json.loads((output_dir / "train_summary.json").read_text())
    assert original["validation_perplexity"] == summary["validation_perplexity"] and reloaded["sha256"]


def test_resume_from_checkpoint_continues_the_run(trained, mini_corpus, tmp_path):
    import shutil

    output_dir, _ = trained
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(output_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoint-12")  # pretend the run stopped after step 6
    train.main(run_args(mini_corpus, resumed_dir, "--max_steps", "12", "--save_steps", "6", "--seed", "1",
                        "--resume_from_checkpoint", "last"))
    state = json.loads((resumed_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 12
    original = logged_losses(output_dir)
    assert logged_losses(resumed_dir)[-6:] == pytest.approx(original[-6:], rel=1e-4)  # same batches, same weights


def test_fine_tune_with_packing_checkpointing_and_time_budget(trained, mini_corpus, tmp_path):
    output_dir, _ = trained
    summary = train.main(run_args(mini_corpus, tmp_path / "tuned", "--model_name_or_path", str(output_dir),
                                  "--config_overrides", "dropout=0.0", "--packing", "true",
                                  activation_checkpointing_flag(), "true", "--max_steps", "50", "--save_strategy", "no",
                                  "--max_train_minutes", "0.0001"))
    assert summary["validation_perplexity"] < 320
    assert len(logged_losses(tmp_path / "tuned")) == 1  # the time budget ended training after the first step
    # activation checkpointing may switch the cache off for training; the saved model must not keep that
    assert json.loads((tmp_path / "tuned" / "config.json").read_text())["use_cache"] is True


def test_time_budget_anneals_by_steps_or_time(tmp_path):
    import math
    import time

    from transformers import TrainingArguments

    budget = train.TimeBudget(minutes=1.0)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1.0, warmup_steps=10, report_to="none",
                             use_cpu=True)
    model = FWPForCausalLM(FWPConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_heads=1))
    trainer = train.FWPTrainer(model=model, args=args, time_budget=budget)
    trainer.create_optimizer()
    factor = trainer.create_scheduler(num_training_steps=1010).lr_lambdas[0]
    assert factor(5) == pytest.approx(0.5)  # warm-up
    assert factor(10) == pytest.approx(1.0) and factor(1010) == pytest.approx(0.0)  # steps decide
    budget.start = time.monotonic() - 45.0  # three quarters of the budget gone
    assert factor(110) == pytest.approx(0.5 * (1 + math.cos(0.75 * math.pi)), abs=1e-3)  # time decides
    assert factor(910) == pytest.approx(0.5 * (1 + math.cos(0.9 * math.pi)))  # steps are further along
    assert budget in trainer.callback_handler.callbacks


def test_carry_state_training(mini_corpus, tmp_path):
    summary = train.main(run_args(mini_corpus, tmp_path / "carry", "--carry_state", "true", "--max_steps", "6",
                                  "--save_strategy", "no"))
    assert summary["validation_perplexity"] == summary["validation_perplexity_carry_over"]
    assert summary["validation_perplexity_no_carry_over"] != summary["validation_perplexity_carry_over"]
    losses = logged_losses(tmp_path / "carry")
    assert len(losses) == 6 and all(l == l for l in losses)


def test_bf16_training(mini_corpus, tmp_path):
    """bf16 autocast (on CPU here; the same Trainer path on GPU)."""
    summary = train.main(run_args(mini_corpus, tmp_path / "bf16", "--bf16", "true", "--max_steps", "2",
                                  "--save_strategy", "no", "--max_eval_samples", "8"))
    assert 1 < summary["validation_perplexity"] < 320


# ----------------------------------------------------------------------------------------------- bad input

def _assert_refused(argv, match, exc=ValueError):
    with pytest.raises(exc, match=match):
        train.main(argv)


def test_bad_input_is_refused_before_training(mini_corpus, tmp_path, trained):
    output_dir, _ = trained
    fresh = tmp_path / "fresh"
    _assert_refused(run_args(mini_corpus, fresh, "--preset", "no-such-preset", "--config_overrides", ""),
                    "known presets: .*tiny")
    _assert_refused(run_args(mini_corpus, fresh, "--config_overrides", "hidden_sise=3"), "hidden_sise")
    _assert_refused(run_args(mini_corpus, fresh, "--train_file", str(tmp_path / "missing.txt")), "train_file",
                    FileNotFoundError)
    _assert_refused(run_args(mini_corpus, fresh, "--recipe", "no-such-recipe"), "known recipes")
    # The trained tokenizer has 320 tokens; a model with 300 embedding rows cannot take it.
    _assert_refused(run_args(mini_corpus, fresh, "--tokenizer_name_or_path", str(output_dir), "--config_overrides",
                             MICRO.replace("vocab_size=320", "vocab_size=300")), "320 tokens .* vocab_size is 300")
    assert not fresh.exists()  # nothing was written for any refused run

    before = {p: p.stat().st_mtime_ns for p in output_dir.rglob("*")}
    _assert_refused(run_args(mini_corpus, output_dir, "--max_steps", "1"), "already holds a model")
    assert {p: p.stat().st_mtime_ns for p in output_dir.rglob("*")} == before  # untouched


def test_default_arguments_are_the_readme_main_job():
    model_args, data_args, run_args_, training_args = train.parse_arguments([])
    assert model_args.preset == "tiny" and data_args.dataset_name is None and data_args.train_file is None
    assert training_args.output_dir == os.path.join("outputs", "fwp-tiny-shakespeare")
    assert training_args.max_steps > 0 and training_args.eval_strategy == "steps"
    _, _, _, overridden = train.parse_arguments(["--max_steps", "3", "--output_dir", "elsewhere"])
    assert overridden.max_steps == 3 and overridden.output_dir == "elsewhere"  # flags beat the recipe
    with pytest.raises(ValueError, match="exclude each other"):
        train.parse_arguments(["--packing", "true", "--carry_state", "true"])


# ------------------------------------------------------------------------------------------------ issue 26: first use

def test_the_run_records_its_training_data_for_the_model_card(trained, mini_corpus):
    """The card said "The training data was not recorded with this run": train.py writes data_info.json."""
    from modeling_fwp.hub_card import render_model_card

    output_dir, _ = trained
    info = json.loads((output_dir / "data_info.json").read_text())
    assert "train.jsonl" in info["dataset_name"] and info["block_size"] == 32
    assert info["train_tokens"] > 0 and "tokenizer" in info
    card = render_model_card(FWPConfig.from_pretrained(output_dir), run_dir=output_dir).text
    assert "train.jsonl" in card and "was not recorded" not in card


def test_the_embedded_corpus_is_named_with_its_license():
    """What the main job (no --dataset_name, no --train_file) records: the embedded corpus, its source and license."""
    from modeling_fwp.hub_card import data_description

    info = fwp_data.describe_source()
    assert "Shakespeare" in info["dataset_name"] and "public domain" in info["license"]
    assert "Project Gutenberg" in info["description"] and "hamlet" in info["description"]
    text = data_description(info)
    assert "Shakespeare" in text and "License: public domain" in text
    hub = fwp_data.describe_source(dataset_name="wikitext", dataset_config="wikitext-103-raw-v1")
    assert hub["dataset_id"] == "wikitext" and hub["dataset_config"] == "wikitext-103-raw-v1"


def test_the_carry_over_report_says_why_carrying_may_not_help():
    """The main job printed "253.18 with fast-weight state carried over" against 213.62 without, with no word why."""
    summary = {"validation_perplexity": 213.62, "validation_perplexity_no_carry_over": 213.62,
               "validation_perplexity_carry_over": 253.18}
    report = train.perplexity_report(summary, unigram=624.0, block_size=128, carry_state=False)
    assert "253.18 with" in report and "213.62 without" in report and "624.00" in report
    assert "trained without" in report and "--carry_state true" in report and "Table 4" in report
    trained_with = train.perplexity_report(summary, unigram=624.0, block_size=128, carry_state=True)
    assert "--carry_state true" not in trained_with and "trained with" in trained_with


def test_the_cpu_recipe_does_not_ask_for_pinned_memory():
    """torch warned four times that pin_memory was set with no accelerator."""
    _, _, _, training_args = train.parse_arguments([])
    assert training_args.dataloader_pin_memory is False


def test_the_saved_model_files_get_the_umask_modes(trained):
    """safetensors (0.8) writes model.safetensors as 0600 whatever the umask (tests/test_file_modes.py)."""
    import stat

    from modeling_fwp.safeguards import current_umask

    output_dir, _ = trained
    mask = current_umask()
    for path in [output_dir, *output_dir.rglob("*")]:
        wanted = (0o777 if path.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(path.stat().st_mode) == wanted, (path, oct(path.stat().st_mode))
