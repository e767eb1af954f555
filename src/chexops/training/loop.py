"""One training round: AdamW + one-cycle over discriminative layer groups, masked BCE (or, under
`loss: auc_margin`, LibAUC's AUC-margin loss with PESG under the same one-cycle), the best
epoch by validation AUROC written atomically, per-epoch checkpoints to resume from, and an
out-of-memory fallback that halves the micro-batch and accumulates gradients.

Loop pieces follow torchvision's reference split: `train_one_epoch`, `predict_probs`, and
`train_round` tying them together. Everything here is a function of its arguments; files are
written only to the paths passed in.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, cast

import numpy as np
import torch
from torch import nn

from chexops.config import RuntimeConfig, TrainConfig
from chexops.data.batches import ArraySet, make_loader
from chexops.errors import ChexopsError
from chexops.inference.settings import Settings, resolve_settings
from chexops.model.network import ChexNet, freeze_body, layer_groups
from chexops.model.weights import state_to_save
from chexops.training import auc_margin, distributed
from chexops.training import checkpoint as ckpt
from chexops.training.schedule import OneCycle, discriminative_lrs
from chexops.training.selection import Best, check_valid_split, history_row, validate
from chexops.training.step import auto_batch_size, train_step


@dataclass(frozen=True)
class RoundPlan:
    """What one round needs from params.yaml (see `stages.train_round.plan_for`)."""
    epochs: int
    lr: float | tuple[float, ...] | str   # "auto" until the LR finder replaces it
    freeze: bool
    seed: int
    targets: tuple[str, ...]
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    coding: Any = None    # model.coding.OutputCoding (U-MultiClass); None = all sigmoid
    loss: str = "bce"     # bce | auc_margin (training.auc_margin)


@dataclass
class RoundResult:
    history: list[dict[str, Any]]
    best_epoch: int
    best_metrics: dict[str, Any]     # multi_target_metrics of the best epoch + losses
    batch_size: int
    micro_batch: int
    resumed_from: int | None = None  # last completed epoch of the checkpoint resumed
    loss: str = "bce"                # the round's training loss: bce | auc_margin


def with_recipe(s: Settings, plan: RoundPlan) -> Settings:
    """The plan's output coding (U-MultiClass) and seeded augmentation (train only)."""
    import dataclasses

    from chexops.data.augment import make_augmenter

    return dataclasses.replace(s, coding=plan.coding,
                               augment=make_augmenter(plan.train.augment, plan.seed, s.device))


# ---------------------------------------------------------------- epochs

@dataclass
class EpochState:
    """What train_one_epoch advances: the global optimizer step and the micro-batch."""
    step: int = 0
    micro: int = 16


def _flat(images: torch.Tensor) -> torch.Tensor:
    """True (a 0-d tensor, no device sync) when every image of the batch is one grey level:
    pixels that decoded to nothing, which no learning rate fixes. Read on every 8th pixel, so
    it costs nothing next to the step; it only chooses the advice of the non-finite error."""
    x = images[:, ::8, ::8].flatten(1)
    return (x.amax(dim=1) == x.amin(dim=1)).all()


def _check_finite(pending: list[tuple[int, torch.Tensor, torch.Tensor]], epoch: int) -> list[float]:
    values = torch.stack([v for _, v, _ in pending]).float().cpu().tolist()
    for (batch, _, flat), v in zip(pending, values):
        if np.isfinite(v):
            continue
        advice = ("every image of the batch is one flat grey level: the images decode to nothing, "
                  "which no learning rate fixes; check the data (`chexops predict` one of them, "
                  "or clean.image_check: full)" if bool(flat)
                  else "lower the round's lr or check the data")
        raise ChexopsError(f"non-finite training loss ({v}) at epoch {epoch}, batch {batch}; "
                           f"{advice} (the best weights so far are kept)")
    return values


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer,
                    schedule: OneCycle, state: EpochState, s: Settings, epoch: int,
                    max_batches: int = 0) -> float:
    """Train over one epoch (at most max_batches when > 0); returns the mean training loss."""
    model.train()
    losses: list[float] = []
    pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for batch_idx, batch in enumerate(loader):
        if max_batches and batch_idx >= max_batches:
            break
        flat = _flat(batch[0])                   # the decoded images, before augmentation
        schedule.apply(state.step)
        if s.augment is not None:  # seeded by the global step, so a resumed round matches
            batch = (s.augment(batch[0], state.step), *batch[1:])
        loss, state.micro = train_step(model, batch, optimizer, state.micro, s)
        state.step += 1
        pending.append((batch_idx, loss, flat))
        if len(pending) >= s.sync_every:
            losses += _check_finite(pending, epoch)
            pending = []
    if pending:
        losses += _check_finite(pending, epoch)
    return float(np.mean(losses)) if losses else float("nan")


# ---------------------------------------------------------------- the round

def make_optimizer(model: ChexNet, lr: float | tuple[float, ...], wd: float,
                   moms: tuple[float, float]) -> tuple[torch.optim.AdamW, list[float]]:
    """AdamW with one param group per layer group (true weight decay, as fastai's AdamW)."""
    groups = layer_groups(model)
    peaks = discriminative_lrs(lr, len(groups))
    optimizer = torch.optim.AdamW([{"params": g, "lr": p} for g, p in zip(groups, peaks)],
                                  lr=peaks[-1], betas=(moms[0], 0.99), eps=1e-5, weight_decay=wd)
    return optimizer, peaks


@dataclass
class _Loop:
    """The live objects of a round, so resume and checkpointing touch one place."""
    model: ChexNet
    optimizer: torch.optim.Optimizer  # AdamW, or libauc's PESG under loss auc_margin
    schedule: OneCycle
    generator: torch.Generator
    state: EpochState
    batch_size: int
    history: list[dict[str, Any]] = field(default_factory=list)
    best: Best = field(default_factory=Best)
    auc: Any = None  # training.auc_margin.AUCMargin under loss auc_margin: a, b, alpha to resume

    def checkpoint(self, epoch: int, fp: str, run_id: str | None,
                   lr_found: float | None = None) -> dict[str, Any]:
        return {"fingerprint": fp, "epoch": epoch, "run_id": run_id,
                "lr_found": None if lr_found is None else float(lr_found),
                "model": state_to_save(self.model), "optimizer": self.optimizer.state_dict(),
                "step": self.state.step, "micro_batch": self.state.micro,
                "batch_size": self.batch_size, "rng": ckpt.rng_state(self.generator),
                "history": self.history, **self.best.to_checkpoint(),
                "auc_margin": None if self.auc is None else self.auc.state_dict()}

    def restore(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.auc is not None:
            auc_margin.restore(self.optimizer, self.auc, saved["auc_margin"])
        self.state = EpochState(saved["step"], saved["micro_batch"])
        ckpt.set_rng_state(saved["rng"], self.generator)
        self.history = list(saved["history"])
        self.best = Best.from_checkpoint(saved)


def _resolve_batch(plan: RoundPlan, model: ChexNet, s: Settings, n_items: int,
                   saved: dict[str, Any] | None) -> int:
    if saved is not None:
        return int(saved["batch_size"])
    bs = plan.train.batch_size
    if bs == "auto":
        bs = auto_batch_size(model, plan.train.image_size, len(plan.targets), s, n_items)
        if s.device.type == "cuda":  # the probe found a per-GPU batch; the global one is W x
            bs = distributed.min_over_ranks(bs, s.device) * distributed.world_size()
        print(f"chexops: batch_size auto -> {bs} on {s.device}", file=sys.stderr)
    return int(bs)


def _prepare(model: ChexNet, train: ArraySet, valid: ArraySet, plan: RoundPlan, s: Settings,
             saved: dict[str, Any] | None) -> tuple[_Loop, Any, Any, int]:
    """Model on the device (frozen as asked), seeded loaders, AdamW and its one-cycle."""
    model.to(s.device)
    if s.channels_last:
        model.to(memory_format=torch.channels_last)
    freeze_body(model, plan.freeze)
    batch_size = _resolve_batch(plan, model, s, len(train), saved)
    generator = torch.Generator().manual_seed(plan.seed)
    pin = s.device.type == "cuda"
    local = distributed.per_rank_batch(batch_size)  # batch_size is the effective batch
    train_dl = make_loader(train, local, True, generator, plan.runtime.workers, pin,
                           lambda ds: distributed.train_sampler(ds, plan.seed))
    valid_dl = make_loader(valid, local, False, None, plan.runtime.workers, pin,
                           distributed.eval_sampler)
    n_batches = min(len(train_dl), plan.train.max_batches or len(train_dl))
    if n_batches == 0:
        raise ChexopsError("the training split is empty; check the clean and resample stages")
    if isinstance(plan.lr, str):  # "auto" is the stage's to resolve, with the LR finder
        raise ChexopsError(f"lr {plan.lr!r} reached the training loop unresolved; run the round "
                           f"with `chexops train-round K`, which runs the LR range test first")
    optimizer, peaks = (auc_margin.make_pesg(model, s.auc, plan.lr, plan.train.auc_margin, s.device)
                        if s.auc is not None
                        else make_optimizer(model, plan.lr, plan.train.wd, plan.train.moms))
    schedule = OneCycle(optimizer, peaks, plan.epochs * n_batches, plan.train.pct_start,
                        plan.train.div, plan.train.final_div,
                        (plan.train.moms[0], plan.train.moms[1]))
    # the micro-batch is per rank: it starts at this rank's share of the effective batch
    loop = _Loop(model, optimizer, schedule, generator, EpochState(0, local), batch_size,
                 auc=s.auc)
    return loop, train_dl, valid_dl, n_batches


def _resume(loop: _Loop, saved: dict[str, Any], out_path: str | Path,
            metadata: dict[str, str] | None) -> int:
    """Restore the loop from a checkpoint; returns the first epoch still to run."""
    loop.restore(saved)
    # a checkpoint from a run with fewer ranks may hold a micro-batch above this rank's share
    loop.state.micro = min(loop.state.micro, distributed.per_rank_batch(loop.batch_size))
    if not distributed.is_main():
        return saved["epoch"] + 1
    if loop.best.state is not None:  # DVC removes a stage's outputs before re-running it
        loop.best.write(out_path, metadata)
    print(f"chexops: resuming after epoch {saved['epoch']} from its checkpoint", file=sys.stderr)
    return saved["epoch"] + 1


def train_round(model: ChexNet, train: ArraySet, valid: ArraySet, plan: RoundPlan,
                out_path: str | Path, device: torch.device | str = "cpu",
                checkpoint_path: str | Path | None = None, fingerprint: str = "",
                run_id: str | None = None,
                on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
                weights_metadata: dict[str, str] | None = None,
                lr_found: float | None = None) -> RoundResult:
    """Train `plan.epochs` epochs; the best epoch by validation AUROC is written to out_path
    (only when an epoch improves). With checkpoint_path, every epoch is checkpointed and a
    checkpoint with the same fingerprint is resumed; a finished round deletes it.

    on_epoch_end(row) runs on rank 0 after the epoch's checkpoint is saved; a resumed round
    reports the checkpoint's last epoch again, since a kill may have come between the two, so the
    callback must be idempotent per epoch (at-least-once). lr_found (the LR range test's choice
    under `lr: auto`) is stored in the checkpoint for the resume to reuse."""
    from chexops.runtime import seed_everything

    check_valid_split(valid, plan.targets)
    s = with_recipe(resolve_settings(plan.runtime, plan.train, torch.device(device)), plan)
    s = auc_margin.with_loss(s, plan.loss, plan.train.auc_margin, train, plan.targets)
    seed_everything(plan.seed)
    main = distributed.is_main()  # only rank 0 reads and writes files; the others follow it
    saved = ckpt.load_checkpoint(checkpoint_path, fingerprint) if checkpoint_path and main else None
    saved = distributed.broadcast_object(saved)
    loop, train_dl, valid_dl, n_batches = _prepare(model, train, valid, plan, s, saved)
    start = _resume(loop, saved, out_path, weights_metadata) if saved is not None else 1
    if saved is not None and main and on_epoch_end is not None and loop.history:
        on_epoch_end(loop.history[-1])
    net = distributed.wrap_model(model, s.device)
    compiled = cast(nn.Module, torch.compile(net)) if plan.runtime.compile else net
    if saved is None and plan.train.score_start:  # epoch 0: the weights the round starts from
        row = _score(loop, net, valid_dl, s, plan, 0, None, out_path, weights_metadata)
        if main and on_epoch_end is not None:
            on_epoch_end(row)
    for epoch in range(start, plan.epochs + 1):
        row = _run_epoch(loop, compiled, train_dl, valid_dl, s, plan, epoch, n_batches, out_path,
                         weights_metadata)
        if not main:
            continue
        if checkpoint_path:  # first the checkpoint, then the epoch's report (MLflow)
            ckpt.save_checkpoint(checkpoint_path,
                                 loop.checkpoint(epoch, fingerprint, run_id, lr_found))
        if on_epoch_end is not None:
            on_epoch_end(row)
    if loop.best.state is None:
        raise ChexopsError("no epoch had a defined validation AUROC; check the validation split")
    if checkpoint_path and main:
        ckpt.remove_checkpoint(checkpoint_path)
    return RoundResult(loop.history, loop.best.epoch, loop.best.metrics, loop.batch_size,
                       loop.state.micro, start - 1 if saved is not None else None, plan.loss)


def _run_epoch(loop: _Loop, model: nn.Module, train_dl, valid_dl, s: Settings, plan: RoundPlan,
               epoch: int, n_batches: int, out_path: str | Path,
               metadata: dict[str, str] | None) -> dict[str, Any]:
    distributed.set_epoch(train_dl, epoch)  # the epoch's permutation: seed + epoch
    train_loss = train_one_epoch(model, train_dl, loop.optimizer, loop.schedule, loop.state, s,
                                 epoch, n_batches)
    auc_margin.end_epoch(loop.optimizer)  # PESG: the next epoch's reference weights
    train_loss = float(distributed.mean_over_ranks(
        torch.tensor(train_loss, dtype=torch.float64, device=s.device)))
    distributed.average_buffers(loop.model)  # one BatchNorm state on every rank
    return _score(loop, model, valid_dl, s, plan, epoch, train_loss, out_path, metadata)


def _score(loop: _Loop, model: nn.Module, valid_dl, s: Settings, plan: RoundPlan, epoch: int,
           train_loss: float | None, out_path: str | Path,
           metadata: dict[str, str] | None) -> dict[str, Any]:
    """Validate after `epoch` (0: before any training), record it, keep it if it is the best."""
    val = validate(model, valid_dl, s, plan.targets, epoch)
    lr = loop.optimizer.param_groups[-1]["lr"] if epoch else None
    row = history_row(epoch, train_loss, val, lr)
    loop.history.append(row)
    loop.best.offer(row, val, loop.model, out_path, metadata, distributed.is_main())
    if distributed.is_main():
        loss = "start" if train_loss is None else f"train_loss {train_loss:.4f}"
        print(f"epoch {epoch}/{plan.epochs}: {loss} valid_loss {val['valid_loss']:.4f} "
              f"auroc {_fmt(val['auroc'])}", file=sys.stderr)
    return row


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
