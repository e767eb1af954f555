"""`chexops resample`: over/undersampling of the training split into data/resampled (the
validation split untouched) and metrics/resample.json; the logic lives in chexops.data.resample."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from chexops import atomic, paths
from chexops.config import Params
from chexops.data.resample import STAGE, class_counts, resample_frame, split_frames
from chexops.tracking import runs as tracking


def main(params: Params, root: Path) -> None:
    root = Path(root)
    src = paths.require(root, paths.CLEAN_LABELS, "run `dvc repro clean` first")
    target, cfg = params.targets[0], params.resample
    with tracking.stage_run(params, root, STAGE) as run:
        train, valid = split_frames(pd.read_parquet(src))
        out = resample_frame(train, target, cfg.strategy, cfg.fraction, params.seed)
        with atomic.atomic_dir(root / paths.RESAMPLED_DIR) as tmp:
            out.to_parquet(tmp / paths.RESAMPLED_TRAIN.name, index=False)
            valid.to_parquet(tmp / paths.RESAMPLED_VALID.name, index=False)
        metrics: dict[str, Any] = {"target": target, "before": class_counts(train, target),
                   "train": class_counts(out, target), "valid": class_counts(valid, target)}
        atomic.write_json(root / paths.METRICS_DIR / "resample.json", metrics)
        print(f"resample {cfg.strategy} x{cfg.fraction}: {len(train)} -> {len(out)} train rows "
              f"({metrics['train']['positive']} positive), {len(valid)} valid rows untouched")
        run.log_params({"strategy": cfg.strategy, "fraction": cfg.fraction, "target": target})
        run.log_metrics({f"train_{k}": v for k, v in metrics["train"].items()}
                        | {"valid_rows": len(valid)})
