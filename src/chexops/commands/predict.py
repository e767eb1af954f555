"""`chexops predict IMAGES... --model models:/<name>@champion | path/to/best.safetensors`:
per-image probabilities per target as CSV or JSON, optional Grad-CAM heatmaps.

Each image is decoded on its own: one that is not an image, has transparency or is too large
is flagged in the `error` column while the others are still predicted. The decoder is the
training image store's own (`chexops.data.decode.decode_image`: bit depth, orientation, colour
and transparency policy, JPEG draft, Lanczos squish), so an image gives the network the same
pixels here as in training, and a huge JPEG is still downscaled by its decoder.

The weights' recipe (chexops.model.recipe) says what the network is, the image size it trained
at and how the outputs read (`coding`, chexops.model.coding.OutputCoding): one sigmoid logit per
binary target, three logits per U-MultiClass target whose positive probability is
sigmoid(z_pos - z_neg). Where params say otherwise the weights win, one warning line per key.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chexops import atomic
from chexops.data.decode import decode_all
from chexops.errors import ChexopsError
from chexops.evaluation.targets import slug
from chexops.inference import gradcam
from chexops.inference.predictor import Predictor, predictor_from_weights
from chexops.model.recipe import check_recipe
from chexops.tracking.registry import load_registered

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from chexops.config import Params


def load_predictor(spec: str, params: "Params", root: Path) -> Predictor:
    """A models:/ or runs:/ URI from the MLflow store, or a local weights file; a warning line
    for each key where params disagree with the weights' recipe (the weights' value is used)."""
    if spec.startswith(("models:/", "runs:/")):
        predictor = load_registered(spec, params, root)
    else:
        predictor = predictor_from_weights(spec, params)
    if predictor.recipe is not None:
        check_recipe(predictor.recipe, params, "chexops predict")
    return predictor


# ---------------------------------------------------------------- output

def to_text(frame: pd.DataFrame, fmt: str) -> str:
    if fmt == "json":
        records = [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
                   for r in frame.to_dict(orient="records")]
        return json.dumps(records, indent=2) + "\n"
    return frame.to_csv(index=False, float_format="%.6f")


def write_heatmaps(predictor: Predictor, sources: list[Any], frame: pd.DataFrame,
                   out_dir: Path) -> list[Path]:
    """One Grad-CAM overlay PNG per readable image and target, in out_dir."""
    ok = [i for i, e in enumerate(frame["error"]) if not e]
    images, _ = decode_all([sources[i] for i in ok], predictor.image_size)
    written: list[Path] = []
    for j, target in enumerate(predictor.targets):
        cams: Any = (gradcam.gradcam(predictor.model, images, j, predictor.device,
                                coding=predictor.coding) if ok else [])
        for k, i in enumerate(ok):
            name = f"{Path(str(frame['image'][i])).stem}-{slug(target)}.png"
            path = out_dir / f"{i:04d}-{name}"
            with atomic.atomic_path(path, ".png") as tmp:
                gradcam.overlay_image(images[k], cams[k]).save(tmp, format="PNG")
            written.append(path)
    return written


def run(args: argparse.Namespace, params: "Params", root: Path) -> None:
    """Print the table; exit non-zero (ChexopsError) only when no image could be predicted."""
    predictor = load_predictor(args.model, params, root)
    frame = predictor.predict(list(args.images), names=list(args.images))
    sys.stdout.write(to_text(frame, args.format))
    sys.stdout.flush()
    bad = int((frame["error"] != "").sum())
    if bad and bad == len(frame):
        first = frame["error"].iloc[0]
        raise ChexopsError(f"all {bad} images flagged, none predicted (first: {frame['image'].iloc[0]}: "
                           f"{first}); see the error column")
    if args.heatmaps:
        written = write_heatmaps(predictor, list(args.images), frame, Path(args.heatmaps))
        print(f"chexops predict: {len(written)} heatmaps in {args.heatmaps}", file=sys.stderr)
    if bad:
        print(f"chexops predict: {bad} of {len(frame)} images flagged (see the error column)",
              file=sys.stderr)
