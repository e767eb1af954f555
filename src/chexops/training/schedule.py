"""fastai's one-cycle policy and discriminative learning rates, as plain functions.

One cycle (fastai fit_one_cycle): over the first `pct_start` of the optimizer steps the LR rises
from lr/div to lr along a half cosine, then anneals along a half cosine to lr/(div*final_div)
(fastai v1's final LR, with final_div 1e4); momentum (Adam's beta1) does the inverse,
moms[0] -> moms[1] -> moms[0]. Step i of n uses position pct = i/n, as fastai's ParamScheduler.

Discriminative LRs over the layer groups: [lo, hi] is spread geometrically (fastai slice(lo, hi));
one number gives every group that LR (fastai's fit_one_cycle(lr_max=float) does the same;
only slice(lr) would divide earlier groups by 10, and a user can write [lr/10, lr] for that).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from chexops.errors import ChexopsError


def cos_anneal(start: float, end: float, pct: float) -> float:
    """fastai's SchedCos: half a cosine from start (pct 0) to end (pct 1)."""
    return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)


def one_cycle_value(pct: float, start: float, peak: float, end: float, pct_start: float) -> float:
    """Value at position pct in [0, 1] of a cosine warm-up start->peak, then anneal peak->end."""
    if pct_start > 0 and pct < pct_start:
        return cos_anneal(start, peak, pct / pct_start)
    rest = 1 - pct_start
    return cos_anneal(peak, end, min(1.0, (pct - pct_start) / rest) if rest > 0 else 1.0)


def discriminative_lrs(lr: float | Sequence[float], n_groups: int) -> list[float]:
    """Peak LR per layer group: one number -> all the same; [lo, hi] -> geometric lo..hi (fastai's
    slice(lo, hi)); a list of n_groups numbers -> as given. config.py has already checked that
    every value is positive and lo <= hi; the number of values is checked here because it
    depends on the model's layer groups."""
    if isinstance(lr, (int, float)):
        return [float(lr)] * n_groups
    values = [float(v) for v in lr]
    if len(values) == 2 and n_groups > 1:
        lo, hi = values
        return [lo * (hi / lo) ** (i / (n_groups - 1)) for i in range(n_groups)]
    if len(values) == n_groups and all(v > 0 for v in values):
        return values
    raise ChexopsError(f"lr {values}: {len(values)} values do not fit {n_groups} layer groups; "
                       f"give one number, a range [lo, hi], or {n_groups} positive values")


@dataclass
class OneCycle:
    """Sets every param group's lr and Adam beta1 for optimizer step `step` of `total_steps`."""
    optimizer: torch.optim.Optimizer
    peak_lrs: list[float]
    total_steps: int
    pct_start: float = 0.3
    div: float = 25.0
    final_div: float = 1e4
    moms: tuple[float, float] = (0.95, 0.85)

    def lr_at(self, step: int, peak: float) -> float:
        pct = step / max(1, self.total_steps)
        return one_cycle_value(pct, peak / self.div, peak, peak / (self.div * self.final_div),
                               self.pct_start)

    def mom_at(self, step: int) -> float:
        hi, lo = self.moms
        return one_cycle_value(step / max(1, self.total_steps), hi, lo, hi, self.pct_start)

    def apply(self, step: int) -> None:
        mom = self.mom_at(step)
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
            group["lr"] = self.lr_at(step, peak)
            beta2 = group["betas"][1]
            group["betas"] = (mom, beta2)
