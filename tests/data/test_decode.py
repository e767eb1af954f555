"""The one decoder: every mode and bit depth Pillow opens gives the pixels it is meant to show,
and the same pixels through every path that reads images (clean's checks, the image store,
predict, serving, predict's Grad-CAM, the teacher); transparency is refused alike everywhere."""
from __future__ import annotations

import base64
import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, PngImagePlugin

from chexops.data import decode
from chexops.data.clean import clean_table
from chexops.data.decode import ImageProblem, decode_all, decode_image, png_significant_bits
from chexops.data.images import load_image_array
from chexops.data.zipimages import ZipImages, check_images
from chexops.errors import ChexopsError
from tests.helpers import ROOT, chexpert_rows, csv_text, make_params
from tests.tiny_model import SIZE, tiny_params, tiny_weights

torch.set_num_threads(1)

RNG = np.random.default_rng(3)
GREY = RNG.integers(0, 256, (48, 40), dtype=np.uint8)          # the picture every case holds
RGB = RNG.integers(0, 256, (48, 40, 3), dtype=np.uint8)


def save(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def chunk(kind: bytes, data: bytes) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add(kind, data)
    return info


def palette_image(grey: bool) -> Image.Image:
    """Indices GREY % 16 into a grey (17 i) or a colour palette of 16 entries."""
    p = Image.frombytes("P", GREY.shape[::-1], (GREY % 16).tobytes())
    entries = [(17 * i, 17 * i, 17 * i) if grey else (17 * i, 255 - 8 * i, (40 * i) % 256)
               for i in range(16)]
    p.putpalette([c for e in entries for c in e])
    return p


def exif_rotated() -> tuple[bytes, bytes]:
    """The same JPEG data with and without EXIF Orientation 6 (rotate 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    img = Image.fromarray(GREY)
    return save(img, "JPEG", quality=90, exif=exif.tobytes()), save(img, "JPEG", quality=90)


def good_files() -> dict[str, bytes]:
    """A file per mode and bit depth the decoder reads, each holding a known picture."""
    deep12 = ((GREY.astype(np.int64) * 4095 + 127) // 255).astype(np.uint16)
    tif_int = np.round(GREY.astype(np.float64) * (2**31 - 1) / 255).astype(np.int32)
    return {
        "bilevel.png": save(Image.fromarray(GREY > 127), "PNG"),
        "grey.png": save(Image.fromarray(GREY), "PNG"),
        "grey.jpg": save(Image.fromarray(GREY), "JPEG", quality=90),
        "deep16.png": save(Image.fromarray(GREY.astype(np.uint16) * 257), "PNG"),
        "deep12_sbit.png": save(Image.fromarray(deep12), "PNG", pnginfo=chunk(b"sBIT", b"\x0c")),
        "deep12_scaled_sbit.png": save(Image.fromarray(deep12 << 4), "PNG",
                                       pnginfo=chunk(b"sBIT", b"\x0c")),
        "deep12_no_sbit.png": save(Image.fromarray(deep12), "PNG"),
        "int32.tif": save(Image.fromarray(tif_int), "TIFF"),
        "float.tif": save(Image.fromarray((GREY / 255).astype(np.float32)), "TIFF"),
        "grey_palette.png": save(palette_image(grey=True), "PNG"),
        "colour_palette.png": save(palette_image(grey=False), "PNG"),
        "grey_rgb.png": save(Image.fromarray(np.stack([GREY] * 3, axis=2)), "PNG"),
        "rgb.png": save(Image.fromarray(RGB), "PNG"),
        "rgb.jpg": save(Image.fromarray(RGB), "JPEG", quality=90),
        "cmyk.jpg": save(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=90),
        "rotated.jpg": exif_rotated()[0],
        "gamma1.png": save(Image.fromarray(GREY), "PNG",
                           pnginfo=chunk(b"gAMA", (100000).to_bytes(4, "big"))),
    }


def refused_files() -> dict[str, tuple[bytes, str]]:
    """(file, the start of the reason) for files the policy refuses; the float one only shows
    its problem on a full decode."""
    grey_alpha = Image.merge("LA", [Image.fromarray(GREY), Image.new("L", GREY.shape[::-1], 255)])
    transparent = palette_image(grey=True)
    transparent.info["transparency"] = 0
    return {
        "la.png": (save(grey_alpha, "PNG"), "image has transparency (LA"),
        "rgba.png": (save(Image.fromarray(RGB).convert("RGBA"), "PNG"),
                     "image has transparency (RGBA"),
        "transparent_palette.png": (save(transparent, "PNG", transparency=0),
                                    "image has transparency (P"),
        "float_out_of_range.tif": (save(Image.fromarray((GREY * 2.0).astype(np.float32)), "TIFF"),
                                   "float image has values outside 0..1"),
    }


def luma(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


# ---------------------------------------------------------------- what each file decodes to

def test_each_mode_decodes_to_the_picture_it_holds():
    files = good_files()
    full = {name: decode_image(data) for name, data in files.items()}
    np.testing.assert_array_equal(full["grey.png"], GREY)
    np.testing.assert_array_equal(full["bilevel.png"], np.where(GREY > 127, 255, 0))
    for same in ("deep16.png", "int32.tif", "float.tif", "grey_rgb.png"):
        np.testing.assert_array_equal(full[same], GREY, err_msg=same)
    for within_one in ("deep12_sbit.png", "deep12_scaled_sbit.png"):   # 12-bit rounding only
        assert np.abs(full[within_one].astype(int) - GREY).max() <= 1, within_one
    # no sBIT: a 16-bit PNG's range is 0..65535, so 12-bit data shows dark, as any viewer shows it
    deep12 = np.asarray(Image.open(io.BytesIO(files["deep12_no_sbit.png"])), dtype=np.float64)
    np.testing.assert_array_equal(full["deep12_no_sbit.png"], np.round(deep12 * 255 / 65535))
    np.testing.assert_array_equal(full["grey_palette.png"], (GREY % 16) * 17)
    colours = np.array([(17 * i, 255 - 8 * i, (40 * i) % 256) for i in range(16)], dtype=np.uint8)
    np.testing.assert_array_equal(full["colour_palette.png"], luma(colours[GREY % 16]))
    np.testing.assert_array_equal(full["rgb.png"], luma(RGB))
    with Image.open(io.BytesIO(files["cmyk.jpg"])) as cmyk:
        assert cmyk.mode == "CMYK"
        np.testing.assert_array_equal(full["cmyk.jpg"], luma(np.asarray(cmyk.convert("RGB"))))
    expected = np.round(255 * (GREY / 255) ** (1 / 2.2))      # gAMA 1.0 shown on a 2.2 display
    np.testing.assert_array_equal(full["gamma1.png"], expected)


def test_exif_orientation_is_applied():
    rotated, upright = exif_rotated()
    turned = decode_image(rotated)
    assert turned.shape == (40, 48)
    np.testing.assert_array_equal(turned, np.rot90(decode_image(upright), k=-1))


def test_the_ramp_reads_the_same_at_8_and_16_bits():
    """The ramp of the field report: 12-bit data in a 16-bit PNG used to decode near-white (mean
    246.7 of 255). Declared 12-bit (sBIT) or stored full-range, it reads as its 8-bit save."""
    unit = np.tile(np.linspace(0, 1, 320), (384, 1))
    ramp8 = save(Image.fromarray(np.round(unit * 255).astype(np.uint8)), "PNG")
    ramp12 = save(Image.fromarray(np.round(unit * 4095).astype(np.uint16)), "PNG",
                  pnginfo=chunk(b"sBIT", b"\x0c"))
    ramp16 = save(Image.fromarray(np.round(unit * 65535).astype(np.uint16)), "PNG")
    for size in (None, 224):
        eight = decode_image(ramp8, size)
        assert eight.mean() == pytest.approx(127.5, abs=0.3)
        for deep in (ramp12, ramp16):
            other = decode_image(deep, size)
            assert other.mean() == pytest.approx(eight.mean(), abs=0.05)
            assert np.abs(other.astype(int) - eight).max() <= 1
    np.testing.assert_array_equal(decode_image(ramp16), decode_image(ramp8))
    # the report's file: 0..4095 in a 16-bit PNG with no sBIT reads as that range of 0..65535
    no_sbit = (unit * 4095).astype(np.uint16)
    dark = decode_image(save(Image.fromarray(no_sbit), "PNG"))
    np.testing.assert_array_equal(dark, np.round(no_sbit.astype(np.float64) * 255 / 65535))
    assert dark.mean() == pytest.approx(127.5 * 4095 / 65535, abs=0.1)


def test_sbit_is_read_from_the_png_chunks():
    assert png_significant_bits(save(Image.fromarray(GREY), "PNG")) is None
    assert png_significant_bits(good_files()["deep12_sbit.png"]) == 12
    assert png_significant_bits(good_files()["grey.jpg"]) is None


@pytest.mark.parametrize("name", sorted(refused_files()))
def test_refused_files_name_the_problem(name):
    data, reason = refused_files()[name]
    with pytest.raises(ImageProblem, match=r"^" + reason.replace("(", r"\(")) as info:
        decode_image(data, SIZE)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad, message", [
    (np.full((8, 8), -5, dtype=np.int32), "negative intensities"),
    (np.full((8, 8), np.nan, dtype=np.float32), "NaN or infinite"),
    (np.full((8, 8), 1.5, dtype=np.float32), r"values outside 0..1 \(1.5..1.5\)"),
])
def test_deep_and_float_images_outside_their_range_are_refused(bad, message):
    with pytest.raises(ImageProblem, match=message):
        decode_image(save(Image.fromarray(bad), "TIFF"))


def test_deep_images_are_scaled_by_the_depth_they_declare():
    # a signed 32-bit TIFF by 2^31 - 1; a 16-bit PGM (Pillow spreads its maxval to 0..65535)
    assert decode_image(save(Image.fromarray(np.full((8, 8), 2**30, np.int32)), "TIFF")).max() == 128
    pgm = b"P5 8 8 4095\n" + np.full(64, 4095, ">u2").tobytes()
    assert decode_image(pgm).min() == 255


# ---------------------------------------------------------------- the same pixels on every path

def case_zip(tmp_path: Path, files: dict[str, bytes]) -> tuple[Path, dict[str, str]]:
    """A CheXpert zip whose train rows point at `files` (one patient each, frontal), the other
    rows at plain JPEGs; returns the zip and {file name: member}."""
    train, valid = chexpert_rows(train_patients=len(files))
    members = {}
    for i, name in enumerate(files):
        row = 2 * i                                 # the frontal view of patient i + 1
        members[name] = f"{ROOT}/train/patient{i + 1:05d}/study1/{name}"
        train.loc[row, "Path"] = members[name]
    z = tmp_path / "cases.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr(f"{ROOT}/train.csv", csv_text(train))
        zf.writestr(f"{ROOT}/valid.csv", csv_text(valid))
        for p in pd.concat([train, valid])["Path"]:
            name = Path(p).name
            data = files[name] if members.get(name) == p else save(Image.fromarray(GREY), "JPEG")
            zf.writestr(p, data)
    return z, members


@pytest.fixture()
def cases(tmp_path):
    files = good_files()
    z, members = case_zip(tmp_path, files)
    folder = tmp_path / "upload"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files, z, members, folder


@pytest.mark.parametrize("size", [SIZE, 64])
def test_store_clean_and_predict_loaders_give_identical_arrays(cases, tmp_path, size):
    files, z, members, folder = cases
    names = list(files)
    reference = np.stack([decode_image(files[n], size) for n in names])
    store = load_image_array(z, [members[n] for n in names], size, tmp_path / "cache")
    loaded, errors = decode_all([folder / n for n in names], size)      # predict's loader
    assert errors == [None] * len(names)
    with ZipImages(z) as zi:
        for k, n in enumerate(names):
            np.testing.assert_array_equal(store[k], reference[k], err_msg=n)
            np.testing.assert_array_equal(loaded[k], reference[k], err_msg=n)
            np.testing.assert_array_equal(zi.read(members[n], size), reference[k], err_msg=n)
            # clean's full check decodes at full size: the same decoder, the same pixels
            np.testing.assert_array_equal(zi.read(members[n]), decode_image(files[n]), err_msg=n)


def test_predict_serving_gradcam_and_teacher_see_the_same_pixels(cases, tmp_path, monkeypatch):
    from chexops.commands import predict as predict_command
    from chexops.inference import gradcam
    from chexops.inference.predictor import predictor_from_weights
    from chexops.tracking.registry import ChexPyfunc
    from chexops.training.teacher import load_teacher

    files, z, members, folder = cases
    names = list(files)
    params = tiny_params(tmp_path)
    weights = tiny_weights(tmp_path, params)
    predictor = predictor_from_weights(weights, params)
    reference = np.stack([decode_image(files[n], SIZE) for n in names])
    expected = predictor.probabilities(reference)
    frame = predictor.predict([folder / n for n in names])
    np.testing.assert_array_equal(frame[list(params.targets)].to_numpy(), expected)
    served = ChexPyfunc()
    served.predictor = predictor
    out = served.predict(None, pd.DataFrame({"image": [base64.b64encode(files[n]).decode()
                                                       for n in names]}))
    np.testing.assert_array_equal(out[list(params.targets)].to_numpy(), expected)
    store = load_image_array(z, [members[n] for n in names], SIZE, tmp_path / "cache")
    teacher = load_teacher(params, weights)                 # relabels from the store's pixels
    np.testing.assert_allclose(teacher.probabilities(store), expected, rtol=0, atol=1e-6)
    seen = []
    monkeypatch.setattr(gradcam, "gradcam", lambda model, images, *a, **k:
                        seen.append(np.array(images)) or np.zeros(images.shape))
    predict_command.write_heatmaps(predictor, [folder / n for n in names], frame, tmp_path / "heat")
    np.testing.assert_array_equal(seen[0], reference)


def test_a_picture_scores_the_same_saved_at_8_or_16_bits(tmp_path):
    from chexops.inference.predictor import predictor_from_weights

    params = tiny_params(tmp_path)
    predictor = predictor_from_weights(tiny_weights(tmp_path, params), params)
    targets = list(params.targets)
    eight, sixteen = (predictor.predict([good_files()[n]])[targets].to_numpy()
                      for n in ("grey.png", "deep16.png"))
    np.testing.assert_array_equal(eight, sixteen)


def test_clean_drops_refused_files_with_the_reason_predict_gives(tmp_path):
    from chexops.inference.predictor import predictor_from_weights

    good, refused = good_files(), refused_files()
    files = {**good, **{n: data for n, (data, _) in refused.items()}}
    z, members = case_zip(tmp_path, files)
    header_bad, colour = check_images(z, list(members.values()))
    assert colour == sum(n in ("colour_palette.png", "grey_rgb.png", "rgb.png", "rgb.jpg",
                               "cmyk.jpg") for n in good)
    params = make_params({"clean": {"image_check": "full", "max_bad_fraction": 0.5}})
    table, bad, metrics = clean_table(z, params)
    reasons = dict(zip(bad["Path"], bad["reason"]))
    assert set(reasons) == {members[n] for n in refused}
    assert set(table["Path"]) >= {members[n] for n in good}
    assert metrics["colour_images"] == colour and metrics["bad_images"] == len(refused)
    tiny = tiny_params(tmp_path)
    frame = predictor_from_weights(tiny_weights(tmp_path, tiny), tiny).predict(
        [refused[n][0] for n in refused])
    with ZipImages(z) as zi:
        for (name, (data, reason)), error in zip(refused.items(), frame["error"]):
            problem = error.split(";")[0]
            assert problem.startswith(reason)
            assert reasons[members[name]] in (problem, f"undecodable: {problem}")
            with pytest.raises(ChexopsError, match="cannot be decoded") as info:
                zi.read(members[name], SIZE)                # the store refuses it too
            assert problem in str(info.value)
    header_only = make_params({"clean": {"max_bad_fraction": 0.5}})
    _, bad_header, _ = clean_table(z, header_only)          # the header check sees transparency
    assert set(bad_header["Path"]) == {members[n] for n in refused if n.endswith(".png")}
    assert dict(header_bad) == dict(zip(bad_header["Path"], bad_header["reason"]))


def test_decoder_module_names_every_mode_it_reads():
    assert {"1", "L", "P", "I", "I;16", "F", "RGB", "CMYK"} <= decode.SUPPORTED_MODES
    assert {"LA", "RGBA", "PA"} <= decode.ALPHA_MODES
