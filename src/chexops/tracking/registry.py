"""The MLflow model registry: the final weights as a pyfunc model, registered, with a `champion`.

The pyfunc model holds the safetensors weights and a small JSON config (the weights' recipe:
model params, targets, image size, output coding, normalisation) as artifacts, and the chexops
package itself as code (code_paths), so it loads in any environment with the pip requirements
it lists, chexops installed or not. Its input is a DataFrame with one column `image` holding
base64-encoded image files (JPEG/PNG), so a REST client can send radiographs as they are; its output has one
probability column per target and an `error` column that flags images that could not be read
(the others are still predicted).
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from chexops.errors import ChexopsError

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models.model import ModelInfo

    from chexops.config import Params
    from chexops.inference.predictor import Predictor
    from chexops.model.recipe import Recipe

ALIAS = "champion"
ARTIFACT_NAME = "model"
# what chexops imports when the pyfunc loads and predicts (config reads YAML; timm needs
# huggingface_hub); chexops itself travels as code (code_paths), not as a requirement
PIP_PACKAGES = ("torch", "timm", "safetensors", "pillow", "numpy", "pandas", "mlflow", "pyyaml",
                "huggingface_hub")


def model_name(params: "Params") -> str:
    """The registered model's name: params' evaluate.model_name."""
    return params.evaluate.model_name


class ChexPyfunc(PythonModel):
    """pyfunc wrapper: DataFrame[image: base64 file bytes] -> probabilities per target + error."""

    def load_context(self, context) -> None:
        config = json.loads(Path(context.artifacts["config"]).read_text())
        self.predictor = build_predictor(Path(context.artifacts["weights"]), config)

    def predict(self, context, model_input, params=None):
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise ChexopsError("input needs a column `image` with base64-encoded image files")
        sources = [_b64(v) for v in frame["image"]]
        out = self.predictor.predict([s if isinstance(s, bytes) else b"" for s in sources],
                                     names=[str(i) for i in range(len(frame))])
        bad = [i for i, s in enumerate(sources) if not isinstance(s, bytes)]
        out.loc[bad, "error"] = "image is not valid base64; encode the file's bytes with base64"
        return out.drop(columns="image")


def _b64(value: Any) -> bytes | None:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        return None


def model_config(params: "Params", weights: Path | None = None) -> dict[str, Any]:
    """What the pyfunc needs to rebuild the network and read images and outputs: the recipe the
    weights' metadata records (model params, targets, output coding, image size, normalisation,
    chexops version; params stand in for what the file does not record, or without weights)."""
    from chexops.config import to_dict
    from chexops.model.recipe import params_recipe
    from chexops.model.weights import read_recipe

    # weights come from the artifact, so the recipe's model is never pretrained
    recipe = read_recipe(weights, params) if weights is not None else params_recipe(params)
    return {"model": to_dict(recipe.model), "targets": list(recipe.targets),
            "coding": recipe.coding.to_str(), "image_size": recipe.image_size,
            "normalisation": recipe.normalisation, "chexops_version": recipe.version}


def config_recipe(config: dict[str, Any]) -> "Recipe":
    """The recipe a pyfunc config records (a config without `coding`, logged before
    U-MultiClass, is all binary; one without `normalisation` was fed ImageNet's); model keys
    this chexops does not know are dropped."""
    from chexops.config import ModelConfig
    from chexops.data.batches import NORMALISATION
    from chexops.model.coding import coding_from_metadata
    from chexops.model.recipe import Recipe

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model = ModelConfig(**{k: v for k, v in config["model"].items() if k in known})
    targets = tuple(config["targets"])
    return Recipe(model, targets, coding_from_metadata(config, targets), int(config["image_size"]),
                  str(config.get("normalisation") or NORMALISATION),
                  str(config.get("chexops_version") or ""))


def build_predictor(weights: Path, config: dict[str, Any]) -> "Predictor":
    """The Predictor (on the CPU) a pyfunc config describes, its weights loaded strictly."""
    import torch

    from chexops.inference.predictor import Predictor
    from chexops.model.weights import load_model

    model, recipe = load_model(weights, recipe=config_recipe(config))
    return Predictor(model.eval(), recipe.targets, recipe.image_size, torch.device("cpu"),
                     recipe.coding, recipe=recipe)


def example_input(size: int = 64) -> pd.DataFrame:
    """One small grey PNG, base64-encoded: the model's input example."""
    from PIL import Image

    buf = io.BytesIO()
    ramp = np.tile(np.linspace(0, 255, size, dtype=np.uint8), (size, 1))
    Image.fromarray(ramp).save(buf, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode("ascii")]})


def signature(targets: tuple[str, ...]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "image")]),
                          outputs=Schema([*(ColSpec("double", t) for t in targets),
                                          ColSpec("string", "error")]))


def _pip_requirements() -> list[str]:
    import importlib.metadata as md

    return [f"{p}=={md.version(p)}" for p in PIP_PACKAGES]


def package_dir() -> Path:
    """The chexops package folder, logged with the model so it loads without chexops installed."""
    import chexops

    return Path(chexops.__file__).resolve().parent


def use_store(params: "Params", root: Path) -> str:
    """Point MLflow's fluent API (log_model, register, load) at the project's store."""
    from chexops.tracking.store import open_store, tracking_uri

    open_store(params, root)  # fails fast when a server is unreachable; creates the store
    uri = tracking_uri(params, root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def log_model(params: "Params", root: Path, run_id: str, weights: Path) -> "ModelInfo":
    """Log the weights as a pyfunc model of MLflow run `run_id` (input example + signature)."""
    from mlflow.models import Model

    use_store(params, root)
    # the logged model lives in the run's experiment (MLflow's fluent default would be
    # experiment 0, whose artifact root is ./mlruns under the current folder)
    mlflow.set_experiment(experiment_id=mlflow.tracking.MlflowClient().get_run(run_id).info.experiment_id)
    with tempfile.TemporaryDirectory() as tmp:
        spec = model_config(params, weights)
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps(spec, indent=2))
        # Model.log (not the fluent log_model) so the model goes to run `run_id` without
        # making it the active run; its kwargs reach mlflow.pyfunc.save_model
        return Model.log(artifact_path=None, name=ARTIFACT_NAME, flavor=mlflow.pyfunc,
                         run_id=run_id, python_model=ChexPyfunc(),
                         artifacts={"weights": str(weights), "config": str(config)},
                         code_paths=[str(package_dir())],
                         signature=signature(tuple(spec["targets"])),
                         input_example=example_input(int(spec["image_size"])),
                         pip_requirements=_pip_requirements())


def register(model_uri: str, name: str, champion: bool = False) -> "ModelVersion":
    """Register a logged model under `name`; optionally make the new version the champion."""
    version = mlflow.register_model(model_uri, name)
    if champion:
        set_champion(name, version.version)
    return version


def set_champion(name: str, version: str | int | None = None) -> str:
    """Alias `champion` -> `version` (default: the latest version); returns the version."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        if version is None:
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise MlflowException(f"no versions of {name}")
            version = max(int(v.version) for v in versions)
        client.set_registered_model_alias(name, ALIAS, str(version))
    except MlflowException as exc:
        raise ChexopsError(f"cannot set {name}@{ALIAS} to version {version}: "
                           f"{str(exc).splitlines()[0]}; run `dvc repro evaluate` with "
                           f"evaluate.register: true, or give an existing --version") from None
    return str(version)


def load_registered(uri: str, params: "Params", root: Path) -> "Predictor":
    """The Predictor inside a models:/ or runs:/ pyfunc; a clear error when it does not exist."""
    from mlflow.exceptions import MlflowException

    use_store(params, root)
    try:
        loaded = mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as exc:
        from chexops.redact import redact_url

        raise ChexopsError(f"model {uri} not found in {redact_url(mlflow.get_tracking_uri())} "
                           f"({str(exc).splitlines()[0][:160]}); check the run id or model "
                           f"name, e.g. models:/{model_name(params)}@{ALIAS}") from None
    return loaded.unwrap_python_model().predictor
