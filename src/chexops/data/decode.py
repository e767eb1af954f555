"""One uploaded or given radiograph -> the network's uint8 greyscale input, or a one-line reason
why not. Each image is decoded on its own, so one bad file never stops the others; PIL's
decompression-bomb guard stays on; the resize is the training image store's own
(chexops.data.images.decode: JPEG draft, Lanczos squish), so an image gives the network the same
pixels here as in training."""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from chexops.errors import ChexopsError

# greyscale or colour-free modes a radiograph comes in; RGB is accepted and made grey
GREY_MODES = {"1", "L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "RGB"}
DEEP_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # scaled by their own range


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
            deep_png = _png(_to_grey(img)) if deep else None
        except (OSError, ValueError, SyntaxError) as exc:
            raise ChexopsError(f"image is truncated or corrupt ({exc.__class__.__name__}); "
                               f"re-export it") from None
    if deep_png is not None:
        return _training_decode(deep_png, size)
    return _training_decode(bytes(source) if isinstance(source, (bytes, bytearray))
                            else Path(source), size)


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=0)  # lossless hand-over, no compression work
    return buf.getvalue()


def _training_decode(data: bytes | Path, size: int) -> np.ndarray:
    """The training cache's decode (draft + Lanczos squish) on an already vetted image."""
    from PIL import Image

    from chexops.data.zipimages import decode

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
