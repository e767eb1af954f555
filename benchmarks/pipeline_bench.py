"""The default pipeline end to end: `dvc repro` of params.yaml (synthetic CheXpert, CPU) in a
fresh copy of the repo; wall time, peak memory and the AUROCs it reaches.
Writes benchmarks/results/pipeline_bench.json.

    python benchmarks/pipeline_bench.py
"""
from __future__ import annotations

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

from machine import machine  # noqa: E402

from tests.pipeline_repo import make_repo_copy, pipeline_env  # noqa: E402


def main() -> None:
    params = yaml.safe_load((HERE.parent / "params.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo_copy(Path(tmp), params)
        start = time.perf_counter()
        subprocess.run(["dvc", "repro"], cwd=repo, env=pipeline_env(), check=True, capture_output=True)
        seconds = time.perf_counter() - start
        evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
        rounds = {k: json.loads((repo / f"metrics/round-{k}.json").read_text())["auroc"] for k in range(1, 6)}
    target = params["targets"][0]
    result = {
        "machine": machine(),
        "profile": "params.yaml (default)",
        "dvc_repro_s": seconds,
        "children_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "round_best_valid_auroc": rounds,
        "final_auroc": evaluation[target]["auroc"],
        "ceiling_auroc": evaluation[target].get("ceiling_auroc"),
        "goal": "<= 900 s on 2 cores; AUROC well above 0.5, below the ceiling",
    }
    out = HERE / "results" / "pipeline_bench.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
