"""FWPCache: the constant-size recurrent state of a fast weight programmer, as a transformers `Cache`.

Per layer it holds the fast weights [N, H, K, V] (always float32, float64 for float64 models), the z accumulator
[N, H, K] when attention normalisation is on, the short-convolution tail [N, conv_size - 1, C] when short convs are
on, and the layer's own token counters. Nothing in it grows with the number of tokens seen.
"""

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache


@dataclass
class FWPLayerState:
    """One layer's state. `seen_tokens` counts input columns (pads included: what generate() slices by);
    `row_tokens` counts each row's real tokens (what positions continue from under left padding)."""

    # transformers >= 5.25 asks every cache layer whether `crop` can roll it back (assisted decoding checks this
    # after the prefill instead of refusing `_is_stateful` models up front): a sum over all tokens seen cannot.
    is_croppable = False

    fast_weights: torch.Tensor | None = None
    z: torch.Tensor | None = None
    conv_tail: torch.Tensor | None = None
    seen_tokens: int = 0
    row_tokens: torch.Tensor | None = None

    def tensors(self):
        return [t for t in (self.fast_weights, self.z, self.conv_tail, self.row_tokens) if t is not None]

    def map_rows(self, fn):
        """Applies `fn` to the batch dimension of every tensor (beam reordering, repeats, selection)."""
        for name in ("fast_weights", "z", "conv_tail", "row_tokens"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))


def _compact(tensor):
    """The tensor itself, or a copy when it is a view into a larger buffer, so the cache never keeps a kernel's
    per-token workspace alive (which would make memory grow with the prompt). A graph (torch.compile) cannot ask
    for storage sizes: there it always copies (a state's size, not the prompt's)."""
    if tensor is not None and torch.compiler.is_compiling():
        return tensor.clone()
    if tensor is None or tensor.untyped_storage().nbytes() <= tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone()


class FWPCache(Cache):
    """The per-layer fast-weight states of an FWP model.

    The model creates it when `use_cache` is on (generate() never falls back to a DynamicCache), fills it in a forward
    over any number of tokens and continues from it in the next forward: chunked prefill, decoding and multi-turn
    continuation all read and write the same state. Row `i` belongs to batch row `i` (or to packed sequence `i`).
    """

    is_compileable = False

    def __init__(self, num_hidden_layers: int | None = None, config=None):
        if num_hidden_layers is None:
            if config is None:
                raise ValueError("FWPCache needs `num_hidden_layers` or `config`.")
            num_hidden_layers = config.num_hidden_layers
        super().__init__(layers=[FWPLayerState() for _ in range(num_hidden_layers)])

    # --- what the model uses -------------------------------------------------------------------------------------
    def __getitem__(self, layer_idx: int) -> FWPLayerState:
        return self.layers[layer_idx]

    def row_tokens(self, layer_idx: int = 0) -> torch.Tensor | None:
        return self.layers[layer_idx].row_tokens

    def write(self, layer_idx: int, fast_weights, z, conv_tail, new_columns: int, new_row_tokens: torch.Tensor):
        """Stores a layer's new state after it has consumed `new_columns` input columns."""
        layer = self.layers[layer_idx]
        layer.fast_weights, layer.z, layer.conv_tail = (_compact(t) for t in (fast_weights, z, conv_tail))
        layer.seen_tokens += new_columns
        layer.row_tokens = new_row_tokens if layer.row_tokens is None else layer.row_tokens + new_row_tokens

    def snapshot(self) -> list[FWPLayerState]:
        """What `restore` needs to undo the writes of a forward that failed midway. `write` replaces the layer
        tensors instead of changing them in place, so references are enough."""
        return [FWPLayerState(**vars(layer)) for layer in self.layers]

    def restore(self, snapshot: list[FWPLayerState]):
        for layer, saved in zip(self.layers, snapshot):
            for name, value in vars(saved).items():
                setattr(layer, name, value)

    def check_compatible(self, config):
        """Refuses a cache built by another model: the layer count and each stored part (fast weights, z, conv tail)
        must be what `config` writes, with the same shapes, so a continuation never reads a foreign state."""
        if len(self.layers) != config.num_hidden_layers:
            raise ValueError(f"The cache has {len(self.layers)} layers but the model has "
                             f"num_hidden_layers={config.num_hidden_layers}: it comes from another model.")
        parts = {
            "fast_weights": (True, (config.num_heads, config.key_dim, config.head_dim), "the fast weights"),
            "z": (config.attention_normalization, (config.num_heads, config.key_dim),
                  "the z accumulator (attention_normalization)"),
            "conv_tail": (config.use_short_conv, (config.conv_size - 1, 3 * config.num_heads * config.head_dim),
                          "the short-convolution tail (use_short_conv)"),
        }
        for index, layer in enumerate(self.layers):
            if layer.fast_weights is None:
                continue  # nothing written yet
            for name, (needed, shape, what) in parts.items():
                value = getattr(layer, name)
                if needed and value is None:
                    raise ValueError(f"The cache lacks {what} in layer {index}, which this model's config needs: it "
                                     "comes from another model.")
                if not needed and value is not None:
                    raise ValueError(f"The cache holds {what} in layer {index}, which this model's config does not "
                                     "use: it comes from another model.")
                if value is not None and tuple(value.shape[1:]) != shape:
                    raise ValueError(f"The cache's {name} in layer {index} has shape {tuple(value.shape)}, but this "
                                     f"model writes [rows, {', '.join(map(str, shape))}]: it comes from another model.")

    def detach(self) -> "FWPCache":
        """A copy cut from the autograd graph: carry it into the next training segment (truncated backprop)."""
        copy = FWPCache(len(self.layers))
        for source, target in zip(self.layers, copy.layers):
            target.fast_weights = None if source.fast_weights is None else source.fast_weights.detach()
            target.z = None if source.z is None else source.z.detach()
            target.conv_tail = None if source.conv_tail is None else source.conv_tail.detach()
            target.row_tokens = None if source.row_tokens is None else source.row_tokens.clone()
            target.seen_tokens = source.seen_tokens
        return copy

    def state_nbytes(self) -> int:
        """Bytes held by all tensors of the cache (constant in the context length)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    # --- the transformers Cache API ------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no maximum: the state has the same size for any length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.layers[layer_idx or 0].fast_weights is not None

    @property
    def is_initialized(self) -> bool:
        return any(layer.fast_weights is not None for layer in self.layers)

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            if layer.fast_weights is not None:
                return layer.fast_weights.shape[0]
        return -1

    @property
    def max_batch_size(self) -> int:
        return self.batch_size

    def reorder_cache(self, beam_idx: torch.LongTensor):
        for layer in self.layers:
            layer.map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        for layer in self.layers:
            layer.map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        for layer in self.layers:
            layer.map_rows(lambda t: t[indices.to(t.device)])

    def crop(self, max_length: int):
        seen = self.get_seq_length()
        keep = seen + max_length if max_length < 0 else max_length
        if keep >= seen:
            return  # nothing to remove
        raise ValueError(
            f"FWPCache cannot be cropped to {keep} of its {seen} tokens: a fast-weight state is a sum over all tokens "
            "seen and cannot be rolled back. Re-run the prompt instead (assisted/speculative decoding and contrastive "
            "search that need cropping are not supported)."
        )

    def reset(self):
        for i in range(len(self.layers)):
            self.layers[i] = FWPLayerState()

    def __repr__(self):
        return f"{type(self).__name__}(layers={len(self.layers)}, seen_tokens={self.get_seq_length()}, bytes={self.state_nbytes()})"


class FWPStaticCache(FWPCache):
    """An FWPCache whose tensors are allocated once, for `max_batch_size` rows, and updated in place.

    `generate(..., cache_implementation="static")` builds it. Its memory never moves, so a decode step can be
    captured (torch.compile with CUDA graphs, `FWPForCausalLM.get_compiled_call`) and replayed on the same buffers.
    A zero state is the empty state (no write yet, no conv history, positions from 0), so the buffers start at zero
    and the first forward needs no special case. Row operations that keep the row count (beam reordering) work in
    place; ones that change it are refused: size the cache for `num_beams * num_return_sequences * batch` rows.
    """

    is_compileable = True

    def __init__(self, config, max_batch_size: int, device=None, dtype=torch.float32):
        super().__init__(config=config)
        self.model_dtype = dtype
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # the state never goes below fp32
        heads, key_dim, value_dim = config.num_heads, config.key_dim, config.head_dim
        for layer in self.layers:
            layer.fast_weights = torch.zeros(max_batch_size, heads, key_dim, value_dim, dtype=state_dtype, device=device)
            if config.attention_normalization:
                layer.z = torch.zeros(max_batch_size, heads, key_dim, dtype=state_dtype, device=device)
            if config.use_short_conv:
                layer.conv_tail = torch.zeros(max_batch_size, config.conv_size - 1, 3 * heads * value_dim, dtype=dtype,
                                              device=device)
            layer.row_tokens = torch.zeros(max_batch_size, dtype=torch.long, device=device)
            for tensor in layer.tensors():  # in-place updates of these are allowed inside a captured graph
                torch._dynamo.mark_static_address(tensor)
        self._layer_tensors = [layer.tensors() for layer in self.layers]

    def layer_tensors(self) -> list[tuple]:
        """Every layer's buffers (`FWPLayerState.tensors()` order), the captured decode step's input. They never
        move (every update is in place), so the list is made once, not at every step."""
        return self._layer_tensors

    def write(self, layer_idx: int, fast_weights, z, conv_tail, new_columns: int, new_row_tokens: torch.Tensor):
        layer = self.layers[layer_idx]
        for buffer, value in ((layer.fast_weights, fast_weights), (layer.z, z), (layer.conv_tail, conv_tail)):
            if buffer is not None and value is not None:
                buffer.copy_(value)
        layer.seen_tokens += new_columns
        layer.row_tokens.add_(new_row_tokens)

    def advance(self, new_columns: int):
        """Counts columns a captured step consumed (the step itself updated the tensors)."""
        for layer in self.layers:
            layer.seen_tokens += new_columns

    def snapshot(self) -> list[FWPLayerState]:
        return [FWPLayerState(**{name: value.clone() if torch.is_tensor(value) else value
                                 for name, value in vars(layer).items()}) for layer in self.layers]

    def restore(self, snapshot: list[FWPLayerState]):
        for layer, saved in zip(self.layers, snapshot):
            for name, value in vars(saved).items():
                if torch.is_tensor(value):
                    getattr(layer, name).copy_(value)
                else:
                    setattr(layer, name, value)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        for layer in self.layers:
            for tensor in layer.tensors():
                tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_repeat_interleave(self, repeats: int):
        raise ValueError("FWPStaticCache has a fixed number of rows; allocate it for every row generate() will use "
                         "(num_beams * num_return_sequences * batch).")

    def batch_select_indices(self, indices: torch.Tensor):
        raise ValueError("FWPStaticCache has a fixed number of rows and cannot select a subset of them.")

    def reset(self):
        for layer in self.layers:
            for tensor in layer.tensors():
                tensor.zero_()
            layer.seen_tokens = 0


__all__ = ["FWPCache", "FWPLayerState", "FWPStaticCache"]
