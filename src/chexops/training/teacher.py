"""U-SelfTrained's teacher (CheXpert paper, Irvin et al. 2019): a model of an earlier trial
relabels the uncertain (-1) training labels before a round trains. The teacher is a local
weights file or an MLflow URI fetched from the project's store; its identity (URI redacted,
md5) goes to the round's MLflow run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chexops.config import Params
from chexops.errors import ChexopsError
from chexops.model.coding import OutputCoding, coding_from_metadata, relabel

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


def load_teacher(params: Params, path: Path) -> tuple[nn.Module, OutputCoding]:
    """The teacher network: same model params, its output coding from the weights' metadata
    (read as predict reads any weights file)."""
    import dataclasses

    from chexops.model.network import build_model, load_weights, weights_metadata

    try:
        coding = coding_from_metadata(weights_metadata(path), params.targets)
    except ChexopsError as exc:
        raise ChexopsError(f"clean.teacher: {exc}") from None
    model = build_model(dataclasses.replace(params.model, pretrained=False), coding.n_outputs)
    load_weights(model, path)
    return model.eval(), coding


@torch.inference_mode()
def predict_images(model: nn.Module, coding: OutputCoding, images: np.ndarray,
                   device: torch.device) -> np.ndarray:
    """(M, T) positive probabilities for uint8 images (M, S, S), model in eval mode."""
    from chexops.data.batches import to_input

    model.to(device).eval()
    out = [model(to_input(torch.from_numpy(np.ascontiguousarray(images[i:i + TEACHER_BATCH])),
                          device)).float().cpu().numpy()
           for i in range(0, len(images), TEACHER_BATCH)]
    if not out:
        return np.zeros((0, len(coding.kinds)))
    return coding.probs(np.concatenate(out))


def teacher_identity(uri: str, path: Path) -> dict[str, str]:
    """What the round's MLflow run records about its teacher (URI redacted, file md5)."""
    from chexops.hashing import file_md5
    from chexops.redact import redact_url

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
    from chexops.tracking.runs import tracking_uri

    path = resolve_teacher(params.clean.teacher, root, tracking_uri(params, root))
    model, coding = load_teacher(params, path)
    probs = np.zeros(raw.shape, dtype=np.float32)
    probs[rows] = predict_images(model, coding, data.images[data.image_rows(rows)], device)
    labels, mask = relabel(data.labels, data.mask, raw, probs, columns, params.clean.teacher_labels)
    identity = {**teacher_identity(params.clean.teacher, path),
                "teacher_mode": params.clean.teacher_labels, "teacher_relabelled": str(len(rows))}
    return dataclasses.replace(data, labels=labels, mask=mask), identity

