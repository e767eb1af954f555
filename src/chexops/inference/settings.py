"""How a model runs on a device: bf16 autocast and channels_last on CUDA (never on CPU, where
they change nothing but speed), the output coding that turns logits into probabilities and
losses, and the augmentation a training round applies per batch."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.special import expit

from chexops.config import RuntimeConfig, TrainConfig
from chexops.model.coding import masked_bce

CPU_AUTO_BATCH = 16       # batch_size: auto on CPU: memory is not the limit there; the seed's 16
CUDA_SYNC_EVERY = 25      # check the loss for NaN every N batches on CUDA (each check syncs)


@dataclass(frozen=True)
class Settings:
    """How to run on this device (resolved from runtime): none of it changes results on CPU."""
    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    pos_weight: float | None = None
    coding: Any = None    # model.coding.OutputCoding; None = one sigmoid per target
    augment: Any = None   # data.augment.Augmenter (images, step) -> images; None = off
    auc: Any = None       # training.auc_margin.AUCMargin (loss auc_margin); None = BCE / CE

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
             denom: torch.Tensor | None = None) -> torch.Tensor:
        """The round's loss; denom: the step's label count (per target, shape (T,), for auc)."""
        if self.auc is not None:
            return self.auc(logits, labels, mask, denom)
        if self.coding is None or self.coding.all_binary:
            return masked_bce(logits, labels, mask, self.pos_weight, denom)
        return self.coding.loss(logits, labels, mask, self.pos_weight, denom)

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """Positive probability per target (sigmoid; p(pos)/(p(pos)+p(neg)) for multiclass)."""
        if self.coding is None or self.coding.all_binary:
            return expit(logits)  # scipy: no overflow warning for a very negative logit
        return self.coding.probs(logits)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @property
    def sync_every(self) -> int:
        return CUDA_SYNC_EVERY if self.device.type == "cuda" else 1


def resolve_settings(runtime: RuntimeConfig, train: TrainConfig,
                     device: torch.device) -> Settings:
    """AMP (bf16 where supported) and channels_last only on CUDA; CPU runs stay fp32."""
    cuda = device.type == "cuda"
    amp = None
    if cuda and runtime.amp in ("auto", "bf16") and torch.cuda.is_bf16_supported():
        amp = torch.bfloat16
    return Settings(device, amp, cuda and runtime.channels_last in ("auto", "on"), train.pos_weight)
