"""The stacked models of the synthetic retrieval experiments: many independent single-layer fast-weight models
(one per run) whose parameters lie on a leading run axis, so that each op call of modeling_fwp's `sum_rule` /
`delta_rule` treats runs as heads (`RunBank`), with their feature maps (`build_feature_map`, `normalize_qk`), their
initialisation and their loss.
"""

from __future__ import annotations

import functools
import math
import zlib

import torch
import torch.nn.functional as F

from modeling_fwp.feature_maps import build_feature_map, normalize_qk
from modeling_fwp.ops import delta_rule, sum_rule

from .task import RunSpec

D_KEY = 64  # key size before phi (paper: 64)
SUM_RULE_EPS = 1e-6  # z denominator (official synthetic code)

# model name -> (feature map name, build_feature_map kwargs); softmax has no feature map.
MODELS = {
    "linear": ("elu_plus_one", {}),
    "dpfp1": ("dpfp", {"dpfp_nu": 1}),
    "dpfp2": ("dpfp", {"dpfp_nu": 2}),
    "dpfp3": ("dpfp", {"dpfp_nu": 3}),
    "favor64": ("favor", {"favor_features": 64}),
    "favor128": ("favor", {"favor_features": 128}),
    "favor512": ("favor", {"favor_features": 512}),
    "softmax": (None, {}),
}
LABELS = {"linear": "Linear", "dpfp1": "DPFP-1", "dpfp2": "DPFP-2", "dpfp3": "DPFP-3", "favor64": "FAVOR+ 64",
          "favor128": "FAVOR+ 128", "favor512": "FAVOR+ 512", "softmax": "Softmax"}
SETTING1_MODELS = ["linear", "dpfp1", "dpfp2", "dpfp3", "favor64", "favor128", "favor512", "softmax"]
SETTING2_MODELS = ["linear", "dpfp1", "dpfp2"]


@functools.lru_cache(maxsize=None)
def feature_dim(model: str) -> int:
    """d_dot of a model, from the feature map module itself (built once, without touching the global RNG)."""
    name, kwargs = MODELS[model]
    if name is None:
        return D_KEY
    with torch.random.fork_rng(devices=[]):
        return build_feature_map(name, D_KEY, **kwargs).out_dim



def _uniform(generator, shape, bound):
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def init_run_parameters(spec: RunSpec):
    """Initialisation of one run as in the official synthetic code: key embedding N(0, 1); W_K, W_Q uniform
    +-1/sqrt(d_key) for the linear models and Xavier for softmax; biases and W_beta as nn.Linear's default."""
    generator = torch.Generator().manual_seed(zlib.crc32(repr(spec.key()).encode()))
    e, s, d = spec.d_emb, spec.S, D_KEY
    if spec.rule == "softmax":
        w_k = _uniform(generator, (e + s, d), math.sqrt(6 / (e + s + d)))
        w_q = _uniform(generator, (e, d), math.sqrt(6 / (e + d)))
    else:
        w_k = _uniform(generator, (e + s, d), 1 / math.sqrt(d))
        w_q = _uniform(generator, (e, d), 1 / math.sqrt(d))
    return {
        "emb": torch.randn(s, e, generator=generator, dtype=torch.float64),
        "w_k": w_k, "b_k": _uniform(generator, (d,), 1 / math.sqrt(e + s)),
        "w_q": w_q, "b_q": _uniform(generator, (d,), 1 / math.sqrt(e)),
        "w_beta": _uniform(generator, (e + s, 1), 1 / math.sqrt(e + s)),
        "b_beta": _uniform(generator, (1,), 1 / math.sqrt(e + s)),
    }


MODEL_ORDER = {m: i for i, m in enumerate(SETTING1_MODELS)}


class RunBank:
    """The parameters of R independent single-layer models, stacked on a leading run axis and zero-padded.

    Input of run r at step t: x = [e(key_t) (d_emb dims, padded to E); onehot(value_t) (S dims, padded to S_pad)].
    k = x W_K + b_K,  q = e(query) W_Q + b_Q  (d_key = 64),  beta = sigmoid(x W_beta + b_beta).
    Runs are ordered so that each op call (same rule) and each feature map inside it is a contiguous slice."""

    def __init__(self, specs, device, dtype=torch.float32, backend="chunk", chunk_size=64, params=None,
                 feature_maps=None, split_features=None):
        if len({s.replace for s in specs}) != 1:
            raise ValueError("a RunBank holds runs of one setting (all with or all without replacement)")
        self.device, self.dtype, self.backend, self.chunk_size = device, dtype, backend, chunk_size
        self.s_pad = max(s.S for s in specs)
        self.l_pad = max(s.length for s in specs)
        self.e_pad = max(s.d_emb for s in specs)
        self.replace = specs[0].replace
        # Large buckets are FLOP-bound: one op call per feature size avoids padding small d_dot up to large ones.
        # Small buckets are launch-bound: fewer, padded calls.
        self.split_features = self.s_pad >= 300 if split_features is None else split_features
        self.specs = sorted(specs, key=lambda s: (self._op_call_key(s), MODEL_ORDER[s.model], s.S, s.seed))
        self.feature_maps = feature_maps if feature_maps is not None else self._build_feature_maps(specs)
        self.params = params if params is not None else self._initial_parameters()
        count = len(self.specs)
        self.emb_mask = torch.zeros(count, 1, self.e_pad, device=device, dtype=dtype)
        self.step_mask = torch.zeros(count, 1, self.l_pad, device=device, dtype=dtype)
        for r, spec in enumerate(self.specs):
            self.emb_mask[r, :, : spec.d_emb] = 1
            self.step_mask[r, :, : spec.length] = 1
        # Runs with the same S share the data; data_index maps a run to its data row.
        self.data_sizes = sorted({s.S for s in self.specs})
        self.data_lengths = [s if not self.replace else 2 * s for s in self.data_sizes]
        self.data_index = torch.tensor([self.data_sizes.index(s.S) for s in self.specs], device=device)
        self.op_calls = self._op_calls()

    def _build_feature_maps(self, specs):
        """One module per model's feature map (DPFP-nu for each nu used), shared by all runs of that model."""
        maps = {}
        for spec in specs:
            name, kwargs = MODELS[spec.model]
            if name is not None and spec.model not in maps:
                maps[spec.model] = build_feature_map(name, D_KEY, **kwargs).to(self.device)
        return maps

    def _op_call_key(self, spec):
        """Runs with equal keys share one op call: same rule; the same d_dot (split_features) or, otherwise, all
        d_dot <= 384 together (padded to the largest) and larger ones (FAVOR+ 512) apart."""
        size = feature_dim(spec.model)
        return (spec.rule, size if self.split_features else size > 384)

    def _initial_parameters(self):
        count, e_pad, s_pad = len(self.specs), self.e_pad, self.s_pad
        shapes = {"emb": (s_pad, e_pad), "w_k": (e_pad + s_pad, D_KEY), "b_k": (D_KEY,), "w_q": (e_pad, D_KEY),
                  "b_q": (D_KEY,), "w_beta": (e_pad + s_pad, 1), "b_beta": (1,)}
        stacked = {name: torch.zeros((count,) + shape, dtype=torch.float64) for name, shape in shapes.items()}
        for r, spec in enumerate(self.specs):
            p = init_run_parameters(spec)
            e, s = spec.d_emb, spec.S
            stacked["emb"][r, :s, :e] = p["emb"]
            for name in ("w_k", "w_beta"):  # rows: embedding dims first, then the one-hot dims
                stacked[name][r, :e] = p[name][:e]
                stacked[name][r, e_pad : e_pad + s] = p[name][e:]
            stacked["w_q"][r, :e] = p["w_q"]
            for name in ("b_k", "b_q", "b_beta"):
                stacked[name][r] = p[name]
        return {name: t.to(self.device, self.dtype).requires_grad_() for name, t in stacked.items()}

    def _op_calls(self):
        """[(rule, width, start, end, [(feature key, start, end, dim mask or None)])]: contiguous run slices that
        share one op call (same rule; features padded to `width`) and, inside, one feature map."""
        calls = []
        for r, spec in enumerate(self.specs):
            group = self._op_call_key(spec)
            if not calls or calls[-1][0] != group:
                calls.append([group, r, r + 1])
            calls[-1][2] = r + 1
        result = []
        for (rule, _), start, end in calls:
            width = max(feature_dim(self.specs[r].model) for r in range(start, end))
            parts = []
            for r in range(start, end):
                key = "dpfp" if MODELS[self.specs[r].model][0] == "dpfp" else self.specs[r].model
                if not parts or parts[-1][0] != key:
                    parts.append([key, r, r + 1])
                parts[-1][2] = r + 1
            pieces = []
            for key, a, b in parts:
                models = [self.specs[r].model for r in range(a, b)]
                mask = None
                if key == "dpfp":  # consecutive DPFP-nu runs share the map of their largest nu, masked per run
                    key = max(models, key=feature_dim)
                    dims = [feature_dim(m) for m in models]
                    if min(dims) < feature_dim(key):
                        mask = (torch.arange(feature_dim(key), device=self.device)
                                < torch.tensor(dims, device=self.device)[:, None]).to(self.dtype)
                pieces.append((key, a, b, mask))
            result.append((rule, width, start, end, pieces))
        return result

    def select(self, keep):
        """A bank of the runs `keep` (indices) continuing from their current parameter values; padding shrinks
        when the largest runs leave."""
        bank = RunBank([self.specs[i] for i in keep], self.device, self.dtype, self.backend, self.chunk_size,
                       params={}, feature_maps=self.feature_maps)
        index = torch.tensor(keep, device=self.device)
        bank.params = {n: bank.copy_block(p.detach()[index], n, self).requires_grad_() for n, p in self.params.items()}
        return bank

    def copy_block(self, stacked, name, old):
        """The part of `stacked` (laid out like `old`'s parameter `name`, runs already selected and in this bank's
        order) that this bank keeps: padding beyond this bank's sizes is dropped."""
        e_pad, s_pad = self.e_pad, self.s_pad
        if name in ("w_k", "w_beta"):  # rows: embedding dims, then one-hot dims
            return torch.cat([stacked[:, :e_pad], stacked[:, old.e_pad : old.e_pad + s_pad]], dim=1).contiguous()
        if name == "emb":
            return stacked[:, :s_pad, :e_pad].contiguous()
        if name == "w_q":
            return stacked[:, :e_pad].contiguous()
        return stacked.clone()

    # ------------------------------------------------------------------------------------------- forward

    def embed(self):
        return self.params["emb"] * self.emb_mask  # padded embedding dims stay exactly zero, with zero gradient

    def write_inputs(self, keys, values):
        """keys, values [R, B, L_pad] -> k_pre [R, B, L, 64], onehot values [R, B, L, S_pad], beta [R, B, L].

        x W = e(key) W_emb + onehot(value) W_onehot: both terms are table look-ups (per-key projections computed
        once per step, and rows of W_onehot), so the [R, B, L, E + S] input is never built."""
        count, batch, length = keys.shape
        e_pad = self.e_pad
        runs = torch.arange(count, device=self.device)[:, None, None]
        w_k, w_beta = self.params["w_k"], self.params["w_beta"]
        embedded = self.embed()
        key_table = torch.baddbmm(self.params["b_k"][:, None, :], embedded, w_k[:, :e_pad])  # [R, S_pad, 64]
        beta_table = torch.baddbmm(self.params["b_beta"][:, None, :], embedded, w_beta[:, :e_pad])
        k_pre = key_table[runs, keys] + w_k[:, e_pad:][runs, values]
        beta = torch.sigmoid(beta_table[runs, keys] + w_beta[:, e_pad:][runs, values])[..., 0]
        onehot = keys.new_zeros(keys.shape + (self.s_pad,), dtype=self.dtype).scatter_(-1, values[..., None], 1.0)
        onehot = onehot * self.step_mask[:, :, :length, None]  # padding steps store nothing
        return k_pre, onehot, beta

    def query_inputs(self, query_ids):
        """query_ids [R, J] -> q_pre [R, J, 64]."""
        runs = torch.arange(query_ids.shape[0], device=self.device)[:, None]
        e_q = self.embed()[runs, query_ids]
        return torch.baddbmm(self.params["b_q"][:, None, :], e_q, self.params["w_q"])

    def features(self, pieces, start, x, width, normalise):
        """phi of x [r, ..., 64] (runs start.. of one op call), each piece by its feature map, padded to width."""
        outputs = []
        for key, a, b, mask in pieces:
            phi = self.feature_maps[key](x[a - start : b - start])
            if mask is not None:  # DPFP-nu inside DPFP-(max nu): keep the first 2 * d_key * nu features
                phi = phi * mask.view(mask.shape[0], *[1] * (phi.dim() - 2), -1)
            if normalise:  # delta models: sum normalisation (Eq. 29) of both phi(k) and phi(q)
                phi = normalize_qk(phi, "sum", eps=1e-6)
            outputs.append(F.pad(phi, (0, width - phi.shape[-1])))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def retrieve(self, keys, values, q_pre):
        """Write every run's sequences, then read the final memory with its queries (reads never write).

        keys, values [R, B, L]; q_pre [R, B or 1, J, 64]. Returns y [R, B, J, S_pad]."""
        batch = keys.shape[1]
        k_pre, onehot, beta = self.write_inputs(keys, values)
        step_mask = self.step_mask[:, :, : keys.shape[2]]
        pieces = []
        for rule, width, a, b, parts in self.op_calls:
            if rule == "softmax":  # softmax attention over the stored pairs
                scores = q_pre[a:b] @ k_pre[a:b].transpose(-1, -2) / math.sqrt(D_KEY)  # [r, B, J, L]
                scores = scores.masked_fill(step_mask[a:b, :, None, :] == 0, float("-inf"))
                pieces.append(torch.softmax(scores, dim=-1) @ onehot[a:b])
                continue
            normalise = rule == "delta"
            phi_k = self.features(parts, a, k_pre[a:b], width, normalise) * step_mask[a:b, ..., None]
            phi_q = self.features(parts, a, q_pre[a:b], width, normalise)
            to_op = lambda t: t.permute(1, 2, 0, 3).contiguous()  # noqa: E731  [r, B, L, D] -> [B, L, r, D]
            if rule == "sum":
                # An extra value column of ones makes the op accumulate z = sum_t phi(k_t) next to the memory.
                # q is a placeholder (the op's per-step outputs are not used: queries read the final state).
                # Chunks of 128: fewer chunk-boundary states to hold (chunks * K * V per run).
                v_aug = torch.cat([onehot[a:b], step_mask[a:b, ..., None].expand(-1, batch, -1, -1)], dim=-1)
                phi_k_op = to_op(phi_k)
                _, state = sum_rule(phi_k_op, phi_k_op, to_op(v_aug), scale=1.0, output_final_state=True,
                                    backend=self.backend, chunk_size=max(self.chunk_size, 128))
            else:
                phi_k_op = to_op(phi_k)
                _, state = delta_rule(phi_k_op, phi_k_op, to_op(onehot[a:b]), beta[a:b].permute(1, 2, 0).contiguous(),
                                      scale=1.0, output_final_state=True, backend=self.backend,
                                      chunk_size=self.chunk_size)
            read = phi_q @ state.to(self.dtype).transpose(0, 1)  # o = S^T phi(q): [r, B|1, J, K] @ [r, B, K, V]
            if rule == "sum":
                read = read[..., :-1] / (read[..., -1:] + SUM_RULE_EPS)  # attention normalisation: / z . phi(q)
            pieces.append(read)
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def redraw(self):
        for fm in self.feature_maps.values():
            fm.redraw()  # FAVOR+: a fresh random matrix per forward pass (official synthetic code); no-op otherwise


def per_run_loss(y, targets):
    """y [R, B, J, S_pad], targets [R, B, J] (-1 = no query) -> mean over queries of 1/2 ||v* - y||^2, [R]."""
    valid = targets >= 0
    onehot = F.one_hot(targets.clamp(min=0), y.shape[-1]).to(y.dtype)
    squared = 0.5 * (y - onehot).pow(2).sum(-1) * valid
    return squared.sum((1, 2)) / valid.sum((1, 2)).clamp(min=1)

