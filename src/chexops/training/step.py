"""One optimizer step under a memory budget: the masked loss's denominator (over all ranks),
gradient accumulation over micro-batches, the out-of-memory fallback that halves the
micro-batch on every rank together (so DDP ranks stay in lockstep), and `batch_size: auto`,
the largest batch whose forward and backward fit on the GPU."""
from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from chexops.data.batches import to_input
from chexops.errors import ChexopsError
from chexops.inference.settings import CPU_AUTO_BATCH, Settings
from chexops.training import distributed

AUTO_BATCH_START = 1024   # largest batch tried on CUDA
MIN_MICRO_BATCH = 2       # BatchNorm needs two items per forward


def step_denominator(mask: torch.Tensor, s: Settings, over_ranks: bool = True) -> torch.Tensor:
    """The batch's label count that every chunk's loss is divided by; under DDP the mean over the
    ranks (one all-reduce), so averaging the ranks' gradients gives the global batch's gradient;
    under loss auc_margin the (T,) count per target.
    Computed once per step: an out-of-memory retry reuses it and makes no extra collective."""
    counts = mask.to(s.device, non_blocking=True).float()
    if s.auc is not None:  # AUC margin: one count per target, unclamped (0: no labels, skipped)
        per = counts.sum(0)
        return distributed.mean_over_ranks(per) if over_ranks else per
    denom = counts.sum()
    return (distributed.mean_over_ranks(denom) if over_ranks else denom).clamp(min=1.0)


def accumulate_grads(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     mask: torch.Tensor, micro: int, s: Settings,
                     over_ranks: bool = True, denom: torch.Tensor | None = None,
                     sync: bool = True) -> torch.Tensor:
    """Forward/backward the batch in near-equal chunks of <= micro items; the gradient equals
    the whole batch's (each chunk's loss is divided by the whole batch's label count `denom`,
    by default `step_denominator`; over_ranks=False: a rank-local probe). Under DDP only the last
    chunk's backward all-reduces, and none when sync=False (the caller averages the gradients)."""
    labels, mask = labels.to(s.device, non_blocking=True), mask.to(s.device, non_blocking=True)
    if denom is None:
        denom = step_denominator(mask, s, over_ranks)
    chunks = torch.arange(len(images)).tensor_split(-(-len(images) // micro))
    total = torch.zeros((), device=s.device)
    for i, idx in enumerate(chunks):
        sl = slice(int(idx[0]), int(idx[-1]) + 1)
        with distributed.no_sync(model, sync=sync and i == len(chunks) - 1):
            with s.autocast():
                logits = model(to_input(images[sl], s.device, s.channels_last))
            loss = s.loss(logits, labels[sl], mask[sl], denom)
            loss.backward()
        total += loss.detach()
    return total


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError)


def _free_after_oom(optimizer: torch.optim.Optimizer, s: Settings) -> None:
    optimizer.zero_grad(set_to_none=True)
    if s.device.type == "cuda":
        torch.cuda.empty_cache()


def _forward_backward(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      mask: torch.Tensor, micro: int, s: Settings, denom: torch.Tensor,
                      optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, int]:
    """The step's gradient with micro-batches of <= micro items; on out-of-memory on ANY rank,
    every rank halves the micro-batch and retries the same batch. The ranks agree through one
    all-reduce of an OOM flag per attempt, made before any gradient collective, so they stay in
    lockstep (under DDP every backward runs without sync and the gradients are averaged after
    the agreement). Returns (loss, micro)."""
    while True:
        optimizer.zero_grad(set_to_none=True)
        loss: torch.Tensor | None = None
        try:
            loss = accumulate_grads(model, images, labels, mask, micro, s, denom=denom,
                                    sync=not distributed.active())
        except Exception as exc:
            if not _is_oom(exc):
                raise
        # no loss here means this rank ran out of memory, so the `any` below is true then
        if not distributed.any_over_ranks(loss is None, s.device) and loss is not None:
            distributed.all_reduce_grads(model)
            if s.auc is not None:  # AUC margin's a, b: one value on every rank
                distributed.all_reduce_grads(s.auc)
            return loss, micro
        loss = None
        _free_after_oom(optimizer, s)
        if micro <= MIN_MICRO_BATCH:
            raise ChexopsError(f"out of memory even at micro-batch {micro}; lower "
                               f"train.image_size or use a smaller model.arch") from None
        micro = max(MIN_MICRO_BATCH, micro // 2)
        if distributed.is_main():
            print(f"chexops: out of memory{' on a rank' if distributed.active() else ''}; "
                  f"continuing with micro-batch {micro} per rank and gradient accumulation "
                  f"(per-rank batch {len(images)}, effective batch unchanged)", file=sys.stderr)


def train_step(model: nn.Module, batch: tuple, optimizer: torch.optim.Optimizer, micro: int,
               s: Settings) -> tuple[torch.Tensor, int]:
    """One optimizer step on a batch; on out-of-memory in forward/backward halve the micro-batch
    (on every rank together) and retry the same batch with gradient accumulation, so the
    effective batch is unchanged. An out-of-memory in optimizer.step() is not retried (the
    parameters may be partly updated): a clear error. Returns (loss, micro)."""
    images, labels, mask = batch
    denom = step_denominator(mask, s)  # the step's only collective before the retry loop
    loss, micro = _forward_backward(model, images, labels, mask, micro, s, denom, optimizer)
    try:
        optimizer.step()
    except Exception as exc:
        if not _is_oom(exc):
            raise
        _free_after_oom(optimizer, s)
        raise ChexopsError(
            "out of memory in the optimizer step (AdamW allocates its state at the first step; "
            "a step cannot be retried once parameters may be partly updated); set a smaller "
            "train.batch_size (or batch_size: auto), lower train.image_size, or use a smaller "
            "model.arch") from None
    return loss, micro


def _fits(model: nn.Module, batch: int, size: int, n_out: int, s: Settings) -> bool:
    try:
        images = torch.zeros(batch, size, size, dtype=torch.uint8)
        labels = torch.zeros(batch, n_out)
        accumulate_grads(model, images, labels, labels.bool(), batch, s, over_ranks=False)
        return True
    except Exception as exc:
        if not _is_oom(exc):
            raise
        return False
    finally:
        model.zero_grad(set_to_none=True)
        if s.device.type == "cuda":
            torch.cuda.empty_cache()


def auto_batch_size(model: nn.Module, image_size: int, n_out: int, s: Settings,
                    n_items: int) -> int:
    """Largest power-of-two batch whose forward/backward fits on the GPU (on a copy of the model,
    so BatchNorm statistics are untouched); CPU_AUTO_BATCH on the CPU."""
    if s.device.type != "cuda":
        return min(CPU_AUTO_BATCH, max(MIN_MICRO_BATCH, n_items))
    probe = copy.deepcopy(model).train()
    batch = AUTO_BATCH_START
    while batch > MIN_MICRO_BATCH and (batch > n_items or not _fits(probe, batch, image_size,
                                                                      n_out, s)):
        batch //= 2
    del probe
    torch.cuda.empty_cache()
    return batch
