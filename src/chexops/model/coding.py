"""The CheXpert paper's five ways to treat uncertain (-1) labels, as training sees them.

clean.py already mapped U-Zeros / U-Ones; it keeps -1 for the other three, and this module
decides what -1 means per observation (params `clean.uncertainty` / `default_uncertainty`):
- ignore      -> masked out of loss and metrics (U-Ignore);
- zeros/ones  -> 0 / 1 (done by clean; repeated here so a -1 that slips through is not lost);
- multiclass  -> a 3-way softmax output (neg 0 / pos 1 / uncertain 2) for the observation; its
                 positive probability is p(pos) / (p(pos) + p(neg)) (U-MultiClass);
- selftrained -> a teacher model relabels the uncertain training labels before training
                 (U-SelfTrained): `clean.teacher_labels: soft` uses the teacher's probability as
                 a soft BCE target, `hard` thresholds it at 0.5.

`OutputCoding` is the model-output layout that follows from the policies: one logit per binary
target, three per multiclass target. It gives training its loss and evaluation its
probabilities, and travels in the weights' metadata (`coding`) so a teacher or an evaluation
rebuilds the same head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from scipy.special import expit
from torch import nn

from chexops.config import Params
from chexops.errors import ChexopsError

BINARY, MULTICLASS = "binary", "multiclass"
UNCERTAIN_CLASS = 2      # class index of "uncertain" in a multiclass output (neg 0, pos 1)


@dataclass(frozen=True)
class OutputCoding:
    """Per target, `binary` (one logit, sigmoid) or `multiclass` (three logits, softmax)."""
    kinds: tuple[str, ...]

    @property
    def all_binary(self) -> bool:
        return all(k == BINARY for k in self.kinds)

    @property
    def n_outputs(self) -> int:
        return sum(3 if k == MULTICLASS else 1 for k in self.kinds)

    def slices(self) -> list[slice]:
        out, start = [], 0
        for k in self.kinds:
            width = 3 if k == MULTICLASS else 1
            out.append(slice(start, start + width))
            start += width
        return out

    def to_str(self) -> str:
        return ",".join(self.kinds)

    @classmethod
    def from_str(cls, text: str) -> "OutputCoding":
        kinds = tuple(text.split(","))
        if not kinds or any(k not in (BINARY, MULTICLASS) for k in kinds):
            raise ChexopsError(f"weights metadata coding {text!r} is not understood; "
                               f"use weights written by chexops")
        return cls(kinds)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
             pos_weight: float | None, denom: torch.Tensor | None = None) -> torch.Tensor:
        """Per-label BCE (binary) or cross-entropy (multiclass, pos class weighted by
        pos_weight), summed over unmasked labels / denom (default: their count)."""
        logits = logits.float()
        per = [self._column_loss(logits[:, sl], labels[:, j], kind, pos_weight)
               for j, (sl, kind) in enumerate(zip(self.slices(), self.kinds))]
        loss = torch.stack(per, dim=1)
        maskf = mask.to(loss.dtype)
        if denom is None:
            denom = maskf.sum().clamp(min=1.0)
        return (loss * maskf).sum() / denom

    @staticmethod
    def _column_loss(logits: torch.Tensor, y: torch.Tensor, kind: str,
                     pos_weight: float | None) -> torch.Tensor:
        functional = nn.functional
        if kind == BINARY:
            pw = None if pos_weight is None else torch.tensor(pos_weight, device=logits.device)
            return functional.binary_cross_entropy_with_logits(logits[:, 0], y, reduction="none",
                                                               pos_weight=pw)
        weight = None
        if pos_weight is not None:
            weight = torch.tensor([1.0, pos_weight, 1.0], device=logits.device)
        target = y.round().long().clamp(0, UNCERTAIN_CLASS)  # masked rows may hold anything
        return functional.cross_entropy(logits, target, weight=weight, reduction="none")

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """(N, outputs) logits -> (N, targets) positive probabilities."""
        logits = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1)
        cols = []
        for sl, kind in zip(self.slices(), self.kinds):
            z = logits[:, sl]
            if kind == BINARY:
                cols.append(expit(z[:, 0]))
            else:  # p(pos) / (p(pos) + p(neg)) = sigmoid(z_pos - z_neg): the softmax cancels
                cols.append(expit(z[:, 1] - z[:, 0]))
        return np.stack(cols, axis=1) if cols else np.zeros((len(logits), 0))


def output_coding(params: Params) -> OutputCoding:
    return OutputCoding(tuple(MULTICLASS if params.uncertainty_policy(t) == MULTICLASS else BINARY
                              for t in params.targets))


def needs_teacher(params: Params) -> bool:
    return any(params.uncertainty_policy(t) == "selftrained" for t in params.targets)


# ---------------------------------------------------------------- label encoding

def encode_labels(params: Params, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw (N, T) labels (1 / 0 / -1, NaN) -> (labels float32, mask bool) under each target's
    policy. Multiclass labels are class indices (neg 0, pos 1, uncertain 2); selftrained -1s
    stay masked until `relabel` fills them in."""
    raw = np.asarray(raw, dtype=np.float32).reshape(len(raw), -1)
    labels = np.zeros_like(raw)
    mask = np.zeros(raw.shape, dtype=bool)
    for j, t in enumerate(params.targets):
        col, policy = raw[:, j], params.uncertainty_policy(t)
        known = np.isin(col, (0.0, 1.0))
        uncertain = col == -1
        labels[known, j], mask[known, j] = col[known], True
        if policy in ("zeros", "ones"):
            labels[uncertain, j], mask[uncertain, j] = float(policy == "ones"), True
        elif policy == MULTICLASS:
            labels[uncertain, j], mask[uncertain, j] = UNCERTAIN_CLASS, True
    return labels, mask


def relabel(labels: np.ndarray, mask: np.ndarray, raw: np.ndarray, teacher_probs: np.ndarray,
            columns: list[int], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Fill the uncertain (-1) labels of `columns` with the teacher's probabilities (soft) or
    their 0.5-threshold (hard); teacher_probs is (N, T) over all rows (others unused)."""
    labels, mask = labels.copy(), mask.copy()
    raw = np.asarray(raw).reshape(labels.shape)
    for j in columns:
        rows = raw[:, j] == -1
        p = teacher_probs[rows, j]
        labels[rows, j] = (p >= 0.5).astype(np.float32) if mode == "hard" else p
        mask[rows, j] = True
    return labels, mask


def coding_from_metadata(meta: Mapping[str, Any],
                         targets: tuple[str, ...] | list[str]) -> OutputCoding:
    """The output coding a weights file (or a pyfunc config) records under `coding`; all binary
    when it records none (weights written before U-MultiClass). Checked against the targets."""
    coding = (OutputCoding.from_str(str(meta["coding"])) if meta.get("coding")
              else OutputCoding((BINARY,) * len(targets)))
    if len(coding.kinds) != len(targets):
        raise ChexopsError(f"the weights' output coding {coding.to_str()!r} covers "
                           f"{len(coding.kinds)} targets, not the {len(targets)} "
                           f"({','.join(targets)}); use weights written by chexops")
    return coding


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
               pos_weight: float | None, denom: torch.Tensor | None = None) -> torch.Tensor:
    """BCE-with-logits summed over unmasked labels / denom (default: their count)."""
    pw = None if pos_weight is None else torch.tensor(pos_weight, device=logits.device)
    loss = nn.functional.binary_cross_entropy_with_logits(
        logits.float(), labels, reduction="none", pos_weight=pw)
    maskf = mask.to(loss.dtype)
    if denom is None:
        denom = maskf.sum().clamp(min=1.0)
    return (loss * maskf).sum() / denom
