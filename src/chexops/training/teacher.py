"""U-SelfTrained's teacher (CheXpert paper, Irvin et al. 2019): a model of an earlier trial
relabels the uncertain (-1) training labels before a round trains. The teacher is a local
weights file or an MLflow URI fetched from the project's store; its identity (URI redacted,
md5) goes to the round's MLflow run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from chexops.config import Params
from chexops.errors import ChexopsError
from chexops.hashing import file_md5
from chexops.inference.predictor import Predictor
from chexops.model.coding import relabel
from chexops.model.weights import load_model, recipe_from_metadata, weights_metadata
from chexops.redact import redact_url
from chexops.tracking import store

TEACHER_BATCH = 64


def resolve_teacher(uri: str, root: Path, tracking_uri: str | None = None) -> Path:
    """A local weights file (relative to the repo root), or an MLflow URI (runs:/..., models:/...,
    mlflow-artifacts:/...) downloaded to a local folder; a folder yields its one safetensors file
    (best.safetensors preferred)."""
    if ":/" in uri and not Path(uri).exists():
        path = _download(uri, tracking_uri)
    else:
        path = Path(uri) if Path(uri).is_absolute() else Path(root) / uri
    if path.is_dir():
        found = sorted(path.rglob("*.safetensors"), key=lambda p: (p.name != "best.safetensors",
                                                                   str(p)))
        if not found:
            raise ChexopsError(f"clean.teacher: {uri} holds no .safetensors weights; point it at "
                               f"a round's best.safetensors (or the run's model/ artifact)")
        path = found[0]
    if not path.is_file():
        raise ChexopsError(f"clean.teacher: weights {uri} not found; give a previous trial's "
                           f"models/round-5/best.safetensors or an MLflow runs:/<id>/model URI")
    return path


def _download(uri: str, tracking_uri: str | None) -> Path:
    """Fetched from the project's store (not MLflow's default, which is relative to the current
    folder: a queued trial runs in a DVC temp workspace)."""
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri,
                                                        registry_uri=tracking_uri))
    except Exception as exc:  # MlflowException, connection errors: all mean "no teacher"
        raise ChexopsError(f"clean.teacher: cannot fetch {uri} from MLflow "
                           f"({exc.__class__.__name__}); check the run id/model name and "
                           f"MLFLOW_TRACKING_URI") from None


def load_teacher(params: Params, path: Path,
                 device: torch.device | None = None) -> Predictor:
    """The teacher as a Predictor on `device` (default CPU), TEACHER_BATCH images at a time: the
    network model params describe, with the output coding the weights' metadata records (read as
    predict reads any weights file). Raises ChexopsError prefixed `clean.teacher:` when the
    file is missing, not safetensors or its coding does not cover params' targets."""

    try:  # only the coding is the file's: the teacher must predict params' targets, in order
        meta = weights_metadata(path)
        recipe = recipe_from_metadata({"coding": meta.get("coding", "")}, params)
    except ChexopsError as exc:
        raise ChexopsError(f"clean.teacher: {exc}") from None
    model, _ = load_model(path, recipe=recipe)
    device = device or torch.device("cpu")
    return Predictor(model.to(device).eval(), recipe.targets, params.train.image_size, device,
                     recipe.coding, batch=TEACHER_BATCH)


def teacher_identity(uri: str, path: Path) -> dict[str, str]:
    """What the round's MLflow run records about its teacher (URI redacted, file md5)."""

    return {"teacher": redact_url(uri), "teacher_md5": file_md5(path),
            "teacher_labels_from": path.name}


def self_train(params: Params, root: Path, data: Any, raw: np.ndarray,
               device: torch.device) -> tuple[Any, dict[str, str]]:
    """U-SelfTrained: the teacher relabels the uncertain labels of the selftrained targets of
    `data` (an ArraySet built from `raw`); returns the new set and the teacher's identity."""
    import dataclasses

    columns = [j for j, t in enumerate(params.targets)
               if params.uncertainty_policy(t) == "selftrained"]
    raw = np.asarray(raw, dtype=np.float32).reshape(len(raw), -1)
    rows = np.flatnonzero((raw[:, columns] == -1).any(axis=1)) if columns else np.array([], int)
    if not params.clean.teacher:  # config validation catches it first; this guards direct calls
        raise ChexopsError("selftrained needs a teacher; set clean.teacher")

    path = resolve_teacher(params.clean.teacher, root, store.tracking_uri(params, root))
    teacher = load_teacher(params, path, device)
    probs = np.zeros(raw.shape, dtype=np.float32)
    probs[rows] = teacher.probabilities(data.images[data.image_rows(rows)])
    labels, mask = relabel(data.labels, data.mask, raw, probs, columns, params.clean.teacher_labels)
    identity = {**teacher_identity(params.clean.teacher, path),
                "teacher_mode": params.clean.teacher_labels, "teacher_relabelled": str(len(rows))}
    return dataclasses.replace(data, labels=labels, mask=mask), identity

