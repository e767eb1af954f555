"""The selection metric of a round: validation loss and AUROC of an epoch over the whole
validation split, and the best epoch so far, its weights written atomically whenever an epoch
beats it. Epoch 0 is the weights the round starts from, scored before any training, so a round
whose epochs never beat its start hands on its start (never lose the best; the seed study's
SaveModelCallback compared epochs within a round only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chexops.data.batches import ArraySet
from chexops.errors import ChexopsError
from chexops.evaluation.metrics import multi_target_metrics
from chexops.inference.predictor import predict_logits
from chexops.inference.settings import Settings
from chexops.model.weights import save_weights, state_to_save
from chexops.training import distributed

HISTORY_KEYS = ("epoch", "train_loss", "valid_loss", "auroc", "precision", "recall",
                "error_rate", "lr")


def validate(model: nn.Module, loader, s: Settings, targets: tuple[str, ...],
             epoch: int | None = None) -> dict[str, Any]:
    """Validation loss and per-target metrics at 0.5 (macro means for several targets), over the
    whole validation set (under DDP each rank predicts a shard; the shards are gathered)."""
    n = len(loader.dataset)
    logits, labels, mask = (distributed.gather_rows(a, n) for a in predict_logits(model, loader, s))
    if not np.isfinite(logits).all():  # finite training loss, yet the weights blew up (BatchNorm stats)
        where = f" after epoch {epoch}" if epoch is not None else ""
        raise ChexopsError(f"validation outputs are not finite{where}: the model diverged; the best "
                           f"weights so far are kept; lower the round's lr or use a larger batch")
    with torch.no_grad():  # the AUC-margin loss holds trainable a, b, alpha
        loss = s.loss(torch.from_numpy(logits), torch.from_numpy(labels), torch.from_numpy(mask))
    probs = s.probs(logits)
    report = multi_target_metrics(labels, probs, targets, mask)
    per = list(report["targets"].values())
    mean = {k: float(np.mean([m[k] for m in per])) for k in ("precision", "recall", "error_rate")}
    return {"valid_loss": float(loss), "auroc": report["mean_auroc"], **mean,
            "targets": report["targets"]}


def check_valid_split(valid: ArraySet, targets: tuple[str, ...]) -> None:
    """AUROC (the selection metric) needs both classes of every target in the validation split."""
    if len(valid) == 0:
        raise ChexopsError("the validation split is empty: AUROC is undefined; "
                           "check the clean stage's filters (views, sex, age)")
    for j, t in enumerate(targets):
        y = valid.labels[valid.mask[:, j], j]
        if len(np.unique(y)) < 2:
            kind = "no labelled" if len(y) == 0 else ("only positive" if y[0] == 1 else
                                                        "only negative")
            raise ChexopsError(f"the validation split has {kind} {t} cases: AUROC is undefined, "
                               f"so no epoch can be chosen; use a validation split with both "
                               f"classes")


def history_row(epoch: int, train_loss: float | None, val: dict[str, Any],
                lr: float | None) -> dict[str, Any]:
    """One epoch's line of the history (epoch 0, the start, has no training loss or lr)."""
    return {"epoch": epoch, "train_loss": train_loss, "valid_loss": val["valid_loss"],
            "auroc": val["auroc"], "precision": val["precision"], "recall": val["recall"],
            "error_rate": val["error_rate"], "lr": lr}


def improves(auroc: float | None, best: float | None) -> bool:
    """Strictly better (the first of equal epochs is kept, as fastai's SaveModelCallback)."""
    return auroc is not None and bool(np.isfinite(auroc)) and (best is None or auroc > best)


@dataclass
class Best:
    """The best epoch of a round so far by validation AUROC: its score, number, metrics and
    weights (a CPU state dict)."""
    score: float | None = None
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    state: dict[str, torch.Tensor] | None = None

    def offer(self, row: dict[str, Any], val: dict[str, Any], model: nn.Module,
              out_path: str | Path, metadata: dict[str, str] | None, write: bool) -> bool:
        """Keep this epoch if it beats the best, writing its weights (when `write`: rank 0)."""
        if not improves(val["auroc"], self.score):
            return False
        self.score, self.epoch = val["auroc"], row["epoch"]
        self.metrics = {**{k: row[k] for k in HISTORY_KEYS}, "targets": val["targets"]}
        self.state = state_to_save(model)
        if write:
            self.write(out_path, metadata)
        return True

    def write(self, out_path: str | Path, metadata: dict[str, str] | None) -> None:
        """The best weights to out_path (atomically), their epoch in the metadata."""
        assert self.state is not None
        save_weights(self.state, out_path, {**(metadata or {}), "epoch": str(self.epoch)})

    def to_checkpoint(self) -> dict[str, Any]:
        return {"best_score": self.score, "best_epoch": self.epoch, "best_metrics": self.metrics,
                "best_state": self.state}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> "Best":
        return cls(saved["best_score"], saved["best_epoch"], saved["best_metrics"],
                   saved["best_state"])
