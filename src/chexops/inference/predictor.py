"""The one batched predictor: a trained ChexNet with what it needs to read images and its
outputs (targets, input size, output coding), built from a weights file, and the loops that run
it over a loader (validation, evaluate) or over decoded images (predict, serving, the teacher).

The weights' metadata says how the outputs read (`coding`, chexops.model.coding.OutputCoding):
one sigmoid logit per binary target, three logits per U-MultiClass target whose positive
probability is sigmoid(z_pos - z_neg). Weights without it are all binary.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from chexops.config import Params
from chexops.data.batches import to_input
from chexops.data.decode import decode_all
from chexops.inference.settings import Settings

if TYPE_CHECKING:  # pragma: no cover
    from chexops.model.coding import OutputCoding
    from chexops.model.network import ChexNet

BATCH = 16


@torch.inference_mode()
def predict_logits(model: nn.Module, loader, s: Settings) -> tuple[np.ndarray, np.ndarray,
                                                                    np.ndarray]:
    """(logits, labels, mask) over the whole loader, model in eval mode."""
    model.eval()
    outs, labels, masks = [], [], []
    for images, y, m in loader:
        with s.autocast():
            outs.append(model(to_input(images, s.device, s.channels_last)).float().cpu())
        labels.append(y)
        masks.append(m)
    if not outs:
        return np.zeros((0, 0)), np.zeros((0, 0)), np.zeros((0, 0), dtype=bool)
    return (torch.cat(outs).numpy(), torch.cat(labels).numpy(), torch.cat(masks).numpy())


def predict_probs(model: nn.Module, loader, device: torch.device | str,
                  settings: Settings | None = None) -> np.ndarray:
    """Sigmoid probabilities (N, n_targets) for every item of the loader, in order."""
    s = settings or Settings(torch.device(device))
    logits, _, _ = predict_logits(model, loader, s)
    return s.probs(logits)


@dataclass
class Predictor:
    """A trained ChexNet with what it needs to read images and its outputs: targets, input
    size and output coding (None: one sigmoid logit per target)."""
    model: "ChexNet"
    targets: tuple[str, ...]
    image_size: int
    device: "torch.device"
    coding: "OutputCoding | None" = None

    def __post_init__(self) -> None:
        # the same default and length check as weights metadata without / with a coding
        from chexops.model.coding import coding_from_metadata

        recorded = {} if self.coding is None else {"coding": self.coding.to_str()}
        self.coding = coding_from_metadata(recorded, self.targets)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S) uint8 -> (N, targets) positive probabilities (the coding's: sigmoid, or
        sigmoid(z_pos - z_neg) for a U-MultiClass target)."""
        import torch

        from chexops.data.batches import to_input

        self.model.eval()
        out = [np.zeros((0, self.coding.n_outputs), dtype=np.float32)]
        with torch.inference_mode():
            for i in range(0, len(images), BATCH):
                x = to_input(torch.from_numpy(np.ascontiguousarray(images[i:i + BATCH])), self.device)
                out.append(self.model(x).float().cpu().numpy())
        return self.coding.probs(np.concatenate(out))

    def predict(self, sources: list[Any], names: list[str] | None = None) -> pd.DataFrame:
        """One row per source: image, a probability per target (NaN when flagged), error."""
        import pandas as pd

        images, errors = decode_all(sources, self.image_size)
        ok = np.array([e is None for e in errors], dtype=bool)
        probs = np.full((len(sources), len(self.targets)), np.nan)
        if ok.any():
            probs[ok] = self.probabilities(images[ok])
        frame = pd.DataFrame(probs, columns=list(self.targets))
        frame.insert(0, "image", names if names is not None else [str(s) for s in sources])
        frame["error"] = [e or "" for e in errors]
        return frame


def weights_spec(weights: str | Path, params: "Params") -> tuple[str, tuple[str, ...], "OutputCoding"]:
    """(arch, targets, output coding) of a weights file: from its metadata when recorded (train
    rounds write them), else from params (targets) and all-binary (coding)."""
    from chexops.model.coding import coding_from_metadata
    from chexops.model.network import weights_metadata

    meta = weights_metadata(weights)
    targets = tuple(meta["targets"].split(",")) if meta.get("targets") else tuple(params.targets)
    return meta.get("arch", params.model.arch), targets, coding_from_metadata(meta, targets)


def predictor_from_weights(weights: str | Path, params: "Params",
                           device: "torch.device | None" = None) -> Predictor:
    """A local safetensors file: architecture, targets and output coding from its metadata
    when recorded (train rounds write them), the head and image size from params."""
    import dataclasses

    import torch

    from chexops.model.network import build_model, load_weights

    arch, targets, coding = weights_spec(weights, params)
    cfg = dataclasses.replace(params.model, arch=arch, pretrained=False)
    model = build_model(cfg, coding.n_outputs)
    load_weights(model, weights)
    device = device or torch.device("cpu")
    return Predictor(model.to(device).eval(), targets, params.train.image_size, device, coding)
