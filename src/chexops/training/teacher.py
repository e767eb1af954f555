"""U-SelfTrained's teacher (CheXpert paper, Irvin et al. 2019): a model of an earlier trial
relabels the uncertain (-1) training labels before a round trains. The teacher is a local
weights file or an MLflow URI fetched from the project's store; its identity (URI redacted,
md5) goes to the round's MLflow run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from chexops import paths
from chexops.config import Params
from chexops.errors import ChexopsError
from chexops.hashing import file_md5
from chexops.inference.predictor import Predictor
from chexops.model.coding import relabel
from chexops.model.recipe import SCORED_KEYS, refuse, warn_assumed
from chexops.model.weights import load_model, read_recipe
from chexops.paths import image_cache_dir
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
    """The teacher as a Predictor on `device` (default CPU), TEACHER_BATCH images at a time, as
    its weights' recipe says (network, image size, output coding: a teacher from another trial
    may differ from the student in all of them; params stand in, with a warning, for what an
    older file does not record). Raises ChexopsError prefixed `clean.teacher:` when the file is
    missing, not safetensors, or predicts other targets than params' (in order)."""
    try:
        recipe = read_recipe(path, params)
        refuse(recipe, params, SCORED_KEYS, f"the teacher's weights {path}",
               "use a teacher trained on params' targets, in the same order")
        model, _ = load_model(path, recipe=recipe)
    except ChexopsError as exc:
        raise ChexopsError(f"clean.teacher: {exc}") from None
    warn_assumed(recipe, params, "chexops: clean.teacher", f"the teacher's weights {path}")
    device = device or torch.device("cpu")
    return Predictor(model.to(device).eval(), recipe.targets, recipe.image_size, device,
                     recipe.coding, batch=TEACHER_BATCH, recipe=recipe)


def teacher_identity(uri: str, path: Path) -> dict[str, str]:
    """What the round's MLflow run records about its teacher (URI redacted, file md5)."""

    return {"teacher": redact_url(uri), "teacher_md5": file_md5(path),
            "teacher_labels_from": path.name}


def teacher_images(params: Params, root: Path, data: Any, rows: np.ndarray,
                   image_paths: list[str], size: int) -> np.ndarray:
    """The images of `rows` at the teacher's size: the training set's own when the sizes agree,
    else decoded from the zip at `size` (once, into the shared image cache)."""
    if size == params.train.image_size:
        return data.images[data.image_rows(rows)]
    from chexops.data.images import load_image_array

    return load_image_array(root / paths.RAW_ZIP, [image_paths[r] for r in rows], size,
                            image_cache_dir(root), params.runtime.workers)


def self_train(params: Params, root: Path, data: Any, raw: np.ndarray, device: torch.device,
               image_paths: list[str]) -> tuple[Any, dict[str, str]]:
    """U-SelfTrained: the teacher relabels the uncertain labels of the selftrained targets of
    `data` (an ArraySet built from `raw`, row i an image of the zip member image_paths[i]), seen
    at the teacher's own image size; returns the new set and the teacher's identity."""
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
    probs[rows] = teacher.probabilities(teacher_images(params, root, data, rows, image_paths,
                                                       teacher.image_size))
    labels, mask = relabel(data.labels, data.mask, raw, probs, columns, params.clean.teacher_labels)
    identity = {**teacher_identity(params.clean.teacher, path),
                "teacher_mode": params.clean.teacher_labels, "teacher_relabelled": str(len(rows))}
    return dataclasses.replace(data, labels=labels, mask=mask), identity

