"""Distributed training on 2 CPU processes over gloo, started as on GPUs with `accelerate launch` (issue 17).

- DDP (configuration/accelerate/multi_cpu.yaml): a run resumed from its middle checkpoint logs the same losses, to
  the bit, as the uninterrupted run, and ends with the same parameters.
- FSDP2 (fsdp.yaml, fsdp_full_state.yaml): training, sharded or full checkpoints, an exact resume, and a final folder
  that loads with a plain single-process `from_pretrained` (and as remote code without the package); the fast-weight
  state stays fp32 under the configs' bf16 mixed precision (the multi-node test).
- Multi-node (multi_node_ddp.yaml, multi_node_fsdp.yaml): two launchers, machine_rank 0 and 1, meet at
  127.0.0.1 as two hosts would.
- The ~1.3B preset's parameter count, on the meta device; scripts/bench/bench_train.py under DDP and FSDP.

Why the FSDP tests need a shim (FSDP_ON_CPU below). Accelerate 1.15 runs FSDP only on accelerator devices; on CPU
processes it gives no error, it silently trains without sharding:
  - `accelerate launch --config_file configuration/accelerate/fsdp.yaml --cpu` (or `--use_fsdp --cpu`) takes the
    simple launcher: one process, DistributedType.NO, no FSDP settings.
  - Without --cpu, torchrun starts the processes with the FSDP settings in their environment (ACCELERATE_USE_FSDP=true,
    FSDP_VERSION=2, FSDP_TRANSFORMER_CLS_TO_WRAP=FWPBlock, ...), and the Accelerator builds its
    FullyShardedDataParallelPlugin from them, but AcceleratorState makes CPU processes MULTI_CPU (scripts/train.py
    asks for use_cpu; without it they are DistributedType.NO, each training alone) and attaches the FSDP plugin only
    in its branch for MULTI_GPU-type states (accelerate/state.py, "self.distributed_type = DistributedType.FSDP").
    Trainer.is_fsdp_enabled is then False: DDP over gloo, with train_summary.json's distributed_type "MULTI_CPU".
torch itself runs FSDP2 (fully_shard) on CPU tensors over gloo. The shim keeps the plugin that Accelerate built from
the launch config and gives the state DistributedType.FSDP, as Accelerate does on GPUs; everything after that is
the code GPUs run (Accelerate's fully_shard of every FWPBlock with its mixed precision policy, the Trainer's FSDP
save, load and resume paths, torch.distributed.checkpoint), over gloo instead of NCCL.
"""

import json
import lzma
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configuration" / "accelerate"
DEPRECATION = re.compile(r".*(?:FutureWarning|DeprecationWarning|deprecat).*", re.IGNORECASE)
MICRO = "num_hidden_layers=2,hidden_size=32,num_heads=2,head_dim=16,intermediate_size=64,vocab_size=320,dropout=0"

FSDP_ON_CPU = '''
"""Runs the script argv[1:] with Accelerate's FSDP plugin kept on CPU processes (see tests/test_distributed.py)."""
import inspect
import runpy
import sys

import accelerate.state
from accelerate.utils import DistributedType

init = accelerate.state.AcceleratorState.__init__


def init_keeping_fsdp(self, *args, **kwargs):
    init(self, *args, **kwargs)
    plugin = inspect.signature(init).bind(self, *args, **kwargs).arguments.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP  # what AcceleratorState sets for GPU processes
        if self._mixed_precision != "no":
            plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = plugin
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


accelerate.state.AcceleratorState.__init__ = init_keeping_fsdp
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''

# Run by every process of the multi-node test: the rendezvous, an all-reduce, and under FSDP with mixed_precision
# bf16 the dtypes of a forward whose fast-weight state is carried in and out of every sharded block.
PROBE = '''
import json, os, sys
import torch
sys.path.insert(0, sys.argv[1])
import train_fsdp  # scripts/train_fsdp.py, as train.py uses it
from accelerate import Accelerator
from modeling_fwp import FWPForCausalLM, load_preset
from modeling_fwp.compat import output_cache

accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = FWPForCausalLM(load_preset("deltanet-370m", **json.loads(sys.argv[2])))
train_fsdp.keep_fsdp_state_fp32(accelerator)
model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(accelerator.process_index))
with torch.no_grad():
    first = model(ids[:, :12], use_cache=True)
    second = model(ids[:, 12:], cache=output_cache(first), use_cache=True)
loss = model(ids, labels=ids, use_cache=False).loss
accelerator.backward(loss)
optimizer.step()
total = accelerator.reduce(torch.tensor([accelerator.process_index + 1.0]), reduction="sum").item()
state = output_cache(second).layers[0].fast_weights
print("PROBE " + json.dumps({
    "rank": accelerator.process_index, "world": accelerator.num_processes, "type": accelerator.distributed_type.value,
    "node": os.environ.get("GROUP_RANK"), "master": os.environ.get("MASTER_ADDR"), "sum": total,
    "sharded": type(next(model.parameters())).__name__ == "DTensor", "param_dtype": str(next(model.parameters()).dtype),
    "logits_dtype": str(second.logits.dtype), "state_dtype": str(state.dtype), "loss": loss.item()}), flush=True)
accelerator.wait_for_everyone()
accelerator.end_training()  # destroys the process group: no rank is left tearing down gloo while the other exits
'''

# A final FSDP folder and a merged sharded checkpoint, loaded as remote code where `import modeling_fwp` fails.
REMOTE_LOAD = textwrap.dedent(r"""
    import importlib.abc, os, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "modeling_fwp":
                raise ImportError("blocked by the test")
    sys.meta_path.insert(0, Block())
    import torch
    from accelerate.utils import merge_fsdp_weights
    from transformers import AutoModelForCausalLM
    final, checkpoint, out = sys.argv[1:4]
    if os.path.isdir(f"{checkpoint}/pytorch_model_fsdp_0"):  # sharded: `accelerate merge-weights` adds the weights
        merge_fsdp_weights(f"{checkpoint}/pytorch_model_fsdp_0", checkpoint)  # checkpoint/model.safetensors
    ids = torch.tensor([[5, 9, 3, 17, 22, 8, 40, 41]])
    logits = {}
    for name, folder in (("final", final), ("merged", checkpoint)):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            logits[name] = model(ids).logits
    assert not [m for m in sys.modules if m.split(".")[0] == "modeling_fwp"]
    torch.save(logits, out)
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """6 training works and the validation split, cut short, as local JSON-lines files."""
    from modeling_fwp import data as fwp_data

    folder = tmp_path_factory.mktemp("distributed-corpus")
    for split, name, num_docs, chars in (("train", "train.jsonl", 6, 5000), ("validation", "valid.jsonl", None, 2000)):
        with lzma.open(fwp_data.corpus_files()[split], "rt") as source, open(folder / name, "w") as out:
            for line in list(source)[:num_docs]:
                out.write(json.dumps({"text": json.loads(line)["text"][:chars]}) + "\n")
    (folder / "fsdp_on_cpu.py").write_text(FSDP_ON_CPU)
    (folder / "probe.py").write_text(PROBE)
    return folder


def launch(corpus, config, script, args=(), launcher_args=(), fsdp_on_cpu=False, log=None):
    """`accelerate launch` through this interpreter (its transformers), 2 CPU processes, one thread each. With `log`
    (an open file) it returns the running launcher, its output going to that file."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *launcher_args,
               *([str(corpus / "fsdp_on_cpu.py")] if fsdp_on_cpu else []), str(script), *args]
    env = {**os.environ, "MODELING_FWP_CACHE": str(corpus / "tokenizer-cache"), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}
    if log is not None:
        return subprocess.Popen(command, cwd=corpus, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    run = subprocess.run(command, cwd=corpus, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert not DEPRECATION.findall(run.stdout + run.stderr)
    return run


def train_args(corpus, output_dir, *extra):
    return ["--recipe", "none", "--config_overrides", MICRO, "--train_file", str(corpus / "train.jsonl"),
            "--validation_file", str(corpus / "valid.jsonl"), "--block_size", "32", "--per_device_train_batch_size",
            "4", "--per_device_eval_batch_size", "4", "--learning_rate", "5e-3", "--logging_steps", "1",
            "--save_strategy", "steps", "--max_eval_samples", "16", "--report_to", "none", "--disable_tqdm", "true",
            "--dataloader_pin_memory", "false", "--sample_max_new_tokens", "5", "--output_dir", str(output_dir),
            *extra]


def logged_steps(output_dir, after: int) -> dict:
    """step -> (loss, grad_norm, learning_rate) of the logged training steps after `after`."""
    history = json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: (e["loss"], e["grad_norm"], e["learning_rate"]) for e in history
            if "loss" in e and e["step"] > after}


def trainer_resumes_cpu_processes() -> bool:
    """transformers 5.17 loads the optimizer state of a run of several processes with map_location=args.device, which
    is torch.device("cpu:0") for CPU processes, and torch 2.13 cannot restore storages to an indexed CPU device: the
    resume of multi_cpu.yaml runs fails ("RuntimeError: don't know how to restore data location of
    torch.storage.UntypedStorage (tagged with cpu:0)"). 5.24 maps CPU processes to "cpu"; GPUs (cuda:N) were never
    affected, nor is FSDP (torch.distributed.checkpoint loads its optimizer)."""
    import inspect

    from transformers import Trainer

    return 'device.type != "cpu"' in inspect.getsource(Trainer._load_optimizer_and_scheduler)


@pytest.mark.skipif(not trainer_resumes_cpu_processes(), reason="this transformers cannot resume several CPU "
                    "processes (optimizer state mapped to cpu:0); see trainer_resumes_cpu_processes")
def test_resumed_two_process_run_continues_exactly(corpus, tmp_path):
    """9 steps with checkpoints at 3, 6 and 9; a second run resumes from checkpoint-6. Model, optimizer, scheduler,
    each rank's RNG and its place in the data come back: the resumed steps log the uninterrupted run's losses and
    gradient norms bit for bit, and both runs end with the same parameters on both ranks."""
    config, script = CONFIGS / "multi_cpu.yaml", REPO / "scripts" / "train.py"
    common = ["--max_steps", "9", "--save_steps", "3", "--save_replica_checksum", "true"]
    port = ["--num_processes", "2", "--main_process_port"]
    launch(corpus, config, script, train_args(corpus, tmp_path / "whole", *common), [*port, str(free_port())])
    assert sorted(p.name for p in (tmp_path / "whole").glob("checkpoint-*")) == [
        "checkpoint-3", "checkpoint-6", "checkpoint-9"]
    launch(corpus, config, script,
           train_args(corpus, tmp_path / "resumed", *common, "--resume_from_checkpoint",
                      str(tmp_path / "whole" / "checkpoint-6")), [*port, str(free_port())])

    whole, resumed = logged_steps(tmp_path / "whole", 6), logged_steps(tmp_path / "resumed", 6)
    assert sorted(resumed) == [7, 8, 9] and resumed == whole
    checksums = {run: [json.loads((tmp_path / run / f"replica-{rank}.json").read_text())["sha256"] for rank in (0, 1)]
                 for run in ("whole", "resumed")}
    assert len(set(checksums["whole"] + checksums["resumed"])) == 1
    assert json.loads((tmp_path / "resumed" / "train_summary.json").read_text())["distributed_type"] == "MULTI_CPU"


@pytest.mark.parametrize("config", ["fsdp.yaml", "fsdp_full_state.yaml"])
def test_fsdp_trains_resumes_exactly_and_saves_a_folder_from_pretrained_loads(corpus, tmp_path, config):
    """The FSDP configs as they are (FSDP2, bf16 mixed precision; sharded or full checkpoints) on the deltanet-370m
    layer at micro size: 6 steps with checkpoints at 3 and 6, then a run resumed from checkpoint-3. The final folder
    holds the gathered weights and the model's own code, and loads in a single process, with the package or as remote
    code; so does checkpoint-6 (after `accelerate merge-weights` when sharded)."""
    import safetensors.torch
    from transformers import AutoModelForCausalLM

    sharded = config == "fsdp.yaml"
    config, script = CONFIGS / config, REPO / "scripts" / "train.py"
    common = ["--preset", "deltanet-370m", "--max_steps", "6", "--save_steps", "3"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    port = ["--num_processes", "2", "--main_process_port"]
    launch(corpus, config, script, train_args(corpus, whole, *common), [*port, str(free_port())], fsdp_on_cpu=True)
    run = launch(corpus, config, script,
                 train_args(corpus, resumed, *common, "--resume_from_checkpoint", str(whole / "checkpoint-3")),
                 [*port, str(free_port())], fsdp_on_cpu=True)

    assert json.loads((whole / "train_summary.json").read_text())["distributed_type"] == "FSDP"
    checkpoint = whole / "checkpoint-3"  # weights and optimizer state, and what names the model and its tokens
    assert {"config.json", "tokenizer.json", "modeling_fwp.py"} <= {p.name for p in checkpoint.iterdir()}
    if sharded:  # torch.distributed.checkpoint folders, no full weights
        assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()
        assert not (checkpoint / "model.safetensors").exists()
    else:
        assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "pytorch_model_fsdp.bin").is_file()
    assert f"Using the tokenizer saved in {checkpoint}" in run.stdout
    steps = logged_steps(resumed, 3)
    assert sorted(steps) == [4, 5, 6] and steps == logged_steps(whole, 3)

    for folder in (whole, resumed, checkpoint):  # FSDP2's class is torch's: its files must not stand in for ours
        names = {p.name for p in folder.iterdir()}
        assert not [n for n in names if n.startswith("_fsdp") or n == "_fully_shard.py"], names
        saved = json.loads((folder / "config.json").read_text())
        assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_fwp.FWPForCausalLM"
        assert saved["architectures"] == ["FWPForCausalLM"]
    model, info = AutoModelForCausalLM.from_pretrained(whole, output_loading_info=True)
    assert type(model).__name__ == "FWPForCausalLM" and not any(info.values()), info
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the fp32 master weights, not bf16 copies
    final = safetensors.torch.load_file(whole / "model.safetensors")
    assert final.keys() == safetensors.torch.load_file(resumed / "model.safetensors").keys()
    for name, tensor in safetensors.torch.load_file(resumed / "model.safetensors").items():
        assert torch.equal(tensor, final[name]), name  # the resumed run ends where the whole one did

    # As remote code (without the package): the final folder, and checkpoint-6, which holds the same weights.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", REMOTE_LOAD, str(whole), str(whole / "checkpoint-6"),
                           str(tmp_path / "logits.pt")], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        local = model.eval()(torch.tensor([[5, 9, 3, 17, 22, 8, 40, 41]])).logits
    assert torch.equal(remote["merged"], remote["final"])
    torch.testing.assert_close(remote["final"], local, rtol=1e-5, atol=1e-6)  # (other threads: other sum orders)


@pytest.mark.parametrize("config", ["multi_node_ddp.yaml", "multi_node_fsdp.yaml"])
def test_multi_node_configs_on_one_host(corpus, tmp_path, config):
    """Both multi-node configs as two hosts of one process each: two launchers with --num_machines 2 and
    --machine_rank 0 / 1 rendezvous at --main_process_ip 127.0.0.1 (the placeholders in the files overridden on the
    command line, as on real hosts). Under FSDP with the config's bf16 mixed precision the parameters are sharded and
    computed in bf16 while the fast-weight state carried in and out of every sharded block stays fp32."""
    port = str(free_port())
    fields = {k: json.loads(v) for k, v in (item.split("=") for item in MICRO.split(","))}
    logs = [tmp_path / f"machine-{rank}.log" for rank in (0, 1)]
    launchers = []
    try:
        for rank, log in enumerate(logs):
            with open(log, "w") as out:
                launchers.append(launch(
                    corpus, CONFIGS / config, corpus / "probe.py", [str(REPO / "scripts"), json.dumps(fields)],
                    ["--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                     "--main_process_ip", "127.0.0.1", "--main_process_port", port],
                    fsdp_on_cpu=config.endswith("fsdp.yaml"), log=out))
        # Both at once: a machine that fails leaves the other's launcher in torchrun's exit barrier (300 s), so the
        # first failure ends the wait, and both machines' output is in the message.
        deadline = time.monotonic() + 240
        while any(launcher.poll() is None for launcher in launchers) and time.monotonic() < deadline:
            if any(launcher.poll() not in (None, 0) for launcher in launchers):
                break
            time.sleep(0.5)
    finally:
        killed = [launcher.poll() is None for launcher in launchers]
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()
    outputs = [log.read_text() for log in logs]
    assert [launcher.returncode for launcher in launchers] == [0, 0], "\n".join(
        f"machine {rank} ({'killed: still running after 240 s or after the other failed' if stopped else 'exit code'}"
        f" {launcher.returncode}):\n{output[-3000:]}"
        for rank, (launcher, stopped, output) in enumerate(zip(launchers, killed, outputs)))
    assert not DEPRECATION.findall("".join(outputs))
    probes = [json.loads(line.split(" ", 1)[1]) for output in outputs for line in output.splitlines()
              if line.startswith("PROBE ")]
    assert sorted((p["rank"], p["node"]) for p in probes) == [(0, "0"), (1, "1")]
    assert {(p["world"], p["sum"], p["master"]) for p in probes} == {(2, 3.0, "127.0.0.1")}
    assert {p["state_dtype"] for p in probes} == {"torch.float32"}
    if config.endswith("fsdp.yaml"):
        assert {(p["type"], p["sharded"], p["param_dtype"], p["logits_dtype"]) for p in probes} == {
            ("FSDP", True, "torch.float32", "torch.bfloat16")}
    else:
        assert {(p["type"], p["sharded"]) for p in probes} == {("MULTI_CPU", False)}


@pytest.mark.parametrize("config", ["multi_cpu.yaml", "fsdp.yaml"])
def test_bench_train_runs_under_accelerate(corpus, tmp_path, config):
    """scripts/bench/bench_train.py under DDP and under FSDP2 (bf16 parameters; fwp and Llama, each sharded per its own
    block class): global and per-process tokens/s, peak memory per process (n/a on CPU), a finite loss."""
    import math

    fsdp = config == "fsdp.yaml"
    out = tmp_path / "bench.json"
    launch(corpus, CONFIGS / config, REPO / "scripts" / "bench" / "bench_train.py",
           ["--preset", "deltanet-370m", "--config_overrides", MICRO, "--models", "fwp,llama" if fsdp else "fwp",
            "--batch_size", "2", "--seq_len", "32", "--warmup_steps", "1", "--steps", "2", "--json", str(out),
            *(["--fsdp_param_dtype", "bf16"] if fsdp else [])],
           ["--num_processes", "2", "--main_process_port", str(free_port())], fsdp_on_cpu=fsdp)
    info = json.loads(out.read_text())
    assert info["processes"] == 2
    assert info["parallelism"] == ("FSDP2, bf16 parameters" if fsdp else "MULTI_CPU")
    assert [r["model"] for r in info["results"]] == (["fwp", "llama"] if fsdp else ["fwp"])
    for result in info["results"]:
        assert result["tokens_per_s"] == pytest.approx(2 * result["tokens_per_s_per_process"])
        assert math.isfinite(result["last_loss"]) and math.isnan(result["peak_memory_GiB"])


def test_deltanet_1_3b_preset_has_fla_shape_and_1_3b_parameters():
    """deltanet-1.3b: fla's delta_net-1.3B shape (fla 0.6.0 DeltaNetConfig defaults) with deltanet-370m's layer;
    built on the meta device, no memory. 1.37B parameters, as fla's model of that shape has."""
    from modeling_fwp import FWPForCausalLM, load_preset
    from modeling_fwp.presets import preset_fields

    small, big = preset_fields("deltanet-370m"), preset_fields("deltanet-1.3b")
    shape = ("hidden_size", "num_hidden_layers", "num_heads", "head_dim", "intermediate_size", "vocab_size")
    assert {k: big[k] for k in shape} == {"hidden_size": 2048, "num_hidden_layers": 24, "num_heads": 16,
                                          "head_dim": 128, "intermediate_size": 5632, "vocab_size": 32000}
    assert {k: v for k, v in big.items() if k not in shape} == {k: v for k, v in small.items() if k not in shape}
    # fla's GatedMLP: intermediate = 256 * ceil(int(hidden * hidden_ratio * 2 / 3) / 256), hidden_ratio 4
    assert big["intermediate_size"] == 256 * -(-int(2048 * 4 * 2 / 3) // 256)
    config = load_preset("deltanet-1.3b")
    with torch.device("meta"):
        model = FWPForCausalLM(config)
    count = sum(p.numel() for p in model.parameters())
    d, h, k, i, v, n = 2048, 16, 128, 5632, 32000, 24  # fla's layer: q, k, v, o; beta; 3 convs; o-norm; MLP; 2 norms
    per_layer = 4 * d * d + h * d + 3 * d * 4 + k + 3 * d * i + 2 * d
    assert count == 2 * v * d + n * per_layer + d
    assert abs(count / 1.3e9 - 1) < 0.06
