"""The one image decoder: an image file (bytes, path or open file) -> uint8 greyscale pixels as
they are meant to be displayed, or an ImageProblem naming why not. clean's checks, the training
image store (and so the teacher and evaluate's Grad-CAM), predict, serving and predict's
Grad-CAM all read images through `decode_image`, so a file gives the same pixels everywhere.

Policy (README "How images are read"):
- intensities are scaled by the range the bit depth allows: 8-bit by 255, 16-bit by 65535, a
  32-bit TIFF by its own maximum, float images must lie in 0..1; a PNG's sBIT chunk (significant
  bits) is honoured: 12-bit data stored unscaled in a 16-bit PNG with sBIT 12 is scaled by 4095.
  So a picture gives the same pixels saved at 8 or at 16 bits;
- EXIF orientation is applied, a palette is looked up, bilevel is 0 / 255, a PNG's gAMA gamma
  (without sRGB or ICC profile) is applied for a 2.2 display; ICC profiles are not applied;
- colour (RGB, CMYK, YCbCr, a colour palette) is read as its luminance (ITU-R 601-2 luma,
  Pillow's "L" conversion); clean counts such images;
- transparency (an alpha channel or a transparent colour) is refused: what lies under a
  transparent pixel is undefined, so clean drops the row and predict flags the image, with the
  same reason.
With `size`, the image is squished to (size, size) (the whole thorax kept) with Lanczos, a JPEG
first decoded at a reduced scale (Pillow's draft). PIL's decompression-bomb guard stays on.
"""
from __future__ import annotations

import io
import struct
import warnings
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np

from chexops.errors import ChexopsError

# what the store gives a slot and download counts as an image
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
COLOUR_MODES = frozenset({"RGB", "RGBX", "CMYK", "YCbCr"})
DEEP_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
SUPPORTED_MODES = frozenset({"1", "L", "P", "F"}) | COLOUR_MODES | DEEP_MODES
DISPLAY_GAMMA = 2.2          # the display a PNG's gAMA is corrected for (PNG spec, 12.5)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

Source = bytes | bytearray | str | Path | IO[bytes]
# what Pillow raises for a file it cannot read (UnidentifiedImageError and "image file is
# truncated" are OSErrors; a malformed EXIF block or chunk raises the struct/index errors)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, KeyError)


class ImageProblem(ChexopsError):
    """An image the decoder will not turn into pixels: `problem` says what is wrong, `fix` how
    to repair the file; str() is "problem; fix"."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}; {fix}")
        self.problem, self.fix = problem, fix


# ---------------------------------------------------------------- the policy, from the header

def header_problem(img: Any) -> ImageProblem | None:
    """Why an opened (not yet decoded) PIL image is refused, or None: transparency, or a mode
    this decoder does not read."""
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        return ImageProblem(f"image has transparency ({img.mode} with alpha or a transparent "
                            f"colour): what lies under it is undefined",
                            "save it without transparency (flattened, greyscale)")
    if img.mode not in SUPPORTED_MODES:
        return ImageProblem(f"image mode {img.mode} is not supported",
                            "save it as a greyscale PNG or JPEG")
    return None


def is_colour(img: Any) -> bool:
    """True for an image stored in colour (read as its luminance): a colour mode, or a palette
    with any entry that is not grey."""
    if img.mode in COLOUR_MODES:
        return True
    if img.mode == "P":
        pal = np.asarray(img.getpalette() or [], dtype=np.int32).reshape(-1, 3)
        return bool((pal != pal[:, :1]).any())
    return False


def png_significant_bits(data: bytes) -> int | None:
    """The first sample's significant bits a PNG's sBIT chunk declares (the grey sample for a
    greyscale PNG); None when `data` is not a PNG or has no sBIT before its image data. Pillow
    does not read sBIT, so the chunks are walked here (PNG spec, 5.3 and 11.3.2.4)."""
    if not data.startswith(_PNG_MAGIC):
        return None
    pos = len(_PNG_MAGIC)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind in (b"IDAT", b"IEND"):
            return None
        if kind == b"sBIT" and length >= 1 and pos + 9 <= len(data):
            return data[pos + 8]
        pos += 12 + length
    return None


# ---------------------------------------------------------------- decoding

def decode_image(source: Source, size: int | None = None) -> np.ndarray:
    """Image file (bytes, path or open binary file) -> uint8 greyscale (H, W), or (size, size)
    squished with Lanczos when `size` is given (the module's policy). Raises ImageProblem (a
    ChexopsError) naming what is wrong with the file and how to fix it."""
    from PIL import Image

    data = _read(source)
    try:
        with warnings.catch_warnings():  # between 1x and 2x PIL's limit: proceed, draft shrinks it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return _decode(img, data, size)
    except Image.DecompressionBombError as exc:
        raise ImageProblem(f"image too large ({exc})", "downscale it") from None
    except ImageProblem:
        raise
    except DECODE_ERRORS as exc:  # not an image, truncated data, a broken EXIF or palette
        text = " ".join(str(exc).split())[:120]
        what = ("not a readable image" if isinstance(exc, Image.UnidentifiedImageError)
                else "image is truncated or corrupt")
        raise ImageProblem(f"{what} ({exc.__class__.__name__}: {text})",
                           "give a JPEG or PNG radiograph, re-exported") from None


def _read(source: Source) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    try:
        return source.read() if hasattr(source, "read") else Path(source).read_bytes()
    except FileNotFoundError:
        raise ImageProblem("file not found", "check the path") from None
    except (OSError, zipfile.BadZipFile) as exc:  # a folder, no permission, a zip CRC failure
        raise ImageProblem(f"cannot read the file ({exc.__class__.__name__})",
                           "check the path and the file") from None


def _decode(img: Any, data: bytes, size: int | None) -> np.ndarray:
    from PIL import Image, ImageOps

    problem = header_problem(img)
    if problem is not None:
        raise problem
    info, is_png = dict(img.info), img.format == "PNG"
    bits = _declared_bits(img)
    if size is not None and img.format == "JPEG":
        img.draft("L", (size, size))          # JPEG DCT scaling (luma only): much less work
    img = ImageOps.exif_transpose(img)        # a copy, turned as the EXIF orientation says
    sbit = png_significant_bits(data) if is_png and img.mode in ("L", "I;16") else None
    grey = _grey(img, bits, sbit, info)
    if size is not None and grey.size != (size, size):
        grey = grey.resize((size, size), Image.Resampling.LANCZOS)
    return np.array(grey, dtype=np.uint8)     # a writable copy (torch.from_numpy warns otherwise)


def _declared_bits(img: Any) -> int:
    """The bit depth the file declares for a deep image: a TIFF's BitsPerSample (31 for signed
    32-bit), else 16 (Pillow reads 16-bit PNG, PGM and the like into 0..65535)."""
    tags = getattr(img, "tag_v2", None)
    if tags is None or img.mode not in DEEP_MODES:
        return 16
    bits, fmt = tags.get(258, (16,)), tags.get(339, (1,))
    bits = int(bits[0] if isinstance(bits, tuple) else bits)
    signed = int(fmt[0] if isinstance(fmt, tuple) else fmt) == 2
    return bits - 1 if signed else bits


def _grey(img: Any, bits: int, sbit: int | None, info: dict) -> Any:
    """8-bit "L" display values of a decoded, upright image."""
    from PIL import Image

    exponent = _gamma_exponent(info)
    if img.mode == "F":
        unit = _float_unit(np.asarray(img, dtype=np.float64))
    elif img.mode in DEEP_MODES:
        unit = _deep_unit(np.asarray(img, dtype=np.float64), bits, sbit)
    else:
        grey = img.convert("L")               # 1 -> 0/255, palette looked up, colour -> luma
        arr = np.asarray(grey, dtype=np.float64)
        top = 255.0
        if sbit is not None and 0 < sbit < 8 and arr.max() < (1 << sbit):
            top = float((1 << sbit) - 1)      # unscaled low-bit data, as _deep_unit reads it
        if top == 255.0 and exponent == 1.0:
            return grey
        unit = arr / top
    if exponent != 1.0:
        unit = unit ** exponent
    return Image.fromarray(np.round(unit * 255.0).astype(np.uint8))


def _deep_unit(arr: np.ndarray, bits: int, sbit: int | None) -> np.ndarray:
    """16/32-bit integer samples -> 0..1 by the declared depth. With sBIT s, samples that all fit
    in s bits are unscaled s-bit data (divided by 2^s - 1); otherwise they were scaled to the
    full depth as the PNG spec asks, and the full depth applies."""
    peak = float(arr.max()) if arr.size else 0.0
    if arr.size and float(arr.min()) < 0:
        raise ImageProblem("image has negative intensities",
                           "save it as an unsigned 8- or 16-bit PNG")
    if sbit is not None and 0 < sbit < bits and peak < (1 << sbit):
        bits = sbit
    top = float((1 << bits) - 1)
    if peak > top:
        raise ImageProblem(f"image has intensities above the {bits}-bit range it declares",
                           "save it as an 8- or 16-bit PNG")
    return arr / top


def _float_unit(arr: np.ndarray) -> np.ndarray:
    """Float samples must lie in 0..1 (the float image convention); anything else is refused
    rather than stretched, which would make the pixels depend on the image's own content."""
    if not np.isfinite(arr).all():
        raise ImageProblem("float image has NaN or infinite values", "save it as an 8- or 16-bit PNG")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ImageProblem(f"float image has values outside 0..1 ({lo:g}..{hi:g})",
                           "scale it to 0..1 or save it as an 8- or 16-bit PNG")
    return np.clip(arr, 0.0, 1.0)


def _gamma_exponent(info: dict) -> float:
    """The exponent that turns a PNG's samples into display values for a 2.2 display: 1 without
    gAMA, with an sRGB chunk or ICC profile (they take precedence), or for gamma 1/2.2."""
    gamma = info.get("gamma")
    if not gamma or "srgb" in info or "icc_profile" in info:
        return 1.0
    exponent = 1.0 / (float(gamma) * DISPLAY_GAMMA)
    return 1.0 if abs(exponent - 1.0) < 0.01 else exponent


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
