"""A tiny trained-looking model for predict/registry/serve tests: resnet18 at 32 px, random
weights saved the way a training round saves them (safetensors + its recipe as metadata)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


def tiny_params(tmp_path: Path, **evaluate):
    """The repo's params with a resnet18 at 32 px; the MLflow store lands in tmp_path."""
    from chexops.config import params_from_dict

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["model"]["arch"] = "resnet18"
    raw["train"]["image_size"] = SIZE
    raw["runtime"]["threads"] = 1
    raw["evaluate"].update(evaluate)
    return params_from_dict(raw)


def tiny_weights(tmp_path: Path, params, seed: int = 0, name: str = "best.safetensors",
                 legacy: bool = False) -> Path:
    """Weights with the recipe a round records (chexops.model.recipe); `legacy`: only arch and
    targets, as rounds wrote them before the image size, head and normalisation were recorded."""
    import torch

    from chexops.model.network import build_model
    from chexops.model.recipe import params_recipe, recipe_metadata
    from chexops.model.weights import save_weights

    torch.manual_seed(seed)
    model = build_model(params.model, len(params.targets)).eval()
    path = tmp_path / name
    meta = ({"arch": params.model.arch, "targets": ",".join(params.targets)} if legacy
            else recipe_metadata(params_recipe(params)))
    save_weights(model, path, meta)
    return path


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def radiograph(seed: int, h: int = 48, w: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w), dtype=np.uint8)


def tiny_multiclass_weights(tmp_path: Path, params, seed: int = 0,
                            name: str = "multiclass.safetensors") -> Path:
    """Weights as a U-MultiClass round writes them: three logits (neg, pos, uncertain) per
    target and metadata coding="multiclass,..." (chexops.model.coding.OutputCoding)."""
    import dataclasses

    import torch

    from chexops.model.coding import MULTICLASS, OutputCoding
    from chexops.model.network import build_model
    from chexops.model.recipe import params_recipe, recipe_metadata
    from chexops.model.weights import save_weights

    coding = OutputCoding((MULTICLASS,) * len(params.targets))
    torch.manual_seed(seed)
    model = build_model(params.model, coding.n_outputs).eval()
    path = tmp_path / name
    save_weights(model, path,
                 recipe_metadata(dataclasses.replace(params_recipe(params), coding=coding)))
    return path
