"""`chexops clean`: the label table from the zip's CSVs (views, U-Zeros/U-Ones, unknown
demographics, bad images) into data/clean (labels.parquet for the rounds, test.parquet for the
held-out test cohort, which evaluate alone reads) and metrics/clean.json; the logic lives in
chexops.data.clean."""
from __future__ import annotations

from pathlib import Path

from chexops import atomic, paths
from chexops.config import Params
from chexops.data.clean import DEMOGRAPHICS, STAGE, clean_table, print_counts, split_test
from chexops.tracking import runs as tracking


def main(params: Params, root: Path) -> None:
    root = Path(root)
    zip_path = paths.require(root, paths.RAW_ZIP, "run `dvc repro download` first")
    with tracking.stage_run(params, root, STAGE) as run:
        df, bad, metrics = clean_table(zip_path, params)
        labels, test = split_test(df)
        out_dir = root / paths.CLEAN_LABELS.parent
        with atomic.atomic_dir(out_dir) as tmp:
            labels.to_parquet(tmp / paths.CLEAN_LABELS.name, index=False)
            test.to_parquet(tmp / paths.CLEAN_TEST.name, index=False)
            bad.to_csv(tmp / paths.CLEAN_REPORT.name, index=False)
        atomic.write_json(root / paths.METRICS_DIR / "clean.json", metrics)
        print_counts(metrics)
        run.log_params({"views": params.clean.views, "sex": params.clean.sex,
                        "default_uncertainty": params.clean.default_uncertainty})
        run.log_metrics({"train_rows": metrics["rows_after"]["train"],
                         "valid_rows": metrics["rows_after"]["valid"],
                         "test_rows": metrics["rows_after"].get("test", 0),
                         "bad_images": metrics["bad_images"],
                         "colour_images": metrics["colour_images"],
                         **{f"unknown_{field.lower()}_rows": sum(split[field] for split in
                                                                metrics["unknown_after"].values())
                            for field in DEMOGRAPHICS}})
