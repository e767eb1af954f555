"""The CheXpert paper's five ways to treat uncertain (-1) labels, as training sees them.

clean.py already mapped U-Zeros / U-Ones; it keeps -1 for the other three, and this module
decides what -1 means per observation (params `clean.uncertainty` / `default_uncertainty`):
- ignore      -> masked out of loss and metrics (U-Ignore);
- zeros/ones  -> 0 / 1 (done by clean; repeated here so a -1 that slips through is not lost);
- multiclass  -> a 3-way softmax output (neg 0 / pos 1 / uncertain 2) for the observation; its
                 positive probability is p(pos) / (p(pos) + p(neg)) (U-MultiClass);
- selftrained -> a teacher model relabels the uncertain training labels before training
                 (U-SelfTrained): `clean.teacher_labels: soft` uses the teacher's probability as
                 a soft BCE target, `hard` thresholds it at 0.5.

`OutputCoding` is the model-output layout that follows from the policies: one logit per binary
target, three per multiclass target. It gives training its loss and evaluation its
probabilities, and travels in the weights' metadata (`coding`) so a teacher or an evaluation
rebuilds the same head.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chexops.config import Params
from chexops.errors import ChexopsError

BINARY, MULTICLASS = "binary", "multiclass"
UNCERTAIN_CLASS = 2      # class index of "uncertain" in a multiclass output (neg 0, pos 1)
TEACHER_BATCH = 64


@dataclass(frozen=True)
class OutputCoding:
    """Per target, `binary` (one logit, sigmoid) or `multiclass` (three logits, softmax)."""
    kinds: tuple[str, ...]

    @property
    def all_binary(self) -> bool:
        return all(k == BINARY for k in self.kinds)

    @property
    def n_outputs(self) -> int:
        return sum(3 if k == MULTICLASS else 1 for k in self.kinds)

    def slices(self) -> list[slice]:
        out, start = [], 0
        for k in self.kinds:
            width = 3 if k == MULTICLASS else 1
            out.append(slice(start, start + width))
            start += width
        return out

    def to_str(self) -> str:
        return ",".join(self.kinds)

    @classmethod
    def from_str(cls, text: str) -> "OutputCoding":
        kinds = tuple(text.split(","))
        if not kinds or any(k not in (BINARY, MULTICLASS) for k in kinds):
            raise ChexopsError(f"weights metadata coding {text!r} is not understood; "
                               f"use weights written by chexops")
        return cls(kinds)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
             pos_weight: float | None, denom: torch.Tensor | None = None) -> torch.Tensor:
        """Per-label BCE (binary) or cross-entropy (multiclass, pos class weighted by
        pos_weight), summed over unmasked labels / denom (default: their count)."""
        logits = logits.float()
        per = [self._column_loss(logits[:, sl], labels[:, j], kind, pos_weight)
               for j, (sl, kind) in enumerate(zip(self.slices(), self.kinds))]
        loss = torch.stack(per, dim=1)
        maskf = mask.to(loss.dtype)
        if denom is None:
            denom = maskf.sum().clamp(min=1.0)
        return (loss * maskf).sum() / denom

    @staticmethod
    def _column_loss(logits: torch.Tensor, y: torch.Tensor, kind: str,
                     pos_weight: float | None) -> torch.Tensor:
        functional = nn.functional
        if kind == BINARY:
            pw = None if pos_weight is None else torch.tensor(pos_weight, device=logits.device)
            return functional.binary_cross_entropy_with_logits(logits[:, 0], y, reduction="none",
                                                               pos_weight=pw)
        weight = None
        if pos_weight is not None:
            weight = torch.tensor([1.0, pos_weight, 1.0], device=logits.device)
        target = y.round().long().clamp(0, UNCERTAIN_CLASS)  # masked rows may hold anything
        return functional.cross_entropy(logits, target, weight=weight, reduction="none")

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """(N, outputs) logits -> (N, targets) positive probabilities."""
        logits = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1)
        cols = []
        for sl, kind in zip(self.slices(), self.kinds):
            z = logits[:, sl]
            if kind == BINARY:
                cols.append(1.0 / (1.0 + np.exp(-z[:, 0])))
            else:  # p(pos) / (p(pos) + p(neg)) = sigmoid(z_pos - z_neg): the softmax cancels
                cols.append(1.0 / (1.0 + np.exp(-(z[:, 1] - z[:, 0]))))
        return np.stack(cols, axis=1) if cols else np.zeros((len(logits), 0))


def output_coding(params: Params) -> OutputCoding:
    return OutputCoding(tuple(MULTICLASS if params.uncertainty_policy(t) == MULTICLASS else BINARY
                              for t in params.targets))


def needs_teacher(params: Params) -> bool:
    return any(params.uncertainty_policy(t) == "selftrained" for t in params.targets)


# ---------------------------------------------------------------- label encoding

def encode_labels(params: Params, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw (N, T) labels (1 / 0 / -1, NaN) -> (labels float32, mask bool) under each target's
    policy. Multiclass labels are class indices (neg 0, pos 1, uncertain 2); selftrained -1s
    stay masked until `relabel` fills them in."""
    raw = np.asarray(raw, dtype=np.float32).reshape(len(raw), -1)
    labels = np.zeros_like(raw)
    mask = np.zeros(raw.shape, dtype=bool)
    for j, t in enumerate(params.targets):
        col, policy = raw[:, j], params.uncertainty_policy(t)
        known = np.isin(col, (0.0, 1.0))
        uncertain = col == -1
        labels[known, j], mask[known, j] = col[known], True
        if policy in ("zeros", "ones"):
            labels[uncertain, j], mask[uncertain, j] = float(policy == "ones"), True
        elif policy == MULTICLASS:
            labels[uncertain, j], mask[uncertain, j] = UNCERTAIN_CLASS, True
    return labels, mask


def relabel(labels: np.ndarray, mask: np.ndarray, raw: np.ndarray, teacher_probs: np.ndarray,
            columns: list[int], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Fill the uncertain (-1) labels of `columns` with the teacher's probabilities (soft) or
    their 0.5-threshold (hard); teacher_probs is (N, T) over all rows (others unused)."""
    labels, mask = labels.copy(), mask.copy()
    raw = np.asarray(raw).reshape(labels.shape)
    for j in columns:
        rows = raw[:, j] == -1
        p = teacher_probs[rows, j]
        labels[rows, j] = (p >= 0.5).astype(np.float32) if mode == "hard" else p
        mask[rows, j] = True
    return labels, mask


# ---------------------------------------------------------------- the teacher

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


def coding_from_metadata(meta: dict[str, str], targets: tuple[str, ...] | list[str]) -> OutputCoding:
    """The output coding a weights file (or a pyfunc config) records under `coding`; all binary
    when it records none (weights written before U-MultiClass). Checked against the targets."""
    coding = (OutputCoding.from_str(str(meta["coding"])) if meta.get("coding")
              else OutputCoding((BINARY,) * len(targets)))
    if len(coding.kinds) != len(targets):
        raise ChexopsError(f"the weights' output coding {coding.to_str()!r} covers "
                           f"{len(coding.kinds)} targets, not the {len(targets)} "
                           f"({','.join(targets)}); use weights written by chexops")
    return coding


def load_teacher(params: Params, path: Path) -> tuple[nn.Module, OutputCoding]:
    """The teacher network: same model params, its output coding from the weights' metadata
    (read as predict reads any weights file)."""
    import dataclasses

    from chexops.model import build_model, load_weights, weights_metadata

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
    from chexops.batches import to_input

    model.to(device).eval()
    out = [model(to_input(torch.from_numpy(np.ascontiguousarray(images[i:i + TEACHER_BATCH])),
                          device)).float().cpu().numpy()
           for i in range(0, len(images), TEACHER_BATCH)]
    if not out:
        return np.zeros((0, len(coding.kinds)))
    return coding.probs(np.concatenate(out))


def teacher_identity(uri: str, path: Path) -> dict[str, str]:
    """What the round's MLflow run records about its teacher (URI redacted, file md5)."""
    from chexops.repro import file_md5
    from chexops.tracking import redact_uri

    return {"teacher": redact_uri(uri), "teacher_md5": file_md5(path),
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
    from chexops.tracking import tracking_uri

    path = resolve_teacher(params.clean.teacher, root, tracking_uri(params, root))
    model, coding = load_teacher(params, path)
    probs = np.zeros(raw.shape, dtype=np.float32)
    probs[rows] = predict_images(model, coding, data.images[data.image_rows(rows)], device)
    labels, mask = relabel(data.labels, data.mask, raw, probs, columns, params.clean.teacher_labels)
    identity = {**teacher_identity(params.clean.teacher, path),
                "teacher_mode": params.clean.teacher_labels, "teacher_relabelled": str(len(rows))}
    return dataclasses.replace(data, labels=labels, mask=mask), identity
