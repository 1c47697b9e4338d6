"""modeling_fwp: delta-rule Fast Weight Programmers (Schlag, Irie & Schmidhuber, ICML 2021) for Hugging Face
Transformers. Importing the package registers model_type "fwp" with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_fwp import FWPCache
from .configuration_fwp import FWPConfig
from .feature_maps import build_feature_map, normalize_qk
from .modeling_fwp import FWPForCausalLM, FWPModel, FWPPreTrainedModel
from .ops import delta_rule, sum_rule
from .presets import list_presets, load_preset

AutoConfig.register("fwp", FWPConfig, exist_ok=True)
AutoModel.register(FWPConfig, FWPModel, exist_ok=True)
AutoModelForCausalLM.register(FWPConfig, FWPForCausalLM, exist_ok=True)
# save_pretrained then writes auto_map and copies the code files, so a saved folder loads with trust_remote_code.
FWPConfig.register_for_auto_class()
FWPModel.register_for_auto_class("AutoModel")
FWPForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"
__all__ = [
    "FWPCache", "FWPConfig", "FWPForCausalLM", "FWPModel", "FWPPreTrainedModel", "build_feature_map",
    "delta_rule", "list_presets", "load_preset", "normalize_qk", "sum_rule",
]
