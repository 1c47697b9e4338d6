"""Next-token cross-entropy over the model's logits, in row chunks.

The reference is transformers' `ForCausalLMLoss` (labels shifted left, -100 ignored, a sum divided by
`num_items_in_batch` when the Trainer passes it, else a mean). That function upcasts the whole [tokens, vocab] logits
to fp32 and autograd keeps the fp32 log-softmax for backward: at 16k tokens x 32k vocabulary that is ~4 GB of fp32
copies on top of the bf16 logits. Here each chunk of rows is upcast on its own, only the per-row log-sum-exp is
saved, and the backward rebuilds softmax(logits) - onehot chunk by chunk. The math is the same, in fp32 (fp64 for
fp64 logits); the logits are not modified, so they stay valid for the caller.

On CUDA (fp16 / bf16 / fp32 logits, triton installed) `causal_lm_loss` runs the same math as two fused Triton kernels
instead (`loss_triton.cross_entropy_sum_triton`: one read of the logits forward, one read and one write backward);
this chunked version stays the reference, and the path for CPU and fp64.
"""

import torch

try:  # optional fused kernel; without triton (or on CPU) the chunked PyTorch loss below runs
    from .loss_triton import HAS_TRITON_LOSS, cross_entropy_sum_triton
except ImportError:  # pragma: no cover
    HAS_TRITON_LOSS = False

IGNORE_INDEX = -100
BACKENDS = ("auto", "triton", "torch")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum over rows of -log softmax(logits)[target] (rows whose target is IGNORE_INDEX count zero)."""

    @staticmethod
    def forward(ctx, logits, targets, chunk_rows):
        acc = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
        total = torch.zeros((), dtype=acc, device=logits.device)
        valid = targets != IGNORE_INDEX
        safe_targets = torch.where(valid, targets, 0)
        for start in range(0, logits.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            chunk = logits[rows].to(acc)
            lse[rows] = torch.logsumexp(chunk, dim=-1)
            picked = chunk.gather(1, safe_targets[rows, None])[:, 0]
            total += ((lse[rows] - picked) * valid[rows]).sum()
        ctx.save_for_backward(logits, safe_targets, valid, lse)
        ctx.chunk_rows = chunk_rows
        return total

    @staticmethod
    def backward(ctx, grad_total):
        logits, safe_targets, valid, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            probs = torch.exp(logits[rows].to(lse.dtype) - lse[rows, None])
            probs.scatter_add_(1, safe_targets[rows, None], -torch.ones_like(lse[rows, None]))
            grad[rows] = (probs * (valid[rows, None] * grad_total)).to(grad.dtype)
        return grad, None, None


def check_targets(targets, vocab_size: int, name: str = "labels"):
    """Targets are token ids in [0, vocab_size) or IGNORE_INDEX; anything else would index the wrong logit or fail
    inside the gather with an unhelpful message."""
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids (or {IGNORE_INDEX} to ignore a position); got dtype "
                         f"{targets.dtype}.")
    if torch.compiler.is_compiling():  # a graph cannot branch on values (as check_inputs skips its id check)
        return
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        raise ValueError(f"{name} holds {int(targets[bad][0])}, which is neither a token id in [0, vocab_size="
                         f"{vocab_size}) nor {IGNORE_INDEX} (ignored).")


def check_num_items(num_items_in_batch, counted) -> None:
    """`num_items_in_batch` counts the targets of the whole accumulated (and gathered) batch, so it is never below 0
    and is 0 only when no micro-batch has a target. Anything else would scale the loss wrongly without a word: 0 with
    targets here gave the undivided sum. (One host sync, like the label check; skipped inside a compiled graph.)"""
    if torch.compiler.is_compiling():
        return
    if isinstance(num_items_in_batch, bool) or not (torch.is_tensor(num_items_in_batch) and num_items_in_batch.numel() == 1
                                                    or isinstance(num_items_in_batch, (int, float))):
        raise ValueError(f"num_items_in_batch must be a number (or a one-element tensor) counting the targets of the "
                         f"accumulated batch; got {num_items_in_batch!r}.")
    value = num_items_in_batch.item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    if value < 0:
        raise ValueError(f"num_items_in_batch={value:g} is not valid: it counts targets, so it must be >= 0.")
    if value == 0 and int(counted) > 0:
        raise ValueError(f"num_items_in_batch=0 but the labels hold {int(counted)} targets: it must count the "
                         f"non-ignored targets of the whole accumulated batch (at least these {int(counted)}); 0 is "
                         f"only valid when every label is {IGNORE_INDEX}.")


def loss_backend(logits, backend: str = "auto") -> str:
    """"triton" or "torch": which implementation `causal_lm_loss` runs for these logits. "auto" takes the Triton
    kernels for fp16 / bf16 / fp32 CUDA logits when triton is installed; "triton" forces them (for tests: CPU
    tensors then need TRITON_INTERPRET=1), "torch" forces the chunked reference."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
    if backend == "auto":
        fits = logits.is_cuda and logits.dtype in _TRITON_DTYPES and logits.shape[-1] > 0
        return "triton" if HAS_TRITON_LOSS and fits else "torch"
    if backend == "triton" and not HAS_TRITON_LOSS:
        raise ImportError("causal_lm_loss(backend='triton') needs triton (modeling_fwp.loss_triton).")
    return backend


def causal_lm_loss(logits, labels=None, num_items_in_batch=None, shift_labels=None, chunk_rows: int = 4096,
                   backend: str = "auto"):
    """Loss of `logits` [B, T, V] predicting `labels` [B, T] shifted by one (as transformers' ForCausalLMLoss).

    `shift_labels` [B, T] are targets already aligned with the logits (what sequence/context-parallel training
    passes, since a shard's last target lives on the next shard); they take the place of `labels`. With
    `num_items_in_batch` (a number or tensor) the summed loss is divided by it, so gradient accumulation over
    several micro-batches is exact; otherwise it is the mean over the non-ignored targets. A batch with no target
    at all (every label -100) gives loss 0 with zero gradients, not NaN, with `num_items_in_batch` 0 as well (the
    Trainer's count over an accumulated batch without targets). `num_items_in_batch` 0 while this batch has targets,
    or below 0, is refused (`check_num_items`). `backend`: see `loss_backend` (`chunk_rows` applies to the "torch"
    path only)."""
    given = labels if shift_labels is None else shift_labels
    name = "labels" if shift_labels is None else "shift_labels"
    if given.shape != logits.shape[:2]:
        raise ValueError(f"{name} must have the shape [batch, seq_len] of the logits {tuple(logits.shape[:2])}; "
                         f"got {tuple(given.shape)}.")
    if shift_labels is None:
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]
    else:
        targets = shift_labels
    check_targets(targets, logits.shape[-1], name)
    targets = targets.reshape(-1).to(logits.device)
    rows = logits.reshape(-1, logits.shape[-1])
    if torch.compiler.is_compiling() and backend == "auto":
        # In a graph the compiler fuses the fp32 upcast into the reduction itself (the chunk loop would unroll, or
        # stop a dynamic row count; the Triton kernels are opaque to it).
        acc = torch.promote_types(rows.dtype, torch.float32)
        total = torch.nn.functional.cross_entropy(rows.to(acc), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    elif loss_backend(logits, backend) == "triton":
        total = cross_entropy_sum_triton(rows, targets, IGNORE_INDEX)
    else:
        total = _ChunkedCrossEntropy.apply(rows, targets, chunk_rows)
    counted = (targets != IGNORE_INDEX).sum()
    if num_items_in_batch is None:
        num_items_in_batch = counted
    else:
        check_num_items(num_items_in_batch, counted)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    # total is exactly 0 (and its gradient too) when nothing is counted, so dividing by max(n, 1) changes only 0/0
    return total / (num_items_in_batch.clamp(min=1) if torch.is_tensor(num_items_in_batch) else max(num_items_in_batch, 1))
