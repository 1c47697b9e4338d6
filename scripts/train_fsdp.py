"""What scripts/train.py does for FSDP2 (Accelerate's `fsdp_version: 2`) beyond the Trainer's own handling: the
fast-weight state kept fp32 through the mixed-precision casts, the model's own code in a save of the wrapped model,
and synchronised generation when the model is sharded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

def keep_fsdp_state_fp32(accelerator) -> None:
    """FSDP2 under `mixed_precision: bf16`: Accelerate's policy casts every floating tensor that enters
    (cast_forward_inputs) or leaves (output_dtype) a sharded FWPBlock to bf16, the fast-weight state included, which
    a block takes and returns when the state is carried (--carry_state, generation) and which the ops keep in fp32.
    Dropping those two casts lets the state pass unrounded; parameters are still gathered in bf16 (param_dtype),
    gradients reduced in Accelerate's reduce_dtype, and the hidden states are bf16 anyway (bf16 weights made them)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    policy = getattr(plugin, "mixed_precision_policy", None)
    if policy is None or getattr(plugin, "fsdp_version", 1) != 2:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=policy.param_dtype,
                                                         reduce_dtype=policy.reduce_dtype, output_dtype=None,
                                                         cast_forward_inputs=False)


def restore_model_code(model, folder) -> None:
    """After save_pretrained of an FSDP2 model: its class is torch's FSDPFWPForCausalLM (torch's _fsdp_init.py), so
    transformers copied that module and its relative imports into `folder` and named them in auto_map. Puts the
    model's own code files and auto_map entry there instead, as a save of the unwrapped model writes them."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: no FSDP2 (FSDP1 leaves the model's class alone)
        return
    from transformers import PreTrainedModel
    from transformers.dynamic_module_utils import custom_object_save, get_relative_import_files

    wrapper = type(model)
    config_file = Path(folder, "config.json")
    if not isinstance(model, FSDPModule) or wrapper._auto_class is None or not config_file.is_file():
        return
    original = next(c for c in wrapper.__mro__ if issubclass(c, PreTrainedModel) and not issubclass(c, FSDPModule))
    torch_file = sys.modules[wrapper.__module__].__file__
    for path in [torch_file, *get_relative_import_files(torch_file)]:
        Path(folder, Path(path).name).unlink(missing_ok=True)
    custom_object_save(object.__new__(original), folder)  # modeling_fwp.py and the files it imports
    entry = f"{original.__module__.rsplit('.', 1)[-1]}.{original.__name__}"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {**config.get("auto_map", {}), original._auto_class: entry}
    config["architectures"] = [original.__name__]
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if isinstance(getattr(model.config, "auto_map", None), dict):
        model.config.auto_map[original._auto_class] = entry


def fsdp2_sharded(model) -> bool:
    """Whether `model` is sharded over several processes by Accelerate's FSDP2, so that every forward needs all of
    them: generate() must then keep every process stepping until all are done (synced_gpus), should their samples
    differ in length. transformers infers that only for the models it shards itself."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return False
    return isinstance(model, FSDPModule) and torch.distributed.get_world_size() > 1
