"""Launch planning for the Triton delta-rule kernels: block sizes, chunk bookkeeping and autotuning.

`_Plan` holds what the launches of one call share (shapes, block sizes, the chunk layout of packed sequences) and
launches a chunk-sequential kernel (`run_seq`: one program per sequence, head and V block, walking the chunks) or a
chunk-parallel one (`run_par`: one program per chunk and head). On a GPU `_launch` lets triton.autotune pick the
warps and stages (once per shape class, kept in Triton's disk cache) and says once per process why that first call
is slow; under the interpreter, with `TUNE` overrides or with FWP_TRITON_AUTOTUNE=0 the kernels launch with fixed
settings (the H200 autotuner's picks where measured).

Names with a leading underscore are private to the ops_triton_* files. This module raises ImportError without
triton.
"""
from __future__ import annotations

import inspect
import os
import warnings

import torch

try:  # guarded, so transformers' import check of a Hub folder does not demand triton from CPU users
    import triton
except ImportError as error:  # ops.py treats this as "no triton backend"
    raise ImportError(f"modeling_fwp.ops_triton_launch needs triton: {error}") from error

# Block-size overrides, for tests (to reach the multi-block code paths at tiny shapes) and for the
# benchmark's sweeps.  Keys: "BK_state", "BV_state" (sequential kernels), "BK", "BV" (parallel kernels),
# "fused_output" (bool), "warps_state", "stages_state", "warps", "recurrent_max_len".
TUNE: dict = {}


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TUNED: dict = {}
_AUTOTUNE_NOTICE = (
    "modeling_fwp: tuning the Triton delta-rule kernels for a new shape. The first call of each new shape class "
    "takes up to a minute (on an H100: first training step 53 s instead of 21 s, then steps about 15 % faster); "
    "Triton's disk cache keeps the picks for later runs on this machine. FWP_TRITON_AUTOTUNE=0 skips the tuning "
    "and launches with fixed settings."
)


_announced = False


def _announce_autotuning() -> None:
    """Say once per process why a first call is slow (a silent minute looks like a hang)."""
    global _announced
    if not _announced:
        _announced = True
        warnings.warn(_AUTOTUNE_NOTICE, stacklevel=3)


def _launch(kernel, grid, args, kwargs, configs, key, plain):
    """Launch `kernel`.  On a GPU its num_warps / num_stages (and BV for the sequential kernels) are picked
    by triton.autotune over `configs` (once per `key` values and dtypes); under the interpreter or with
    TUNE overrides it runs with the fixed meta-parameters `plain`.  grid: function of the meta-parameters."""
    if configs is None:
        meta = dict(kwargs, **plain)
        kernel[grid(meta)](*args, **meta)
        return
    ident = (id(kernel), tuple(key), tuple((tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
                                           for c in configs))
    tuned = _TUNED.get(ident)
    if tuned is None:
        _announce_autotuning()
        # cache_results (triton >= 3.2) stores the pick in triton's on-disk cache, so only the first process on a
        # machine pays the tuning time (DDP ranks, later runs, tests), not every process.
        extra = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
        tuned = _TUNED[ident] = triton.autotune(configs=configs, key=list(key), **extra)(kernel)
    tuned[grid](*args, **kwargs)


def _cfgs(pairs, **meta):
    return [triton.Config(dict(meta), num_warps=w, num_stages=st) for w, st in pairs]


def plan_chunk_size(chunk_size: int, key_dim: int, item: int) -> int:
    """The chunk size a call runs with. It changes only rounding, not the result.  The sequential kernels keep a
    chunk's q, k and w tiles ([BT, K] each) on chip: shrink the chunk where those would overflow shared memory
    (K = 512 in bf16, K >= 256 in fp32)."""
    kp = max(16, _pow2(key_dim))
    while chunk_size > 16 and chunk_size * kp * item * 3 > 96 * 1024:
        chunk_size //= 2
    return chunk_size


class _Plan:
    """Shapes, block sizes and chunk bookkeeping shared by the launches of one call."""

    def __init__(self, q, v, cu_seqlens, chunk_size):
        B, T, H, K = q.shape
        V = v.shape[-1]
        kp = max(16, _pow2(K))
        vp = max(16, _pow2(V))
        item = v.element_size()
        chunk_size = plan_chunk_size(chunk_size, K, item)
        self.B, self.T, self.H, self.K, self.V, self.BT = B, T, H, K, V, chunk_size
        self.kp = kp
        self.dtype = v.dtype
        self.prec = "ieee" if v.dtype == torch.float32 else "tf32"
        self.varlen = cu_seqlens is not None
        # FWP_TRITON_AUTOTUNE=0 skips the autotuner (about a minute per new shape class on an H100) and launches
        # with the fixed settings below (at K <= 64 the H200 autotuner's picks), ready at once.
        self.autotune = q.is_cuda and not _interpreting() and not TUNE and os.environ.get("FWP_TRITON_AUTOTUNE") != "0"
        # Sequential kernels: the state is NKB register blocks of [BK, BV] fp32.
        self.BK_s = TUNE.get("BK_state") or (kp if kp <= 64 else (64 if K <= 256 else 128))
        self.NKB = triton.cdiv(K, self.BK_s)
        if self.NKB > 4:
            raise ValueError(f"head dim K={K} needs more than 4 blocks of {self.BK_s}")
        bv_max = 64 if kp <= 128 else (32 if kp <= 256 else 16)  # state registers: kp * BV <= 8192 fp32
        self.bv_max, self.vp = bv_max, vp
        self.BV_s = min(TUNE.get("BV_state") or bv_max, vp)
        # Parallel kernels loop over K and V in blocks of BK / BV.
        self.BK = min(TUNE.get("BK") or 64, kp)
        self.BV = min(TUNE.get("BV") or 64, vp)
        self.warps_s = TUNE.get("warps_state") or (4 if kp * self.BV_s <= 8192 else 8)
        # Loads of the next chunk are software-pipelined; deeper where the tiles leave shared memory room.
        tile_bytes = chunk_size * kp * item * 3
        self.stages_s = TUNE.get("stages_state") or (3 if tile_bytes * 3 <= 200 * 1024 else 2)
        if self.varlen:
            cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
            self.N = cu.numel() - 1
            lens = cu[1:] - cu[:-1]
            nch = (lens + chunk_size - 1) // chunk_size
            ends = torch.cumsum(nch, 0)
            offs = ends - nch
            # Upper bound on the number of chunks that needs no host sync; surplus programs are masked off.
            self.G = T // chunk_size + self.N
            gid = torch.arange(self.G, device=q.device, dtype=torch.int32)
            seq = torch.searchsorted(ends, gid, right=True).clamp_(max=self.N - 1).to(torch.int32)
            local = gid - offs[seq]
            self.cu = cu
            self.chunk_offsets = offs.to(torch.int32).contiguous()
            self.chunk_indices = torch.stack([seq, local], 1).to(torch.int32).contiguous()
            self.grid_chunks = (self.G, H)
        else:
            self.N = B
            nt = triton.cdiv(T, chunk_size)
            self.G = B * nt
            self.cu = self.chunk_offsets = self.chunk_indices = None
            self.grid_chunks = (nt, B * H)
        # Autotuning key for the sequential kernels: how many (sequence, head) programs there are.
        self.NHB = min(_pow2(self.N * H), 1024)
        fused = TUNE.get("fused_output")
        if fused is None:
            # Folding the output into the sequential kernel saves storing and re-reading the chunk states;
            # a separate parallel kernel wins when very few (sequence, head) programs run (measured, H100).
            fused = self.N * H >= 32
        self.fused = fused

    def common(self):
        return dict(H=self.H, K=self.K, V=self.V, BT=self.BT, IS_VARLEN=self.varlen, PREC=self.prec)

    def fixed_bv_state(self, wide: bool) -> int:
        """BV of a sequential kernel when not autotuned: the H200 autotuner's picks (2026-12-02,
        results/bench/kernels_h200_autotuned_run5.json and kernels_h200_run8_*.json).  At K <= 64 half the widest
        block, i.e. twice the programs, except for the forward with the output fused in and the state backward
        (`wide`) at >= 256 sequence x head programs, where the SMs are busy anyway, and a quarter of it at
        <= 32 programs (one long sequence), where short per-chunk steps on more SMs win.  At K = 128 half."""
        if TUNE.get("BV_state") or self.kp > 128:
            return self.BV_s
        if self.kp > 64:
            return max(16, self.BV_s // 2)
        if self.NHB <= 32:
            return max(16, self.BV_s // 4)
        return self.BV_s if (wide and self.NHB >= 256) else max(16, self.BV_s // 2)

    def fixed_stages_state(self) -> int:
        """Pipelining depth of a sequential kernel when not autotuned: 4 at K <= 64 with <= 32 programs (the
        H200 autotuner's pick there, run 8), else as many as the tiles leave room for (stages_s)."""
        if TUNE.get("stages_state") or self.kp > 64 or self.NHB > 32:
            return self.stages_s
        return 4

    def run_seq(self, kernel, args, flags, key_flags, wide=False):
        """A chunk-sequential kernel, grid (V blocks, sequences x heads)."""
        nh = self.N * self.H

        def grid(meta):
            return (triton.cdiv(self.V, meta["BV"]), nh)
        kwargs = dict(self.common(), BK=self.BK_s, NKB=self.NKB, **flags)
        configs = None
        if self.autotune:
            # With few sequence x head programs (one long sequence) a quarter-width block puts more programs on the
            # SMs, each with a shorter per-chunk step: a candidate there.
            widths = (self.bv_max // 4, self.bv_max // 2, self.bv_max) if nh <= 32 else (self.bv_max // 2, self.bv_max)
            options = sorted({min(b, self.vp) for b in widths if b >= 16})
            configs = [triton.Config(dict(BV=bv), num_warps=4 if self.BK_s * self.NKB * bv <= 8192 else 8,
                                     num_stages=st) for bv in options for st in (2, 3, 4)]
        _launch(kernel, grid, args, kwargs, configs, ("K", "V", "BT", "NHB") + tuple(key_flags),
                dict(BV=self.fixed_bv_state(wide), num_warps=self.warps_s, num_stages=self.fixed_stages_state()))

    def run_par(self, kernel, args, extra, key_flags=(), nsplit=None, pairs=((2, 2), (4, 2), (4, 3), (8, 2)),
                plain=(4, 2)):
        """A chunk-parallel kernel, grid (chunks, heads[, nsplit]); `plain`: (num_warps, num_stages) when not
        autotuned (TUNE["warps"] overrides the warps)."""
        grid_c = self.grid_chunks if nsplit is None else self.grid_chunks + (nsplit,)
        kwargs = dict(self.common(), BK=self.BK, BV=self.BV, **extra)
        warps = TUNE.get("warps") or plain[0]
        _launch(kernel, lambda meta: grid_c, args, kwargs, _cfgs(pairs) if self.autotune else None,
                ("K", "V", "BT") + tuple(key_flags), dict(num_warps=warps, num_stages=plain[1]))
