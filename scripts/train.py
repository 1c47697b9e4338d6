#!/usr/bin/env python
"""Train or fine-tune a delta-rule Fast Weight Programmer language model with the Hugging Face Trainer.

With no arguments it follows configuration/recipes/tiny_cpu.json: the "tiny" preset on the embedded Shakespeare
corpus, a byte-level BPE trained on its training split, into outputs/fwp-tiny-shakespeare (about 10 minutes on
2 CPU cores). Flags given on the command line override the recipe; `--recipe none` starts from Trainer defaults.

    python scripts/train.py                                            # the README main job
    python scripts/train.py --preset wt103-small --config_overrides "dropout=0.1,num_hidden_layers=8"
    python scripts/train.py --model_name_or_path outputs/fwp-tiny-shakespeare --train_file my.txt \\
        --output_dir outputs/finetuned                                 # fine-tune a saved model
    python scripts/train.py --carry_state true                         # Transformer-XL style state carry-over
    python scripts/train.py --packing true                             # documents packed, boundaries as cu_seqlens
    accelerate launch --config_file configuration/accelerate/multi_gpu_ddp.yaml scripts/train.py ...

Layouts (--packing / --carry_state, see modeling_fwp/data.py): fixed-length blocks of the joined documents
(default); packed document pieces that never share fast-weight state; or contiguous streams whose fast-weight
state is carried, detached, from each segment into the next (truncated backprop through time).

At the end it reports validation perplexity (exp of the mean token loss) with and without state carry-over, and
the unigram baseline; saves model, tokenizer and generation config to output_dir; and prints a generated sample.

Beside it: train_checkpoints.py (the output folder, resuming, the final save) and train_fsdp.py (FSDP2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import SequentialSampler

REPO_ROOT = Path(__file__).resolve().parents[1]
# From a clone without installing, and its helper modules (beside this file) also when run through runpy or a
# wrapper script, which put another folder first on sys.path. Installed from a wheel this file lives in the package
# (modeling_fwp/scripts/, run by fwp-train): then REPO_ROOT is the package folder, which must not go on sys.path.
sys.path[:0] = [str(REPO_ROOT)] * (REPO_ROOT / "modeling_fwp" / "__init__.py").is_file() + [
    str(Path(__file__).resolve().parent)]

import modeling_fwp  # noqa: E402,F401  registers model_type "fwp" with the Auto classes
from modeling_fwp import FWPConfig  # noqa: E402
from modeling_fwp import data as fwp_data  # noqa: E402
from modeling_fwp import presets  # noqa: E402
from modeling_fwp import tokenizer_utils  # noqa: E402
from modeling_fwp.compat import CACHE_NAME, output_cache  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GenerationConfig,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from train_checkpoints import (  # noqa: E402  (scripts/, beside this file)
    check_output_dir,
    check_resume_config,
    parameter_checksum,
    resolve_resume,
    save_final_model,
)
from train_fsdp import fsdp2_sharded, keep_fsdp_state_fp32, restore_model_code  # noqa: E402

RECIPE_DIR = presets.configuration_dir() / "recipes"
DEFAULT_RECIPE = "tiny_cpu"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
DATA_INFO_FILE = "data_info.json"  # the training data, for the model card (modeling_fwp/hub_card.py reads it)
@dataclass
class ModelArguments:
    preset: str = field(default="tiny", metadata={
        "help": "Model preset: a name from configuration/models (without .json) or a path to a config JSON. "
                "Ignored with --model_name_or_path."})
    config_overrides: str | None = field(default=None, metadata={
        "help": 'Comma-separated FWPConfig fields to override, e.g. "num_hidden_layers=2,hidden_size=64,'
                'feature_map=dpfp". Values are read as JSON where possible, else as strings.'})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A saved FWP model (folder or Hub name) to fine-tune instead of training a preset from scratch."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "aliases": ["--tokenizer"],
        "help": "Any tokenizer (Hub name or folder). Default: the one saved with the checkpoint resumed from "
                "or with --model_name_or_path (a model folder without one is refused: a new tokenizer would give its "
                "ids other meanings), else one trained on the training split with the model's vocab_size (cached), "
                "see --tokenizer_type."})
    tokenizer_type: str = field(default="bpe", metadata={
        "help": "Kind of tokenizer trained when none is given: 'bpe' (byte-level BPE) or 'word' (whitespace "
                "words, the paper's WikiText-103 setting: perplexity per word)."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset name (default: embedded corpus)."})
    dataset_config: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration name."})
    train_file: str | None = field(default=None, metadata={"help": "Local .txt or .json/.jsonl training file."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file (same format)."})
    test_file: str | None = field(default=None, metadata={"help": "Local test file (same format)."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text of each document."})
    text_sample_by: str = field(default="document", metadata={
        "help": "For .txt files: what counts as a document: 'document' (a whole file), 'paragraph' or 'line'."})
    validation_split_percentage: float = field(default=5.0, metadata={
        "help": "Without a validation split, the percentage of training documents held out for validation."})
    block_size: int = field(default=256, metadata={
        "help": "Tokens per training block, per packed piece, or per carried segment."})
    packing: bool = field(default=False, metadata={
        "help": "Pack document pieces without padding (DataCollatorWithFlattening); the model gets the boundaries "
                "as cu_seq_lens_q and starts every piece from an empty fast-weight state."})
    carry_state: bool = field(default=False, metadata={
        "help": "Carry each layer's fast-weight state (detached) from one segment of a contiguous stream into the "
                "next, in training and evaluation (batch row i always continues stream i)."})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "Use at most this many training blocks/pieces (streams: this many x block_size tokens)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "The same for validation."})
    add_eos: bool = field(default=True, metadata={
        "help": "End every document with the EOS token. Turn off for datasets whose rows are the lines of one "
                "running text (e.g. wikitext with a BPE tokenizer)."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})


@dataclass
class RunArguments:
    recipe: str = field(default=DEFAULT_RECIPE, metadata={
        "help": "Training recipe from configuration/recipes (name or JSON path) giving defaults for any flag; "
                "'none' for none. Command-line flags override it."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Allow writing into an output_dir that already holds a model or checkpoints."})
    sample_prompt: str = field(default="", metadata={"help": "Prompt of the sample printed at the end."})
    sample_max_new_tokens: int = field(default=200, metadata={"help": "Length of that sample in tokens."})
    # Read as text so that "none" can lift a recipe's limit; parse_arguments turns it into a float (or None).
    max_train_minutes: str | None = field(default=None, metadata={
        "help": "Stop training (then evaluate and save as usual) once this many minutes of training have passed, "
                "even before max_steps: a wall-clock budget for slow or busy machines. The learning rate then warms "
                "up and decays (cosine) over whichever runs out first, steps or time (replaces lr_scheduler_type). "
                "A number of minutes > 0 (0 is refused, not read as 'no limit'); 'none', or no flag and no recipe "
                "value, for no limit."})
    torch_num_threads: int | None = field(default=None, metadata={
        "help": "CPU threads per process for PyTorch (default: PyTorch's choice, all cores). On a machine busy with "
                "other jobs, 1 avoids threads waiting on each other."})
    save_replica_checksum: bool = field(default=False, metadata={
        "help": "Every process writes a checksum of its parameters to output_dir/replica-<rank>.json (to check "
                "that data-parallel replicas end identical)."})


# --------------------------------------------------------------------------------------------- argument handling

def recipe_to_argv(recipe: str) -> list[str]:
    """A recipe (name in configuration/recipes or JSON path) as command-line flags, so later flags override it."""
    if recipe.lower() == "none":
        return []
    path = Path(recipe) if recipe.endswith(".json") else RECIPE_DIR / f"{recipe}.json"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPE_DIR.glob("*.json"))
        raise ValueError(f"--recipe {recipe!r}: no such recipe; known recipes: {', '.join(known)}, 'none', or a path "
                         "to a JSON file.")
    argv = []
    for key, value in json.loads(path.read_text()).items():
        if key.startswith("_") or value is None:  # "_comment" keys document the recipe
            continue
        if isinstance(value, bool):
            value = [str(value).lower()]
        elif isinstance(value, list):
            value = [str(v) for v in value]
        elif isinstance(value, dict):
            value = [json.dumps(value)]
        else:
            value = [str(value)]
        argv += [f"--{key}", *value]
    return argv


def parse_arguments(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=DEFAULT_RECIPE)
    pre.add_argument("--output_dir", default=None)
    known, _ = pre.parse_known_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() and "--use_cpu" not in argv:
        # Several processes and no GPU (configuration/accelerate/multi_cpu.yaml): without use_cpu, Accelerate would
        # leave every process on its own instead of joining them over gloo.
        argv.append("--use_cpu=true")
    parser = HfArgumentParser((ModelArguments, DataArguments, RunArguments, TrainingArguments))
    model_args, data_args, run_args, training_args = parser.parse_args_into_dataclasses(
        args=recipe_to_argv(known.recipe) + argv)
    if known.output_dir is None:  # recipes name no output_dir: it follows the model and the data
        model_name = Path(model_args.model_name_or_path or model_args.preset).name.removesuffix(".json")
        data_name = Path(data_args.dataset_name or data_args.train_file or fwp_data.CORPUS_NAME).name.split(".")[0]
        training_args.output_dir = str(Path("outputs") / f"fwp-{model_name}-{data_name}")
    if data_args.packing and data_args.carry_state:
        raise ValueError("--packing and --carry_state exclude each other: packing resets the state at every "
                         "document, carry-over keeps it across segments.")
    run_args.max_train_minutes = parse_minutes(run_args.max_train_minutes)
    if model_args.model_name_or_path and model_args.model_name_or_path.startswith("~"):
        model_args.model_name_or_path = os.path.expanduser(model_args.model_name_or_path)
    return model_args, data_args, run_args, training_args


def parse_minutes(text) -> float | None:
    """--max_train_minutes: a number > 0, or None for no limit ('none' or absent)."""
    if text is None or str(text).strip().lower() == "none":
        return None
    try:
        minutes = float(text)
    except ValueError:
        minutes = math.nan
    if not (math.isfinite(minutes) and minutes > 0):
        raise ValueError(f"--max_train_minutes={text} is not a time budget: it must be a number of minutes > 0; omit "
                         "the flag for no limit (or pass 'none' to lift a recipe's limit).")
    return minutes


def looks_like_local_path(name: str) -> bool:
    """Whether a --model_name_or_path that is not an existing folder must have meant one: it is written like a path
    (./x, ../x, /x, ~/x, x/, C:\\x, a/b/c) or is no valid Hub model id. "user/model" and "gpt2" are Hub ids."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.endswith("/") or re.match(r"^[A-Za-z]:", name):
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def build_config(model_args: ModelArguments):
    overrides = presets.parse_config_overrides(model_args.config_overrides)
    if model_args.model_name_or_path:
        from transformers import AutoConfig

        path = model_args.model_name_or_path
        if Path(path).exists():
            if not (Path(path) / "config.json").is_file():
                raise FileNotFoundError(f"--model_name_or_path {path!r} holds no config.json: not a saved model "
                                        "folder.")
            config = AutoConfig.from_pretrained(path)
        elif looks_like_local_path(path):
            raise FileNotFoundError(f"--model_name_or_path {path!r}: no such local folder (and, written like this, "
                                    "it is no Hub model id either).")
        else:
            try:
                config = AutoConfig.from_pretrained(path)
            except OSError as error:
                reason = " ".join(str(error).split())[:300]
                raise OSError(f"--model_name_or_path {path!r}: there is no local folder of that name, and loading it "
                              f"as a Hub model id failed: {reason}") from error
        if config.model_type != FWPConfig.model_type:
            raise ValueError(f"--model_name_or_path {path!r} is a {config.model_type!r} model, not an FWP model.")
        values = {**presets.without_bookkeeping(config.to_dict()), **overrides}
    else:
        values = {**presets.preset_fields(model_args.preset), **overrides}
    return FWPConfig(**values)  # validates every field


# ------------------------------------------------------------------------------------------------------- trainer

class FWPTrainer(Trainer):
    """Trainer for FWP language models.

    - Reports `<prefix>_perplexity = exp(<prefix>_loss)` next to every evaluation loss (the mean token negative
      log-likelihood, so this is the usual token-level perplexity; no Hub metric is fetched).
    - With carry_state, batches from `data.contiguous_streams` keep their order, and each segment starts from the
      previous segment's fast-weight state (detached: gradients stay inside the segment, as in Transformer-XL).
      A batch whose segment_index does not follow the last one (a new epoch, a new evaluation, a resume) starts
      from empty state. Training and evaluation keep separate states.
    """

    STREAM_COLUMNS = ("shift_labels", "segment_index")

    def __init__(self, *args, carry_state: bool = False, time_budget: TimeBudget | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.carry_state = carry_state
        self._carried = {}  # model.training -> (segment_index, detached FWPCache)
        self.time_budget = time_budget
        if time_budget is not None:
            self.add_callback(time_budget)
        keep_fsdp_state_fp32(self.accelerator)

    def save_model(self, output_dir=None, _internal_call=False):
        """Trainer.save_model, plus what it leaves out under FSDP (configuration/accelerate/fsdp*.yaml):
        - a save outside a checkpoint (the final model) always gathers the full weights: with fsdp_state_dict_type
          SHARDED_STATE_DICT the Trainer would write no model at all;
        - a SHARDED_STATE_DICT checkpoint (its weights: pytorch_model_fsdp_0/, beside it) also gets config.json,
          the generation config and the tokenizer, so --resume_from_checkpoint can check its model and reuse them;
        - the model's own code files and auto_map replace the torch files that save_pretrained copied (FSDP2
          swaps the model's class for a subclass defined in torch, FSDPFWPForCausalLM)."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if plugin is None:
            return super().save_model(output_dir, _internal_call=_internal_call)
        from torch.distributed.fsdp import StateDictType

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        sharded, previous = "FULL_STATE_DICT" not in str(plugin.state_dict_type), plugin.state_dict_type
        if sharded and not _internal_call:
            plugin.state_dict_type = StateDictType.FULL_STATE_DICT  # what Trainer.save_model checks
        try:
            super().save_model(output_dir, _internal_call=_internal_call)
        finally:
            plugin.state_dict_type = previous
        if self.args.should_save:
            model = self.accelerator.unwrap_model(self.model)
            if sharded and _internal_call:
                os.makedirs(output_dir, exist_ok=True)
                model.config.save_pretrained(output_dir)
                model.generation_config.save_pretrained(output_dir)
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(output_dir)
            restore_model_code(model, output_dir)

    def create_scheduler(self, num_training_steps, optimizer=None):
        """With a time budget: linear warm-up, then a cosine decay over whichever runs out first, the steps or the
        time, so the learning rate reaches 0 exactly when training stops (replaces lr_scheduler_type)."""
        if self.time_budget is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        warmup = self.args.get_warmup_steps(num_training_steps)
        budget = self.time_budget

        def factor(step):
            if step < warmup:
                return step / max(1, warmup)
            progress = max((step - warmup) / max(1, num_training_steps - warmup), budget.elapsed_fraction())
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns += [c for c in self.STREAM_COLUMNS if c not in self._signature_columns]

    def _get_train_sampler(self, train_dataset=None):
        if self.carry_state:  # stream order is the point: row i of batch j+1 continues row i of batch j
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "segment_index" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        segment = int(inputs.pop("segment_index")[0])
        targets = inputs.pop("shift_labels")
        inputs.pop("labels", None)  # = shift_labels; the loss is computed here, without the model's shift
        past_segment, cache = self._carried.get(model.training, (None, None))
        if not self.carry_state or past_segment is None or segment != past_segment + 1:
            cache = None
        outputs = model(**inputs, cache=cache, use_cache=self.carry_state)
        if self.carry_state:
            self._carried[model.training] = (segment, output_cache(outputs).detach())
        else:
            self._carried.pop(model.training, None)
        outputs[CACHE_NAME] = None  # nothing downstream (e.g. prediction gathering) holds on to the state
        nll = F.cross_entropy(outputs.logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                              reduction="sum")
        if num_items_in_batch is not None:  # normalised over the whole accumulated (and gathered) batch
            loss = nll / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
            self.loss_is_scaled_for_ga = True
        else:
            loss = nll / targets.ne(-100).sum().clamp(min=1)
            self.loss_is_scaled_for_ga = False
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        for key in [k for k in logs if k.endswith("_loss") and isinstance(logs[k], (int, float))]:
            logs[key[: -len("loss")] + "perplexity"] = math.exp(min(logs[key], 100.0))
        super().log(logs, *args, **kwargs)


class TimeBudget(TrainerCallback):
    """Ends training once `minutes` have passed (checked after every step); the run then evaluates and saves.
    FWPTrainer also anneals the learning rate by this clock, so a run cut short by time still ends annealed."""

    def __init__(self, minutes: float):
        if not minutes > 0:
            raise ValueError(f"--max_train_minutes={minutes} must be > 0.")
        self.seconds = 60.0 * minutes
        self.start = None

    def elapsed_fraction(self) -> float:
        return 0.0 if self.start is None else (time.monotonic() - self.start) / self.seconds

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.elapsed_fraction() >= 1.0 and not control.should_training_stop:
            control.should_training_stop = True
            if state.is_world_process_zero:
                print(f"\nTime budget of {self.seconds / 60:g} minutes reached at step {state.global_step} of "
                      f"{state.max_steps}: stopping training.", flush=True)


# ---------------------------------------------------------------------------------------------------- main steps

def has_tokenizer(folder) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def check_tokenizer_source(model_args, resume) -> None:
    """Fine-tuning needs the tokenizer the model was trained with: refuses a model folder that has none (a tokenizer
    trained now would give the model's token ids other meanings) unless --tokenizer names one."""
    path = model_args.model_name_or_path
    if model_args.tokenizer_name_or_path or not path or not Path(path).is_dir() or has_tokenizer(path):
        return
    if resume and has_tokenizer(resume):  # the tokenizer the interrupted run trained with
        return
    raise ValueError(
        f"--model_name_or_path {path!r} holds no tokenizer (no {' or '.join(TOKENIZER_FILES)}), and fine-tuning "
        "needs the one the model was trained with: a tokenizer trained now would give its token ids other meanings. "
        "Pass it with --tokenizer NAME_OR_PATH (e.g. the output_dir of the run that trained the model).")


def load_tokenizer(model_args, training_args, resume, train_texts, vocab_size, log):
    if model_args.tokenizer_name_or_path:
        return tokenizer_utils.load_tokenizer(model_args.tokenizer_name_or_path)
    # A resumed run keeps the tokenizer it trained with; a fine-tuned model the one it was trained with.
    for folder in (resume, model_args.model_name_or_path, resume and training_args.output_dir):
        if folder and Path(folder).is_dir() and has_tokenizer(folder):
            log(f"Using the tokenizer saved in {folder}")
            return tokenizer_utils.load_tokenizer(folder)
    name = model_args.model_name_or_path
    if name and not Path(name).exists():  # a Hub model: its own tokenizer
        try:
            return tokenizer_utils.load_tokenizer(name)
        except (OSError, ValueError) as error:
            reason = " ".join(str(error).split())[:300]
            raise ValueError(f"--model_name_or_path {name!r}: its tokenizer could not be loaded ({reason}); pass the "
                             "tokenizer the model was trained with as --tokenizer NAME_OR_PATH.") from error
    return tokenizer_utils.load_or_train_tokenizer(train_texts, vocab_size=vocab_size, log=log,
                                                   kind=model_args.tokenizer_type)


def build_datasets(tokenized, data_args, training_args):
    """(train, eval, collator) for the chosen layout; plus the validation streams for the carry-over report."""
    def cap(dataset, limit):
        return dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset

    block = data_args.block_size
    streams = {}
    for split, batch, limit in (("train", training_args.per_device_train_batch_size, data_args.max_train_samples),
                                ("validation", training_args.per_device_eval_batch_size, data_args.max_eval_samples)):
        if split == "train" and not data_args.carry_state:
            continue
        streams[split] = fwp_data.contiguous_streams(
            tokenized[split], block, streams_per_process=batch, world_size=training_args.world_size,
            max_tokens=None if limit is None else limit * block)
    if data_args.carry_state:
        return streams["train"], streams["validation"], default_data_collator, streams["validation"]
    if data_args.packing:
        pieces = fwp_data.split_into_pieces(tokenized, block, num_proc=data_args.preprocessing_num_workers)
        return (cap(pieces["train"], data_args.max_train_samples), cap(pieces["validation"], data_args.max_eval_samples),
                fwp_data.packing_collator(), streams["validation"])
    blocks = fwp_data.group_into_blocks(tokenized, block, num_proc=data_args.preprocessing_num_workers)
    if len(blocks["train"]) == 0 or len(blocks["validation"]) == 0:
        raise ValueError(f"block_size={block} is longer than the training or validation text; lower --block_size.")
    return (cap(blocks["train"], data_args.max_train_samples), cap(blocks["validation"], data_args.max_eval_samples),
            default_data_collator, streams["validation"])


def generate_sample(model, tokenizer, prompt: str, max_new_tokens: int, seed: int) -> str:
    start = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = start + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("--sample_prompt is empty and the tokenizer has no BOS token to start from.")
    model.eval()
    set_seed(seed)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=max_new_tokens,
                             synced_gpus=True if fsdp2_sharded(model) else None)
    return tokenizer.decode(out[0, len(start):], skip_special_tokens=True)


def perplexity_report(summary: dict, unigram: float, block_size: int, carry_state: bool) -> str:
    """The closing lines: validation perplexity against the unigram baseline, with and without the fast-weight state
    carried from one segment into the next, and why carrying it may not help a model not trained with it."""
    report = (f"Validation perplexity: {summary['validation_perplexity']:.2f} "
              f"(unigram baseline {unigram:.2f}; on contiguous segments of {block_size}: "
              f"{summary['validation_perplexity_no_carry_over']:.2f} without, "
              f"{summary['validation_perplexity_carry_over']:.2f} with fast-weight state carried over)")
    if carry_state:
        return report + "\nThe model was trained with the state carried over (--carry_state), as it is evaluated."
    return report + (
        "\nThis model was trained without carrying the state (each segment starts from an empty one), so a carried "
        "state is input it never learned to use: it can score worse with it than without. --carry_state true trains "
        "with it (the paper's Table 4).")


def describe_tokenizer(model_args, tokenizer) -> str:
    """The tokenizer in words, for data_info.json (the model card)."""
    size = f"vocabulary {len(tokenizer)}"
    if model_args.tokenizer_name_or_path:
        return f"{model_args.tokenizer_name_or_path} ({size})"
    if model_args.model_name_or_path:
        return f"the tokenizer of {model_args.model_name_or_path} ({size})"
    kind = "byte-level BPE" if model_args.tokenizer_type == "bpe" else "word-level"
    return f"{kind}, trained on the training split ({size})"


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, run_args, training_args = parse_arguments(argv)
    main_process = training_args.process_index == 0

    def log(message):
        if main_process:
            print(message, flush=True)

    # Every check that can refuse the run happens here, before anything is written.
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir, log)
    check_output_dir(training_args.output_dir, run_args.overwrite_output_dir, resume)
    config = build_config(model_args)
    check_tokenizer_source(model_args, resume)

    if run_args.torch_num_threads:
        torch.set_num_threads(run_args.torch_num_threads)
    set_seed(training_args.seed)
    with training_args.main_process_first(desc="loading the data"):
        raw = fwp_data.load_raw_datasets(
            data_args.dataset_name, data_args.dataset_config, data_args.train_file, data_args.validation_file,
            data_args.test_file, data_args.text_column, data_args.text_sample_by,
            data_args.validation_split_percentage, seed=training_args.seed)
        tokenizer = load_tokenizer(model_args, training_args, resume, raw["train"][data_args.text_column],
                                   config.vocab_size, log)
    tokenizer_utils.check_vocab_fits(tokenizer, config.vocab_size)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    if resume:
        check_resume_config(config, resume)

    with training_args.main_process_first(desc="tokenizing"):
        tokenized = fwp_data.tokenize_documents(raw, tokenizer, data_args.text_column,
                                                num_proc=data_args.preprocessing_num_workers,
                                                add_eos=data_args.add_eos)
    train_dataset, eval_dataset, collator, eval_streams = build_datasets(tokenized, data_args, training_args)
    # The baseline scores exactly the validation tokens that the stream evaluations score.
    scored = np.asarray(eval_streams["shift_labels"]).ravel()
    train_stream = fwp_data.token_stream(tokenized["train"])
    unigram = fwp_data.unigram_perplexity(train_stream, scored, config.vocab_size)
    log(f"Unigram baseline perplexity of the validation split ({scored.size} tokens): {unigram:.2f}")

    if model_args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, config=config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        do_sample=True, temperature=0.8, top_k=50, max_new_tokens=run_args.sample_max_new_tokens)
    log(f"Model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{len(train_dataset)} training rows of <= {data_args.block_size} tokens, layout "
        f"{'carried streams' if data_args.carry_state else 'packed pieces' if data_args.packing else 'blocks'}")

    use_cache = config.use_cache  # the Trainer sets it to TrainingArguments.use_cache (False) for training
    time_budget = TimeBudget(run_args.max_train_minutes) if run_args.max_train_minutes is not None else None
    trainer = FWPTrainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         data_collator=collator, processing_class=tokenizer, carry_state=data_args.carry_state,
                         time_budget=time_budget)
    result = trainer.train(resume_from_checkpoint=resume)
    save_final_model(trainer, training_args.output_dir, use_cache)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()

    metrics = trainer.evaluate()  # the layout trained on (with carry-over when --carry_state)
    # The same validation streams with and without carry-over: what the carried state is worth.
    if not data_args.carry_state:
        trainer.carry_state = True
        metrics.update(trainer.evaluate(eval_streams, metric_key_prefix="eval_carry"))
    trainer.carry_state = False
    metrics.update(trainer.evaluate(eval_streams, metric_key_prefix="eval_nocarry"))
    trainer.carry_state = data_args.carry_state
    metrics["unigram_perplexity"] = unigram
    trainer.save_metrics("eval", metrics)

    summary = {
        "validation_perplexity": metrics["eval_perplexity"],
        "validation_perplexity_carry_over": metrics.get("eval_carry_perplexity", metrics["eval_perplexity"]),
        "validation_perplexity_no_carry_over": metrics["eval_nocarry_perplexity"],
        "unigram_perplexity": unigram,
        "distributed_type": trainer.accelerator.distributed_type.value,
        "processes": trainer.accelerator.num_processes,
    }
    if run_args.save_replica_checksum:
        checksum = parameter_checksum(trainer.accelerator.unwrap_model(trainer.model))
        Path(training_args.output_dir, f"replica-{training_args.process_index}.json").write_text(json.dumps(checksum))
    # Every process samples (same seed, same tokens): a sharded (FSDP) model needs all of them in each forward.
    summary["sample"] = generate_sample(trainer.accelerator.unwrap_model(trainer.model), tokenizer,
                                        run_args.sample_prompt, run_args.sample_max_new_tokens, training_args.seed)
    if main_process:
        Path(training_args.output_dir, "train_summary.json").write_text(json.dumps(summary, indent=1))
        data_info = {**fwp_data.describe_source(data_args.dataset_name, data_args.dataset_config, data_args.train_file,
                                                data_args.validation_file, data_args.test_file),
                     "block_size": data_args.block_size, "train_tokens": int(train_stream.size),
                     "tokenizer": describe_tokenizer(model_args, tokenizer)}
        Path(training_args.output_dir, DATA_INFO_FILE).write_text(json.dumps(data_info, indent=1))
        log("\n" + perplexity_report(summary, unigram, data_args.block_size, data_args.carry_state))
        log(f"Saved model, tokenizer and generation config to {training_args.output_dir}")
        log(f"Sample:\n{summary['sample']}")
    return summary


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # under `accelerate launch`: every rank leaves the group before
        torch.distributed.destroy_process_group()  # exiting, not in gloo/NCCL teardown at interpreter exit
