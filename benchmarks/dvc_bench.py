"""DVC's own cost at CheXpert scale: `dvc repro resample` from a local 223,414-image zip, then a
no-op `dvc status` / `dvc repro`. Writes benchmarks/results/dvc_bench.json.

    python benchmarks/dvc_bench.py [--rows 223414]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from data_bench import build_scale_zip  # noqa: E402

from tests.pipeline_repo import make_repo_copy, pipeline_env  # noqa: E402


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=pipeline_env(), check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=223_414)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        zip_path = tmp / "CheXpert-v1.0-small.zip"
        build_scale_zip(zip_path, args.rows)
        params = yaml.safe_load((HERE.parent / "params.yaml").read_text())
        params["data"]["source"] = str(zip_path)
        repo = make_repo_copy(tmp / "repo", params)
        result = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "train_rows": args.rows,
            "zip_mb": zip_path.stat().st_size / 2**20,
            "repro_through_resample_s": timed(["dvc", "repro", "resample"], repo),
            "noop_status_s": timed(["dvc", "status"], repo),
            "noop_repro_resample_s": timed(["dvc", "repro", "resample"], repo),
            "children_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "goal": "repro through resample <= 300 s; no-op <= 5 s",
        }
    out = HERE / "results" / "dvc_bench.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
