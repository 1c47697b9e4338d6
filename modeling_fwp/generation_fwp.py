"""Generation glue of FWPForCausalLM: what transformers' generate() needs from a model whose state is a fixed-size
cache, and the captured decode step.

`FWPGenerationMixin` gives generate() an FWPCache from the start (an FWPStaticCache with
cache_implementation="static"), passes the 2-D padding mask through instead of building 4-D causal masks, and
works around older releases' chunked prefill. With an FWPStaticCache, `get_compiled_call` captures a one-token step
per row with torch.compile (CUDA graphs by default) over the cache's fixed buffers: the same blocks as the model's
forward (`_captured_decode_step`), with the update rule in its in-place one-step form (`decode_triton.rule_step_`)
and each block's input projections joined into one matmul (`_joint_decode_weights`). The ordinary forward in
`modeling_fwp.py` is the reference every captured step is tested against.

The mixin expects the causal LM's `model` (an FWPModel), `lm_head` and `config`; it stands before the pretrained
model class in FWPForCausalLM's bases, so its `get_compiled_call` replaces PreTrainedModel's.
"""

import contextlib
import inspect
import types

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache_fwp import FWPCache, FWPStaticCache
from .compat import CACHE_NAME, CHUNKED_PREFILL_REFEEDS_HISTORY, resolve_cache_argument
from .safeguards import is_plain_linear
from .sequence_layout import SequenceLayout, add_sinusoidal_positions


def _guards_checked_once(first_step: bool):
    """dynamo checks ~2000 guards (every module and parameter the step touches) before each call of the captured
    step: most of its host time per token. Within one generate() nothing they check can change (the same model, the
    same cache buffers, one token per row), so the first step of each generate() runs them all and the later ones
    only what tells the cached graphs apart (the batch size). Where torch lacks the option, every step checks all."""
    if first_step or not _SKIP_GUARDS_SUPPORTED:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


def _set_stance_can_skip_guards() -> bool:
    try:  # torch >= 2.7
        return "skip_guard_eval_unsafe" in inspect.signature(torch.compiler.set_stance).parameters
    except (AttributeError, TypeError, ValueError):
        return False


_SKIP_GUARDS_SUPPORTED = _set_stance_can_skip_guards()


class FWPGenerationMixin:
    """generate() support for FWPForCausalLM (see the module docstring); transformers' GenerationMixin stays a base
    of the model beside it."""

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # generate() gets an FWPCache from the start (never a DynamicCache), so chunked prefill has a cache to fill.
        # It goes under the name the installed transformers passes to forward (`cache` from 5.24 on).
        # "static" gives an FWPStaticCache, whose decode steps get_compiled_call captures.
        implementation = generation_config.cache_implementation
        if implementation not in (None, "dynamic", "static"):
            raise ValueError(
                f"cache_implementation={implementation!r} is not supported by FWP models: their state is a fixed-size "
                "FWPCache. Use None / 'dynamic' (the default) or 'static' (captured decode steps)."
            )
        self._joint_weights_checked = False  # weights may have changed since the last generate(): check once now
        other_name = "past_key_values" if CACHE_NAME == "cache" else "cache"
        if model_kwargs.get(other_name) is not None:  # a user's cache under the other release's name
            model_kwargs[CACHE_NAME] = resolve_cache_argument(model_kwargs.get(CACHE_NAME), model_kwargs.pop(other_name))
        if model_kwargs.get(CACHE_NAME) is None and generation_config.use_cache is not False:
            if implementation == "static":
                batch_size = args[1] if len(args) > 1 else kwargs["batch_size"]
                rows = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1) * batch_size
                model_kwargs[CACHE_NAME] = self._static_cache(rows)
            else:
                model_kwargs[CACHE_NAME] = FWPCache(config=self.config)
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def _static_cache(self, rows: int) -> FWPStaticCache:
        """The model's FWPStaticCache for `rows` rows, reset and reused while rows, dtype and device stay the same (as
        transformers does with its StaticCache): the same buffers keep the captured decode step valid, so a second
        generate() replays it instead of compiling it again."""
        cache = getattr(self, "_reused_static_cache", None)
        layer = None if cache is None else cache.layers[0].fast_weights
        if layer is None or cache.batch_size != rows or layer.device != self.device or cache.model_dtype != self.dtype:
            cache = FWPStaticCache(self.config, rows, device=self.device, dtype=self.dtype)
            self._reused_static_cache = cache
        else:
            cache.reset()
        return cache

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        """generate() asks a model with a compileable cache for 4-D causal masks (even from no mask) at every step; the
        model reads the 2-D padding mask (pads never reach the state), so that one is passed through and none is
        built (a 4-D prefill mask would take [batch, prompt, prompt] memory, and every decode step host time)."""
        return attention_mask

    def get_compiled_call(self, compile_config=None):
        """What generate() calls for each decode step when the cache is compileable (an FWPStaticCache, on CUDA or
        with a compile_config for all devices): a one-token step per row captured with torch.compile (CUDA graphs
        with the default `mode="reduce-overhead"`) over the cache's fixed buffers. Anything else (a chunked prefill,
        several tokens) runs the ordinary forward."""
        compile_config = compile_config or self._default_compile_config()
        # The fields themselves, not to_dict()'s deep copy, so a backend object (a callable) is used as given.
        options = {name: getattr(compile_config, name) for name in ("fullgraph", "dynamic", "backend", "mode", "options")}
        if options["dynamic"] is None:  # a cache has one batch size: a static graph per size, not one dynamic graph
            options["dynamic"] = False  # (which dynamo would build at the second size, and inductor tune from scratch)
        key = tuple((name, id(value) if callable(value) else repr(value)) for name, value in options.items())
        if getattr(self, "_captured_options", None) == key:
            return self._compiled_call
        compiled = {}  # the compiled step, and the module hooks it was traced with

        def compiled_step():
            # dynamo does not guard on module hooks (torch._dynamo.config.skip_nnmodule_hook_guards): a hook added
            # after the step was traced would be silently left out, so a changed set of hooks means a new trace.
            # dynamo keeps its graphs per code object, so the new trace compiles a fresh copy of the step's code.
            hooks = self._module_hooks()
            if compiled.get("hooks") != hooks:
                function = type(self)._captured_decode_step
                if "hooks" in compiled:
                    function = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__)
                compiled.update(step=torch.compile(types.MethodType(function, self), **options), hooks=hooks)
            return compiled["step"]

        def call(input_ids=None, cache=None, past_key_values=None, inputs_embeds=None, **kwargs):
            state = resolve_cache_argument(cache, past_key_values)
            if not (isinstance(state, FWPStaticCache) and input_ids is not None and inputs_embeds is None
                    and input_ids.dim() == 2 and input_ids.shape[1] == 1 and state.get_seq_length() > 0
                    and kwargs.get("labels") is None and state.batch_size == input_ids.shape[0]
                    and not kwargs.get("output_hidden_states")):
                return self(input_ids=input_ids, cache=state, inputs_embeds=inputs_embeds, **kwargs)
            # generate() feeds each row one real token per step (finished rows get pads with mask 1), so the step
            # needs no mask; positions continue from the cache's per-row counts.
            first_step = not getattr(self, "_joint_weights_checked", False)
            if first_step:  # once per generate(): the checks cost host time
                self._joint_decode_weights()
                self._joint_weights_checked = True
                compiled["current"] = compiled_step()
            with _guards_checked_once(first_step):
                logits = compiled["current"](input_ids, state.layer_tensors(), self._joint_weights[1])
            state.advance(1)
            # a CUDA-graph output is overwritten by the next replay: hand generate() its own copy
            return CausalLMOutputWithPast(logits=logits.clone(), **{CACHE_NAME: state})

        # the attributes transformers' own get_compiled_call keeps (its generation tests look for them)
        self._captured_options, self._compiled_call, self._last_compile_config = key, call, compile_config
        return call

    def _module_hooks(self) -> tuple:
        """Which forward (pre-)hooks each module has: what the captured step's trace depends on but dynamo does
        not check."""
        return tuple((name, tuple(map(id, module._forward_pre_hooks.values())),
                      tuple(map(id, module._forward_hooks.values()))) for name, module in self.named_modules()
                     if module._forward_pre_hooks or module._forward_hooks)

    def _joint_decode_weights(self) -> list[tuple]:
        """Per block, (attention, feed-forward) input-projection weights concatenated, so that a captured decode
        step makes q, k, v, beta (and the gate) in one matmul and SwiGLU's two halves in another: at one token per
        row each matmul costs a launch, not arithmetic. A copy of those weights (about 60 % of the blocks'
        parameters), kept while no weight changes: checked at the first captured step of each generate() and rebuilt
        when a parameter's address or version counter moved (an optimizer step, load_state_dict, .to()). None for a
        block whose projections are not plain bias-free
        nn.Linear (PEFT's LoRA layers, quantised or hooked ones), which then runs its own projections."""
        sources = []
        for block in self.model.layers:
            attn, mlp = block.attn.projection_modules(), block.mlp.projection_modules()
            sources.append(tuple([m.weight for m in group] if group and all(map(is_plain_linear, group)) else None
                                 for group in (attn, mlp)))
        key = tuple((w.data_ptr(), w._version) for pair in sources for group in pair if group for w in group)
        cached = getattr(self, "_joint_weights", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        self._joint_weights = None  # the old copies go before the new ones are made
        with torch.no_grad():
            joint = [tuple(None if group is None else torch.cat(group) for group in pair) for pair in sources]
        for tensor in (t for pair in joint for t in pair if t is not None):
            torch._dynamo.mark_static_address(tensor)  # fixed inputs of the captured graph, as parameters are
        self._joint_weights = (key, joint)
        return joint

    def _captured_decode_step(self, input_ids, layer_tensors, joint_weights):
        """One token per row from an FWPStaticCache, updating its buffers in place: no host sync and no branch on
        data, so torch.compile(fullgraph=True) captures it whole. The maths is the forward's (the same blocks on
        the same layout), with the update rule in its one-step form writing the fast weights in place
        (`decode_triton.rule_step_`) and the projections from `_joint_decode_weights`."""
        model, cfg = self.model, self.config
        rows = layer_tensors[0][-1]  # layer 0's per-row token counts, read before the step advances them
        layout = SequenceLayout(input_ids.shape[0], 1, positions=rows[:, None].clone(), row_tokens=torch.ones_like(rows),
                                backend="recurrent", state_in_place=True)
        hidden = add_sinusoidal_positions(model.embed_tokens(input_ids), layout.positions, cfg)
        z_at, tail_at = 1, 1 + int(cfg.attention_normalization)  # where FWPLayerState.tensors() puts each part
        for block, tensors, weights in zip(model.layers, layer_tensors, joint_weights):
            fast_weights, row_tokens = tensors[0], tensors[-1]
            z = tensors[z_at] if cfg.attention_normalization else None
            conv_tail = tensors[tail_at] if cfg.use_short_conv else None
            hidden, _, new_z, new_tail = block(hidden, layout=layout, fast_weights=fast_weights, z=z,
                                               conv_tail=conv_tail, want_state=True, joint_weights=weights)
            if z is not None:
                z.copy_(new_z)
            if conv_tail is not None:
                conv_tail.copy_(new_tail)
            row_tokens.add_(1)
        if model.norm is not None:
            hidden = model.norm(hidden)
        return self.lm_head(hidden)

    def _prefill(self, input_ids, generation_config, model_kwargs, *args, **kwargs):
        cache = model_kwargs.get(CACHE_NAME)
        if (CHUNKED_PREFILL_REFEEDS_HISTORY and generation_config.prefill_chunk_size is not None and cache is not None
                and cache.get_seq_length() > 0 and model_kwargs.get("inputs_embeds") is None):
            # Continuing from a cache, older releases chunk the whole history again: hand them the new columns only
            # (ids and mask alike, since they cut the mask from its first column).
            past, mask = cache.get_seq_length(), model_kwargs.get("attention_mask")
            if mask is None or mask.shape[1] == input_ids.shape[1]:
                input_ids = input_ids[:, past:]
                if mask is not None:
                    model_kwargs["attention_mask"] = mask[:, past:]
        return super()._prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)
