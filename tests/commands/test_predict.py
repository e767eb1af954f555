"""predict: decoding (bad, odd and huge images), per-image probabilities with bad images flagged,
CSV/JSON output through the real CLI, heatmaps, and clear errors for unknown models."""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from chexops import cli
from chexops.commands import predict
from chexops.config import to_dict
from chexops.data import decode
from chexops.errors import ChexopsError
from chexops.inference import predictor as inference_predictor
from tests.tiny_model import SIZE, png_bytes, radiograph, tiny_params, tiny_weights

torch.set_num_threads(1)


@pytest.fixture()
def images(tmp_path):
    """Two good images (PNG greyscale, JPEG RGB) and three bad ones."""
    good_png = tmp_path / "a.png"
    good_png.write_bytes(png_bytes(radiograph(1)))
    good_jpg = tmp_path / "b.jpg"
    Image.fromarray(np.stack([radiograph(2)] * 3, axis=2)).save(good_jpg, quality=90)
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.zeros((20, 20, 4), dtype=np.uint8)).save(rgba)
    return {"png": good_png, "jpg": good_jpg, "text": text, "rgba": rgba,
            "missing": tmp_path / "missing.jpg"}


def test_decode_squishes_to_the_model_size_and_flags_bad_images(images):
    assert decode.decode_image(images["png"], SIZE).shape == (SIZE, SIZE)
    assert decode.decode_image(images["jpg"].read_bytes(), SIZE).dtype == np.uint8
    with pytest.raises(ChexopsError, match="not a readable image"):
        decode.decode_image(images["text"], SIZE)
    with pytest.raises(ChexopsError, match=r"image has transparency \(RGBA"):
        decode.decode_image(images["rgba"], SIZE)
    with pytest.raises(ChexopsError, match="file not found"):
        decode.decode_image(images["missing"], SIZE)


def test_huge_images_are_downscaled_by_the_decoder_or_refused(tmp_path, monkeypatch):
    big = tmp_path / "big.jpg"
    Image.fromarray(np.full((3000, 2400), 128, dtype=np.uint8)).save(big, quality=80)
    seen = {}
    real_resize = Image.Image.resize

    def spy(self, size, *a, **k):
        seen["decoded"] = self.size
        return real_resize(self, size, *a, **k)

    monkeypatch.setattr(Image.Image, "resize", spy)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000_000)  # 7.2 Mpx: over 1x, under 2x
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning escapes
        out = decode.decode_image(big, SIZE)
    assert out.shape == (SIZE, SIZE) and int(out.mean()) in range(120, 137)
    assert seen["decoded"][0] <= 3000 // 8 + 1  # JPEG draft decoded at 1/8 scale
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # over 2x: PIL's guard refuses
    with pytest.raises(ChexopsError, match="too large"):
        decode.decode_image(big, SIZE)


def test_a_batch_with_bad_images_still_predicts_the_good_ones(tmp_path, images):
    params = tiny_params(tmp_path)
    predictor = inference_predictor.predictor_from_weights(tiny_weights(tmp_path, params), params)
    order = [images["png"], images["text"], images["jpg"], images["rgba"]]
    frame = predictor.predict(order)
    assert list(frame.columns) == ["image", "Cardiomegaly", "error"]
    assert frame["error"].astype(bool).tolist() == [False, True, False, True]
    good = frame.loc[[0, 2], "Cardiomegaly"]
    assert good.between(0, 1).all() and frame.loc[[1, 3], "Cardiomegaly"].isna().all()
    # a good image's probability does not depend on its neighbours in the batch
    alone = predictor.predict([images["jpg"]])
    assert alone["Cardiomegaly"][0] == pytest.approx(frame["Cardiomegaly"][2], abs=1e-6)


def test_cli_prints_csv_and_json_and_writes_heatmaps(tmp_path, images, capsys):
    params = tiny_params(tmp_path)
    weights = tiny_weights(tmp_path, params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(to_dict(params)))
    args = ["--root", str(tmp_path), "predict", str(images["png"]), str(images["text"]),
            "--model", str(weights)]
    assert cli.main(args) == 0
    out = capsys.readouterr()
    csv = pd.read_csv(io.StringIO(out.out), keep_default_na=False)
    assert list(csv.columns) == ["image", "Cardiomegaly", "error"] and len(csv) == 2
    assert "not a readable image" in csv["error"][1] and "1 of 2 images flagged" in out.err
    heat = tmp_path / "heat"
    assert cli.main(args + ["--format", "json", "--heatmaps", str(heat)]) == 0
    records = json.loads(capsys.readouterr().out)
    assert records[1]["Cardiomegaly"] is None and 0 <= records[0]["Cardiomegaly"] <= 1
    pngs = sorted(heat.glob("*.png"))
    assert [p.name for p in pngs] == ["0000-a-cardiomegaly.png"]
    assert Image.open(pngs[0]).size == (SIZE, SIZE)


def test_missing_weights_and_unknown_runs_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = tiny_params(tmp_path)
    with pytest.raises(ChexopsError, match="not found"):
        predict.load_predictor(str(tmp_path / "nope.safetensors"), params, tmp_path)
    not_st = tmp_path / "junk.safetensors"
    not_st.write_bytes(b"junk")
    with pytest.raises(ChexopsError, match="not a safetensors file"):
        predict.load_predictor(str(not_st), params, tmp_path)
    with pytest.raises(ChexopsError, match="runs:/0123456789abcdef0123456789abcdef/model not found"):
        predict.load_predictor("runs:/0123456789abcdef0123456789abcdef/model", params, tmp_path)
    with pytest.raises(ChexopsError, match="models:/nobody@champion not found"):
        predict.load_predictor("models:/nobody@champion", params, tmp_path)


# ---------------------------------------------------------------- same pixels as training

def test_decode_gives_the_training_cache_pixels(tmp_path):
    """A JPEG (grey or RGB, small or large enough for the decoder's draft) and a PNG decode to
    the very uint8 array the training image cache (chexops.data.images) holds for them."""
    import zipfile

    from chexops.data.images import load_image_array
    from chexops.data.zipimages import ZipImages

    rng = np.random.default_rng(7)
    files = {}
    for name, shape in (("grey.jpg", (40, 32)), ("big.jpg", (300, 250)),
                        ("rgb.jpg", (90, 70, 3)), ("grey.png", (50, 44))):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(
            buf, format="PNG" if name.endswith("png") else "JPEG", quality=85)
        files[f"CheXpert-v1.0-small/valid/p1/s1/{name}"] = buf.getvalue()
    zip_path = tmp_path / "images.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
    for size in (SIZE, 64):
        cache = load_image_array(zip_path, list(files), size)
        with ZipImages(zip_path) as zi:
            for k, (member, data) in enumerate(files.items()):
                ours = decode.decode_image(data, size)
                np.testing.assert_array_equal(ours, zi.read(member, size), err_msg=member)
                np.testing.assert_array_equal(ours, cache[k], err_msg=member)
                path = tmp_path / Path(member).name
                path.write_bytes(data)
                np.testing.assert_array_equal(decode.decode_image(path, size), ours)
    # the check has teeth: the bilinear resize predict used before gives other pixels
    with Image.open(io.BytesIO(files["CheXpert-v1.0-small/valid/p1/s1/grey.png"])) as img:
        bilinear = np.asarray(img.convert("L").resize((SIZE, SIZE), Image.Resampling.BILINEAR))
    assert not np.array_equal(bilinear, decode.decode_image(
        files["CheXpert-v1.0-small/valid/p1/s1/grey.png"], SIZE))


# ---------------------------------------------------------------- U-MultiClass weights

def test_multiclass_weights_give_sigmoid_of_pos_minus_neg(tmp_path):
    from chexops.data.batches import to_input
    from tests.tiny_model import tiny_multiclass_weights

    params = tiny_params(tmp_path)
    predictor = inference_predictor.predictor_from_weights(tiny_multiclass_weights(tmp_path, params), params)
    assert predictor.coding.kinds == ("multiclass",) and predictor.coding.n_outputs == 3
    sources = [png_bytes(radiograph(s)) for s in range(4)]
    frame = predictor.predict(sources)
    assert list(frame.columns) == ["image", "Cardiomegaly", "error"]
    decoded = np.stack([decode.decode_image(s, SIZE) for s in sources])
    with torch.inference_mode():
        z = predictor.model(to_input(torch.from_numpy(decoded), torch.device("cpu"))).double().numpy()
    assert z.shape == (4, 3)
    expected = 1.0 / (1.0 + np.exp(-(z[:, 1] - z[:, 0])))
    np.testing.assert_allclose(frame["Cardiomegaly"], expected, atol=1e-6)
    soft = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)   # = p(pos) / (p(pos) + p(neg))
    np.testing.assert_allclose(expected, soft[:, 1] / (soft[:, 0] + soft[:, 1]), atol=1e-9)
    assert not np.allclose(expected, 1.0 / (1.0 + np.exp(-z[:, 0])))  # not a plain sigmoid


def test_weights_without_coding_are_binary_and_a_wrong_coding_is_refused(tmp_path):
    from chexops.model.network import build_model
    from chexops.model.weights import save_weights

    params = tiny_params(tmp_path)
    assert inference_predictor.predictor_from_weights(tiny_weights(tmp_path, params), params).coding.kinds \
        == ("binary",)
    bad = tmp_path / "two.safetensors"
    save_weights(build_model(params.model, 4), bad, {"targets": "Cardiomegaly",
                                                     "coding": "binary,multiclass"})
    with pytest.raises(ChexopsError, match="covers 2 targets, not the 1"):
        inference_predictor.predictor_from_weights(bad, params)


def test_multiclass_heatmaps_use_the_weights_coding(tmp_path, monkeypatch):
    """write_heatmaps scores the target under the weights' coding (what that score is, z_pos -
    z_neg, is tested in test_gradcam on a model whose Grad-CAM is not degenerate)."""
    from chexops.inference import gradcam
    from tests.tiny_model import tiny_multiclass_weights

    params = tiny_params(tmp_path)
    predictor = inference_predictor.predictor_from_weights(tiny_multiclass_weights(tmp_path, params), params)
    seen = []
    real = gradcam.gradcam

    def spy(model, images, target, device="cpu", batch=16, coding=None):
        seen.append((target, coding))
        return real(model, images, target, device, batch, coding=coding)

    monkeypatch.setattr(gradcam, "gradcam", spy)
    source = tmp_path / "x.png"
    source.write_bytes(png_bytes(radiograph(3)))
    frame = predictor.predict([source])
    written = predict.write_heatmaps(predictor, [source], frame, tmp_path / "heat")
    assert [p.name for p in written] == ["0000-x-cardiomegaly.png"]
    assert seen == [(0, predictor.coding)] and predictor.coding.kinds == ("multiclass",)
    image = decode.decode_image(source, SIZE)
    cam = real(predictor.model, image[None], 0, coding=predictor.coding)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(written[0])), gradcam.overlay(image, cam))


# ---------------------------------------------------------------- exit status

def test_cli_fails_when_every_image_is_flagged_but_still_prints_the_table(tmp_path, images,
                                                                          capsys):
    params = tiny_params(tmp_path)
    weights = tiny_weights(tmp_path, params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(to_dict(params)))
    heat = tmp_path / "heat"
    args = ["--root", str(tmp_path), "predict", str(images["text"]), str(images["rgba"]),
            "--model", str(weights), "--heatmaps", str(heat)]
    assert cli.main(args) == 2
    out = capsys.readouterr()
    csv = pd.read_csv(io.StringIO(out.out), keep_default_na=False)
    assert len(csv) == 2 and csv["error"].astype(bool).all()
    assert "all 2 images flagged" in out.err and "not a readable image" in out.err
    assert len(out.err.strip().splitlines()) == 1  # one line, no traceback
    assert not list(heat.glob("*.png"))
    # one good image among them is enough for success
    assert cli.main(args[:3] + [str(images["png"])] + args[3:]) == 0
    assert "2 of 3 images flagged" in capsys.readouterr().err


# ---------------------------------------------------------------- the weights' recipe wins

def _logit_at(weights: Path, params, image: Path, size: int) -> float:
    """The weights' own network on `image` decoded at `size` px (the reference, by hand)."""
    from chexops.data.batches import to_input
    from chexops.model.weights import load_model

    model, _ = load_model(weights, params)
    pixels = torch.from_numpy(decode.decode_image(image, size)[None])
    with torch.inference_mode():
        return float(model.eval()(to_input(pixels, torch.device("cpu")))[0, 0])


def test_weights_run_at_their_own_size_and_network_whatever_params_say(tmp_path, images, capsys):
    """Weights trained at 32 px with a 16-unit head, given with params of 64 px and 512 units
    (the field's 64-px weights under a 320-px profile): predict builds the weights' network,
    feeds it 32-px pixels, and says so in one line per key."""
    import dataclasses

    trained = tiny_params(tmp_path)
    trained = dataclasses.replace(trained, model=dataclasses.replace(trained.model, hidden=16))
    weights = tiny_weights(tmp_path, trained)
    asked = dataclasses.replace(trained, model=dataclasses.replace(trained.model, hidden=512),
                                train=dataclasses.replace(trained.train, image_size=2 * SIZE))
    (tmp_path / "profile.yaml").write_text(yaml.safe_dump(to_dict(asked)))
    assert cli.main(["--params", str(tmp_path / "profile.yaml"), "--root", str(tmp_path),
                     "predict", str(images["png"]), "--model", str(weights)]) == 0
    out = capsys.readouterr()
    got = pd.read_csv(io.StringIO(out.out))["Cardiomegaly"][0]
    z = _logit_at(weights, trained, images["png"], SIZE)
    assert got == pytest.approx(1.0 / (1.0 + np.exp(-z)), abs=2e-6)
    z_asked = _logit_at(weights, trained, images["png"], 2 * SIZE)
    assert abs(got - 1.0 / (1.0 + np.exp(-z_asked))) > 1e-4  # the size matters for this image
    assert out.err.splitlines() == [
        "chexops predict: warning: the weights were trained with model.hidden 16; using 16, not "
        "params' 512",
        f"chexops predict: warning: the weights were trained with train.image_size {SIZE}; using "
        f"{SIZE}, not params' {2 * SIZE}"]
    assert cli.main(["--root", str(tmp_path), "--params", str(tmp_path / "profile.yaml"),
                     "predict", str(images["png"]), "--model", str(weights), "--heatmaps",
                     str(tmp_path / "heat")]) == 0
    heat, = (tmp_path / "heat").glob("*.png")
    assert Image.open(heat).size == (SIZE, SIZE)   # Grad-CAM at the weights' size too


def test_weights_from_before_the_recipe_fall_back_to_params_with_one_warning(tmp_path, images,
                                                                             capsys):
    params = tiny_params(tmp_path)
    weights = tiny_weights(tmp_path, params, legacy=True)
    predictor = predict.load_predictor(str(weights), params, tmp_path)
    assert predictor.image_size == SIZE and predictor.recipe is not None
    assert predictor.recipe.assumed == ("model.head", "model.hidden", "model.ps",
                                        "model.bn_final", "train.image_size")
    line, = capsys.readouterr().err.splitlines()
    assert line.startswith("chexops predict: warning: the weights do not record model.head, ")
    assert line.endswith(f"assuming params' model.head fastai, model.hidden 512, model.ps 0.5, "
                         f"model.bn_final true, train.image_size {SIZE}")
    z = _logit_at(weights, params, images["png"], SIZE)
    assert predictor.predict([images["png"]])["Cardiomegaly"][0] == pytest.approx(
        1.0 / (1.0 + np.exp(-z)), abs=1e-6)


def test_weights_of_other_targets_predict_their_own_targets(tmp_path, images, capsys):
    import dataclasses

    params = tiny_params(tmp_path)
    edema = dataclasses.replace(params, targets=("Edema",))
    predictor = predict.load_predictor(str(tiny_weights(tmp_path, edema)), params, tmp_path)
    assert list(predictor.predict([images["png"]]).columns) == ["image", "Edema", "error"]
    assert capsys.readouterr().err.splitlines() == [
        "chexops predict: warning: the weights were trained with targets Edema; using Edema, "
        "not params' Cardiomegaly"]
