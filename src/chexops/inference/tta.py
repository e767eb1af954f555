"""Test-time augmentation: the mean positive probability over N augmented views of each image.

The views use the round's training augmentation (`train.augment`) when it is on, else the
`light` preset (small lighting/rotation/translation/scale changes; never flips unless the user
asked for hflip). View v of batch b is seeded by (seed + v, b): the same call gives the same
result. Probabilities (not logits) are averaged, as fastai's TTA does.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from chexops.config import AugmentConfig
from chexops.data.augment import PRESETS, Augmenter, resolve

VIEW_STRIDE = 7919   # keeps the views' seeds apart from the training seed


def tta_spec(train_augment: AugmentConfig) -> AugmentConfig:
    return resolve(train_augment) or PRESETS["light"]


@torch.inference_mode()
def predict_tta(model: nn.Module, loader, s, n_views: int, spec: AugmentConfig,
                seed: int) -> np.ndarray:
    """(N, targets) probabilities averaged over n_views augmented views (s: train.Settings)."""
    from chexops.data.batches import to_input

    if n_views < 1:
        raise ValueError("predict_tta needs n_views >= 1")
    model.eval()
    views = []
    for v in range(n_views):
        aug = Augmenter(spec, seed + VIEW_STRIDE * (v + 1), s.device)
        logits = []
        for b, (images, _, _) in enumerate(loader):
            with s.autocast():
                x = to_input(aug(images, b), s.device, s.channels_last)
                logits.append(model(x).float().cpu())
        views.append(s.probs(torch.cat(logits).numpy()))
    return np.mean(views, axis=0)
