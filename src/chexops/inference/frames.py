"""Probabilities for the rows of a label table (the validation split) from a weights file, with
optional test-time augmentation: what the evaluate stage scores."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from chexops.config import Params
from chexops.paths import image_cache_dir
from chexops.runtime import prepare


def load_images(params: Params, df: pd.DataFrame, zip_path: str | Path, root: str | Path,
                size: int | None = None) -> np.ndarray:
    """The frame's images at `size` px (default train.image_size; a model's own size comes from
    its recipe), decoded once per data content and size into the shared cache (the main
    repository's data/cache)."""
    from chexops.data.images import load_image_array

    return load_image_array(zip_path, df["Path"].astype(str).tolist(),
                            size or params.train.image_size, image_cache_dir(root),
                            params.runtime.workers)


def predict_frame(params: Params, weights_path: str | Path, df: pd.DataFrame,
                  zip_path: str | Path, root: str | Path, tta: int = 0) -> np.ndarray:
    """(N, n_targets) positive probabilities, in the frame's row order (sigmoid, or
    p(pos)/(p(pos)+p(neg)) for U-MultiClass targets); tta > 0 averages over that many
    augmented views (chexops.inference.tta). The network, image size and coding are the
    weights' own (their recipe; silent: the evaluate stage says where params disagree); weights
    of other targets than params' raise ChexopsError (their columns would be mislabelled)."""
    import dataclasses

    from chexops.data.batches import ArraySet, make_loader
    from chexops.inference.predictor import predict_probs
    from chexops.inference.settings import CPU_AUTO_BATCH, resolve_settings
    from chexops.model.recipe import SCORED_FIX, SCORED_KEYS, refuse
    from chexops.model.weights import load_model, read_recipe

    n_targets = len(params.targets)
    if len(df) == 0:
        return np.zeros((0, n_targets))
    recipe = read_recipe(weights_path, params)
    refuse(recipe, params, SCORED_KEYS, f"the weights {weights_path}", SCORED_FIX)
    device = prepare(params.runtime)
    model, recipe = load_model(weights_path, recipe=recipe)
    model.to(device)
    images = load_images(params, df, zip_path, root, recipe.image_size)
    data = ArraySet.from_labels(images, np.zeros((len(df), n_targets), dtype=np.float32))
    bs = params.train.batch_size if isinstance(params.train.batch_size, int) else CPU_AUTO_BATCH
    loader = make_loader(data, bs, False, None, params.runtime.workers, device.type == "cuda")
    settings = dataclasses.replace(resolve_settings(params.runtime, params.train, device),
                                   coding=recipe.coding)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    if tta > 0:
        from chexops.inference.tta import predict_tta, tta_spec

        return predict_tta(model, loader, settings, tta, tta_spec(params.train.augment),
                           params.seed)
    return predict_probs(model, loader, device, settings)
