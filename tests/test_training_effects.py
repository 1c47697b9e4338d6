"""The training script and the saved folders tested by their effect, not by their flags (issue 16).

Other tests compare backends with each other and run scripts/train.py end to end checking that the loss falls; a
one-line bug that keeps the loss falling (packing ignored, a loss normalisation skipped, a registration dropped)
passed them all. Each test here states what a feature is for and measures exactly that:

1. `--packing`: through train.main's own data path (arguments, build_datasets, collator, Trainer dataloader), every
   document in a packed row gets the logits and loss it gets alone; without packing documents share rows and see
   each other.
2. Gradient accumulation with `--carry_state`: FWPTrainer's accumulated gradients over micro-batches with
   different numbers of scored tokens equal one big batch's, and with carried state they equal a hand-written
   truncated-backprop reference.
3. Data parallelism: 2 gloo processes (torchrun) running FWPTrainer's carry-state loss give the gradients a single
   process gets on the combined batch (so the rescale by the number of processes is needed), and with
   --carry_state each process's rows continue their own contiguous streams.
4. Remote code: saved folders load through AutoModel / AutoModelForCausalLM with trust_remote_code in a Python where
   `import modeling_fwp` fails, and the classes come from the folder's own code; a saved causal LM loads through
   AutoModel too.
5. What a run is built from: a pre_norm override gets the documented defaults; the tokenizer cache never hands a
   run a tokenizer trained on other text or with another vocabulary size.

Run as `torchrun --nproc_per_node 2 tests/test_training_effects.py --ddp-worker OUT` this file is the worker of 3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import train  # noqa: E402  scripts/train.py (it puts the repository first on sys.path)

import modeling_fwp  # noqa: E402
from modeling_fwp import FWPConfig, FWPForCausalLM, FWPModel  # noqa: E402
from modeling_fwp.compat import output_cache  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# Weights large enough that every token's logits visibly depend on its context (state, convolution tail, positions).
CONTEXT = "use_short_conv=true,position_embedding=rotary,initializer_range=0.3,dropout=0"
MICRO = ("num_hidden_layers=2,hidden_size=32,num_heads=2,head_dim=16,intermediate_size=64,vocab_size=320,"
         + CONTEXT)
TIGHT = dict(rtol=1e-9, atol=1e-10)  # float64 forwards
GRADIENTS = dict(rtol=1e-5, atol=1e-8)  # FWPTrainer computes the loss from float32 logits


def micro_model(vocab_size=64, seed=0):
    torch.manual_seed(seed)
    config = FWPConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=16,
                       intermediate_size=64, dropout=0.0, use_short_conv=True, position_embedding="rotary",
                       initializer_range=0.3)
    return FWPForCausalLM(config).double()


# ---------------------------------------------------------------------------------------------------- 1. packing

TRAIN_DOCS = [
    "Now is the winter of our discontent.",
    "A horse! a horse! my kingdom for a horse!",
    "So foul and fair a day I have not seen.",
    "Out, damned spot!",
    "The rest is silence.",
    "Lord, what fools these mortals be!",
    "All the world's a stage.",
    "We are such stuff as dreams are made on.",
    "Brevity is the soul of wit.",
    "Exit, pursued by a bear.",
]
VALIDATION_TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings "
                   "and arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end "
                   "them. To die: to sleep; no more; and by a sleep to say we end the heart-ache and the thousand "
                   "natural shocks that flesh is heir to.")
BLOCK = 48


class _StopBeforeTraining(Exception):
    pass


def first_training_batch(tmp_path, monkeypatch, packing: bool):
    """Runs train.main up to Trainer.train and returns (trainer, first training batch): the arguments, data layout,
    collator and dataloader are the script's own."""
    for name, texts in (("train.jsonl", TRAIN_DOCS), ("valid.jsonl", [VALIDATION_TEXT] * 3)):
        (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    monkeypatch.setenv("MODELING_FWP_CACHE", str(tmp_path / "cache"))
    captured = {}

    def stop(self, *args, **kwargs):
        captured["trainer"] = self
        captured["batch"] = next(iter(self.get_train_dataloader()))
        raise _StopBeforeTraining

    monkeypatch.setattr(train.FWPTrainer, "train", stop)
    with pytest.raises(_StopBeforeTraining):
        train.main(["--recipe", "none", "--config_overrides", MICRO, "--train_file", str(tmp_path / "train.jsonl"),
                    "--validation_file", str(tmp_path / "valid.jsonl"), "--block_size", str(BLOCK),
                    "--packing", str(packing).lower(), "--per_device_train_batch_size", "64",
                    "--per_device_eval_batch_size", "2", "--report_to", "none", "--use_cpu", "true",
                    "--dataloader_pin_memory", "false", "--output_dir", str(tmp_path / "run")])
    trainer = captured["trainer"]
    trainer.model.double().eval()
    tokenizer = trainer.processing_class
    documents = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in TRAIN_DOCS]
    assert all(2 <= len(doc) <= BLOCK for doc in documents)  # so packing keeps every document whole
    return trainer, captured["batch"], documents


def sequences_in(batch):
    """(row, start, end) of each sequence the model is told about: packed boundaries (cu_seq_lens_q, else position
    ids restarting at 0), else each row is one sequence."""
    rows, length = batch["input_ids"].shape
    if "cu_seq_lens_q" in batch:
        bounds = batch["cu_seq_lens_q"].tolist()
        return [(0, a, b) for a, b in zip(bounds, bounds[1:])]
    if "position_ids" in batch and rows == 1:
        starts = [i for i, p in enumerate(batch["position_ids"][0].tolist()) if p == 0] + [length]
        return [(0, a, b) for a, b in zip(starts, starts[1:])]
    return [(row, 0, length) for row in range(rows)]


def mean_loss_alone(model, sequences):
    """Token-weighted mean of each sequence's loss when it is run on its own."""
    total = sum(model(torch.tensor([s]), labels=torch.tensor([s])).loss * (len(s) - 1) for s in sequences)
    return total / sum(len(s) - 1 for s in sequences)


def test_packing_gives_each_document_the_logits_and_loss_it_gets_alone(tmp_path, monkeypatch):
    trainer, batch, documents = first_training_batch(tmp_path, monkeypatch, packing=True)
    model, ids = trainer.model, batch["input_ids"]
    parts = sequences_in(batch)
    pieces = [ids[row, a:b].tolist() for row, a, b in parts]
    assert sorted(pieces) == sorted(documents), "the packed batch does not hold the documents, each whole, once"
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for (row, a, b), piece in zip(parts, pieces):
            torch.testing.assert_close(logits[row, a:b], model(torch.tensor([piece])).logits[0], **TIGHT,
                                       msg=lambda m: f"a packed document sees its neighbours: {m}")
        expected = mean_loss_alone(model, documents)
        torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), expected, **TIGHT)
        # The same tokens as one sequence (boundaries dropped) score differently: the check above has power.
        merged = model(ids, labels=batch["labels"]).loss
    assert not torch.allclose(merged, expected, rtol=1e-4, atol=1e-4)


def test_without_packing_documents_share_rows_and_see_each_other(tmp_path, monkeypatch):
    trainer, batch, documents = first_training_batch(tmp_path, monkeypatch, packing=False)
    model, eos = trainer.model, trainer.processing_class.eos_token_id
    rows = batch["input_ids"].tolist()
    assert all(len(row) == BLOCK for row in rows) and "cu_seq_lens_q" not in batch and "position_ids" not in batch
    # A row that continues after a document's EOS: the next document's tokens are read after the previous one's.
    row, cut = next((r, row.index(eos) + 1) for r, row in enumerate(rows) if eos in row[:-2])
    with torch.no_grad():
        in_row = model(torch.tensor([rows[row]])).logits[0, cut:]
        alone = model(torch.tensor([rows[row][cut:]])).logits[0]
        assert not torch.allclose(in_row, alone, rtol=1e-4, atol=1e-4)
        loss = trainer.compute_loss(model, dict(batch))
        assert not torch.allclose(loss, mean_loss_alone(model, documents), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- 2. and 3. gradient accumulation, data parallelism

def stream_rows(num_rows, length=12, vocab_size=64, ignored=(), segments=None, seed=0):
    """Rows in the carry-state layout of data.contiguous_streams (input_ids, shift_labels, labels, segment_index),
    with `ignored[i]` targets of row i set to -100 so micro-batches score different numbers of tokens."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(1, vocab_size, (num_rows, length), generator=generator)
    targets = torch.randint(1, vocab_size, (num_rows, length), generator=generator)
    for i, count in enumerate(ignored):
        targets[i, torch.randperm(length, generator=generator)[:count]] = -100
    return {"input_ids": inputs.tolist(), "shift_labels": targets.tolist(), "labels": targets.tolist(),
            "segment_index": list(segments) if segments is not None else [0] * num_rows}


def one_step_gradients(rows, output_dir, per_device_batch, accumulation, distributed=False):
    """The gradients FWPTrainer (carry_state) hands to the optimizer in its first step, with the script's
    TrainingArguments (train.parse_arguments; under torchrun it joins the processes over gloo itself)."""
    import datasets
    from transformers import TrainerCallback, default_data_collator

    argv = ["--recipe", "none", "--output_dir", str(output_dir), "--per_device_train_batch_size", str(per_device_batch),
            "--gradient_accumulation_steps", str(accumulation), "--max_steps", "1", "--learning_rate", "0",
            "--max_grad_norm", "0", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
            "--dataloader_pin_memory", "false", "--logging_steps", "1"]
    _, _, _, training_args = train.parse_arguments(argv if distributed else argv + ["--use_cpu", "true"])
    assert training_args.world_size == (int(os.environ.get("WORLD_SIZE", "1")) if distributed else 1)

    class Capture(TrainerCallback):
        grads = None

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if self.grads is None:
                self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    capture = Capture()
    trainer = train.FWPTrainer(model=micro_model(), args=training_args, train_dataset=datasets.Dataset.from_dict(rows),
                               data_collator=default_data_collator, carry_state=True, callbacks=[capture])
    trainer.train()
    assert capture.grads is not None
    return capture.grads


def assert_same_gradients(got, expected, **tolerance):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **(tolerance or GRADIENTS),
                                   msg=lambda m, name=name: f"{name}: {m}")


# Scored targets per micro-batch of 2 rows: 24 - 0 - 2 = 22 and 24 - 9 - 11 = 4; per rank below: 21+13 and 5+20.
IGNORED = (0, 2, 9, 11, 1, 10, 7, 0)


def mean_token_nll_gradients(rows, carried=False):
    """By hand, without the trainer: the gradients of the mean NLL over every scored target of `rows`. With
    `carried`, rows 2-3 continue rows 0-1 from their detached state (truncated backprop through time)."""
    model = micro_model().train()
    inputs, targets = torch.tensor(rows["input_ids"]), torch.tensor(rows["shift_labels"])
    if carried:
        first = model(inputs[:2], use_cache=True)
        second = model(inputs[2:], cache=output_cache(first).detach(), use_cache=True)
        logits = torch.cat([first.logits, second.logits])
    else:
        logits = model(inputs).logits
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                            reduction="sum")
    (nll / targets.ne(-100).sum()).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_accumulated_carry_state_gradients_equal_one_big_batch(tmp_path):
    rows = stream_rows(4, ignored=IGNORED[:4])
    accumulated = one_step_gradients(rows, tmp_path / "ga", per_device_batch=2, accumulation=2)
    big_batch = one_step_gradients(rows, tmp_path / "big", per_device_batch=4, accumulation=1)
    assert_same_gradients(accumulated, big_batch)
    assert_same_gradients(big_batch, mean_token_nll_gradients(rows))  # and both are the mean over every token


def test_accumulated_gradients_with_carried_state_equal_truncated_backprop(tmp_path):
    """Micro-batch 2 continues micro-batch 1's streams (segment 1 after segment 0): the carried state is detached,
    and the loss is normalised over both micro-batches' scored tokens together."""
    rows = stream_rows(4, ignored=IGNORED[:4], segments=[0, 0, 1, 1])
    accumulated = one_step_gradients(rows, tmp_path / "ga", per_device_batch=2, accumulation=2)
    assert_same_gradients(accumulated, mean_token_nll_gradients(rows, carried=True))


def test_two_gloo_processes_give_the_gradients_of_one_process_on_the_combined_batch(ddp_run):
    """torchrun, 2 CPU processes, 2 micro-batches of 2 rows each per process (Accelerate shards batch by batch)."""
    folder, rows = ddp_run
    ranks = [torch.load(folder / f"grads-{rank}.pt") for rank in range(2)]
    assert_same_gradients(ranks[0], ranks[1], rtol=0, atol=0)  # all-reduced: the replicas agree exactly
    single = one_step_gradients(rows, folder / "single", per_device_batch=8, accumulation=1)
    assert_same_gradients(ranks[0], single)
    assert_same_gradients(single, mean_token_nll_gradients(rows))


STREAM_BATCH = 2


def test_two_gloo_processes_each_read_their_own_contiguous_streams(ddp_run):
    """With --carry_state, row i of a process's consecutive batches must continue one stream of the token stream
    (train.build_datasets lays the streams out for the number of processes), and no two rows share tokens."""
    folder, _ = ddp_run
    seen = []
    for rank in range(2):
        batches = json.loads((folder / f"streams-{rank}.json").read_text())
        assert len(batches) >= 2
        assert [b["segment_index"] for b in batches] == [[j] * STREAM_BATCH for j in range(len(batches))]
        for i in range(STREAM_BATCH):
            inputs = [t for b in batches for t in b["input_ids"][i]]
            targets = [t for b in batches for t in b["shift_labels"][i]]
            assert inputs == list(range(inputs[0], inputs[0] + len(inputs))), f"rank {rank} row {i} jumps: {inputs}"
            assert targets == [t + 1 for t in inputs]
            seen.append(set(inputs))
    assert len(seen) == 4 and sum(map(len, seen)) == len(set().union(*seen))  # 4 disjoint streams


def stream_batches(output_dir, distributed):
    """The training batches that train.build_datasets (--carry_state) and FWPTrainer's dataloader give this
    process, on documents whose tokens are 0, 1, 2, ... in order."""
    import datasets

    lengths = [37, 5, 60, 18, 41, 29]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    split = datasets.Dataset.from_dict({"input_ids": [list(range(a, a + n)) for a, n in zip(starts, lengths)]})
    tokenized = datasets.DatasetDict({"train": split, "validation": split})
    argv = ["--recipe", "none", "--output_dir", str(output_dir), "--per_device_train_batch_size", str(STREAM_BATCH),
            "--per_device_eval_batch_size", str(STREAM_BATCH), "--report_to", "none", "--dataloader_pin_memory",
            "false", "--carry_state", "true", "--block_size", "8"]
    _, data_args, _, training_args = train.parse_arguments(argv if distributed else argv + ["--use_cpu", "true"])
    train_rows, _, collator, _ = train.build_datasets(tokenized, data_args, training_args)
    trainer = train.FWPTrainer(model=micro_model(vocab_size=256), args=training_args, train_dataset=train_rows,
                               data_collator=collator, carry_state=True)
    return [{key: batch[key].tolist() for key in ("input_ids", "shift_labels", "segment_index")}
            for batch in trainer.get_train_dataloader()]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One torchrun of 2 gloo processes (this file is the worker) for the two tests above."""
    folder = tmp_path_factory.mktemp("ddp")
    rows = stream_rows(8, ignored=IGNORED)
    (folder / "rows.json").write_text(json.dumps(rows))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          __file__, "--ddp-worker", str(folder)], env=env, cwd=folder, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return folder, rows


def _ddp_worker(folder):
    torch.set_num_threads(1)
    folder, rank = Path(folder), os.environ["RANK"]
    rows = json.loads((folder / "rows.json").read_text())
    grads = one_step_gradients(rows, folder / "ddp", per_device_batch=2, accumulation=2, distributed=True)
    torch.save(grads, folder / f"grads-{rank}.pt")
    batches = stream_batches(folder / "streams", distributed=True)
    (folder / f"streams-{rank}.json").write_text(json.dumps(batches))


# ----------------------------------------------------------------------------------------- 4. remote code, auto_map

LOAD_WITHOUT_PACKAGE = r"""
import importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "modeling_fwp" or name.startswith("modeling_fwp."):
            raise ImportError("modeling_fwp is blocked: the folder must load with its own code")

sys.meta_path.insert(0, Block())
try:
    import modeling_fwp
except ImportError:
    pass
else:
    raise SystemExit("modeling_fwp is importable here")
import torch
import transformers

results = {}
for name, (auto, folder) in json.loads(sys.argv[1]).items():
    try:
        model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            out = model(torch.load(sys.argv[2]))
        torch.save(getattr(out, "logits", None) if hasattr(out, "logits") else out.last_hidden_state,
                   f"{sys.argv[3]}/{name}.pt")
        results[name] = {"class": type(model).__name__, "module": type(model).__module__,
                         "file": sys.modules[type(model).__module__].__file__}
    except Exception as error:
        results[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
results["package_imported"] = sorted(n for n in sys.modules if n == "modeling_fwp" or n.startswith("modeling_fwp."))
print("RESULTS " + json.dumps(results))
"""

LOADS = {  # name -> (Auto class, folder)
    "base_through_AutoModel": ("AutoModel", "base"),
    "lm_through_AutoModelForCausalLM": ("AutoModelForCausalLM", "lm"),
    "lm_through_AutoModel": ("AutoModel", "lm"),
}


@pytest.fixture(scope="module")
def loaded_without_package(tmp_path_factory):
    """Saves an FWPModel and an FWPForCausalLM (fresh configs, as a user would), then loads them in a subprocess
    where `import modeling_fwp` fails, from another working directory, without the repository on PYTHONPATH."""
    folder = tmp_path_factory.mktemp("remote")
    config = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2, initializer_range=0.3,
                  use_short_conv=True)
    torch.manual_seed(0)
    originals = {"base": FWPModel(FWPConfig(**config)).eval(), "lm": FWPForCausalLM(FWPConfig(**config)).eval()}
    ids = torch.randint(1, 64, (2, 9))
    torch.save(ids, folder / "ids.pt")
    expected = {}
    for name, model in originals.items():
        model.save_pretrained(folder / name)
        with torch.no_grad():
            out = model(ids)
        expected[name] = out.logits if name == "lm" else out.last_hidden_state
    outputs = folder / "outputs"
    outputs.mkdir()
    work = folder / "elsewhere"
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(folder / "modules"), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    loads = {name: (auto, str(folder / sub)) for name, (auto, sub) in LOADS.items()}
    run = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PACKAGE, json.dumps(loads), str(folder / "ids.pt"),
                          str(outputs)], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULTS ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-5000:]
    results = json.loads(lines[-1][len("RESULTS "):])
    return folder, results, expected


def check_loaded(loaded, name, class_name, folder_name):
    folder, results, expected = loaded
    assert results["package_imported"] == []
    result = results[name]
    assert "error" not in result, result.get("error")
    assert result["class"] == class_name and result["module"].startswith("transformers_modules.")
    # the class comes from the folder's own modeling_fwp.py, which is this package's
    source = (folder / folder_name / "modeling_fwp.py").read_text()
    assert Path(result["file"]).read_text() == source
    assert source == (Path(modeling_fwp.__file__).parent / "modeling_fwp.py").read_text()
    torch.testing.assert_close(torch.load(folder / "outputs" / f"{name}.pt"), expected[folder_name])


def test_saved_base_model_loads_through_automodel_from_its_own_code(loaded_without_package):
    folder = loaded_without_package[0]
    assert json.loads((folder / "base" / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_fwp.FWPModel"
    check_loaded(loaded_without_package, "base_through_AutoModel", "FWPModel", "base")


def test_saved_causal_lm_loads_through_automodelforcausallm_from_its_own_code(loaded_without_package):
    check_loaded(loaded_without_package, "lm_through_AutoModelForCausalLM", "FWPForCausalLM", "lm")


def test_saved_causal_lm_loads_through_automodel_too(loaded_without_package):
    folder, results, _ = loaded_without_package
    assert "AutoModel" in json.loads((folder / "lm" / "config.json").read_text())["auto_map"]
    result = results["lm_through_AutoModel"]
    assert "error" not in result, result.get("error")
    assert result["class"] == "FWPModel" and result["module"].startswith("transformers_modules.")



# ------------------------------------------------------------ 5. what a run is built from: its config and tokenizer
# (these two kill survivors of `scripts/checks/mutation_test.py --all`: a changed default and a tokenizer cache key that
# ignored the text or the vocabulary size passed every other test)

def test_a_pre_norm_override_builds_the_documented_modern_blocks():
    """`--config_overrides block_style=pre_norm` on a post_ln preset gives what FWPConfig documents for pre_norm: the
    per-head output RMSNorm in every layer (use_output_norm defaults on) and RMSNorm around the sub-layers."""
    overrides = "block_style=pre_norm,num_hidden_layers=2,vocab_size=64"
    modern = FWPForCausalLM(train.build_config(train.ModelArguments(preset="tiny", config_overrides=overrides)))
    paper = FWPForCausalLM(train.build_config(train.ModelArguments(preset="tiny", config_overrides="vocab_size=64")))
    assert modern.config.use_output_norm is True and paper.config.use_output_norm is False
    assert all(hasattr(layer.attn, "o_norm") for layer in modern.model.layers)
    assert not any(hasattr(layer.attn, "o_norm") for layer in paper.model.layers)


def test_another_corpus_or_vocabulary_size_trains_its_own_tokenizer(tmp_path, monkeypatch):
    """train.load_tokenizer caches the tokenizer it trains; a run on other text (even as many documents) or with
    another vocab_size must not reuse it: the ids would mean other tokens, or overflow the embedding."""
    monkeypatch.setenv("MODELING_FWP_CACHE", str(tmp_path / "cache"))
    model_args = train.ModelArguments(preset="tiny")
    from transformers import TrainingArguments

    training_args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True)
    corpus = [VALIDATION_TEXT, " ".join(TRAIN_DOCS)]
    other = [" ".join(reversed(TRAIN_DOCS)).upper(), VALIDATION_TEXT.upper()]  # as many documents, other text
    messages = []

    def load(texts, vocab_size):
        return train.load_tokenizer(model_args, training_args, None, texts, vocab_size, messages.append)

    first = load(corpus, 300)
    assert load(corpus, 300).get_vocab() == first.get_vocab() and messages[-1].startswith("Reusing")
    assert load(other, 300).get_vocab() != first.get_vocab() and messages[-1].startswith("Training")
    bigger = load(corpus, 320)
    assert messages[-1].startswith("Training") and len(bigger) == 320 and len(first) == 300


if __name__ == "__main__" and sys.argv[1:2] == ["--ddp-worker"]:
    _ddp_worker(sys.argv[2])
