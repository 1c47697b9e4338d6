"""Where each token of a forward sits: the layout the layers run on, and the positions it gives them.

Padding and packed documents are handled by *unpadding*: the real tokens of all rows are laid end to end with
`cu_seqlens` boundaries, so a pad token never reaches the fast weights, the convolution tail or the positions
(`build_layout`). Under torch.compile / torch.export a padded batch takes the masked layout instead, which keeps
every shape fixed (`masked_layout`). Positions count each token's place in its own sequence, continuing from the
cache; the rotary and sinusoidal position embeddings are computed from them here too.

Used by the model (`modeling_fwp.py`) and by the captured decode step (`generation_fwp.py`).
"""

from dataclasses import dataclass

import torch

from .configuration_fwp import FWPConfig


@dataclass
class SequenceLayout:
    """How the tokens of a forward are laid out for the layers.

    Either `cu_seqlens` is None and hidden states stay [B, T, D] (every row is one sequence, no padding), or the
    real tokens are packed into [1, total, D] with `cu_seqlens` marking the N sequences (`unpad_index` maps them back
    to the flattened [B*T] grid). `positions` counts each token's place in its own sequence, continuing from the
    cache; `row_tokens` is how many real tokens each of the N sequences adds in this forward. `backend`, when set,
    overrides `config.kernel_backend` for the update rule (the captured decode step keeps to plain PyTorch ops).
    `state_in_place` (the captured decode step: one token per row, no packing) makes the update rule write the
    given fast-weight tensors in place (`decode_triton.rule_step_`) instead of returning new ones.

    The masked layout (a padding mask, no packing; `masked_layout`) keeps [B, T, D] with no shape that depends on
    the data: `order` [B, T] moves each row's real tokens to its first columns, in order, and its pads after them
    (`place` is the inverse permutation, `input_mask` the mask it came from); `token_mask` marks the real tokens
    in the moved layout. Each row is then one sequence followed by pads, and a layer makes the pads write nothing
    (`mask_tokens`: zero keys and beta; the convolution's new tail is taken after the last real token).
    """

    batch_size: int
    seq_len: int
    positions: torch.Tensor
    row_tokens: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    unpad_index: torch.Tensor | None = None
    backend: str | None = None
    state_in_place: bool = False
    order: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    place: torch.Tensor | None = None
    input_mask: torch.Tensor | None = None

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        if self.order is not None:  # masked: each row's real tokens first, in order, then its pads
            return x.gather(1, self.order[..., None].expand_as(x))
        if self.unpad_index is None:
            return x
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.unpad_index).unsqueeze(0)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        if self.order is not None:  # back to the input's columns, zero at the pads (as the unpadded path gives)
            back = x.gather(1, self.place[..., None].expand_as(x))
            return torch.where(self.input_mask[..., None], back, torch.zeros((), dtype=x.dtype, device=x.device))
        if self.unpad_index is None:
            return x
        out = x.new_zeros(self.batch_size * self.seq_len, *x.shape[2:])
        out = out.index_copy(0, self.unpad_index, x[0])
        return out.view(self.batch_size, self.seq_len, *x.shape[2:])

    def mask_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, ...] with the pads of a masked layout set to 0 (unchanged in the other layouts)."""
        if self.token_mask is None:
            return x
        mask = self.token_mask.view(*self.token_mask.shape, *([1] * (x.dim() - 2)))
        return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Packed documents in one row (DataCollatorWithFlattening): a new document starts wherever the position does not
    continue the previous one. Returns None for a single document."""
    pos = position_ids[0]
    starts = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
    if starts.numel() == 0:
        return None
    bounds = [torch.zeros(1, dtype=starts.dtype, device=pos.device), starts,
              torch.tensor([pos.numel()], dtype=starts.dtype, device=pos.device)]
    return torch.cat(bounds).to(torch.int32)


def build_layout(batch_size, seq_len, device, attention_mask=None, cu_seqlens=None, position_ids=None,
                 past_row_tokens=None, masked=False) -> SequenceLayout:
    """`masked`: a padding mask gives `masked_layout` (fixed shapes) instead of unpadding into cu_seqlens."""
    if cu_seqlens is None and position_ids is not None and batch_size == 1 and attention_mask is None and seq_len > 1:
        cu_seqlens = cu_seqlens_from_position_ids(position_ids)
    if cu_seqlens is not None:
        if batch_size != 1:
            raise ValueError(f"cu_seqlens (packed documents) needs a batch of one row; got batch size {batch_size}.")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("Pass either cu_seqlens (packed documents) or a padding attention_mask, not both.")
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != seq_len or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to the sequence length {seq_len}; got {cu_seqlens.tolist()}.")
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq_index = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
        offsets = torch.arange(seq_len, device=device) - cu_seqlens[:-1].long()[seq_index]
        past = 0 if past_row_tokens is None else past_row_tokens.to(device)[seq_index]
        positions = (offsets + past).unsqueeze(0)
        return SequenceLayout(1, seq_len, positions, lengths, cu_seqlens=cu_seqlens,
                              unpad_index=torch.arange(seq_len, device=device))

    past = torch.zeros(batch_size, dtype=torch.long, device=device) if past_row_tokens is None else past_row_tokens.to(device)
    if attention_mask is not None and masked:
        return masked_layout(attention_mask.to(device).bool(), past)
    if attention_mask is None or bool(attention_mask.all()):
        positions = past[:, None] + torch.arange(seq_len, device=device)[None]
        row_tokens = torch.full((batch_size,), seq_len, dtype=torch.long, device=device)
        return SequenceLayout(batch_size, seq_len, positions, row_tokens)

    mask = attention_mask.to(device).bool()
    row_tokens = mask.sum(dim=1)
    cu = torch.zeros(batch_size + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(row_tokens, 0)
    unpad_index = torch.nonzero(mask.flatten()).flatten()
    positions = (past[:, None] + torch.cumsum(mask.long(), dim=1) - 1).flatten()[unpad_index].unsqueeze(0)
    return SequenceLayout(batch_size, seq_len, positions, row_tokens, cu_seqlens=cu, unpad_index=unpad_index)


def use_masked_layout(attention_mask: torch.Tensor) -> bool:
    """Whether a padded batch (not packed) runs in `masked_layout` rather than unpadded into cu_seqlens. Both are
    exact. Under torch.compile / torch.export always: the unpadded layout's sizes depend on the data."""
    return torch.compiler.is_compiling()


def masked_layout(mask: torch.Tensor, past: torch.Tensor) -> SequenceLayout:
    """The layout of a padded batch that keeps every shape fixed (no host sync, nothing sized by the data), for
    torch.compile and torch.export: any 0/1 `mask` [B, T] (left, right or inner padding), `past` [B] the tokens
    each row has in the cache. A token's column in the moved layout is its rank among its row's real tokens, or
    the row's real-token count plus its rank among the pads: a stable permutation built with cumulative sums."""
    batch_size, seq_len = mask.shape
    real = mask.long()
    row_tokens = real.sum(dim=1)
    place = torch.where(mask, real.cumsum(1) - 1, row_tokens[:, None] + (1 - real).cumsum(1) - 1)
    columns = torch.arange(seq_len, device=mask.device)
    order = torch.empty_like(place).scatter_(1, place, columns.expand_as(place).contiguous())
    positions = past[:, None] + columns[None]
    return SequenceLayout(batch_size, seq_len, positions, row_tokens, order=order,
                          token_mask=columns[None] < row_tokens[:, None], place=place, input_mask=mask)


# ----------------------------------------------------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------------------------------------------------
def rotary_embed(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotates pairs (i, i + d/2) of x [b, t, H, d] by angles positions * theta^(-2i/d), computed in fp32."""
    dim, dtype = x.shape[-1], torch.promote_types(x.dtype, torch.float32)
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=x.device, dtype=dtype) / dim)
    angles = positions.to(dtype)[..., None] * inv_freq  # [b, t, d/2]
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
    x1, x2 = x.to(dtype).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def add_sinusoidal_positions(hidden: torch.Tensor, positions: torch.Tensor, config: FWPConfig) -> torch.Tensor:
    """The absolute positions of position_embedding="sinusoidal", added to the embeddings (others: unchanged)."""
    if config.position_embedding != "sinusoidal":
        return hidden
    return hidden + sinusoidal_embedding(positions, config.hidden_size, config.rope_theta, hidden.dtype).to(hidden.dtype)


def sinusoidal_embedding(positions: torch.Tensor, dim: int, theta: float, dtype=torch.float32) -> torch.Tensor:
    """[sin, cos] of positions * theta^(-2i/dim), computed in (at least) fp32."""
    dtype = torch.promote_types(dtype, torch.float32)
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=dtype) / dim)
    angles = positions.to(dtype)[..., None] * inv_freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1)
