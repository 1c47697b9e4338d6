"""Safeguards at the model's edges against results that would otherwise be silently wrong, and files that would come
out unreadable to others:

- `check_inputs`: input ids outside the vocabulary, a mask of the wrong shape or an empty input are refused, naming
  what is wrong, before they reach an embedding lookup or a layout;
- `check_attention_mask`: an additive float mask (0 = attend, -inf = pad) read as a 0/1 mask inverts the padding;
- `is_plain_linear`: a fused path (the captured decode step's joint projections, SwiGLU recomputed with its down
  projection) would skip whatever wraps a projection (PEFT's LoRA, hooks, parametrisations): it takes plain ones;
- `check_keywords`: a misspelt keyword (`atention_mask=`) swallowed by `**kwargs` lets the model run without it;
- `warn_non_finite_weights`: a weights file with corrupted bytes loads without a word and every logit is NaN;
- `give_umask_modes`: safetensors (0.8) writes its files with mode 0600, and `tempfile.mkdtemp` makes 0700 folders,
  whatever the umask; files and folders a save writes get the modes any other file gets (0644 / 0755 under 022).

Imported by modeling_fwp.py, so it travels with saved model folders (remote code): torch and the standard library
only (and the package's own cache_fwp.py).
"""

from __future__ import annotations

import difflib
import inspect
import os
import stat
import warnings
from pathlib import Path

import torch
from torch import nn

from .cache_fwp import FWPCache

# ----------------------------------------------------------------------------------------------------------------------
# Keywords
# ----------------------------------------------------------------------------------------------------------------------
# What transformers passes to a model's forward besides the arguments the forward names, whatever the model:
# generate() (`return_dict`, `output_attentions`, `cache_position` on releases that still make it), the Trainer
# (`num_items_in_batch`), DataCollatorWithFlattening (`cu_seq_lens_k`, `max_length_q`, `max_length_k`, `seq_idx`) and
# the keys of transformers' `TransformersKwargs` (read from the installed release too, so a key a later release adds
# keeps working). The model accepts them and ignores those it has no use for.
TRANSFORMERS_KEYWORDS = frozenset({
    "return_dict", "output_attentions", "output_hidden_states", "output_router_logits", "cache_position",
    "num_items_in_batch", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
    "seq_idx", "is_causal", "use_cache",
})
try:
    from transformers.utils.generic import TransformersKwargs

    TRANSFORMERS_KEYWORDS = TRANSFORMERS_KEYWORDS | frozenset(TransformersKwargs.__optional_keys__)
except (ImportError, AttributeError):  # pragma: no cover
    pass


def check_keywords(forward, kwargs: dict) -> None:
    """Refuses keywords in `kwargs` (what `forward`'s `**kwargs` caught) that neither `forward` nor transformers
    uses, as Python does for a function without `**kwargs`, naming the closest accepted name."""
    unknown = [key for key in kwargs if key not in TRANSFORMERS_KEYWORDS]
    if not unknown:
        return
    named = [name for name, p in inspect.signature(forward).parameters.items()
             if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name != "self"]
    key = unknown[0]
    closest = difflib.get_close_matches(key, named + sorted(TRANSFORMERS_KEYWORDS), n=1, cutoff=0.6)
    hint = (f"; did you mean {closest[0]!r}?" if closest else
            f". It takes {', '.join(named)}, and the keywords transformers passes to every model "
            f"({', '.join(sorted(TRANSFORMERS_KEYWORDS))}).")
    raise TypeError(f"{forward.__qualname__}() got an unexpected keyword argument {key!r}{hint}")


# ----------------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------------
def check_inputs(config, input_ids, inputs_embeds, attention_mask, cache):
    """Refuses inputs the model would otherwise misread, naming what is wrong; returns the attention mask cut to the
    current columns (generate() passes the mask of the whole history once the cache holds it)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
    if cache is not None and not isinstance(cache, FWPCache):
        raise TypeError(f"The cache must be an FWPCache (or None); got {type(cache).__name__}.")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D [batch, seq_len]; got shape {tuple(input_ids.shape)}"
                             + (" (add the batch dimension: input_ids[None])." if input_ids.dim() == 1 else "."))
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids; got dtype {input_ids.dtype}.")
    elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
        raise ValueError(f"inputs_embeds must be [batch, seq_len, hidden_size={config.hidden_size}]; got shape "
                         f"{tuple(inputs_embeds.shape)}.")
    batch_size, seq_len = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
    if batch_size == 0 or seq_len == 0:
        raise ValueError(f"The input is empty (batch {batch_size}, seq_len {seq_len}): pass at least one token.")
    if input_ids is not None and not torch.compiler.is_compiling():
        low, high = torch.aminmax(input_ids)
        if int(low) < 0 or int(high) >= config.vocab_size:
            bad = int(low) if int(low) < 0 else int(high)
            raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary [0, vocab_size={config.vocab_size}).")
    if cache is not None:
        cache.check_compatible(config)
    if attention_mask is None:
        return None
    past = 0 if cache is None else cache.get_seq_length()
    longest = seq_len + past  # the whole history, as generate() passes it
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size or not (
            seq_len <= attention_mask.shape[1] <= longest):
        allowed = f"[{batch_size}, {seq_len}]" + (f" (up to [{batch_size}, {longest}] with the history the cache "
                                                  "holds)" if past else "")
        raise ValueError(f"attention_mask must be a 2-D 0/1 mask of shape {allowed} for this input; got shape "
                         f"{tuple(attention_mask.shape)}.")
    return attention_mask[:, -seq_len:]


# ----------------------------------------------------------------------------------------------------------------------
# The attention mask
# ----------------------------------------------------------------------------------------------------------------------
def check_attention_mask(attention_mask: torch.Tensor | None) -> None:
    """The model reads `attention_mask` as a 0/1 padding mask: 1 (or True) for a token, 0 for a pad. An additive
    mask, built for softmax attention (0 where a token may be attended, -inf or a large negative number at a pad),
    would be read the other way round: its pads as tokens and its tokens as pads. A floating-point mask must
    therefore hold only 0 and 1, and not only 0 (an additive mask without padding: every token would be a pad).
    Integer and bool masks are taken as they are, with no check and no host sync; inside a compiled graph nothing
    is checked (a graph cannot branch on values)."""
    if attention_mask is None or not attention_mask.is_floating_point() or torch.compiler.is_compiling():
        return
    convert = ("pass a 0/1 mask (1 = token, 0 = pad); from an additive mask (0 = attend, -inf = pad) that is "
               "(attention_mask == 0).long()")
    other = (attention_mask != 0) & (attention_mask != 1)
    if bool(other.any()):
        value = attention_mask[other][0].item()
        raise ValueError(f"attention_mask must be a 0/1 padding mask, but it holds {value:g}: it looks like an "
                         f"additive mask, which this model would read with its padding inverted; {convert}.")
    if not bool(attention_mask.any()):
        raise ValueError(f"attention_mask is a floating-point mask of all 0: read as a 0/1 mask every token would be a "
                         f"pad. If it is an additive mask (no padding), {convert}; a mask of pads only is refused "
                         "for float masks (an integer or bool mask states it without doubt).")


# ----------------------------------------------------------------------------------------------------------------------
# Fused paths
# ----------------------------------------------------------------------------------------------------------------------
def is_plain_linear(module) -> bool:
    """A bias-free nn.Linear that nothing wraps, hooks or reparametrises: its output is x @ weight^T exactly."""
    return (type(module) is nn.Linear and module.bias is None and not module._forward_hooks
            and not module._forward_pre_hooks and not hasattr(module, "parametrizations"))


# ----------------------------------------------------------------------------------------------------------------------
# Loaded weights
# ----------------------------------------------------------------------------------------------------------------------
def warn_non_finite_weights(model: torch.nn.Module, source=None) -> list[str]:
    """Warns (UserWarning) when a parameter or buffer of a just-loaded model holds NaN or inf, naming each such
    tensor: a weights file with corrupted bytes loads without complaint and then every output is NaN. Tensors on
    the meta device, sharded (DTensor) or not floating point are skipped. Returns the names."""
    bad = []
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in tensors:
        data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
        if type(data) is not torch.Tensor or not data.is_floating_point() or data.device.type == "meta":
            continue
        finite = torch.isfinite(data)
        if not bool(finite.all()):
            bad.append((name, int(finite.numel() - finite.sum()), data.numel()))
    if bad:
        where = f" loaded from {source}" if source is not None else ""
        listed = ", ".join(f"{name} ({count} of {total} values)" for name, count, total in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        warnings.warn(f"The model{where} has non-finite (NaN or inf) weights in {len(bad)} tensor(s): {listed}{more}. "
                      "The weights file may be corrupted, or training diverged before it was saved; the outputs "
                      "will be NaN.", UserWarning, stacklevel=3)
    return [name for name, _, _ in bad]


# ----------------------------------------------------------------------------------------------------------------------
# File modes
# ----------------------------------------------------------------------------------------------------------------------
def current_umask() -> int:
    """The process's umask, read without changing it where the system tells it (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_stamps(folder) -> dict:
    """{path: (mtime_ns, size)} of the regular files directly in `folder` (what `give_umask_modes` compares)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {p: (s.st_mtime_ns, s.st_size) for p in folder.iterdir() if p.is_file() and not p.is_symlink()
            for s in [p.stat()]}


def give_umask_modes(root, only_changed_since: dict | None = None) -> None:
    """Gives `root` (a folder or a file) and everything under it the modes the umask gives a newly created file
    (0644 under umask 022; 0755 for a folder or an executable file). With `only_changed_since` (a `file_stamps` of
    the folder taken before writing), only the files directly in `root` that are new or changed since, and not
    `root` itself: a save into an existing folder leaves the user's other files alone."""
    mask = current_umask()
    root = Path(root)

    def settle(path: Path) -> None:
        mode = stat.S_IMODE(path.lstat().st_mode)
        executable = path.is_dir() or mode & stat.S_IXUSR
        wanted = (0o777 if executable else 0o666) & ~mask
        if mode != wanted:
            os.chmod(path, wanted)

    if only_changed_since is not None:
        for path, stamp in file_stamps(root).items():
            if only_changed_since.get(path) != stamp or path not in only_changed_since:
                settle(path)
        return
    if root.is_symlink():
        return
    settle(root)
    if root.is_dir():
        for folder, dirs, names in os.walk(root):
            for name in dirs + names:
                path = Path(folder, name)
                if not path.is_symlink():
                    settle(path)


__all__ = ["check_attention_mask", "check_keywords", "give_umask_modes", "warn_non_finite_weights"]
