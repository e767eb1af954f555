"""`chexops predict IMAGES... --model models:/<name>@champion | path/to/best.safetensors`:
per-image probabilities per target as CSV or JSON, optional Grad-CAM heatmaps.

Each image is decoded on its own: one that is not an image, has the wrong channels or is too
large is flagged in the `error` column while the others are still predicted. Decoding keeps
PIL's decompression-bomb guard; the draft-and-resize step is the training cache's own
(`chexops.data.images.decode`: JPEG draft, Lanczos squish), so an image gives the network the
same pixels here as in training, and a huge JPEG is still downscaled by its decoder.

The weights' metadata says how the outputs read (`coding`, chexops.uncertainty.OutputCoding):
one sigmoid logit per binary target, three logits per U-MultiClass target whose positive
probability is sigmoid(z_pos - z_neg). Weights without it are all binary.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chexops.errors import ChexopsError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import torch
    from chexops.config import Params
    from chexops.model import ChexNet
    from chexops.uncertainty import OutputCoding

# greyscale or colour-free modes a radiograph comes in; RGB is accepted and made grey
GREY_MODES = {"1", "L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "RGB"}
DEEP_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # scaled by their own range
BATCH = 16


# ---------------------------------------------------------------- decoding

def _open(source: bytes | str | Path) -> Any:
    """PIL image (header read only); PIL owns the file when given a path."""
    from PIL import Image

    with warnings.catch_warnings():  # between 1x and 2x PIL's limit: proceed, draft shrinks it
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if isinstance(source, (bytes, bytearray)):
            return Image.open(io.BytesIO(source))
        return Image.open(Path(source))


def decode_image(source: bytes | str | Path, size: int) -> np.ndarray:
    """Image file (bytes or path) -> (size, size) uint8 greyscale, squished exactly as the
    training cache does it (chexops.data.images.decode). Raises ChexopsError naming what is
    wrong with the image."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = _open(source)
    except FileNotFoundError:
        raise ChexopsError("file not found; check the path") from None
    except Image.DecompressionBombError as exc:
        raise ChexopsError(f"image too large ({exc}); downscale it before predicting") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ChexopsError("not a readable image; give a JPEG or PNG radiograph") from None
    with img:
        if img.mode not in GREY_MODES:
            bands = len(img.getbands())
            raise ChexopsError(f"image has {bands} channels ({img.mode}); give a greyscale "
                               f"(1 channel) or RGB radiograph without alpha")
        deep = img.mode in DEEP_MODES
        try:
            # 16-bit / float: scaled by its own range to 8 bits first (training sees 8-bit JPEGs)
            data = _png(_to_grey(img)) if deep else None
        except (OSError, ValueError, SyntaxError) as exc:
            raise ChexopsError(f"image is truncated or corrupt ({exc.__class__.__name__}); "
                               f"re-export it") from None
    if data is None:
        data = bytes(source) if isinstance(source, (bytes, bytearray)) else Path(source)
    return _training_decode(data, size)


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=0)  # lossless hand-over, no compression work
    return buf.getvalue()


def _training_decode(data: bytes | Path, size: int) -> np.ndarray:
    """The training cache's decode (draft + Lanczos squish) on an already vetted image."""
    from PIL import Image

    from chexops.data.images import decode

    try:
        with warnings.catch_warnings():  # vetted by _open: between 1x and 2x PIL's limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            out = decode(io.BytesIO(data) if isinstance(data, bytes) else data, size)
    except Image.DecompressionBombError as exc:
        raise ChexopsError(f"image too large ({exc}); downscale it before predicting") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ChexopsError(f"image is truncated or corrupt ({exc.__class__.__name__}); "
                           f"re-export it") from None
    return np.array(out, dtype=np.uint8)  # a writable copy (torch.from_numpy warns otherwise)


def _to_grey(img: Any) -> Any:
    """8-bit greyscale; 16-bit and float images are scaled by their own range."""
    if img.mode in DEEP_MODES:
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        from PIL import Image

        return Image.fromarray(scaled.astype(np.uint8))
    return img.convert("L")


def decode_all(sources: list[Any], size: int) -> tuple[np.ndarray, list[str | None]]:
    """(images (N, size, size) uint8 with zeros where decoding failed, error per image or None)."""
    images = np.zeros((len(sources), size, size), dtype=np.uint8)
    errors: list[str | None] = []
    for i, src in enumerate(sources):
        try:
            images[i] = decode_image(src, size)
            errors.append(None)
        except ChexopsError as exc:
            errors.append(str(exc))
    return images, errors


# ---------------------------------------------------------------- the model

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
        from chexops.uncertainty import coding_from_metadata

        recorded = {} if self.coding is None else {"coding": self.coding.to_str()}
        self.coding = coding_from_metadata(recorded, self.targets)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S) uint8 -> (N, targets) positive probabilities (the coding's: sigmoid, or
        sigmoid(z_pos - z_neg) for a U-MultiClass target)."""
        import torch

        from chexops.batches import to_input

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
    from chexops.model import weights_metadata
    from chexops.uncertainty import coding_from_metadata

    meta = weights_metadata(weights)
    targets = tuple(meta["targets"].split(",")) if meta.get("targets") else tuple(params.targets)
    return meta.get("arch", params.model.arch), targets, coding_from_metadata(meta, targets)


def predictor_from_weights(weights: str | Path, params: "Params",
                           device: "torch.device | None" = None) -> Predictor:
    """A local safetensors file: architecture, targets and output coding from its metadata
    when recorded (train rounds write them), the head and image size from params."""
    import dataclasses

    import torch

    from chexops.model import build_model, load_weights

    arch, targets, coding = weights_spec(weights, params)
    cfg = dataclasses.replace(params.model, arch=arch, pretrained=False)
    model = build_model(cfg, coding.n_outputs)
    load_weights(model, weights)
    device = device or torch.device("cpu")
    return Predictor(model.to(device).eval(), targets, params.train.image_size, device, coding)


def load_predictor(spec: str, params: "Params", root: Path) -> Predictor:
    """A models:/ or runs:/ URI from the MLflow store, or a local weights file."""
    if spec.startswith(("models:/", "runs:/")):
        from chexops.registry import load_registered

        return load_registered(spec, params, root)
    return predictor_from_weights(spec, params)


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
    from chexops import atomic, gradcam

    ok = [i for i, e in enumerate(frame["error"]) if not e]
    images, _ = decode_all([sources[i] for i in ok], predictor.image_size)
    written: list[Path] = []
    for j, target in enumerate(predictor.targets):
        cams = (gradcam.gradcam(predictor.model, images, j, predictor.device,
                                coding=predictor.coding) if ok else [])
        for k, i in enumerate(ok):
            name = f"{Path(str(frame['image'][i])).stem}-{gradcam.slug(target)}.png"
            path = out_dir / f"{i:04d}-{name}"
            with atomic.atomic_path(path, ".png") as tmp:
                gradcam.overlay_image(images[k], cams[k]).save(tmp, format="PNG")
            written.append(path)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files (JPEG/PNG)")
    parser.add_argument("--model", required=True,
                        help="models:/<name>@champion, runs:/<run id>/model, or a .safetensors file")
    parser.add_argument("--format", choices=("csv", "json"), default="csv")
    parser.add_argument("--heatmaps", metavar="DIR", help="write Grad-CAM overlays here")


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
