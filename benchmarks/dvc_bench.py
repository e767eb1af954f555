"""DVC's own cost at CheXpert scale: `dvc repro resample` from a local 223,414-image zip, then a
no-op `dvc status` / `dvc repro`. Writes benchmarks/results/dvc_bench.json.

    python benchmarks/dvc_bench.py [--rows 223414] [--images realistic|tiny] [--out FILE]

`--images realistic` (the default) fills the zip with a distinct CheXpert-sized JPEG per row
(~11 GB at full scale; `download` copies it into the workspace and DVC into its cache, so allow
~3x that in the temporary folder); `--images tiny` repeats one tiny JPEG (the old 544 MB zip).
The JSON records the zip's bytes, so per-byte costs show.
"""
from __future__ import annotations

import argparse
import json
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
from machine import machine  # noqa: E402

from tests.pipeline_repo import make_repo_copy, pipeline_env  # noqa: E402


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=pipeline_env(), check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=223_414)
    parser.add_argument("--images", choices=("realistic", "tiny"), default="realistic",
                        help="JPEG bytes in the zip (module doc)")
    parser.add_argument("--jpeg-workers", type=int, default=2, help="processes making the zip")
    parser.add_argument("--out", default=str(HERE / "results" / "dvc_bench.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        zip_path = tmp / "CheXpert-v1.0-small.zip"
        built = build_scale_zip(zip_path, args.rows, args.images, args.jpeg_workers)
        params = yaml.safe_load((HERE.parent / "params.yaml").read_text())
        params["data"]["source"] = str(zip_path)
        repo = make_repo_copy(tmp / "repo", params)
        repro_s = timed(["dvc", "repro", "resample"], repo)
        result = {
            "machine": machine(),
            "train_rows": args.rows,
            **built,
            "zip_mb": built["zip_bytes"] / 2**20,
            "repro_through_resample_s": repro_s,
            "repro_zip_mb_per_s": built["zip_bytes"] / 2**20 / repro_s,
            "noop_status_s": timed(["dvc", "status"], repo),
            "noop_repro_resample_s": timed(["dvc", "repro", "resample"], repo),
            "children_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "goal": "repro through resample <= 300 s; no-op <= 5 s",
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
