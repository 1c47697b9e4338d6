"""Data-parallel training through `accelerate launch`: 2 CPU processes over gloo run scripts/train.py for a few steps
on a micro model; the replicas must end bit-identical and the loss must fall."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MICRO = "num_hidden_layers=2,hidden_size=32,num_heads=2,head_dim=16,intermediate_size=64,vocab_size=320,dropout=0"


def _launch(tmp_path, config_file, port_offset, extra_args=()):
    """Runs scripts/train.py on 2 CPU processes through `accelerate launch` for 10 steps on a micro model."""
    import lzma

    from modeling_fwp import data as fwp_data

    with lzma.open(fwp_data.corpus_files()["train"], "rt") as source, open(tmp_path / "train.jsonl", "w") as out:
        for line in list(source)[:6]:
            out.write(json.dumps({"text": json.loads(line)["text"][:5000]}) + "\n")
    with lzma.open(fwp_data.corpus_files()["validation"], "rt") as source, open(tmp_path / "valid.jsonl", "w") as out:
        for line in source:
            out.write(json.dumps({"text": json.loads(line)["text"][:2000]}) + "\n")
    output_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
        "--num_processes", "2", "--main_process_port", str(29500 + port_offset + os.getpid() % 1000),
        str(REPO / "scripts/train.py"), "--recipe", "none", "--config_overrides", MICRO,
        "--train_file", str(tmp_path / "train.jsonl"), "--validation_file", str(tmp_path / "valid.jsonl"),
        "--block_size", "32", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
        "--max_steps", "10", "--learning_rate", "5e-3", "--logging_steps", "1", "--save_strategy", "no",
        "--max_eval_samples", "16", "--report_to", "none", "--disable_tqdm", "true",
        "--dataloader_pin_memory", "false", "--sample_max_new_tokens", "5", "--output_dir", str(output_dir),
        *extra_args,
    ]
    env = {**os.environ, "MODELING_FWP_CACHE": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    state = json.loads((output_dir / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    return run, output_dir, state


@pytest.mark.parametrize("carry_state", [False, True])
def test_two_cpu_processes_end_identical_and_learn(tmp_path, carry_state):
    run, output_dir, state = _launch(tmp_path, REPO / "configuration/accelerate/multi_cpu.yaml", 17 * carry_state,
                                     ["--carry_state", str(carry_state).lower(), "--save_replica_checksum", "true"])
    replicas = [json.loads((output_dir / f"replica-{rank}.json").read_text()) for rank in range(2)]
    assert replicas[0]["sha256"] == replicas[1]["sha256"]  # gradients were all-reduced: identical parameters
    # 10 steps x 2 processes x 4 rows = 80 distinct rows: the epoch counter shows both ranks took their own share.
    import re

    rows = int(re.search(r"(\d+) training rows", run.stdout).group(1))
    assert state["epoch"] * rows == pytest.approx(80, abs=8)  # one process alone would give 40
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["validation_perplexity"] < 320
    assert summary["distributed_type"] == "MULTI_CPU" and summary["processes"] == 2
