"""registry: the final weights as a pyfunc model with signature and input example, registered,
promoted to champion, loaded back by alias, and the same numbers as the weights file."""
from __future__ import annotations

import base64

import numpy as np
import pandas as pd
import pytest
import torch

from chexops import cli, predict, registry, tracking
from chexops.errors import ChexopsError
from tests.tiny_model import png_bytes, radiograph, tiny_params, tiny_weights

torch.set_num_threads(1)


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    params = tiny_params(tmp_path, model_name="chexops-test")
    weights = tiny_weights(tmp_path, params)
    client, exp_id = tracking.open_store(params, tmp_path)
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
