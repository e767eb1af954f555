"""AUC maximisation for a round with `loss: auc_margin`: the AUC-margin loss and its PESG
optimizer (Yuan, Yan, Sonka, Yang, "Large-scale Robust Deep AUC Maximization: A New Surrogate
Loss and Empirical Studies on Medical Image Classification", ICCV 2021, arXiv:2012.03173; the
method of the CheXpert competition's winning entries), as in LibAUC (`pip install -e '.[auc]'`).

The loss is libauc 1.3's `AUCMLoss` (version v1, fixed class prior p) written out so that it
takes U-Ignore's label mask and several targets: one term per target over that target's labelled
rows, averaged over the targets with labels (libauc 1.3's `MultiLabelAUCMLoss` can do neither:
it averages over every row and its v1 drops the margin). A test checks it equals `AUCMLoss`.
The optimizer is libauc's own `PESG`, imported from `libauc.optimizers` only (the package root
pulls in nothing, but `libauc.datasets` would need OpenCV, which chexops never loads).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from chexops.config import AUCMarginConfig
from chexops.errors import ChexopsError
from chexops.inference.settings import Settings

AUC_MARGIN = "auc_margin"
MISSING = "train.loss auc_margin needs libauc: pip install -e '.[auc]'"


def require_libauc() -> Any:
    """libauc's PESG class; ChexopsError (one line: the install command) when libauc is absent
    or its optimizers do not import."""
    try:
        return importlib.import_module("libauc.optimizers").PESG
    except Exception:
        raise ChexopsError(MISSING) from None


def imbalance_ratios(labels: np.ndarray, mask: np.ndarray, targets: Sequence[str]) -> list[float]:
    """Per target, the positive fraction p of the training labels under the mask (labels (N, T),
    soft labels counted positive at >= 0.5, mask (N, T) bool): AUCMLoss's `imratio`. A target
    with no labelled positive or negative makes AUC undefined: ChexopsError."""
    out = []
    for j, t in enumerate(targets):
        y = np.asarray(labels)[np.asarray(mask)[:, j], j] >= 0.5
        if len(y) == 0 or y.all() or not y.any():
            raise ChexopsError(f"train.loss auc_margin: the training split has no labelled "
                               f"{'negative' if len(y) and y.all() else 'positive'} {t} cases; "
                               f"the AUC-margin loss needs both classes (use loss bce)")
        out.append(float(y.mean()))
    return out


class AUCMargin(nn.Module):
    """The AUC-margin min-max objective per target j (Yuan et al. 2021, eq. 5; libauc AUCMLoss
    v1): over the labelled rows, with score f = sigmoid(logit) and the training prior p_j,
    (1-p) E[(f-a)^2 | y=1] p(y=1) + p E[(f-b)^2 | y=0] p(y=0) + 2 alpha (p(1-p) m + E[p f 1[y=0]
    - (1-p) f 1[y=1]]) - p(1-p) alpha^2. a, b, alpha (T,) are the auxiliary primal and dual
    variables, updated by PESG."""

    p: torch.Tensor  # (T,) the training prior per target (a buffer)

    def __init__(self, imratio: Sequence[float], margin: float, device: torch.device | str):
        super().__init__()
        n = len(imratio)
        self.margin = float(margin)
        self.register_buffer("p", torch.tensor(list(imratio), dtype=torch.float32, device=device))
        self.a = nn.Parameter(torch.zeros(n, device=device))
        self.b = nn.Parameter(torch.zeros(n, device=device))
        self.alpha = nn.Parameter(torch.zeros(n, device=device))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                denom: torch.Tensor | None = None) -> torch.Tensor:
        """logits, labels (N, T) (labels >= 0.5 count positive), mask (N, T) bool; denom (T,) the
        labelled rows per target of the whole step (default: this batch's; a micro-batch of the
        step gives its share, so the chunks' losses add up to the step's). Returns a scalar."""
        f = torch.sigmoid(logits.float().reshape(len(logits), -1))
        maskf = mask.to(f.device, f.dtype)
        pos = (labels.to(f.device) >= 0.5).to(f.dtype) * maskf
        neg = maskf - pos
        counts = maskf.sum(0) if denom is None else denom.to(f.device, f.dtype)
        p, a, b, alpha = (v.to(f.device) for v in (self.p, self.a, self.b, self.alpha))
        rows = ((1 - p) * (f - a) ** 2 * pos + p * (f - b) ** 2 * neg
                + 2 * alpha * (p * f * neg - (1 - p) * f * pos))
        n = counts.clamp(min=1.0)
        fixed = (2 * alpha * p * (1 - p) * self.margin - p * (1 - p) * alpha ** 2) * maskf.sum(0) / n
        per_target = rows.sum(0) / n + fixed
        return per_target.sum() / (counts > 0).sum().clamp(min=1)


def peak_lr(lr: float | Sequence[float], cfg: AUCMarginConfig) -> float:
    """PESG's peak LR: train.auc_margin.lr, else the round's (a range's or list's largest)."""
    if cfg.lr is not None:
        return float(cfg.lr)
    return float(lr) if isinstance(lr, (int, float)) else float(max(lr))


def with_loss(s: Settings, loss: str, cfg: AUCMarginConfig, train: Any,
              targets: Sequence[str]) -> Settings:
    """Settings whose loss is the AUC margin under `loss: auc_margin` (train: the round's
    ArraySet, whose labels give the imbalance ratios); s itself under bce. ChexopsError when
    libauc is absent, before anything trains."""
    if loss != AUC_MARGIN:
        return s
    require_libauc()
    ratios = imbalance_ratios(train.labels, train.mask, targets)
    return dataclasses.replace(s, auc=AUCMargin(ratios, cfg.margin, s.device))


def make_pesg(model: nn.Module, loss: AUCMargin, lr: float | Sequence[float],
              cfg: AUCMarginConfig, device: torch.device) -> tuple[torch.optim.Optimizer, list[float]]:
    """(libauc's PESG, [its peak LR]) over the model's trainable parameters plus the loss's a, b.

    How it meets the round's one-cycle schedule: libauc's recipe runs PESG at a constant LR and,
    at set epochs, divides it by 10 and resets the reference point (`update_regularizer`, the
    paper's stage-wise Algorithm 1). Here the one-cycle schedule gives the LR per step (warm-up,
    then a cosine anneal that plays the decays' part in rounds of 1-3 epochs) and `end_epoch`
    resets the reference point each epoch. One param group: libauc 1.3 indexes its reference
    weights over one flat list, so the round's discriminative LRs become one peak (`peak_lr`).
    The reference point starts at the round's starting weights (v_ref = v_0 as in Algorithm 1;
    libauc's code draws it from N(0, 0.01), which would pull a fine-tuned model toward zero)."""
    pesg = require_libauc()
    params = [p for p in model.parameters() if p.requires_grad]
    peak = peak_lr(lr, cfg)
    opt = pesg(params, loss_fn=loss, lr=peak, mode=cfg.mode, momentum=cfg.momentum,
               weight_decay=cfg.weight_decay, epoch_decay=cfg.epoch_decay, verbose=False,
               device=device)
    if opt.model_ref is not None:
        with torch.no_grad():
            for ref, p in zip(opt.model_ref, params + [loss.a, loss.b]):
                ref.copy_(p.detach())
    return opt, [peak]


def end_epoch(optimizer: torch.optim.Optimizer) -> None:
    """PESG's stage end (the paper's Algorithm 1, libauc's `update_regularizer`): the reference
    point becomes the epoch's average weights. No LR decay factor: one-cycle anneals the LR."""
    if getattr(optimizer, "model_ref", None) is not None and getattr(optimizer, "T", 0) > 0:
        optimizer.update_regularizer(decay_factor=None)  # type: ignore[attr-defined]


def restore(optimizer: torch.optim.Optimizer, loss: AUCMargin, saved: dict[str, Any]) -> None:
    """After `optimizer.load_state_dict`: the loss's a, b, alpha from the checkpoint, and PESG's
    param group pointed back at its live tensors (load_state_dict swaps in the saved copies of
    a, b, alpha and the reference weights, which PESG would then update apart from the loss)."""
    loss.load_state_dict(saved)
    with torch.no_grad():
        for group in optimizer.param_groups:
            for key in ("model_ref", "model_acc"):
                live = getattr(optimizer, key)
                if live is not None:
                    for mine, loaded in zip(live, group[key]):
                        mine.copy_(loaded.to(mine.device))
                group[key] = live
            group["a"], group["b"], group["alpha"] = loss.a, loss.b, loss.alpha
    optimizer.T = 0  # type: ignore[attr-defined]  # checkpoints follow end_epoch's reset
