"""predict: decoding (bad, odd and huge images), per-image probabilities with bad images flagged,
CSV/JSON output through the real CLI, heatmaps, and clear errors for unknown models."""
from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from chexops import cli, predict
from chexops.config import to_dict
from chexops.errors import ChexopsError
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
    assert predict.decode_image(images["png"], SIZE).shape == (SIZE, SIZE)
    assert predict.decode_image(images["jpg"].read_bytes(), SIZE).dtype == np.uint8
    with pytest.raises(ChexopsError, match="not a readable image"):
        predict.decode_image(images["text"], SIZE)
    with pytest.raises(ChexopsError, match="4 channels"):
        predict.decode_image(images["rgba"], SIZE)
    with pytest.raises(ChexopsError, match="file not found"):
        predict.decode_image(images["missing"], SIZE)


def test_sixteen_bit_images_are_scaled_by_their_range(tmp_path):
    arr = (np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    out = predict.decode_image(path, SIZE)
    assert out.min() <= 5 and out.max() >= 250  # full 8-bit range, not the top 8 bits


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
        out = predict.decode_image(big, SIZE)
    assert out.shape == (SIZE, SIZE) and int(out.mean()) in range(120, 137)
    assert seen["decoded"][0] <= 3000 // 8 + 1  # JPEG draft decoded at 1/8 scale
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # over 2x: PIL's guard refuses
    with pytest.raises(ChexopsError, match="too large"):
        predict.decode_image(big, SIZE)


def test_a_batch_with_bad_images_still_predicts_the_good_ones(tmp_path, images):
    params = tiny_params(tmp_path)
    predictor = predict.predictor_from_weights(tiny_weights(tmp_path, params), params)
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
