"""A reproduction against the trial it reproduces: every metric (within a tolerance), each round's
weights (a hash of the tensors) and each derived data md5, side by side, and one verdict:
identical, within tolerance or different.
"""
from __future__ import annotations

import hashlib
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chexops.tracking import dvcfiles
from chexops.tracking.trials import Trial

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.tracking import MlflowClient

DEFAULT_TOLERANCE = 0.01       # |new - old| <= tol * max(1, |old|) on every metric
WEIGHTS_ARTIFACT = "model/best.safetensors"


# ---------------------------------------------------------------- weights

def tensor_hash(path: Path) -> str:
    """sha256 over tensor names, dtypes, shapes and bytes (file metadata is left out)."""
    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt") as fh:
        for name in sorted(fh.keys()):
            t = fh.get_tensor(name).contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.numel():
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def old_weights_hashes(client: "MlflowClient", trial: Trial) -> dict[str, str | None]:
    """Weights hash of each round's best weights, from the round runs' artifacts."""
    out: dict[str, str | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in sorted(s for s in trial.stage_runs if s.startswith("train-round-")):
            try:
                local = client.download_artifacts(trial.stage_runs[stage], WEIGHTS_ARTIFACT,
                                                   f"{tmp}/{stage}")
                out[stage] = tensor_hash(Path(local))
            except Exception:  # artifact missing (deleted, other store): shown as n/a
                out[stage] = None
    return out


def new_weights_hashes(ws: Path, stages: list[str]) -> dict[str, str | None]:
    out = {}
    for stage in stages:
        path = ws / "models" / stage.replace("train-", "") / "best.safetensors"
        out[stage] = tensor_hash(path) if path.is_file() else None
    return out


# ---------------------------------------------------------------- the verdict

def metrics_close(old: float, new: float, tolerance: float) -> bool:
    return math.isclose(old, new, rel_tol=0.0, abs_tol=tolerance * max(1.0, abs(old)))


def _nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def metrics_same(old: float | None, new: float | None) -> bool:
    """Bit-identical, where two NaNs (an undefined metric, e.g. AUROC of one class) are the same."""
    return old == new or (_nan(old) and _nan(new))


@dataclass
class Comparison:
    rows: list[tuple[str, str, str, str]]  # (what, old, new, status)
    verdict: str                           # identical | within tolerance | different


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def compare(old_m: dict[str, float], new_m: dict[str, float], old_w: dict[str, str | None],
            new_w: dict[str, str | None], old_d: dict[str, str], new_d: dict[str, str],
            tolerance: float) -> Comparison:
    """Rows for every metric, weights hash and data md5, and the overall verdict."""
    rows: list[tuple[str, str, str, str]] = []
    exact, close = True, True
    for key in sorted(old_m.keys() | new_m.keys()):
        a, b = old_m.get(key), new_m.get(key)
        same = metrics_same(a, b)
        near = a is not None and b is not None and metrics_close(a, b, tolerance)
        exact, close = exact and same, close and (same or near)
        rows.append((key, _fmt(a), _fmt(b), "same" if same else "close" if near else "DIFFERS"))
    for label, old, new, must_match in (("weights", old_w, new_w, False), ("data", old_d, new_d, True)):
        for key in sorted(old.keys() | new.keys()):
            was, now = old.get(key), new.get(key)
            if was is None:  # not recorded for the trial: shown, not judged
                rows.append((f"{label} {key}", "n/a", _fmt(now), "not recorded"))
                continue
            same = was == now
            exact, close = exact and same, close and (same or not must_match)
            rows.append((f"{label} {key}", was, _fmt(now), "same" if same else "DIFFERS"))
    verdict = "identical" if exact else "within tolerance" if close else "different"
    return Comparison(rows, verdict)


def judge(client: "MlflowClient", trial: Trial, new_metrics: dict[str, float], ws: Path,
          restored: dict[str, str], tolerance: float) -> Comparison:
    """The trial against its re-run in workspace `ws` (whose source data `restored` was put back
    at the trial's md5s on the way in; every other data md5 is what the re-run derived)."""
    recorded = trial.data_md5s
    derived = {k: v for k, v in dvcfiles.lock_outs(ws).items() if k in recorded and k not in restored}
    derived.update({out: recorded[out] for out in restored})
    rounds = sorted(s for s in dvcfiles.stages(ws) if s.startswith("train-round-"))
    return compare(trial.metrics, new_metrics, old_weights_hashes(client, trial),
                   new_weights_hashes(ws, rounds), recorded, derived, tolerance)
