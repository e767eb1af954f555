"""Tiny CheXpert-like zips for tests: a few real JPEGs and CSVs with the 19 real columns."""
from __future__ import annotations

import contextlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from chexops.config import OBSERVATIONS
from chexops.data.schema import CSV_COLUMNS

ROOT = "CheXpert-v1.0-small"


def chexpert_rows(train_patients: int = 6, valid_patients: int = 3,
                  seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, valid) CSV frames: 2 views per patient; train labels 1/0/-1/blank, valid 0/1."""
    rng = np.random.default_rng(seed)
    frames = []
    for split, first, n in (("train", 1, train_patients), ("valid", train_patients + 1, valid_patients)):
        rows = []
        for p in range(first, first + n):
            for v, view in ((1, "frontal"), (2, "lateral")):
                choices = [1.0, 0.0, -1.0, np.nan] if split == "train" else [1.0, 0.0]
                labels = rng.choice(choices, len(OBSERVATIONS))
                rows.append([f"{ROOT}/{split}/patient{p:05d}/study1/view{v}_{view}.jpg",
                             "Female" if p % 2 else "Male", 40 + p,
                             view.capitalize(), ("AP" if p % 3 else "PA") if v == 1 else "",
                             *labels])
        frames.append(pd.DataFrame(rows, columns=list(CSV_COLUMNS)))
    return frames[0], frames[1]


def jpeg_bytes(seed: int, h: int = 40, w: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def csv_text(df: pd.DataFrame) -> str:
    return df.to_csv(index=False, float_format="%.1f")


def write_chexpert_zip(path: Path, train: pd.DataFrame | None = None, valid: pd.DataFrame | None = None,
                       train_csv: str | None = None, skip_images: tuple[str, ...] = (),
                       corrupt_images: tuple[str, ...] = (), extra: dict[str, bytes] | None = None,
                       root: str = ROOT) -> Path:
    """A CheXpert zip: CSVs (as frames or raw text) and one JPEG per row (minus `skip_images`)."""
    if train is None or valid is None:
        train, valid = chexpert_rows()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{root}/train.csv", train_csv if train_csv is not None else csv_text(train))
        zf.writestr(f"{root}/valid.csv", csv_text(valid))
        for i, p in enumerate(pd.concat([train, valid])["Path"]):
            if p in skip_images:
                continue
            name = p if root == ROOT else p.replace(ROOT, root, 1)
            zf.writestr(name, b"not a jpeg at all" if p in corrupt_images else jpeg_bytes(i))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


class FakeRun:
    """Stands in for chexops.tracking.runs.StageRun: records what a stage logs. `logged_steps` is the
    set of metric steps of this run id, shared by every FakeRun that continues it (a resume)."""

    def __init__(self, run_id: str = "fake", logged_steps: set | None = None):
        self.run_id = run_id
        self.params: dict = {}
        self.metrics: dict = {}   # latest value per key
        self.steps: list = []     # (step, values) of every log_metrics call, in order
        self.dicts: dict = {}
        self.figures: list = []
        self.artifacts: list = []
        self.tags: dict = {}
        self.logged_steps = set() if logged_steps is None else logged_steps

    def log_params(self, values): self.params.update(values)
    def log_dict(self, obj, name): self.dicts[name] = obj
    def log_figure(self, fig, name): self.figures.append(name)
    def set_tags(self, tags): self.tags.update(tags)

    def log_metrics(self, values, step=None):
        self.metrics.update(values)
        self.steps.append((step, dict(values)))
        if step is not None:
            self.logged_steps.add(step)

    def log_metrics_once(self, values, step):
        if step not in self.logged_steps:
            self.log_metrics(values, step)

    def log_artifact(self, path, artifact_path=None):
        assert Path(path).exists()
        self.artifacts.append(Path(path).name)


def fake_stage_run(runs: list, by_stage: bool = True):
    """A stage_run recorder appending (stage, run) -- or (run, resume_run_id) when not
    by_stage -- to `runs`; a resumed run id continues its steps."""
    steps_of: dict = {}

    @contextlib.contextmanager
    def stage_run(params, root, stage, resume_run_id=None):
        run_id = resume_run_id or f"run-{len(runs)}"
        run = FakeRun(run_id, steps_of.setdefault(run_id, set()))
        runs.append((stage, run) if by_stage else (run, resume_run_id))
        yield run
    return stage_run


def make_params(extra: dict | None = None):
    """The repo's params.yaml with `extra` merged in (nested dicts), validated."""
    import yaml

    from chexops.config import params_from_dict

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    return params_from_dict(merge(raw, extra or {}))


TINY_SYNTHETIC = {"train_patients": 8, "valid_patients": 4, "width": 48, "height": 56,
                  "workers": 1, "studies_per_patient": 1.5, "lateral_fraction": 0.3,
                  "test_patients": 5}
