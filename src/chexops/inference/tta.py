"""Test-time augmentation: the mean positive probability over N augmented views of each image.

The views use the round's training augmentation (`train.augment`) when it is on, else the
`light` preset (small lighting/rotation/translation/scale changes; never flips unless the user
asked for hflip). View v of batch b is seeded by (seed + v, b): the same call gives the same
result. Probabilities (not logits) are averaged, as fastai's TTA does.
"""
from __future__ import annotations

import numpy as np
from torch import nn

from chexops.config import AugmentConfig
from chexops.data.augment import PRESETS, Augmenter, resolve
from chexops.inference.predictor import predict_logits
from chexops.inference.settings import Settings

VIEW_STRIDE = 7919   # keeps the views' seeds apart from the training seed


def tta_spec(train_augment: AugmentConfig) -> AugmentConfig:
    """The views' augmentation: the round's own when it is on, else the `light` preset."""
    return resolve(train_augment) or PRESETS["light"]


def predict_tta(model: nn.Module, loader, s: Settings, n_views: int, spec: AugmentConfig,
                seed: int) -> np.ndarray:
    """(N, targets) positive probabilities averaged over n_views augmented views of the loader's
    images (s: how to run on the device, with the output coding). Raises ValueError when
    n_views < 1."""
    if n_views < 1:
        raise ValueError("predict_tta needs n_views >= 1")
    views = []
    for v in range(n_views):
        aug = Augmenter(spec, seed + VIEW_STRIDE * (v + 1), s.device)
        logits, _, _ = predict_logits(model, loader, s, augment=aug)
        views.append(s.probs(logits))
    return np.mean(views, axis=0)
