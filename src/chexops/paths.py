"""Where each stage reads and writes, relative to the repository root (mirrors dvc.yaml)."""
from __future__ import annotations

import os
from pathlib import Path

from chexops.errors import ChexopsError

RAW_DIR = Path("data/raw")
RAW_ZIP = RAW_DIR / "chexpert.zip"                 # the CheXpert zip, one DVC object
TRUTH = RAW_DIR / "synthetic_truth.parquet"        # synthetic only; training never reads it
CLEAN_LABELS = Path("data/clean/labels.parquet")
CLEAN_REPORT = Path("data/clean/bad_images.csv")
CLEAN_TEST = Path("data/clean/test.parquet")       # the held-out test cohort (maybe no rows):
                                                   # evaluate alone reads it, nothing selects on it
RESAMPLED_DIR = Path("data/resampled")
RESAMPLED_TRAIN = RESAMPLED_DIR / "train.parquet"
RESAMPLED_VALID = RESAMPLED_DIR / "valid.parquet"
CACHE_DIR = Path("data/cache")                     # decoded-image cache; not DVC-tracked; always
                                                   # the main repo's (inference.image_cache_dir)
# the download stage's source, fingerprinted on every `dvc repro` (not data: outside data/, so a
# trial's data md5s do not include it); and the memos behind it (main repo, not tracked)
SOURCE_FINGERPRINT = Path("fingerprints/source.json")
SOURCE_MEMOS = CACHE_DIR / "source"
CHECKPOINT_DIR = Path("checkpoints")               # resumable per-round checkpoints; not DVC-tracked
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
DVC_TEMP_MARKER = "/.dvc/tmp/exps/"             # where `dvc exp run --temp/--queue` works
MAIN_ROOT_ENV = "CHEXOPS_MAIN_ROOT"                # set by `chexops reproduce` for its workspace
EVALUATE_PLOTS = PLOTS_DIR / "evaluate"            # roc, precision-recall, confusion, calibration,
                                                   # rounds (every round's epochs in one table)
EVALUATE_REPORT = Path("reports/evaluate")         # report.md/html, figures, predictions.parquet
RUNS_DIR = Path("runs")                            # runs/<stage>.json: the MLflow run that made an output


def round_dir(k: int) -> Path:
    return Path("models") / f"round-{k}"


def round_weights(k: int) -> Path:
    return round_dir(k) / "best.safetensors"


def round_meta(k: int) -> Path:
    return round_dir(k) / "meta.json"


def round_metrics(k: int) -> Path:
    return METRICS_DIR / f"round-{k}.json"


def round_history(k: int) -> Path:
    """A round's per-epoch history (epoch 0: its starting weights), a `dvc plots` file."""
    return PLOTS_DIR / f"round-{k}" / "history.csv"


def stage_run_file(stage: str) -> Path:
    return RUNS_DIR / f"{stage}.json"


def main_repo_root(root: str | Path) -> Path:
    """The repository a user works in, which relative paths they give mean: $CHEXOPS_MAIN_ROOT
    where `chexops reproduce` set it for its workspace; <repo> for a DVC experiment workspace
    (<repo>/.dvc/tmp/exps/...); else `root` itself. Always absolute."""
    declared = os.environ.get(MAIN_ROOT_ENV, "").strip()
    if declared:
        return Path(declared).resolve()
    text = Path(root).resolve().as_posix()
    if DVC_TEMP_MARKER in text:
        return Path(text.split(DVC_TEMP_MARKER, 1)[0])
    return Path(text)


def image_cache_dir(root: str | Path) -> Path:
    """The decoded-image cache of the MAIN repository (<repo>/data/cache), also from a DVC
    experiment workspace (<repo>/.dvc/tmp/exps/...), so queued and --temp trials share it."""
    return main_repo_root(root) / CACHE_DIR


def source_memos(root: str | Path) -> Path:
    """The folder of the source fingerprint's memos, in the main repository's data/cache."""
    return main_repo_root(root) / SOURCE_MEMOS


def require(root: str | Path, rel: Path, fix: str) -> Path:
    """root/rel, an input a stage reads; a ChexopsError "<rel> not found; <fix>" when it is not
    there yet (fix: the stage to run first)."""
    if not (Path(root) / rel).is_file():
        raise ChexopsError(f"{rel.as_posix()} not found; {fix}")
    return Path(root) / rel
