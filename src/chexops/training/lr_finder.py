"""The LR range test (fastai's lr_find) behind `lr: auto`, and the `chexops lr-find K` command.

On a copy of the round's starting model (frozen as the round), one batch per step at
exponentially increasing LR from `train.lr_find.start` to `end` over at most `num` steps, with
the round's AdamW, weight decay and augmentation. The loss is smoothed (EMA, beta 0.98, bias-
corrected); the test stops when the smoothed loss exceeds 4x its minimum or is not finite.

The rule: fastai's **valley** (its default since 2.5): on the smoothed curve (first 10 % and last
5 points trimmed, as fastai), the longest stretch of decreasing loss; the LR two thirds down it.
A test that diverges before leaving enough points for the rule ("at once") is an error, unless
`train.lr_find.fallback` names an LR to use instead.
"""
from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from chexops.config import LRFindConfig
from chexops.errors import ChexopsError

if TYPE_CHECKING:  # pragma: no cover

    from chexops.model.network import ChexNet

RULE = "valley"
BETA = 0.98          # fastai's loss smoothing
DIVERGE_FACTOR = 4.0  # fastai's stop_div: smoothed loss > 4 x best
MIN_POINTS = 3        # points the rule needs after trimming


@dataclass
class LRFindResult:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)     # raw batch losses
    smoothed: list[float] = field(default_factory=list)
    diverged_at: int | None = None                         # step where the test stopped
    suggestion: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"rule": RULE, "lrs": self.lrs, "losses": self.losses, "smoothed": self.smoothed,
                "diverged_at": self.diverged_at, "suggestion": self.suggestion}


def lr_steps(cfg: LRFindConfig) -> np.ndarray:
    """`num` LRs spaced exponentially from start to end."""
    return cfg.start * (cfg.end / cfg.start) ** (np.arange(cfg.num) / (cfg.num - 1))


def smooth(losses: list[float], beta: float = BETA) -> list[float]:
    """fastai's bias-corrected exponential moving average."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** i))
    return out


def valley(lrs: list[float], losses: list[float], num: int) -> float | None:
    """fastai's valley rule on the trimmed curve; None when too few points are left."""
    lo, hi = num // 10, len(losses) - 5
    lrs, losses = lrs[lo:hi], losses[lo:hi]
    n = len(losses)
    if n < MIN_POINTS:
        return None
    run = [1] * n  # longest decreasing run ending at i
    best_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
        if run[best_end] < run[i]:
            best_end = i
    start = best_end - run[best_end]
    third = (best_end - start) / 3
    return float(lrs[max(0, start + int(third) + int(third / 2))])


def _batches(loader):
    while True:  # cycle the (seeded) loader for as many steps as the test needs
        yield from loader


def range_test(model: "ChexNet", data, plan, s, cfg: LRFindConfig) -> LRFindResult:
    """Run the range test on a copy of `model` (left untouched); plan: train.RoundPlan,
    s: train.Settings (with coding and augmentation)."""
    import torch

    from chexops.data.batches import make_loader
    from chexops.inference.settings import CPU_AUTO_BATCH
    from chexops.model.network import freeze_body
    from chexops.training.loop import make_optimizer
    from chexops.training.step import accumulate_grads

    net = copy.deepcopy(model).to(s.device).train()
    freeze_body(net, plan.freeze)
    bs = plan.train.batch_size if isinstance(plan.train.batch_size, int) else CPU_AUTO_BATCH
    loader = make_loader(data, bs, True, torch.Generator().manual_seed(plan.seed))
    optimizer, _ = make_optimizer(net, cfg.start, plan.train.wd, plan.train.moms)
    result, best = LRFindResult(), math.inf
    for step, (lr, batch) in enumerate(zip(lr_steps(cfg), _batches(loader))):
        for group in optimizer.param_groups:
            group["lr"] = float(lr)
        images, labels, mask = batch
        if s.augment is not None:
            images = s.augment(images, step)
        optimizer.zero_grad(set_to_none=True)
        loss = float(accumulate_grads(net, images, labels, mask, len(images), s, over_ranks=False))
        if math.isfinite(loss):
            optimizer.step()
        result.lrs.append(float(lr))
        result.losses.append(loss)
        result.smoothed = smooth(result.losses)
        best = min(best, result.smoothed[-1])
        if not math.isfinite(result.smoothed[-1]) or result.smoothed[-1] > DIVERGE_FACTOR * best:
            result.diverged_at = step
            break
    result.suggestion = valley(result.lrs, result.smoothed, cfg.num)
    return result


def choose_lr(result: LRFindResult, cfg: LRFindConfig, where: str) -> float:
    """The suggestion; when the test diverged at once, the fallback or a clear error."""
    if result.suggestion is not None:
        return result.suggestion
    at = f"at step {result.diverged_at}, LR {result.lrs[-1]:.2e}" if result.lrs else "at once"
    if cfg.fallback is not None:
        print(f"chexops: {where}: lr auto: the range test diverged {at}; using "
              f"train.lr_find.fallback {cfg.fallback}", file=sys.stderr)
        return cfg.fallback
    raise ChexopsError(f"{where}: lr auto: the LR range test diverged at once ({at}), so no LR "
                       f"can be suggested; lower train.lr_find.start, set a number for the "
                       f"round's lr, or set train.lr_find.fallback")


def figure(result: LRFindResult, chosen: float | None = None):
    """Loss (raw and smoothed) against LR on a log axis, the chosen LR marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), dpi=100)
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses, color="lightgrey", linewidth=1, label="batch loss")
    ax.plot(result.lrs, result.smoothed, label="smoothed loss")
    if chosen is not None:
        ax.axvline(chosen, color="red", linestyle="--", label=f"{RULE}: {chosen:.2e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss", title="LR range test")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the round's lr: auto

def auto_lr(model, data, plan, device, cfg: LRFindConfig, where: str,
            stage_run: Any = None) -> tuple[float, LRFindResult | None]:
    """Run the test (rank 0 only; the LR is broadcast, the result stays None on the other
    ranks) and log plot, curve and choice."""
    import torch

    from chexops.inference.settings import resolve_settings
    from chexops.training import distributed
    from chexops.training.loop import with_recipe

    result: LRFindResult | None = None
    lr: float | None = None
    if distributed.is_main():
        s = with_recipe(resolve_settings(plan.runtime, plan.train, torch.device(device)), plan)
        result = range_test(model, data, plan, s, cfg)
        lr = choose_lr(result, cfg, where)
        if stage_run is not None:
            stage_run.log_params({"lr_find.rule": RULE, "lr_find.lr": lr,
                                  "lr_find.fallback_used": result.suggestion is None})
            stage_run.log_dict(result.as_dict(), "lr_find.json")
            stage_run.log_figure(figure(result, lr), "lr_find.png")
        print(f"chexops: {where}: lr auto -> {lr:.3e} ({RULE} rule)", file=sys.stderr)
    return distributed.broadcast_object(lr), result


# ---------------------------------------------------------------- `chexops lr-find K`
