"""The task of the synthetic retrieval experiments (the command: scripts/paper/synthetic_retrieval.py): what one run
is (`RunSpec`: setting, model, update rule, S, seed) and the generator of its sequences and queries.

L (key, value) pairs over S symbols are written into one fast-weight memory, then a query key reads the final
memory; the target is that key's most recent value. Setting 1 (capacity) samples keys and values without
replacement with L = S; setting 2 (overwrites) samples with replacement with L = 2S. The generator draws the
sequences of several task sizes at once, zero-padded to the largest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RunSpec:
    setting: int  # 1: capacity (no replacement, L = S); 2: overwrites (replacement, L = 2S)
    model: str
    rule: str  # "sum" | "delta" | "softmax"
    S: int  # number of keys = number of values
    seed: int = 0

    @property
    def length(self) -> int:
        return self.S if self.setting == 1 else 2 * self.S

    @property
    def replace(self) -> bool:
        return self.setting == 2

    @property
    def d_emb(self) -> int:
        return (22 * self.S) // 10  # floor(1.1 * 2S) in integer arithmetic

    def key(self) -> tuple:
        return (self.setting, self.model, self.rule, self.S, self.seed)



_CONSTANTS = {}


def device_constant(values, device):
    """A cached device tensor of a tuple of ints: creating it every step would be a host-to-device copy, which
    synchronises the GPU stream."""
    key = (tuple(values), str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, device=device)
    return _CONSTANTS[key]


def sample_sequences(batch, sizes, lengths, replace, generator, device="cpu"):
    """Sequences for several task sizes at once: keys, values [D, batch, max(lengths)] with keys, values of
    row d in [0, sizes[d]). Without replacement a key (or value) occurs at most once per sequence. Positions
    beyond lengths[d] hold the key max(sizes) (a sentinel that is never a real key) and the value 0."""
    sizes_t, lengths_t = device_constant(sizes, device), device_constant(lengths, device)
    count, l_pad, s_pad = len(sizes), max(lengths), max(sizes)
    if not replace and any(l > s for s, l in zip(sizes, lengths)):
        raise ValueError(f"lengths={lengths} need replacement: a sequence cannot be longer than its symbol count")

    def draw():
        if replace:
            u = torch.rand(count, batch, l_pad, generator=generator, device=device)
            return (u * sizes_t[:, None, None]).long().clamp(max=s_pad - 1)
        # A random permutation of [0, S_d): sort uniform scores, symbols >= S_d get score 2 and sort last.
        u = torch.rand(count, batch, s_pad, generator=generator, device=device)
        u = u.masked_fill(torch.arange(s_pad, device=device) >= sizes_t[:, None, None], 2.0)
        return u.argsort(-1)[..., :l_pad]

    keys, values = draw(), draw()
    padding = torch.arange(l_pad, device=device) >= lengths_t[:, None, None]
    return keys.masked_fill(padding, s_pad), values.masked_fill(padding, 0)


def latest_values(keys, values, num_symbols):
    """[..., S]: the value of each key's most recent occurrence, -1 where the key does not occur.
    keys, values [..., L]; a key equal to num_symbols is padding and ignored."""
    shape, length = keys.shape[:-1], keys.shape[-1]
    keys, values = keys.reshape(-1, length), values.reshape(-1, length)
    later = torch.ones(length, length, dtype=torch.bool, device=keys.device).triu(1)  # [t, t'] t' > t
    overwritten = ((keys[:, :, None] == keys[:, None, :]) & later).any(-1)
    # Only each key's last occurrence is scattered into a real column (the rest go to a spare column), so the
    # result does not depend on the order in which scatter applies duplicate indices.
    index = torch.where(overwritten, torch.full_like(keys, num_symbols), keys)
    table = torch.full((keys.shape[0], num_symbols + 1), -1, dtype=torch.long, device=keys.device)
    table.scatter_(1, index, values)
    return table[:, :num_symbols].reshape(*shape, num_symbols)


def sample_queries(keys, table, lengths, generator):
    """One query per sequence, the key at a uniformly drawn position < lengths[d] (as the official code, so
    repeated keys are asked more often); target = its latest value. keys [D, B, L], table [D, B, S]."""
    count, batch, _ = keys.shape
    lengths_t = device_constant(lengths, keys.device)
    u = torch.rand(count, batch, 1, generator=generator, device=keys.device)
    position = (u * lengths_t[:, None, None]).long().clamp(max=keys.shape[-1] - 1)
    query = keys.gather(-1, position)
    return query, table.gather(-1, query)

