"""The one batched predictor: a trained ChexNet with what it needs to read images and its
outputs (targets, input size, output coding), built from a weights file, and the one batched
inference loop, `predict_logits`, that runs a model over a loader (validation, evaluate, TTA) or
over decoded images (predict, serving, the teacher: `image_loader`).

The weights' metadata (their recipe, chexops.model.recipe) says what the network is, the size
its inputs were trained at and how the outputs read (`coding`, chexops.model.coding.OutputCoding):
one sigmoid logit per binary target, three logits per U-MultiClass target whose positive
probability is sigmoid(z_pos - z_neg). Weights without a coding are all binary.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from chexops.config import Params
from chexops.data.batches import ArraySet, make_loader, to_input
from chexops.data.decode import decode_all
from chexops.inference.settings import Settings
from chexops.model.coding import coding_from_metadata
from chexops.model.weights import load_model

if TYPE_CHECKING:  # pragma: no cover
    from chexops.model.coding import OutputCoding
    from chexops.model.network import ChexNet
    from chexops.model.recipe import Recipe

BATCH = 16

# (uint8 images (B, S, S), batch index) -> images; TTA's seeded per-batch views
Augment = Callable[[torch.Tensor, int], torch.Tensor]


@torch.inference_mode()
def predict_logits(model: nn.Module, loader, s: Settings,
                   augment: Augment | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The one batched inference loop: (logits (N, outputs) float32, labels (N, T), mask (N, T)
    bool) over the whole loader of (uint8 images, labels, mask) batches, in its order, model in
    eval mode; `augment(images, b)` transforms batch b first (TTA). An empty loader gives
    (0, 0)-shaped arrays."""
    model.eval()
    outs, labels, masks = [], [], []
    for b, (images, y, m) in enumerate(loader):
        with s.autocast():
            x = images if augment is None else augment(images, b)
            outs.append(model(to_input(x, s.device, s.channels_last)).float().cpu())
        labels.append(y)
        masks.append(m)
    if not outs:
        return np.zeros((0, 0)), np.zeros((0, 0)), np.zeros((0, 0), dtype=bool)
    return (torch.cat(outs).numpy(), torch.cat(labels).numpy(), torch.cat(masks).numpy())


def predict_probs(model: nn.Module, loader, device: torch.device | str,
                  settings: Settings | None = None) -> np.ndarray:
    """Positive probabilities (N, n_targets) for every item of the loader, in order (the
    settings' coding; sigmoid without one)."""
    s = settings or Settings(torch.device(device))
    logits, _, _ = predict_logits(model, loader, s)
    return s.probs(logits)


def image_loader(images: np.ndarray, batch: int = BATCH):
    """uint8 images (N, S, S) as an in-order loader of `batch`-sized (images, labels, mask)
    batches with no labels (T = 0), for predict_logits."""
    none = np.zeros((len(images), 0), dtype=np.float32)
    return make_loader(ArraySet(images, none, none.astype(bool)), batch, False, None)


@dataclass
class Predictor:
    """A trained ChexNet with what it needs to read images and its outputs: targets, input
    size and output coding (None: one sigmoid logit per target), run `batch` images at a time;
    `recipe`: the weights' whole recipe, where it is known."""
    model: "ChexNet"
    targets: tuple[str, ...]
    image_size: int
    device: "torch.device"
    coding: "OutputCoding | None" = None
    batch: int = BATCH
    recipe: "Recipe | None" = None

    def __post_init__(self) -> None:
        # the same default and length check as weights metadata without / with a coding
        recorded = {} if self.coding is None else {"coding": self.coding.to_str()}
        self.coding = coding_from_metadata(recorded, self.targets)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S) uint8 -> (N, targets) float64 positive probabilities (the coding's:
        sigmoid, or sigmoid(z_pos - z_neg) for a U-MultiClass target)."""
        if len(images) == 0:  # predict_logits cannot tell an empty loader's width
            return np.zeros((0, len(self.targets)))
        logits, _, _ = predict_logits(self.model, image_loader(images, self.batch),
                                      Settings(self.device))
        assert self.coding is not None  # __post_init__ always sets it
        return self.coding.probs(logits)

    def predict(self, sources: list[Any], names: list[str] | None = None) -> pd.DataFrame:
        """One row per source: image, a probability per target (NaN when flagged), error."""
        images, errors = decode_all(sources, self.image_size)
        ok = np.array([e is None for e in errors], dtype=bool)
        probs = np.full((len(sources), len(self.targets)), np.nan)
        if ok.any():
            probs[ok] = self.probabilities(images[ok])
        frame = pd.DataFrame(probs, columns=list(self.targets))
        frame.insert(0, "image", names if names is not None else [str(s) for s in sources])
        frame["error"] = [e or "" for e in errors]
        return frame


def predictor_from_weights(weights: str | Path, params: "Params",
                           device: "torch.device | None" = None) -> Predictor:
    """A local safetensors file as a Predictor on `device` (default CPU): network, targets,
    output coding and image size from its recipe (params stand in for what an older file does
    not record). Silent: the caller says where params disagree
    (chexops.model.recipe.check_recipe). Raises ChexopsError as
    chexops.model.weights.load_model does."""
    model, recipe = load_model(weights, params)
    device = device or torch.device("cpu")
    return Predictor(model.to(device).eval(), recipe.targets, recipe.image_size, device,
                     recipe.coding, recipe=recipe)
