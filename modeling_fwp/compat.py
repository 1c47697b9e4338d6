"""What differs between the transformers releases this package supports (pyproject.toml: >=5.17, <6).

Facts about the installed transformers live here, found by looking at its objects where they show the change (so a
release that back-ports a change is handled by what it does) and by its version where only behaviour changed.
"""

import dataclasses
import re

import transformers
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5.24 renamed the cache argument of forward() and the output field `past_key_values` to `cache`;
# generate() passes the cache under that name and the old one is a deprecated alias that warns on every use.
CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"

# Before 5.23, generate()'s chunked prefill (`prefill_chunk_size`) split the whole history again when it continued
# from a non-empty cache, feeding the already-cached tokens a second time (a stateful cache cannot absorb that).
TRANSFORMERS_VERSION = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", transformers.__version__).groups())
CHUNKED_PREFILL_REFEEDS_HISTORY = TRANSFORMERS_VERSION < (5, 23)


def output_cache(output):
    """The cache an output carries, under whichever name this transformers gives it (no deprecation warning)."""
    return getattr(output, CACHE_NAME, None)


def resolve_cache_argument(cache, past_key_values):
    """The cache passed as `cache` (transformers >= 5.24) or `past_key_values` (the older name)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass the FWPCache as `cache` or as `past_key_values`, not both.")
    return cache if cache is not None else past_key_values


def enable_activation_checkpointing(model, **kwargs):
    """`activation_checkpointing_enable` where transformers has it (5.24 deprecated `gradient_checkpointing_enable`),
    else the old name. Keyword arguments go to `torch.utils.checkpoint.checkpoint`."""
    if hasattr(model, "activation_checkpointing_enable"):
        return model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
    return model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)


def activation_checkpointing_flag() -> str:
    """The TrainingArguments flag that turns activation checkpointing on in this transformers."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "--activation_checkpointing" if "activation_checkpointing" in names else "--gradient_checkpointing"


__all__ = [
    "CACHE_NAME", "CHUNKED_PREFILL_REFEEDS_HISTORY", "activation_checkpointing_flag", "enable_activation_checkpointing",
    "output_cache", "resolve_cache_argument",
]
