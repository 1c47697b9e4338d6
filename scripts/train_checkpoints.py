"""The folders scripts/train.py reads and writes: the output folder it refuses to train over, the checkpoints it
resumes from (complete ones only, holding the model this run would train), and the final save, moved into place
whole (and the replica checksum a run can leave beside it). Kept apart from train.py's arguments, data and
Trainer so each stays short."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import torch
from transformers import Trainer

from modeling_fwp import FWPConfig, presets
from modeling_fwp.files import give_umask_modes, move_files_into

MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "tokenizer.json", "tokenizer_config.json", "trainer_state.json")
# Weight files a save may write (one file or shards); those of an older save that a new one lacks are removed.
WEIGHT_FILES = re.compile(r"^(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|"
                          r"pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json)$")
# Keys of a saved config.json that do not change the model a checkpoint holds: written by save_pretrained, set by
# the Trainer for training (use_cache), or chosen at load time (dtype).
CONFIG_BOOKKEEPING = ("transformers_version", "architectures", "auto_map", "dtype", "torch_dtype", "use_cache")


def check_output_dir(output_dir: str, overwrite: bool, resume) -> None:
    """Refuses, before anything is written, to train into a folder that already holds a model or checkpoints."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir {output_dir!r} exists and is not a folder.")
    if not path.is_dir() or overwrite or resume:
        return
    found = [name for name in MODEL_FILES if (path / name).exists()]
    found += sorted(p.name for p in path.glob("checkpoint-*"))
    if found:
        raise ValueError(f"output_dir {output_dir!r} already holds a model ({', '.join(found[:4])}); pass "
                         "--overwrite_output_dir to train over it, --resume_from_checkpoint to continue it, or "
                         "choose another --output_dir.")


def _safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is not whole (None if its header parses and the file is as long as it says)."""
    try:
        with open(path, "rb") as file:
            header_size = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(header_size)) if 0 < header_size < 100_000_000 else None
    except (OSError, ValueError):
        header = None
    if not isinstance(header, dict):
        return f"{path.name} has no valid header"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if path.stat().st_size < 8 + header_size + end:
        return f"{path.name} is cut short"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """What a checkpoint-N folder lacks to be resumed from, or None when it is complete.

    Trainer._save_checkpoint writes the model (config.json, weights, tokenizer), then optimizer, scheduler, scaler
    and RNG state, and trainer_state.json last: a save that was cut short lacks trainer_state.json (or holds a file
    cut short, when the filesystem wrote the files out of order).
    """
    folder = Path(folder)
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json, which the Trainer writes last"
    for name in ("trainer_state.json", "config.json"):
        try:
            json.loads((folder / name).read_text())
        except FileNotFoundError:
            return f"no {name}"
        except ValueError:
            return f"{name} is cut short or not JSON"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError):
            return f"{index.name} is cut short or not a weight index"
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    elif (folder / "pytorch_model.bin").is_file() or any(folder.glob("pytorch_model_fsdp_*")) or any(
            folder.glob("global_step*")):  # torch.save / FSDP sharded / DeepSpeed layouts
        shards = []
    else:
        return "no model weights (model.safetensors)"
    for name in shards:
        if not (folder / name).is_file():
            return f"no {name}"
        problem = _safetensors_problem(folder / name)
        if problem:
            return problem
    # torch.save writes zip archives, whose directory comes last: a file cut short is no zip file.
    for path in [folder / "pytorch_model.bin", folder / "optimizer.pt", folder / "scheduler.pt",
                 folder / "scaler.pt", *sorted(folder.glob("rng_state*.pth"))]:
        if path.is_file() and not zipfile.is_zipfile(path):
            return f"{path.name} is cut short"
    return None


def resolve_resume(value: str | None, output_dir: str, log=print):
    """--resume_from_checkpoint: 'true'/'last' -> the newest complete checkpoint in output_dir (incomplete ones, e.g.
    of a run killed while saving, are skipped with a message), or a checkpoint folder (refused when incomplete)."""
    if value is None or value.lower() in ("false", "none", ""):
        return None
    if value.lower() in ("true", "last"):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
        folders = sorted((p for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                          if pattern.match(p.name) and p.is_dir()),
                         key=lambda p: int(pattern.match(p.name).group(1)), reverse=True) \
            if Path(output_dir).is_dir() else []
        if not folders:
            raise ValueError(f"--resume_from_checkpoint {value}: output_dir {output_dir!r} holds no checkpoint-* "
                             "folder to resume from.")
        skipped = []
        for folder in folders:
            problem = checkpoint_problem(folder)
            if problem is None:
                return str(folder)
            skipped.append(f"{folder.name} ({problem})")
            log(f"Skipping {folder}: incomplete checkpoint ({problem}), probably cut short while saving; a save "
                f"at step {pattern.match(folder.name).group(1)} writes it again.")
        raise ValueError(f"--resume_from_checkpoint {value}: output_dir {output_dir!r} holds no complete checkpoint "
                         f"to resume from: {'; '.join(skipped)}.")
    if not Path(value).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {value!r}: no such checkpoint folder.")
    problem = checkpoint_problem(Path(value))
    if problem:
        raise ValueError(f"--resume_from_checkpoint {value!r} is an incomplete checkpoint ({problem}), probably cut "
                         "short while saving; pass an earlier checkpoint, or 'last' for the newest complete one.")
    return value


def check_resume_config(config: FWPConfig, checkpoint: str) -> None:
    """Refuses to resume a checkpoint as another model than the one it holds (e.g. with other --config_overrides):
    the weights would load (same shapes) and train on as a different model, silently."""
    saved_fields = presets.without_bookkeeping(json.loads((Path(checkpoint) / "config.json").read_text()))
    saved, current = FWPConfig(**saved_fields).to_dict(), config.to_dict()
    differ = sorted(key for key in set(saved) | set(current)
                    if not key.startswith("_") and key not in CONFIG_BOOKKEEPING and saved.get(key) != current.get(key))
    if differ:
        changes = ", ".join(f"{key} (checkpoint {saved.get(key)!r}, this run {current.get(key)!r})" for key in differ)
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint}: the checkpoint holds another model than this run would train; "
            f"its config.json differs in {changes}. Resume with the --preset / --config_overrides (and tokenizer) of "
            f"the run that saved it, or train the changed model from its weights in a new run: --model_name_or_path "
            f"{checkpoint} with another --output_dir.")


def parameter_checksum(model) -> dict:
    digest = hashlib.sha256()
    total = 0.0
    for name, tensor in sorted(model.state_dict().items()):
        values = tensor.detach().to("cpu", torch.float64).contiguous()
        digest.update(name.encode())
        digest.update(values.numpy().tobytes())
        total += float(values.sum())
    return {"sha256": digest.hexdigest(), "sum": total}


def save_final_model(trainer: Trainer, output_dir: str, use_cache: bool) -> None:
    """Trainer.save_model into a temporary folder beside output_dir, then moved into place (config.json last), so a
    run killed while saving leaves output_dir with its previous model or with none, never half of one. Checkpoints
    and other files in output_dir stay where they are. Every process calls this (a sharded model is gathered)."""
    target = Path(output_dir).resolve()
    staging = target.parent / f".{target.name}.saving"  # the same name in every process
    model_config = trainer.accelerator.unwrap_model(trainer.model).config
    training_use_cache, model_config.use_cache = model_config.use_cache, use_cache  # the Trainer turned it off
    writer = trainer.args.should_save
    try:
        if writer:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
        trainer.save_model(str(staging))  # model, tokenizer (processing_class), generation config, training args
        if writer:
            if target.is_dir():
                stale = [p.name for p in target.iterdir() if WEIGHT_FILES.match(p.name)]
                move_files_into(staging, target, commit="config.json", stale=stale)
            else:
                give_umask_modes(staging)  # as move_files_into does (safetensors writes 0600)
                os.rename(staging, target)
    except BaseException:
        if writer:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        model_config.use_cache = training_use_cache
    trainer.accelerator.wait_for_everyone()
