"""registry: the final weights as a pyfunc model with signature and input example, registered,
promoted to champion, loaded back by alias, and the same numbers as the weights file."""
from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from chexops import cli
from chexops.commands import predict
from chexops.errors import ChexopsError
from chexops.tracking import registry
from chexops.tracking import store as tracking_store
from tests.tiny_model import png_bytes, radiograph, tiny_params, tiny_weights

torch.set_num_threads(1)


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    params = tiny_params(tmp_path, model_name="chexops-test")
    weights = tiny_weights(tmp_path, params)
    client, exp_id = tracking_store.open_store(params, tmp_path)
    run_id = client.create_run(exp_id, run_name="evaluate").info.run_id
    return params, weights, run_id


def test_log_register_champion_and_load_back(tmp_path, store, monkeypatch):
    params, weights, run_id = store
    monkeypatch.chdir(tmp_path)
    info = registry.log_model(params, tmp_path, run_id, weights)
    import mlflow
    logged = mlflow.get_logged_model(info.model_id)
    # in the run's experiment and the project's artifact folder, never ./mlruns
    assert logged.artifact_location.startswith((tmp_path / "mlartifacts").as_uri())
    assert not (tmp_path / "mlruns").exists()
    assert info.signature.inputs.input_names() == ["image"]
    assert info.signature.outputs.input_names() == ["Cardiomegaly", "error"]
    assert info.saved_input_example_info is not None and info.run_id == run_id
    v1 = registry.register(info.model_uri, "chexops-test", champion=True)
    v2 = registry.register(info.model_uri, "chexops-test")
    assert (str(v1.version), str(v2.version)) == ("1", "2")
    from mlflow.tracking import MlflowClient
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("chexops-test", "champion").version) == "1"
    assert registry.set_champion("chexops-test") == "2"  # default: the latest version
    assert str(client.get_model_version_by_alias("chexops-test", "champion").version) == "2"

    loaded = registry.load_registered("models:/chexops-test@champion", params, tmp_path)
    direct = predict.predictor_from_weights(weights, params)
    imgs = [png_bytes(radiograph(s)) for s in range(3)]
    np.testing.assert_allclose(loaded.predict(imgs)["Cardiomegaly"],
                               direct.predict(imgs)["Cardiomegaly"], atol=1e-6)


def test_pyfunc_takes_base64_images_and_flags_bad_ones(tmp_path, store):
    import mlflow.pyfunc

    params, weights, run_id = store
    info = registry.log_model(params, tmp_path, run_id, weights)
    model = mlflow.pyfunc.load_model(info.model_uri)
    good = base64.b64encode(png_bytes(radiograph(1))).decode()
    junk = base64.b64encode(b"not an image").decode()
    out = model.predict(pd.DataFrame({"image": [good, junk, "%%%not base64%%%"]}))
    assert list(out.columns) == ["Cardiomegaly", "error"]
    assert 0 <= out["Cardiomegaly"][0] <= 1 and out["error"][0] == ""
    assert "not a readable image" in out["error"][1] and "base64" in out["error"][2]
    assert out["Cardiomegaly"][1:].isna().all()


def test_champion_command_and_unknown_model(tmp_path, store, capsys):
    import yaml

    from chexops.config import to_dict

    params, weights, run_id = store
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(to_dict(params)))
    registry.register(registry.log_model(params, tmp_path, run_id, weights).model_uri, "chexops-test")
    assert cli.main(["--root", str(tmp_path), "champion", "--name", "chexops-test"]) == 0
    assert "chexops-test@champion -> version 1" in capsys.readouterr().err
    assert cli.main(["--root", str(tmp_path), "champion", "--name", "nobody"]) == 2
    assert "cannot set nobody@champion" in capsys.readouterr().err
    with pytest.raises(ChexopsError, match="cannot set chexops-test@champion to version 9"):
        registry.set_champion("chexops-test", 9)


# ---------------------------------------------------------------- U-MultiClass, portability

def test_multiclass_weights_log_load_and_predict_like_the_weights(tmp_path, store):
    import mlflow.pyfunc

    from tests.tiny_model import tiny_multiclass_weights

    params, binary_weights, run_id = store
    weights = tiny_multiclass_weights(tmp_path, params, seed=1)
    config = registry.model_config(params, weights)
    assert config["coding"] == "multiclass" and config["targets"] == ["Cardiomegaly"]
    assert registry.model_config(params, binary_weights)["coding"] == "binary"
    assert registry.model_config(params)["coding"] == "binary"
    info = registry.log_model(params, tmp_path, run_id, weights)
    model = mlflow.pyfunc.load_model(info.model_uri)
    predictor = model.unwrap_python_model().predictor
    assert predictor.coding.kinds == ("multiclass",) and predictor.coding.n_outputs == 3
    imgs = [png_bytes(radiograph(s)) for s in range(3)]
    out = model.predict(pd.DataFrame({"image": [base64.b64encode(b).decode() for b in imgs]}))
    direct = predict.predictor_from_weights(weights, params)  # tested: sigmoid(z_pos - z_neg)
    np.testing.assert_allclose(out["Cardiomegaly"], direct.predict(imgs)["Cardiomegaly"], atol=1e-6)


def test_a_config_logged_before_coding_existed_loads_as_binary(tmp_path, store):
    params, weights, _ = store
    config = registry.model_config(params)
    del config["coding"]
    predictor = registry.build_predictor(weights, config)
    assert predictor.coding.kinds == ("binary",)
    imgs = [png_bytes(radiograph(s)) for s in range(2)]
    np.testing.assert_allclose(predictor.predict(imgs)["Cardiomegaly"],
                               predict.predictor_from_weights(weights, params)
                               .predict(imgs)["Cardiomegaly"], atol=1e-6)


LOAD_WITHOUT_INSTALL = r"""
import importlib.util, json, sys
from pathlib import Path
# hide the editable install (its .pth puts src/ on sys.path) and any other chexops on the path
sys.path = [p for p in sys.path if not (Path(p or ".") / "chexops").is_dir()]
assert importlib.util.find_spec("chexops") is None, "chexops is still importable"
import base64, io
import mlflow.pyfunc, numpy as np, pandas as pd
from PIL import Image
model = mlflow.pyfunc.load_model(sys.argv[1])
buf = io.BytesIO()
Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 40), dtype=np.uint8)).save(buf, "PNG")
out = model.predict(pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()]}))
import chexops
print(json.dumps({"chexops": chexops.__file__, "p": float(out["Cardiomegaly"][0]),
                  "error": out["error"][0]}))
"""


def test_logged_model_carries_its_code_and_loads_without_chexops_installed(tmp_path, store):
    import json
    import os
    import subprocess
    import sys

    import mlflow

    params, weights, run_id = store
    info = registry.log_model(params, tmp_path, run_id, weights)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri,
                                                     dst_path=str(tmp_path / "dl")))
    assert (local / "code/chexops/tracking/registry.py").is_file()
    assert not list((local / "code").rglob("__pycache__"))
    requirements = (local / "requirements.txt").read_text().lower()
    assert all(f"{p.lower()}==" in requirements for p in ("torch", "timm", "pyyaml", "safetensors"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_INSTALL, str(local)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["chexops"]).resolve().is_relative_to((local / "code").resolve())
    assert result["error"] == ""
    here = predict.predictor_from_weights(weights, params)
    buf_png = png_bytes(np.random.default_rng(1).integers(0, 255, (48, 40), dtype=np.uint8))
    assert result["p"] == pytest.approx(here.predict([buf_png])["Cardiomegaly"][0], abs=1e-6)


def test_the_registered_model_carries_the_weights_recipe_not_params(tmp_path, store, capsys):
    """Logged with params of another image size, the pyfunc (what `mlflow models serve` and
    `predict --model models:/...` run) reads images at the weights' size; predict says so."""
    import dataclasses

    import mlflow.pyfunc

    import chexops
    from chexops.data.batches import NORMALISATION
    from tests.tiny_model import SIZE

    params, weights, run_id = store
    asked = dataclasses.replace(params, train=dataclasses.replace(params.train, image_size=96))
    config = registry.model_config(asked, weights)
    assert (config["image_size"], config["normalisation"], config["chexops_version"]) == (
        SIZE, NORMALISATION, chexops.__version__)
    info = registry.log_model(asked, tmp_path, run_id, weights)
    served = mlflow.pyfunc.load_model(info.model_uri).unwrap_python_model().predictor
    assert served.image_size == SIZE and served.recipe.image_size == SIZE
    imgs = [png_bytes(radiograph(s)) for s in range(2)]
    np.testing.assert_allclose(served.predict(imgs)["Cardiomegaly"],
                               predict.predictor_from_weights(weights, params)
                               .predict(imgs)["Cardiomegaly"], atol=1e-6)
    capsys.readouterr()
    assert predict.load_predictor(info.model_uri, asked, tmp_path).image_size == SIZE
    assert capsys.readouterr().err.splitlines() == [
        f"chexops predict: warning: the weights were trained with train.image_size {SIZE}; "
        f"using {SIZE}, not params' 96"]
